//! Authentication: JWT verification (and minting, for development and tests).
//!
//! The token's `sub` is the user id; `exp` is required and enforced. HS256 with a shared
//! secret is the default; RS256 and ES256 verify with a public key from a PEM file.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, JwtAlgorithm};

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("cannot mint tokens: {0}")]
    NoSigningKey(String),
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("reading key file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("bad key: {0}")]
    Key(#[from] jsonwebtoken::errors::Error),
    #[error("{0:?} needs auth.public_key_file")]
    MissingPublicKey(JwtAlgorithm),
}

/// Verifies (and can mint) tokens with the configured key.
pub struct Authenticator {
    algorithm: Algorithm,
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    validation: Validation,
}

fn read(path: &str) -> Result<Vec<u8>, AuthSetupError> {
    std::fs::read(path).map_err(|source| AuthSetupError::Io {
        path: path.into(),
        source,
    })
}

/// Longest user id accepted from a token.
pub const MAX_USER_ID_BYTES: usize = 128;

/// User ids are 1..=128 bytes of `A-Z a-z 0-9 _ . @ | + -` (no `:`, which separates the
/// two users in a direct-message room name).
pub fn valid_user_id(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= MAX_USER_ID_BYTES
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@|+-".contains(&b))
}

impl Authenticator {
    pub fn new(config: &AuthConfig) -> Result<Self, AuthSetupError> {
        let (algorithm, decoding, encoding) = match config.algorithm {
            JwtAlgorithm::HS256 => {
                let secret = config.jwt_secret.as_bytes();
                (
                    Algorithm::HS256,
                    DecodingKey::from_secret(secret),
                    Some(EncodingKey::from_secret(secret)),
                )
            }
            alg @ (JwtAlgorithm::RS256 | JwtAlgorithm::ES256) => {
                let public = config
                    .public_key_file
                    .as_deref()
                    .ok_or(AuthSetupError::MissingPublicKey(alg))?;
                let public = read(public)?;
                let private = config.private_key_file.as_deref().map(read).transpose()?;
                if alg == JwtAlgorithm::RS256 {
                    (
                        Algorithm::RS256,
                        DecodingKey::from_rsa_pem(&public)?,
                        private.map(|p| EncodingKey::from_rsa_pem(&p)).transpose()?,
                    )
                } else {
                    (
                        Algorithm::ES256,
                        DecodingKey::from_ec_pem(&public)?,
                        private.map(|p| EncodingKey::from_ec_pem(&p)).transpose()?,
                    )
                }
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = config.leeway.as_secs();
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_exp = true;
        Ok(Self {
            algorithm,
            decoding,
            encoding,
            validation,
        })
    }

    /// Checks the token and returns its user id.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        self.verify_claims(token).map(|c| c.sub)
    }

    /// Checks the token and returns its claims (`sub` is a valid user id).
    pub fn verify_claims(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Invalid("missing token".into()));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })?;
        if !valid_user_id(&data.claims.sub) {
            return Err(AuthError::Invalid(
                "sub must be 1..=128 bytes of A-Z a-z 0-9 _ . @ | + -".into(),
            ));
        }
        Ok(data.claims)
    }

    /// Mints a token for `user`, valid for `ttl` (which may be "negative" for tests via
    /// [`Authenticator::mint_with_exp`]).
    pub fn mint(&self, user: &str, ttl: Duration) -> Result<String, AuthError> {
        let now = unix_now();
        self.mint_with_exp(user, now + ttl.as_secs())
    }

    /// Mints a token with an explicit `exp` (Unix seconds).
    pub fn mint_with_exp(&self, user: &str, exp: u64) -> Result<String, AuthError> {
        let key = self.encoding.as_ref().ok_or_else(|| {
            AuthError::NoSigningKey("set auth.private_key_file for RS256/ES256".into())
        })?;
        let claims = Claims {
            sub: user.into(),
            exp,
            iat: Some(unix_now()),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

/// Current time in Unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Current time in Unix milliseconds (timestamps on the wire).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
