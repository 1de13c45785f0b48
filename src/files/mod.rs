//! Attachments: uploaded files and their bytes.
//!
//! [`Files`] owns the upload path (streamed into the blob store with the size limit,
//! quota and rate enforced while the bytes arrive; type sniffed, SHA-256 and image facts
//! recorded), who may read a file (its uploader, and members of a room it was posted to),
//! ranged reads, deletion, signed URLs, and the cleanup of uploads no message attached.
//! It knows nothing of HTTP: `transport::files` maps requests onto it.
//!
//! The bytes live behind `object_store`'s [`ObjectStore`] trait: a local directory by
//! default, or an S3-compatible bucket shared by many instances. The index (owner, type,
//! size, hash, rooms) is the store's [`crate::store::FileIndex`].
//!
//! - [`sniff`]: the content type and image facts from the bytes;
//! - [`signing`]: HMAC-signed download URLs;
//! - [`limiter`]: the per-user upload rate;
//! - [`multipart`]: a `multipart/form-data` upload's one file part.

pub mod limiter;
pub mod multipart;
pub mod signing;
pub mod sniff;

use std::{ops::Range, sync::Arc};

use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream::BoxStream};
use object_store::{
    GetOptions, GetRange, GetResultPayload, ObjectStore, aws::AmazonS3Builder, buffered::BufWriter,
    local::LocalFileSystem, path::Path as ObjectPath,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;

use crate::{
    auth::now_ms,
    config::{FileBackend, FilesConfig},
    proto::{self, ErrorCode},
    store::{FileRecord, Inserted, Store, StoreError},
};
use limiter::UploadLimiter;
use multipart::{FilePart, MultipartError};
use signing::UrlSigner;

/// Bytes kept from the start of an upload for sniffing (type, image header).
const HEAD_BYTES: usize = 64 * 1024;
/// Local backend: bytes buffered before they are written out (the filesystem has no
/// minimum part size, so uploads stay small in memory).
const LOCAL_PART_BYTES: usize = 1024 * 1024;
/// Local backend: bytes read per chunk of a download.
const LOCAL_READ_BYTES: usize = 256 * 1024;
/// An upload that sends nothing for this long is aborted (and leaves nothing behind).
const UPLOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(60);
/// Longest file name kept from an upload.
const MAX_NAME_BYTES: usize = 255;

/// A failed file operation; `code()` is the wire code.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// No such file, or not one this user may see: the same answer either way, so ids
    /// cannot be probed.
    #[error("file not found")]
    NotFound,
    #[error("the upload is larger than {0} bytes")]
    TooLarge(u64),
    #[error("the upload would take your files past the quota of {0} bytes")]
    QuotaExceeded(u64),
    #[error("too many uploads; retry in {} ms", .0.as_millis())]
    RateLimited(std::time::Duration),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Multipart(#[from] MultipartError),
    #[error("range not satisfiable")]
    BadRange,
    #[error("storage: {0}")]
    Storage(#[from] object_store::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl FileError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FileError::NotFound => ErrorCode::NotFound,
            FileError::TooLarge(_) => ErrorCode::FileTooLarge,
            FileError::QuotaExceeded(_) => ErrorCode::QuotaExceeded,
            FileError::RateLimited(_) => ErrorCode::RateLimited,
            FileError::InvalidArgument(_) | FileError::Multipart(_) => ErrorCode::InvalidArgument,
            FileError::BadRange => ErrorCode::RangeNotSatisfiable,
            FileError::Storage(_) | FileError::Store(_) => ErrorCode::Internal,
        }
    }

    pub fn to_proto(&self) -> proto::Error {
        let message = match self {
            // Internal details stay in the server log.
            FileError::Storage(_) | FileError::Store(_) => "internal error".to_string(),
            other => other.to_string(),
        };
        let retry_after_ms = match self {
            // Whole milliseconds, at least 1 (0 means "no hint" on the wire).
            FileError::RateLimited(d) => d.as_millis().clamp(1, u32::MAX as u128) as u32,
            _ => 0,
        };
        proto::Error {
            code: self.code() as i32,
            message,
            retry_after_ms,
        }
    }
}

