//! All live sessions of this instance, by id, and the reaper that removes expired ones.
//!
//! The registry is sharded (by a hash of the session id; the per-user counts by a hash
//! of the user): a connect, a resume and a close on different cores take different
//! locks, and the reaper walks one shard at a time, so it never holds up every
//! connect while it scans all n sessions.

use std::{
    collections::{HashMap, hash_map::Entry},
    hash::BuildHasher,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use rand::RngCore;
use tokio::time::Instant;

use super::{Limits, Session};
use crate::{chat::Chat, config::SessionConfig};

/// `limits.max_sessions_per_user` is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManySessions(pub u64);

/// Shards of each map (a few per core of a large machine).
const SHARDS: usize = 64;

/// One shard's lock alone on its cache line(s).
#[derive(Default)]
#[repr(align(128))]
struct Shard<T>(Mutex<T>);

impl<T> Shard<T> {
    fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sessions by id (one shard's). The key is the session's own `id` (one allocation).
/// Hashed with foldhash, not SipHash: the ids are 128 random bits the server made, so
/// nobody can choose keys that collide; a client-chosen id is only ever looked up.
type ById = HashMap<Arc<str>, Arc<Session>, IdHasher>;
type IdHasher = foldhash::fast::RandomState;
/// Live sessions per user (one shard's).
type PerUser = HashMap<Arc<str>, u64>;

pub struct Sessions {
    by_id: Box<[Shard<ById>]>,
    per_user: Box<[Shard<PerUser>]>,
    /// Picks a shard of either map. foldhash, not SipHash, also for the per-user counts:
    /// user ids chosen to meet in one shard would only serialize its lock, and the
    /// per-user maps inside keep std's SipHash (HashDoS-resistant).
    shard_hasher: IdHasher,
    /// Most live sessions of one user (0: no limit).
    max_per_user: u64,
    next_recipient: AtomicU64,
    /// Put in front of every session id (the instance id in a cluster, so any instance
    /// can tell which one holds a session).
    id_prefix: String,
    config: SessionConfig,
    chat: Arc<Chat>,
}

impl Sessions {
    pub fn new(config: SessionConfig, chat: Arc<Chat>) -> Self {
        Self {
            by_id: (0..SHARDS).map(|_| Shard::default()).collect(),
            per_user: (0..SHARDS).map(|_| Shard::default()).collect(),
            shard_hasher: IdHasher::default(),
            max_per_user: 0,
            next_recipient: AtomicU64::new(1),
            id_prefix: String::new(),
            config,
            chat,
        }
    }

    /// Applies `limits.max_sessions_per_user` (0: none).
    pub fn with_max_per_user(mut self, max: u64) -> Self {
        self.max_per_user = max;
        self
    }

    /// Session ids start with `prefix` (see `transport::forward`).
    pub fn with_id_prefix(mut self, prefix: &str) -> Self {
        self.id_prefix = prefix.to_string();
        self
    }

    fn id_shard(&self, id: &str) -> MutexGuard<'_, ById> {
        self.by_id[self.shard_hasher.hash_one(id) as usize % SHARDS].lock()
    }

    fn user_shard(&self, user: &str) -> MutexGuard<'_, PerUser> {
        self.per_user[self.shard_hasher.hash_one(user) as usize % SHARDS].lock()
    }

    /// A new, unattached session for `user` (not yet registered for delivery), unless
    /// the user has `max_per_user` sessions already.
    pub fn create(&self, user: &str) -> Result<Arc<Session>, TooManySessions> {
        let mut raw = [0u8; 16];
        rand::rng().fill_bytes(&mut raw);
        self.create_with(user, raw)
    }

    /// The id of the session whose random part is `raw`: this instance's prefix, then
    /// `raw` in hex (built on the stack: the digits into a fixed array, then one copy
    /// after the prefix).
    fn id_bytes(&self, raw: [u8; 16]) -> smallvec::SmallVec<[u8; 96]> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 32];
        for (pair, b) in hex.chunks_exact_mut(2).zip(raw) {
            pair[0] = HEX[usize::from(b >> 4)];
            pair[1] = HEX[usize::from(b & 15)];
        }
        let mut id = smallvec::SmallVec::<[u8; 96]>::new();
        id.extend_from_slice(self.id_prefix.as_bytes());
        id.extend_from_slice(&hex);
        id
    }

    /// The session whose random part is `raw` (see [`Sessions::create_with`]).
    pub fn get_raw(&self, raw: [u8; 16]) -> Option<Arc<Session>> {
        let id = self.id_bytes(raw);
        self.get(std::str::from_utf8(&id).expect("hex after a str"))
    }

    /// Whether `session`'s random part is `raw`.
    pub fn is_raw(&self, session: &Session, raw: [u8; 16]) -> bool {
        session.id().as_bytes() == self.id_bytes(raw).as_slice()
    }

    /// [`Sessions::create`] with the id's random part given (a fresh ticket's: see
    /// `session::tickets`).
    pub fn create_with(&self, user: &str, raw: [u8; 16]) -> Result<Arc<Session>, TooManySessions> {
        // One allocation for the id: the `Arc<str>` the session and the registry's key
        // share.
        let id = self.id_bytes(raw);
        let limits = Limits::new(self.config.max_queue_bytes, self.config.replay_buffer_bytes);
        let rid = self.next_recipient.fetch_add(1, Ordering::Relaxed);
        let id: Arc<str> = std::str::from_utf8(&id).expect("hex after a str").into();
        let session = Arc::new(Session::new(id.clone(), user, rid, limits));
        {
            let mut counts = self.user_shard(&session.user);
            let count = counts.entry(session.user.clone()).or_default();
            if self.max_per_user > 0 && *count >= self.max_per_user {
                return Err(TooManySessions(self.max_per_user));
            }
            *count += 1;
        }
        // Counted before it is findable; `remove` uncounts only what it found.
        let earlier = self.id_shard(&id).insert(id, session.clone());
        // Random, or derived from a ticket used once: never an id that is taken.
        debug_assert!(earlier.is_none(), "session id taken");
        Ok(session)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.id_shard(id).get(id).cloned()
    }

    /// Removes the session from the registry and from live delivery.
    pub fn remove(&self, session: &Session) {
        let removed = self.id_shard(session.id()).remove(session.id());
        if removed.is_some() {
            let mut counts = self.user_shard(session.user_id());
            // One hash of the user id (a lookup, then a removal where it was found).
            if let Entry::Occupied(mut n) = counts.entry(session.user.clone()) {
                *n.get_mut() -= 1;
                if *n.get() == 0 {
                    n.remove();
                }
            }
        }
        if removed.is_some() {
            self.chat.detach(session.user_id(), session.recipient_id);
        }
    }

    /// Ends a session now (the client closed its connection on purpose).
    pub fn end(&self, session: &Session) {
        session.kill(super::Death::Expired);
        self.remove(session);
    }

    /// Ends a session at the client's word (`end`): its transports close with 1000
    /// "session ended" rather than 4011, so the client does not reconnect.
    pub fn end_by_client(&self, session: &Session) {
        session.kill(super::Death::Ended);
        self.remove(session);
    }

    pub fn len(&self) -> usize {
        self.by_id.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every session that is dead or detached past the grace period, one shard
    /// at a time (each shard's lock is held only to scan that shard).
    pub fn reap(&self) -> usize {
        let now = Instant::now();
        let mut reaped = 0;
        for shard in self.by_id.iter() {
            let expired: Vec<Arc<Session>> = shard
                .lock()
                .values()
                .filter(|s| s.expired(now, self.config.grace_period))
                .cloned()
                .collect();
            for s in &expired {
                s.kill(super::Death::Expired);
                self.remove(s);
            }
            reaped += expired.len();
        }
        reaped
    }
}
