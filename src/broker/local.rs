//! The in-process broker: one instance, so "publishing" is pushing to the local hub.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Broker, BrokerError, Hub};
use crate::codec::Push;

pub struct LocalBroker {
    hub: Arc<Hub>,
}

impl LocalBroker {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

#[async_trait]
impl Broker for LocalBroker {
    async fn publish(&self, room: &str, push: Arc<Push>) -> Result<(), BrokerError> {
        self.hub.deliver(room, &push);
        Ok(())
    }
}
