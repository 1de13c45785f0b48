//! `[tls]`: the certificate parley serves HTTPS/WSS with.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, HOUR, SEC, duration};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain. With `key_file`, parley serves HTTPS/WSS (HTTP/2 by ALPN)
    /// instead of plain HTTP.
    pub cert_file: Option<String>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<String>,
    /// A TLS 1.3 connection (HTTPS, WSS, MQTT over TLS) whose record key in one direction
    /// has not been used for this long (or was used only after such a gap: a heartbeat)
    /// gives its expanded form back (~0.6 KB of aws-lc state per direction) when the
    /// connection is next quiet, and expands it again from the kept key bytes at the
    /// next record (about a microsecond); vendor/rustls change 5. Whole seconds, rounded
    /// up; 0 keeps the keys expanded for the connection's life.
    #[serde(with = "humantime_serde")]
    pub idle_keys_after: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            idle_keys_after: Duration::from_secs(5),
        }
    }
}

impl TlsConfig {
    /// The files are read (and a certificate without a key, or a key without one,
    /// refused) when the listener starts (`server`).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !self.idle_keys_after.is_zero() {
            duration("tls.idle_keys_after", self.idle_keys_after, SEC, HOUR)?;
        }
        Ok(())
    }

    /// `idle_keys_after` in whole seconds, rounded up (0: off).
    pub fn idle_keys_after_secs(&self) -> u32 {
        let d = self.idle_keys_after;
        let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        u32::try_from(secs).unwrap_or(u32::MAX)
    }
}
