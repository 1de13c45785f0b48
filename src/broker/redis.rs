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
//!   over the nodes. A cluster refuses a pipeline spanning slots, so publishes queue per
//!   slot ([`cluster_publisher`]: one pipeline in flight per slot, so a channel's
//!   envelopes stay in order, while the other slots go on) and a resubscribe sends one
//!   pipeline per slot ([`by_slot`]). The cluster client's own resubscription sends
//!   every shard channel in one `SSUBSCRIBE`, which the cluster refuses (`CROSSSLOT`).
//!   Presence keys share one hash tag ([`Keys`]).
//! - **Cluster health, per slot, judged per node**: a command that fails for a channel
//!   marks that channel's slot down ([`Slots`]), not Redis, and with a node-level error
//!   (refused, dropped, timed out) every slot of its node at once, by the slot map read
//!   from `CLUSTER SHARDS` ([`Topology`]; read at the first heartbeat, every
//!   [`TOPOLOGY_REFRESH`], and when a probe fails or a slot moves): publishes to a down
//!   slot are delivered here only, its subscriptions wait. Every heartbeat probes each
//!   node of the channels wanted here and each dead node with one command
//!   ([`Inner::probe_nodes`]: so an instance that only receives from a hung node finds
//!   it too), and the down slots of nodes the map does not know one by one; a node or
//!   slot that answers gets its wanted channels subscribed again and its rooms repaired
//!   from the log ([`Inner::recover_slots`]). The map only picks what is probed and
//!   marked (the client routes by its own): a stale one delays, never loses. Rooms on
//!   other nodes deliver as before. A lost
//!   node connection comes as a disconnection push that does not say which node, so the
//!   next heartbeat subscribes every slot's channels again (a no-op where they still
//!   are) with `CLIENT GETNAME`: each node connection is named (`CLIENT SETNAME`) the
//!   first time it is seen, so a slot whose connection has another name than the one
//!   its channels were subscribed on lost them, and only those slots' rooms are
//!   repaired. The presence node failing makes presence unavailable (`healthy` is
//!   false: queries fail, changes are written again by [`Inner::restore_presence`]) and
//!   nothing else; `/readyz` fails only when no node answers. redis-rs 1.2's cluster
//!   connection holds every command while it refreshes its slot map or reconnects a
//!   node (after a refused or dropped connection), and hundreds of commands failing at
//!   once against a dead node stalled it for good under load: a recovery sends
//!   [`RECOVERY_CONCURRENCY`] slots at a time, and the publisher and the change queue
//!   [`NODE_CONCURRENCY`] slots per node each ([`NodeLimit`]).
//! - **A node that hangs** (stopped, or a network black hole: connections stay open,
//!   nothing is answered): its commands time out after 2 s in all, retries included,
//!   which marks their slots down; a timeout does not make the client reconnect, so the
//!   other nodes' commands go on meanwhile. Subscription and presence changes queue per
//!   slot ([`cluster_changes`]), like publishes: a subscription on another node does not
//!   wait behind one on the hung node. An instance that only receives from the hung node
//!   finds it by its probe timing out (its subscriptions there pause, not drop), and
//!   repairs those rooms from the log when the probe answers again.
//! - **Interest**: a room's channel is subscribed while the room has local members (the
//!   hub's room size is the reference count), a user's channel while the user has local
//!   sessions; `all` always. Subscription changes go through one task, in order.
//! - **Loss** (one Redis): while Redis is unreachable, publishes are delivered locally only,
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
    topology::{Node, NodeLimit, Slot, Topology},
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

/// What this instance knows of the slots its channels live in (Redis Cluster only): the
/// node of each slot is judged by what was sent to that slot, so a node that fails
/// degrades its own slots and no other.
#[derive(Default)]
struct Slots {
    /// Slots whose node failed a command, each with one of its channels (to probe it):
    /// publishes to them are delivered here only; the heartbeat probes them, subscribes
    /// their channels again and repairs their rooms from the log once they answer.
    down: HashMap<Slot, String>,
    /// Slots whose node connection was found replaced (its subscriptions were lost with
    /// the old one) while the node answers: the next heartbeat subscribes their channels
    /// again and repairs their rooms; publishes go on meanwhile.
    stale: HashSet<Slot>,
    /// The name (`CLIENT SETNAME`, unique per connection) of the node connection each
    /// slot's channels were last subscribed on: another name means a new connection.
    names: HashMap<Slot, String>,
    /// Nodes found dead (a probe, or a command that failed for a node-level reason:
    /// refused, dropped, timed out), each with a key of one of its slots to probe it
    /// with: every slot the map gives them counts as down, wanted here or not.
    dead: HashMap<Node, String>,
    /// Which node serves which slot, as last read (`None` until the first read).
    topology: Option<Arc<Topology>>,
}

