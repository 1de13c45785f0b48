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
//!
//! A token is read once: its header (for the `kid` and `alg`), its signature (HS256 with
//! the key's HMAC state prepared at startup), then its claims in one pass into a
//! borrowing struct that the checks below read. The rules are `jsonwebtoken::decode`'s
//! with this module's `Validation` (what it accepts and refuses, and the error for each,
//! `jsonwebtoken`'s own messages); `decode` read the header twice, keyed the HMAC again
//! for every token and parsed the claims twice (once for the caller, once for its
//! checks). The tests below hold the two to the same answers.

use std::{
    borrow::Cow,
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header, Validation,
    errors::{Error as JwtError, ErrorKind},
};
use serde::{
    Deserialize, Deserializer, Serialize,
    de::{IgnoredAny, SeqAccess, Visitor},
};
use sha2::Sha256;

use crate::config::{AuthConfig, JwtAlgorithm};

/// The claims parley mints (and `jsonwebtoken` checked them against when it parsed them).
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

/// What a verified token says: its user and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The user id (`sub`), a valid one ([`valid_user_id`]).
    pub sub: String,
    /// `exp`, Unix seconds.
    pub exp: u64,
}

/// One key that verifies tokens whose header names its `kid`.
struct VerifyKey {
    kid: String,
    decoding: DecodingKey,
    validation: Validation,
    /// HS256: the HMAC already keyed with the secret (its two key blocks hashed once);
    /// each token's check clones it.
    hmac: Option<Hmac<Sha256>>,
}

impl VerifyKey {
    fn new(
        kid: String,
        alg: Algorithm,
        secret: &str,
        decoding: DecodingKey,
        v: Validation,
    ) -> Self {
        let hmac = (alg == Algorithm::HS256).then(|| {
            <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
                .expect("HMAC takes a key of any length")
        });
        Self {
            kid,
            decoding,
            validation: v,
            hmac,
        }
    }
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
        let mut keys = vec![VerifyKey::new(
            config.key_id.clone(),
            algorithm,
            &config.jwt_secret,
            decoding,
            validation(algorithm),
        )];
        for k in &config.extra_keys {
            let (alg, decoding, _) =
                load_key(k.algorithm, &k.secret, k.public_key_file.as_deref(), None)?;
            keys.push(VerifyKey::new(
                k.kid.clone(),
                alg,
                &k.secret,
                decoding,
                validation(alg),
            ));
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

    /// Checks the token and returns its user (a valid user id) and expiry.
    pub fn verify_claims(&self, token: &str) -> Result<Verified, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Invalid("missing token".into()));
        }
        let invalid = |e: JwtError| AuthError::Invalid(e.to_string());
        // The header once: the key's choice and the algorithm check both read it. The
        // two usual spellings of a bare HS256 header are known without parsing them.
        let parts = Parts::split(token);
        let (alg, kid) = match parts {
            Some(p) if BARE_HS256_HEADERS.contains(&p.header) => (Algorithm::HS256, None),
            _ => {
                let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
                (header.alg, header.kid)
            }
        };
        // `decode_header` found the three parts `split` looks for.
        let parts = parts.ok_or_else(|| invalid(ErrorKind::InvalidToken.into()))?;
        let key = match self.keys.first() {
            // No key has an id: every token goes to the first (the default) key whatever
            // its kid.
            Some(first) if self.keys.iter().all(|k| k.kid.is_empty()) => first,
            _ => {
                // The key with the token's kid; else the default key (the empty id), if
                // any.
                let kid = kid.as_deref().unwrap_or("");
                self.keys
                    .iter()
                    .find(|k| k.kid == kid)
                    .or_else(|| self.keys.iter().find(|k| k.kid.is_empty()))
                    .ok_or_else(|| AuthError::Invalid("unknown key id (kid)".into()))?
            }
        };
        let claims = key.verify(parts, alg).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => invalid(e),
        })?;
        if !valid_user_id(&claims.sub) {
            return Err(AuthError::Invalid(
                "sub must be 1..=128 bytes of A-Z a-z 0-9 _ . @ | + -".into(),
            ));
        }
        Ok(claims)
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

