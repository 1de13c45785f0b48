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
//! to that chunk): a delivery to a room holds its shard's lock only to clone those
//! `Arc`s, and pushes to every member with no lock held, so attaches, joins and
//! deliveries to other rooms never wait behind a large fan-out. A join or leave in a
//! room of n members touches at most two chunks, so the next delivery copies at most
//! 2 × [`CHUNK`] recipients, not n: churn in a big room costs O(1) per change, not O(n).
//!
//! The index is sharded ([`SHARDS`] locks for users, as many for rooms) so that many
//! cores attaching, joining and delivering rarely take the same lock; co-member
//! (presence) and everyone (announcement) pushes are collected under the locks and
//! pushed with none held, like room deliveries.

use std::{
    collections::HashSet,
    hash::{BuildHasher, RandomState},
    sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use hashbrown::hash_map::EntryRef;
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
    /// [`Recipient::user`] as a shared string: the hub keys the user's entry with it, so
    /// a recipient that holds one (a session) saves the hub a copy.
    fn user_key(&self) -> Arc<str> {
        self.user().into()
    }
    /// Queues the push; must not block.
    fn push(&self, push: &Arc<Push>);
}

/// A room's recipients by id. The ids are the server's own (a counter), so nobody can
/// choose ones that collide: foldhash, not SipHash (as the session registry's ids).
type Recipients = IndexMap<u64, Arc<dyn Recipient>, foldhash::fast::RandomState>;

/// A user's recipients here: a few at most (`limits.max_sessions_per_user`, 32 by
/// default), so a list searched by id, the first held inline. A connect of a user with
/// no other session here allocates nothing for it (an `IndexMap` took two allocations,
/// its table and its entries, and a SipHash per insert and removal).
type UserRecipients = smallvec::SmallVec<[(u64, Arc<dyn Recipient>); 1]>;

/// A map keyed by a shared string a client chose (a user id, a room name): hashbrown's
/// map with std's SipHash, as std's `HashMap` is (HashDoS-resistant), for its `entry_ref`:
/// a lookup by `&str` that inserts without a second hash.
type StrMap<V> = hashbrown::HashMap<Arc<str>, V, RandomState>;

#[derive(Default)]
struct UserEntry {
    recipients: UserRecipients,
    /// The user's rooms, each with its member count as last told (at the user's attach,
    /// join, invite), `None` when not told (a join on another instance).
    rooms: KnownRooms,
}

/// A user's rooms as the hub knows them: each name with the member count as last told
/// ([`Hub::joined`]), `None` if never told.
///
/// A few rooms are a list searched by name, the first held inline: most users are in a
/// few rooms, and a map's smallest table (4 slots, its control bytes and its hasher's
/// keys) cost every user in one room a 160 B allocation. Past [`KnownRooms::FEW`] rooms
/// the list moves into a map (SipHash, as [`StrMap`]): a join or leave stays O(1) for a
/// user in many rooms, whose names the client chose.
#[derive(Debug, Default)]
pub struct KnownRooms(RoomList);

#[derive(Debug)]
enum RoomList {
    Few(smallvec::SmallVec<[(Arc<str>, Option<u64>); 1]>),
    Many(Box<StrMap<Option<u64>>>),
}

impl Default for RoomList {
    fn default() -> Self {
        RoomList::Few(smallvec::SmallVec::new())
    }
}

