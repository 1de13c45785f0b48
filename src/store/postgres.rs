//! The PostgreSQL [`Store`]: one durable log that several parley instances share.
//!
//! **Seq at commit.** An append batch locks its rooms' rows (`SELECT … FOR UPDATE`, in
//! name order so two batches never deadlock), numbers its messages from the locked
//! `last_seq`, inserts them and moves `last_seq` on, all in one transaction. Whoever
//! appends to a room next — this instance or another — waits for that lock, so commit
//! order is seq order per room and every instance's appends form one gap-free order.
//!
//! **Idempotent across instances.** `(room, sender, client_msg_id)` is unique. The
//! lookup for an earlier message with the same key runs after the room lock is held, and
//! every writer of the room holds that lock, so a concurrent insert of the same key by
//! another instance has either committed (and is found: the caller gets the original with
//! `duplicate: true`) or not begun. The unique index stays as the last line of defence.
//!
//! **Group commit.** Appends queue in memory on one of `store.postgres_writers` writer
//! tasks (rooms hash onto them). A writer takes everything waiting (up to
//! `store.max_batch`) and commits it as one transaction: a handful of statements with
//! array parameters (`unnest`), pipelined on one connection, one commit (one WAL flush)
//! for the whole batch. Callers are answered after the commit: acked means durable. If a
//! batch fails, its appends are retried one by one, so one bad message fails alone.
//!
//! **Order within one instance.** A room's appends all go through the same writer, in
//! the order `append` was called, and batches commit one after another: appends called
//! one after another get increasing seqs (the contract of [`Store::append`]). Across
//! instances seqs interleave in commit order; see `store/mod.rs`.
//!
//! Other writes (rooms, membership, read markers, files) are short transactions on the
//! pool. Schema changes are numbered migrations (`migrations/postgres/NNNN_*.sql`),
//! recorded in `parley_schema_version` and applied on open under an advisory lock, so
//! instances starting together take turns. A background task pings the server once a
//! second; [`Store::health`] reports the last result (for `/readyz`).

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{
    NoTls, Row,
    types::{FromSql, ToSql},
};

use super::{
    AppendFuture, Appended, FileIndex, FileRecord, Inserted, NewMessage, NewRoom, Page, Range,
    ReadMarker, RoomMeta, Store, StoreError, StoreResult,
    rows::{
        self, Columns, FILE_COLUMNS, History, MESSAGE_COLUMNS, PUBLIC_ROOM_COLUMNS, ROOM_COLUMNS,
        ROOM_STATE_COLUMNS,
    },
};
use crate::{
    config::StoreConfig,
    proto::{Message, RoomState},
};

/// Numbered schema migrations; `parley_schema_version` records which have run.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_init.sql")),
    (
        2,
        include_str!("../../migrations/postgres/0002_attachments_default.sql"),
    ),
    (
        3,
        include_str!("../../migrations/postgres/0003_rooms_public.sql"),
    ),
];

/// The advisory lock key migrations run under ("parley" in ASCII).
const MIGRATION_LOCK: i64 = 0x7061_726c_6579;

/// How often the background task pings the server.
const PING_EVERY: Duration = Duration::from_secs(1);

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// A tokio-postgres error with the server's message and detail when it sent one, or the
/// underlying cause (its `Display` alone says only "db error" or "error connecting").
fn pg(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        return StoreError::Backend(format!("postgres: {}: {}", db.code().code(), db));
    }
    let mut text = format!("postgres: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    StoreError::Backend(text)
}

/// Column `i` of `row` as a `T`, or an error naming the column (a schema that does not
/// match this build must not panic a request).
fn get<'a, T: FromSql<'a>>(row: &'a Row, i: usize) -> StoreResult<T> {
    row.try_get(i).map_err(|e| {
        let name = row.columns().get(i).map_or("?", |c| c.name());
        backend(format!("postgres: column {i} ({name}): {e}"))
    })
}

impl Columns for Row {
    type Error = StoreError;

    fn text(&self, i: usize) -> StoreResult<String> {
        get(self, i)
    }

    fn int(&self, i: usize) -> StoreResult<i64> {
        get(self, i)
    }

    fn flag(&self, i: usize) -> StoreResult<bool> {
        get(self, i)
    }

