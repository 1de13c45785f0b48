//! Signed download URLs: `?u=<user>&exp=<unix ms>&sig=<HMAC-SHA256>` lets a browser
//! fetch one file as one user until `exp` without a bearer token in the URL (as `<img
//! src>` needs). The signature covers the file id, the user and the expiry; the download
//! still checks that the user may read the file, so leaving a room revokes its URLs.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

pub struct UrlSigner {
    key: Vec<u8>,
}

impl UrlSigner {
    /// A signer with `secret`, or a random key when it is empty.
    pub fn new(secret: &str) -> Self {
        let key = if secret.is_empty() {
            rand::random::<[u8; 32]>().to_vec()
        } else {
            secret.as_bytes().to_vec()
        };
        Self { key }
    }

    fn mac(&self, id: &str, user: &str, exp: i64) -> HmacSha256 {
        // new_from_slice accepts keys of any length for HMAC.
        let mut mac = HmacSha256::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(format!("parley-file-v1\n{id}\n{user}\n{exp}").as_bytes());
        mac
    }

    /// The signature for (`id`, `user`, `exp`).
    pub fn sign(&self, id: &str, user: &str, exp: i64) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(id, user, exp).finalize().into_bytes())
    }

    /// Whether `sig` is the signature for (`id`, `user`, `exp`) and `exp` is after `now`
    /// (compared in constant time).
    pub fn verify(&self, id: &str, user: &str, exp: i64, sig: &str, now: i64) -> bool {
        let Ok(sig) = URL_SAFE_NO_PAD.decode(sig) else {
            return false;
        };
        exp > now && self.mac(id, user, exp).verify_slice(&sig).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_file_user_and_expiry() {
        let s = UrlSigner::new("k");
        let sig = s.sign("f", "alice", 100);
        assert!(s.verify("f", "alice", 100, &sig, 99));
        assert!(!s.verify("f", "alice", 100, &sig, 100), "expired");
        assert!(!s.verify("f", "bob", 100, &sig, 0));
        assert!(!s.verify("g", "alice", 100, &sig, 0));
        assert!(!s.verify("f", "alice", 101, &sig, 0));
        assert!(!UrlSigner::new("other").verify("f", "alice", 100, &sig, 0));
        assert!(!s.verify("f", "alice", 100, "!!", 0));
    }
}