impl KnownRooms {
    /// Most rooms kept as a list.
    const FEW: usize = 8;

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        match &self.0 {
            RoomList::Few(list) => list.len(),
            RoomList::Many(map) => map.len(),
        }
    }

    /// Each room with its member count as last told, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Option<u64>)> {
        let (list, map) = match &self.0 {
            RoomList::Few(list) => (Some(list.iter().map(|(k, v)| (k, v))), None),
            RoomList::Many(map) => (None, Some(map.iter())),
        };
        list.into_iter().flatten().chain(map.into_iter().flatten())
    }

    fn keys(&self) -> impl Iterator<Item = &Arc<str>> {
        self.iter().map(|(room, _)| room)
    }

    pub fn get(&self, room: &str) -> Option<&Option<u64>> {
        match &self.0 {
            RoomList::Few(list) => list.iter().find(|(k, _)| **k == *room).map(|(_, v)| v),
            RoomList::Many(map) => map.get(room),
        }
    }

    fn get_mut(&mut self, room: &str) -> Option<&mut Option<u64>> {
        match &mut self.0 {
            RoomList::Few(list) => list.iter_mut().find(|(k, _)| **k == *room).map(|(_, v)| v),
            RoomList::Many(map) => map.get_mut(room),
        }
    }

    /// Adds a room that is not in the list (checked by the caller with `get_mut`).
    fn insert_new(&mut self, room: Arc<str>, members: Option<u64>) {
        match &mut self.0 {
            RoomList::Few(list) if list.len() < Self::FEW => list.push((room, members)),
            RoomList::Few(list) => {
                let mut map = StrMap::with_capacity_and_hasher(2 * Self::FEW, RandomState::new());
                map.extend(list.drain(..));
                map.insert(room, members);
                self.0 = RoomList::Many(Box::new(map));
            }
            RoomList::Many(map) => {
                map.insert(room, members);
            }
        }
    }

    pub fn remove(&mut self, room: &str) -> Option<Option<u64>> {
        match &mut self.0 {
            RoomList::Few(list) => {
                let at = list.iter().position(|(k, _)| **k == *room)?;
                Some(list.swap_remove(at).1)
            }
            RoomList::Many(map) => map.remove(room),
        }
    }
}

/// The same rooms with the same counts, however each is held.
impl PartialEq for KnownRooms {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(room, m)| other.get(room) == Some(m))
    }
}

impl Eq for KnownRooms {}

impl IntoIterator for KnownRooms {
    type Item = (Arc<str>, Option<u64>);
    type IntoIter = std::iter::Chain<
        std::iter::Flatten<std::option::IntoIter<smallvec::IntoIter<[(Arc<str>, Option<u64>); 1]>>>,
        std::iter::Flatten<
            std::option::IntoIter<hashbrown::hash_map::IntoIter<Arc<str>, Option<u64>>>,
        >,
    >;

    fn into_iter(self) -> Self::IntoIter {
        let (list, map) = match self.0 {
            RoomList::Few(list) => (Some(list.into_iter()), None),
            RoomList::Many(map) => (None, Some(map.into_iter())),
        };
        list.into_iter().flatten().chain(map.into_iter().flatten())
    }
}

/// Members per snapshot chunk. A delivery clones one `Arc` per chunk under the lock
/// (75 for a room of 19k); a membership change rebuilds at most two chunks.
const CHUNK: usize = 256;

/// A room's local recipients (its name is its key in its shard, shared with its
/// members' lists of rooms).
#[derive(Default)]
struct RoomEntry {
    /// In a dense order: chunk `c` is `members[c * CHUNK..(c + 1) * CHUNK]`.
    members: Recipients,
    /// Each chunk of `members` as delivered to, built on demand; a chunk is reset when
    /// one of its slots changes. The first is held inline (a room of up to [`CHUNK`]
    /// local members allocates none).
    chunks: smallvec::SmallVec<[OnceLock<Chunk>; 1]>,
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

/// Shards of each index (a few per core of a large machine).
const SHARDS: usize = 64;

/// One shard of an index: its lock alone on its cache line(s).
#[derive(Default)]
#[repr(align(128))]
struct Shard<T>(RwLock<T>);

impl<T> Shard<T> {
    fn read(&self) -> RwLockReadGuard<'_, T> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Keyed by shared strings: a user's key is its session's, and a room's name is one
/// allocation for the room's entry and every member's list of rooms.
type Users = StrMap<UserEntry>;
type Rooms = StrMap<RoomEntry>;

/// The index, sharded: users by a hash of the user, rooms by a hash of the room, each
/// shard under its own lock, so attaches, joins and deliveries on different cores
/// rarely meet. Lock order: at most one user shard, then room shards one at a time
/// (never a user shard while a room shard is held, never two of a kind). A room's
/// membership changes only under the changing user's shard lock and the room's shard
/// lock, so two users joining the same room serialize on the room's shard alone.
pub struct Hub {
    users: Box<[Shard<Users>]>,
    rooms: Box<[Shard<Rooms>]>,
    /// Picks a shard only: foldhash (seeded per process), not SipHash. Keys chosen to
    /// meet in one shard would only serialize their locks (as with one shard); the maps
    /// inside keep std's SipHash, so colliding user ids or room names cannot make a
    /// lookup slow (HashDoS).
    shard_hasher: foldhash::fast::RandomState,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            users: (0..SHARDS).map(|_| Shard::default()).collect(),
            rooms: (0..SHARDS).map(|_| Shard::default()).collect(),
            shard_hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    fn user_shard(&self, user: &str) -> &Shard<Users> {
        &self.users[self.shard_hasher.hash_one(user) as usize % SHARDS]
    }