impl Slots {
    /// Whether `slot` is down: itself, or its node.
    fn is_down(&self, slot: Slot) -> bool {
        self.down.contains_key(&slot)
            || (!self.dead.is_empty()
                && self
                    .topology
                    .as_ref()
                    .and_then(|t| t.node_of(slot))
                    .is_some_and(|n| self.dead.contains_key(n)))
    }
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
    /// The connection was lost since the last resubscribe-and-repair (with a cluster: a
    /// node connection was lost somewhere, so every slot is checked at the next
    /// heartbeat).
    lost: AtomicBool,
    /// Cluster only: the presence node failed since this instance last wrote its users.
    presence_lost: AtomicBool,
    /// Cluster only: users whose last session here ended while the presence node was
    /// down (user → when), written when it answers again.
    offline_missed: Mutex<HashMap<String, i64>>,
    /// Cluster only: the health of the slots this instance's channels live in.
    slots: Mutex<Slots>,
    /// Cluster only: `slots.down` is not empty (read on every publish without the lock).
    any_down: AtomicBool,
    /// Cluster only: a slot recovery is running (one at a time).
    recovering: AtomicBool,
    /// Cluster only: read the slot → node map again at the next heartbeat (a probe
    /// failed, a slot moved, or the last read failed).
    refresh_topology: AtomicBool,
    /// Cluster only: when the map was last read.
    topology_read: Mutex<Option<tokio::time::Instant>>,
    /// Cluster only: the heartbeat to the presence node succeeded once.
    reached: AtomicBool,
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

/// Cluster: the most slots a recovery subscribes at once.
const RECOVERY_CONCURRENCY: usize = 8;

/// Cluster: the most pipelines in flight per node, for the publisher and for the
/// subscription changes each (a dead node's commands wait behind each other, and are
/// dropped once the first failure marks it; the other nodes' go on).
const NODE_CONCURRENCY: usize = 16;

/// Cluster: the slot → node map is read again at least this often (and whenever a probe
/// fails or a slot moves).
const TOPOLOGY_REFRESH: Duration = Duration::from_secs(30);

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
                // A command fails after this long in all, retries included (by default
                // each retry waits its own response timeout: ~10 s against a node that
                // hangs before its slot is marked down).
                .response_timeout(Duration::from_secs(2))
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
            presence_lost: AtomicBool::new(false),
            offline_missed: Mutex::default(),
            slots: Mutex::default(),
            any_down: AtomicBool::new(false),
            recovering: AtomicBool::new(false),
            refresh_topology: AtomicBool::new(false),
            topology_read: Mutex::default(),
            reached: AtomicBool::new(false),
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
    /// (One Redis; a cluster's channels go through [`Self::subscribe_slot`].)
    async fn subscribe(&self, conn: &mut Conn, channels: &[String]) -> redis::RedisResult<()> {
        match channels {
            [] => Ok(()),
            [one]
                if !self.sharded
                    && let Conn::Single(conn) = conn =>
            {
                conn.subscribe(one).await
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

    /// Cluster: the node of `channel`'s slot failed a command. Its publishes are
    /// delivered here only and its channels wait for the heartbeat to find it again.
    /// A node-level failure (anything but an error reply: refused, dropped, timed out)
    /// marks every slot the map gives the node ([`Self::node_down`]).
    fn slot_down(&self, channel: &str, why: &redis::RedisError) {
        let slot = Slot::for_key(channel);
        if !matches!(why.kind(), redis::ErrorKind::Server(_))
            && let Some(node) = self.topology().and_then(|t| t.node_of(slot).cloned())
        {
            return self.node_down(&node, channel, why);
        }
        let mut slots = lock(&self.slots);
        if let std::collections::hash_map::Entry::Vacant(e) = slots.down.entry(slot) {
            e.insert(channel.to_string());
            tracing::warn!(
                error = %why,
                channel,
                "redis cluster: the node of this channel's slot failed: its rooms deliver \
                 here only until it answers again"
            );
            self.slots_changed(&slots);
        }
    }

    /// Cluster: `node` failed (a command to `key`'s slot, or its probe): every slot the
    /// map gives it is down at once, so publishes to any of them are delivered here
    /// only without being sent, and one probe per heartbeat finds it again
    /// ([`Self::probe_nodes`]). The slots of the channels wanted here are marked
    /// degraded (so recovery subscribes them again and repairs their rooms).
    fn node_down(&self, node: &Node, key: &str, why: &dyn std::fmt::Display) {
        if lock(&self.slots).dead.contains_key(node) {
            return;
        }
        let (_, _, channels) = self.wanted();
        let mut slots = lock(&self.slots);
        let Some(topology) = slots.topology.clone() else {
            return;
        };
        if slots.dead.contains_key(node) {
            return;
        }
        slots.dead.insert(node.clone(), key.to_string());
        let before = slots.down.len();
        for channel in std::iter::once(key.to_string()).chain(channels) {
            let slot = Slot::for_key(&channel);
            if topology.node_of(slot) == Some(node) {
                slots.down.entry(slot).or_insert(channel);
            }
        }
        tracing::warn!(
            error = %why,
            node = %node,
            slots = slots.down.len() - before,
            "redis cluster: a node failed: the rooms and users on its slots deliver here \
             only until it answers again"
        );
        self.slots_changed(&slots);
        // The map may be what is wrong (a failover, a move): read it again.
        self.refresh_topology.store(true, Ordering::SeqCst);
    }

    fn slots_changed(&self, slots: &Slots) {
        self.any_down.store(
            !slots.down.is_empty() || !slots.dead.is_empty(),
            Ordering::SeqCst,
        );
        self.metrics.degraded_slots.set(slots.down.len() as i64);
    }

    /// Cluster: whether `channel`'s slot is down, or its node (cheap while nothing is).
    fn is_slot_down(&self, channel: &str) -> bool {
        self.any_down.load(Ordering::SeqCst) && lock(&self.slots).is_down(Slot::for_key(channel))
    }

    /// Cluster: the slot → node map, if read.
    fn topology(&self) -> Option<Arc<Topology>> {
        lock(&self.slots).topology.clone()
    }

    /// Cluster: reads the slot → node map (`CLUSTER SHARDS`; `CLUSTER SLOTS` from a
    /// server without it) if it is due: never read, flagged, or older than
    /// [`TOPOLOGY_REFRESH`]. A failed read keeps the old map and is tried again at the
    /// next heartbeat.
    async fn refresh_topology(&self) {
        let flagged = self.refresh_topology.swap(false, Ordering::SeqCst);
        let stale = lock(&self.topology_read).is_none_or(|at| at.elapsed() >= TOPOLOGY_REFRESH);
        if !flagged && !stale {
            return;
        }
        let mut conn = self.conn.clone();
        let read = match redis::cmd("CLUSTER")
            .arg("SHARDS")
            .query_async::<Value>(&mut conn)
            .await
        {
            Ok(reply) => Ok(Topology::from_shards(&reply)),
            // An error reply: a server older than 7.0 (no CLUSTER SHARDS).
            Err(e) if matches!(e.kind(), redis::ErrorKind::Server(_)) => redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Value>(&mut conn)
                .await
                .map(|reply| Topology::from_slots(&reply)),
            Err(e) => Err(e),
        };
        match read {
            Ok(Some(topology)) => {
                *lock(&self.topology_read) = Some(tokio::time::Instant::now());
                let mut slots = lock(&self.slots);
                if slots.topology.as_deref() != Some(&topology) {
                    tracing::info!(nodes = topology.nodes(), "redis cluster: slot map read");
                    slots.topology = Some(Arc::new(topology));
                    self.slots_changed(&slots);
                }
            }
            Ok(None) => {
                tracing::warn!("redis cluster: the slot map did not parse");
                self.refresh_topology.store(true, Ordering::SeqCst);
            }
            Err(e) => {
                tracing::debug!(error = %e, "redis cluster: reading the slot map failed");
                self.refresh_topology.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Cluster: probes every node that serves a channel wanted here, and every node
    /// known dead, with one command each (`EXISTS` of one of its channels, routed by the
    /// key's slot), all at once. A node that fails (refused, or no answer within the
    /// client's 2 s) is marked dead with all its slots ([`Self::node_down`]): also when
    /// this instance only receives from it, so that it repairs those rooms from the log
    /// when the node is back. Returns the dead nodes that answered (no longer dead:
    /// their slots are subscribed again and repaired next).
    async fn probe_nodes(&self) -> Vec<Node> {
        let Some(topology) = self.topology() else {
            return Vec::new();
        };
        let (_, _, channels) = self.wanted();
        let dead = lock(&self.slots).dead.clone();
        let mut keys: HashMap<Node, String> = dead.clone();
        for channel in channels {
            if let Some(node) = topology.node_of(Slot::for_key(&channel))
                && !keys.contains_key(node)
            {
                keys.insert(node.clone(), channel);
            }
        }
        let probes = keys.into_iter().map(|(node, key)| async move {
            let mut conn = self.conn.clone();
            let r = redis::cmd("EXISTS")
                .arg(&key)
                .query_async::<i64>(&mut conn)
                .await;
            (node, key, r)
        });
        let mut back = Vec::new();
        for (node, key, result) in futures_util::future::join_all(probes).await {
            match result {
                Ok(_) if dead.contains_key(&node) => {
                    let mut slots = lock(&self.slots);
                    slots.dead.remove(&node);
                    self.slots_changed(&slots);
                    back.push(node);
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), redis::ErrorKind::Server(_)) => {
                    tracing::debug!(error = %e, node = %node, "redis cluster: probe refused");
                }
                Err(e) => self.node_down(&node, &key, &e),
            }
        }
        back
    }

    /// Cluster: subscribes `channels` (all in `key`'s slot, maybe none) on the node that
    /// serves the slot, probing it with `key` (a channel of the slot), and names the node
    /// connection if it has no name yet (it is new). Returns whether the connection
    /// differs from the one the slot's channels were last subscribed on, so that they
    /// were lost with that one.
    async fn subscribe_slot(&self, key: &str, channels: &[String]) -> redis::RedisResult<bool> {
        let mut conn = self.conn.clone();
        let mut chunks: Vec<&[String]> = channels.chunks(256).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let mut name = None;
        for chunk in chunks {
            let mut pipe = redis::pipe();
            pipe.cmd("CLIENT").arg("GETNAME");
            // Routes the pipeline to the slot's node (CLIENT has no key), also when there
            // is no channel to subscribe.
            pipe.cmd("EXISTS").arg(key).ignore();
            for channel in chunk {
                pipe.cmd("SSUBSCRIBE").arg(channel).ignore();
            }
            let (got,): (Option<String>,) = pipe.query_async(&mut conn).await?;
            name = name.or(Some(got));
        }
        let name = match name.flatten() {
            Some(name) => name,
            None => {
                // A name that only this connection can have (the node process's run id
                // and the connection's id there), the same whichever slot's recovery
                // sets it: concurrent recoveries of slots of one node agree on it.
                let (id, info): (i64, String) = redis::pipe()
                    .cmd("CLIENT")
                    .arg("ID")
                    .cmd("INFO")
                    .arg("server")
                    .cmd("EXISTS")
                    .arg(key)
                    .ignore()
                    .query_async(&mut conn)
                    .await?;
                let run = info
                    .lines()
                    .find_map(|l| l.strip_prefix("run_id:"))
                    .unwrap_or_default()
                    .trim();
                let name = format!("parley-{:x}-{run}-{id}", self.id);
                redis::pipe()
                    .cmd("CLIENT")
                    .arg("SETNAME")
                    .arg(&name)
                    .ignore()
                    .cmd("EXISTS")
                    .arg(key)
                    .ignore()
                    .exec_async(&mut conn)
                    .await?;
                name
            }
        };
        let previous = lock(&self.slots)
            .names
            .insert(Slot::for_key(key), name.clone());
        Ok(previous.is_some_and(|p| p != name))
    }

    /// Cluster: subscribes the channels of the slots that need it again and repairs their
    /// rooms from the log: with `every`, each slot with a wanted channel (a node
    /// connection was lost somewhere; the slots whose connection was replaced need it);
    /// otherwise the down and stale slots, and those of the nodes in `back` (found again
    /// by their probe). Rooms of slots whose node connection survived are left alone.
    /// The slots of a node known dead are not tried: its probe stands for them.
    async fn recover_slots(self: &Arc<Self>, every: bool, back: &[Node]) {
        let (_, _, channels) = self.wanted();
        let (down, stale, dead, topology) = {
            let s = lock(&self.slots);
            (
                s.down.clone(),
                s.stale.clone(),
                s.dead.keys().cloned().collect::<HashSet<_>>(),
                s.topology.clone(),
            )
        };
        let node_of = |slot: Slot| topology.as_ref().and_then(|t| t.node_of(slot));
        let on_dead = |slot: Slot| node_of(slot).is_some_and(|n| dead.contains(n));
        let on_back = |slot: Slot| node_of(slot).is_some_and(|n| back.contains(n));
        let mut work: Vec<(Slot, String, Vec<String>, bool)> = Vec::new();
        let mut seen = HashSet::new();
        for group in by_slot(channels, |c| c.as_str()) {
            let slot = Slot::for_key(&group[0]);
            seen.insert(slot);
            if on_dead(slot) {
                continue;
            }
            let bad = down.contains_key(&slot) || stale.contains(&slot) || on_back(slot);
            if every || bad {
                work.push((slot, group[0].clone(), group, bad));
            }
        }
        // Down slots with no channel wanted here any more: a probe lifts them.
        for (slot, key) in down {
            if !seen.contains(&slot) && !on_dead(slot) {
                work.push((slot, key, Vec::new(), true));
            }
        }
        if work.is_empty() {
            return;
        }
        // A few slots at a time: hundreds of commands failing at once against a dead
        // node stalled redis-rs's cluster connection for every node (docs/BENCHMARKS.md,
        // round five). Each result counts as it comes (a dead slot is marked at once).
        use futures_util::stream::StreamExt;
        let mut results = futures_util::stream::iter(work.into_iter().map(
            |(slot, key, channels, bad)| async move {
                let r = self.subscribe_slot(&key, &channels).await;
                (slot, key, channels, bad, r)
            },
        ))
        .buffer_unordered(RECOVERY_CONCURRENCY);
        let mut repair = Vec::new();
        let mut recovered = 0;
        while let Some((slot, key, channels, bad, result)) = results.next().await {
            match result {
                Err(e) => self.slot_down(&key, &e),
                Ok(replaced) => {
                    {
                        let mut s = lock(&self.slots);
                        s.stale.remove(&slot);
                        if s.down.remove(&slot).is_some() {
                            self.slots_changed(&s);
                        }
                    }
                    if bad || replaced {
                        recovered += 1;
                        repair.extend(
                            channels
                                .iter()
                                .filter_map(|c| self.keys.room_of_channel(c))
                                .map(str::to_string),
                        );
                    }
                }
            }
        }
        if recovered == 0 {
            return;
        }
        self.metrics.resubscribes.inc();
        tracing::info!(
            slots = recovered,
            rooms = repair.len(),
            "redis cluster: slots back: resubscribed; repairing their rooms from the log"
        );
        for room in repair {
            self.order.repair(&room).await;
        }
    }

    /// Cluster: the whole cluster looks unreachable (the presence node and the nodes of
    /// every channel wanted here failed).
    fn cluster_down(&self) -> bool {
        if self.healthy.load(Ordering::SeqCst) {
            return false;
        }
        if !self.reached.load(Ordering::SeqCst) {
            return true;
        }
        if !self.any_down.load(Ordering::SeqCst) {
            return false;
        }
        let interest = lock(&self.interest);
        let slots = lock(&self.slots);
        let down = |channel: String| slots.down.contains_key(&Slot::for_key(channel));
        down(self.keys.all_channel())
            && interest
                .rooms
                .iter()
                .all(|r| down(self.keys.room_channel(r)))
            && interest
                .users
                .iter()
                .all(|u| down(self.keys.user_channel(u)))
    }

    /// Redis failed (one Redis: all of it; a cluster: the presence node, whose slot the
    /// presence keys share).
    fn set_down(&self, why: &dyn std::fmt::Display) {
        if self.conn.is_cluster() {
            if self.healthy.swap(false, Ordering::SeqCst) {
                tracing::warn!(
                    error = %why,
                    "redis cluster: the presence node is unreachable: presence unavailable \
                     (rooms on the other nodes deliver as before)"
                );
            }
            self.presence_lost.store(true, Ordering::SeqCst);
            return;
        }
        if self.healthy.swap(false, Ordering::SeqCst) {
            tracing::warn!(error = %why, "redis unreachable: delivering locally only");
        }
        self.lost.store(true, Ordering::SeqCst);
    }

    /// Cluster: starts a slot check in the background unless one runs: the slot map
    /// when due, one probe per node, then a recovery of the slots that need one (a node
    /// that does not answer makes it wait for the client's timeout; the heartbeat goes
    /// on meanwhile).
    fn maybe_recover_slots(self: &Arc<Self>) {
        if self.recovering.swap(true, Ordering::SeqCst) {
            return;
        }
        let inner = self.clone();
        tokio::spawn(async move {
            // The map first (when due), then one probe per node, then the slots.
            inner.refresh_topology().await;
            let back = inner.probe_nodes().await;
            let every = inner.lost.swap(false, Ordering::SeqCst);
            let due = every
                || !back.is_empty()
                || inner.any_down.load(Ordering::SeqCst)
                || !lock(&inner.slots).stale.is_empty();
            if due {
                inner.recover_slots(every, &back).await;
            }
            inner.recovering.store(false, Ordering::SeqCst);
        });
    }

    /// Cluster: writes this instance's users again once the presence node answers after a
    /// failure (it may have restarted and lost them).
    async fn restore_presence(&self) {
        let users = lock(&self.interest)
            .users
            .iter()
            .cloned()
            .collect::<Vec<_>>();
        let mut conn = self.conn.clone();
        if let Err(e) = self.presence.restore(&mut conn, &users).await {
            self.set_down(&e);
            return;
        }
        // Users whose last session here ended while the node was down.
        let missed = std::mem::take(&mut *lock(&self.offline_missed));
        let n = missed.len();
        for (user, at) in missed {
            if lock(&self.interest).users.contains(&user) {
                continue;
            }
            if let Err(e) = self.presence.offline(&mut conn, &user, at).await {
                lock(&self.offline_missed).insert(user, at);
                self.set_down(&e);
                return;
            }
        }
        tracing::info!(
            users = users.len(),
            offline = n,
            "redis cluster: presence node back: users written again"
        );
    }

    /// The rooms and users watched here, and every channel that wants: the broadcast
    /// channel, one per room, one per user.
    fn wanted(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
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
        (rooms, users, channels)
    }

    /// One Redis: subscribes every wanted channel again and repairs every watched room.
    async fn resubscribe(self: &Arc<Self>) {
        let (rooms, users, channels) = self.wanted();
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
            // With a cluster, one node's connection closed, and the push does not say
            // which: the next heartbeat checks every slot (only those whose connection
            // was replaced are repaired).
            PushKind::Disconnection if inner.conn.is_cluster() => {
                tracing::debug!("redis cluster: a node connection closed");
                inner.lost.store(true, Ordering::SeqCst);
                // It may have been the presence node's, restarted with its keys lost
                // before a heartbeat failed: write this instance's users again.
                inner.presence_lost.store(true, Ordering::SeqCst);
            }
            PushKind::Disconnection => inner.set_down(&"connection closed"),
            // A cluster node drops the shard channels of a slot that moved to another
            // node (resharding, failover): subscribe again where it lives now.
            PushKind::SUnsubscribe if inner.conn.is_cluster() => {
                inner.refresh_topology.store(true, Ordering::SeqCst);
                if let Some(Value::BulkString(channel)) = info.data.first() {
                    inner.still_wanted(&String::from_utf8_lossy(channel));
                }
            }
            _ => {}
        }
    }
}

/// Applies subscription and presence changes one at a time, in order.
/// (A cluster's go through [`cluster_changes`].)
async fn apply_changes(weak: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<Change>) {
    if weak.upgrade().is_some_and(|i| i.conn.is_cluster()) {
        return cluster_changes(weak, rx).await;
    }
    while let Some(change) = rx.recv().await {
        let Some(inner) = weak.upgrade() else { return };
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
            change => apply_presence(&inner, &mut conn, change).await,
        };
        if let Err(e) = result {
            inner.set_down(&e);
        }
    }
}

/// A presence change (or the address) written to the presence keys.
async fn apply_presence(inner: &Inner, conn: &mut Conn, change: Change) -> redis::RedisResult<()> {
    match change {
        Change::Online(user) => inner.presence.online(conn, &user).await,
        Change::Advertise => {
            let addr = lock(&inner.advertise).clone();
            let r = inner
                .presence
                .heartbeat(conn, addr.as_deref(), now_ms())
                .await;
            if r.is_ok() {
                inner.advertised.store(true, Ordering::SeqCst);
            }
            r
        }
        Change::Offline(user, at) => inner.presence.offline(conn, &user, at).await,
        Change::Subscribe { .. } | Change::Unsubscribe(_) | Change::Publish(..) => Ok(()),
    }
}

/// The slot a cluster change is sent to: its channel's, or the presence keys'.
fn slot_of_change(inner: &Inner, change: &Change) -> Slot {
    match change {
        Change::Subscribe { channel, .. }
        | Change::Unsubscribe(channel)
        | Change::Publish(channel, _) => Slot::for_key(channel),
        Change::Advertise | Change::Online(_) | Change::Offline(..) => {
            Slot::for_key(inner.keys.presence_slot_key())
        }
    }
}

/// Applies a cluster's changes: in order within each slot (a channel's subscribes,
/// unsubscribes and publishes; the presence keys share one slot), one change in flight
/// per slot, the slots independently of each other. So a node that hangs (answers
/// nothing until the client's response timeout) holds up the changes of its own slots
/// only: a subscription on another node does not wait behind one on it. At most
/// [`NODE_CONCURRENCY`] slots per node have a change in flight (a connect storm against
/// a dead node does not put one failing command per slot in flight at once); the slots
/// beyond wait for a turn, first come first served, and once the node is marked down
/// their changes return without being sent.
async fn cluster_changes(weak: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<Change>) {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    // The changes waiting per slot (a slot is in the map while it has a change in flight
    // or waiting), and the slots with one in flight.
    let mut queues: HashMap<Slot, std::collections::VecDeque<Change>> = HashMap::new();
    let mut running: HashSet<Slot> = HashSet::new();
    let mut limit = NodeLimit::new(NODE_CONCURRENCY);
    let mut in_flight = FuturesUnordered::new();
    let apply = |inner: Arc<Inner>, slot: Slot, node: Option<Node>, change: Change| async move {
        apply_cluster_change(&inner, change).await;
        (slot, node)
    };
    let mut batch = Vec::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            n = rx.recv_many(&mut batch, 256), if open => {
                if n == 0 {
                    open = false;
                }
                let Some(inner) = weak.upgrade() else { return };
                for change in batch.drain(..) {
                    let slot = slot_of_change(&inner, &change);
                    let queue = queues.entry(slot).or_default();
                    if queue.is_empty() && !running.contains(&slot) {
                        limit.wait(slot);
                    }
                    queue.push_back(change);
                }
            }
            Some((slot, node)) = in_flight.next(), if !in_flight.is_empty() => {
                let node: Option<Node> = node;
                limit.release(node.as_ref());
                running.remove(&slot);
                if queues.get(&slot).is_some_and(|q| !q.is_empty()) {
                    limit.wait(slot);
                } else {
                    queues.remove(&slot);
                }
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        let topology = inner.topology();
        let ready = limit.start_waiting(|slot| {
            let work = !running.contains(&slot) && queues.get(&slot).is_some_and(|q| !q.is_empty());
            work.then(|| topology.as_ref().and_then(|t| t.node_of(slot).cloned()))
        });
        for (slot, node) in ready {
            if let Some(change) = queues.get_mut(&slot).and_then(|q| q.pop_front()) {
                running.insert(slot);
                in_flight.push(apply(inner.clone(), slot, node, change));
            } else {
                limit.release(node.as_ref());
            }
        }
    }
}

/// A change on a cluster: a channel's failure marks its slot down (not the others), and a
/// channel whose slot is down waits for the heartbeat's recovery of the slot (which
/// subscribes it, as it is wanted, and repairs its room).
async fn apply_cluster_change(inner: &Arc<Inner>, change: Change) {
    let mut conn = inner.conn.clone();
    let (channel, result) = match change {
        Change::Subscribe { channel, room } => {
            if inner.is_slot_down(&channel) {
                // Its node is down: the recovery subscribes it (it is wanted) and
                // repairs its room; counted among the degraded slots meanwhile.
                let mut slots = lock(&inner.slots);
                slots.down.entry(Slot::for_key(&channel)).or_insert(channel);
                inner.slots_changed(&slots);
                return;
            }
            let r = inner
                .subscribe_slot(&channel, std::slice::from_ref(&channel))
                .await;
            if let Ok(true) = r {
                // The slot's node connection was replaced since its other channels were
                // subscribed: they were lost with the old one.
                lock(&inner.slots).stale.insert(Slot::for_key(&channel));
            }
            if r.is_ok()
                && let Some(room) = room
            {
                // Publishes made before the subscription took effect are in the log.
                let order = inner.order.clone();
                tokio::spawn(async move { order.repair(&room).await });
            }
            (channel, r.map(|_| ()))
        }
        Change::Unsubscribe(channel) => {
            if inner.is_slot_down(&channel) {
                return;
            }
            let r = inner.unsubscribe(&mut conn, &channel).await;
            (channel, r)
        }
        Change::Publish(channel, bytes) => {
            if inner.is_slot_down(&channel) {
                inner.metrics.publish_failures.inc();
                return;
            }
            let r = redis::cmd(inner.publish_command())
                .arg(&channel)
                .arg(&bytes[..])
                .exec_async(&mut conn)
                .await
                .inspect(|_| {
                    inner.metrics.publishes.inc();
                });
            (channel, r)
        }
        change => {
            // While the presence node is known down, user changes are not sent, so that
            // they do not hold up the subscriptions behind them for the client's
            // retries: the users are written again when it answers, and the offline
            // changes made meanwhile then too.
            let offline = match &change {
                Change::Online(user) => {
                    lock(&inner.offline_missed).remove(user);
                    None
                }
                Change::Offline(user, at) => Some((user.clone(), *at)),
                _ => None,
            };
            let known_down = inner.reached.load(Ordering::SeqCst)
                && !inner.healthy.load(Ordering::SeqCst)
                && !matches!(change, Change::Advertise);
            let sent = if !known_down {
                apply_presence(inner, &mut conn, change).await
            } else {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "presence node unreachable",
                )))
            };
            if let Err(e) = sent {
                if let Some((user, at)) = offline {
                    lock(&inner.offline_missed).insert(user, at);
                }
                inner.set_down(&e);
            }
            return;
        }
    };
    if let Err(e) = result {
        inner.slot_down(&channel, &e);
    }
}

