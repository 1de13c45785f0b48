//! `[web]`: the demo page and development tokens.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The browser SDK and demo page (`src/web.rs`). The SDK (`/sdk/parley.js`) is always
/// served.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// Serve the demo chat page at `/`.
    pub demo: bool,
    /// Development mode: `POST /api/v1/dev/token` mints a token for any user name. Never
    /// in production.
    pub dev_tokens: bool,
    /// Lifetime of a development token.
    #[serde(with = "humantime_serde")]
    pub dev_token_ttl: Duration,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            demo: true,
            dev_tokens: false,
            dev_token_ttl: Duration::from_secs(3600),
        }
    }
}

impl WebConfig {
    /// Nothing to range-check (`dev_token_ttl` is a development convenience).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}
