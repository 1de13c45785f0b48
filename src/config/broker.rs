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
    /// `redis://host:port/db` (RESP3 is selected by parley). With `cluster`: the seed
    /// nodes of a Redis Cluster, comma-separated (`redis://10.0.0.1:7000,redis://10.0.0.2:7000`).
    pub redis_url: String,
    /// `redis_url` names a Redis Cluster: channels are routed to the node that serves
    /// their slot and the presence keys share one hash tag. Needs `pubsub = "sharded"`.
    pub cluster: bool,
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
            cluster: false,
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
    /// The seed nodes in `redis_url` with `cluster` (a comma inside one, e.g. in a
    /// password, must be percent-encoded there).
    pub fn redis_urls(&self) -> Vec<&str> {
        self.redis_url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.backend == BrokerBackend::Redis {
            let urls = self.redis_urls().len();
            if self.cluster && self.pubsub != PubSubMode::Sharded {
                // Plain PUBLISH in a cluster is broadcast to every node over the
                // cluster bus: it would not scale with the nodes.
                return Err(ConfigError::Invalid {
                    key: "broker.pubsub",
                    value: "\"classic\"".into(),
                    allowed: "\"sharded\" with broker.cluster = true (a classic PUBLISH \
                              in a Redis Cluster is broadcast to every node)"
                        .into(),
                });
            }
            if self.cluster && self.redis_prefix.contains(['{', '}']) {
                return Err(ConfigError::Invalid {
                    key: "broker.redis_prefix",
                    value: self.redis_prefix.clone(),
                    allowed: "no '{' or '}' with broker.cluster = true (a hash tag in the \
                              prefix would put every channel in one slot)"
                        .into(),
                });
            }
            // Without a cluster the URL is taken whole (a password may hold a comma);
            // only what reads as a list of seed nodes is refused.
            let listed =
                self.redis_url.contains(",redis://") || self.redis_url.contains(",rediss://");
            if urls == 0 || (!self.cluster && listed) {
                return Err(ConfigError::Invalid {
                    key: "broker.redis_url",
                    // Not the URLs themselves: they may hold a password.
                    value: format!("{urls} URLs"),
                    allowed: "one URL, or with broker.cluster = true a comma-separated \
                              list of seed nodes"
                        .into(),
                });
            }
        }
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
