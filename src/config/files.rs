//! `[files]`: attachments.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, DAY, GIB, MIB, MS, SEC, count, duration};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FileBackend {
    /// A directory on the local filesystem (`files.dir`).
    Local,
    /// An S3-compatible bucket (`files.s3_*`), shared by every instance.
    S3,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FilesConfig {
    /// Where uploaded bytes live: `local` or `s3`.
    pub backend: FileBackend,
    /// `local`: the directory (created on start).
    pub dir: String,
    /// Largest upload, in bytes; enforced while the upload streams in.
    pub max_file_bytes: u64,
    /// Most bytes of files one user may keep.
    pub user_quota_bytes: u64,
    /// Uploads one user may start per minute (per instance).
    pub uploads_per_minute: u32,
    /// Uploads that no message attached are deleted after this long.
    #[serde(with = "humantime_serde")]
    pub orphan_ttl: Duration,
    /// Lifetime of a signed download URL.
    #[serde(with = "humantime_serde")]
    pub url_ttl: Duration,
    /// HMAC key for signed URLs. Empty: a random key per process (URLs then work only on
    /// the instance that signed them, and not across restarts).
    pub url_secret: String,
    /// Images up to this size get a BlurHash placeholder (decoding holds them in memory).
    pub blurhash_max_bytes: u64,
    /// Images whose header shows more pixels than this are not decoded (no BlurHash);
    /// a decode holds ~4 bytes a pixel, two decodes run at a time. 0: never decode.
    pub max_image_pixels: u64,
    /// `s3`: bucket name.
    pub s3_bucket: String,
    /// `s3`: endpoint URL for S3-compatible services (empty: AWS).
    pub s3_endpoint: String,
    /// `s3`: region.
    pub s3_region: String,
    /// `s3`: credentials (empty: from the `AWS_*` environment variables).
    pub s3_access_key_id: String,
    pub s3_secret_access_key: String,
    /// `s3`: allow a plain `http://` endpoint.
    pub s3_allow_http: bool,
    /// `s3`: multipart upload part size in bytes (S3 needs at least 5 MiB); also the most
    /// memory one upload buffers.
    pub part_bytes: u64,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            backend: FileBackend::Local,
            dir: "data/files".into(),
            max_file_bytes: 100 * 1024 * 1024,
            user_quota_bytes: 1024 * 1024 * 1024,
            uploads_per_minute: 30,
            orphan_ttl: Duration::from_secs(3600),
            url_ttl: Duration::from_secs(300),
            url_secret: String::new(),
            blurhash_max_bytes: 10 * 1024 * 1024,
            max_image_pixels: 4096 * 4096,
            s3_bucket: String::new(),
            s3_endpoint: String::new(),
            s3_region: "us-east-1".into(),
            s3_access_key_id: String::new(),
            s3_secret_access_key: String::new(),
            s3_allow_http: false,
            part_bytes: 5 * 1024 * 1024,
        }
    }
}

impl FilesConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        count("files.max_file_bytes", self.max_file_bytes, 1, 1024 * GIB)?;
        count(
            "files.user_quota_bytes",
            self.user_quota_bytes,
            1,
            1024 * 1024 * GIB,
        )?;
        count(
            "files.uploads_per_minute",
            self.uploads_per_minute,
            1,
            1_000_000,
        )?;
        duration("files.orphan_ttl", self.orphan_ttl, 10 * MS, 365 * DAY)?;
        duration("files.url_ttl", self.url_ttl, SEC, DAY)?;
        count(
            "files.blurhash_max_bytes",
            self.blurhash_max_bytes,
            0,
            256 * MIB,
        )?;
        // The decoder's own caps (8192 px a side, 128 MiB) stop bigger images anyway.
        count(
            "files.max_image_pixels",
            self.max_image_pixels,
            0,
            8192 * 8192,
        )?;
        count("files.part_bytes", self.part_bytes, 5 * MIB, 5 * GIB)?;
        if self.backend == FileBackend::S3 && self.s3_bucket.is_empty() {
            return Err(ConfigError::Invalid {
                key: "files.s3_bucket",
                value: "\"\"".into(),
                allowed: "a bucket name when files.backend = \"s3\"".into(),
            });
        }
        Ok(())
    }
}
