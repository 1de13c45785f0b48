//! The file index: what the store knows about uploaded files (owner, sniffed type, size,
//! hash, image facts), which rooms each was posted to, and who may read it. The bytes
//! themselves live in the blob store of the files layer above, never here.
//!
//! A file becomes *referenced* when a message that attaches it is appended (in the same
//! transaction as the message, see `sqlite::append_in`); files that stay unreferenced
//! past `files.orphan_ttl` are listed by [`FileIndex::orphans`] for cleanup.

use async_trait::async_trait;

use super::StoreResult;
use crate::proto::Attachment;

/// One uploaded file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub id: String,
    pub owner: String,
    /// Name from the upload (may be empty).
    pub name: String,
    pub content_type: String,
    pub size: u64,
    /// Hex SHA-256 of the bytes.
    pub sha256: String,
    pub width: u32,
    pub height: u32,
    pub blurhash: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

impl FileRecord {
    /// The file as an attachment; `name` replaces the upload's name when not empty.
    pub fn attachment(&self, name: &str) -> Attachment {
        Attachment {
            file_id: self.id.clone(),
            name: if name.is_empty() { &self.name } else { name }.to_string(),
            content_type: self.content_type.clone(),
            size: self.size,
            sha256: self.sha256.clone(),
            width: self.width,
            height: self.height,
            blurhash: self.blurhash.clone(),
        }
    }
}

/// What happened to an [`FileIndex::insert_file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    Ok,
    /// The owner's files would exceed the quota; nothing was written.
    OverQuota,
}

#[async_trait]
pub trait FileIndex: Send + Sync + 'static {
    /// Records a stored upload, unless the owner's total size would pass `quota` bytes.
    async fn insert_file(&self, file: FileRecord, quota: u64) -> StoreResult<Inserted>;
    async fn file(&self, id: &str) -> StoreResult<Option<FileRecord>>;
    /// The total size of `owner`'s files.
    async fn bytes_of(&self, owner: &str) -> StoreResult<u64>;
    /// Whether `user` may read the file: its owner, or a member of a room it was posted to.
    async fn may_read(&self, id: &str, user: &str) -> StoreResult<bool>;
    /// Forgets the file (its room links too); true if it existed. Messages that attached
    /// it keep their attachment entry, whose download then answers 404. With
    /// `only_orphan`, only a file no message attached (so a send racing the cleanup wins).
    async fn delete_file(&self, id: &str, only_orphan: bool) -> StoreResult<bool>;
    /// Up to `limit` ids of files never attached to a message and created before
    /// `before_ms`.
    async fn orphans(&self, before_ms: i64, limit: usize) -> StoreResult<Vec<String>>;
}