/// Sends the queued envelopes: whatever has queued up (at most [`PUBLISH_BATCH`]) as one
/// pipeline, then waits for its replies before the next, so envelopes reach Redis in
/// queue order and a burst costs one round trip per batch, not per envelope. A failed
/// batch is dropped (receivers repair room messages from the log) and marks Redis down.
/// (A cluster's go through [`cluster_publisher`].)
async fn publisher(inner: Weak<Inner>, mut rx: mpsc::Receiver<Outgoing>) {
    if inner.upgrade().is_some_and(|i| i.conn.is_cluster()) {
        return cluster_publisher(inner, rx).await;
    }
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
            let mut conn = inner.conn.clone();
            let result = publish_pipeline(command, &envelopes)
                .exec_async(&mut conn)
                .await;
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

/// The envelopes of one slot waiting for the cluster publisher, numbered in queue order.
#[derive(Default)]
struct SlotQueue {
    /// The number of the first envelope of the pipeline in flight, if one is.
    in_flight: Option<u64>,
    waiting: std::collections::VecDeque<(u64, String, Bytes)>,
}

impl SlotQueue {
    /// The number of the oldest envelope not yet sent (or failed).
    fn oldest(&self) -> Option<u64> {
        self.in_flight.or(self.waiting.front().map(|e| e.0))
    }
}

/// Sends the queued envelopes to a cluster: one queue per slot, each sending one pipeline
/// (up to [`PUBLISH_BATCH`]) at a time, so a channel's envelopes reach its node in
/// order, while the other slots' pipelines go on: a node that fails or stalls holds up
/// its own slots only. At most [`NODE_CONCURRENCY`] slots per node have a pipeline in
/// flight; the slots beyond wait for a turn, first come first served (so many rooms on
/// a dead node do not put one failing pipeline per slot in flight at once). A failed
/// pipeline marks its slot down, or its node (what queued behind it is dropped with
/// it: the receivers repair room messages from the log once the node is back). A flush
/// is answered once every envelope queued before it has been sent.
async fn cluster_publisher(inner: Weak<Inner>, mut rx: mpsc::Receiver<Outgoing>) {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let mut queues: HashMap<Slot, SlotQueue> = HashMap::new();
    let mut limit = NodeLimit::new(NODE_CONCURRENCY);
    let mut in_flight = FuturesUnordered::new();
    let mut flushes: Vec<(u64, tokio::sync::oneshot::Sender<()>)> = Vec::new();
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    let mut next = 0u64;
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            n = rx.recv_many(&mut batch, PUBLISH_BATCH), if open => {
                if n == 0 {
                    open = false;
                }
                for item in batch.drain(..) {
                    match item {
                        Outgoing::Envelope(channel, bytes) => {
                            let slot = Slot::for_key(&channel);
                            let queue = queues.entry(slot).or_default();
                            if queue.in_flight.is_none() && queue.waiting.is_empty() {
                                limit.wait(slot);
                            }
                            queue.waiting.push_back((next, channel, bytes));
                            next += 1;
                        }
                        Outgoing::Flush(done) => flushes.push((next, done)),
                    }
                }
            }
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let Some(inner) = inner.upgrade() else { return };
                let Sent { slot, node, sent, channel, result } = done;
                limit.release(node.as_ref());
                match result {
                    Ok(()) => {
                        inner.metrics.publishes.inc_by(sent);
                        inner.metrics.publish_batches.inc();
                        let more = queues.get_mut(&slot).is_some_and(|queue| {
                            queue.in_flight = None;
                            !queue.waiting.is_empty()
                        });
                        if more {
                            limit.wait(slot);
                        } else {
                            queues.remove(&slot);
                        }
                    }
                    Err(e) => {
                        let dropped = queues.remove(&slot).map_or(0, |q| q.waiting.len());
                        let failed = sent + dropped as u64;
                        inner.metrics.publish_failures.inc_by(failed);
                        tracing::warn!(error = %e, envelopes = failed, channel = %channel, "publish failed");
                        inner.slot_down(&channel, &e);
                    }
                }
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        // What queued for a slot found down meanwhile (it, or its node) is dropped: it
        // would only wait for the client's retries to fail again.
        if inner.any_down.load(Ordering::SeqCst) {
            queues.retain(|_, queue| {
                if queue.in_flight.is_none()
                    && !queue.waiting.is_empty()
                    && inner.is_slot_down(&queue.waiting[0].1)
                {
                    inner
                        .metrics
                        .publish_failures
                        .inc_by(queue.waiting.len() as u64);
                    queue.waiting.clear();
                }
                queue.in_flight.is_some() || !queue.waiting.is_empty()
            });
        }
        // Start a pipeline in every waiting slot whose node has a turn free.
        let topology = inner.topology();
        let ready = limit.start_waiting(|slot| {
            let work = queues
                .get(&slot)
                .is_some_and(|q| q.in_flight.is_none() && !q.waiting.is_empty());
            work.then(|| topology.as_ref().and_then(|t| t.node_of(slot).cloned()))
        });
        for (slot, node) in ready {
            let Some(queue) = queues.get_mut(&slot) else {
                limit.release(node.as_ref());
                continue;
            };
            let n = queue.waiting.len().min(PUBLISH_BATCH);
            queue.in_flight = queue.waiting.front().map(|e| e.0);
            let envelopes: Vec<(String, Bytes)> = queue
                .waiting
                .drain(..n)
                .map(|(_, channel, bytes)| (channel, bytes))
                .collect();
            in_flight.push(send_slot(inner.clone(), slot, node, envelopes));
        }
        if !flushes.is_empty() {
            let oldest = queues.values().filter_map(SlotQueue::oldest).min();
            let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut flushes)
                .into_iter()
                .partition(|(before, _)| oldest.is_none_or(|o| o >= *before));
            flushes = waiting;
            for (_, done) in done {
                let _ = done.send(());
            }
        }
    }
    for (_, done) in flushes {
        let _ = done.send(());
    }
}

