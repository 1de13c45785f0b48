//! The Redis broker: fan-out between instances over Redis pub/sub, presence in Redis keys.
//!
//! One [`redis::aio::ConnectionManager`] (redis-rs, RESP3) carries everything: publishes,
//! subscriptions (pushes arrive on a channel the manager feeds) and presence commands. It
//! reconnects by itself and resubscribes the channels it tracked. With
//! `broker.cluster = true` a [`redis::cluster_async::ClusterConnection`] takes its place
//! ([`Conn`]): one multiplexed connection per node, each command routed to the node that
//! serves its key's slot, following slot moves and reconnecting by itself.
//!
//! - **Publish**: the push is delivered to this instance's sessions first (room messages
//!   through [`RoomOrder`]), then framed once ([`wire`]) and `PUBLISH`ed once on the
//!   target's channel: `room:{room}` (room messages, membership, receipts, typing),
//!   `user:{user}` (signals, large-room notices), `all` (presence, announcements).
//!   Receivers skip envelopes of their own origin, so nothing is delivered twice.
//!   [`Broker::publish`] only queues the envelope (in call order) for one publisher task,
//!   which sends whatever has queued up as one pipeline (up to [`PUBLISH_BATCH`]) and
//!   waits for its replies before the next: a room's next message does not wait for the
//!   previous one's round trip, and the rate of one hot room is bound by Redis' command
//!   rate, not by its latency. The envelopes of one instance still reach Redis in the
//!   order they were queued (one connection, one pipeline at a time).
//! - **Sharded pub/sub** (`broker.pubsub = "sharded"`, Redis 7): the same channels with
//!   `SPUBLISH` / `SSUBSCRIBE` / `SUNSUBSCRIBE`, pushes of kind `smessage`. The
//!   connection manager does not track shard channels, so after a reconnect they are
//!   subscribed again by [`Inner::resubscribe`] alone (as every channel is anyway).
//! - **Redis Cluster** (`broker.cluster = true`, sharded pub/sub required): a room's or
//!   user's shard channel lives on the node that serves its slot, so the fan-out spreads
//!   over the nodes. A cluster refuses a pipeline spanning slots, so a batch of
//!   publishes and a resubscribe are split into one pipeline per slot ([`by_slot`]),
//!   sent concurrently (a channel's envelopes stay in order in its slot's pipeline, and
//!   the next batch waits for all). The cluster client's own resubscription sends every
//!   shard channel in one `SSUBSCRIBE`, which the cluster refuses (`CROSSSLOT`); a lost
//!   node connection comes as a disconnection push, so [`Inner::resubscribe`] subscribes
//!   per slot and repairs, as after a single Redis' restart. Presence keys share one hash
//!   tag ([`Keys`]).
//! - **Interest**: a room's channel is subscribed while the room has local members (the
//!   hub's room size is the reference count), a user's channel while the user has local
//!   sessions; `all` always. Subscription changes go through one task, in order.
//! - **Loss**: while Redis is unreachable, publishes are delivered locally only,
//!   `/readyz` answers 503, and the heartbeat keeps probing. When a probe succeeds
//!   again, every wanted channel is subscribed again and every watched room is repaired
//!   from the log ([`RoomOrder::repair`]); gaps that show up in live traffic are filled
//!   by the order buffer after `broker.gap_hold` anyway.
//! - **Addresses**: every heartbeat also reads the live instances' HTTP addresses into an
//!   address book (bounded), so requests for sessions on other instances are still
//!   relayed while Redis is unreachable (`locate` answers from the book then).
//!
//! Owns: channels, subscriptions, the connection's health. Not: order (`order`), presence
//! keys (`presence`), what to publish (`chat`).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use redis::{
    ConnectionInfo, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClientBuilder, ClusterConfig},
};
use tokio::sync::mpsc;

use bytes::Bytes;

use super::{
    Broker, BrokerError, UserPresence,
    conn::{Conn, by_slot},
    order::{Log, RoomOrder},
    presence::{Keys, Presence},
    wire,
};
use crate::{
    auth::now_ms,
    codec::Push,
    config::{BrokerConfig, PubSubMode},
    delivery::{Hub, Target},
    metrics::BrokerMetrics,
};

