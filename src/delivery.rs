//! Delivery: who receives a push ([`Target`]), what receives it ([`Recipient`], which
//! sessions implement), and the local fan-out index ([`Hub`]): which sessions on this
//! instance belong to which users, and which users with local sessions are members of
//! which rooms. `chat` decides targets; `broker` carries (target, push) between
//! instances; the hub delivers them here. This module knows neither of them.
//!
//! The hub only knows [`Recipient`]s (sessions implement it); it never awaits and never
//! touches a socket: delivering is a non-blocking push into each session's queue.
//!
//! A room keeps copy-on-write snapshots of its recipients, one per chunk of
//! [`CHUNK`] members (an `Arc<[..]>` each, rebuilt on the first delivery after a change
//! to that chunk): a delivery to a room holds the hub's lock only to clone those `Arc`s,
//! and pushes to every member with no lock held, so attaches, joins and deliveries to
//! other rooms never wait behind a large fan-out. A join or leave in a room of n members
//! touches at most two chunks, so the next delivery copies at most 2 × [`CHUNK`]
//! recipients, not n: churn in a big room costs O(1) per change, not O(n).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use indexmap::IndexMap;

use crate::codec::Push;

/// Who receives a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every session of every member of the room.
    Room(String),
    /// As `Room`, but not the sessions of this user (typing).
    RoomExcept { room: String, user: String },
    /// Every session of users who share at least one of these rooms with `user`, once
    /// each, not `user`'s own (presence).
    CoMembers { rooms: Vec<String>, user: String },
    /// Every session of one user (signalling).
    User(String),
    /// Every session (announcements).
    All,
}

/// Something that receives pushes: a session.
pub trait Recipient: Send + Sync + 'static {
    /// Unique per process.
    fn recipient_id(&self) -> u64;
    fn user(&self) -> &str;
    /// Queues the push; must not block.
    fn push(&self, push: &Arc<Push>);
}

type Recipients = IndexMap<u64, Arc<dyn Recipient>>;

#[derive(Default)]
struct UserEntry {
    recipients: Recipients,
    rooms: HashSet<String>,
}

/// Members per snapshot chunk. A delivery clones one `Arc` per chunk under the lock
/// (75 for a room of 19k); a membership change rebuilds at most two chunks.
const CHUNK: usize = 256;

/// A room's local recipients.
#[derive(Default)]
struct RoomEntry {
    /// In a dense order: chunk `c` is `members[c * CHUNK..(c + 1) * CHUNK]`.
    members: Recipients,
    /// Each chunk of `members` as delivered to, built on demand; a chunk is reset when
    /// one of its slots changes.
    chunks: Vec<OnceLock<Chunk>>,
}

type Chunk = Arc<[Arc<dyn Recipient>]>;

/// A room's recipients at one moment: a few chunks are held inline (rooms up to
/// 4 × [`CHUNK`] members take no allocation to deliver to).
type Snapshot = smallvec::SmallVec<[Chunk; 4]>;

impl RoomEntry {
    fn insert(&mut self, id: u64, r: Arc<dyn Recipient>) {
        let (slot, _) = self.members.insert_full(id, r);
        self.changed(slot);
    }

    fn remove(&mut self, id: &u64) {
        if let Some((slot, _, _)) = self.members.swap_remove_full(id) {
            // The last member moved into `slot`; the old last slot is gone.
            let last = self.members.len();
            self.changed(slot);
            self.changed(last);
            self.chunks.truncate(last.div_ceil(CHUNK));
        }
    }

    /// The member in `slot` changed: its chunk must be rebuilt.
    fn changed(&mut self, slot: usize) {
        let c = slot / CHUNK;
        if c < self.chunks.len() {
            self.chunks[c] = OnceLock::new();
        } else {
            self.chunks.resize_with(c + 1, OnceLock::new);
        }
    }

    fn snapshot(&self) -> Snapshot {
        let members = self.members.as_slice();
        (0..self.chunks.len())
            .map(|c| {
                self.chunks[c]
                    .get_or_init(|| {
                        let end = ((c + 1) * CHUNK).min(members.len());
                        members[c * CHUNK..end].values().cloned().collect()
                    })
                    .clone()
            })
            .collect()
    }
}

#[derive(Default)]
struct Inner {
    users: HashMap<String, UserEntry>,
    rooms: HashMap<String, RoomEntry>,
}

