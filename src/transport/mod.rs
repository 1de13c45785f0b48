//! Transports: each turns bytes on one kind of channel into client frames for a
//! [`crate::session::Conn`] and writes its replies and the session's pushes back. No
//! delivery logic lives here.
//!
//! - `ws`: WebSocket, full duplex.
//! - `sse`: Server-Sent Events downstream; commands arrive on `http` POSTs.
//! - `poll`: long-poll downstream; commands arrive on `http` POSTs.
//! - `http`: the command endpoint for SSE and long-poll sessions.

pub mod http;
pub mod poll;
pub mod sse;
pub mod ws;

use axum::http::{HeaderMap, Uri, header};

use crate::config::ServerConfig;

/// Most pushes written per batch.
pub const BATCH: usize = 256;

/// Whether a browser request may use parley: no `Origin` (not a browser), the same
/// origin as the `Host` it was sent to, or an origin in `server.allowed_origins`. Guards
/// /ws and /sse against cross-site hijacking and drives CORS.
pub fn origin_allowed(config: &ServerConfig, headers: &HeaderMap, uri: &Uri) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return true;
    };
    if config
        .allowed_origins
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    // HTTP/1.1 names the host in `Host`; HTTP/2 in the URI's authority.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()));
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    host.is_some_and(|h| h.eq_ignore_ascii_case(origin_host))
}
