//! An in-memory [`Store`]: the whole log in a map behind one mutex. Nothing survives a
//! restart; used by tests and as the embedded default until the SQLite store exists.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};

use async_trait::async_trait;

use super::{Appended, NewMessage, Page, Range, Store, StoreError};
use crate::proto::{Message, RoomState};

#[derive(Default)]
struct RoomLog {
    /// `messages[i].seq == i + 1`.
    messages: Vec<Arc<Message>>,
    /// (sender, client_msg_id) → seq.
    idempotency: HashMap<(String, String), u64>,
    members: BTreeSet<String>,
}

#[derive(Default)]
struct Inner {
    rooms: HashMap<String, RoomLog>,
    user_rooms: HashMap<String, BTreeSet<String>>,
}

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-written log entry (each
        // mutation is a single push/insert), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn append(&self, m: NewMessage) -> Result<Appended, StoreError> {
        let mut inner = self.lock();
        let log = inner.rooms.entry(m.room.clone()).or_default();
        let key = (m.sender.clone(), m.client_msg_id.clone());
        if let Some(&seq) = log.idempotency.get(&key) {
            let message = log.messages[(seq - 1) as usize].clone();
            return Ok(Appended {
                message,
                duplicate: true,
            });
        }
        let seq = log.messages.len() as u64 + 1;
        let message = Arc::new(Message {
            room: m.room,
            seq,
            sender: m.sender,
            client_msg_id: m.client_msg_id,
            body: m.body,
            metadata: m.metadata,
            ts: m.ts,
        });
        log.messages.push(message.clone());
        log.idempotency.insert(key, seq);
        Ok(Appended {
            message,
            duplicate: false,
        })
    }

    async fn history(&self, room: &str, range: Range, limit: usize) -> Result<Page, StoreError> {
        let inner = self.lock();
        let Some(log) = inner.rooms.get(room) else {
            return Ok(Page::default());
        };
        let len = log.messages.len();
        let (start, end, more) = match range {
            Range::After(after) => {
                let start = (after as usize).min(len);
                let end = start.saturating_add(limit).min(len);
                (start, end, end < len)
            }
            Range::Before(before) => {
                let end = (before.saturating_sub(1) as usize).min(len);
                let start = end.saturating_sub(limit);
                (start, end, start > 0)
            }
        };
        Ok(Page {
            messages: log.messages[start..end].to_vec(),
            more,
        })
    }

    async fn last_seq(&self, room: &str) -> Result<u64, StoreError> {
        Ok(self
            .lock()
            .rooms
            .get(room)
            .map_or(0, |l| l.messages.len() as u64))
    }

    async fn join(&self, room: &str, user: &str) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let log = inner.rooms.entry(room.to_string()).or_default();
        log.members.insert(user.to_string());
        let last = log.messages.len() as u64;
        inner
            .user_rooms
            .entry(user.to_string())
            .or_default()
            .insert(room.to_string());
        Ok(last)
    }

    async fn leave(&self, room: &str, user: &str) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let was = inner
            .rooms
            .get_mut(room)
            .is_some_and(|l| l.members.remove(user));
        if let Some(rooms) = inner.user_rooms.get_mut(user) {
            rooms.remove(room);
        }
        Ok(was)
    }

    async fn is_member(&self, room: &str, user: &str) -> Result<bool, StoreError> {
        Ok(self
            .lock()
            .rooms
            .get(room)
            .is_some_and(|l| l.members.contains(user)))
    }

    async fn rooms_of(&self, user: &str) -> Result<Vec<RoomState>, StoreError> {
        let inner = self.lock();
        let Some(rooms) = inner.user_rooms.get(user) else {
            return Ok(Vec::new());
        };
        Ok(rooms
            .iter()
            .map(|room| RoomState {
                room: room.clone(),
                last_seq: inner.rooms.get(room).map_or(0, |l| l.messages.len() as u64),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str) -> NewMessage {
        NewMessage {
            room: "r".into(),
            sender: "u".into(),
            client_msg_id: id.into(),
            body: id.into(),
            metadata: Default::default(),
            ts: 0,
        }
    }

    #[tokio::test]
    async fn seqs_are_gap_free_and_appends_idempotent() {
        let s = MemoryStore::new();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            let a = s.append(msg(id)).await.unwrap();
            assert_eq!(a.message.seq, i as u64 + 1);
            assert!(!a.duplicate);
        }
        let again = s.append(msg("b")).await.unwrap();
        assert!(again.duplicate);
        assert_eq!(again.message.seq, 2);
        assert_eq!(s.last_seq("r").await.unwrap(), 3);
    }

    #[tokio::test]
    async fn history_pages_in_both_directions() {
        let s = MemoryStore::new();
        for i in 0..10 {
            s.append(msg(&i.to_string())).await.unwrap();
        }
        let seqs = |p: &Page| p.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
        let p = s.history("r", Range::After(3), 4).await.unwrap();
        assert_eq!((seqs(&p), p.more), (vec![4, 5, 6, 7], true));
        let p = s.history("r", Range::After(8), 4).await.unwrap();
        assert_eq!((seqs(&p), p.more), (vec![9, 10], false));
        let p = s.history("r", Range::Before(u64::MAX), 3).await.unwrap();
        assert_eq!((seqs(&p), p.more), (vec![8, 9, 10], true));
        let p = s.history("r", Range::Before(3), 5).await.unwrap();
        assert_eq!((seqs(&p), p.more), (vec![1, 2], false));
    }
}
