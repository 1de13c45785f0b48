//! Fan-out between instances. After a message is appended to its room's log, `chat`
//! publishes it once to the [`Broker`]; every instance's broker hands it to that
//! instance's [`Hub`], which pushes it to the local sessions of the room's members.
//!
//! The broker is a notification path, not the source of truth: a lost publish is
//! repaired by log sync. Backends: [`local::LocalBroker`] (one instance, in-process).

pub mod local;

use std::sync::Arc;

use async_trait::async_trait;

use crate::codec::Push;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("backend: {0}")]
    Backend(String),
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Delivers `push` to the room's local sessions on every instance. Publishes for one
    /// room must be delivered in the order they were made.
    async fn publish(&self, room: &str, push: Arc<Push>) -> Result<(), BrokerError>;
}

pub use crate::chat::hub::Hub;
