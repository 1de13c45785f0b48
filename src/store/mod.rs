//! The durable log behind chat: per-room messages with gap-free sequence numbers,
//! idempotent appends, and room membership.
//!
//! `chat` talks only to the [`Store`] trait. Backends: [`memory::MemoryStore`] (tests and
//! the in-process default until the SQLite store lands).

pub mod memory;

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;

use crate::proto::{Message, RoomState};

/// A message to append; the store assigns `seq`.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub room: String,
    pub sender: String,
    pub client_msg_id: String,
    pub body: String,
    pub metadata: BTreeMap<String, String>,
    pub ts: i64,
}

/// The result of an append.
#[derive(Debug, Clone)]
pub struct Appended {
    pub message: Arc<Message>,
    /// True when (room, sender, client_msg_id) was appended before: `message` is the
    /// original, nothing new was written.
    pub duplicate: bool,
}

/// Which part of a room's log to read.
#[derive(Debug, Clone, Copy)]
pub enum Range {
    /// Messages with seq > `after`, oldest first.
    After(u64),
    /// The newest messages with seq < `before` (`u64::MAX` = from the end), oldest first.
    Before(u64),
}

/// A page of a room's log, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub messages: Vec<Arc<Message>>,
    /// More messages exist past this page in the requested direction.
    pub more: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("backend: {0}")]
    Backend(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Appends to the room's log (creating the room), or returns the original message if
    /// this (room, sender, client_msg_id) was appended before. Durable when it returns.
    async fn append(&self, message: NewMessage) -> Result<Appended, StoreError>;
    /// Reads at most `limit` messages.
    async fn history(&self, room: &str, range: Range, limit: usize) -> Result<Page, StoreError>;
    /// The room's last seq (0 for an empty or unknown room).
    async fn last_seq(&self, room: &str) -> Result<u64, StoreError>;
    /// Makes `user` a member; returns the room's last seq.
    async fn join(&self, room: &str, user: &str) -> Result<u64, StoreError>;
    /// Removes `user` from the room; returns whether it was a member.
    async fn leave(&self, room: &str, user: &str) -> Result<bool, StoreError>;
    async fn is_member(&self, room: &str, user: &str) -> Result<bool, StoreError>;
    /// The rooms `user` belongs to, with each room's last seq, sorted by name.
    async fn rooms_of(&self, user: &str) -> Result<Vec<RoomState>, StoreError>;
}
