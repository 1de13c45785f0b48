//! `[http3]`: the QUIC listener (HTTP/3 and WebTransport at `/wt`).

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

use super::{ConfigError, DAY, HOUR, MS, count, duration};

/// HTTP/3 over QUIC (UDP) beside the TLS listener; only when `[tls]` is configured
/// (QUIC has no plaintext mode). Serves the same routes as HTTP/1.1 and HTTP/2, and
/// WebTransport sessions at `/wt` (docs/PROTOCOL.md, "WebTransport").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Http3Config {
    /// Listen for QUIC when TLS is configured (off: no UDP socket, no `Alt-Svc`).
    pub enabled: bool,
    /// The UDP address. Unset: the address and port the TCP listener bound.
    pub listen: Option<SocketAddr>,
    /// A QUIC connection that receives nothing for this long is closed (and the
    /// connection's WebTransport session detached). Clients keep it open with pings.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most request streams (bidirectional) one connection may have open at once.
    pub max_streams: u32,
    /// `/wt` clients may ask for typing and presence as HTTP/3 datagrams (RFC 9297);
    /// off: everything goes on the stream.
    pub datagrams: bool,
    /// The `ma` of the `Alt-Svc` header that TCP responses carry; zero: no `Alt-Svc`.
    #[serde(with = "humantime_serde")]
    pub alt_svc_max_age: Duration,
    /// With more than this many QUIC handshakes in progress, a new connection must first
    /// prove its address with a Retry (one more round trip). 0: always.
    pub retry_above_handshakes: u32,
}

impl Default for Http3Config {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: None,
            idle_timeout: Duration::from_secs(30),
            max_streams: 100,
            datagrams: true,
            alt_svc_max_age: Duration::from_secs(86400),
            retry_above_handshakes: 64,
        }
    }
}

impl Http3Config {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        duration("http3.idle_timeout", self.idle_timeout, 100 * MS, HOUR)?;
        count("http3.max_streams", self.max_streams, 1, 10_000)?;
        duration(
            "http3.alt_svc_max_age",
            self.alt_svc_max_age,
            Duration::ZERO,
            30 * DAY,
        )?;
        count(
            "http3.retry_above_handshakes",
            self.retry_above_handshakes,
            0,
            1_000_000,
        )
    }
}