    fn room_shard(&self, room: &str) -> &Shard<Rooms> {
        &self.rooms[self.shard_hasher.hash_one(room) as usize % SHARDS]
    }

    /// Registers a recipient; it receives pushes for every room its user is (or becomes)
    /// a member of. Returns true when it is the user's first recipient here.
    pub fn attach(&self, recipient: Arc<dyn Recipient>) -> bool {
        let mut users = self.user_shard(recipient.user()).write();
        let entry = match users.entry_ref(recipient.user()) {
            EntryRef::Occupied(o) => o.into_mut(),
            EntryRef::Vacant(v) => v.insert_with_key(recipient.user_key(), UserEntry::default()),
        };
        let first = entry.recipients.is_empty();
        let id = recipient.recipient_id();
        for room in entry.rooms.keys() {
            self.room_shard(room)
                .write()
                .entry(room.clone())
                .or_default()
                .insert(id, recipient.clone());
        }
        // A recipient id is attached once (a session attaches once, when created).
        debug_assert!(entry.recipients.iter().all(|(r, _)| *r != id));
        entry.recipients.push((id, recipient));
        first
    }

    /// Unregisters a recipient. When it was the user's last one here, returns the user's
    /// rooms with their member counts as last told (for the offline presence push, which
    /// then needs no store read).
    pub fn detach(&self, user: &str, recipient_id: u64) -> Option<KnownRooms> {
        let mut users = self.user_shard(user).write();
        let EntryRef::Occupied(mut o) = users.entry_ref(user) else {
            return None;
        };
        let entry = o.get_mut();
        let slot = entry
            .recipients
            .iter()
            .position(|(id, _)| *id == recipient_id)?;
        entry.recipients.swap_remove(slot);
        for room in entry.rooms.keys() {
            self.remove_member(room, &[recipient_id]);
        }
        if entry.recipients.is_empty() {
            // The rooms as they are: the map itself, not a copy of it.
            return Some(o.remove().rooms);
        }
        None
    }

    /// Removes recipients from a room (the room goes when it is empty).
    fn remove_member(&self, room: &str, ids: &[u64]) {
        let mut rooms = self.room_shard(room).write();
        if let EntryRef::Occupied(mut o) = rooms.entry_ref(room) {
            let set = o.get_mut();
            for id in ids {
                set.remove(id);
            }
            if set.members.is_empty() {
                o.remove();
            }
        }
    }

    /// Whether `room` has a recipient here of a user other than `user`.
    pub fn has_co_member(&self, room: &str, user: &str) -> bool {
        self.room_shard(room)
            .read()
            .get(room)
            .is_some_and(|e| e.members.values().any(|r| r.user() != user))
    }

    /// Whether the user has a recipient on this instance.
    pub fn is_local(&self, user: &str) -> bool {
        self.user_shard(user).read().contains_key(user)
    }

