//! Fan-out between instances. `chat` publishes each push once to the [`Broker`] with a
//! [`Target`]; every instance's broker hands it to that instance's [`crate::delivery::Hub`], which pushes
//! it to the matching local sessions.
//!
//! The broker is a notification path, not the source of truth: a lost publish is
//! repaired by log sync. Backends: [`local::LocalBroker`] (one instance, in-process).

pub mod local;

use std::sync::Arc;

use async_trait::async_trait;

use crate::codec::Push;
pub use crate::delivery::Target;

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
