//! `[server]`: the listener, its deadlines, CORS and HTTP compression.

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

use super::{ConfigError, HOUR, MS, SEC, duration};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// On SIGTERM/SIGINT: how long connections get to drain before the process exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// On SIGTERM/SIGINT: how long `/readyz` answers 503 while parley still serves, so
    /// load balancers stop sending new clients before it stops accepting.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// A socket write that makes no progress for this long fails and the connection is
    /// closed (HTTP responses and long-poll replies; SSE streams use
    /// `sse.write_timeout`, WebSockets `ws.write_timeout`).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Deadlines before a request exists, so silent or trickling sockets cannot hold
    /// connection slots: a TLS handshake must finish within `tls_handshake_timeout`;
    /// then the client must send enough to tell HTTP/1 from HTTP/2 (its first bytes, or
    /// the whole HTTP/2 connection preface) within `preface_timeout`.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub preface_timeout: Duration,
    /// HTTP/1: a request head must arrive in full within this (on a keep-alive
    /// connection: within this of the previous response).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// HTTP/1: a keep-alive connection with no request in progress (not an SSE stream,
    /// not a pending long-poll) is closed once it has waited this long for the first
    /// byte of its next request; at most `header_read_timeout`. Clients open a new
    /// connection for their next request (browsers do so by themselves).
    #[serde(with = "humantime_serde")]
    pub keep_alive_idle: Duration,
    /// HTTP/1, over plain TCP and over TLS: a keep-alive connection that has waited this
    /// long for its next request gives back its HTTP state (~1.4 KB: hyper's task, buffers
    /// and timer) and waits on its bare socket (over TLS, with its TLS state) for the rest
    /// of `keep_alive_idle`; its next request is served by a new HTTP state. Connections
    /// whose requests come closer together than this keep theirs, and so does a
    /// connection whose last reply was a long-poll's (`GET /poll` with a hold time): its
    /// next poll comes a round trip later, which may be longer than this. `0`: never (each idle connection keeps its
    /// state until it closes). Default 200 ms.
    #[serde(with = "humantime_serde")]
    pub keep_alive_release: Duration,
    /// A request body (a command, an API call: at most `ws.max_frame_bytes`) must arrive
    /// in full within this of its head, or the request gets 408 and the connection is
    /// closed. Uploads are timed instead by their own idle deadline (no bytes for 60 s).
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// HTTP/2: a connection with no request open for this long is closed (GOAWAY).
    #[serde(with = "humantime_serde")]
    pub h2_idle_timeout: Duration,
    /// HTTP/2: a PING is sent after this long without a frame from the client; no answer
    /// within `h2_keep_alive_timeout` closes the connection.
    #[serde(with = "humantime_serde")]
    pub h2_keep_alive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub h2_keep_alive_timeout: Duration,
    /// HTTP/2: the largest HPACK table (bytes) parley's encoder keeps per connection for
    /// the response headers it sends, below what the client allows (4,096 from
    /// browsers). Every connection's table holds the headers it indexed for its life,
    /// their bytes in one buffer that connections whose tables are alike share; 0
    /// indexes none (every response header sent as a literal, as HTTP/1.1 sends them).
    /// Not a SETTINGS value: the client is told with HPACK's table size update (RFC 7541
    /// §4.2), which every HTTP/2 client handles. At most 4,096 (h2's own ceiling, whatever the client allows).
    pub h2_response_header_table_size: u32,
    /// HTTP/2: the HPACK table (bytes, SETTINGS_HEADER_TABLE_SIZE) parley lets a client
    /// fill with its request headers per connection. A browser indexes every header it
    /// sends but the path (~20 entries, ~1.4 KB of table from Chromium's user agent,
    /// client hints, fetch metadata and token; ~0.9 KB of memory, ~0.4 KB where other
    /// connections index the same headers, whose bytes are kept once), held for the
    /// connection's life; 0 keeps none, binding once the client acknowledges it, and each
    /// request then carries its headers as literals (~0.45 KB more per request from a
    /// browser). At most 4,096, the protocol's default.
    pub h2_request_header_table_size: u32,
    /// Browser origins (e.g. `https://app.example.com`) allowed to use the API, SSE,
    /// long-poll and /ws from another origin (CORS, and the WebSocket origin check).
    /// Same-origin requests and clients that send no `Origin` are always allowed. `*`
    /// allows any origin.
    pub allowed_origins: Vec<String>,
    /// Compress long-poll replies and HTTP API responses (gzip, brotli or zstd, by the
    /// request's `Accept-Encoding`). Never SSE streams or WebSockets.
    pub http_compression: bool,
    /// Every this long, check whether traffic or the connections and sessions held have
    /// fallen, or idle TLS connections gave their keys back, and if so hand the C
    /// library's free heap memory back to the OS (`malloc_trim`), so RSS falls back
    /// after a burst of traffic; 0 = never. In the default build Rust's allocations are
    /// jemalloc's, which gives freed memory back by itself (src/lib.rs `allocator`), and
    /// this trims only what C libraries (aws-lc's TLS keys, SQLite) hold in glibc's heap;
    /// in a build with glibc's malloc (`--no-default-features`) it trims everything.
    #[serde(with = "humantime_serde")]
    pub memory_trim_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            // Loopback: safe with the development secret. Containers and real
            // deployments set an address reachable from elsewhere, and a secret.
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shutdown_timeout: Duration::from_secs(10),
            drain_delay: Duration::from_secs(2),
            write_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            preface_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            keep_alive_idle: Duration::from_secs(10),
            keep_alive_release: Duration::from_millis(200),
            body_read_timeout: Duration::from_secs(15),
            h2_idle_timeout: Duration::from_secs(30),
            h2_keep_alive_interval: Duration::from_secs(20),
            h2_keep_alive_timeout: Duration::from_secs(20),
            h2_response_header_table_size: 4096,
            h2_request_header_table_size: 4096,
            allowed_origins: Vec::new(),
            http_compression: true,
            memory_trim_interval: Duration::from_secs(5),
        }
    }
}

