//! Transports: each turns bytes on one kind of channel into client frames for a
//! [`crate::session::Conn`] and writes its replies and the session's pushes back. No
//! delivery logic lives here.

pub mod ws;
