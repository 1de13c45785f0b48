//! The durable log behind chat: per-room messages with gap-free sequence numbers,
//! idempotent appends, rooms, membership and read markers.
//!
//! `chat` talks only to the [`Store`] trait. Backends: [`sqlite::SqliteStore`] (a WAL file
//! with group commit; or a private in-memory database for tests and throwaway runs), the
//! single-instance default; [`postgres::PostgresStore`], one log shared by several
//! instances (seq fixed at commit under a per-room row lock, batched appends).
//! [`open`] builds the one `store.backend` names.
//! [`file_index`]: the index of uploaded files (a supertrait of [`Store`]).
//!
//! A backend keeps its own SQL and nothing else: reading rows into messages, rooms,
//! markers and files, and paging history, is `rows` (shared). What a backend must do is
//! `tests/store_contract.rs`: every property, run on every backend, plus a check that the
//! backends' migrated schemas agree.

pub mod file_index;
pub mod postgres;
mod rows;
pub mod sqlite;

use std::{collections::BTreeMap, future::Future, pin::Pin, sync::Arc};

use async_trait::async_trait;

use crate::proto::{Attachment, Message, RoomState};
pub use file_index::{FileIndex, FileRecord, Inserted};

/// A message to append; the store assigns `seq`.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub room: String,
    pub sender: String,
    pub client_msg_id: String,
    pub body: String,
    pub metadata: BTreeMap<String, String>,
    pub ts: i64,
    /// Resolved attachments (the chat layer checked that `sender` uploaded each); the
    /// append records that each file was posted to `room`.
    pub attachments: Vec<Attachment>,
}

/// A room to create, with its first member.
#[derive(Debug, Clone, Copy)]
pub struct NewRoom<'a> {
    pub name: &'a str,
    pub creator: &'a str,
    pub private: bool,
}

impl<'a> NewRoom<'a> {
    pub fn public(name: &'a str, creator: &'a str) -> Self {
        Self {
            name,
            creator,
            private: false,
        }
    }

    pub fn private(name: &'a str, creator: &'a str) -> Self {
        Self {
            name,
            creator,
            private: true,
        }
    }
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

/// What the store knows about a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomMeta {
    pub private: bool,
    pub last_seq: u64,
    pub members: u64,
}

/// A read marker after `set_read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadMarker {
    /// The marker (the highest seq read).
    pub seq: u64,
    /// Messages after the marker.
    pub unread: u64,
    /// Whether this call moved it (false: it was there already, or the request was
    /// behind it); only a move is worth a receipt.
    pub moved: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("backend: {0}")]
    Backend(String),
    #[error("room {0:?} does not exist")]
    NoSuchRoom(String),
    /// A membership change would take `user` past `max` rooms (`limits.max_rooms_per_user`,
    /// checked and applied in one step by the store, so concurrent joins cannot overshoot).
    #[error("{user} is a member of {max} rooms already (limits.max_rooms_per_user)")]
    TooManyRooms { user: String, max: u64 },
}

/// What every store call returns.
pub type StoreResult<T> = Result<T, StoreError>;

pub type AppendFuture = Pin<Box<dyn Future<Output = StoreResult<Appended>> + Send>>;

