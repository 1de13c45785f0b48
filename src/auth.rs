//! Authentication: JWT verification (and minting, for development and tests).
//!
//! The token's `sub` is the user id; `exp` is required and enforced. HS256 with a shared
//! secret is the default; RS256 and ES256 verify with a public key from a PEM file.
//!
//! Key rotation: besides the main key (`auth.jwt_secret` / `auth.public_key_file`, with
//! id `auth.key_id`), `auth.extra_keys` lists further verification keys. The token
//! header's `kid` picks exactly one key, whose algorithm the token's `alg` must match; a
//! token without a `kid`, or with one no key has, goes to the key whose id is empty (so an
//! issuer's own `kid`s do not matter while parley uses no key ids), and is refused when
//! there is none. `auth.audience` and `auth.issuer`, when set, make `aud` and `iss`
//! required and checked.

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// A string or a list of strings (checked by the verifier, not read by parley).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
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

/// One key that verifies tokens whose header names its `kid`.
struct VerifyKey {
    kid: String,
    decoding: DecodingKey,
    validation: Validation,
}

/// Verifies (and can mint) tokens with the configured keys.
pub struct Authenticator {
    algorithm: Algorithm,
    /// The main key's id, written into minted tokens (empty: no `kid`).
    key_id: String,
    encoding: Option<EncodingKey>,
    /// The main key first, then `auth.extra_keys`; ids are unique (`Config::validate`).
    keys: Vec<VerifyKey>,
    issuer: Option<String>,
    audience: Option<String>,
}

fn read(path: &str) -> Result<Vec<u8>, AuthSetupError> {
    std::fs::read(path).map_err(|source| AuthSetupError::Io {
        path: path.into(),
        source,
    })
}

