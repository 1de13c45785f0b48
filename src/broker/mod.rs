//! Fan-out between instances. `chat` publishes each push once to the [`Broker`] with a
//! [`Target`]; every instance's broker hands it to that instance's [`Hub`], which pushes
//! it to the matching local sessions.
//!
//! The broker is a notification path, not the source of truth: a lost publish is
//! repaired by log sync. Backends: [`local::LocalBroker`] (one instance, in-process).

pub mod local;

use std::sync::Arc;

use async_trait::async_trait;

use crate::codec::Push;

/// Who receives a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every session of every member of the room.
    Room(String),
    /// As `Room`, but not the sessions of this user (typing).
    RoomExcept { room: String, user: String },
    /// Every session of users who share at least one of these rooms with `user`, once
    /// each, not `user`'s own (presence).
    CoMembers { rooms: Vec<String>, user: String },
    /// Every session of one user (signalling).
    User(String),
    /// Every session (announcements).
    All,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("backend: {0}")]
    Backend(String),
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Delivers `push` to the target's sessions on every instance. Publishes must be
    /// delivered in the order they were made.
    async fn publish(&self, target: Target, push: Arc<Push>) -> Result<(), BrokerError>;
}

pub use crate::chat::hub::Hub;
