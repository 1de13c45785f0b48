//! Transports: the top layer. Each turns bytes on one kind of channel into client frames
//! for its connection's [`crate::session::Outbox`], and frames and writes what that one
//! outbox hands back (replies, pushes, keep-alives, the final close). No delivery, ack or
//! connect logic lives here; imports only point down (session, and what it builds on).
//!
//! - `ws`: WebSocket, full duplex.
//! - `http3`: HTTP/3 over QUIC: one connection's requests, served by the same router.
//! - `wt`: WebTransport sessions at `/wt` (HTTP/3), the frames of `/ws` on a QUIC stream.
//! - `mqtt`: MQTT 3.1.1 over WebSocket (`/mqtt`), mapped onto the same sessions.
//! - `sse`: Server-Sent Events downstream; commands arrive on `http` POSTs.
//! - `poll`: long-poll downstream; commands arrive on `http` POSTs.
//! - `http`: the command endpoint for SSE and long-poll sessions.
//! - `api`: the HTTP API (history, rooms, tickets, server-side posts).
//! - `files`: the attachments API (upload, download, signed URLs, delete).
//! - `forward`: requests for a session another instance holds are routed there.
//! - `bearer`: bearer-token auth and the HTTP error type shared by the HTTP paths.
//! - `deadline`: a write deadline on every accepted socket, so no connection can stay
//!   stuck on a client that does not read.
//! - `admission`: connection limits (total, per IP) and per-IP rates.
//! - `idle`: counting an HTTP/2 connection's open requests, so an idle one is closed.

pub mod admission;
pub mod api;
pub mod app;
pub mod bearer;
pub mod cors;
pub mod deadline;
pub mod files;
pub mod forward;
pub mod http;
pub mod http3;
pub mod idle;
pub mod mqtt;
pub mod poll;
pub mod sse;
pub mod version;
pub mod ws;
pub mod wt;

use std::{cell::Cell, ops::Deref, sync::Arc};

use axum::http::{HeaderMap, Uri, header};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{config::ServerConfig, session::Core};

/// What every transport handler gets: the session layer, the shutdown signal, and the
/// tracker of tasks that outlive their HTTP request (upgraded WebSockets).
///
/// Cloned for every request (axum's `State`), so it is one `Arc`: a clone is one
/// reference count, not one per field (a `CancellationToken` clone or drop takes the
/// token's mutex, which every core would share).
#[derive(Clone)]
pub struct Ctx(Arc<CtxParts>);

/// What a [`Ctx`] holds.
pub struct CtxParts {
    pub core: Arc<Core>,
    /// Cancelled when a shutdown begins: `/readyz` answers 503 from then on.
    pub draining: CancellationToken,
    /// Cancelled `server.drain_delay` later: stop accepting, tell clients to reconnect.
    /// Connections wait on one of its shards ([`Ctx::connection_shutdown`]).
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// Connection limits and per-IP rates.
    pub admission: Arc<admission::Admission>,
    /// MQTT sessions kept between connections (`clean_session=false`).
    pub mqtt: Arc<mqtt::Kept>,
    /// Children of `shutdown`, cancelled with it: each connection clones, polls and
    /// drops one of these, chosen by the worker thread it was accepted on, so
    /// connections on different cores do not all take one token's mutex.
    shutdown_shards: Box<[CancellationToken]>,
}

/// Shards of the shutdown token (a few per core of a large machine).
const SHUTDOWN_SHARDS: usize = 64;

thread_local! {
    /// This thread's shutdown shard, assigned on first use.
    static SHARD: Cell<Option<usize>> = const { Cell::new(None) };
}

impl Ctx {
    pub fn new(core: Arc<Core>, admission: admission::Admission, mqtt: Arc<mqtt::Kept>) -> Ctx {
        let shutdown = CancellationToken::new();
        let shutdown_shards = (0..SHUTDOWN_SHARDS)
            .map(|_| shutdown.child_token())
            .collect();
        Ctx(Arc::new(CtxParts {
            core,
            draining: CancellationToken::new(),
            shutdown,
            tracker: TaskTracker::new(),
            admission: Arc::new(admission),
            mqtt,
            shutdown_shards,
        }))
    }

    /// This thread's shard of the shutdown token, to wait on without cloning it.
    pub fn shutdown_shard(&self) -> &CancellationToken {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let i = SHARD.with(|c| {
            c.get().unwrap_or_else(|| {
                let i = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                c.set(Some(i));
                i
            })
        });
        &self.shutdown_shards[i % SHUTDOWN_SHARDS]
    }

    /// The shutdown signal for one connection: cancelled exactly when
    /// [`CtxParts::shutdown`] is (one of its child tokens).
    pub fn connection_shutdown(&self) -> CancellationToken {
        self.shutdown_shard().clone()
    }

    /// Whether the shutdown has begun (without taking the root token's mutex).
    pub fn shutting_down(&self) -> bool {
        self.shutdown_shard().is_cancelled()
    }
}

impl Deref for Ctx {
    type Target = CtxParts;
    fn deref(&self) -> &CtxParts {
        &self.0
    }
}

/// The peer address of the connection a request came on (a request extension).
#[derive(Debug, Clone, Copy)]
pub struct PeerIp(pub std::net::IpAddr);

/// Marks a request that came over the server's own TLS (a request extension; absent on
/// plain TCP). `/ws` closes a plain HTTP/1.1 connection without shutting its write side
/// down first (the close sends the same FIN); over TLS the shutdown sends `close_notify`.
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

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
