//! Which Redis Cluster node serves which slot, as this instance last read it
//! (`CLUSTER SHARDS`, Redis 7; `CLUSTER SLOTS` where a server lacks it), and a limit on
//! the commands in flight per node.
//!
//! The map lets the broker treat a node as one thing: one probe per node per heartbeat,
//! every slot of a node marked down when a command to it fails for a node-level reason
//! (refused, dropped, timed out), all of them back after one probe answers. The cluster
//! client routes commands by its own map, so this one only decides what is probed and
//! what is marked: a stale map can mark a healthy slot down (its rooms deliver locally
//! and are repaired from the log when it is probed again: a delay) or leave a dead slot
//! up (its own command fails and marks it, as without a map), never lose a message.
//!
//! Owns: slot numbers, the slot → node map, the per-node limit. Not: what is sent
//! (`redis`), the connection (`conn`).

use std::{collections::HashMap, collections::VecDeque, sync::Arc};

use redis::Value;

/// A cluster has this many slots.
pub const SLOTS: u16 = 16384;

/// A Redis Cluster hash slot (0..16384): what `CLUSTER KEYSLOT` says for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(u16);

impl Slot {
    /// The slot of `key` (its hash tag, `{...}`, if it has a non-empty one).
    pub fn for_key(key: impl AsRef<[u8]>) -> Slot {
        let key = key.as_ref();
        let tagged = key
            .iter()
            .position(|b| *b == b'{')
            .and_then(|open| {
                let rest = &key[open + 1..];
                let close = rest.iter().position(|b| *b == b'}')?;
                (close > 0).then(|| &rest[..close])
            })
            .unwrap_or(key);
        Slot(crc16(tagged) % SLOTS)
    }

    pub fn number(self) -> u16 {
        self.0
    }
}