/// The verification (and, given a private key or a secret, signing) key for one
/// configured key.
fn load_key(
    alg: JwtAlgorithm,
    secret: &str,
    public_key_file: Option<&str>,
    private_key_file: Option<&str>,
) -> Result<(Algorithm, DecodingKey, Option<EncodingKey>), AuthSetupError> {
    Ok(match alg {
        JwtAlgorithm::HS256 => (
            Algorithm::HS256,
            DecodingKey::from_secret(secret.as_bytes()),
            Some(EncodingKey::from_secret(secret.as_bytes())),
        ),
        JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
            let public = public_key_file.ok_or(AuthSetupError::MissingPublicKey(alg))?;
            let public = read(public)?;
            let private = private_key_file.map(read).transpose()?;
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
        let (algorithm, decoding, encoding) = load_key(
            config.algorithm,
            &config.jwt_secret,
            config.public_key_file.as_deref(),
            config.private_key_file.as_deref(),
        )?;
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let issuer = non_empty(&config.issuer);
        let audience = non_empty(&config.audience);
        let validation = |algorithm| {
            let mut v = Validation::new(algorithm);
            v.leeway = config.leeway.as_secs();
            let mut required = vec!["exp", "sub"];
            v.validate_exp = true;
            // Unset: `aud` is not checked at all (a token may carry one or not).
            v.validate_aud = audience.is_some();
            if let Some(aud) = &audience {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            if let Some(iss) = &issuer {
                v.set_issuer(&[iss]);
                required.push("iss");
            }
            v.set_required_spec_claims(&required);
            v
        };
        let mut keys = vec![VerifyKey {
            kid: config.key_id.clone(),
            decoding,
            validation: validation(algorithm),
        }];
        for k in &config.extra_keys {
            let (alg, decoding, _) =
                load_key(k.algorithm, &k.secret, k.public_key_file.as_deref(), None)?;
            keys.push(VerifyKey {
                kid: k.kid.clone(),
                decoding,
                validation: validation(alg),
            });
        }
        Ok(Self {
            algorithm,
            key_id: config.key_id.clone(),
            encoding,
            keys,
            issuer,
            audience,
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
        let key = match self.keys.first() {
            // No key has an id: every token goes to the first (the default) key whatever
            // its kid, so the header is not decoded twice (`decode` reads it again).
            Some(first) if self.keys.iter().all(|k| k.kid.is_empty()) => first,
            _ => {
                let header = jsonwebtoken::decode_header(token)
                    .map_err(|e| AuthError::Invalid(e.to_string()))?;
                // The key with the token's kid; else the default key (the empty id), if
                // any.
                let kid = header.kid.as_deref().unwrap_or("");
                self.keys
                    .iter()
                    .find(|k| k.kid == kid)
                    .or_else(|| self.keys.iter().find(|k| k.kid.is_empty()))
                    .ok_or_else(|| AuthError::Invalid("unknown key id (kid)".into()))?
            }
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.decoding, &key.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    _ => AuthError::Invalid(e.to_string()),
                }
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

    /// Mints a token with an explicit `exp` (Unix seconds), signed with the main key and
    /// carrying its `kid` and the configured `iss` and `aud`, if any.
    pub fn mint_with_exp(&self, user: &str, exp: u64) -> Result<String, AuthError> {
        let key = self.encoding.as_ref().ok_or_else(|| {
            AuthError::NoSigningKey("set auth.private_key_file for RS256/ES256".into())
        })?;
        let claims = Claims {
            sub: user.into(),
            exp,
            iat: Some(unix_now()),
            iss: self.issuer.clone(),
            aud: self.audience.clone().map(serde_json::Value::String),
        };
        let mut header = Header::new(self.algorithm);
        if !self.key_id.is_empty() {
            header.kid = Some(self.key_id.clone());
        }
        jsonwebtoken::encode(&header, &claims, key).map_err(|e| AuthError::Invalid(e.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::JwtKey;

    /// An HS256 token signed with `secret`, with header `kid` and extra claims.
    fn token(secret: &str, kid: Option<&str>, extra: serde_json::Value) -> String {
        let mut claims = serde_json::json!({"sub": "ann", "exp": unix_now() + 60});
        if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn hs(kid: &str, secret: &str) -> JwtKey {
        JwtKey {
            kid: kid.into(),
            secret: secret.into(),
            ..JwtKey::default()
        }
    }

    fn rotating() -> Authenticator {
        Authenticator::new(&AuthConfig {
            jwt_secret: "new-secret".into(),
            key_id: "k2".into(),
            extra_keys: vec![hs("k1", "old-secret"), hs("", "legacy-secret")],
            ..AuthConfig::default()
        })
        .unwrap()
    }

    fn invalid(r: Result<String, AuthError>) -> String {
        match r {
            Err(AuthError::Invalid(m)) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn kid_picks_the_key() {
        let a = rotating();
        let none = serde_json::json!({});
        assert_eq!(
            a.verify(&token("new-secret", Some("k2"), none.clone()))
                .unwrap(),
            "ann"
        );
        assert_eq!(
            a.verify(&token("old-secret", Some("k1"), none.clone()))
                .unwrap(),
            "ann"
        );
        // No kid, or an unknown one: the key with the empty id.
        assert_eq!(
            a.verify(&token("legacy-secret", Some("k9"), none.clone()))
                .unwrap(),
            "ann"
        );
        assert_eq!(
            a.verify(&token("legacy-secret", None, none.clone()))
                .unwrap(),
            "ann"
        );
        // A real key under another key's id, an unknown id: refused.
        invalid(a.verify(&token("old-secret", Some("k2"), none.clone())));
        invalid(a.verify(&token("new-secret", None, none.clone())));
        invalid(a.verify(&token("new-secret", Some("k3"), none)));
        // Minted tokens carry the main key's id and verify.
        let minted = a.mint("bob", Duration::from_secs(60)).unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&minted).unwrap().kid.as_deref(),
            Some("k2")
        );
        assert_eq!(a.verify(&minted).unwrap(), "bob");
    }

    #[test]
    fn without_key_ids_any_kid_goes_to_the_main_key() {
        let a = Authenticator::new(&AuthConfig {
            jwt_secret: "s".into(),
            ..AuthConfig::default()
        })
        .unwrap();
        let none = serde_json::json!({});
        assert_eq!(a.verify(&token("s", None, none.clone())).unwrap(), "ann");
        assert_eq!(
            a.verify(&token("s", Some("x"), none.clone())).unwrap(),
            "ann"
        );
        invalid(a.verify(&token("t", Some("x"), none)));
        // With no key ids the header is read once, by the verification itself: a bad
        // header or another algorithm is still refused.
        invalid(a.verify("not.a.token"));
        invalid(a.verify("e30.e30.e30"));
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &serde_json::json!({"sub": "ann", "exp": unix_now() + 60}),
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        invalid(a.verify(&hs512));
    }

    #[test]
    fn with_key_ids_and_no_default_key_an_unknown_kid_is_refused() {
        let a = Authenticator::new(&AuthConfig {
            jwt_secret: "s".into(),
            key_id: "k1".into(),
            ..AuthConfig::default()
        })
        .unwrap();
        let none = serde_json::json!({});
        assert_eq!(
            a.verify(&token("s", Some("k1"), none.clone())).unwrap(),
            "ann"
        );
        let m = invalid(a.verify(&token("s", Some("k9"), none.clone())));
        assert!(m.contains("kid"), "{m}");
        invalid(a.verify(&token("s", None, none)));
    }

    #[test]
    fn audience_and_issuer_are_checked_only_when_set() {
        let unset = Authenticator::new(&AuthConfig::default()).unwrap();
        let secret = AuthConfig::default().jwt_secret;
        let with = serde_json::json!({"aud": "other", "iss": "someone"});
        assert_eq!(unset.verify(&token(&secret, None, with)).unwrap(), "ann");

        let a = Authenticator::new(&AuthConfig {
            audience: "parley".into(),
            issuer: "https://id.example.com".into(),
            ..AuthConfig::default()
        })
        .unwrap();
        let ok = serde_json::json!({"aud": "parley", "iss": "https://id.example.com"});
        assert_eq!(a.verify(&token(&secret, None, ok)).unwrap(), "ann");
        let list = serde_json::json!({"aud": ["x", "parley"], "iss": "https://id.example.com"});
        assert_eq!(a.verify(&token(&secret, None, list)).unwrap(), "ann");
        for bad in [
            serde_json::json!({"aud": "other", "iss": "https://id.example.com"}),
            serde_json::json!({"aud": "parley", "iss": "https://evil.example.com"}),
            serde_json::json!({"iss": "https://id.example.com"}),
            serde_json::json!({"aud": "parley"}),
        ] {
            invalid(a.verify(&token(&secret, None, bad)));
        }
        // parley's own tokens carry both.
        let minted = a.mint("bob", Duration::from_secs(60)).unwrap();
        assert_eq!(a.verify(&minted).unwrap(), "bob");
    }

    /// Rotating from HS256 to ES256: the ES256 key verifies its own tokens, and its
    /// public key used as an HMAC secret (algorithm confusion) is refused.
    #[test]
    fn an_extra_public_key_verifies_only_its_own_algorithm() {
        let pair = rcgen::KeyPair::generate().unwrap();
        let dir = std::env::temp_dir().join(format!("parley-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let public = dir.join("es.pub.pem");
        std::fs::write(&public, pair.public_key_pem()).unwrap();
        let a = Authenticator::new(&AuthConfig {
            jwt_secret: "hs-secret".into(),
            key_id: "hs".into(),
            extra_keys: vec![JwtKey {
                kid: "es".into(),
                algorithm: JwtAlgorithm::ES256,
                public_key_file: Some(public.to_string_lossy().into_owned()),
                ..JwtKey::default()
            }],
            ..AuthConfig::default()
        })
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let claims = serde_json::json!({"sub": "ann", "exp": unix_now() + 60});
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("es".into());
        let private = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        let es = jsonwebtoken::encode(&header, &claims, &private).unwrap();
        assert_eq!(a.verify(&es).unwrap(), "ann");
        // The same token under the HS256 key's id: refused.
        header.kid = Some("hs".into());
        invalid(a.verify(&jsonwebtoken::encode(&header, &claims, &private).unwrap()));
        // HS256 keyed with the ES256 public key, claiming the ES256 key: refused.
        let confused = token(&pair.public_key_pem(), Some("es"), serde_json::json!({}));
        invalid(a.verify(&confused));
    }

    #[test]
    fn expired_is_still_expired_with_a_kid() {
        let a = rotating();
        let old = serde_json::json!({"exp": 1000});
        assert_eq!(
            a.verify(&token("old-secret", Some("k1"), old)),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn key_ids_must_be_unique_and_keys_complete() {
        use crate::config::Config;
        let mut c = Config::default();
        c.auth.key_id = "k1".into();
        c.auth.extra_keys = vec![hs("k1", "x")];
        assert!(c.validate().is_err());
        c.auth.extra_keys = vec![hs("", "x"), hs("", "y")];
        assert!(c.validate().is_err());
        c.auth.extra_keys = vec![hs("k0", "")];
        assert!(c.validate().is_err());
        c.auth.extra_keys = vec![JwtKey {
            kid: "k0".into(),
            algorithm: JwtAlgorithm::RS256,
            ..JwtKey::default()
        }];
        assert!(c.validate().is_err());
        c.auth.extra_keys = vec![hs("k0", "x"), hs("", "y")];
        assert!(c.validate().is_ok());
    }
}