impl VerifyKey {
    /// `jsonwebtoken::decode`'s checks, in its order, on a token whose `header` has been
    /// read: the algorithm, the signature, the claims' form, the required claims, `exp`
    /// (with the leeway), `iss`, `aud`. Errors are `jsonwebtoken`'s.
    fn verify(&self, parts: Parts<'_>, alg: Algorithm) -> Result<Verified, JwtError> {
        let v = &self.validation;
        if !v.algorithms.contains(&alg) {
            return Err(ErrorKind::InvalidAlgorithm.into());
        }
        let Parts {
            message,
            payload,
            signature,
            ..
        } = parts;
        let good = match &self.hmac {
            // The key's algorithm is the header's (checked above): HS256.
            Some(hmac) => {
                let signature = URL_SAFE_NO_PAD.decode(signature)?;
                let mut mac = hmac.clone();
                mac.update(message.as_bytes());
                mac.verify_slice(&signature).is_ok()
            }
            None => {
                jsonwebtoken::crypto::verify(signature, message.as_bytes(), &self.decoding, alg)?
            }
        };
        if !good {
            return Err(ErrorKind::InvalidSignature.into());
        }
        let payload = URL_SAFE_NO_PAD.decode(payload)?;
        let claims = Payload::parse(&payload)?;
        for required in &v.required_spec_claims {
            // `sub` and `exp` cannot be missing here: the parse requires them.
            let present = match required.as_str() {
                "iss" => claims.iss.is_some(),
                "aud" => matches!(claims.aud, Some(Aud::One(_) | Aud::Many(_))),
                _ => true,
            };
            if !present {
                return Err(ErrorKind::MissingRequiredClaim(required.clone()).into());
            }
        }
        let now = jsonwebtoken::get_current_timestamp();
        if v.validate_exp && claims.exp < now.saturating_sub(v.leeway) {
            return Err(ErrorKind::ExpiredSignature.into());
        }
        if let (Some(iss), Some(allowed)) = (&claims.iss, &v.iss) {
            if !allowed.contains(iss.as_ref()) {
                return Err(ErrorKind::InvalidIssuer.into());
            }
        }
        if let (true, Some(allowed)) = (v.validate_aud, &v.aud) {
            let ok = match &claims.aud {
                Some(Aud::One(aud)) => allowed.contains(aud.as_ref()),
                Some(Aud::Many(auds)) => auds.iter().any(|a| allowed.contains(a.as_ref())),
                // Not a string or a list of strings: `decode` counted it as missing.
                Some(Aud::Other) | None => true,
            };
            if !ok {
                return Err(ErrorKind::InvalidAudience.into());
            }
        }
        Ok(Verified {
            sub: claims.sub,
            exp: claims.exp,
        })
    }
}

/// A token's parts as `jsonwebtoken::decode` splits them (at the last two dots).
#[derive(Clone, Copy)]
struct Parts<'a> {
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
    /// `header.payload`, what the signature signs.
    message: &'a str,
}

impl<'a> Parts<'a> {
    fn split(token: &'a str) -> Option<Self> {
        let (message, signature) = token.rsplit_once('.')?;
        let (header, payload) = message.rsplit_once('.')?;
        Some(Self {
            header,
            payload,
            signature,
            message,
        })
    }
}

/// `{"typ":"JWT","alg":"HS256"}` (`jsonwebtoken`'s) and `{"alg":"HS256","typ":"JWT"}`
/// (most other issuers'), in base64url: a header that says HS256 and nothing else.
const BARE_HS256_HEADERS: [&str; 2] = [
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9",
];

