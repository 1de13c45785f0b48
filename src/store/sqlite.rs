//! The SQLite [`Store`]: the embedded default.
//!
//! One writer thread owns the write connection and applies writes in *group commits*: it
//! takes every write that is waiting (up to `max_batch`), runs each in its own savepoint
//! inside one transaction, commits once (one fsync for the whole batch), and only then
//! answers the callers. So an acked message is durable, and throughput grows with the
//! number of concurrent writers instead of being capped at one fsync per message.
//! Writes are applied in the order they were submitted, which gives appends their order.
//!
//! Reads run on a small pool of read-only connections (WAL lets them proceed while the
//! writer commits). With `path = ":memory:"` there is one private in-memory database and
//! everything goes through the writer thread.
//!
//! Schema changes are numbered migrations tracked in `PRAGMA user_version`.
//!
//! **Heartbeat.** The writer thread beats between batches (and every quarter of
//! [`STALL_AFTER`] while idle). [`Store::health`], and so `/readyz`, fails when the
//! thread has stopped (a panic in a write) or has not beaten for [`STALL_AFTER`] (stuck
//! in one commit: a hung disk, a lock held by another process): every write would fail
//! or wait, so this instance should not be sent clients.

use std::{
    path::Path,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{Semaphore, oneshot};

use super::{
    AppendFuture, Appended, FileIndex, FileRecord, Inserted, NewMessage, NewRoom, Page, Range,
    ReadMarker, RoomMeta, Store, StoreError, StoreResult,
    rows::{
        self, Columns, FILE_COLUMNS, History, MESSAGE_COLUMNS, PUBLIC_ROOM_COLUMNS, ROOM_COLUMNS,
        ROOM_STATE_COLUMNS,
    },
};
use crate::{config::StoreConfig, proto::RoomState};

/// Numbered schema migrations; `user_version` records how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: rooms, members with read markers, messages with an idempotency key.
    "CREATE TABLE rooms (
        name TEXT PRIMARY KEY,
        private INTEGER NOT NULL,
        last_seq INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE members (
        room TEXT NOT NULL REFERENCES rooms(name),
        user TEXT NOT NULL,
        read_seq INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (room, user)
    ) WITHOUT ROWID;
    CREATE INDEX members_by_user ON members(user, room);
    CREATE TABLE messages (
        room TEXT NOT NULL,
        seq INTEGER NOT NULL,
        sender TEXT NOT NULL,
        client_msg_id TEXT NOT NULL,
        body TEXT NOT NULL,
        metadata TEXT NOT NULL,
        ts INTEGER NOT NULL,
        PRIMARY KEY (room, seq)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX messages_idempotency ON messages(room, sender, client_msg_id);",
    // 2: a member count per room (large rooms skip O(members) event fan-out).
    "ALTER TABLE rooms ADD COLUMN members INTEGER NOT NULL DEFAULT 0;
    UPDATE rooms SET members = (SELECT count(*) FROM members m WHERE m.room = rooms.name);",
    // 3: uploaded files, the rooms each was posted to, attachments on messages.
    "CREATE TABLE files (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        content_type TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        blurhash TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        referenced INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE INDEX files_by_owner ON files(owner);
    CREATE INDEX files_orphans ON files(referenced, created_at);
    CREATE TABLE file_rooms (
        file_id TEXT NOT NULL,
        room TEXT NOT NULL,
        PRIMARY KEY (file_id, room)
    ) WITHOUT ROWID;
    ALTER TABLE messages ADD COLUMN attachments TEXT NOT NULL DEFAULT '';",
    // 4: the member column named as in PostgreSQL (where `user` is reserved), so both
    // schemas have the same columns (tests/store_contract.rs compares them).
    "ALTER TABLE members RENAME COLUMN user TO user_id;",
    // 5: the room browser reads public rooms in name order without stepping over the
    // private ones (direct messages may far outnumber public rooms).
    "CREATE INDEX rooms_public ON rooms(private, name);",
];

type Done = Box<dyn FnOnce(Option<&StoreError>) + Send>;
/// A queued write: runs against the batch transaction, says whether it succeeded (its
/// savepoint is released or rolled back accordingly) and how to answer after the commit.
type Job = Box<dyn FnOnce(&Connection) -> (bool, Done) + Send>;

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// A writer thread that has not beaten for this long makes the store unhealthy.
pub const STALL_AFTER: Duration = Duration::from_secs(10);

/// When the writer thread last showed it was alive and between batches.
struct Heartbeat {
    start: Instant,
    /// Milliseconds since `start`.
    last: AtomicU64,
}

impl Heartbeat {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn beat(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// A user with at most this many rooms has them read as a point read on connect.
const POINT_ROOMS: i64 = 64;
/// `POINT_ROOMS + 1` rows at most (SQL text).
const POINT_ROOMS_LIMIT: &str = " LIMIT 65";

/// Most point-read connections (one per core up to this).
const MAX_POINT_CONNECTIONS: usize = 16;

/// One point-read connection, its mutex alone on its cache line(s).
#[repr(align(128))]
struct PointConnection(Mutex<Connection>);

static NEXT_POINT_SLOT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

thread_local! {
    /// Which point connection this thread tries first, assigned on first use.
    static POINT_SLOT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

pub struct SqliteStore {
    writer: mpsc::Sender<Job>,
    writer_thread: thread::JoinHandle<()>,
    heartbeat: Arc<Heartbeat>,
    /// [`STALL_AFTER`], shorter in this file's tests.
    stall_after: Duration,
    /// Read connections (file databases only).
    readers: Option<Arc<Mutex<Vec<Connection>>>>,
    read_permits: Arc<Semaphore>,
    /// Read connections for point reads on the caller's thread (file databases only;
    /// one per core this process may use, at most [`MAX_POINT_CONNECTIONS`]); see
    /// [`SqliteStore::read_point`].
    point: Box<[PointConnection]>,
}

fn now_ms() -> i64 {
    crate::auth::now_ms()
}

/// Every connection plans a statement once, whatever values are bound to it later.
///
/// Without the query planner stability guarantee SQLite lets a bound value shape the
/// plan (a `LIMIT ?`, a `LIKE ?` prefix), marks the statement as depending on that
/// parameter, and parses and plans it again the next time that parameter is bound: a
/// cached statement such as a user's rooms on connect (`... LIMIT ?2`) was compiled
/// again on every run (46 % of a connect storm's instructions). parley keeps no STAT4
/// data and matches no patterns, so no plan gains from the values.
fn plan_once(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

fn configure(conn: &Connection, config: &StoreConfig) -> rusqlite::Result<()> {
    plan_once(conn)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    if config.path != ":memory:" {
        conn.pragma_update(None, "journal_mode", "WAL")?;
    }
    conn.pragma_update(None, "synchronous", config.synchronous.as_str())?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > MIGRATIONS.len() {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "database schema version {version} is newer than this parley ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating and migrating as needed) the database at `config.path`.
    pub fn open(config: &StoreConfig) -> StoreResult<Self> {
        Self::open_with(config, STALL_AFTER)
    }

    fn open_with(config: &StoreConfig, stall_after: Duration) -> StoreResult<Self> {
        let memory = config.path == ":memory:";
        if !memory {
            if let Some(dir) = Path::new(&config.path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir).map_err(|e| {
                    backend(format!("creating data directory {}: {e}", dir.display()))
                })?;
            }
        }
        let mut conn = Connection::open(&config.path).map_err(backend)?;
        configure(&conn, config).map_err(backend)?;
        migrate(&mut conn).map_err(|e| backend(format!("migrating {}: {e}", config.path)))?;

        let readers = if memory {
            None
        } else {
            let mut pool = Vec::new();
            for _ in 0..config.read_connections.max(1) {
                let r = Connection::open_with_flags(
                    &config.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(backend)?;
                plan_once(&r).map_err(backend)?;
                r.busy_timeout(std::time::Duration::from_secs(5))
                    .map_err(backend)?;
                pool.push(r);
            }
            Some(Arc::new(Mutex::new(pool)))
        };
        let read_permits = Arc::new(Semaphore::new(config.read_connections.max(1)));
        let mut point = Vec::new();
        if !memory {
            let n = thread::available_parallelism()
                .map_or(1, |n| n.get())
                .clamp(1, MAX_POINT_CONNECTIONS);
            for _ in 0..n {
                let r = Connection::open_with_flags(
                    &config.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(backend)?;
                plan_once(&r).map_err(backend)?;
                // Never waits for a lock: a busy database sends the read to the pool.
                r.busy_timeout(std::time::Duration::ZERO).map_err(backend)?;
                point.push(PointConnection(Mutex::new(r)));
            }
        }

        let (tx, rx) = mpsc::channel::<Job>();
        let max_batch = config.max_batch.max(1);
        let heartbeat = Arc::new(Heartbeat::new());
        let beat = heartbeat.clone();
        let writer_thread = thread::Builder::new()
            .name("parley-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, max_batch, &beat, stall_after / 4))
            .map_err(backend)?;
        Ok(Self {
            writer: tx,
            writer_thread,
            heartbeat,
            stall_after,
            readers,
            read_permits,
            point: point.into_boxed_slice(),
        })
    }

    /// Queues a write; it runs in its own savepoint inside the next group commit, and the
    /// future resolves after that commit.
    fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> impl Future<Output = StoreResult<T>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn: &Connection| -> (bool, Done) {
            let result = f(conn).map_err(backend);
            let ok = result.is_ok();
            (
                ok,
                Box::new(move |commit_error: Option<&StoreError>| {
                    let _ = tx.send(match (result, commit_error) {
                        (Ok(v), None) => Ok(v),
                        (Err(e), _) => Err(e),
                        (Ok(_), Some(e)) => Err(e.clone()),
                    });
                }),
            )
        });
        let queued = self
            .writer
            .send(job)
            .map_err(|_| backend("writer thread stopped"));
        async move {
            queued?;
            rx.await.map_err(|_| backend("store write failed"))?
        }
    }

    /// A test hook: makes the writer thread fail as a bug in a write would (it panics in
    /// the middle of a batch, which rolls back). Every write after it fails, and
    /// [`Store::health`] says so.
    #[doc(hidden)]
    pub fn fail_writer_for_tests(&self) {
        let job: Job = Box::new(|_: &Connection| -> (bool, Done) {
            panic!("parley-sqlite-writer: failing on purpose (SqliteStore::fail_writer_for_tests)")
        });
        let _ = self.writer.send(job);
    }

    /// Runs a point read — one row by its key, a few microseconds — on the calling thread
    /// when the point-read connection is free and the database not busy; else as
    /// [`SqliteStore::read`]. A read through the blocking pool costs two thread hand-offs,
    /// several times the query itself: a reconnect storm made three such reads per
    /// connect + join. Only for queries that cannot run long.
    ///
    /// Each thread starts at a point connection of its own (one per core), so a connect
    /// storm on many cores does not queue on one connection's mutex and spill into the
    /// pool; when its own is taken, the next one is tried.
    async fn read_point<T: Send + 'static>(
        &self,
        f: impl Fn(&Connection) -> rusqlite::Result<T> + Clone + Send + 'static,
    ) -> StoreResult<T> {
        if let Some(result) = self.point_now(&f) {
            return result;
        }
        self.read(f).await
    }

    /// [`SqliteStore::read_point`]'s first step, with a borrowing `f`: the read on the
    /// calling thread, or `None` when it must go to the pool (no point connection free,
    /// or the database busy). A caller copies its arguments for the pool only then: the
    /// connect's and the join's reads copy no strings.
    fn point_now<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Option<StoreResult<T>> {
        let conn = self.free_point_connection()?;
        match f(&conn) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) =>
            {
                None
            }
            result => Some(result.map_err(backend)),
        }
    }

    /// A free point connection: this thread's own, else the next one.
    fn free_point_connection(&self) -> Option<std::sync::MutexGuard<'_, Connection>> {
        let n = self.point.len();
        if n == 0 {
            return None;
        }
        let mine = POINT_SLOT.with(|slot| {
            slot.get().unwrap_or_else(|| {
                let i = NEXT_POINT_SLOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                slot.set(Some(i));
                i
            })
        });
        (0..n.min(2)).find_map(|k| self.point[(mine + k) % n].0.try_lock().ok())
    }

    /// Runs a read on a pooled read connection (or on the writer for `:memory:`).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreResult<T> {
        let Some(pool) = &self.readers else {
            return self.write(f).await;
        };
        let _permit = self.read_permits.acquire().await.map_err(backend)?;
        let pool = pool.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = conn.ok_or_else(|| backend("read pool empty"))?;
            let result = f(&conn).map_err(backend);
            pool.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
            result
        })
        .await
        .map_err(backend)?
    }
}

fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Job>,
    max_batch: usize,
    heartbeat: &Heartbeat,
    beat_every: Duration,
) {
    loop {
        heartbeat.beat();
        let first = match rx.recv_timeout(beat_every) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            // The store is gone.
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut done = Vec::with_capacity(batch.len());
        let outcome = (|| -> rusqlite::Result<()> {
            let mut tx =
                conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            for job in batch.drain(..) {
                let sp = tx.savepoint()?;
                let (ok, d) = job(&sp);
                done.push(d);
                if ok {
                    sp.commit()?;
                }
                // else: dropping the savepoint rolls back just this job.
            }
            tx.commit()
        })();
        // Jobs left unrun (the transaction failed early) drop their reply channel, and
        // their callers see an error.
        drop(batch);
        let error = outcome.err().map(backend);
        if let Some(e) = &error {
            tracing::error!(error = %e, "group commit failed");
        }
        for d in done {
            d(error.as_ref());
        }
    }
}

impl Columns for rusqlite::Row<'_> {
    type Error = rusqlite::Error;

    fn text(&self, i: usize) -> rusqlite::Result<String> {
        self.get(i)
    }

    fn int(&self, i: usize) -> rusqlite::Result<i64> {
        self.get(i)
    }

    fn flag(&self, i: usize) -> rusqlite::Result<bool> {
        self.get(i)
    }

    fn out_of_range(&self, i: usize, value: i64) -> rusqlite::Error {
        rusqlite::Error::IntegralValueOutOfRange(i, value)
    }
}