/// A signed download URL.
pub struct SignedUrl {
    /// Path and query: `/api/v1/files/{id}?u=..&exp=..&sig=..`.
    pub url: String,
    /// Unix milliseconds.
    pub expires_at: i64,
}

pub struct Files {
    blobs: Arc<dyn ObjectStore>,
    /// Where the bytes go in `blobs`: `<root>/files/<id>`.
    root: ObjectPath,
    index: Arc<dyn Store>,
    config: FilesConfig,
    part_bytes: usize,
    signer: UrlSigner,
    limiter: UploadLimiter,
    /// Image decodes (for BlurHashes) at once (two): each holds about 4 bytes a pixel (8
    /// for 16-bit colour) of at most `files.max_image_pixels`, and never more than
    /// `sniff::MAX_DECODE_BYTES`.
    decodes: tokio::sync::Semaphore,
}

/// A new random file id: 128 bits, hex.
fn new_id() -> String {
    hex(&rand::random::<[u8; 16]>())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Ids are what `new_id` makes; anything else is not a file (and never reaches storage).
fn valid_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Unicode characters that reorder the text around them (bidirectional embeddings,
/// overrides, isolates and marks) or break lines: a name such as `invoice\u{202E}fdp.exe`
/// would display as `invoiceexe.pdf`.
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{202A}'..='\u{202E}'
            | '\u{2066}'..='\u{2069}'
            | '\u{200E}'
            | '\u{200F}'
            | '\u{061C}'
            | '\u{2028}'
            | '\u{2029}'
    )
}

/// Makes a file name safe to show and to save as: the last path component only (no `/`
/// or `\\`, never `.` or `..`), no control characters (C0, DEL, C1: CR, LF, NUL, ESC…),
/// no bidi controls or line separators, at most 255 bytes. Upload names (query or
/// multipart `filename`) and the names a sender gives attachments both go through it.
pub fn clean_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let mut out: String = base
        .chars()
        .filter(|c| !c.is_control() && !invisible(*c))
        .collect();
    while out.len() > MAX_NAME_BYTES {
        out.pop();
    }
    if out.trim_matches('.').is_empty() {
        out.clear();
    }
    out
}

impl Files {
    fn blob_path(&self, id: &str) -> ObjectPath {
        self.root.child("files").child(id)
    }

    /// Opens the configured blob store. The local directory is created with the first
    /// upload, so a server that never stores a file leaves no trace on disk.
    pub fn open(config: &FilesConfig, index: Arc<dyn Store>) -> Result<Self, FileError> {
        let (blobs, root, part_bytes): (Arc<dyn ObjectStore>, _, _) = match config.backend {
            FileBackend::Local => {
                let dir = std::path::absolute(&config.dir).map_err(|e| {
                    FileError::InvalidArgument(format!("files.dir {}: {e}", config.dir))
                })?;
                let root = ObjectPath::from_absolute_path(&dir)
                    .map_err(|e| FileError::Storage(e.into()))?;
                (Arc::new(LocalFileSystem::new()), root, LOCAL_PART_BYTES)
            }
            FileBackend::S3 => {
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(&config.s3_bucket)
                    .with_region(&config.s3_region)
                    .with_allow_http(config.s3_allow_http);
                if !config.s3_endpoint.is_empty() {
                    b = b.with_endpoint(&config.s3_endpoint);
                }
                if !config.s3_access_key_id.is_empty() {
                    b = b
                        .with_access_key_id(&config.s3_access_key_id)
                        .with_secret_access_key(&config.s3_secret_access_key);
                }
                (
                    Arc::new(b.build()?),
                    ObjectPath::default(),
                    config.part_bytes as usize,
                )
            }
        };
        Ok(Self {
            blobs,
            root,
            index,
            part_bytes,
            signer: UrlSigner::new(&config.url_secret),
            limiter: UploadLimiter::new(config.uploads_per_minute),
            decodes: tokio::sync::Semaphore::new(2),
            config: config.clone(),
        })
    }