/// A subscription or presence change, applied in the order they were made.
enum Change {
    Subscribe {
        channel: String,
        room: Option<String>,
    },
    Unsubscribe(String),
    Publish(String, Bytes),
    /// Publishes this instance's HTTP address (then it is ready).
    Advertise,
    Online(String),
    Offline(String, i64),
}

/// What the publisher task is handed.
enum Outgoing {
    /// An envelope and its channel.
    Envelope(String, Bytes),
    /// Answered once everything queued before it has been sent (or has failed).
    Flush(tokio::sync::oneshot::Sender<()>),
}

#[derive(Default)]
struct Interest {
    rooms: HashSet<String>,
    users: HashSet<String>,
}

struct Inner {
    id: u64,
    keys: Keys,
    conn: Conn,
    /// `SPUBLISH` / `SSUBSCRIBE` instead of `PUBLISH` / `SUBSCRIBE`.
    sharded: bool,
    /// Envelopes for the publisher task, in publish order.
    outgoing: mpsc::Sender<Outgoing>,
    hub: Arc<Hub>,
    order: Arc<RoomOrder>,
    presence: Presence,
    metrics: BrokerMetrics,
    interest: Mutex<Interest>,
    changes: mpsc::UnboundedSender<Change>,
    /// The last probe or command succeeded.
    healthy: AtomicBool,
    /// The connection was lost since the last resubscribe-and-repair.
    lost: AtomicBool,
    /// This instance's HTTP address for the others.
    advertise: Mutex<Option<String>>,
    /// The address has been published once (until then requests for this instance's
    /// sessions cannot be routed here, so it is not ready).
    advertised: AtomicBool,
    /// The last known addresses of live instances (id → HTTP address), refreshed by
    /// every heartbeat and every lookup: what `locate` answers while Redis is down.
    owners: Mutex<HashMap<String, String>>,
}

/// The most instances the address book holds.
const MAX_OWNERS: usize = 1024;

/// The most envelopes the publisher sends as one pipeline.
pub const PUBLISH_BATCH: usize = 512;

/// The most envelopes queued for the publisher; a publish waits for room beyond that (a
/// room's next publish waits with it: back-pressure through the room's turn, bounded by
/// chat's publish timeout).
const PUBLISH_QUEUE: usize = 16 * 1024;

