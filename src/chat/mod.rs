//! The chat domain: rooms, membership, messages, history, sync, direct messages, read
//! markers, typing, presence, signalling and announcements.
//!
//! Knows the [`Store`] and [`Broker`] traits and the local [`Hub`]; knows nothing of
//! HTTP, WebSocket or sessions (a session is just a [`Recipient`]).
//!
//! The commands (validation, then store, then publish), one file per family; this file
//! holds what they share (limits, checks, publish):
//! - [`messages`]: send, history, sync, announcements;
//! - [`rooms`]: the room list, create, join, leave, invite, members;
//! - [`read_markers`]: read markers and receipts;
//! - [`ephemeral`]: presence, typing, signals (nothing stored).
//!
//! And their helpers:
//! - [`sequencer`]: publishes of a room leave in seq order while appends are pipelined
//!   through group commits;
//! - [`typing`]: the typing rate limiter;
//! - [`presence`]: last-seen times;
//! - [`error`]: the errors a command can give, with their wire codes.

mod ephemeral;
pub mod error;
mod messages;
pub mod presence;
mod read_markers;
mod rooms;
pub mod sequencer;
pub mod typing;

pub use error::{ChatError, retry_ms, wire_error};

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use crate::{
    auth::valid_user_id,
    broker::Broker,
    codec::Push,
    config::{ChatConfig, LimitsConfig},
    delivery::{Hub, Target},
    proto::{self, server_frame::Kind},
    ratelimit::{Rate, RateLimiter},
    store::Store,
};
use presence::LastSeen;
pub use rooms::{RoomsSeen, Seen};
use sequencer::Sequencer;
use typing::TypingLimiter;

/// A submitted send: resolves with the `sent` reply once the message is durable.
pub type PendingSend =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<proto::Sent, ChatError>> + Send>>;

/// A publish that takes longer than this gives up its turn (the message is durable;
/// members repair the gap by log sync), so a stuck broker cannot stall a stripe.
const PUBLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Most attachments on one message.
pub const MAX_ATTACHMENTS: usize = 10;

pub struct Chat {
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    hub: Arc<Hub>,
    config: ChatConfig,
    sequencer: Arc<Sequencer>,
    typing: TypingLimiter,
    last_seen: LastSeen,
    limits: Limits,
    /// The store changes a join reads, counted as this instance makes them: a message
    /// committed (a room's `last_seq`), a member leaving. A join whose connect read its
    /// room finds the count unchanged needs no read of its own ([`Chat::join_seen`]).
    changes: Arc<AtomicU64>,
}

/// The per-user limits chat enforces (see `config::LimitsConfig`).
struct Limits {
    sends: RateLimiter<String>,
    joins: RateLimiter<String>,
    /// `signal` commands per sender.
    signals: RateLimiter<String>,
    /// Signal bytes (kind + payload) per recipient, from all senders together.
    signal_bytes: RateLimiter<String>,
    /// `history` and `sync` requests per user.
    reads: RateLimiter<String>,
    max_rooms_per_user: u64,
}

impl Limits {
    fn new(l: &LimitsConfig) -> Self {
        Self {
            sends: RateLimiter::new(Rate::new(l.sends_per_second, l.sends_burst)),
            joins: RateLimiter::new(Rate::new(l.joins_per_second, l.joins_burst)),
            signals: RateLimiter::new(Rate::new(l.signals_per_second, l.signals_burst)),
            signal_bytes: RateLimiter::new(Rate::new(
                l.signal_bytes_per_second,
                l.signal_bytes_burst,
            )),
            reads: RateLimiter::new(Rate::new(l.reads_per_second, l.reads_burst)),
            max_rooms_per_user: l.max_rooms_per_user,
        }
    }
}

fn invalid(msg: impl Into<String>) -> ChatError {
    ChatError::InvalidArgument(msg.into())
}

fn room_state_push(room: &str, user: &str, action: &str, by: &str) -> Arc<Push> {
    Arc::new(Push::new(Kind::Membership(proto::Membership {
        room: room.into(),
        user: user.into(),
        action: action.into(),
        by: by.into(),
    })))
}