#[derive(Default)]
pub struct Hub {
    inner: RwLock<Inner>,
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a recipient; it receives pushes for every room its user is (or becomes)
    /// a member of. Returns true when it is the user's first recipient here.
    pub fn attach(&self, recipient: Arc<dyn Recipient>) -> bool {
        let mut inner = self.write();
        let inner = &mut *inner;
        let entry = inner.users.entry(recipient.user().to_string()).or_default();
        let first = entry.recipients.is_empty();
        for room in &entry.rooms {
            inner
                .rooms
                .entry(room.clone())
                .or_default()
                .insert(recipient.recipient_id(), recipient.clone());
        }
        entry.recipients.insert(recipient.recipient_id(), recipient);
        first
    }

    /// Unregisters a recipient. When it was the user's last one here, returns the user's
    /// rooms (for the offline presence push).
    pub fn detach(&self, user: &str, recipient_id: u64) -> Option<Vec<String>> {
        let mut inner = self.write();
        let inner = &mut *inner;
        let entry = inner.users.get_mut(user)?;
        entry.recipients.swap_remove(&recipient_id)?;
        for room in &entry.rooms {
            if let Some(set) = inner.rooms.get_mut(room) {
                set.remove(&recipient_id);
                if set.members.is_empty() {
                    inner.rooms.remove(room);
                }
            }
        }
        if entry.recipients.is_empty() {
            let entry = inner.users.remove(user)?;
            return Some(entry.rooms.into_iter().collect());
        }
        None
    }

    /// Whether the user has a recipient on this instance.
    pub fn is_local(&self, user: &str) -> bool {
        self.read().users.contains_key(user)
    }

    /// The user (if it has local sessions) is now a member of `room`.
    pub fn joined(&self, user: &str, room: &str) {
        let mut inner = self.write();
        let inner = &mut *inner;
        let Some(entry) = inner.users.get_mut(user) else {
            return;
        };
        if !entry.rooms.insert(room.to_string()) {
            return;
        }
        let set = inner.rooms.entry(room.to_string()).or_default();
        for (id, r) in &entry.recipients {
            set.insert(*id, r.clone());
        }
    }

    pub fn left(&self, user: &str, room: &str) {
        let mut inner = self.write();
        let inner = &mut *inner;
        let Some(entry) = inner.users.get_mut(user) else {
            return;
        };
        if !entry.rooms.remove(room) {
            return;
        }
        if let Some(set) = inner.rooms.get_mut(room) {
            for id in entry.recipients.keys() {
                set.remove(id);
            }
            if set.members.is_empty() {
                inner.rooms.remove(room);
            }
        }
    }

    /// Pushes to the target's local sessions; returns how many got it.
    pub fn deliver(&self, target: &Target, push: &Arc<Push>) -> usize {
        let (room, except) = match target {
            Target::Room(room) => (room, None),
            Target::RoomExcept { room, user } => (room, Some(user.as_str())),
            _ => return self.deliver_locked(target, push),
        };
        // The lock is held only to take the snapshot.
        let Some(snapshot) = self.read().rooms.get(room).map(RoomEntry::snapshot) else {
            return 0;
        };
        // Nested loops, not `flat_map`: the flattened iterator cost ~8 instructions more
        // per recipient (callgrind, benches/hub.rs).
        let mut n = 0;
        for chunk in &snapshot {
            for r in chunk.iter() {
                if except.is_none_or(|u| u != r.user()) {
                    r.push(push);
                    n += 1;
                }
            }
        }
        n
    }

    /// The rarer targets (a user, co-members, everyone), under the read lock.
    fn deliver_locked(&self, target: &Target, push: &Arc<Push>) -> usize {
        let inner = self.read();
        let all = |set: &Recipients| {
            for r in set.values() {
                r.push(push);
            }
            set.len()
        };
        match target {
            Target::Room(_) | Target::RoomExcept { .. } => unreachable!("snapshot path"),
            Target::User(user) => inner.users.get(user).map_or(0, |e| all(&e.recipients)),
            Target::CoMembers { rooms, user } => {
                let mut seen = HashSet::new();
                for set in rooms.iter().filter_map(|r| inner.rooms.get(r)) {
                    for (id, r) in &set.members {
                        if r.user() != user && seen.insert(*id) {
                            r.push(push);
                        }
                    }
                }
                seen.len()
            }
            Target::All => inner.users.values().map(|e| all(&e.recipients)).sum(),
        }
    }

