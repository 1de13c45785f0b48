//! Delivery: who receives a push ([`Target`]), what receives it ([`Recipient`], which
//! sessions implement), and the local fan-out index ([`Hub`]): which sessions on this
//! instance belong to which users, and which users with local sessions are members of
//! which rooms. `chat` decides targets; `broker` carries (target, push) between
//! instances; the hub delivers them here. This module knows neither of them.
//!
//! The hub only knows [`Recipient`]s (sessions implement it); it never awaits and never
//! touches a socket: delivering is a non-blocking push into each session's queue, done
//! under a read lock so deliveries to different rooms run in parallel.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
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

#[derive(Default)]
struct Inner {
    users: HashMap<String, UserEntry>,
    rooms: HashMap<String, Recipients>,
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
                set.swap_remove(&recipient_id);
                if set.is_empty() {
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
                set.swap_remove(id);
            }
            if set.is_empty() {
                inner.rooms.remove(room);
            }
        }
    }

    /// Pushes to the target's local sessions; returns how many got it.
    pub fn deliver(&self, target: &Target, push: &Arc<Push>) -> usize {
        let inner = self.read();
        let all = |set: &Recipients, except: Option<&str>| {
            let mut n = 0;
            for r in set.values() {
                if except != Some(r.user()) {
                    r.push(push);
                    n += 1;
                }
            }
            n
        };
        match target {
            Target::Room(room) => inner.rooms.get(room).map_or(0, |s| all(s, None)),
            Target::RoomExcept { room, user } => {
                inner.rooms.get(room).map_or(0, |s| all(s, Some(user)))
            }
            Target::User(user) => inner
                .users
                .get(user)
                .map_or(0, |e| all(&e.recipients, None)),
            Target::CoMembers { rooms, user } => {
                let mut seen = HashSet::new();
                for set in rooms.iter().filter_map(|r| inner.rooms.get(r)) {
                    for (id, r) in set {
                        if r.user() != user && seen.insert(*id) {
                            r.push(push);
                        }
                    }
                }
                seen.len()
            }
            Target::All => inner.users.values().map(|e| all(&e.recipients, None)).sum(),
        }
    }

    /// Number of local recipients of `room` (for tests and metrics).
    pub fn room_size(&self, room: &str) -> usize {
        self.read().rooms.get(room).map_or(0, |s| s.len())
    }
}