/// What became of one slot's pipeline of publishes.
struct Sent {
    slot: Slot,
    /// The node whose turn it took ([`NodeLimit`]).
    node: Option<Node>,
    /// How many envelopes it carried.
    sent: u64,
    /// One of their channels.
    channel: String,
    result: redis::RedisResult<()>,
}

/// Sends one slot's pipeline of publishes.
async fn send_slot(
    inner: Arc<Inner>,
    slot: Slot,
    node: Option<Node>,
    envelopes: Vec<(String, Bytes)>,
) -> Sent {
    let mut conn = inner.conn.clone();
    let result = publish_pipeline(inner.publish_command(), &envelopes)
        .exec_async(&mut conn)
        .await;
    let n = envelopes.len() as u64;
    let channel = envelopes
        .into_iter()
        .next()
        .map(|e| e.0)
        .unwrap_or_default();
    Sent {
        slot,
        node,
        sent: n,
        channel,
        result,
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
                inner.reached.store(true, Ordering::SeqCst);
                if inner.conn.is_cluster() {
                    if inner.presence_lost.swap(false, Ordering::SeqCst) {
                        inner.restore_presence().await;
                    }
                } else if inner.lost.swap(false, Ordering::SeqCst) {
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
        if inner.conn.is_cluster() {
            // Independent of the presence node: the other nodes' slots recover anyway.
            inner.maybe_recover_slots();
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
        let down = if inner.conn.is_cluster() {
            // Only the node of this channel's slot counts.
            inner.is_slot_down(&channel)
        } else {
            !inner.healthy.load(Ordering::SeqCst)
        };
        if down {
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
        if self.inner.conn.is_cluster() && !self.inner.healthy.load(Ordering::SeqCst) {
            // The presence node is down: answer at once rather than after the retries.
            return Err(BrokerError::Backend("presence unavailable".into()));
        }
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
        let down = if self.inner.conn.is_cluster() {
            // Ready while any part of the cluster answers: rooms on the nodes that do
            // deliver as before.
            self.inner.cluster_down()
        } else {
            !self.inner.healthy.load(Ordering::SeqCst)
        };
        if down {
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