pub struct RedisBroker {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RedisBroker {
    /// Sets up the connection (lazily: it connects in the background, and `/readyz`
    /// says whether it has) and the background tasks. Needs a tokio runtime.
    pub fn new(
        config: &BrokerConfig,
        hub: Arc<Hub>,
        log: Arc<dyn Log>,
        metrics: BrokerMetrics,
    ) -> Result<Self, BrokerError> {
        let err = |e: redis::RedisError| BrokerError::Backend(e.to_string());
        let (push_tx, push_rx) = mpsc::unbounded_channel::<PushInfo>();
        let conn = if config.cluster {
            let seeds = config
                .redis_urls()
                .into_iter()
                .map(|url| url.into_connection_info())
                .collect::<Result<Vec<ConnectionInfo>, _>>()
                .map_err(err)?;
            // Connects in the background: the first command (the heartbeat) waits for it.
            // It reconnects to a node that went away and follows slot moves by itself; the
            // shard channels are subscribed again by `Inner::resubscribe` (the client's
            // own resubscription sends every channel in one command, which a cluster
            // refuses when they span slots).
            let client = ClusterClientBuilder::new(seeds)
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(push_tx)
                .retries(4)
                .max_retry_wait(500)
                .build()
                .map_err(err)?;
            Conn::Cluster(
                client.get_pending_async_connection_with_config(
                    ClusterConfig::new()
                        .set_connection_timeout(Duration::from_secs(2))
                        .set_response_timeout(Duration::from_secs(2)),
                ),
            )
        } else {
            let info = config
                .redis_url
                .as_str()
                .into_connection_info()
                .map_err(err)?;
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3);
            let client = redis::Client::open(info.set_redis_settings(settings)).map_err(err)?;
            let manager = ConnectionManagerConfig::new()
                .set_push_sender(push_tx)
                .set_automatic_resubscription()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(2)))
                .set_max_delay(Duration::from_millis(500))
                .set_number_of_retries(4);
            Conn::Single(ConnectionManager::new_lazy_with_config(client, manager).map_err(err)?)
        };
        let id = rand::random::<u64>();
        let keys = Keys::new(&config.redis_prefix, config.cluster);
        let (changes, changes_rx) = mpsc::unbounded_channel();
        let (outgoing, outgoing_rx) = mpsc::channel(PUBLISH_QUEUE);
        let inner = Arc::new(Inner {
            id,
            keys: keys.clone(),
            conn,
            sharded: config.pubsub == PubSubMode::Sharded,
            outgoing,
            order: Arc::new(RoomOrder::new(
                hub.clone(),
                log,
                config.gap_hold,
                metrics.clone(),
            )),
            hub,
            presence: Presence {
                keys: keys.clone(),
                instance: id,
                ttl: config.presence_ttl,
                last_seen_ttl: config.last_seen_ttl,
            },
            metrics,
            interest: Mutex::default(),
            changes,
            healthy: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            advertise: Mutex::default(),
            advertised: AtomicBool::new(false),
            owners: Mutex::default(),
        });
        let _ = inner.changes.send(Change::Subscribe {
            channel: keys.all_channel(),
            room: None,
        });
        tokio::spawn(receive(Arc::downgrade(&inner), push_rx));
        tokio::spawn(apply_changes(Arc::downgrade(&inner), changes_rx));
        tokio::spawn(publisher(Arc::downgrade(&inner), outgoing_rx));
        tokio::spawn(heartbeat(Arc::downgrade(&inner), config.presence_heartbeat));
        tracing::info!(instance = format!("{id:x}"), "redis broker");
        Ok(Self { inner })
    }

    /// The last seq this instance delivered in `room`, if it watches the room.
    pub fn last_delivered(&self, room: &str) -> Option<u64> {
        self.inner.order.last_delivered(room)
    }
}

