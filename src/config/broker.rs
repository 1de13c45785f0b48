//! `[broker]`: fan-out between instances, ordering, presence.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, DAY, HOUR, MS, SEC, duration};

/// Which fan-out between instances (see `broker`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BrokerBackend {
    /// One instance: in-process delivery.
    Memory,
    /// Many instances: Redis pub/sub, presence in Redis.
    Redis,
}

/// Which Redis pub/sub commands carry the fan-out.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PubSubMode {
    /// `PUBLISH` / `SUBSCRIBE`: any Redis version.
    Classic,
    /// Sharded pub/sub, `SPUBLISH` / `SSUBSCRIBE` (Redis 7.0 or newer).
    Sharded,
}

/// Fan-out between instances, cross-instance ordering and presence.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    pub backend: BrokerBackend,
    /// `redis://host:port/db` (RESP3 is selected by parley).
    pub redis_url: String,
    /// `host:port` where the other instances reach this one over HTTP (requests for its
    /// sessions are routed here). Empty: the bound listen address (127.0.0.1 when it
    /// listens on all interfaces, which suits one machine only).
    pub advertise: String,
    /// Prefix of every Redis channel and key, so several deployments can share a Redis.
    pub redis_prefix: String,
    /// Classic or sharded (Redis 7) pub/sub for the fan-out channels.
    pub pubsub: PubSubMode,
    /// How long a receiver holds a seq gap in a room before it fills it from the store.
    #[serde(with = "humantime_serde")]
    pub gap_hold: Duration,
    /// How often an instance refreshes its heartbeat in Redis.
    #[serde(with = "humantime_serde")]
    pub presence_heartbeat: Duration,
    /// An instance whose heartbeat is older than this is dead: its users go offline.
    #[serde(with = "humantime_serde")]
    pub presence_ttl: Duration,
    /// How long a user's last-seen time is kept in Redis after they went offline.
    #[serde(with = "humantime_serde")]
    pub last_seen_ttl: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            backend: BrokerBackend::Memory,
            redis_url: "redis://127.0.0.1:6379/".into(),
            advertise: String::new(),
            redis_prefix: "parley".into(),
            pubsub: PubSubMode::Classic,
            gap_hold: Duration::from_millis(200),
            presence_heartbeat: Duration::from_secs(2),
            presence_ttl: Duration::from_secs(10),
            last_seen_ttl: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl BrokerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        duration("broker.gap_hold", self.gap_hold, Duration::ZERO, 10 * SEC)?;
        duration(
            "broker.presence_heartbeat",
            self.presence_heartbeat,
            100 * MS,
            HOUR,
        )?;
        duration(
            "broker.presence_ttl",
            self.presence_ttl,
            2 * self.presence_heartbeat,
            2 * HOUR,
        )?;
        duration("broker.last_seen_ttl", self.last_seen_ttl, SEC, 3650 * DAY)
    }
}
