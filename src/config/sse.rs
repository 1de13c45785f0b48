//! `[sse]`: Server-Sent Events streams.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, HOUR, MS, duration};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SseConfig {
    /// Comment lines sent on an idle stream so proxies do not cut it.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// The `retry:` hint: how long the browser waits before reconnecting.
    #[serde(with = "humantime_serde")]
    pub retry: Duration,
    /// A stream write that makes no progress for this long closes the stream (the client
    /// stopped reading); the session waits for a resume as after any drop.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
}

impl Default for SseConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(15),
            retry: Duration::from_secs(2),
            write_timeout: Duration::from_secs(10),
        }
    }
}

impl SseConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        duration(
            "sse.heartbeat_interval",
            self.heartbeat_interval,
            10 * MS,
            HOUR,
        )?;
        duration("sse.retry", self.retry, Duration::ZERO, HOUR)?;
        duration("sse.write_timeout", self.write_timeout, 100 * MS, HOUR)
    }
}