fn append_in(conn: &Connection, m: NewMessage) -> rusqlite::Result<StoreResult<Appended>> {
    let existing = conn
        .query_row(
            &format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages m
                 WHERE room = ?1 AND sender = ?2 AND client_msg_id = ?3"
            ),
            params![m.room, m.sender, m.client_msg_id],
            |r| rows::message(r),
        )
        .optional()?;
    if let Some(message) = existing {
        return Ok(Ok(Appended {
            message: Arc::new(message),
            duplicate: true,
        }));
    }
    let seq: Option<i64> = conn
        .query_row(
            "UPDATE rooms SET last_seq = last_seq + 1 WHERE name = ?1 RETURNING last_seq",
            params![m.room],
            |r| r.get(0),
        )
        .optional()?;
    let Some(seq) = seq else {
        return Ok(Err(StoreError::NoSuchRoom(m.room)));
    };
    let (metadata, attachments) = m.extras();
    conn.execute(
        "INSERT INTO messages (room, seq, sender, client_msg_id, body, metadata, ts, attachments)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            m.room,
            seq,
            m.sender,
            m.client_msg_id,
            m.body,
            metadata,
            m.ts,
            attachments
        ],
    )?;
    // Posting a file to a room lets the room's members read it (only the uploader's own
    // files: a file deleted meanwhile is not linked).
    for a in &m.attachments {
        conn.execute(
            "INSERT INTO file_rooms (file_id, room)
             SELECT id, ?2 FROM files WHERE id = ?1 AND owner = ?3 ON CONFLICT DO NOTHING",
            params![a.file_id, m.room, m.sender],
        )?;
        conn.execute(
            "UPDATE files SET referenced = 1 WHERE id = ?1 AND owner = ?2",
            params![a.file_id, m.sender],
        )?;
    }
    conn.execute(
        "UPDATE members SET read_seq = ?3 WHERE room = ?1 AND user_id = ?2 AND read_seq < ?3",
        params![m.room, m.sender, seq],
    )?;
    Ok(Ok(Appended {
        message: Arc::new(m.into_message(seq as u64)),
        duplicate: false,
    }))
}

