//! `[ws]`: WebSocket connections and permessage-deflate.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, HOUR, KIB, MIB, MS, SEC, count, duration};

use crate::codec::Encoding;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WsConfig {
    /// Encoding when the client offers no `Sec-WebSocket-Protocol`.
    pub default_encoding: Encoding,
    /// Server ping interval.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Close a connection that has sent nothing (no frame, no pong) for
    /// `heartbeat_interval + pong_timeout`.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// Largest inbound frame (bytes); larger ones close the connection with 1009.
    pub max_frame_bytes: usize,
    /// Socket read buffer of a connection while bytes are pending (grows for large
    /// frames, shrinks back; an idle connection holds none).
    pub read_buffer_bytes: usize,
    /// Socket write buffer of a connection while it writes (given back after a reply
    /// or a ping: an idle connection holds none).
    pub write_buffer_bytes: usize,
    /// A write (batch of frames + flush) that takes longer closes the connection as slow.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// After a push wakes an idle connection, wait this long before writing, so pushes
    /// arriving together go out in one write. 0 writes at once.
    #[serde(with = "humantime_serde")]
    pub coalesce: Duration,
    /// Most commands one connection may have in flight: read and waiting their turn,
    /// running (one at a time, beside the writer, so pushes and pings go on while a
    /// command waits for the store), or sends waiting for their commit. Past it the
    /// connection reads nothing more until a reply is out. Each waiting command holds at
    /// most one frame (`max_frame_bytes`).
    pub max_commands_in_flight: usize,
    /// Negotiate permessage-deflate (RFC 7692) with clients that offer it.
    pub deflate: bool,
    /// zlib compression level, 1 (fast) to 9 (small).
    pub deflate_level: u32,
    /// Messages (and broadcast bodies) shorter than this many bytes are sent uncompressed.
    pub deflate_min_bytes: usize,
    /// The `client_max_window_bits` asked of clients that offer it (9-15): the window a
    /// client may compress with, and the window parley inflates with when clients keep
    /// context (the inflate state shared without context takeover uses 15 bits).
    pub deflate_client_max_window_bits: u8,
    /// Let clients keep their compression context between messages (better ratio for
    /// what clients send, but inflate state kept per connection). Off: parley answers
    /// `client_no_context_takeover` and shares inflate state between connections.
    pub deflate_client_context_takeover: bool,
    /// Compress a broadcast once for all its recipients (on), or each push per connection
    /// like most WebSocket servers do (off: only for comparison, e.g. benchmarks).
    pub deflate_compress_once: bool,
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            default_encoding: Encoding::Json,
            heartbeat_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(20),
            max_frame_bytes: 64 * 1024,
            read_buffer_bytes: 1024,
            write_buffer_bytes: 1024,
            write_timeout: Duration::from_secs(10),
            coalesce: Duration::ZERO,
            max_commands_in_flight: 64,
            deflate: true,
            deflate_level: 6,
            deflate_min_bytes: 128,
            deflate_client_max_window_bits: 10,
            deflate_client_context_takeover: false,
            deflate_compress_once: true,
        }
    }
}

impl WsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        duration(
            "ws.heartbeat_interval",
            self.heartbeat_interval,
            10 * MS,
            HOUR,
        )?;
        duration("ws.pong_timeout", self.pong_timeout, 10 * MS, HOUR)?;
        count(
            "ws.max_frame_bytes",
            self.max_frame_bytes as u64,
            KIB,
            64 * MIB,
        )?;
        count(
            "ws.read_buffer_bytes",
            self.read_buffer_bytes as u64,
            128,
            16 * MIB,
        )?;
        count(
            "ws.write_buffer_bytes",
            self.write_buffer_bytes as u64,
            128,
            16 * MIB,
        )?;
        duration("ws.write_timeout", self.write_timeout, 100 * MS, HOUR)?;
        duration("ws.coalesce", self.coalesce, Duration::ZERO, SEC)?;
        count(
            "ws.max_commands_in_flight",
            self.max_commands_in_flight as u64,
            1,
            1024,
        )?;
        count("ws.deflate_level", u64::from(self.deflate_level), 1, 9)?;
        count(
            "ws.deflate_min_bytes",
            self.deflate_min_bytes as u64,
            0,
            64 * MIB,
        )?;
        count(
            "ws.deflate_client_max_window_bits",
            u64::from(self.deflate_client_max_window_bits),
            9,
            15,
        )
    }
}