impl Inner {
    fn publish_command(&self) -> &'static str {
        if self.sharded { "SPUBLISH" } else { "PUBLISH" }
    }

    /// Subscribes `channels`, one command per channel sent as one pipeline. (A command
    /// naming several channels gets one reply per channel, and the extra replies would
    /// answer other commands in flight on the multiplexed connection.) One classic
    /// channel goes through the manager's `subscribe`, which remembers it for its
    /// automatic resubscription; the rest are subscribed again by [`Self::resubscribe`].
    async fn subscribe(&self, conn: &mut Conn, channels: &[String]) -> redis::RedisResult<()> {
        match channels {
            [] => Ok(()),
            [one]
                if !self.sharded
                    && let Conn::Single(conn) = conn =>
            {
                conn.subscribe(one).await
            }
            _ if conn.is_cluster() => {
                // One pipeline per slot (a cluster node refuses a pipeline that spans
                // slots), sent concurrently.
                let sends = by_slot(channels, |c| c.as_str()).into_iter().map(|group| {
                    let mut conn = conn.clone();
                    async move {
                        let mut pipe = redis::pipe();
                        for channel in group {
                            pipe.cmd("SSUBSCRIBE").arg(channel).ignore();
                        }
                        pipe.exec_async(&mut conn).await
                    }
                });
                futures_util::future::join_all(sends)
                    .await
                    .into_iter()
                    .collect()
            }
            _ => {
                let command = if self.sharded {
                    "SSUBSCRIBE"
                } else {
                    "SUBSCRIBE"
                };
                let mut pipe = redis::pipe();
                for channel in channels {
                    pipe.cmd(command).arg(channel).ignore();
                }
                pipe.exec_async(conn).await
            }
        }
    }

    async fn unsubscribe(&self, conn: &mut Conn, channel: &str) -> redis::RedisResult<()> {
        match conn {
            Conn::Single(conn) if !self.sharded => conn.unsubscribe(channel).await,
            _ => {
                redis::cmd("SUNSUBSCRIBE")
                    .arg(channel)
                    .exec_async(conn)
                    .await
            }
        }
    }

    fn channel_of(&self, target: &Target) -> String {
        match target {
            Target::Room(room) | Target::RoomExcept { room, .. } => self.keys.room_channel(room),
            Target::User(user) => self.keys.user_channel(user),
            Target::CoMembers { .. } | Target::All => self.keys.all_channel(),
        }
    }

    /// Delivers to this instance's sessions: room messages in order, the rest at once.
    fn deliver_here(&self, target: &Target, push: Arc<Push>, seq: u64) {
        match target {
            Target::Room(room) if seq > 0 => self.order.on_message(room, seq, push),
            _ => {
                self.hub.deliver(target, &push);
            }
        }
    }

    /// A user with sessions here joined or left a room on another instance.
    fn apply_member(&self, n: &wire::MemberNotice) {
        if !self.hub.is_local(&n.user) {
            return;
        }
        if n.joined {
            self.hub.joined(&n.user, &n.room, None);
            self.watch_room(&n.room, n.last_seq);
        } else {
            self.hub.left(&n.user, &n.room);
            self.unwatch_rooms(std::iter::once(n.room.as_str()));
        }
    }

    fn watch_room(&self, room: &str, last_seq: u64) {
        if self.hub.room_size(room) == 0 {
            return;
        }
        let mut interest = lock(&self.interest);
        if interest.rooms.insert(room.to_string()) {
            self.order.watch(room, last_seq);
            let _ = self.changes.send(Change::Subscribe {
                channel: self.keys.room_channel(room),
                room: Some(room.to_string()),
            });
        }
    }

    fn unwatch_rooms<'a>(&self, rooms: impl Iterator<Item = &'a str>) {
        let mut interest = lock(&self.interest);
        for room in rooms {
            if self.hub.room_size(room) == 0 && interest.rooms.remove(room) {
                self.order.forget(room);
                let _ = self
                    .changes
                    .send(Change::Unsubscribe(self.keys.room_channel(room)));
            }
        }
    }

    fn notify_member(&self, user: &str, room: &str, joined: bool, last_seq: u64) {
        let bytes = wire::encode_member(&wire::MemberNotice {
            origin: self.id,
            joined,
            last_seq,
            user: user.to_string(),
            room: room.to_string(),
        });
        let _ = self
            .changes
            .send(Change::Publish(self.keys.user_channel(user), bytes));
    }

    /// Subscribes `channel` again if this instance still wants it (a node dropped it; or
    /// this instance did and wants it again, when the subscribe is a no-op).
    fn still_wanted(&self, channel: &str) {
        let interest = lock(&self.interest);
        let room = self.keys.room_of_channel(channel);
        let wanted = channel == self.keys.all_channel()
            || room.is_some_and(|r| interest.rooms.contains(r))
            || self
                .keys
                .user_of_channel(channel)
                .is_some_and(|u| interest.users.contains(u));
        if wanted {
            tracing::info!(
                channel,
                "shard channel dropped by its node: subscribing again"
            );
            let _ = self.changes.send(Change::Subscribe {
                channel: channel.to_string(),
                room: room.map(str::to_string),
            });
        }
    }

    fn set_down(&self, why: &dyn std::fmt::Display) {
        if self.healthy.swap(false, Ordering::SeqCst) {
            tracing::warn!(error = %why, "redis unreachable: delivering locally only");
        }
        self.lost.store(true, Ordering::SeqCst);
    }

    /// Subscribes every wanted channel again and repairs every watched room.
    async fn resubscribe(self: &Arc<Self>) {
        let (rooms, users) = {
            let i = lock(&self.interest);
            (
                i.rooms.iter().cloned().collect::<Vec<_>>(),
                i.users.iter().cloned().collect::<Vec<_>>(),
            )
        };
        let mut channels = vec![self.keys.all_channel()];
        channels.extend(rooms.iter().map(|r| self.keys.room_channel(r)));
        channels.extend(users.iter().map(|u| self.keys.user_channel(u)));
        let mut conn = self.conn.clone();
        for chunk in channels.chunks(256) {
            if let Err(e) = self.subscribe(&mut conn, chunk).await {
                self.set_down(&e);
                return;
            }
        }
        // A restarted Redis lost the presence keys: write this instance's users again.
        if let Err(e) = self.presence.restore(&mut conn, &users).await {
            self.set_down(&e);
            return;
        }
        self.metrics.resubscribes.inc();
        tracing::info!(
            rooms = rooms.len(),
            users = users.len(),
            "redis back: resubscribed; repairing rooms from the log"
        );
        for room in rooms {
            self.order.repair(&room).await;
        }
    }
}