impl Chat {
    pub fn new(
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        hub: Arc<Hub>,
        config: ChatConfig,
    ) -> Self {
        Self {
            store,
            broker,
            hub,
            typing: TypingLimiter::new(config.typing_interval),
            config,
            sequencer: Arc::new(Sequencer::new()),
            last_seen: LastSeen::new(),
            limits: Limits::new(&LimitsConfig::off()),
            changes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// [`Chat::changes`] now, where it covers every change: with the in-process broker
    /// (one instance, so every append and leave goes through this `Chat`); `None` with a
    /// broker that reaches other instances, whose changes it does not see.
    fn changes_now(&self) -> Option<u64> {
        self.broker
            .local_only()
            .then(|| self.changes.load(Ordering::SeqCst))
    }

    /// Counts a change a join reads (after it is durable, before anyone is told of it).
    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
    }

    /// The durable log (for `/readyz`'s health check).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Applies the per-user limits of `limits` (none by default).
    pub fn with_limits(mut self, limits: &LimitsConfig) -> Self {
        self.limits = Limits::new(limits);
        self
    }

    /// A send (or a join) of `user` may go ahead now, or `RateLimited` with a hint.
    fn spend(
        bucket: &RateLimiter<String>,
        user: &str,
        what: &'static str,
    ) -> Result<(), ChatError> {
        bucket
            .check(user)
            .map_err(|retry_after| ChatError::RateLimited { what, retry_after })
    }

    /// `user` may become a member of one more room: a quick refusal that spends no join
    /// token. Only a hint under concurrency — the store enforces `max_rooms_per_user`
    /// atomically when the membership is written (`Store::join`, `create_room`,
    /// `ensure_dm`).
    async fn check_room_quota(&self, user: &str) -> Result<(), ChatError> {
        let max = self.limits.max_rooms_per_user;
        if max > 0 && self.store.rooms_of(user).await?.len() as u64 >= max {
            return Err(ChatError::LimitExceeded(format!(
                "{user} is a member of {max} rooms already (limits.max_rooms_per_user)"
            )));
        }
        Ok(())
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    fn check_room(&self, room: &str) -> Result<(), ChatError> {
        if room.is_empty() || room.len() > self.config.max_room_name_bytes {
            return Err(invalid(format!(
                "room name must be 1..={} bytes",
                self.config.max_room_name_bytes
            )));
        }
        if !room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:@|+-".contains(&b))
        {
            return Err(invalid(
                "room name may only contain A-Z a-z 0-9 _ . : @ | + -",
            ));
        }
        Ok(())
    }

    fn check_user(user: &str) -> Result<(), ChatError> {
        if valid_user_id(user) {
            Ok(())
        } else {
            Err(invalid(format!("bad user id {user:?}")))
        }
    }

    async fn publish(&self, target: Target, push: Arc<Push>) {
        if let Err(e) = self.broker.publish(target, push).await {
            tracing::warn!(error = %e, "publish failed");
        }
    }

    /// Members read anything; non-members read public rooms only.
    async fn check_read(&self, room: &str, user: &str) -> Result<(), ChatError> {
        self.check_room(room)?;
        let meta = self
            .store
            .room(room)
            .await?
            .ok_or_else(|| ChatError::NotFound(room.into()))?;
        if meta.private && !self.store.is_member(room, user).await? {
            return Err(ChatError::NotMember(room.into()));
        }
        Ok(())
    }

    async fn check_member(&self, room: &str, user: &str) -> Result<(), ChatError> {
        self.check_room(room)?;
        if self.store.is_member(room, user).await? {
            Ok(())
        } else {
            Err(ChatError::NotMember(room.to_string()))
        }
    }

    fn is_large(&self, members: u64) -> bool {
        members > self.config.large_room_members
    }

    /// Who hears about a membership change or receipt concerning `user`: the room, or in
    /// a large room only the user's own sessions.
    fn audience(&self, room: &str, user: &str, members: u64) -> Target {
        if self.is_large(members) {
            Target::User(user.to_string())
        } else {
            Target::Room(room.to_string())
        }
    }

    async fn members_of(&self, room: &str) -> Result<u64, ChatError> {
        Ok(self.store.room(room).await?.map_or(0, |m| m.members))
    }

    /// The broker (for `/readyz`).
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    };

    use async_trait::async_trait;

    use super::*;
    use crate::{
        broker::{BrokerError, local::LocalBroker},
        config::StoreConfig,
        delivery::Recipient,
        store::sqlite::SqliteStore,
    };

    /// A broker whose next room publish panics once armed (a bug in a backend), and
    /// that otherwise delivers locally.
    struct PanicsOnce {
        armed: AtomicBool,
        local: LocalBroker,
    }

    #[async_trait]
    impl Broker for PanicsOnce {
        async fn publish(&self, target: Target, push: Arc<Push>) -> Result<(), BrokerError> {
            if matches!(target, Target::Room(_)) && self.armed.swap(false, Ordering::SeqCst) {
                panic!("broker bug");
            }
            self.local.publish(target, push).await
        }
    }

    /// Collects the seqs of the messages pushed to it.
    struct Inbox {
        id: u64,
        seqs: Mutex<Vec<u64>>,
    }

    impl Recipient for Inbox {
        fn recipient_id(&self) -> u64 {
            self.id
        }
        fn user(&self) -> &str {
            "bob"
        }
        fn push(&self, push: &Arc<Push>) {
            let frame: proto::ServerFrame =
                prost::Message::decode(&push.frame(crate::codec::Encoding::Proto, 1)[..]).unwrap();
            if let Some(Kind::Message(m)) = frame.kind {
                self.seqs.lock().unwrap().push(m.seq);
            }
        }
    }

    #[tokio::test]
    async fn a_panic_in_publish_does_not_wedge_the_room() {
        let hub = Arc::new(Hub::new());
        let broker = Arc::new(PanicsOnce {
            armed: AtomicBool::new(false),
            local: LocalBroker::new(hub.clone()),
        });
        let store = Arc::new(
            SqliteStore::open(&StoreConfig {
                path: ":memory:".into(),
                ..StoreConfig::default()
            })
            .unwrap(),
        );
        let chat = Chat::new(store, broker.clone(), hub, ChatConfig::default());
        let bob = Arc::new(Inbox {
            id: 1,
            seqs: Mutex::default(),
        });
        chat.join("ann", "r").await.unwrap();
        chat.join("bob", "r").await.unwrap();
        chat.attach(bob.clone()).await.unwrap();
        let send = |id: &str| proto::Send {
            room: "r".into(),
            client_msg_id: id.into(),
            body: id.into(),
            ..Default::default()
        };
        broker.armed.store(true, Ordering::SeqCst);
        // The publish of message 1 panics; it is durable all the same.
        assert_eq!(chat.send("ann", send("1")).await.unwrap().seq, 1);
        // Messages 2 and 3 of the same room (so the same stripe) are still published.
        assert_eq!(chat.send("ann", send("2")).await.unwrap().seq, 2);
        assert_eq!(chat.send("ann", send("3")).await.unwrap().seq, 3);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while bob.seqs.lock().unwrap().len() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stripe is wedged: {:?}",
                bob.seqs.lock().unwrap()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // 1 was lost to the panic (log sync repairs it); 2 and 3 came, in order.
        assert_eq!(*bob.seqs.lock().unwrap(), [2, 3]);
    }

    /// A join takes the room from its connect's read only while `Chat::changes` says
    /// nothing it reads changed since, and only with the in-process broker. A message
    /// appended behind chat's back (so not counted) shows which answer came from where.
    #[tokio::test]
    async fn a_join_takes_the_connects_read_only_while_nothing_changed() {
        let store_config = StoreConfig {
            path: ":memory:".into(),
            ..StoreConfig::default()
        };
        let hub = Arc::new(Hub::new());
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&store_config).unwrap());
        let local = Arc::new(LocalBroker::new(hub.clone()));
        let chat = Chat::new(store.clone(), local, hub.clone(), ChatConfig::default());
        chat.join("ann", "r").await.unwrap();
        let uncounted = |id: &str| crate::store::NewMessage {
            room: "r".into(),
            sender: "ann".into(),
            client_msg_id: id.into(),
            body: id.into(),
            metadata: Default::default(),
            ts: 1,
            attachments: Vec::new(),
        };

