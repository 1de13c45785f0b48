//! parley: a chat (IM) backend. See `../shared/DESIGN.md` for the architecture:
//! `transport` → `session` → `chat` → `store` / `broker`, wired by `server`.

pub mod api;
pub mod auth;
pub mod broker;
pub mod chat;
pub mod codec;
pub mod config;
pub mod error;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod session;
pub mod store;
pub mod transport;
pub mod web;