impl ServerConfig {
    /// HTTP/1: how long a keep-alive connection waits for its next request in all
    /// (`keep_alive_idle`, at most `header_read_timeout`: waiting for a head is what it
    /// bounds).
    pub fn h1_idle(&self) -> Duration {
        self.keep_alive_idle.min(self.header_read_timeout)
    }

    /// HTTP/1: `keep_alive_release` when it applies (set, and shorter than
    /// [`ServerConfig::h1_idle`]).
    pub fn h1_release(&self) -> Option<Duration> {
        Some(self.keep_alive_release).filter(|r| !r.is_zero() && *r < self.h1_idle())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        duration(
            "server.shutdown_timeout",
            self.shutdown_timeout,
            Duration::ZERO,
            HOUR,
        )?;
        duration("server.write_timeout", self.write_timeout, 100 * MS, HOUR)?;
        if !self.keep_alive_release.is_zero() {
            duration(
                "server.keep_alive_release",
                self.keep_alive_release,
                10 * MS,
                HOUR,
            )?;
        }
        for (key, v) in [
            ("server.tls_handshake_timeout", self.tls_handshake_timeout),
            ("server.preface_timeout", self.preface_timeout),
            ("server.header_read_timeout", self.header_read_timeout),
            ("server.keep_alive_idle", self.keep_alive_idle),
            ("server.body_read_timeout", self.body_read_timeout),
            ("server.h2_idle_timeout", self.h2_idle_timeout),
            ("server.h2_keep_alive_interval", self.h2_keep_alive_interval),
            ("server.h2_keep_alive_timeout", self.h2_keep_alive_timeout),
        ] {
            duration(key, v, 10 * MS, HOUR)?;
        }
        for (key, v) in [
            (
                "server.h2_response_header_table_size",
                self.h2_response_header_table_size,
            ),
            (
                "server.h2_request_header_table_size",
                self.h2_request_header_table_size,
            ),
        ] {
            if v > 4096 {
                return Err(ConfigError::Invalid {
                    key,
                    value: v.to_string(),
                    allowed: "0..=4096".into(),
                });
            }
        }
        if !self.memory_trim_interval.is_zero() {
            duration(
                "server.memory_trim_interval",
                self.memory_trim_interval,
                SEC,
                HOUR,
            )?;
        }
        duration(
            "server.drain_delay",
            self.drain_delay,
            Duration::ZERO,
            10 * 60 * SEC,
        )
    }
}
