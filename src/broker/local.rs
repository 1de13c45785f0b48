//! The in-process broker: one instance, so "publishing" is delivering to the local hub.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Broker, BrokerError};
use crate::{
    codec::Push,
    delivery::{Hub, Target},
};

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
    fn local_only(&self) -> bool {
        true
    }

    async fn publish(&self, target: Target, push: Arc<Push>) -> Result<(), BrokerError> {
        self.hub.deliver(&target, &push);
        Ok(())
    }
}