    fn out_of_range(&self, i: usize, value: i64) -> StoreError {
        backend(format!("postgres: column {i}: {value} is out of range"))
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg(e),
        e => StoreError::Backend(format!("postgres pool: {e}")),
    }
}

/// One queued append and where its answer goes.
struct Job {
    message: NewMessage,
    reply: oneshot::Sender<StoreResult<Appended>>,
}

pub struct PostgresStore {
    pool: Pool,
    writers: Vec<mpsc::UnboundedSender<Job>>,
    /// The last ping's outcome: `None` when the server answered.
    health: Arc<Mutex<Option<String>>>,
}

fn now_ms() -> i64 {
    crate::auth::now_ms()
}

impl PostgresStore {
    /// Connects to `config.postgres_url`, applies pending migrations and starts the
    /// append writers and the health ping. Needs a tokio runtime.
    pub async fn open(config: &StoreConfig) -> StoreResult<Self> {
        let pg_config: tokio_postgres::Config = config
            .postgres_url
            .parse()
            .map_err(|e| backend(format!("store.postgres_url: {e}")))?;
        // Two pools out of `postgres_pool_size` connections: one connection per append
        // writer (appends never queue behind reads), the rest for everything else.
        let writers = config.postgres_writers.max(1);
        let pool_of = |size: usize| {
            let manager = Manager::from_config(
                pg_config.clone(),
                NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(size)
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(Duration::from_secs(10)))
                .create_timeout(Some(Duration::from_secs(5)))
                .recycle_timeout(Some(Duration::from_secs(5)))
                .build()
                .map_err(backend)
        };
        let pool = pool_of(config.postgres_pool_size.saturating_sub(writers).max(1))?;
        let write_pool = pool_of(writers)?;
        let mut client = pool.get().await.map_err(|e| {
            StoreError::Backend(format!(
                "connecting to PostgreSQL (store.postgres_url): {}",
                pool_error(e)
            ))
        })?;
        migrate(&mut client).await?;
        drop(client);

        let max_batch = config.max_batch.max(1);
        let writers = (0..writers)
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(writer_loop(write_pool.clone(), rx, max_batch));
                tx
            })
            .collect();
        let health = Arc::new(Mutex::new(None));
        tokio::spawn(ping_loop(pg_config, Arc::downgrade(&health)));
        Ok(Self {
            pool,
            writers,
            health,
        })
    }

    async fn client(&self) -> StoreResult<Object> {
        self.pool.get().await.map_err(pool_error)
    }

    /// The schema version the database is at.
    pub async fn schema_version(&self) -> StoreResult<i32> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "SELECT coalesce(max(version), 0) FROM parley_schema_version",
                &[],
            )
            .await
            .map_err(pg)?;
        get(&row, 0)
    }
}