/// A token's claims as one parse reads them: what `jsonwebtoken::decode` accepted when it
/// parsed them into [`Claims`] (`sub` a string, `exp` and `iat` non-negative integers,
/// `iss` a string, `aud` anything) and then for its own checks (`nbf` anything), no
/// claim of these given twice, other claims ignored.
#[derive(Deserialize)]
struct Payload<'a> {
    sub: String,
    exp: u64,
    #[serde(default)]
    #[allow(dead_code)]
    iat: Option<u64>,
    #[serde(default, borrow)]
    iss: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    aud: Option<Aud<'a>>,
    /// Not checked (`validate_nbf` is off), only read as `decode` read it.
    #[serde(default)]
    #[allow(dead_code)]
    nbf: Option<Nbf>,
}

/// `nbf` as `jsonwebtoken::decode` read it when it does not check it: any value but a
/// non-empty list or object (its reader refused those without reading past them, so the
/// claims failed to parse), and not given twice.
struct Nbf;

impl<'de> Deserialize<'de> for Nbf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NbfVisitor)
    }
}

struct NbfVisitor;

impl<'de> Visitor<'de> for NbfVisitor {
    type Value = Nbf;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number, or any value but a non-empty list or object")
    }

    fn visit_str<E>(self, _: &str) -> Result<Nbf, E> {
        Ok(Nbf)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Nbf, E> {
        Ok(Nbf)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Nbf, E> {
        Ok(Nbf)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Nbf, E> {
        Ok(Nbf)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Nbf, E> {
        Ok(Nbf)
    }

    fn visit_unit<E>(self) -> Result<Nbf, E> {
        Ok(Nbf)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Nbf, A::Error> {
        match seq.next_element::<IgnoredAny>()? {
            None => Ok(Nbf),
            Some(_) => Err(serde::de::Error::invalid_type(
                serde::de::Unexpected::Seq,
                &self,
            )),
        }
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Nbf, A::Error> {
        match map.next_key::<IgnoredAny>()? {
            None => Ok(Nbf),
            Some(_) => Err(serde::de::Error::invalid_type(
                serde::de::Unexpected::Map,
                &self,
            )),
        }
    }
}

impl<'a> Payload<'a> {
    /// The claims, which must be a JSON object (a derived struct would also take an
    /// array, which `decode` refused).
    fn parse(json: &'a [u8]) -> Result<Self, JwtError> {
        let first = json
            .iter()
            .find(|b| !matches!(b, b' ' | b'\n' | b'\t' | b'\r'));
        if first != Some(&b'{') {
            return Err(<serde_json::Error as serde::de::Error>::custom(
                "the claims are not a JSON object",
            )
            .into());
        }
        Ok(serde_json::from_slice(json)?)
    }
}

/// `aud` as the audience check reads it: one string, a list of strings, or anything else
/// (which counts as no audience; taken when none is configured).
enum Aud<'a> {
    One(Cow<'a, str>),
    Many(Vec<Cow<'a, str>>),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Aud<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AudVisitor { list: true })
    }
}

/// Reads one `aud` (`list`) or one element of its list: a string, else `Other` (any other
/// value, read whole and dropped).
struct AudVisitor {
    list: bool,
}

impl<'de> Visitor<'de> for AudVisitor {
    type Value = Aud<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Aud::One(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Aud::One(Cow::Owned(v.to_string())))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Aud::One(Cow::Owned(v)))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Aud::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Aud::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Aud::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Aud::Other)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Aud::Other)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Aud::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        if !self.list {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(Aud::Other);
        }
        let mut all = Vec::new();
        let mut strings = true;
        while let Some(item) = seq.next_element_seed(AudItem)? {
            match item {
                Aud::One(s) if strings => all.push(s),
                _ => strings = false,
            }
        }
        Ok(if strings { Aud::Many(all) } else { Aud::Other })
    }
}

/// One element of an `aud` list.
struct AudItem;

impl<'de> serde::de::DeserializeSeed<'de> for AudItem {
    type Value = Aud<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(AudVisitor { list: false })
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

    /// What `verify_claims` answered before it read tokens itself: `jsonwebtoken::decode`
    /// with the key's `Validation`, then the user id's check.
    fn reference(a: &Authenticator, token: &str) -> Result<String, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Invalid("missing token".into()));
        }
        let key = if a.keys.iter().all(|k| k.kid.is_empty()) {
            &a.keys[0]
        } else {
            let header = jsonwebtoken::decode_header(token)
                .map_err(|e| AuthError::Invalid(e.to_string()))?;
            let kid = header.kid.as_deref().unwrap_or("");
            a.keys
                .iter()
                .find(|k| k.kid == kid)
                .or_else(|| a.keys.iter().find(|k| k.kid.is_empty()))
                .ok_or_else(|| AuthError::Invalid("unknown key id (kid)".into()))?
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.decoding, &key.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    _ => AuthError::Invalid(e.to_string()),
                }
            })?;
        if !valid_user_id(&data.claims.sub) {
            return Err(AuthError::Invalid("bad sub".into()));
        }
        Ok(data.claims.sub)
    }

    /// A token with these exact claim bytes, signed with `secret` (HS256) under `kid`.
    fn raw_token(secret: &str, kid: Option<&str>, claims: &str) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_string);
        raw_token_with(secret, &serde_json::to_string(&header).unwrap(), claims)
    }

    /// A token with these exact header and claim bytes, signed with `secret` (HS256).
    fn raw_token_with(secret: &str, header: &str, claims: &str) -> String {
        let header = URL_SAFE_NO_PAD.encode(header);
        let message = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims));
        let signature = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
        )
        .unwrap();
        format!("{message}.{signature}")
    }

    /// The same answer as the reference: the user, or the same kind of refusal (expired
    /// or invalid) and, where the reference's message is `jsonwebtoken`'s own check (not
    /// its JSON parser's wording), the same message.
    fn same(a: &Authenticator, token: &str, what: &str) {
        let new = a.verify(token);
        let old = reference(a, token);
        match (&new, &old) {
            (Ok(n), Ok(o)) => assert_eq!(n, o, "{what}"),
            (Err(AuthError::Expired), Err(AuthError::Expired)) => {}
            (Err(AuthError::Invalid(n)), Err(AuthError::Invalid(o))) => {
                if !o.starts_with("JSON error") && o != "bad sub" {
                    assert_eq!(n, o, "{what}");
                }
            }
            _ => panic!("{what}: new {new:?}, jsonwebtoken {old:?}"),
        }
    }

    /// Claims of every shape a client could send, under each configuration: the token
    /// read once here and `jsonwebtoken::decode` accept and refuse the same tokens.
    /// Authenticators for the comparison tests: secret "s", and the same with an audience
    /// and an issuer required (the default leeway, 5 s).
    fn plain_and_strict() -> (Authenticator, Authenticator) {
        let plain = Authenticator::new(&AuthConfig {
            jwt_secret: "s".into(),
            ..AuthConfig::default()
        })
        .unwrap();
        let strict = Authenticator::new(&AuthConfig {
            jwt_secret: "s".into(),
            audience: "parley".into(),
            issuer: "https://id.example.com".into(),
            ..AuthConfig::default()
        })
        .unwrap();
        (plain, strict)
    }

    #[test]
    fn verify_answers_as_jsonwebtoken_decode() {
        let now = unix_now();
        let (late, stale) = (now + 600, now - 3);
        let expired = now - 600;
        let claims: Vec<String> = [
            format!(r#"{{"sub":"ann","exp":{late}}}"#),
            format!(r#" {{"sub":"ann","exp":{stale}}}"#),
            format!(r#"{{"sub":"ann","exp":{expired}}}"#),
            format!(r#"{{"sub":"ann","exp":{late}.0}}"#),
            format!(r#"{{"sub":"ann","exp":"{late}"}}"#),
            r#"{"sub":"ann","exp":-1}"#.to_string(),
            r#"{"sub":"ann","exp":null}"#.to_string(),
            r#"{"sub":"ann"}"#.to_string(),
            format!(r#"{{"exp":{late}}}"#),
            format!(r#"{{"sub":5,"exp":{late}}}"#),
            format!(r#"{{"sub":null,"exp":{late}}}"#),
            format!(r#"{{"sub":"","exp":{late}}}"#),
            format!(r#"{{"sub":"a:b","exp":{late}}}"#),
            format!(r#"{{"sub":"ann","exp":{late}}}"#),
            format!(r#"{{"sub":"ann","exp":{late}}}"#),
            format!(r#"{{"sub":"ann","sub":"bob","exp":{late}}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"exp":{late}}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"nbf":1,"nbf":2}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"iat":1,"iat":2}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"x":1,"x":2}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"nbf":"soon"}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"nbf":{late}}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"nbf":[]}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"nbf":[1]}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"nbf":{{}}}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"nbf":{{"a":1}}}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"nbf":-5,"nbf":1.5}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"iat":1.5}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"iat":"1"}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"iat":null}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"iss":"https://id.example.com"}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"iss":"https://evil.example.com"}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"iss":["https://id.example.com"]}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"iss":null}}"#),
            format!(r#"{{"sub":"ann","exp":{late},"iss":7}}"#),
            format!(r#"{{"sub":"ann","exp":{expired},"iss":"https://evil.example.com"}}"#),
            format!(r#"{{"sub":"ann","exp":{expired},"iss":"https://id.example.com"}}"#),
        ]
        .into_iter()
        .chain(
            [
                r#""parley""#,
                r#""other""#,
                r#"["x","parley"]"#,
                r#"["x","y"]"#,
                r#"["parley",1]"#,
                r#"["parley",["parley"]]"#,
                r#"[]"#,
                r#"null"#,
                r#"5"#,
                r#"true"#,
                r#"{"parley":1}"#,
                r#""parley""#,
                r#"["parley"]"#,
            ]
            .iter()
            .flat_map(|aud| {
                [
                    format!(
                        r#"{{"sub":"ann","exp":{late},"aud":{aud},"iss":"https://id.example.com"}}"#
                    ),
                    format!(r#"{{"sub":"ann","exp":{expired},"aud":{aud}}}"#),
                    format!(r#"{{"sub":"ann","exp":{late},"aud":{aud},"aud":{aud}}}"#),
                ]
            }),
        )
        .chain(
            [
                "",
                "[]",
                r#"["ann",4102444800]"#,
                r#""ann""#,
                "null",
                "{}",
                "{",
                r#"{"sub":"ann","exp":4102444800} x"#,
                r#"{"sub":"ann","exp":4102444800}  "#,
                r#"{"sub":"ann","exp":4102444800,}"#,
                r#"{"sub":"ann","exp":1e400}"#,
                r#"{"sub":"ann","exp":4102444800,"aud":[[[[[[[[[[1]]]]]]]]]]}"#,
            ]
            .map(str::to_string),
        )
        .collect();

        let (plain, strict) = plain_and_strict();
        let rotating = rotating();
        for c in &claims {
            for (name, a, secret, kid) in [
                ("plain", &plain, "s", None),
                ("plain, wrong secret", &plain, "t", None),
                ("strict", &strict, "s", Some("k")),
                ("rotating k1", &rotating, "old-secret", Some("k1")),
                ("rotating default", &rotating, "legacy-secret", None),
                (
                    "rotating k2 with k1's secret",
                    &rotating,
                    "old-secret",
                    Some("k2"),
                ),
            ] {
                same(a, &raw_token(secret, kid, c), &format!("{name}: {c}"));
            }
        }
        // Headers: the two bare HS256 ones (read without a parse), and others that say
        // HS256 with something more, or something wrong.
        let headers = [
            r#"{"typ":"JWT","alg":"HS256"}"#,
            r#"{"alg":"HS256","typ":"JWT"}"#,
            r#"{"alg":"HS256"}"#,
            r#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#,
            r#"{"alg":"HS256","typ":"JWT","kid":"k9"}"#,
            r#"{"alg":"HS256","typ":"JWT","alg":"HS256"}"#,
            r#"{"alg":"HS512","typ":"JWT"}"#,
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"typ":"JWT"}"#,
            r#"{"alg":"HS256","typ":"JWT","jwk":5}"#,
            r#"{"alg":"HS256","typ":"JWT"} "#,
            r#"["HS256"]"#,
        ];
        for h in headers {
            for c in &claims[..3] {
                for (name, a, secret) in [
                    ("plain", &plain, "s"),
                    ("strict", &strict, "s"),
                    ("rotating", &rotating, "old-secret"),
                ] {
                    same(
                        a,
                        &raw_token_with(secret, h, c),
                        &format!("{name}: {h} {c}"),
                    );
                }
            }
        }
        // Tokens that are not three parts of base64, bad signatures, another algorithm.
        let good = raw_token("s", None, &claims[0]);
        let (message, _) = good.rsplit_once('.').unwrap();
        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &serde_json::json!({"sub": "ann", "exp": late}),
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        for t in [
            good.clone(),
            format!("{good}."),
            format!("{message}."),
            format!("{message}.AAAA"),
            format!("{message}.!!"),
            format!("{message}.{}", URL_SAFE_NO_PAD.encode([0u8; 32])),
            format!("{good}x"),
            format!("x{good}"),
            good.replacen('.', "..", 1),
            message.to_string(),
            "a.b.c".into(),
            "e30.e30.e30".into(),
            "..".into(),
            ".".into(),
            hs384,
        ] {
            for (name, a) in [
                ("plain", &plain),
                ("strict", &strict),
                ("rotating", &rotating),
            ] {
                same(a, &t, &format!("{name}: {t}"));
            }
        }
    }

    /// The headers read without a parse say exactly HS256 and nothing else.
    #[test]
    fn the_bare_headers_are_what_they_say() {
        for h in BARE_HS256_HEADERS {
            let json = URL_SAFE_NO_PAD.decode(h).unwrap();
            let header: Header = serde_json::from_slice(&json).unwrap();
            assert_eq!(
                header,
                Header::new(Algorithm::HS256),
                "{}",
                String::from_utf8_lossy(&json)
            );
            let parsed: serde_json::Value = serde_json::from_slice(&json).unwrap();
            assert_eq!(
                parsed,
                serde_json::json!({"alg": "HS256", "typ": "JWT"}),
                "nothing but alg and typ"
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]
        /// Objects of the claims `decode` reads (and one it does not), each of a few
        /// values, some given twice: the same answers as `jsonwebtoken::decode`.
        #[test]
        fn verify_answers_as_jsonwebtoken_decode_for_any_claims(
            valid_start in proptest::bool::ANY,
            fields in proptest::collection::vec((0usize..7, 0usize..14), 0..8)
        ) {
            let late = unix_now() + 600;
            const KEYS: [&str; 7] = ["sub", "exp", "iat", "iss", "aud", "nbf", "other"];
            let values = [
                r#""ann""#.to_string(),
                r#""parley""#.into(),
                r#""https://id.example.com""#.into(),
                late.to_string(),
                "1000".into(),
                format!("{late}.5"),
                "-3".into(),
                "null".into(),
                "true".into(),
                r#"["parley","x"]"#.into(),
                r#"["x",2]"#.into(),
                "[]".into(),
                r#"{"a":[1]}"#.into(),
                r#""bad id!""#.into(),
            ];
            // Half of the objects start as a valid token's (so that what follows meets
            // the checks, not only the parse).
            let start = valid_start.then(|| format!(r#""sub":"ann","exp":{late}"#));
            let body = start
                .into_iter()
                .chain(fields.iter().map(|&(k, v)| format!(r#""{}":{}"#, KEYS[k], values[v])))
                .collect::<Vec<_>>()
                .join(",");
            let claims = format!("{{{body}}}");
            let (plain, strict) = plain_and_strict();
            same(&plain, &raw_token("s", None, &claims), &claims);
            same(&strict, &raw_token("s", None, &claims), &claims);
        }
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
