//! Short-lived, single-use tickets that stand in for a token where a URL must carry the
//! credential (EventSource cannot send headers).
//!
//! A ticket is issued to an authenticated user (`POST /api/v1/tickets`) and can open one
//! session, once, within `auth.ticket_ttl`. After that it is bound to the session it
//! opened and is good for exactly one more thing: the browser's automatic EventSource
//! reconnect, which repeats the same URL with a `Last-Event-ID` header, may resume *that*
//! session while it lives. A second fresh use, or a first use after the TTL, is refused,
//! and no use at all outlives the token the ticket was minted from (its `exp`).
//!
//! The first use claims the ticket in the same step that checks it (one lock), so of two
//! concurrent first uses exactly one opens a session; a first use that then fails (a
//! store error, a client gone mid-connect) has still spent the ticket.
//!
//! A ticket that opened a new session is forgotten once the session exists: that
//! session's id is derived from the ticket with the key ([`Tickets::session_id`]), so
//! the reconnect finds it from the ticket alone, and an idle EventSource session holds
//! no entry here (~330 B per session, the map's share and three strings). Only a ticket
//! that resumed an existing session (`session_id=` with it) stays bound to it here.
//!
//! A ticket is signed (HMAC-SHA256 with a key every instance of a cluster shares, see
//! [`ticket_key`]) over its random part and the token's `exp`, which it carries. So a
//! reconnect whose ticket this instance does not hold (the session that the ticket
//! opened ended and the ticket was forgotten, or the instance that issued it restarted)
//! can still be told apart from a ticket that was never issued: the first learns that
//! its session is gone (410 `SESSION_NOT_FOUND`: open a new session and sync), the
//! second is refused as unknown. The signature grants nothing else: only a ticket this
//! instance holds opens or resumes a session.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::time::Instant;

use crate::config::{AuthConfig, JwtAlgorithm};

type HmacSha256 = Hmac<Sha256>;

/// Hex digits of a ticket's random part, its token `exp`, and its signature.
const RANDOM_HEX: usize = 32;
const EXP_HEX: usize = 16;
const MAC_HEX: usize = 32;

/// The key that signs tickets: `auth.ticket_secret`; when empty, derived from
/// `auth.jwt_secret` with HS256 (every instance has it), else random per process.
pub fn ticket_key(auth: &AuthConfig) -> Vec<u8> {
    if !auth.ticket_secret.is_empty() {
        return auth.ticket_secret.as_bytes().to_vec();
    }
    if auth.algorithm == JwtAlgorithm::HS256 && !auth.jwt_secret.is_empty() {
        let mut mac = HmacSha256::new_from_slice(auth.jwt_secret.as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"parley-ticket-key-v1");
        return mac.finalize().into_bytes().to_vec();
    }
    rand::random::<[u8; 32]>().to_vec()
}

fn hex(out: &mut String, bytes: &[u8]) {
    out.extend(bytes.iter().map(|b| format!("{b:02x}")));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("unknown ticket")]
    Unknown,
    #[error("ticket expired")]
    Expired,
    #[error("ticket already used")]
    Used,
    #[error("the token this ticket was minted from has expired")]
    TokenExpired,
    /// A reconnect with a ticket this instance issued, or another instance of the
    /// cluster did, whose session is gone.
    #[error("the session this ticket opened has ended")]
    SessionEnded,
    /// A fresh use of a ticket not held here, whose signature is good: used and
    /// forgotten (its session, `0`, may live), or never issued here. The connect tells
    /// which ("ticket already used" while that session lives).
    #[error("unknown ticket")]
    NotHeld([u8; 16]),
}

/// What a ticket lets the bearer do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redeemed {
    /// First use: open (or explicitly resume) a session for this user; a session it
    /// opens gets the id `session` (see [`Tickets::session_id`]).
    Fresh { user: String, session: [u8; 16] },
    /// An EventSource reconnect: resume the session the ticket explicitly resumed.
    Resume { user: String, session_id: String },
    /// An EventSource reconnect with a ticket not held (any more): resume the session
    /// it opened, whose id is `session`, if it lives (here: this instance's prefix).
    Opened { session: [u8; 16] },
}

struct Ticket {
    user: String,
    expires: Instant,
    /// The `exp` (Unix seconds) of the token it was minted from.
    token_exp: u64,
    state: Use,
}