/// The number of migrations this build knows.
pub fn schema_version() -> i32 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// Applies pending migrations in one transaction under an advisory lock (instances that
/// start together take turns; the second finds nothing to do).
async fn migrate(client: &mut Object) -> StoreResult<()> {
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS parley_schema_version (
            version INTEGER PRIMARY KEY,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )",
    )
    .await
    .map_err(pg)?;
    let current: i32 = get(
        &tx.query_one(
            "SELECT coalesce(max(version), 0) FROM parley_schema_version",
            &[],
        )
        .await
        .map_err(pg)?,
        0,
    )?;
    if current > schema_version() {
        return Err(backend(format!(
            "database schema version {current} is newer than this parley ({})",
            schema_version()
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| backend(format!("migration {version}: {}", pg(e))))?;
        tx.execute(
            "INSERT INTO parley_schema_version (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(pg)?;
        tracing::info!(version, "applied PostgreSQL migration");
    }
    tx.commit().await.map_err(pg)
}

/// Pings the server once a second on a connection of its own (a busy pool must not look
/// like a lost server) and records the outcome for [`Store::health`].
async fn ping_loop(config: tokio_postgres::Config, health: Weak<Mutex<Option<String>>>) {
    let mut tick = tokio::time::interval(PING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        tick.tick().await;
        let outcome = tokio::time::timeout(Duration::from_secs(2), async {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                let (c, conn) = config.connect(NoTls).await.map_err(pg)?;
                tokio::spawn(conn);
                client = Some(c);
            }
            if let Some(c) = &client {
                c.simple_query("SELECT 1").await.map_err(pg)?;
            }
            Ok::<_, StoreError>(())
        })
        .await
        .unwrap_or_else(|_| Err(backend("no answer within 2s")));
        if outcome.is_err() {
            // Start afresh next time (a timed-out connection may be half dead).
            client = None;
        }
        let Some(health) = health.upgrade() else {
            return;
        };
        let error = outcome.err().map(|e| e.to_string());
        let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
        match (&*h, &error) {
            (None, Some(e)) => tracing::warn!(error = %e, "PostgreSQL unreachable"),
            (Some(_), None) => tracing::info!("PostgreSQL reachable again"),
            _ => {}
        }
        *h = error;
    }
}

async fn writer_loop(pool: Pool, mut rx: mpsc::UnboundedReceiver<Job>, max_batch: usize) {
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        let messages: Vec<&NewMessage> = batch.iter().map(|j| &j.message).collect();
        match commit_batch(&pool, &messages).await {
            Ok(results) => {
                for (job, result) in batch.drain(..).zip(results) {
                    let _ = job.reply.send(result);
                }
            }
            Err(e) if batch.len() > 1 && e.refused() => {
                // One by one, still in call order: a message the server refuses fails
                // alone; the rest commit.
                let e = e.into_store();
                tracing::warn!(error = %e, appends = batch.len(), "append batch refused; retrying one by one");
                for job in batch.drain(..) {
                    let result = match commit_batch(&pool, &[&job.message]).await {
                        Ok(mut r) => r.pop().unwrap_or_else(|| Err(backend("no result"))),
                        Err(e) => Err(e.into_store()),
                    };
                    let _ = job.reply.send(result);
                }
            }
            Err(e) => {
                let e = e.into_store();
                tracing::error!(error = %e, appends = batch.len(), "append batch failed");
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The writer a room's appends go through (FNV-1a of the name: stable and cheap).
fn writer_of(room: &str, writers: usize) -> usize {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in room.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    (h % writers as u64) as usize
}

/// Why a batch failed.
enum BatchError {
    /// No connection (the server is down or the pool exhausted), or a row that does not
    /// read as this build expects.
    Store(StoreError),
    /// A statement failed: the server refused something (`refused`), or the connection
    /// broke.
    Pg(tokio_postgres::Error),
}

impl BatchError {
    /// The server refused a statement: one message may be to blame, so retrying the
    /// batch's messages one by one is worth it. Not when the server is gone.
    fn refused(&self) -> bool {
        matches!(self, BatchError::Pg(e) if e.as_db_error().is_some())
    }

    fn into_store(self) -> StoreError {
        match self {
            BatchError::Store(e) => e,
            BatchError::Pg(e) => pg(e),
        }
    }
}

/// Commits one batch of appends in one transaction; one result per message, in order.
/// An `Err` means nothing of the batch was committed (or, when the connection broke
/// during the commit, that the outcome is unknown: a resend finds the original).
async fn commit_batch(
    pool: &Pool,
    batch: &[&NewMessage],
) -> Result<Vec<StoreResult<Appended>>, BatchError> {
    let client = pool
        .get()
        .await
        .map_err(|e| BatchError::Store(pool_error(e)))?;
    let result = batch_in(&client, batch).await;
    if result.is_err() && !client.is_closed() {
        // Leave no open transaction on a pooled connection.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

/// The batch's transaction: two round trips when no message attaches files (BEGIN, the
/// room locks and the idempotency lookup pipelined; then the writes and COMMIT
/// pipelined), whatever the batch's size.
async fn batch_in(
    tx: &Object,
    batch: &[&NewMessage],
) -> Result<Vec<StoreResult<Appended>>, BatchError> {
    // Lock the rooms (in name order: no deadlock with another instance's batch; `NO KEY`:
    // membership changes' foreign-key checks are not blocked by it), then
    // look for earlier messages with the same keys: after the lock, every concurrent
    // writer of these rooms has committed or not begun.
    let mut rooms: Vec<&str> = batch.iter().map(|m| m.room.as_str()).collect();
    rooms.sort_unstable();
    rooms.dedup();
    let keys_room: Vec<&str> = batch.iter().map(|m| m.room.as_str()).collect();
    let keys_sender: Vec<&str> = batch.iter().map(|m| m.sender.as_str()).collect();
    let keys_id: Vec<&str> = batch.iter().map(|m| m.client_msg_id.as_str()).collect();
    let lock = tx
        .prepare_cached(
            "SELECT name, last_seq FROM rooms WHERE name = ANY($1::text[])
             ORDER BY name COLLATE \"C\" FOR NO KEY UPDATE",
        )
        .await
        .map_err(BatchError::Pg)?;
    let existing = tx
        .prepare_cached(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m
             JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(room, sender, id)
               ON m.room = k.room AND m.sender = k.sender AND m.client_msg_id = k.id"
        ))
        .await
        .map_err(BatchError::Pg)?;
    let lock_params: [&(dyn ToSql + Sync); 1] = [&rooms];
    let existing_params: [&(dyn ToSql + Sync); 3] = [&keys_room, &keys_sender, &keys_id];
    // `biased`: first polled in this order, so the requests go out in this order.
    let (_, locked, found) = tokio::try_join!(
        biased;
        tx.batch_execute("BEGIN"),
        tx.query(&lock, &lock_params),
        tx.query(&existing, &existing_params),
    )
    .map_err(BatchError::Pg)?;
    let mut last: HashMap<String, i64> = locked
        .iter()
        .map(|r| Ok((r.text(0)?, r.int(1)?)))
        .collect::<StoreResult<_>>()
        .map_err(BatchError::Store)?;
    let mut originals: HashMap<(String, String, String), Arc<Message>> = found
        .iter()
        .map(|r| {
            let m = rows::message(r)?;
            Ok((
                (m.room.clone(), m.sender.clone(), m.client_msg_id.clone()),
                Arc::new(m),
            ))
        })
        .collect::<StoreResult<_>>()
        .map_err(BatchError::Store)?;

    // Number the new messages in call order; a key seen twice in the batch is a duplicate
    // of its first occurrence.
    let mut results = Vec::with_capacity(batch.len());
    let mut ins_room = Vec::new();
    let mut ins_seq = Vec::new();
    let mut ins_sender = Vec::new();
    let mut ins_id = Vec::new();
    let mut ins_body = Vec::new();
    let mut ins_meta = Vec::new();
    let mut ins_ts = Vec::new();
    let mut ins_att = Vec::new();
    let mut read: HashMap<(&str, &str), i64> = HashMap::new();
    let mut attached: Vec<(&str, &str, &str)> = Vec::new();
    for m in batch {
        let Some(last_seq) = last.get_mut(&m.room) else {
            results.push(Err(StoreError::NoSuchRoom(m.room.clone())));
            continue;
        };
        match originals.entry((m.room.clone(), m.sender.clone(), m.client_msg_id.clone())) {
            Entry::Occupied(o) => results.push(Ok(Appended {
                message: o.get().clone(),
                duplicate: true,
            })),
            Entry::Vacant(v) => {
                *last_seq += 1;
                let seq = *last_seq;
                let (metadata, attachments) = m.extras();
                ins_room.push(m.room.as_str());
                ins_seq.push(seq);
                ins_sender.push(m.sender.as_str());
                ins_id.push(m.client_msg_id.as_str());
                ins_body.push(m.body.as_str());
                ins_meta.push(metadata);
                ins_ts.push(m.ts);
                ins_att.push(attachments);
                read.insert((m.room.as_str(), m.sender.as_str()), seq);
                for a in &m.attachments {
                    attached.push((a.file_id.as_str(), m.room.as_str(), m.sender.as_str()));
                }
                let message = Arc::new((*m).clone().into_message(seq as u64));
                v.insert(message.clone());
                results.push(Ok(Appended {
                    message,
                    duplicate: false,
                }));
            }
        }
    }
    if ins_room.is_empty() {
        // Only duplicates and unknown rooms: nothing to write.
        tx.batch_execute("COMMIT").await.map_err(BatchError::Pg)?;
        return Ok(results);
    }

    let insert = tx
        .prepare_cached(
            "INSERT INTO messages (room, seq, sender, client_msg_id, body, metadata, ts, attachments)
             SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[],
                                  $6::text[], $7::int8[], $8::text[])",
        )
        .await
        .map_err(BatchError::Pg)?;
    let bump = tx
        .prepare_cached(
            "UPDATE rooms SET last_seq = v.last
             FROM unnest($1::text[], $2::int8[]) AS v(name, last) WHERE rooms.name = v.name",
        )
        .await
        .map_err(BatchError::Pg)?;
    let mark = tx
        .prepare_cached(
            "UPDATE members SET read_seq = v.seq
             FROM unnest($1::text[], $2::text[], $3::int8[]) AS v(room, user_id, seq)
             WHERE members.room = v.room AND members.user_id = v.user_id
               AND members.read_seq < v.seq",
        )
        .await
        .map_err(BatchError::Pg)?;
    let touched: std::collections::HashSet<&str> = ins_room.iter().copied().collect();
    last.retain(|room, _| touched.contains(room.as_str()));
    let (bump_rooms, bump_last): (Vec<&str>, Vec<i64>) =
        last.iter().map(|(r, s)| (r.as_str(), *s)).unzip();
    let mut read_room = Vec::with_capacity(read.len());
    let mut read_user = Vec::with_capacity(read.len());
    let mut read_seq = Vec::with_capacity(read.len());
    for ((room, user), seq) in &read {
        read_room.push(*room);
        read_user.push(*user);
        read_seq.push(*seq);
    }
    let insert_params: [&(dyn ToSql + Sync); 8] = [
        &ins_room,
        &ins_seq,
        &ins_sender,
        &ins_id,
        &ins_body,
        &ins_meta,
        &ins_ts,
        &ins_att,
    ];
    // Pipelined: the server runs them in order on this connection. A statement that
    // fails aborts the transaction, and the COMMIT behind it then rolls back.
    let bump_params: [&(dyn ToSql + Sync); 2] = [&bump_rooms, &bump_last];
    let mark_params: [&(dyn ToSql + Sync); 3] = [&read_room, &read_user, &read_seq];
    if attached.is_empty() {
        tokio::try_join!(
            biased;
            tx.execute(&insert, &insert_params),
            tx.execute(&bump, &bump_params),
            tx.execute(&mark, &mark_params),
            tx.batch_execute("COMMIT"),
        )
        .map_err(BatchError::Pg)?;
        return Ok(results);
    }
    tokio::try_join!(
        biased;
        tx.execute(&insert, &insert_params),
        tx.execute(&bump, &bump_params),
        tx.execute(&mark, &mark_params),
    )
    .map_err(BatchError::Pg)?;
    // Posting a file to a room lets the room's members read it (only the uploader's own
    // files: a file deleted meanwhile is not linked).
    for (file_id, room, sender) in attached {
        tx.execute(
            "INSERT INTO file_rooms (file_id, room)
             SELECT id, $2 FROM files WHERE id = $1 AND owner = $3 ON CONFLICT DO NOTHING",
            &[&file_id, &room, &sender],
        )
        .await
        .map_err(BatchError::Pg)?;
        tx.execute(
            "UPDATE files SET referenced = TRUE WHERE id = $1 AND owner = $2",
            &[&file_id, &sender],
        )
        .await
        .map_err(BatchError::Pg)?;
    }
    tx.batch_execute("COMMIT").await.map_err(BatchError::Pg)?;
    Ok(results)
}

/// Locks the room's row first, as an append batch does, so a membership change and a
/// batch of the same room never hold each other's rows (no deadlock: the batch takes the
/// room and then its members' rows, and so does this).
async fn lock_room(tx: &deadpool_postgres::Transaction<'_>, room: &str) -> StoreResult<()> {
    tx.execute(
        "SELECT 1 FROM rooms WHERE name = $1 FOR NO KEY UPDATE",
        &[&room],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// Adds a member (and counts it) inside `tx`, which holds the room's lock.
async fn add_member(
    tx: &deadpool_postgres::Transaction<'_>,
    room: &str,
    user: &str,
) -> StoreResult<()> {
    let added = tx
        .execute(
            "INSERT INTO members (room, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&room, &user],
        )
        .await
        .map_err(pg)?;
    if added == 1 {
        tx.execute(
            "UPDATE rooms SET members = members + 1 WHERE name = $1",
            &[&room],
        )
        .await
        .map_err(pg)?;
    }
    Ok(())
}

/// Refuses (`TooManyRooms`) when one of `users` is a member of `max_rooms` rooms already
/// (0: no cap; a user already in `joining` may always join it again). Takes each user's
/// membership lock first, held to the end of `tx`: joins of one user take turns on every
/// instance, so the count stays true until the insert commits. The locks come before
/// any room row (and in key order), so they cannot deadlock with an append batch or with
/// each other.
async fn check_room_cap(
    tx: &deadpool_postgres::Transaction<'_>,
    users: &[&str],
    max_rooms: u64,
    joining: Option<&str>,
) -> StoreResult<()> {
    if max_rooms == 0 {
        return Ok(());
    }
    if let (Some(room), [user]) = (joining, users) {
        let member = tx
            .query_opt(
                "SELECT 1 FROM members WHERE room = $1 AND user_id = $2",
                &[&room, user],
            )
            .await
            .map_err(pg)?
            .is_some();
        if member {
            return Ok(());
        }
    }
    tx.execute(
        "SELECT pg_advisory_xact_lock(k) FROM (
            SELECT DISTINCT hashtextextended('parley.rooms_of:' || u, 0) AS k
            FROM unnest($1::text[]) AS u ORDER BY k) AS keys",
        &[&users],
    )
    .await
    .map_err(pg)?;
    for user in users {
        let n = tx
            .query_one(
                "SELECT count(*)::int8 FROM members WHERE user_id = $1",
                &[user],
            )
            .await
            .map_err(pg)?
            .count(0)?;
        if n >= max_rooms {
            return Err(StoreError::TooManyRooms {
                user: user.to_string(),
                max: max_rooms,
            });
        }
    }
    Ok(())
}

async fn create_room_in(
    tx: &deadpool_postgres::Transaction<'_>,
    room: &str,
    private: bool,
) -> StoreResult<bool> {
    Ok(tx
        .execute(
            "INSERT INTO rooms (name, private, created_at) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
            &[&room, &private, &now_ms()],
        )
        .await
        .map_err(pg)?
        == 1)
}

#[async_trait]
impl Store for PostgresStore {
    fn append(&self, message: NewMessage) -> AppendFuture {
        // Queued now, in call order, on the room's writer.
        let writer = &self.writers[writer_of(&message.room, self.writers.len())];
        let (reply, rx) = oneshot::channel();
        let queued = writer
            .send(Job { message, reply })
            .map_err(|_| backend("append writer stopped"));
        Box::pin(async move {
            queued?;
            rx.await.map_err(|_| backend("append writer stopped"))?
        })
    }

    async fn history(&self, room: &str, range: Range, limit: usize) -> StoreResult<Page> {
        let c = self.client().await?;
        let query = History::new(range, limit);
        let sql = if query.backwards {
            format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages m
                 WHERE m.room = $1 AND m.seq < $2 ORDER BY m.seq DESC LIMIT $3"
            )
        } else {
            format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages m
                 WHERE m.room = $1 AND m.seq > $2 ORDER BY m.seq LIMIT $3"
            )
        };
        let st = c.prepare_cached(&sql).await.map_err(pg)?;
        let rows = c
            .query(&st, &[&room, &query.bound, &query.fetch])
            .await
            .map_err(pg)?;
        let messages = rows.iter().map(rows::message).collect::<Result<_, _>>()?;
        Ok(query.page(messages))
    }

    async fn room(&self, room: &str) -> StoreResult<Option<RoomMeta>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!("SELECT {ROOM_COLUMNS} FROM rooms WHERE name = $1"))
            .await
            .map_err(pg)?;
        c.query_opt(&st, &[&room])
            .await
            .map_err(pg)?
            .as_ref()
            .map(rows::room_meta)
            .transpose()
    }

    async fn room_for(&self, room: &str, user: &str) -> StoreResult<Option<(RoomMeta, bool)>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "SELECT {ROOM_COLUMNS}, EXISTS (SELECT 1 FROM members
                 WHERE room = $1 AND user_id = $2) FROM rooms WHERE name = $1"
            ))
            .await
            .map_err(pg)?;
        c.query_opt(&st, &[&room, &user])
            .await
            .map_err(pg)?
            .as_ref()
            .map(rows::room_for)
            .transpose()
    }

    async fn create_room(&self, room: NewRoom<'_>, max_rooms: u64) -> StoreResult<bool> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        check_room_cap(&tx, &[room.creator], max_rooms, None).await?;
        if !create_room_in(&tx, room.name, room.private).await? {
            return Ok(false);
        }
        add_member(&tx, room.name, room.creator).await?;
        tx.commit().await.map_err(pg)?;
        Ok(true)
    }

    async fn ensure_dm(&self, room: &str, a: &str, b: &str, max_rooms: u64) -> StoreResult<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let exists = tx
            .query_opt("SELECT 1 FROM rooms WHERE name = $1", &[&room])
            .await
            .map_err(pg)?
            .is_some();
        if exists {
            return Ok(());
        }
        check_room_cap(&tx, &[a, b], max_rooms, None).await?;
        if create_room_in(&tx, room, true).await? {
            add_member(&tx, room, a).await?;
            add_member(&tx, room, b).await?;
        }
        tx.commit().await.map_err(pg)
    }

    async fn join(&self, room: &str, user: &str, max_rooms: u64) -> StoreResult<RoomMeta> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        check_room_cap(&tx, &[user], max_rooms, Some(room)).await?;
        create_room_in(&tx, room, false).await?;
        lock_room(&tx, room).await?;
        add_member(&tx, room, user).await?;
        let row = tx
            .query_one(
                &format!("SELECT {ROOM_COLUMNS} FROM rooms WHERE name = $1"),
                &[&room],
            )
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        rows::room_meta(&row)
    }

    async fn leave(&self, room: &str, user: &str) -> StoreResult<bool> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        lock_room(&tx, room).await?;
        let left = tx
            .execute(
                "DELETE FROM members WHERE room = $1 AND user_id = $2",
                &[&room, &user],
            )
            .await
            .map_err(pg)?
            == 1;
        if left {
            tx.execute(
                "UPDATE rooms SET members = members - 1 WHERE name = $1",
                &[&room],
            )
            .await
            .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)?;
        Ok(left)
    }

    async fn is_member(&self, room: &str, user: &str) -> StoreResult<bool> {
        let c = self.client().await?;
        let st = c
            .prepare_cached("SELECT 1 FROM members WHERE room = $1 AND user_id = $2")
            .await
            .map_err(pg)?;
        Ok(c.query_opt(&st, &[&room, &user])
            .await
            .map_err(pg)?
            .is_some())
    }

    async fn members(&self, room: &str) -> StoreResult<Vec<String>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT user_id FROM members WHERE room = $1 ORDER BY user_id COLLATE \"C\"",
            )
            .await
            .map_err(pg)?;
        c.query(&st, &[&room])
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.text(0))
            .collect()
    }

    async fn rooms_of(&self, user: &str) -> StoreResult<Vec<RoomState>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "SELECT {ROOM_STATE_COLUMNS} FROM members m JOIN rooms r ON r.name = m.room
                 WHERE m.user_id = $1 ORDER BY r.name COLLATE \"C\""
            ))
            .await
            .map_err(pg)?;
        c.query(&st, &[&user])
            .await
            .map_err(pg)?
            .iter()
            .map(|r| rows::room_state(r, user))
            .collect()
    }

    async fn public_rooms(&self, after: &str, limit: usize) -> StoreResult<Vec<RoomState>> {
        let c = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let st = c
            .prepare_cached(&format!(
                "SELECT {PUBLIC_ROOM_COLUMNS} FROM rooms r
                 WHERE r.private = false AND r.name COLLATE \"C\" > $1
                 ORDER BY r.name COLLATE \"C\" LIMIT $2"
            ))
            .await
            .map_err(pg)?;
        c.query(&st, &[&after, &limit])
            .await
            .map_err(pg)?
            .iter()
            .map(rows::public_room)
            .collect()
    }

    async fn share_a_room(&self, a: &str, b: &str) -> StoreResult<bool> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT 1 FROM members x JOIN members y ON y.room = x.room AND y.user_id = $2
                 WHERE x.user_id = $1 LIMIT 1",
            )
            .await
            .map_err(pg)?;
        Ok(c.query_opt(&st, &[&a, &b]).await.map_err(pg)?.is_some())
    }

    async fn set_read(&self, room: &str, user: &str, seq: u64) -> StoreResult<Option<ReadMarker>> {
        let seq = seq.min(i64::MAX as u64) as i64;
        let c = self.client().await?;
        // One statement: move the marker forward (capped at the room's last seq), then
        // read it back with the room's last seq and whether it moved.
        let row = c
            .query_opt(
                "WITH moved AS (
                    UPDATE members SET read_seq = LEAST($3, r.last_seq)
                    FROM rooms r
                    WHERE r.name = members.room AND members.room = $1
                      AND members.user_id = $2 AND members.read_seq < LEAST($3, r.last_seq)
                    RETURNING members.read_seq
                 )
                 SELECT coalesce((SELECT read_seq FROM moved), m.read_seq), r.last_seq,
                        EXISTS (SELECT 1 FROM moved)
                 FROM members m JOIN rooms r ON r.name = m.room
                 WHERE m.room = $1 AND m.user_id = $2",
                &[&room, &user, &seq],
            )
            .await
            .map_err(pg)?;
        row.as_ref().map(rows::read_marker).transpose()
    }

    fn health(&self) -> Result<(), String> {
        match &*self.health.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(e) => Err(format!("PostgreSQL: {e}")),
        }
    }
}