#[async_trait]
pub trait Store: FileIndex + Send + Sync + 'static {
    /// Appends to the room's log, or returns the original message if this (room, sender,
    /// client_msg_id) was appended before. The sender's read marker moves to the new
    /// message. Durable when the future resolves.
    ///
    /// The append's place in the room's order is fixed when `append` is *called* (not when
    /// the future is first polled): appends called one after another get increasing seqs.
    /// Chat relies on this to publish in seq order while appends are in flight.
    ///
    /// With several instances on one shared store (PostgreSQL) this holds per instance:
    /// one instance's appends to a room get increasing seqs in call order, and all
    /// instances' appends together form one gap-free order (the store fixes seq at
    /// commit), but another instance's messages may take seqs between two of this
    /// instance's. So one instance's publishes leave in seq order *of its own messages*;
    /// receivers that merge several instances' publishes must order by seq themselves.
    fn append(&self, message: NewMessage) -> AppendFuture;

    /// Reads at most `limit` messages.
    async fn history(&self, room: &str, range: Range, limit: usize) -> StoreResult<Page>;
    async fn room(&self, room: &str) -> StoreResult<Option<RoomMeta>>;
    /// The room (as [`Store::room`]) and whether `user` is a member of it, in one read
    /// (a join checks both; every reconnect joins again).
    async fn room_for(&self, room: &str, user: &str) -> StoreResult<Option<(RoomMeta, bool)>>;
    /// Creates the room with its creator as the first member; false if the name is taken.
    ///
    /// `max_rooms` (here and in `ensure_dm` and `join`; 0 = no cap): a user who would
    /// become a member of more rooms than this is refused with
    /// [`StoreError::TooManyRooms`] and nothing changes. The count and the insert are one
    /// atomic step, across instances too, so concurrent joins cannot overshoot.
    async fn create_room(&self, room: NewRoom<'_>, max_rooms: u64) -> StoreResult<bool>;
    /// Creates (if needed) the private room `room` whose members are exactly `a` and `b`.
    async fn ensure_dm(&self, room: &str, a: &str, b: &str, max_rooms: u64) -> StoreResult<()>;
    /// Makes `user` a member (creating a public room if it does not exist); returns the
    /// room as it is after the join. Permission checks are the caller's. Joining a room
    /// the user is in already is never refused by `max_rooms`.
    async fn join(&self, room: &str, user: &str, max_rooms: u64) -> StoreResult<RoomMeta>;
    /// Removes `user` from the room; returns whether it was a member.
    async fn leave(&self, room: &str, user: &str) -> StoreResult<bool>;
    async fn is_member(&self, room: &str, user: &str) -> StoreResult<bool>;
    async fn members(&self, room: &str) -> StoreResult<Vec<String>>;
    /// The rooms `user` belongs to, with last seq, read marker and unread count, by name.
    async fn rooms_of(&self, user: &str) -> StoreResult<Vec<RoomState>>;
    /// The room browser: at most `limit` public rooms (not private ones, so no direct
    /// messages either) whose names sort after `after` in byte order, by name, each with
    /// its last seq and member count (no read marker: the caller need not be a member).
    async fn public_rooms(&self, after: &str, limit: usize) -> StoreResult<Vec<RoomState>>;
    /// Whether `a` and `b` are members of one room (a direct-message room counts).
    async fn share_a_room(&self, a: &str, b: &str) -> StoreResult<bool>;
    /// Moves the user's read marker forward to `seq` (capped at the room's last seq);
    /// returns the marker, the unread count after it and whether it moved, or `None` if
    /// not a member.
    async fn set_read(&self, room: &str, user: &str, seq: u64) -> StoreResult<Option<ReadMarker>>;

    /// Whether the backend is reachable, as of its last check (cheap: no I/O here; for
    /// `/readyz`). An embedded store is always reachable.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Opens the store `config.backend` names (creating and migrating its schema).
pub async fn open(config: &crate::config::StoreConfig) -> StoreResult<Arc<dyn Store>> {
    use crate::config::StoreBackend;
    Ok(match config.backend {
        StoreBackend::Sqlite => Arc::new(sqlite::SqliteStore::open(config)?),
        StoreBackend::Postgres => Arc::new(postgres::PostgresStore::open(config).await?),
    })
}

/// The direct-message room of two users: `dm:<a>:<b>` with the ids sorted.
pub fn dm_room(a: &str, b: &str) -> String {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    format!("dm:{x}:{y}")
}

/// For a DM room, the member that is not `user`.
pub fn dm_peer(room: &str, user: &str) -> Option<String> {
    let rest = room.strip_prefix("dm:")?;
    let (a, b) = rest.split_once(':')?;
    Some(if a == user { b } else { a }.to_string())
}