/// How far a ticket has been used.
enum Use {
    Unused,
    /// A first use is opening a session with it (or failed to).
    Claimed,
    /// It resumed this session (one it opened is forgotten instead).
    Bound(String),
}

pub struct Tickets {
    map: Mutex<HashMap<String, Ticket>>,
    ttl: Duration,
    prefix: String,
    key: Vec<u8>,
}

impl Tickets {
    /// Tickets signed with a random key (see [`Tickets::with_key`]).
    pub fn new(ttl: Duration) -> Self {
        Self {
            map: Mutex::default(),
            ttl,
            prefix: String::new(),
            key: rand::random::<[u8; 32]>().to_vec(),
        }
    }

    /// Signs tickets with `key` ([`ticket_key`]).
    pub fn with_key(mut self, key: Vec<u8>) -> Self {
        self.key = key;
        self
    }

    fn mac(&self, signed: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"parley-ticket-v1\n");
        mac.update(signed.as_bytes());
        mac
    }

    /// The token `exp` a ticket carries, if its signature is good.
    fn verify(&self, ticket: &str) -> Option<u64> {
        let split = ticket.len().checked_sub(MAC_HEX)?;
        let (signed, sig) = (ticket.get(..split)?, ticket.get(split..)?);
        let exp = signed.get(signed.len().checked_sub(EXP_HEX)?..)?;
        let exp = u64::from_str_radix(exp, 16).ok()?;
        let sig: Vec<u8> = (0..MAC_HEX / 2)
            .map(|i| u8::from_str_radix(sig.get(2 * i..2 * i + 2)?, 16).ok())
            .collect::<Option<_>>()?;
        self.mac(signed).verify_truncated_left(&sig).ok()?;
        Some(exp)
    }

    /// Tickets start with `prefix` (the instance id in a cluster: see
    /// `transport::forward`).
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Ticket>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A ticket for `user`, whose token expires at `token_exp` (Unix seconds).
    pub fn issue(&self, user: &str, token_exp: u64) -> String {
        let mut raw = [0u8; RANDOM_HEX / 2];
        rand::rng().fill_bytes(&mut raw);
        let mut ticket = self.prefix.clone();
        hex(&mut ticket, &raw);
        hex(&mut ticket, &token_exp.to_be_bytes());
        let mac = self.mac(&ticket).finalize().into_bytes();
        hex(&mut ticket, &mac[..MAC_HEX / 2]);
        let t = Ticket {
            user: user.into(),
            expires: Instant::now() + self.ttl,
            token_exp,
            state: Use::Unused,
        };
        self.lock().insert(ticket.clone(), t);
        ticket
    }

    /// The random part of the id of the session `ticket` opens: derived from the whole
    /// ticket with the key, so the reconnect path needs no entry (only the key's holder
    /// can derive it, and only from the ticket; a session id does not give the ticket).
    pub fn session_id(&self, ticket: &str) -> [u8; 16] {
        let mut mac = HmacSha256::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"parley-ticket-session-v1\n");
        mac.update(ticket.as_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&mac.finalize().into_bytes()[..16]);
        id
    }

    /// Uses a ticket. `reconnect` is true when the request carries `Last-Event-ID` (an
    /// EventSource reconnect).
    pub fn redeem(&self, ticket: &str, reconnect: bool) -> Result<Redeemed, TicketError> {
        let mut map = self.lock();
        let Some(t) = map.get_mut(ticket) else {
            // Not held here. A reconnect with a ticket the cluster issued: its session is
            // gone (ended here, or with the instance that held it).
            return match self.verify(ticket) {
                Some(exp) if reconnect && crate::auth::unix_now() > exp => {
                    Err(TicketError::TokenExpired)
                }
                Some(_) if reconnect => Ok(Redeemed::Opened {
                    session: self.session_id(ticket),
                }),
                Some(_) => Err(TicketError::NotHeld(self.session_id(ticket))),
                _ => Err(TicketError::Unknown),
            };
        };
        if crate::auth::unix_now() > t.token_exp {
            return Err(TicketError::TokenExpired);
        }
        match (&t.state, reconnect) {
            (Use::Bound(session_id), true) => Ok(Redeemed::Resume {
                user: t.user.clone(),
                session_id: session_id.clone(),
            }),
            (Use::Bound(_) | Use::Claimed, _) => Err(TicketError::Used),
            (Use::Unused, _) if Instant::now() > t.expires => {
                map.remove(ticket);
                Err(TicketError::Expired)
            }
            (Use::Unused, _) => {
                // Claimed under the same lock as the check: a concurrent first use sees
                // `Claimed`.
                t.state = Use::Claimed;
                Ok(Redeemed::Fresh {
                    user: t.user.clone(),
                    session: self.session_id(ticket),
                })
            }
        }
    }

    /// Records the session a fresh ticket opened (`opened`: the session it derives,
    /// then the ticket is forgotten) or resumed; from now on it only resumes that one.
    pub fn bind(&self, ticket: &str, session_id: &str, opened: bool) {
        let mut map = self.lock();
        if opened {
            map.remove(ticket);
        } else if let Some(t) = map.get_mut(ticket) {
            t.state = Use::Bound(session_id.to_string());
        }
    }

    /// Forgets used tickets whose session is gone, and unused ones a TTL after they
    /// expired (kept that long so a late use is told "expired", not "unknown").
    pub fn prune(&self, session_alive: impl Fn(&str) -> bool) {
        let now = Instant::now();
        let ttl = self.ttl;
        let unix = crate::auth::unix_now();
        self.lock().retain(|_, t| match &t.state {
            _ if unix > t.token_exp => false,
            Use::Bound(s) => session_alive(s),
            Use::Unused | Use::Claimed => now <= t.expires + ttl,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token `exp` far in the future.
    const FAR: u64 = u64::MAX;

    #[test]
    fn no_use_outlives_the_token() {
        let t = Tickets::new(Duration::from_secs(30));
        let expired = crate::auth::unix_now() - 1;
        let ticket = t.issue("ann", expired);
        assert_eq!(t.redeem(&ticket, false), Err(TicketError::TokenExpired));
        let ticket = t.issue("ann", FAR);
        t.redeem(&ticket, false).unwrap();
        t.bind(&ticket, "s1", false);
        // The reconnect path closes with the token, and so does the entry.
        t.lock().get_mut(&ticket).unwrap().token_exp = expired;
        assert_eq!(t.redeem(&ticket, true), Err(TicketError::TokenExpired));
        t.prune(|_| true);
        assert!(t.lock().is_empty());
    }

    #[test]
    fn single_use_then_only_reconnects_of_its_session() {
        let t = Tickets::new(Duration::from_secs(30));
        let ticket = t.issue("ann", FAR);
        assert_eq!(
            t.redeem(&ticket, false),
            Ok(Redeemed::Fresh {
                user: "ann".into(),
                session: t.session_id(&ticket)
            })
        );
        t.bind(&ticket, "s1", false);
        assert_eq!(t.redeem(&ticket, false), Err(TicketError::Used));
        assert_eq!(
            t.redeem(&ticket, true),
            Ok(Redeemed::Resume {
                user: "ann".into(),
                session_id: "s1".into()
            })
        );
        t.prune(|_| false);
        // Forgotten with its session: a reconnect is sent to the session the ticket
        // would have opened, which the connect finds gone ("session ended").
        assert_eq!(
            t.redeem(&ticket, true),
            Ok(Redeemed::Opened {
                session: t.session_id(&ticket)
            })
        );
        assert_eq!(
            t.redeem(&ticket, false),
            Err(TicketError::NotHeld(t.session_id(&ticket)))
        );
        assert_eq!(t.redeem("nope", false), Err(TicketError::Unknown));
        assert_eq!(t.redeem("nope", true), Err(TicketError::Unknown));
    }

    #[test]
    fn signed_tickets_tell_a_gone_session_from_a_forgery() {
        let key = b"cluster key".to_vec();
        let a = Tickets::new(Duration::from_secs(30))
            .with_prefix("a1.")
            .with_key(key.clone());
        let ticket = a.issue("ann", FAR);
        assert!(ticket.starts_with("a1.") && !ticket[3..].contains('.'));
        // Another instance with the same key (or this one after a restart).
        let b = Tickets::new(Duration::from_secs(30)).with_key(key.clone());
        assert_eq!(
            b.redeem(&ticket, true),
            Ok(Redeemed::Opened {
                session: a.session_id(&ticket)
            })
        );
        // Never a fresh use: only a ticket held here opens a session.
        assert_eq!(
            b.redeem(&ticket, false),
            Err(TicketError::NotHeld(b.session_id(&ticket)))
        );
        // Any change to it, or another key: unknown.
        let mut forged = ticket.clone().into_bytes();
        let i = forged.len() - 40;
        forged[i] = if forged[i] == b'0' { b'1' } else { b'0' };
        let forged = String::from_utf8(forged).unwrap();
        assert_eq!(b.redeem(&forged, true), Err(TicketError::Unknown));
        let other = Tickets::new(Duration::from_secs(30)).with_key(b"other".to_vec());
        assert_eq!(other.redeem(&ticket, true), Err(TicketError::Unknown));
        for junk in ["", "a1.", "zz", &"f".repeat(80), "a1.é"] {
            assert_eq!(b.redeem(junk, true), Err(TicketError::Unknown), "{junk}");
        }
        // Past the token's exp it says so, as for a ticket held here.
        let expired = a.issue("ann", crate::auth::unix_now() - 1);
        assert_eq!(b.redeem(&expired, true), Err(TicketError::TokenExpired));
    }

    #[test]
    fn the_first_use_claims_the_ticket() {
        let t = Tickets::new(Duration::from_secs(30));
        let ticket = t.issue("ann", FAR);
        assert_eq!(
            t.redeem(&ticket, false),
            Ok(Redeemed::Fresh {
                user: "ann".into(),
                session: t.session_id(&ticket)
            })
        );
        // Before the first use has opened its session (bind), a second use — fresh or
        // as a reconnect — is refused.
        assert_eq!(t.redeem(&ticket, false), Err(TicketError::Used));
        assert_eq!(t.redeem(&ticket, true), Err(TicketError::Used));
    }

    #[tokio::test(start_paused = true)]
    async fn late_tickets_are_refused() {
        let t = Tickets::new(Duration::from_millis(1500));
        let on_time = t.issue("ann", FAR);
        let late = t.issue("ann", FAR);
        tokio::time::advance(Duration::from_millis(1499)).await;
        assert_eq!(
            t.redeem(&on_time, false),
            Ok(Redeemed::Fresh {
                user: "ann".into(),
                session: t.session_id(&on_time)
            })
        );
        tokio::time::advance(Duration::from_millis(2)).await;
        assert_eq!(t.redeem(&late, false), Err(TicketError::Expired));
        // An expired, unused ticket is told "expired" for another TTL, then forgotten.
        let later = t.issue("bob", FAR);
        tokio::time::advance(Duration::from_millis(1501)).await;
        t.prune(|_| true);
        assert!(t.lock().contains_key(&later));
        tokio::time::advance(Duration::from_millis(1500)).await;
        t.prune(|_| true);
        assert!(!t.lock().contains_key(&later));
    }

    /// A ticket that opened its own session is forgotten at once; its reconnect finds
    /// that session from the ticket alone, and nothing else does.
    #[test]
    fn a_ticket_that_opened_its_session_is_forgotten() {
        let t = Tickets::new(Duration::from_secs(30));
        let ticket = t.issue("ann", FAR);
        let session = t.session_id(&ticket);
        assert_eq!(
            t.redeem(&ticket, false),
            Ok(Redeemed::Fresh {
                user: "ann".into(),
                session
            })
        );
        t.bind(&ticket, "whatever", true);
        assert!(t.lock().is_empty());
        assert_eq!(t.redeem(&ticket, true), Ok(Redeemed::Opened { session }));
        assert_eq!(t.redeem(&ticket, false), Err(TicketError::NotHeld(session)));
        assert_eq!(t.redeem("nope", false), Err(TicketError::Unknown));
        // Each ticket its own session; another key, another one.
        assert_ne!(t.session_id(&t.issue("ann", FAR)), session);
        let other = Tickets::new(Duration::from_secs(30));
        assert_ne!(other.session_id(&ticket), session);
        // Past the token's exp, no reconnect.
        let expired = t.issue("ann", crate::auth::unix_now() - 1);
        assert_eq!(t.redeem(&expired, true), Err(TicketError::TokenExpired));
    }
}
