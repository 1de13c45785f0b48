//! Fan-out between instances. `chat` publishes each push once to the [`Broker`] with a
//! [`Target`]; every instance's broker hands it to that instance's [`crate::delivery::Hub`], which pushes
//! it to the matching local sessions.
//!
//! The broker is a notification path, not the source of truth: a lost publish is
//! repaired from the log. Backends:
//!
//! - [`local::LocalBroker`] — one instance, in-process. Room order comes from `chat`'s
//!   sequencer (publishes of a room leave in seq order), so it delivers at once.
//! - [`redis::RedisBroker`] — many instances over Redis pub/sub. One `PUBLISH` (or
//!   sharded `SPUBLISH`) per push, pipelined with the pushes queued behind it
//!   ([`wire`] frames it: origin, target, room seq, the push's protobuf bytes);
//!   instances subscribe by interest (a room's channel while it has local members, a
//!   user's channel while the user has local sessions, one broadcast channel). Room
//!   messages from every instance — its own included — go through [`order::RoomOrder`],
//!   which delivers each room in seq order, drops what it already delivered and fills
//!   gaps from the store. Presence lives in Redis keys with heartbeats ([`presence`]).
//!
//! Chat tells the broker about interest with [`Broker::watch_room`],
//! [`Broker::unwatch_rooms`], [`Broker::user_online`] and [`Broker::user_offline`]; the
//! in-process broker ignores all of them (the hub is the whole picture there).

pub mod conn;
pub mod local;
pub mod order;
pub mod presence;
pub mod redis;
pub mod topology;
pub mod wire;

use std::sync::Arc;

use async_trait::async_trait;

use crate::codec::Push;
pub use crate::delivery::Target;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("backend: {0}")]
    Backend(String),
}

/// Presence of one user as the whole cluster sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserPresence {
    pub online: bool,
    /// Unix ms of the end of the user's last session (0 when online or unknown).
    pub last_seen: i64,
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Whether this instance's hub is the whole picture (the in-process broker): no
    /// session anywhere else can receive a publish, and no user is online elsewhere. A
    /// presence push whose rooms have no co-member in the hub then reaches nobody and is
    /// not built at all.
    fn local_only(&self) -> bool {
        false
    }

    /// Delivers `push` to the target's sessions on every instance. Publishes of one
    /// instance to one target are delivered in the order they were made (to different
    /// targets too with one Redis; a Redis Cluster carries each target's channel on the
    /// node of its slot, with no order between nodes). Returns once the push is
    /// delivered here and handed on in that order, without waiting for a backend's round
    /// trip: a caller that publishes in turn (a room's messages, in seq order) is bound
    /// by the backend's rate, not by its latency. `Err` when the backend cannot take it
    /// (the other instances then repair room messages from the log).
    async fn publish(&self, target: Target, push: Arc<Push>) -> Result<(), BrokerError>;

    /// Resolves once every publish made before it has left for the other instances (or
    /// failed): at shutdown, so the last messages go out live rather than by log repair.
    async fn flush(&self) {}

    /// `room` has (or may have got) its first local member, whose session has seen the
    /// room's log up to `last_seq`: its publishes must reach this instance from now on.
    fn watch_room(&self, _room: &str, _last_seq: u64) {}

    /// `user` became a member of `room` (whose log is at `last_seq`): route the room to
    /// the user's sessions on every instance. The caller has told the local hub.
    fn member_joined(&self, user: &str, room: &str, last_seq: u64) {
        let _ = (user, room, last_seq);
    }

    /// `user` left `room`: stop routing it to the user's sessions on every instance.
    fn member_left(&self, user: &str, room: &str) {
        let _ = (user, room);
    }

    /// These rooms may have lost their last local member. (An iterator, not a slice of
    /// `String`s: the last close passes the hub's rooms as they are, with no copy.)
    fn unwatch_rooms(&self, _rooms: &mut dyn Iterator<Item = &str>) {}

    /// `user` got its first session on this instance.
    fn user_online(&self, _user: &str) {}

    /// `user`'s last session on this instance ended at `at` (Unix ms).
    fn user_offline(&self, _user: &str, _at: i64) {}

    /// Cluster-wide presence of `users`, or `None` where this instance's hub is the
    /// whole picture (the in-process broker).
    async fn presence(&self, _users: &[String]) -> Result<Option<Vec<UserPresence>>, BrokerError> {
        Ok(None)
    }

    /// Whether `user` has a session on another instance (so a change of this instance's
    /// sessions is no presence change for co-members).
    async fn online_elsewhere(&self, _user: &str) -> bool {
        false
    }

    /// Users whose instance died (its heartbeat expired) and who have no session left
    /// anywhere, with the time they were last seen: chat tells their co-members. Each
    /// such user is returned by one instance only.
    async fn orphaned_users(&self) -> Vec<(String, i64)> {
        Vec::new()
    }

    /// This instance's id in the cluster (the prefix of its session ids and tickets), or
    /// `None` when it runs alone.
    fn instance(&self) -> Option<String> {
        None
    }

    /// Where other instances reach this one over HTTP (`host:port`), published with the
    /// heartbeat so requests for its sessions can be routed here.
    fn advertise(&self, _addr: String) {}

    /// The HTTP address of a live instance, by id.
    async fn locate(&self, _instance: &str) -> Option<String> {
        None
    }

    /// `Err` with a reason while the backend cannot fan out (for `/readyz`).
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
}