/// Dispatches what Redis pushes: messages of subscribed channels, disconnect notices.
async fn receive(inner: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<PushInfo>) {
    while let Some(info) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        match info.kind {
            PushKind::Message | PushKind::SMessage => {
                let Some(Value::BulkString(bytes)) = info.data.get(1) else {
                    continue;
                };
                let env = match wire::decode(bytes) {
                    Ok(wire::Incoming::Push(env)) => env,
                    Ok(wire::Incoming::Member(n)) => {
                        if n.origin != inner.id {
                            inner.apply_member(&n);
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "dropping a malformed envelope");
                        continue;
                    }
                };
                if env.origin == inner.id {
                    continue;
                }
                inner.metrics.received.inc();
                let lag = (now_ms() - env.sent_ms).max(0) as f64 / 1000.0;
                inner.metrics.receive_lag.observe(lag);
                let push = Arc::new(Push::new(env.kind));
                inner.deliver_here(&env.target, push, env.seq);
            }
            PushKind::Disconnection => inner.set_down(&"connection closed"),
            // A cluster node drops the shard channels of a slot that moved to another
            // node (resharding, failover): subscribe again where it lives now.
            PushKind::SUnsubscribe if inner.conn.is_cluster() => {
                if let Some(Value::BulkString(channel)) = info.data.first() {
                    inner.still_wanted(&String::from_utf8_lossy(channel));
                }
            }
            _ => {}
        }
    }
}

/// Applies subscription and presence changes one at a time, in order.
async fn apply_changes(inner: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<Change>) {
    while let Some(change) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let mut conn = inner.conn.clone();
        let result = match change {
            Change::Subscribe { channel, room } => {
                let r = inner
                    .subscribe(&mut conn, std::slice::from_ref(&channel))
                    .await;
                if r.is_ok()
                    && let Some(room) = room
                {
                    // Publishes made before the subscription took effect are in the log.
                    let order = inner.order.clone();
                    tokio::spawn(async move { order.repair(&room).await });
                }
                r
            }
            Change::Unsubscribe(channel) => inner.unsubscribe(&mut conn, &channel).await,
            Change::Publish(channel, bytes) => redis::cmd(inner.publish_command())
                .arg(channel)
                .arg(&bytes[..])
                .exec_async(&mut conn)
                .await
                .inspect(|_| {
                    inner.metrics.publishes.inc();
                }),
            Change::Online(user) => inner.presence.online(&mut conn, &user).await,
            Change::Advertise => {
                let addr = lock(&inner.advertise).clone();
                let r = inner
                    .presence
                    .heartbeat(&mut conn, addr.as_deref(), now_ms())
                    .await;
                if r.is_ok() {
                    inner.advertised.store(true, Ordering::SeqCst);
                }
                r
            }
            Change::Offline(user, at) => inner.presence.offline(&mut conn, &user, at).await,
        };
        if let Err(e) = result {
            inner.set_down(&e);
        }
    }
}

