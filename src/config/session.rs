//! `[session]`: session grace, queue and replay bounds.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, DAY, GIB, KIB, MS, count, duration};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// How long a session outlives its dropped transport, waiting to be resumed.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    /// Bytes of pushes not yet written to the transport; more disconnects the session as a
    /// slow consumer (close 4008). The client reconnects and log-syncs.
    pub max_queue_bytes: usize,
    /// Bytes of written but unacknowledged pushes kept for replay on resume. The oldest
    /// are dropped past this; a resume from before them falls back to log sync.
    pub replay_buffer_bytes: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(60),
            max_queue_bytes: 1024 * 1024,
            replay_buffer_bytes: 256 * 1024,
        }
    }
}

impl SessionConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        duration("session.grace_period", self.grace_period, 10 * MS, DAY)?;
        count(
            "session.max_queue_bytes",
            self.max_queue_bytes as u64,
            KIB,
            GIB,
        )?;
        count(
            "session.replay_buffer_bytes",
            self.replay_buffer_bytes as u64,
            0,
            GIB,
        )
    }
}
