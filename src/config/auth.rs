//! `[auth]`: token verification, tickets, the admin token.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, HOUR, MS, duration};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
    ES256,
}

/// The development secret `cargo run` starts with; parley warns loudly while it is in use.
pub const DEV_JWT_SECRET: &str = "parley-dev-secret-change-me";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// JWT signature algorithm.
    pub algorithm: JwtAlgorithm,
    /// HS256 shared secret.
    pub jwt_secret: String,
    /// RS256/ES256: PEM file with the public key that verifies tokens.
    pub public_key_file: Option<String>,
    /// RS256/ES256: PEM file with the private key, only needed by `parley token`.
    pub private_key_file: Option<String>,
    /// Clock skew tolerated when checking `exp`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// A new connection must send `connect` within this time or is closed.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Lifetime of an SSE ticket (`POST /api/v1/tickets`) before its first use.
    #[serde(with = "humantime_serde")]
    pub ticket_ttl: Duration,
    /// Signs SSE tickets, so every instance can tell a ticket the cluster issued (whose
    /// session is gone: 410) from one never issued (401). Empty: derived from
    /// `jwt_secret` with HS256, random per process otherwise. The same on every instance.
    pub ticket_secret: String,
    /// Bearer token for the admin HTTP API (announcements, server-side publish). Empty
    /// disables those endpoints.
    pub admin_token: String,
    /// Key id (`kid`) of the key above: tokens whose header names this `kid` verify with
    /// it, and `parley token` writes it. Empty: the default key, which verifies tokens
    /// without a `kid` or with one no key has.
    pub key_id: String,
    /// Further keys that verify tokens, each picked by the token header's `kid`: keeps
    /// tokens signed with an old (or a not yet used) key valid during a key rotation.
    pub extra_keys: Vec<JwtKey>,
    /// Required `aud` claim (the token's `aud`, a string or a list, must contain it).
    /// Empty: `aud` is not checked.
    pub audience: String,
    /// Required `iss` claim. Empty: `iss` is not checked.
    pub issuer: String,
}

/// A verification key besides the main one (`auth.extra_keys`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JwtKey {
    /// The `kid` that tokens signed with this key carry in their header; empty makes it
    /// the default key (tokens without a `kid`, or with an unknown one). Unique across
    /// `auth.key_id` and all extra keys.
    pub kid: String,
    /// The key's algorithm; a token's `alg` must match it.
    pub algorithm: JwtAlgorithm,
    /// HS256 shared secret.
    pub secret: String,
    /// RS256/ES256: PEM file with the public key.
    pub public_key_file: Option<String>,
}

impl Default for JwtKey {
    fn default() -> Self {
        Self {
            kid: String::new(),
            algorithm: JwtAlgorithm::HS256,
            secret: String::new(),
            public_key_file: None,
        }
    }
}

impl AuthConfig {
    /// Whether a token signed with the public development secret would verify: the main
    /// key or any extra key is HS256 with [`DEV_JWT_SECRET`].
    pub fn accepts_dev_secret(&self) -> bool {
        (self.algorithm == JwtAlgorithm::HS256 && self.jwt_secret == DEV_JWT_SECRET)
            || self
                .extra_keys
                .iter()
                .any(|k| k.algorithm == JwtAlgorithm::HS256 && k.secret == DEV_JWT_SECRET)
    }

    /// The durations lie in their ranges, key ids are unique (a token's `kid` picks at
    /// most one key) and every extra key has the material its algorithm needs.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        duration("auth.leeway", self.leeway, Duration::ZERO, HOUR)?;
        duration("auth.connect_timeout", self.connect_timeout, 10 * MS, HOUR)?;
        duration("auth.ticket_ttl", self.ticket_ttl, 10 * MS, HOUR)?;
        let mut seen = vec![self.key_id.as_str()];
        for k in &self.extra_keys {
            if seen.contains(&k.kid.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "auth.extra_keys",
                    value: format!("kid {:?}", k.kid),
                    allowed: "key ids unique across auth.key_id and auth.extra_keys".into(),
                });
            }
            seen.push(&k.kid);
            let ok = match k.algorithm {
                JwtAlgorithm::HS256 => !k.secret.is_empty() && k.public_key_file.is_none(),
                JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                    k.public_key_file.is_some() && k.secret.is_empty()
                }
            };
            if !ok {
                return Err(ConfigError::Invalid {
                    key: "auth.extra_keys",
                    value: format!("kid {:?} ({:?})", k.kid, k.algorithm),
                    allowed: "HS256 with a secret, or RS256/ES256 with a public_key_file".into(),
                });
            }
        }
        Ok(())
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            algorithm: JwtAlgorithm::HS256,
            jwt_secret: DEV_JWT_SECRET.into(),
            public_key_file: None,
            private_key_file: None,
            leeway: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            ticket_ttl: Duration::from_secs(30),
            ticket_secret: String::new(),
            admin_token: String::new(),
            key_id: String::new(),
            extra_keys: Vec::new(),
            audience: String::new(),
            issuer: String::new(),
        }
    }
}