/// Sends the queued envelopes: whatever has queued up (at most [`PUBLISH_BATCH`]) as one
/// pipeline, then waits for its replies before the next, so envelopes reach Redis in
/// queue order and a burst costs one round trip per batch, not per envelope. A failed
/// batch is dropped (receivers repair room messages from the log) and marks Redis down.
async fn publisher(inner: Weak<Inner>, mut rx: mpsc::Receiver<Outgoing>) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    let mut flushes = Vec::new();
    while rx.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        let Some(inner) = inner.upgrade() else { return };
        let command = inner.publish_command();
        let mut envelopes = Vec::with_capacity(batch.len());
        for item in batch.drain(..) {
            match item {
                Outgoing::Envelope(channel, bytes) => envelopes.push((channel, bytes)),
                Outgoing::Flush(done) => flushes.push(done),
            }
        }
        let n = envelopes.len() as u64;
        if n > 0 {
            let result = if inner.conn.is_cluster() {
                // One pipeline per slot, concurrently: a channel's envelopes stay in
                // order within its slot's pipeline, and the next batch waits for all.
                let sends = by_slot(envelopes, |(channel, _)| channel.as_str())
                    .into_iter()
                    .map(|group| {
                        let mut conn = inner.conn.clone();
                        async move {
                            publish_pipeline(command, &group)
                                .exec_async(&mut conn)
                                .await
                        }
                    });
                futures_util::future::join_all(sends)
                    .await
                    .into_iter()
                    .collect()
            } else {
                let mut conn = inner.conn.clone();
                publish_pipeline(command, &envelopes)
                    .exec_async(&mut conn)
                    .await
            };
            match result {
                Ok(()) => {
                    inner.metrics.publishes.inc_by(n);
                    inner.metrics.publish_batches.inc();
                }
                Err(e) => {
                    inner.metrics.publish_failures.inc_by(n);
                    tracing::warn!(error = %e, envelopes = n, "publish failed");
                    inner.set_down(&e);
                }
            }
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

fn publish_pipeline(command: &str, envelopes: &[(String, Bytes)]) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for (channel, bytes) in envelopes {
        pipe.cmd(command).arg(channel).arg(&bytes[..]).ignore();
    }
    pipe
}

