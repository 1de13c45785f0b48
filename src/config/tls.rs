//! `[tls]`: the certificate parley serves HTTPS/WSS with.

use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain. With `key_file`, parley serves HTTPS/WSS (HTTP/2 by ALPN)
    /// instead of plain HTTP.
    pub cert_file: Option<String>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<String>,
}

impl TlsConfig {
    /// Nothing to range-check: the files are read (and a certificate without a key, or a
    /// key without one, refused) when the listener starts (`server`).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}