fn create_room_in(conn: &Connection, room: &str, private: bool) -> rusqlite::Result<bool> {
    Ok(conn.execute(
        "INSERT INTO rooms (name, private, created_at) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        params![room, private, now_ms()],
    )? == 1)
}

fn add_member_in(conn: &Connection, room: &str, user: &str) -> rusqlite::Result<()> {
    let added = conn.execute(
        "INSERT INTO members (room, user_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        params![room, user],
    )?;
    if added == 1 {
        conn.execute(
            "UPDATE rooms SET members = members + 1 WHERE name = ?1",
            params![room],
        )?;
    }
    Ok(())
}

/// `Some(TooManyRooms)` when `user` is in `max_rooms` rooms already (and not in
/// `joining`, which a join may always repeat); `None` when it may join one more. Run in
/// the same write as the join.
fn over_room_cap(
    conn: &Connection,
    user: &str,
    max_rooms: u64,
    joining: Option<&str>,
) -> rusqlite::Result<Option<StoreError>> {
    if max_rooms == 0 {
        return Ok(None);
    }
    if let Some(room) = joining
        && conn
            .prepare_cached("SELECT 1 FROM members WHERE room = ?1 AND user_id = ?2")?
            .exists(params![room, user])?
    {
        return Ok(None);
    }
    let n: i64 = conn
        .prepare_cached("SELECT count(*) FROM members WHERE user_id = ?1")?
        .query_row(params![user], |r| r.get(0))?;
    Ok((n as u64 >= max_rooms).then(|| StoreError::TooManyRooms {
        user: user.to_string(),
        max: max_rooms,
    }))
}

/// The room browser's page: public rooms by name after `?1`, at most `?2`.
fn public_rooms_sql() -> String {
    // TEXT compares with BINARY (memcmp) collation: byte order, as on PostgreSQL.
    // Index rooms_public: a range scan, private rooms not stepped over.
    format!(
        "SELECT {PUBLIC_ROOM_COLUMNS} FROM rooms r
         WHERE r.private = 0 AND r.name > ?1 ORDER BY r.name LIMIT ?2"
    )
}

fn room_in(conn: &Connection, room: &str) -> rusqlite::Result<Option<RoomMeta>> {
    conn.prepare_cached(&format!("SELECT {ROOM_COLUMNS} FROM rooms WHERE name = ?1"))?
        .query_row(params![room], |r| rows::room_meta(r))
        .optional()
}

#[async_trait]
impl Store for SqliteStore {
    fn append(&self, message: NewMessage) -> AppendFuture {
        let fut = self.write(move |conn| append_in(conn, message));
        Box::pin(async move { fut.await? })
    }

    async fn history(&self, room: &str, range: Range, limit: usize) -> StoreResult<Page> {
        let room = room.to_string();
        let query = History::new(range, limit);
        self.read(move |conn| {
            let sql = if query.backwards {
                format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages m
                     WHERE room = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3"
                )
            } else {
                format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages m
                     WHERE room = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
                )
            };
            let rows = conn
                .prepare_cached(&sql)?
                .query_map(params![room, query.bound, query.fetch], |r| {
                    rows::message(r)
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(query.page(rows))
        })
        .await
    }

