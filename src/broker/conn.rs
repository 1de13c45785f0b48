//! The Redis connection the broker talks through: one multiplexed connection to one Redis
//! ([`ConnectionManager`]), or a Redis Cluster ([`ClusterConnection`], which routes each
//! command to the node that serves its key's slot).
//!
//! A cluster refuses a command or pipeline whose keys span slots (`CROSSSLOT`). So with a
//! cluster: the presence keys share one hash tag ([`super::presence::Keys`]), and what
//! names several channels (a resubscribe) is split with [`by_slot`] into one pipeline
//! per slot, sent concurrently; publishes queue per slot (`redis::cluster_publisher`).
//!
//! Owns: the choice of connection. Not: what is sent over it (`redis`, `presence`).

use std::collections::HashMap;

use redis::{
    Cmd, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager},
    cluster_async::ClusterConnection,
};

use super::topology::Slot;

/// One Redis or a Redis Cluster; cheap to clone (both multiplex one set of connections).
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Splits `items` into groups whose `key`s hash to the same cluster slot, keeping the
/// order of the items within each group (so one channel's publishes stay in order).
pub fn by_slot<T>(items: impl IntoIterator<Item = T>, key: impl Fn(&T) -> &str) -> Vec<Vec<T>> {
    let mut index: HashMap<Slot, usize> = HashMap::new();
    let mut groups: Vec<Vec<T>> = Vec::new();
    for item in items {
        let slot = Slot::for_key(key(&item));
        let i = *index.entry(slot).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[i].push(item);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_keep_order_and_share_a_slot() {
        // "{a}x" and "{a}y" share the hash tag "a"; "b" is elsewhere.
        let items = ["{a}x", "b", "{a}y", "b", "{a}x"];
        let groups = by_slot(items, |s| s);
        assert_eq!(groups, vec![vec!["{a}x", "{a}y", "{a}x"], vec!["b", "b"]]);
    }
}
