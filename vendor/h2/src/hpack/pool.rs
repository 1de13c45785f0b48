//! PARLEY PATCH (shared table bytes): bytes that HPACK tables of many connections hold
//! alike, one copy for all of them: a decoder table's entry (a browser's user agent,
//! client hints, fetch metadata; `decoder.rs` `Entry::Shared`), and an encoder table's
//! whole buffer (a server's response headers, the same on most connections;
//! `table.rs` `Buf::Shared`).
//!
//! - Taken: a string of `MIN_LEN` bytes or more whose name is not a credential's
//!   (`authorization`, `proxy-authorization` and `cookie` differ per user: sharing would
//!   only add the pool's bookkeeping to them).
//! - A shard holds at most `SHARD_CAP` strings (65,536 in all); an entry that finds its
//!   shard full keeps bytes of its own, as before. The pool's own cost is so bounded
//!   for all connections together: a slot of ~17-39 bytes and a 16-byte count header
//!   per string, ~3.6 MB at most. A string is no longer than a table entry (4,064
//!   bytes) and lives only while some table holds it. Per connection, a pooled entry
//!   costs its count header more when no other connection shares it: ~1.4 KB at most
//!   (85 entries of 16 bytes in a 4,096-byte table), while the pool has room.
//! - Every clone and every drop of a pooled string happens under its shard's lock, so
//!   a string's count of 2 there (the pool's and the caller's) means the caller holds
//!   the last table reference.
//! - Lookups hash with a per-process random key (SipHash), as the byte strings come
//!   from peers.

use hashbrown::HashTable;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

pub(crate) const MIN_LEN: usize = 16;
const SHARDS: usize = 16;
const SHARD_CAP: usize = 4096;

pub(crate) struct Pool {
    keys: RandomState,
    cap: usize,
    shards: [Mutex<HashTable<Arc<[u8]>>>; SHARDS],
}

/// The process's pool, which decoder and encoder tables use.
fn global() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(SHARD_CAP))
}

/// A table's reference to a string of the process's pool, given back when dropped.
/// (`Some` until then: the `Option` lets `Drop` move it out, at no cost in size.)
#[derive(Debug)]
pub(crate) struct Shared(Option<Arc<[u8]>>);

impl Shared {
    pub(crate) fn bytes(&self) -> &[u8] {
        self.0
            .as_deref()
            .expect("a shared string is only taken on drop")
    }

    #[cfg(test)]
    pub(crate) fn arc(&self) -> &Arc<[u8]> {
        self.0.as_ref().unwrap()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            global().give_back(s);
        }
    }
}

pub(crate) fn take(name: &[u8], value: &[u8]) -> Option<Shared> {
    global().take(name, value).map(|s| Shared(Some(s)))
}

/// The pooled copy of `bytes` (an encoder table's buffer), or `None` (as `take`).
pub(crate) fn take_bytes(bytes: &[u8]) -> Option<Shared> {
    take(bytes, &[])
}

#[cfg(test)]
pub(crate) fn global_holds(bytes: &[u8]) -> bool {
    global().holds(bytes)
}

impl Pool {
    pub(crate) fn new(cap: usize) -> Pool {
        Pool {
            keys: RandomState::new(),
            cap,
            shards: std::array::from_fn(|_| Mutex::new(HashTable::new())),
        }
    }

    /// `name` then `value` as one string (SipHash streams: the split does not count).
    fn hash(&self, name: &[u8], value: &[u8]) -> u64 {
        let mut h = self.keys.build_hasher();
        h.write(name);
        h.write(value);
        h.finish()
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, HashTable<Arc<[u8]>>> {
        // Middle bits: hashbrown takes its control bytes from the top seven and the
        // bucket from the low ones (13 for a full shard), so a shard's strings keep
        // both spread.
        let i = (hash >> 32) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pooled copy of `name` followed by `value`, or `None` where the pool does
    /// not take it (too short, a credential, its shard full).
    pub(crate) fn take(&self, name: &[u8], value: &[u8]) -> Option<Arc<[u8]>> {
        let len = name.len() + value.len();
        if len < MIN_LEN || matches!(name, b"authorization" | b"proxy-authorization" | b"cookie") {
            return None;
        }
        let hash = self.hash(name, value);
        let mut shard = self.shard(hash);
        let same = |s: &Arc<[u8]>| s.len() == len && s.starts_with(name) && s.ends_with(value);
        if let Some(s) = shard.find(hash, same) {
            return Some(s.clone());
        }
        if shard.len() >= self.cap {
            return None;
        }
        // One allocation: the chain's length is known, so the `Arc` is made to size.
        let s: Arc<[u8]> = name.iter().chain(value).copied().collect();
        shard.insert_unique(hash, s.clone(), |s| self.hash(s, &[]));
        Some(s)
    }

    /// A table's reference given back; the string leaves the pool with the last.
    pub(crate) fn give_back(&self, bytes: Arc<[u8]>) {
        let hash = self.hash(&bytes, &[]);
        let mut shard = self.shard(hash);
        if Arc::strong_count(&bytes) == 2 {
            if let Ok(entry) = shard.find_entry(hash, |s| Arc::ptr_eq(s, &bytes)) {
                entry.remove();
            }
        }
        // Dropped under the lock: a count read under it is then exact.
        drop(bytes);
        drop(shard);
    }

    #[cfg(test)]
    pub(crate) fn holds(&self, bytes: &[u8]) -> bool {
        let hash = self.hash(bytes, &[]);
        self.shard(hash).find(hash, |s| **s == *bytes).is_some()
    }
}
