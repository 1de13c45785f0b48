//! parley-bench: parley's own load generator.
//!
//! It speaks parley's wire protocol (both encodings) over a real transport, against a
//! server on this machine only (loopback), and measures what the server costs: memory per
//! idle connection, fan-out throughput and end-to-end latency, handshakes per second. It
//! checks what it measures: every message counted at every member, no duplicates, no
//! gaps, positions in order. A run that lost anything says so and fails.
//!
//! Layout: scenarios are library functions (`scenario::*::run`) so tests can drive them
//! against an in-process server; the `parley-bench` binary is a thin CLI around them.
//!
//! - [`target`]: where to connect (loopback only), with which encoding and transport;
//!   opens the TCP connection; [`tls`] (below it): TLS over it (`--tls`, `--tls-ca`).
//! - [`transport`]: one client connection, whatever the transport (WebSocket, SSE,
//!   long-poll, WebTransport); [`ws_transport`] (below it): the plain WebSocket client
//!   (upgrade and frame reader); [`http_transport`]: the SSE and long-poll
//!   connections; [`wt_transport`]: WebTransport sessions (`/wt`).
//! - [`wire`]: cheap decoding of pushed messages (the generator must stay cheap), and
//!   what a connection yields.
//!
//! Imports point down that list's layers (`tests/layers.rs` checks it, as for parley).
//! - [`probe`]: the server process (spawn, pin, RSS, fds, CPU) read from `/proc`.
//! - [`net`]: file-descriptor limit and client source addresses.
//! - [`stats`]: latency histograms and per-second time series.
//! - [`report`]: summary tables, JSON and SVG charts.
//! - [`scenario`]: `idle`, `fanout`, `storm`, `chat`.

pub mod http_transport;
pub mod net;
pub mod probe;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod target;
pub mod tls;
pub mod transport;
pub mod ui;
pub mod wire;
pub mod ws_transport;
pub mod wt_transport;

pub use target::{Target, TransportKind};