    /// The user (if it has local sessions) is now a member of `room`, which has `members`
    /// members (if the caller knows; a known count is kept over an unknown one).
    pub fn joined(&self, user: &str, room: &str, members: Option<u64>) {
        let mut users = self.user_shard(user).write();
        let Some(entry) = users.get_mut(user) else {
            return;
        };
        if let Some(known) = entry.rooms.get_mut(room) {
            if members.is_some() {
                *known = members;
            }
            return;
        }
        let mut rooms = self.room_shard(room).write();
        // A room that has members here already is found without a copy of its name; a
        // new one's name is one `Arc` for both maps.
        let set = match rooms.entry_ref(room) {
            EntryRef::Occupied(o) => o,
            EntryRef::Vacant(v) => v.insert_entry_with_key(room.into(), RoomEntry::default()),
        };
        entry.rooms.insert_new(set.key().clone(), members);
        let set = set.into_mut();
        for (id, r) in &entry.recipients {
            set.insert(*id, r.clone());
        }
    }

    pub fn left(&self, user: &str, room: &str) {
        let mut users = self.user_shard(user).write();
        let Some(entry) = users.get_mut(user) else {
            return;
        };
        if entry.rooms.remove(room).is_none() {
            return;
        }
        let ids: smallvec::SmallVec<[u64; 4]> =
            entry.recipients.iter().map(|(id, _)| *id).collect();
        self.remove_member(room, &ids);
    }

    /// The room's recipients now (one `Arc` per chunk), if it has any here.
    fn snapshot(&self, room: &str) -> Option<Snapshot> {
        self.room_shard(room)
            .read()
            .get(room)
            .map(RoomEntry::snapshot)
    }