#[async_trait]
impl FileIndex for PostgresStore {
    async fn insert_file(&self, f: FileRecord, quota: u64) -> StoreResult<Inserted> {
        let quota = quota.min(i64::MAX as u64) as i64;
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        // One owner's uploads take turns (on any instance), so two cannot both pass the
        // quota check.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[&f.owner],
        )
        .await
        .map_err(pg)?;
        let used: i64 = tx
            .query_one(
                "SELECT coalesce(sum(size), 0)::int8 FROM files WHERE owner = $1",
                &[&f.owner],
            )
            .await
            .map_err(pg)?
            .int(0)?;
        if used.saturating_add(f.size as i64) > quota {
            return Ok(Inserted::OverQuota);
        }
        tx.execute(
            &format!(
                "INSERT INTO files ({FILE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            ),
            &[
                &f.id,
                &f.owner,
                &f.name,
                &f.content_type,
                &(f.size as i64),
                &f.sha256,
                &(f.width as i64),
                &(f.height as i64),
                &f.blurhash,
                &f.created_at,
            ],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(Inserted::Ok)
    }

    async fn file(&self, id: &str) -> StoreResult<Option<FileRecord>> {
        let c = self.client().await?;
        Ok(c.query_opt(
            &format!("SELECT {FILE_COLUMNS} FROM files WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(pg)?
        .as_ref()
        .map(rows::file)
        .transpose()?)
    }

    async fn bytes_of(&self, owner: &str) -> StoreResult<u64> {
        let c = self.client().await?;
        let n = c
            .query_one(
                "SELECT coalesce(sum(size), 0)::int8 FROM files WHERE owner = $1",
                &[&owner],
            )
            .await
            .map_err(pg)?
            .count(0)?;
        Ok(n)
    }

    async fn may_read(&self, id: &str, user: &str) -> StoreResult<bool> {
        let c = self.client().await?;
        Ok(c.query_opt(
            "SELECT 1 FROM files WHERE id = $1 AND owner = $2
             UNION ALL
             SELECT 1 FROM file_rooms f JOIN members m ON m.room = f.room
             WHERE f.file_id = $1 AND m.user_id = $2
             LIMIT 1",
            &[&id, &user],
        )
        .await
        .map_err(pg)?
        .is_some())
    }

    async fn delete_file(&self, id: &str, only_orphan: bool) -> StoreResult<bool> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg)?;
        let deleted = tx
            .execute(
                "DELETE FROM files WHERE id = $1 AND (NOT $2 OR NOT referenced)",
                &[&id, &only_orphan],
            )
            .await
            .map_err(pg)?
            == 1;
        if deleted {
            tx.execute("DELETE FROM file_rooms WHERE file_id = $1", &[&id])
                .await
                .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)?;
        Ok(deleted)
    }

    async fn orphans(&self, before_ms: i64, limit: usize) -> StoreResult<Vec<String>> {
        let c = self.client().await?;
        Ok(c.query(
            "SELECT id FROM files WHERE NOT referenced AND created_at < $1 LIMIT $2",
            &[&before_ms, &(limit as i64)],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| r.text(0))
        .collect::<Result<_, _>>()?)
    }
}