        // Unchanged since the read: the read's answer (the uncounted append is not seen).
        let (rooms, seen) = chat.rooms_seen("ann").await.unwrap();
        assert_eq!(rooms[0].last_seq, 0);
        let mut seen = seen.expect("a read to reuse");
        store.append(uncounted("x")).await.unwrap();
        let taken = seen.take("r");
        assert!(seen.take("r").is_none(), "taken once");
        assert!(seen.is_empty());
        let joined = chat.join_seen("ann", "r", taken).await.unwrap();
        assert_eq!(joined.last_seq, 0, "answered from the connect's read");
        assert_eq!(chat.join("ann", "r").await.unwrap().last_seq, 1);

        // A message committed through chat since the read: the join reads.
        let (_, seen) = chat.rooms_seen("ann").await.unwrap();
        let taken = seen.expect("a read to reuse").take("r");
        let send = proto::Send {
            room: "r".into(),
            client_msg_id: "y".into(),
            body: "y".into(),
            ..Default::default()
        };
        assert_eq!(chat.send("ann", send).await.unwrap().seq, 2);
        assert_eq!(chat.join_seen("ann", "r", taken).await.unwrap().last_seq, 2);

        // A leave since the read: the join reads, and joins again.
        let (_, seen) = chat.rooms_seen("ann").await.unwrap();
        let taken = seen.expect("a read to reuse").take("r");
        chat.leave("ann", "r").await.unwrap();
        chat.join_seen("ann", "r", taken).await.unwrap();
        assert!(store.is_member("r", "ann").await.unwrap());

        // A broker that reaches other instances: nothing to reuse.
        let remote = Arc::new(PanicsOnce {
            armed: AtomicBool::new(false),
            local: LocalBroker::new(hub.clone()),
        });
        let chat = Chat::new(store, remote, hub, ChatConfig::default());
        assert!(chat.rooms_seen("ann").await.unwrap().1.is_none());
    }
}
