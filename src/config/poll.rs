//! `[poll]`: HTTP long-poll.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, SEC, duration};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PollConfig {
    /// How long a poll waits for frames when the request does not say (`wait`).
    #[serde(with = "humantime_serde")]
    pub default_hold: Duration,
    /// The longest hold a request may ask for.
    #[serde(with = "humantime_serde")]
    pub max_hold: Duration,
}

impl Default for PollConfig {
    fn default() -> Self {
        Self {
            default_hold: Duration::from_secs(30),
            max_hold: Duration::from_secs(60),
        }
    }
}

impl PollConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        duration(
            "poll.max_hold",
            self.max_hold,
            Duration::ZERO,
            10 * 60 * SEC,
        )?;
        duration(
            "poll.default_hold",
            self.default_hold,
            Duration::ZERO,
            self.max_hold,
        )
    }
}