    /// Pushes to the target's local sessions; returns how many got it.
    pub fn deliver(&self, target: &Target, push: &Arc<Push>) -> usize {
        let (room, except) = match target {
            Target::Room(room) => (room, None),
            Target::RoomExcept { room, user } => (room, Some(user.as_str())),
            _ => return self.deliver_locked(target, push),
        };
        // The room's shard lock is held only to take the snapshot.
        let Some(snapshot) = self.snapshot(room) else {
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

    /// The rarer targets (a user, co-members, everyone). A user's few sessions are
    /// pushed to under the read lock; co-members and everyone are collected under it
    /// (room snapshots: one `Arc` per chunk; everyone: one pointer per session) and
    /// pushed to with no lock held, so a presence push to a big room or an
    /// announcement to every session never holds up attaches, joins and leaves.
    fn deliver_locked(&self, target: &Target, push: &Arc<Push>) -> usize {
        match target {
            Target::Room(_) | Target::RoomExcept { .. } => unreachable!("snapshot path"),
            Target::User(user) => {
                let users = self.user_shard(user).read();
                users.get(user.as_str()).map_or(0, |e| {
                    for (_, r) in &e.recipients {
                        r.push(push);
                    }
                    e.recipients.len()
                })
            }
            Target::CoMembers { rooms, user } => {
                let snapshots: Vec<Snapshot> =
                    rooms.iter().filter_map(|r| self.snapshot(r)).collect();
                let mut seen = HashSet::new();
                for chunk in snapshots.iter().flatten() {
                    for r in chunk.iter() {
                        if r.user() != user && seen.insert(r.recipient_id()) {
                            r.push(push);
                        }
                    }
                }
                seen.len()
            }
            Target::All => {
                let mut everyone: Vec<Arc<dyn Recipient>> = Vec::new();
                for shard in self.users.iter() {
                    let users = shard.read();
                    for e in users.values() {
                        everyone.extend(e.recipients.iter().map(|(_, r)| r.clone()));
                    }
                }
                for r in &everyone {
                    r.push(push);
                }
                everyone.len()
            }
        }
    }

    /// Number of local recipients of `room` (for tests and metrics).
    pub fn room_size(&self, room: &str) -> usize {
        self.room_shard(room)
            .read()
            .get(room)
            .map_or(0, |s| s.members.len())
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
        hub.joined("a", "r", None);
        assert_eq!(hub.deliver(&room, &push), 1);
        hub.attach(b.clone());
        hub.joined("b", "r", None);
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

    /// The last detach hands back the user's rooms with the member counts last told: a
    /// join with a count updates it, one without (a join on another instance) keeps a
    /// known count, a left room is gone; an earlier detach hands back nothing.
    #[test]
    fn the_last_detach_returns_the_rooms_with_their_counts() {
        let hub = Hub::new();
        hub.attach(counter(1, "a"));
        hub.attach(counter(2, "a"));
        hub.joined("a", "small", Some(3));
        hub.joined("a", "small", None);
        hub.joined("a", "grown", Some(2));
        hub.joined("a", "grown", Some(900));
        hub.joined("a", "remote", None);
        hub.joined("a", "gone", Some(5));
        hub.left("a", "gone");
        // Not attached here: nothing is recorded for b.
        hub.joined("b", "small", Some(4));
        assert_eq!(hub.detach("a", 1), None, "a still has a session");
        let mut rooms: Vec<_> = hub.detach("a", 2).unwrap().into_iter().collect();
        rooms.sort();
        assert_eq!(
            rooms,
            [
                ("grown".into(), Some(900)),
                ("remote".into(), None),
                ("small".into(), Some(3)),
            ]
        );
        assert_eq!(hub.detach("b", 3), None);
    }

    /// A user's rooms past [`KnownRooms::FEW`] move from the list into a map: joins
    /// (with and without a count), leaves and the last detach read the same on either
    /// side of the move; a user in one room keeps it inline (no allocation beside the
    /// user's entry), in no more than a map took.
    #[test]
    fn a_users_rooms_move_from_the_list_to_a_map_unchanged() {
        assert!(std::mem::size_of::<KnownRooms>() <= 48);
        let hub = Hub::new();
        hub.attach(counter(1, "a"));
        let n = 3 * KnownRooms::FEW;
        for i in 0..n {
            hub.joined("a", &format!("r{i}"), Some(i as u64));
            let users = hub.user_shard("a").read();
            let rooms = &users.get("a").unwrap().rooms;
            assert_eq!(rooms.len(), i + 1);
            assert_eq!(
                matches!(rooms.0, RoomList::Many(_)),
                i >= KnownRooms::FEW,
                "{i}"
            );
        }
        // A join without a count keeps the known one; with one, it replaces it.
        hub.joined("a", "r0", None);
        hub.joined("a", "r1", Some(100));
        for i in (0..n).step_by(3) {
            hub.left("a", &format!("r{i}"));
            assert_eq!(hub.room_size(&format!("r{i}")), 0);
        }
        hub.left("a", "never joined");
        let mut rooms: Vec<_> = hub.detach("a", 1).unwrap().into_iter().collect();
        rooms.sort();
        let mut want: Vec<(Arc<str>, Option<u64>)> = (0..n)
            .filter(|i| i % 3 != 0)
            .map(|i| {
                (
                    format!("r{i}").into(),
                    Some(if i == 1 { 100 } else { i as u64 }),
                )
            })
            .collect();
        want.sort();
        assert_eq!(rooms, want);

        // One room: inline, and found, counted and removed as in the map.
        let mut one = KnownRooms::default();
        one.insert_new("r".into(), None);
        assert!(matches!(&one.0, RoomList::Few(list) if !list.spilled()));
        assert_eq!(one.get("r"), Some(&None));
        *one.get_mut("r").unwrap() = Some(2);
        assert_eq!(one.iter().collect::<Vec<_>>(), [(&"r".into(), &Some(2))]);
        assert_eq!(one.remove("r"), Some(Some(2)));
        assert!(one.is_empty());
    }

    /// A user's sessions past the first (the list's inline one): each is delivered to
    /// once, by room and by user, and each detaches alone, from the front, the middle and
    /// the end; a detach of an id the user does not have changes nothing; the last one
    /// hands back the rooms.
    #[test]
    fn a_users_many_sessions_attach_and_detach_alone() {
        let hub = Hub::new();
        let push = Arc::new(Push::new(Kind::Pong(Pong { ts: 1 })));
        let room = Target::Room("r".into());
        let user = Target::User("a".into());
        let sessions: Vec<_> = (1..=5).map(|i| counter(i, "a")).collect();
        assert!(hub.attach(sessions[0].clone()));
        hub.joined("a", "r", Some(1));
        for s in &sessions[1..] {
            assert!(!hub.attach(s.clone()), "not the user's first");
        }
        assert_eq!(hub.deliver(&room, &push), 5);
        assert_eq!(hub.deliver(&user, &push), 5);
        assert_eq!(hub.detach("a", 99), None, "no such session");
        assert_eq!(hub.deliver(&room, &push), 5);
        let mut live = [true; 5];
        for i in [2, 0, 4, 1] {
            assert_eq!(hub.detach("a", sessions[i].id), None, "others remain");
            live[i] = false;
            let n = live.iter().filter(|l| **l).count();
            assert_eq!(hub.deliver(&room, &push), n);
            assert_eq!(hub.deliver(&user, &push), n);
        }
        assert_eq!(hub.detach("a", sessions[2].id), None, "already detached");
        let rooms = hub.detach("a", sessions[3].id).expect("the last session");
        assert_eq!(rooms.get("r"), Some(&Some(1)));
        assert_eq!(hub.deliver(&room, &push), 0);
        assert!(!hub.is_local("a"));
        // Each got every push while attached: 3 before the first detach, then 2 per round.
        let counts: Vec<_> = sessions.iter().map(|s| got(s)).collect();
        assert_eq!(counts, [5, 9, 3, 11, 7]);
    }

    /// A recipient that, when pushed to, checks whether the hub's lock is free (a
    /// writer could take it): what `Target::All` and `CoMembers` push with no lock held.
    struct LockProbe {
        id: u64,
        user: String,
        hub: std::sync::Weak<Hub>,
        pushed_unlocked: AtomicUsize,
        pushed_locked: AtomicUsize,
    }

    impl Recipient for LockProbe {
        fn recipient_id(&self) -> u64 {
            self.id
        }
        fn user(&self) -> &str {
            &self.user
        }
        fn push(&self, _: &Arc<Push>) {
            let hub = self.hub.upgrade().expect("hub alive");
            let free = hub.users.iter().all(|s| s.0.try_write().is_ok())
                && hub.rooms.iter().all(|s| s.0.try_write().is_ok());
            let n = if free {
                &self.pushed_unlocked
            } else {
                &self.pushed_locked
            };
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Everyone (`Target::All`) and co-members get each push once, the pusher's own
    /// sessions excepted for co-members, and the pushes happen with the hub's lock free:
    /// an announcement to every session does not hold up attaches and joins.
    #[test]
    fn everyone_and_co_members_are_pushed_outside_the_lock() {
        let hub = Arc::new(Hub::new());
        let push = Arc::new(Push::new(Kind::Pong(Pong { ts: 1 })));
        let probes: Vec<Arc<LockProbe>> = (0..CHUNK as u64 + 10)
            .map(|i| {
                Arc::new(LockProbe {
                    id: i,
                    // Two sessions per user.
                    user: format!("u{}", i / 2),
                    hub: Arc::downgrade(&hub),
                    pushed_unlocked: AtomicUsize::new(0),
                    pushed_locked: AtomicUsize::new(0),
                })
            })
            .collect();
        for p in &probes {
            hub.attach(p.clone());
            // Even users in room a, every user in room b: co-members of u0 in a and b.
            hub.joined(&p.user, "b", None);
            if (p.id / 2) % 2 == 0 {
                hub.joined(&p.user, "a", None);
            }
        }
        let n = probes.len();
        assert_eq!(hub.deliver(&Target::All, &push), n);
        let co = Target::CoMembers {
            rooms: vec!["a".into(), "b".into()],
            user: "u0".into(),
        };
        assert_eq!(hub.deliver(&co, &push), n - 2);
        for p in &probes {
            let want = if p.user == "u0" { 1 } else { 2 };
            assert_eq!(
                p.pushed_unlocked.load(Ordering::Relaxed),
                want,
                "session {}",
                p.id
            );
            assert_eq!(p.pushed_locked.load(Ordering::Relaxed), 0);
        }
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
            hub.joined(m.user(), "big", None);
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
        let before = hub.snapshot("big").unwrap();
        hub.left(members[7].user(), "big");
        present[7] = false;
        let after = hub.snapshot("big").unwrap();
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
            hub.joined(members[i].user(), "big", None);
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