    /// Number of local recipients of `room` (for tests and metrics).
    pub fn room_size(&self, room: &str) -> usize {
        self.read().rooms.get(room).map_or(0, |s| s.members.len())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::proto::{Pong, server_frame::Kind};

    struct Counter {
        id: u64,
        user: String,
        got: AtomicUsize,
    }

    impl Recipient for Counter {
        fn recipient_id(&self) -> u64 {
            self.id
        }
        fn user(&self) -> &str {
            &self.user
        }
        fn push(&self, _: &Arc<Push>) {
            self.got.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn counter(id: u64, user: &str) -> Arc<Counter> {
        Arc::new(Counter {
            id,
            user: user.into(),
            got: AtomicUsize::new(0),
        })
    }

    fn got(c: &Counter) -> usize {
        c.got.load(Ordering::Relaxed)
    }

    /// The room snapshot follows every membership change: a delivery after a join, an
    /// attach, a leave or a detach reaches exactly the members of that moment.
    #[test]
    fn snapshots_follow_membership() {
        let hub = Hub::new();
        let push = Arc::new(Push::new(Kind::Pong(Pong { ts: 1 })));
        let room = Target::Room("r".into());
        let (a, b, b2) = (counter(1, "a"), counter(2, "b"), counter(3, "b"));
        hub.attach(a.clone());
        hub.joined("a", "r");
        assert_eq!(hub.deliver(&room, &push), 1);
        hub.attach(b.clone());
        hub.joined("b", "r");
        assert_eq!(hub.deliver(&room, &push), 2);
        // A second session of a member joins the room's snapshot on attach.
        hub.attach(b2.clone());
        assert_eq!(hub.deliver(&room, &push), 3);
        let except_b = Target::RoomExcept {
            room: "r".into(),
            user: "b".into(),
        };
        assert_eq!(hub.deliver(&except_b, &push), 1);
        hub.left("a", "r");
        assert_eq!(hub.deliver(&room, &push), 2);
        hub.detach("b", 2);
        assert_eq!(hub.deliver(&room, &push), 1);
        assert_eq!((got(&a), got(&b), got(&b2)), (4, 3, 3));
        hub.detach("b", 3);
        assert_eq!(hub.deliver(&room, &push), 0);
        assert_eq!(hub.room_size("r"), 0);
    }

    /// In a room of several chunks, every join, leave, attach and detach (in and out of
    /// the middle, the end, and across a chunk boundary) leaves a delivery reaching
    /// exactly the members of that moment, each once, and only the chunks a change
    /// touched are rebuilt.
    #[test]
    fn chunked_snapshots_follow_membership() {
        let hub = Hub::new();
        let push = Arc::new(Push::new(Kind::Pong(Pong { ts: 1 })));
        let room = Target::Room("big".into());
        let n = CHUNK * 3 + 17;
        let members: Vec<_> = (0..n as u64)
            .map(|i| counter(i, &format!("u{i}")))
            .collect();
        for m in &members {
            hub.attach(m.clone());
            hub.joined(m.user(), "big");
        }
        let mut expected = vec![0usize; n];
        let mut present: Vec<bool> = vec![true; n];
        let check = |hub: &Hub, present: &[bool], expected: &mut [usize]| {
            let want = present.iter().filter(|p| **p).count();
            assert_eq!(hub.deliver(&room, &push), want);
            for (i, p) in present.iter().enumerate() {
                if *p {
                    expected[i] += 1;
                }
                assert_eq!(got(&members[i]), expected[i], "member {i}");
            }
        };
        check(&hub, &present, &mut expected);
        // Leaves from the front, the middle, a chunk boundary and the end.
        for i in [0, CHUNK - 1, CHUNK, CHUNK + 5, 2 * CHUNK, n - 1, n - 2] {
            hub.left(members[i].user(), "big");
            present[i] = false;
            check(&hub, &present, &mut expected);
        }
        // One change rebuilds at most two chunks; the rest are the same allocations.
        let before = hub.read().rooms["big"].snapshot();
        hub.left(members[7].user(), "big");
        present[7] = false;
        let after = hub.read().rooms["big"].snapshot();
        let reused = before
            .iter()
            .filter(|b| after.iter().any(|a| Arc::ptr_eq(a, b)))
            .count();
        assert!(
            reused >= before.len() - 2,
            "{reused} of {} reused",
            before.len()
        );
        check(&hub, &present, &mut expected);
        // Rejoins, and a member's second session attached and detached.
        for i in [0, CHUNK, n - 1] {
            hub.joined(members[i].user(), "big");
            present[i] = true;
            check(&hub, &present, &mut expected);
        }
        let second = counter(10_000, members[3].user());
        hub.attach(second.clone());
        assert_eq!(
            hub.deliver(&room, &push),
            present.iter().filter(|p| **p).count() + 1
        );
        for (i, p) in present.iter().enumerate() {
            if *p {
                expected[i] += 1;
            }
        }
        hub.detach(members[3].user(), 10_000);
        check(&hub, &present, &mut expected);
        assert_eq!(got(&second), 1);
        // Everyone leaves: the room is gone.
        for (i, m) in members.iter().enumerate() {
            if present[i] {
                hub.left(m.user(), "big");
            }
        }
        assert_eq!(hub.room_size("big"), 0);
        assert_eq!(hub.deliver(&room, &push), 0);
    }
}