    async fn room(&self, room: &str) -> StoreResult<Option<RoomMeta>> {
        let room = room.to_string();
        self.read_point(move |conn| room_in(conn, &room)).await
    }

    async fn room_for(&self, room: &str, user: &str) -> StoreResult<Option<(RoomMeta, bool)>> {
        // Every join runs this: the text is built once per process, and the arguments
        // are copied only for a read on the pool.
        static SQL: OnceLock<String> = OnceLock::new();
        fn query(
            conn: &Connection,
            room: &str,
            user: &str,
        ) -> rusqlite::Result<Option<(RoomMeta, bool)>> {
            let sql = SQL.get_or_init(|| {
                format!(
                    "SELECT {ROOM_COLUMNS}, EXISTS (SELECT 1 FROM members
                     WHERE room = ?1 AND user_id = ?2) FROM rooms WHERE name = ?1"
                )
            });
            conn.prepare_cached(sql)?
                .query_row(params![room, user], |r| rows::room_for(r))
                .optional()
        }
        if let Some(result) = self.point_now(|conn| query(conn, room, user)) {
            return result;
        }
        let (room, user) = (room.to_string(), user.to_string());
        self.read(move |conn| query(conn, &room, &user)).await
    }

    async fn create_room(&self, new: NewRoom<'_>, max_rooms: u64) -> StoreResult<bool> {
        let (room, creator, private) = (new.name.to_string(), new.creator.to_string(), new.private);
        // One writer runs every write: the count and the insert cannot interleave with
        // another join.
        self.write(move |conn| {
            if let Some(full) = over_room_cap(conn, &creator, max_rooms, None)? {
                return Ok(Err(full));
            }
            if !create_room_in(conn, &room, private)? {
                return Ok(Ok(false));
            }
            add_member_in(conn, &room, &creator)?;
            Ok(Ok(true))
        })
        .await?
    }

    async fn ensure_dm(&self, room: &str, a: &str, b: &str, max_rooms: u64) -> StoreResult<()> {
        let (room, a, b) = (room.to_string(), a.to_string(), b.to_string());
        self.write(move |conn| {
            if room_in(conn, &room)?.is_some() {
                return Ok(Ok(()));
            }
            for user in [&a, &b] {
                if let Some(full) = over_room_cap(conn, user, max_rooms, None)? {
                    return Ok(Err(full));
                }
            }
            if create_room_in(conn, &room, true)? {
                add_member_in(conn, &room, &a)?;
                add_member_in(conn, &room, &b)?;
            }
            Ok(Ok(()))
        })
        .await?
    }

    async fn join(&self, room: &str, user: &str, max_rooms: u64) -> StoreResult<RoomMeta> {
        let (room, user) = (room.to_string(), user.to_string());
        self.write(move |conn| {
            if let Some(full) = over_room_cap(conn, &user, max_rooms, Some(&room))? {
                return Ok(Err(full));
            }
            create_room_in(conn, &room, false)?;
            add_member_in(conn, &room, &user)?;
            Ok(Ok(
                room_in(conn, &room)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?
            ))
        })
        .await?
    }

    async fn leave(&self, room: &str, user: &str) -> StoreResult<bool> {
        let (room, user) = (room.to_string(), user.to_string());
        self.write(move |conn| {
            let left = conn.execute(
                "DELETE FROM members WHERE room = ?1 AND user_id = ?2",
                params![room, user],
            )? == 1;
            if left {
                conn.execute(
                    "UPDATE rooms SET members = members - 1 WHERE name = ?1",
                    params![room],
                )?;
            }
            Ok(left)
        })
        .await
    }

    async fn is_member(&self, room: &str, user: &str) -> StoreResult<bool> {
        let (room, user) = (room.to_string(), user.to_string());
        self.read_point(move |conn| {
            conn.prepare_cached("SELECT 1 FROM members WHERE room = ?1 AND user_id = ?2")?
                .exists(params![room, user])
        })
        .await
    }

    async fn members(&self, room: &str) -> StoreResult<Vec<String>> {
        let room = room.to_string();
        self.read(move |conn| {
            conn.prepare_cached("SELECT user_id FROM members WHERE room = ?1 ORDER BY user_id")?
                .query_map(params![room], |r| r.get(0))?
                .collect()
        })
        .await
    }

    /// Every connect reads its user's rooms: as a point read (no thread hand-off) when
    /// the user has at most [`POINT_ROOMS`], else (read again, whole) on the pool.
    async fn rooms_of(&self, user: &str) -> StoreResult<Vec<RoomState>> {
        // `ORDER BY m.room`, not `r.name` (equal by the join): the rows come in the order
        // of index members_by_user (user_id, room), with no sort (a temporary b-tree,
        // most of this query's cost for a user in a few rooms). The limit is part of
        // the text, not a parameter: binding a LIMIT parameter makes SQLite prepare the
        // statement again on every run (its plan may depend on the value).
        // The statement's text is built once per process (not on every connect).
        fn sql(limit: &str) -> String {
            format!(
                "SELECT {ROOM_STATE_COLUMNS} FROM members m JOIN rooms r ON r.name = m.room
                 WHERE m.user_id = ?1 ORDER BY m.room{limit}"
            )
        }
        static FEW: OnceLock<String> = OnceLock::new();
        static ALL: OnceLock<String> = OnceLock::new();
        fn query(conn: &Connection, user: &str, sql: &str) -> rusqlite::Result<Vec<RoomState>> {
            conn.prepare_cached(sql)?
                .query_map(params![user], |r| rows::room_state(r, user))?
                .collect()
        }
        let few = |conn: &Connection, user: &str| {
            query(conn, user, FEW.get_or_init(|| sql(POINT_ROOMS_LIMIT)))
        };
        // The user is copied only for a read on the pool.
        let few = match self.point_now(|conn| few(conn, user)) {
            Some(result) => result?,
            None => {
                let u = user.to_string();
                self.read(move |conn| few(conn, &u)).await?
            }
        };
        if few.len() <= POINT_ROOMS as usize {
            return Ok(few);
        }
        let user = user.to_string();
        self.read(move |conn| query(conn, &user, ALL.get_or_init(|| sql(""))))
            .await
    }

    async fn public_rooms(&self, after: &str, limit: usize) -> StoreResult<Vec<RoomState>> {
        let after = after.to_string();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            conn.prepare_cached(&public_rooms_sql())?
                .query_map(params![after, limit], |r| rows::public_room(r))?
                .collect()
        })
        .await
    }

    async fn share_a_room(&self, a: &str, b: &str) -> StoreResult<bool> {
        let (a, b) = (a.to_string(), b.to_string());
        self.read_point(move |conn| {
            conn.prepare_cached(
                "SELECT 1 FROM members x JOIN members y ON y.room = x.room AND y.user_id = ?2
                 WHERE x.user_id = ?1 LIMIT 1",
            )?
            .exists(params![a, b])
        })
        .await
    }

    async fn set_read(&self, room: &str, user: &str, seq: u64) -> StoreResult<Option<ReadMarker>> {
        let (room, user) = (room.to_string(), user.to_string());
        let seq = seq.min(i64::MAX as u64) as i64;
        self.write(move |conn| {
            let moved = conn.execute(
                "UPDATE members SET read_seq = MIN(?3, (SELECT last_seq FROM rooms WHERE name = ?1))
                 WHERE room = ?1 AND user_id = ?2
                   AND read_seq < MIN(?3, (SELECT last_seq FROM rooms WHERE name = ?1))",
                params![room, user, seq],
            )? == 1;
            conn.query_row(
                "SELECT m.read_seq, r.last_seq, ?3 FROM members m JOIN rooms r ON r.name = m.room
                 WHERE m.room = ?1 AND m.user_id = ?2",
                params![room, user, moved],
                |r| rows::read_marker(r),
            )
            .optional()
        })
        .await
    }

    fn health(&self) -> Result<(), String> {
        if self.writer_thread.is_finished() {
            return Err("SQLite: the writer thread stopped; no write can commit".into());
        }
        let silent = self.heartbeat.silent_for();
        if silent > self.stall_after {
            return Err(format!(
                "SQLite: the writer thread has been in one commit for {}s",
                silent.as_secs()
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl FileIndex for SqliteStore {
    async fn insert_file(&self, f: FileRecord, quota: u64) -> StoreResult<Inserted> {
        let quota = quota.min(i64::MAX as u64) as i64;
        self.write(move |conn| {
            let used: i64 = conn.query_row(
                "SELECT coalesce(sum(size), 0) FROM files WHERE owner = ?1",
                params![f.owner],
                |r| r.get(0),
            )?;
            if used.saturating_add(f.size as i64) > quota {
                return Ok(Inserted::OverQuota);
            }
            conn.execute(
                &format!("INSERT INTO files ({FILE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
                params![
                    f.id,
                    f.owner,
                    f.name,
                    f.content_type,
                    f.size as i64,
                    f.sha256,
                    f.width,
                    f.height,
                    f.blurhash,
                    f.created_at
                ],
            )?;
            Ok(Inserted::Ok)
        })
        .await
    }

    async fn file(&self, id: &str) -> StoreResult<Option<FileRecord>> {
        let id = id.to_string();
        self.read(move |conn| {
            conn.prepare_cached(&format!("SELECT {FILE_COLUMNS} FROM files WHERE id = ?1"))?
                .query_row(params![id], |r| rows::file(r))
                .optional()
        })
        .await
    }

    async fn bytes_of(&self, owner: &str) -> StoreResult<u64> {
        let owner = owner.to_string();
        self.read(move |conn| {
            conn.query_row(
                "SELECT coalesce(sum(size), 0) FROM files WHERE owner = ?1",
                params![owner],
                |r| r.get::<_, i64>(0),
            )
        })
        .await
        .map(|n| n as u64)
    }

    async fn may_read(&self, id: &str, user: &str) -> StoreResult<bool> {
        let (id, user) = (id.to_string(), user.to_string());
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT 1 FROM files WHERE id = ?1 AND owner = ?2
                 UNION ALL
                 SELECT 1 FROM file_rooms f JOIN members m ON m.room = f.room
                 WHERE f.file_id = ?1 AND m.user_id = ?2
                 LIMIT 1",
            )?
            .exists(params![id, user])
        })
        .await
    }

    async fn delete_file(&self, id: &str, only_orphan: bool) -> StoreResult<bool> {
        let id = id.to_string();
        self.write(move |conn| {
            let deleted = conn.execute(
                "DELETE FROM files WHERE id = ?1 AND (?2 = 0 OR referenced = 0)",
                params![id, only_orphan],
            )? == 1;
            if deleted {
                conn.execute("DELETE FROM file_rooms WHERE file_id = ?1", params![id])?;
            }
            Ok(deleted)
        })
        .await
    }

    async fn orphans(&self, before_ms: i64, limit: usize) -> StoreResult<Vec<String>> {
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT id FROM files WHERE referenced = 0 AND created_at < ?1 LIMIT ?2",
            )?
            .query_map(params![before_ms, limit as i64], |r| r.get(0))?
            .collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::Synchronous;

    fn config(path: &str) -> StoreConfig {
        StoreConfig {
            path: path.into(),
            synchronous: Synchronous::Normal,
            ..Default::default()
        }
    }

    fn msg(room: &str, sender: &str, id: &str) -> NewMessage {
        NewMessage {
            room: room.into(),
            sender: sender.into(),
            client_msg_id: id.into(),
            body: id.into(),
            metadata: BTreeMap::new(),
            ts: 1,
            attachments: Vec::new(),
        }
    }

    #[tokio::test]
    // The point connection is held across the reads on purpose: they must not wait for it.
    #[allow(clippy::await_holding_lock)]
    async fn point_reads_see_every_commit_and_fall_back_to_the_pool_when_taken() {
        let dir = std::env::temp_dir().join(format!("parley-point-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("p.db");
        let s = SqliteStore::open(&config(path.to_str().unwrap())).unwrap();
        assert!(
            !s.point.is_empty(),
            "a file database has point-read connections"
        );
        assert!(s.room("r").await.unwrap().is_none());
        s.join("r", "u", 0).await.unwrap();
        s.append(msg("r", "u", "1")).await.unwrap();
        // Read right after the commit, on the point connection.
        let meta = s.room("r").await.unwrap().unwrap();
        assert_eq!((meta.last_seq, meta.members), (1, 1));
        assert!(s.is_member("r", "u").await.unwrap());
        // While every point connection is held, the same reads go through the pool.
        let held: Vec<_> = s.point.iter().map(|p| p.0.lock().unwrap()).collect();
        assert!(s.is_member("r", "u").await.unwrap());
        assert!(!s.is_member("r", "v").await.unwrap());
        drop(held);
        assert!(s.leave("r", "u").await.unwrap());
        assert!(!s.is_member("r", "u").await.unwrap());
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A cached statement runs as compiled, whatever is bound: without the query planner
    /// stability guarantee a bound `LIMIT ?` (the room browser, history pages, a user's
    /// rooms on connect) had SQLite parse and plan the statement again on each run.
    #[tokio::test]
    async fn cached_statements_are_not_compiled_again_for_new_values() {
        use rusqlite::StatementStatus::{RePrepare, Run};
        let dir = std::env::temp_dir().join(format!("parley-qpsg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("p.db");
        let s = SqliteStore::open(&config(path.to_str().unwrap())).unwrap();
        for room in ["a", "b", "c"] {
            s.join(room, "u", 0).await.unwrap();
        }
        for (after, limit) in [("", 2), ("a", 5), ("", 1), ("b", 3)] {
            let page = s.public_rooms(after, limit).await.unwrap();
            assert!(!page.is_empty() && page.len() <= limit);
        }
        let sql = public_rooms_sql();
        let mut runs = 0;
        for conn in s.readers.as_ref().unwrap().lock().unwrap().iter() {
            let stmt = conn.prepare_cached(&sql).unwrap();
            runs += stmt.get_status(Run);
            assert_eq!(stmt.get_status(RePrepare), 0, "compiled again");
        }
        assert_eq!(runs, 4, "the pages were read on the pool's connections");

        // The same statement on a connection without the guarantee is compiled again
        // when its LIMIT is bound anew (what the assertion above would catch).
        let plain = Connection::open(&path).unwrap();
        let mut stmt = plain.prepare_cached(&sql).unwrap();
        for limit in [2, 3] {
            stmt.query_map(params!["", limit], |_| Ok(()))
                .unwrap()
                .for_each(drop);
        }
        assert!(
            stmt.get_status(RePrepare) > 0,
            "SQLite changed: see plan_once"
        );
        drop(stmt);
        drop((plain, s));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_database_is_at_the_newest_schema_version_after_open() {
        let dir = std::env::temp_dir().join(format!("parley-store-v-{}", std::process::id()));
        let path = dir.join("nested").join("p.db");
        let path = path.to_str().unwrap();
        drop(SqliteStore::open(&config(path)).unwrap());
        let conn = Connection::open(path).unwrap();
        let v: usize = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A database written by a build before migration 4 (the member column renamed)
    /// opens with its rooms, members and read markers intact.
    #[tokio::test]
    async fn a_version_3_database_migrates_with_its_members() {
        let dir = std::env::temp_dir().join(format!("parley-store-v3-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.db");
        let conn = Connection::open(&path).unwrap();
        for sql in &MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.execute_batch(
            "PRAGMA user_version = 3;
             INSERT INTO rooms (name, private, last_seq, created_at, members) VALUES ('r', 0, 2, 1, 1);
             INSERT INTO members (room, user, read_seq) VALUES ('r', 'u', 1);",
        )
        .unwrap();
        drop(conn);
        let s = SqliteStore::open(&config(path.to_str().unwrap())).unwrap();
        assert!(s.is_member("r", "u").await.unwrap());
        let rooms = s.rooms_of("u").await.unwrap();
        assert_eq!((rooms[0].read_seq, rooms[0].unread), (1, 1));
        s.join("r", "v", 0).await.unwrap();
        assert_eq!(s.members("r").await.unwrap(), ["u", "v"]);
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A user's rooms are all read, in name order, whether they fit a point read (a few)
    /// or not (more than `POINT_ROOMS`: read again on the pool).
    #[tokio::test]
    async fn rooms_of_reads_few_and_many_rooms_whole() {
        let dir = std::env::temp_dir().join(format!("parley-rooms-of-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("p.db");
        let s = SqliteStore::open(&config(path.to_str().unwrap())).unwrap();
        let many = POINT_ROOMS as usize + 6;
        for i in (0..many).rev() {
            s.join(&format!("r{i:03}"), "many", 0).await.unwrap();
        }
        for i in 0..3 {
            s.join(&format!("r{i:03}"), "few", 0).await.unwrap();
        }
        let names = |rooms: Vec<RoomState>| rooms.into_iter().map(|r| r.room).collect::<Vec<_>>();
        let want = |n: usize| (0..n).map(|i| format!("r{i:03}")).collect::<Vec<_>>();
        assert_eq!(names(s.rooms_of("few").await.unwrap()), want(3));
        assert_eq!(names(s.rooms_of("many").await.unwrap()), want(many));
        assert!(s.rooms_of("nobody").await.unwrap().is_empty());
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The heartbeat: an idle writer stays healthy; one stuck in a commit past the
    /// stall time is reported, and healthy again once the commit ends; a writer thread
    /// that dies is reported at once, and writes fail from then on.
    #[tokio::test]
    async fn health_sees_a_stuck_and_a_dead_writer() {
        let stall = Duration::from_millis(400);
        let s = SqliteStore::open_with(&config(":memory:"), stall).unwrap();
        tokio::time::sleep(stall * 2).await;
        assert_eq!(s.health(), Ok(()), "idle is not stuck");
        let (release, wait) = mpsc::channel::<()>();
        let stuck = s.write(move |_| {
            let _ = wait.recv();
            Ok(())
        });
        let stuck = tokio::spawn(stuck);
        tokio::time::sleep(stall * 2).await;
        let err = s.health().unwrap_err();
        assert!(err.contains("in one commit"), "{err}");
        release.send(()).unwrap();
        stuck.await.unwrap().unwrap();
        tokio::time::sleep(stall / 2).await;
        assert_eq!(s.health(), Ok(()), "healthy once the commit ends");

        s.fail_writer_for_tests();
        let deadline = Instant::now() + Duration::from_secs(5);
        // The panicking job may first read as a stalled commit (its unwinding can take
        // longer than `stall` on a loaded machine); what must come is "stopped".
        while !s.health().is_err_and(|e| e.contains("stopped")) {
            assert!(
                Instant::now() < deadline,
                "a dead writer is reported: {:?}",
                s.health()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(s.join("r", "u", 0).await.is_err(), "no write commits");
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused() {
        let dir = std::env::temp_dir().join(format!("parley-store-new-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = SqliteStore::open(&config(path.to_str().unwrap()))
            .err()
            .unwrap();
        assert!(err.to_string().contains("newer"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
