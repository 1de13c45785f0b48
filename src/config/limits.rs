//! `[limits]`: limits and rate limits against abuse.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Limits and rate limits against abuse. Every limit is per instance; 0 turns one off.
/// Rates are per second with a burst allowance (token buckets).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open TCP connections in total (WebSocket, SSE, long-poll, HTTP).
    pub max_connections: u64,
    /// Open TCP connections from one IP address.
    pub max_connections_per_ip: u64,
    /// New TCP connections per second from one IP address.
    pub connects_per_ip_per_second: f64,
    pub connects_per_ip_burst: f64,
    /// SSE tickets minted per second for one IP address.
    pub tickets_per_ip_per_second: f64,
    pub tickets_per_ip_burst: f64,
    /// Live sessions of one user (devices, tabs).
    pub max_sessions_per_user: u64,
    /// Rooms one user may be a member of (joins, room creation, invitations, new DMs).
    pub max_rooms_per_user: u64,
    /// Messages one user may send per second (WebSocket, HTTP commands and the API).
    pub sends_per_second: f64,
    pub sends_burst: f64,
    /// Joins (and room creations) one user may make per second.
    pub joins_per_second: f64,
    pub joins_burst: f64,
    /// `signal` commands one user may send per second.
    pub signals_per_second: f64,
    pub signals_burst: f64,
    /// Signal bytes (kind + payload) one user may be sent per second, by all senders
    /// together (a byte budget per recipient).
    pub signal_bytes_per_second: f64,
    pub signal_bytes_burst: f64,
    /// `history`, `sync` and room-browser requests one user may make per second.
    pub reads_per_second: f64,
    pub reads_burst: f64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_connections_per_ip: 10_000,
            connects_per_ip_per_second: 100.0,
            connects_per_ip_burst: 200.0,
            tickets_per_ip_per_second: 10.0,
            tickets_per_ip_burst: 20.0,
            max_sessions_per_user: 32,
            max_rooms_per_user: 1000,
            sends_per_second: 20.0,
            sends_burst: 100.0,
            joins_per_second: 5.0,
            joins_burst: 50.0,
            signals_per_second: 10.0,
            signals_burst: 50.0,
            signal_bytes_per_second: 65536.0,
            signal_bytes_burst: 262144.0,
            reads_per_second: 20.0,
            reads_burst: 200.0,
        }
    }
}

impl LimitsConfig {
    /// A rate needs a burst of at least one token (0 and 0: off). The signal byte
    /// budget's floor depends on `[chat]` and is checked by [`super::Config::validate`].
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (key, rate, burst) in [
            (
                "limits.connects_per_ip",
                self.connects_per_ip_per_second,
                self.connects_per_ip_burst,
            ),
            (
                "limits.tickets_per_ip",
                self.tickets_per_ip_per_second,
                self.tickets_per_ip_burst,
            ),
            ("limits.sends", self.sends_per_second, self.sends_burst),
            ("limits.joins", self.joins_per_second, self.joins_burst),
        ] {
            let valid = rate.is_finite() && burst.is_finite() && rate >= 0.0 && burst >= 0.0;
            if !valid || (rate > 0.0 && burst < 1.0) {
                return Err(ConfigError::Invalid {
                    key,
                    value: format!("{rate}/s, burst {burst}"),
                    allowed: "a rate >= 0 per second and, when it is > 0, a burst >= 1".into(),
                });
            }
        }
        Ok(())
    }

    /// No limits at all (tests that are not about them, load generators).
    pub fn off() -> Self {
        Self {
            max_connections: 0,
            max_connections_per_ip: 0,
            connects_per_ip_per_second: 0.0,
            connects_per_ip_burst: 0.0,
            tickets_per_ip_per_second: 0.0,
            tickets_per_ip_burst: 0.0,
            max_sessions_per_user: 0,
            max_rooms_per_user: 0,
            sends_per_second: 0.0,
            sends_burst: 0.0,
            joins_per_second: 0.0,
            joins_burst: 0.0,
            signals_per_second: 0.0,
            signals_burst: 0.0,
            signal_bytes_per_second: 0.0,
            signal_bytes_burst: 0.0,
            reads_per_second: 0.0,
            reads_burst: 0.0,
        }
    }
}