    /// Streams an upload by `owner` (the body is the file's bytes) into storage and
    /// records it. `declared` is the request's Content-Length, if any: a too-large upload
    /// is refused before its first byte. A refused or failed upload leaves nothing behind.
    pub async fn upload<S, E>(
        &self,
        owner: &str,
        name: &str,
        declared: Option<u64>,
        body: S,
    ) -> Result<FileRecord, FileError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let room = self.admit(owner, declared).await?;
        self.store(owner, name, room, body).await
    }

    /// As [`Files::upload`] for a `multipart/form-data` body with `boundary`: its one
    /// file part is stored (streamed, with the same limits), never the envelope. The
    /// name is `name` if not empty, else the part's `filename`.
    pub async fn upload_form<S, E>(
        &self,
        owner: &str,
        name: &str,
        boundary: &str,
        declared: Option<u64>,
        body: S,
    ) -> Result<FileRecord, FileError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        // The file is at least the body less the largest envelope.
        let least = declared.map(|n| n.saturating_sub(multipart::ENVELOPE_BYTES));
        let room = self.admit(owner, least).await?;
        let part = FilePart::open(body, boundary, UPLOAD_IDLE).await?;
        let name = if name.is_empty() {
            part.filename.clone()
        } else {
            name.to_string()
        };
        self.store(owner, &name, room, part.into_stream()).await
    }

    /// Counts an upload against the owner's rate and checks a declared size; the bytes
    /// left in the owner's quota.
    async fn admit(&self, owner: &str, declared: Option<u64>) -> Result<u64, FileError> {
        self.limiter.allow(owner).map_err(FileError::RateLimited)?;
        let quota = self.config.user_quota_bytes;
        let room = quota.saturating_sub(self.index.bytes_of(owner).await?);
        if let Some(e) = declared.and_then(|n| self.too_big(n, room)) {
            return Err(e);
        }
        Ok(room)
    }

    /// Whether a file of `n` bytes is over the size limit or the `room` left in quota.
    fn too_big(&self, n: u64, room: u64) -> Option<FileError> {
        let (max, quota) = (self.config.max_file_bytes, self.config.user_quota_bytes);
        if n > max {
            Some(FileError::TooLarge(max))
        } else if n > room {
            Some(FileError::QuotaExceeded(quota))
        } else {
            None
        }
    }

    /// Whether an image of this size may be decoded (for its BlurHash).
    fn decodable(&self, (w, h): (u32, u32)) -> bool {
        u64::from(w) * u64::from(h) <= self.config.max_image_pixels
    }

    /// Streams `body` into storage and records it (see [`Files::upload`]).
    async fn store<S, E>(
        &self,
        owner: &str,
        name: &str,
        room: u64,
        body: S,
    ) -> Result<FileRecord, FileError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let quota = self.config.user_quota_bytes;
        let too_big = |n: u64| self.too_big(n, room);

        let id = new_id();
        let path = self.blob_path(&id);
        let mut writer =
            BufWriter::with_capacity(self.blobs.clone(), path.clone(), self.part_bytes)
                .with_max_concurrency(2);
        let mut hasher = Sha256::new();
        let mut head: Vec<u8> = Vec::with_capacity(4096);
        // The whole file, kept only while it may still become a BlurHash.
        let mut whole: Option<Vec<u8>> = Some(Vec::new());
        let mut size: u64 = 0;
        let mut body = std::pin::pin!(body);
        let streamed: Result<(), FileError> = async {
            loop {
                let next = tokio::time::timeout(UPLOAD_IDLE, body.next()).await;
                let Ok(next) = next else {
                    return Err(FileError::InvalidArgument(format!(
                        "the upload sent nothing for {}s",
                        UPLOAD_IDLE.as_secs()
                    )));
                };
                let Some(chunk) = next else { break };
                let chunk = chunk
                    .map_err(|e| FileError::InvalidArgument(format!("reading the upload: {e}")))?;
                size += chunk.len() as u64;
                if let Some(e) = too_big(size) {
                    return Err(e);
                }
                hasher.update(&chunk);
                if head.len() < HEAD_BYTES {
                    let take = (HEAD_BYTES - head.len()).min(chunk.len());
                    head.extend_from_slice(&chunk[..take]);
                }
                if let Some(w) = &mut whole {
                    let is_image =
                        head.len() < 16 || sniff::content_type(&head).starts_with("image/");
                    // Too many pixels to decode: known from the header, drop it early.
                    let too_many = sniff::dimensions(&head).is_some_and(|d| !self.decodable(d));
                    if size > self.config.blurhash_max_bytes || !is_image || too_many {
                        whole = None;
                    } else {
                        w.extend_from_slice(&chunk);
                    }
                }
                writer.write_all(&chunk).await.map_err(|e| {
                    FileError::Storage(object_store::Error::Generic {
                        store: "blob",
                        source: Box::new(e),
                    })
                })?;
            }
            writer.shutdown().await.map_err(|e| {
                FileError::Storage(object_store::Error::Generic {
                    store: "blob",
                    source: Box::new(e),
                })
            })?;
            Ok(())
        }
        .await;
        if let Err(e) = streamed {
            if let Err(abort) = writer.abort().await {
                tracing::warn!(error = %abort, file = %id, "aborting an upload failed");
            }
            // A small upload may have been written in one piece before the error.
            let _ = self.blobs.delete(&path).await;
            return Err(e);
        }

        let content_type = sniff::content_type(&head);
        let (mut width, mut height, mut blurhash) = (0, 0, String::new());
        if content_type.starts_with("image/") {
            // The header is usually in the first 64 KiB; else it is in the whole file.
            let dims =
                sniff::dimensions(&head).or_else(|| whole.as_deref().and_then(sniff::dimensions));
            if let Some((w, h)) = dims {
                (width, height) = (w, h);
            }
            // Decoding costs 4 bytes a pixel (a 97 KB PNG can claim 25 megapixels, ~97
            // MiB): only images whose header shows at most files.max_image_pixels are
            // decoded. The others keep their width and height, without a BlurHash.
            let decode = dims.is_some_and(|d| self.decodable(d));
            if let Some(bytes) = whole.filter(|w| decode && !w.is_empty()) {
                let _permit = self.decodes.acquire().await;
                let made = tokio::task::spawn_blocking(move || sniff::blurhash(&bytes))
                    .await
                    .ok()
                    .flatten();
                if let Some((w, h, hash)) = made {
                    (width, height, blurhash) = (w, h, hash);
                }
            }
        }
        let record = FileRecord {
            id: id.clone(),
            owner: owner.to_string(),
            name: clean_name(name),
            content_type: content_type.to_string(),
            size,
            sha256: hex(&hasher.finalize()),
            width,
            height,
            blurhash,
            created_at: now_ms(),
        };
        let inserted = self.index.insert_file(record.clone(), quota).await;
        if !matches!(inserted, Ok(Inserted::Ok)) {
            let _ = self.blobs.delete(&path).await;
        }
        match inserted? {
            Inserted::Ok => Ok(record),
            // Concurrent uploads by the same user passed the first check together.
            Inserted::OverQuota => Err(FileError::QuotaExceeded(quota)),
        }
    }

    /// The file, if `user` may read it (uploader, or member of a room it was posted to).
    pub async fn readable(&self, user: &str, id: &str) -> Result<FileRecord, FileError> {
        if !valid_id(id) || !self.index.may_read(id, user).await? {
            return Err(FileError::NotFound);
        }
        self.index.file(id).await?.ok_or(FileError::NotFound)
    }

    /// The bytes `range` (end exclusive; already checked against the size) of a file.
    pub async fn read(
        &self,
        file: &FileRecord,
        range: Range<u64>,
    ) -> Result<BoxStream<'static, Result<Bytes, object_store::Error>>, FileError> {
        if range.is_empty() {
            return Ok(futures_util::stream::empty().boxed());
        }
        let opts = GetOptions {
            range: Some(GetRange::Bounded(range)),
            ..Default::default()
        };
        let got = match self.blobs.get_opts(&self.blob_path(&file.id), opts).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Err(FileError::NotFound),
            Err(e) => return Err(e.into()),
        };
        match got.payload {
            // The local backend hands over the open file: read it in large chunks (its
            // own stream reads 8 KiB per blocking task, a third of the speed).
            GetResultPayload::File(file, _) => {
                use tokio::io::{AsyncReadExt, AsyncSeekExt};
                let io_error = |e: std::io::Error| object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: Box::new(e),
                };
                let mut file = tokio::fs::File::from_std(file);
                file.seek(std::io::SeekFrom::Start(got.range.start))
                    .await
                    .map_err(io_error)?;
                let part = file.take(got.range.end - got.range.start);
                Ok(ReaderStream::with_capacity(part, LOCAL_READ_BYTES)
                    .map(move |r| r.map_err(io_error))
                    .boxed())
            }
            GetResultPayload::Stream(s) => Ok(s),
        }
    }

    /// Deletes a file; only its uploader may (others get `NotFound`).
    pub async fn delete(&self, user: &str, id: &str) -> Result<(), FileError> {
        if !valid_id(id) {
            return Err(FileError::NotFound);
        }
        match self.index.file(id).await? {
            Some(f) if f.owner == user => {}
            _ => return Err(FileError::NotFound),
        }
        if self.index.delete_file(id, false).await? {
            self.delete_blob(id).await;
        }
        Ok(())
    }

    async fn delete_blob(&self, id: &str) {
        match self.blobs.delete(&self.blob_path(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => tracing::warn!(error = %e, file = %id, "deleting a file's bytes failed"),
        }
    }

    /// A URL that downloads the file as `user` until it expires; `NotFound` unless the
    /// user may read it.
    pub async fn sign(&self, user: &str, id: &str) -> Result<SignedUrl, FileError> {
        self.readable(user, id).await?;
        let exp = now_ms() + self.config.url_ttl.as_millis() as i64;
        let sig = self.signer.sign(id, user, exp);
        // User ids are [A-Za-z0-9_.@|+-]; these three need escaping in a query.
        let u = user
            .replace('+', "%2B")
            .replace('|', "%7C")
            .replace('@', "%40");
        Ok(SignedUrl {
            url: format!("/api/v1/files/{id}?u={u}&exp={exp}&sig={sig}"),
            expires_at: exp,
        })
    }

    /// The user a signed URL speaks for, if its signature holds and it has not expired.
    pub fn verify(&self, id: &str, user: &str, exp: i64, sig: &str) -> Option<String> {
        self.signer
            .verify(id, user, exp, sig, now_ms())
            .then(|| user.to_string())
    }

    /// Deletes uploads that no message attached within `files.orphan_ttl`; returns how
    /// many.
    pub async fn collect_orphans(&self) -> Result<usize, FileError> {
        let cutoff = now_ms() - self.config.orphan_ttl.as_millis() as i64;
        let mut n = 0;
        for id in self.index.orphans(cutoff, 500).await? {
            if self.index.delete_file(&id, true).await? {
                self.delete_blob(&id).await;
                n += 1;
            }
        }
        Ok(n)
    }

    /// How often [`Files::collect_orphans`] should run.
    pub fn cleanup_interval(&self) -> std::time::Duration {
        (self.config.orphan_ttl / 4).clamp(
            std::time::Duration::from_millis(50),
            std::time::Duration::from_secs(60),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names() {
        let id = new_id();
        assert!(valid_id(&id), "{id}");
        assert!(!valid_id("../etc/passwd"));
        assert!(!valid_id(&id.to_uppercase()));
        assert_eq!(clean_name("../../a/b\\c.png"), "c.png");
        assert_eq!(clean_name("x\ny"), "xy");
        assert_eq!(clean_name(&"é".repeat(200)).len(), 254);
        assert_eq!(clean_name("../../etc/passwd"), "passwd");
        assert_eq!(clean_name("a\r\nb\0c\x1b[31md\u{9b}e"), "abc[31mde");
        assert_eq!(
            clean_name("invoice\u{202E}fdp.exe\u{2066}\u{200F}\u{061C}\u{2028}"),
            "invoicefdp.exe"
        );
        assert_eq!(clean_name(".."), "");
        assert_eq!(clean_name("a/.."), "");
        assert_eq!(clean_name("..."), "");
        assert_eq!(clean_name(".profile"), ".profile");
    }
}