/// Probes Redis and refreshes presence every `every`; after a loss, resubscribes and
/// repairs once Redis answers again.
async fn heartbeat(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let mut conn = inner.conn.clone();
        let advertise = lock(&inner.advertise).clone();
        match inner
            .presence
            .heartbeat(&mut conn, advertise.as_deref(), now_ms())
            .await
        {
            Ok(()) => {
                if advertise.is_some() {
                    inner.advertised.store(true, Ordering::SeqCst);
                }
                if !inner.healthy.swap(true, Ordering::SeqCst) {
                    tracing::info!("redis reachable");
                }
                if inner.lost.swap(false, Ordering::SeqCst) {
                    inner.resubscribe().await;
                }
                match inner
                    .presence
                    .addresses(&mut conn, now_ms(), MAX_OWNERS)
                    .await
                {
                    Ok(book) => *lock(&inner.owners) = book.into_iter().collect(),
                    Err(e) => tracing::debug!(error = %e, "reading instance addresses failed"),
                }
            }
            Err(e) => inner.set_down(&e),
        }
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, target: Target, push: Arc<Push>) -> Result<(), BrokerError> {
        let inner = &self.inner;
        let seq = wire::message_seq(&push, &target);
        let bytes = wire::encode(inner.id, now_ms(), &target, &push);
        let channel = inner.channel_of(&target);
        inner.deliver_here(&target, push, seq);
        if !inner.healthy.load(Ordering::SeqCst) {
            // Other instances repair messages from the log once Redis is back; ephemeral
            // pushes (typing, presence) are lost, as over any dropped connection.
            inner.metrics.publish_failures.inc();
            return Err(BrokerError::Backend("redis unreachable".into()));
        }
        // Queued in call order; the publisher task sends it (and counts a failure).
        let envelope = Outgoing::Envelope(channel, bytes);
        inner.outgoing.send(envelope).await.map_err(|_| {
            inner.metrics.publish_failures.inc();
            BrokerError::Backend("publisher stopped".into())
        })
    }

    async fn flush(&self) {
        let (done, sent) = tokio::sync::oneshot::channel();
        if self
            .inner
            .outgoing
            .send(Outgoing::Flush(done))
            .await
            .is_ok()
        {
            let _ = sent.await;
        }
    }

    fn watch_room(&self, room: &str, last_seq: u64) {
        self.inner.watch_room(room, last_seq);
    }

    fn unwatch_rooms(&self, rooms: &mut dyn Iterator<Item = &str>) {
        self.inner.unwatch_rooms(rooms);
    }

    fn member_joined(&self, user: &str, room: &str, last_seq: u64) {
        self.inner.watch_room(room, last_seq);
        self.inner.notify_member(user, room, true, last_seq);
    }

    fn member_left(&self, user: &str, room: &str) {
        self.inner.unwatch_rooms(std::iter::once(room));
        self.inner.notify_member(user, room, false, 0);
    }

    fn user_online(&self, user: &str) {
        let inner = &self.inner;
        let mut interest = lock(&inner.interest);
        if interest.users.insert(user.to_string()) {
            let _ = inner.changes.send(Change::Subscribe {
                channel: inner.keys.user_channel(user),
                room: None,
            });
            let _ = inner.changes.send(Change::Online(user.to_string()));
        }
    }

    fn user_offline(&self, user: &str, at: i64) {
        let inner = &self.inner;
        let mut interest = lock(&inner.interest);
        if !inner.hub.is_local(user) && interest.users.remove(user) {
            let _ = inner
                .changes
                .send(Change::Unsubscribe(inner.keys.user_channel(user)));
            let _ = inner.changes.send(Change::Offline(user.to_string(), at));
        }
    }

    async fn presence(&self, users: &[String]) -> Result<Option<Vec<UserPresence>>, BrokerError> {
        let mut conn = self.inner.conn.clone();
        self.inner
            .presence
            .query(&mut conn, users, now_ms())
            .await
            .map(Some)
            .map_err(|e| BrokerError::Backend(e.to_string()))
    }

    async fn online_elsewhere(&self, user: &str) -> bool {
        if !self.inner.healthy.load(Ordering::SeqCst) {
            return false;
        }
        let mut conn = self.inner.conn.clone();
        self.inner
            .presence
            .online_elsewhere(&mut conn, user, now_ms())
            .await
            .unwrap_or(false)
    }

    async fn orphaned_users(&self) -> Vec<(String, i64)> {
        if !self.inner.healthy.load(Ordering::SeqCst) {
            return Vec::new();
        }
        let mut conn = self.inner.conn.clone();
        match self.inner.presence.claim_dead(&mut conn, now_ms()).await {
            Ok(users) => users,
            Err(e) => {
                tracing::warn!(error = %e, "presence: claiming dead instances failed");
                Vec::new()
            }
        }
    }

    fn instance(&self) -> Option<String> {
        Some(format!("{:x}", self.inner.id))
    }

    fn advertise(&self, addr: String) {
        *lock(&self.inner.advertise) = Some(addr);
        let _ = self.inner.changes.send(Change::Advertise);
    }

    async fn locate(&self, instance: &str) -> Option<String> {
        let inner = &self.inner;
        let known = || lock(&inner.owners).get(instance).cloned();
        if !inner.healthy.load(Ordering::SeqCst) {
            // Redis is down: the last known address (a relay that fails serves here).
            return known();
        }
        let mut conn = inner.conn.clone();
        match inner.presence.locate(&mut conn, instance).await {
            Ok(Some(addr)) => {
                let mut owners = lock(&inner.owners);
                if owners.len() < MAX_OWNERS || owners.contains_key(instance) {
                    owners.insert(instance.to_string(), addr.clone());
                }
                Some(addr)
            }
            Ok(None) => {
                lock(&inner.owners).remove(instance);
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, instance, "locate failed: using the address book");
                known()
            }
        }
    }

    fn health(&self) -> Result<(), String> {
        if !self.inner.healthy.load(Ordering::SeqCst) {
            Err("redis unreachable".into())
        } else if lock(&self.inner.advertise).is_some()
            && !self.inner.advertised.load(Ordering::SeqCst)
        {
            Err("address not yet published".into())
        } else {
            Ok(())
        }
    }
}