/// CRC-16/XMODEM (polynomial 0x1021, initial 0), the checksum of Redis Cluster's slots.
fn crc16(bytes: &[u8]) -> u16 {
    const TABLE: [u16; 256] = {
        let mut table = [0u16; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = (i as u16) << 8;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };
    bytes.iter().fold(0u16, |crc, b| {
        (crc << 8) ^ TABLE[(((crc >> 8) as u8) ^ b) as usize]
    })
}

/// A node, by its cluster node id.
pub type Node = Arc<str>;

/// Slot ranges and the master node that serves each.
#[derive(Debug, Default, PartialEq)]
pub struct Topology {
    /// (first slot, last slot, node), sorted by first slot, not overlapping.
    ranges: Vec<(u16, u16, Node)>,
}

impl Topology {
    /// The node that serves `slot`, if the map has one.
    pub fn node_of(&self, slot: Slot) -> Option<&Node> {
        let s = slot.0;
        let i = self.ranges.partition_point(|(first, ..)| *first <= s);
        let (first, last, node) = self.ranges.get(i.checked_sub(1)?)?;
        (*first <= s && s <= *last).then_some(node)
    }

    /// How many nodes serve slots.
    pub fn nodes(&self) -> usize {
        let mut nodes: Vec<&Node> = self.ranges.iter().map(|r| &r.2).collect();
        nodes.sort();
        nodes.dedup();
        nodes.len()
    }

    fn from_ranges(mut ranges: Vec<(u16, u16, Node)>) -> Option<Topology> {
        ranges.retain(|(first, last, _)| first <= last && *last < SLOTS);
        ranges.sort_by_key(|r| r.0);
        if ranges.is_empty() || ranges.windows(2).any(|w| w[0].1 >= w[1].0) {
            return None;
        }
        Some(Topology { ranges })
    }

    /// From a `CLUSTER SHARDS` reply (RESP3 maps or RESP2 flat arrays): each shard's
    /// slot ranges and its master's id. `None` if it does not parse.
    pub fn from_shards(reply: &Value) -> Option<Topology> {
        let Value::Array(shards) = reply else {
            return None;
        };
        let mut ranges = Vec::new();
        for shard in shards {
            let shard = fields(shard)?;
            let Value::Array(slots) = field(&shard, "slots")? else {
                return None;
            };
            let Value::Array(nodes) = field(&shard, "nodes")? else {
                return None;
            };
            let master = nodes.iter().find_map(|n| {
                let n = fields(n)?;
                (text(field(&n, "role")?)? == "master").then_some(())?;
                text(field(&n, "id")?)
            });
            let Some(master) = master else {
                continue;
            };
            let master: Node = master.into();
            for pair in slots.chunks(2) {
                let [first, last] = pair else { return None };
                ranges.push((int(first)?, int(last)?, master.clone()));
            }
        }
        Topology::from_ranges(ranges)
    }

    /// From a `CLUSTER SLOTS` reply (Redis 3 to 6; deprecated in 7): per range the
    /// first and last slot, then the master as [ip, port, id, ...].
    pub fn from_slots(reply: &Value) -> Option<Topology> {
        let Value::Array(entries) = reply else {
            return None;
        };
        let mut ranges = Vec::new();
        for entry in entries {
            let Value::Array(e) = entry else { return None };
            let [first, last, master, ..] = &e[..] else {
                return None;
            };
            let Value::Array(master) = master else {
                return None;
            };
            let id = text(master.get(2)?)?;
            ranges.push((int(first)?, int(last)?, id.into()));
        }
        Topology::from_ranges(ranges)
    }
}

/// A map's (or RESP2 flat array's) key/value pairs.
fn fields(v: &Value) -> Option<Vec<(&Value, &Value)>> {
    match v {
        Value::Map(pairs) => Some(pairs.iter().map(|(k, v)| (k, v)).collect()),
        Value::Array(flat) if flat.len() % 2 == 0 => {
            Some(flat.chunks(2).map(|p| (&p[0], &p[1])).collect())
        }
        _ => None,
    }
}

fn field<'a>(fields: &[(&'a Value, &'a Value)], name: &str) -> Option<&'a Value> {
    fields
        .iter()
        .find(|(k, _)| text(k).is_some_and(|k| k == name))
        .map(|(_, v)| *v)
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) | Value::VerbatimString { text: s, .. } => Some(s.clone()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<u16> {
    match v {
        Value::Int(n) => u16::try_from(*n).ok(),
        other => text(other)?.parse().ok(),
    }
}

/// The most commands (pipelines) in flight per node, for one queue (publisher or
/// changes), and the keys waiting for a turn, first come first served. A key whose node
/// the map does not know is not limited (no map yet: as before there was one).
///
/// A node that refuses connections makes each command wait for the client's retries;
/// hundreds of them at once stalled redis-rs's cluster connection for every node
/// (docs/BENCHMARKS.md, round five). Limited per node, a dead node's slots wait behind
/// each other, not the healthy nodes' slots, and once the first failure marks the node
/// down the rest are dropped without being sent.
pub struct NodeLimit<K> {
    limit: usize,
    in_flight: HashMap<Node, usize>,
    waiting: VecDeque<K>,
}

impl<K: Copy + PartialEq> NodeLimit<K> {
    pub fn new(limit: usize) -> Self {
        NodeLimit {
            limit,
            in_flight: HashMap::new(),
            waiting: VecDeque::new(),
        }
    }

    /// Takes a turn on `node` if it has one free.
    pub fn try_take(&mut self, node: Option<&Node>) -> bool {
        let Some(node) = node else { return true };
        let n = self.in_flight.entry(node.clone()).or_default();
        if *n < self.limit {
            *n += 1;
            true
        } else {
            false
        }
    }

    /// Gives back a turn taken on `node`.
    pub fn release(&mut self, node: Option<&Node>) {
        if let Some(node) = node
            && let Some(n) = self.in_flight.get_mut(node)
        {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(node);
            }
        }
    }

    /// `key` waits for a turn (behind the keys already waiting). A key queued twice
    /// is harmless: `node_of` finds no work for it the second time.
    pub fn wait(&mut self, key: K) {
        self.waiting.push_back(key);
    }

    /// The waiting keys that get a turn now, in order, each with the node its turn was
    /// taken on (give it back with [`Self::release`] when done). `node_of` says the node
    /// of a key with work to start, `None` for one without (it leaves the queue); the
    /// keys whose node is full keep waiting, in order.
    pub fn start_waiting(
        &mut self,
        mut node_of: impl FnMut(K) -> Option<Option<Node>>,
    ) -> Vec<(K, Option<Node>)> {
        let mut started = Vec::new();
        let mut still = VecDeque::new();
        while let Some(key) = self.waiting.pop_front() {
            let Some(node) = node_of(key) else { continue };
            if self.try_take(node.as_ref()) {
                started.push((key, node));
            } else {
                still.push_back(key);
            }
        }
        self.waiting = still;
        started
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_cluster_client() {
        for key in [
            "",
            "a",
            "parley:room:fanout-1",
            "parley:user:u-123",
            "{parley}:instances",
            "{}x",
            "a{b}c",
            "a{}{b}",
            "x{y",
            "123456789",
        ] {
            let mine = Slot::for_key(key).number();
            assert_eq!(
                redis::cluster_routing::Slot::new(mine),
                Some(redis::cluster_routing::Slot::for_key(key)),
                "{key:?}"
            );
        }
        // The check value of CRC-16/XMODEM, and Redis' documented example.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(Slot::for_key("foo").number(), 12182);
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn reads_cluster_shards_resp3_and_resp2() {
        let node = |id: &str, role: &str| {
            Value::Map(vec![
                (bulk("id"), bulk(id)),
                (bulk("port"), Value::Int(7000)),
                (bulk("role"), bulk(role)),
                (bulk("health"), bulk("online")),
            ])
        };
        let shard = |slots: Vec<i64>, nodes: Vec<Value>| {
            Value::Map(vec![
                (
                    bulk("slots"),
                    Value::Array(slots.into_iter().map(Value::Int).collect()),
                ),
                (bulk("nodes"), Value::Array(nodes)),
            ])
        };
        let reply = Value::Array(vec![
            shard(
                vec![0, 5460, 10923, 10999],
                vec![node("r1", "replica"), node("a", "master")],
            ),
            shard(vec![5461, 10922], vec![node("b", "master")]),
            shard(vec![11000, 16383], vec![node("c", "master")]),
            // A shard that serves nothing (a new empty master).
            shard(vec![], vec![node("d", "master")]),
        ]);
        let t = Topology::from_shards(&reply).expect("parses");
        let at = |s: u16| {
            t.node_of(Slot(s))
                .map(|n| n.to_string())
                .unwrap_or_default()
        };
        assert_eq!(
            [0, 5460, 5461, 10922, 10923, 10999, 11000, 16383].map(at),
            ["a", "a", "b", "b", "a", "a", "c", "c"]
        );
        assert_eq!(t.nodes(), 3);
        // RESP2: the same as flat arrays.
        let flat = |v: Value| match v {
            Value::Map(pairs) => {
                Value::Array(pairs.into_iter().flat_map(|(k, v)| [k, v]).collect())
            }
            v => v,
        };
        let resp2 = Value::Array(vec![flat(shard(
            vec![0, 16383],
            vec![flat(node("z", "master"))],
        ))]);
        let t = Topology::from_shards(&resp2).expect("parses");
        assert_eq!(t.node_of(Slot(9)).map(|n| &**n), Some("z"));
        // Garbage does not parse; a map with a hole answers None in it.
        assert_eq!(Topology::from_shards(&bulk("x")), None);
        let holes = Value::Array(vec![shard(vec![100, 200], vec![node("a", "master")])]);
        let t = Topology::from_shards(&holes).unwrap();
        assert_eq!(t.node_of(Slot(99)), None);
        assert_eq!(t.node_of(Slot(201)), None);
        assert!(t.node_of(Slot(150)).is_some());
    }

    #[test]
    fn reads_cluster_slots() {
        let master = |id: &str| Value::Array(vec![bulk("127.0.0.1"), Value::Int(7000), bulk(id)]);
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(5461), Value::Int(16383), master("b")]),
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                master("a"),
                master("r"),
            ]),
        ]);
        let t = Topology::from_slots(&reply).expect("parses");
        assert_eq!(t.node_of(Slot(0)).map(|n| &**n), Some("a"));
        assert_eq!(t.node_of(Slot(16383)).map(|n| &**n), Some("b"));
        // Overlapping ranges are not a map.
        let bad = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(10), master("a")]),
            Value::Array(vec![Value::Int(5), Value::Int(20), master("b")]),
        ]);
        assert_eq!(Topology::from_slots(&bad), None);
    }

    #[test]
    fn the_limit_is_per_node_and_first_come_first_served() {
        let (a, b): (Node, Node) = ("a".into(), "b".into());
        let mut limit = NodeLimit::new(2);
        assert!(limit.try_take(Some(&a)));
        assert!(limit.try_take(Some(&a)));
        assert!(!limit.try_take(Some(&a)), "a is full");
        assert!(limit.try_take(Some(&b)), "b is not held behind a");
        assert!(limit.try_take(None), "an unknown node is not limited");
        limit.wait(1u16);
        limit.wait(2);
        assert_eq!(limit.waiting(), 2);
        let node = |k: u16| Some(Some(if k == 1 { a.clone() } else { b.clone() }));
        let keys = |v: Vec<(u16, Option<Node>)>| v.into_iter().map(|s| s.0).collect::<Vec<_>>();
        assert_eq!(
            keys(limit.start_waiting(node)),
            vec![2],
            "a still full; b had a turn"
        );
        assert!(limit.start_waiting(node).is_empty(), "b full too now");
        limit.release(Some(&a));
        assert_eq!(keys(limit.start_waiting(node)), vec![1]);
        assert_eq!(limit.waiting(), 0);
        // A key with no work left leaves the queue.
        limit.wait(3);
        assert!(limit.start_waiting(|_| None).is_empty());
        assert_eq!(limit.waiting(), 0);
    }
}
