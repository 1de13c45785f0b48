//! `[store]`: the durable log (SQLite or PostgreSQL).

use serde::{Deserialize, Serialize};

use super::{ConfigError, count};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync at every commit: an acknowledged message survives power loss.
    Full,
    /// fsync at checkpoints only: survives a process crash (`kill -9`), not power loss.
    Normal,
}

impl Synchronous {
    pub fn as_str(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Which durable log: `sqlite` (embedded, one instance) or `postgres` (shared by many
    /// instances).
    pub backend: StoreBackend,
    /// SQLite database file (its directory is created), or `:memory:` for a throwaway
    /// in-memory database.
    pub path: String,
    /// SQLite `synchronous` mode in WAL: `full` or `normal`.
    pub synchronous: Synchronous,
    /// Most writes folded into one group commit.
    pub max_batch: usize,
    /// Read-only connections for history, sync and room lists.
    pub read_connections: usize,
    /// `postgres`: the server, as a URL (`postgres://user:pass@host:5432/db`) or a
    /// libpq key/value string. Usually from `PARLEY_STORE__POSTGRES_URL`.
    pub postgres_url: String,
    /// `postgres`: most connections: one per append writer, the rest for reads and other
    /// writes (the health ping has one more of its own).
    pub postgres_pool_size: usize,
    /// `postgres`: append writers; rooms hash onto them, each commits its own batches on
    /// a connection of its own.
    pub postgres_writers: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// An SQLite file (or `:memory:`): the single-instance default.
    Sqlite,
    /// A PostgreSQL database that several instances share.
    Postgres,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: "data/parley.db".into(),
            synchronous: Synchronous::Full,
            backend: StoreBackend::Sqlite,
            max_batch: 512,
            read_connections: 4,
            postgres_url: String::new(),
            postgres_pool_size: 16,
            postgres_writers: 4,
        }
    }
}

impl StoreConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        count("store.max_batch", self.max_batch as u64, 1, 100_000)?;
        count(
            "store.read_connections",
            self.read_connections as u64,
            1,
            256,
        )?;
        count(
            "store.postgres_pool_size",
            self.postgres_pool_size as u64,
            2,
            1024,
        )?;
        count(
            "store.postgres_writers",
            self.postgres_writers as u64,
            1,
            64,
        )?;
        if self.postgres_writers >= self.postgres_pool_size {
            return Err(ConfigError::Invalid {
                key: "store.postgres_writers",
                value: self.postgres_writers.to_string(),
                allowed: format!(
                    "fewer than store.postgres_pool_size ({}), so reads still get connections",
                    self.postgres_pool_size
                ),
            });
        }
        if self.backend == StoreBackend::Postgres {
            if self.postgres_url.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "store.postgres_url",
                    value: "\"\"".into(),
                    allowed: "a PostgreSQL URL (postgres://user@host:5432/db) when \
                              store.backend = \"postgres\"; set PARLEY_STORE__POSTGRES_URL"
                        .into(),
                });
            }
            if let Err(e) = self.postgres_url.parse::<tokio_postgres::Config>() {
                return Err(ConfigError::Invalid {
                    key: "store.postgres_url",
                    // Never echo the URL: it may hold a password.
                    value: "(not shown)".into(),
                    allowed: format!("a valid PostgreSQL URL or key/value string ({e})"),
                });
            }
        }
        Ok(())
    }
}
