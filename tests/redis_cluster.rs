//! parley on a Redis Cluster (`broker.cluster = true`): three masters started here (each
//! a private `redis-server --cluster-enabled yes` in a temp dir, joined with
//! `redis-cli --cluster create`), three parley instances on them. Room channels whose
//! slots live on different nodes carry every message once, in order; presence is
//! cluster-wide; a node that restarts loses nothing. Every process started here is
//! killed on drop, also when a test panics.

mod common;
#[path = "cluster/harness.rs"]
mod harness;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use common::{Client, WAIT, assert_gap_free, http_get, metric, presence_of};
use harness::{Cluster, Proc, free_port};
use parley::{
    config::{Config, PubSubMode},
    proto::{self, client_frame::Cmd, server_frame::Kind},
};

/// A Redis Cluster of three masters and no replicas on free ports.
struct RedisCluster {
    dir: PathBuf,
    ports: Vec<u16>,
    bus_ports: Vec<u16>,
    nodes: Vec<Proc>,
}

impl RedisCluster {
    async fn start(name: &str) -> RedisCluster {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("redis-cluster-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut cluster = RedisCluster {
            dir,
            ports: ports.clone(),
            // Set explicitly: the default, port + 10000, may not exist.
            bus_ports: (0..3).map(|_| free_port()).collect(),
            nodes: Vec::new(),
        };
        for i in 0..3 {
            std::fs::create_dir_all(cluster.node_dir(i)).unwrap();
            cluster.nodes.push(Proc::none());
            cluster.start_node(i).await;
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for i in 0..3 {
            cluster.wait_ok(i).await;
        }
        cluster
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{i}"))
    }

    /// Starts node `i` (again: it keeps its slots through its nodes.conf; its data is
    /// gone, as after a crash without persistence).
    async fn start_node(&mut self, i: usize) {
        let port = self.ports[i];
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &self.bus_ports[i].to_string(),
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                // The other nodes keep serving their slots while one is down.
                "--cluster-require-full-coverage",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &self.node_dir(i).to_string_lossy(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let pid = child.id();
        self.nodes[i] = Proc::new(child);
        let addr = format!("127.0.0.1:{port}");
        for _ in 0..500 {
            // The server answering must be the one started here (not another test's on
            // a port that was taken meanwhile). A connection that the server, still
            // starting, resets is tried again.
            let info = async {
                let client = redis::Client::open(format!("redis://{addr}/"))?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("INFO")
                    .arg("server")
                    .query_async::<String>(&mut conn)
                    .await
            };
            if let Ok(info) = info.await {
                assert!(
                    info.contains(&format!("process_id:{pid}\r")),
                    "port {port} answered by another redis-server than the one started"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("redis-server did not listen on {addr}");
    }

    /// A plain connection to node `i` (commands go to that node only).
    async fn node(&self, i: usize) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.ports[i]))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Waits until node `i` says `cluster_state:ok`.
    async fn wait_ok(&self, i: usize) {
        let mut conn = self.node(i).await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut conn)
                .await
                .unwrap();
            if info.contains("cluster_state:ok") {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {i} never got cluster_state:ok: {info}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn seeds(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node (index) that serves `key`'s slot.
    async fn node_of(&self, key: &str) -> usize {
        self.nodes_of(&[key.to_string()]).await[0]
    }

    /// The slot ranges node `i` serves (its own line of `CLUSTER NODES`).
    async fn ranges_of(&self, i: usize) -> Vec<(u16, u16)> {
        let mut conn = self.node(i).await;
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await
            .unwrap();
        let me = nodes.lines().find(|l| l.contains("myself")).unwrap();
        me.split_whitespace()
            .skip(8)
            .filter_map(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                Some((lo.parse().ok()?, hi.parse().ok()?))
            })
            .collect()
    }

    async fn serves(&self, i: usize, slot: u16) -> bool {
        let ranges = self.ranges_of(i).await;
        ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&slot))
    }

    /// Three room names whose channels live on nodes 0, 1 and 2.
    async fn rooms_on_every_node(&self) -> Vec<String> {
        let mut rooms: Vec<Option<String>> = vec![None; 3];
        for k in 0.. {
            let room = format!("room-{k}");
            let i = self.node_of(&format!("parley:room:{room}")).await;
            if rooms[i].is_none() {
                rooms[i] = Some(room);
            }
            if rooms.iter().all(Option::is_some) {
                break;
            }
        }
        rooms.into_iter().map(Option::unwrap).collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            // A node stopped with SIGSTOP (a hung node) is resumed first.
            n.signal("CONT");
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three parley instances on `redis`.
async fn parley_on(redis: &RedisCluster, name: &str, edit: impl Fn(&mut Config)) -> Cluster {
    let seeds = redis.seeds();
    Cluster::start_with(name, 3, move |c| {
        c.broker.cluster = true;
        c.broker.pubsub = PubSubMode::Sharded;
        c.broker.redis_url = seeds.clone();
        edit(c);
    })
    .await
}

/// Reads message pushes (skipping `sent` replies and the rest) until `n` came; returns
/// (room, seq, body) in arrival order.
async fn messages(c: &mut Client, n: usize) -> Vec<(String, u64, String)> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        if let Some(m) = c
            .next_of(|k| match k {
                Kind::Message(m) => Some(Some(m)),
                Kind::Sent(_) => Some(None),
                _ => None,
            })
            .await
        {
            got.push((m.room, m.seq, m.body));
        }
    }
    got
}

/// The (seq, body) of `room`'s messages in `got`, in arrival order.
fn of_room(got: &[(String, u64, String)], room: &str) -> Vec<(u64, String)> {
    got.iter()
        .filter(|(r, ..)| r == room)
        .map(|(_, s, b)| (*s, b.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_on_every_node_of_a_redis_cluster_deliver_once_in_order_everywhere() {
    let redis = RedisCluster::start("rooms").await;
    let rooms = redis.rooms_on_every_node().await;
    let cluster = parley_on(&redis, "rcluster-rooms", |_| {}).await;
    let mut ann = cluster.client(0, "ann").await;
    let mut bob = cluster.client(1, "bob").await;
    let mut cat = cluster.client(2, "cat").await;
    for c in [&mut ann, &mut bob, &mut cat] {
        for room in &rooms {
            c.join(room).await;
        }
    }
    // Concurrent pipelined sends from every instance into every room.
    const ROUNDS: usize = 10;
    for round in 0..ROUNDS {
        for c in [&mut ann, &mut bob, &mut cat] {
            for room in &rooms {
                c.send(Cmd::Send(proto::Send {
                    room: room.clone(),
                    client_msg_id: format!("{}-{room}-{round}", c.user_id),
                    body: format!("{}-{round}", c.user_id),
                    ..Default::default()
                }))
                .await;
            }
        }
    }
    let per_room = 3 * ROUNDS;
    let mut seen = Vec::new();
    for c in [&mut ann, &mut bob, &mut cat] {
        seen.push(messages(c, 3 * per_room).await);
    }
    for room in &rooms {
        let first = of_room(&seen[0], room);
        assert_gap_free(&first, 1, per_room as u64);
        for got in &seen[1..] {
            assert_eq!(of_room(got, room), first, "one order of {room} everywhere");
        }
    }

    // A direct message to a user on another instance goes over the user's channel.
    let sent = match ann
        .request(Cmd::Send(proto::Send {
            to_user: "cat".into(),
            client_msg_id: "dm-1".into(),
            body: "psst".into(),
            ..Default::default()
        }))
        .await
    {
        Kind::Sent(s) => s,
        other => panic!("expected sent, got {other:?}"),
    };
    let m = cat.next_message().await;
    assert_eq!((m.room.as_str(), m.seq), (sent.room.as_str(), 1));

    // All of it went live: no publish failed (a pipeline spanning slots would, and the
    // log would quietly repair what it lost).
    for i in 0..3 {
        let (_, metrics) = http_get(cluster.addr(i), "/metrics").await;
        assert_eq!(
            metric(&metrics, "parley_broker_publish_failures_total"),
            0.0,
            "instance {i}"
        );
        assert!(metric(&metrics, "parley_broker_publishes_total") >= 30.0);
    }

    // Each node carries the shard channel of the room whose slot it serves, and no
    // node saw a classic PUBLISH or SUBSCRIBE.
    for (i, room) in rooms.iter().enumerate() {
        let mut node = redis.node(i).await;
        let shard: Vec<String> = redis::cmd("PUBSUB")
            .arg("SHARDCHANNELS")
            .query_async(&mut node)
            .await
            .unwrap();
        assert!(shard.contains(&format!("parley:room:{room}")), "{shard:?}");
        let numsub: (String, i64) = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(format!("parley:room:{room}"))
            .query_async(&mut node)
            .await
            .unwrap();
        assert_eq!(numsub.1, 3, "every instance subscribed {room} on node {i}");
        let classic: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .query_async(&mut node)
            .await
            .unwrap();
        assert_eq!(classic, Vec::<String>::new());
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut node)
            .await
            .unwrap();
        assert!(stats.contains("cmdstat_spublish:"), "node {i}: {stats}");
        assert!(!stats.contains("cmdstat_publish:"), "node {i}: {stats}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_on_a_redis_cluster_is_cluster_wide_and_in_one_slot() {
    let redis = RedisCluster::start("presence").await;
    let cluster = parley_on(&redis, "rcluster-presence", |c| {
        c.session.grace_period = Duration::from_millis(300);
    })
    .await;
    let mut watcher = cluster.client(2, "watcher").await;
    watcher.join("team").await;
    assert!(!presence_of(&mut watcher, "dan").await.online);

    // dan on instances 0 and 1: online for an instance where he has no session.
    let mut dan0 = cluster.client(0, "dan").await;
    dan0.join("team").await;
    let dan1 = cluster.client(1, "dan").await;
    assert!(presence_of(&mut watcher, "dan").await.online);

    // A signal from instance 2 reaches him (his user channel).
    match watcher
        .request(Cmd::Signal(proto::Signal {
            to_user: "dan".into(),
            kind: "offer".into(),
            payload: "sdp".into(),
        }))
        .await
    {
        Kind::Done(_) => {}
        other => panic!("expected done, got {other:?}"),
    }
    let s = dan0
        .next_of(|k| match k {
            Kind::Signal(s) => Some(s),
            _ => None,
        })
        .await;
    assert_eq!(s.from_user, "watcher");

    // One session closes: still online through the other. Both close: offline, with a
    // last-seen time, and the co-member is told.
    drop(dan0);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(presence_of(&mut watcher, "dan").await.online);
    drop(dan1);
    let p = tokio::time::timeout(
        WAIT,
        watcher.next_of(|k| match k {
            Kind::Presence(p) if p.user == "dan" && !p.online => Some(p),
            _ => None,
        }),
    )
    .await
    .expect("an offline push");
    assert!(p.last_seen > 0);
    let now = presence_of(&mut watcher, "dan").await;
    assert!(!now.online && now.last_seen > 0);

    // Every presence key shares the hash tag {parley}: one node holds them all.
    let home = redis.node_of("{parley}").await;
    let mut node = redis.node(home).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut node)
        .await
        .unwrap();
    assert!(keys.contains(&"{parley}:instances".to_string()), "{keys:?}");
    assert!(keys.contains(&"{parley}:seen:dan".to_string()), "{keys:?}");
    assert!(keys.iter().all(|k| k.starts_with("{parley}:")), "{keys:?}");
    for i in (0..3).filter(|i| *i != home) {
        let mut node = redis.node(i).await;
        let n: i64 = redis::cmd("DBSIZE").query_async(&mut node).await.unwrap();
        assert_eq!(n, 0, "node {i} holds no key");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_cluster_node_loses_nothing_and_its_room_recovers() {
    let mut redis = RedisCluster::start("restart").await;
    let rooms = redis.rooms_on_every_node().await;
    let cluster = parley_on(&redis, "rcluster-restart", |_| {}).await;
    // The node that serves one room's channel but not the presence keys (so heartbeats
    // keep going while it is down).
    let home = redis.node_of("{parley}").await;
    let victim = (0..3).find(|i| *i != home).unwrap();
    let room = rooms[victim].clone();
    let mut ann = cluster.client(0, "ann").await;
    let mut bob = cluster.client(1, "bob").await;
    let mut cat = cluster.client(2, "cat").await;
    for c in [&mut ann, &mut bob, &mut cat] {
        c.join(&room).await;
    }
    ann.send_msg(&room, "before", "before").await;
    for c in [&mut bob, &mut cat] {
        assert_gap_free(&of_room(&messages(c, 1).await, &room), 1, 1);
    }

    redis.nodes[victim].kill();
    // Sends still succeed (the log is fine) while the room's node is gone.
    for k in 0..5 {
        ann.send_msg(&room, &format!("during-{k}"), "during").await;
    }
    redis.start_node(victim).await;
    for i in 0..3 {
        redis.wait_ok(i).await;
    }
    // What was sent meanwhile arrives once, in order, without anything new being sent.
    for c in [&mut bob, &mut cat] {
        assert_gap_free(&of_room(&messages(c, 5).await, &room), 2, 6);
    }
    // Live fan-out through the restarted node works again.
    let deadline = tokio::time::Instant::now() + WAIT;
    for i in 0..3 {
        while http_get(cluster.addr(i), "/readyz").await.0 != 200 {
            assert!(tokio::time::Instant::now() < deadline, "instance {i} ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Each instance noticed the lost connection and subscribed the node's channels
    // again (the others stayed ready meanwhile: the node served no presence key).
    for i in 0..3 {
        wait_metrics(&cluster, i, "the node's slots recovered", |m| {
            metric(m, "parley_broker_degraded_slots") == 0.0
                && metric(m, "parley_broker_resubscribes_total") >= 1.0
        })
        .await;
    }
    bob.send_msg(&room, "after", "after").await;
    let got = of_room(&messages(&mut cat, 1).await, &room);
    assert_eq!(got, vec![(7, "after".to_string())]);
    let got = of_room(&messages(&mut ann, 7).await, &room);
    assert_gap_free(&got, 1, 7);
    cat.nothing_pushed(Duration::from_millis(300)).await;
}

/// `CLUSTER MYID` of node `i`.
async fn node_id(redis: &RedisCluster, i: usize) -> String {
    let mut conn = redis.node(i).await;
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_whose_slot_moves_to_another_node_keeps_flowing() {
    let redis = RedisCluster::start("reshard").await;
    let rooms = redis.rooms_on_every_node().await;
    let cluster = parley_on(&redis, "rcluster-reshard", |_| {}).await;
    let home = redis.node_of("{parley}").await;
    let from = (0..3).find(|i| *i != home).unwrap();
    let to = (0..3).find(|i| *i != from).unwrap();
    let room = rooms[from].clone();
    let channel = format!("parley:room:{room}");
    let mut ann = cluster.client(0, "ann").await;
    let mut bob = cluster.client(1, "bob").await;
    let mut cat = cluster.client(2, "cat").await;
    for c in [&mut ann, &mut bob, &mut cat] {
        c.join(&room).await;
    }
    ann.send_msg(&room, "before", "before").await;
    for c in [&mut bob, &mut cat] {
        assert_gap_free(&of_room(&messages(c, 1).await, &room), 1, 1);
    }

    // Move the channel's slot (it holds no key) from one node to another, the way
    // resharding does: the old node drops the slot's shard channels.
    let slot = keyslot(&mut redis.node(0).await, &channel).await;
    let (from_id, to_id) = (node_id(&redis, from).await, node_id(&redis, to).await);
    let setslot = |i: usize, args: Vec<String>| {
        let redis = &redis;
        async move {
            let mut conn = redis.node(i).await;
            let _: () = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(args)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    };
    setslot(to, vec!["IMPORTING".into(), from_id.clone()]).await;
    setslot(from, vec!["MIGRATING".into(), to_id.clone()]).await;
    for i in [to, from, home] {
        setslot(i, vec!["NODE".into(), to_id.clone()]).await;
    }
    assert!(redis.serves(to, slot).await);

    // Every instance subscribes the channel again on its new node.
    let mut node = redis.node(to).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let numsub: (String, i64) = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(&channel)
            .query_async(&mut node)
            .await
            .unwrap();
        if numsub.1 == 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{channel} subscribed on its new node by every instance: {numsub:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And messages flow live again, once and in order.
    bob.send_msg(&room, "after", "after").await;
    // (ann still has her own first message to read.)
    let got = of_room(&messages(&mut ann, 2).await, &room);
    assert_gap_free(&got, 1, 2);
    let got = of_room(&messages(&mut cat, 1).await, &room);
    assert_gap_free(&got, 2, 2);
    cat.nothing_pushed(Duration::from_millis(300)).await;
}

/// Waits until `check` holds for the metrics of instance `i` (a slot recovery waits for
/// a heartbeat and, while the node is still refusing, for the client's retries).
async fn wait_metrics(cluster: &Cluster, i: usize, what: &str, check: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + 4 * WAIT;
    loop {
        let (_, metrics) = http_get(cluster.addr(i), "/metrics").await;
        if check(&metrics) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "instance {i}: {what}; degraded slots {}, resubscribes {}",
            metric(&metrics, "parley_broker_degraded_slots"),
            metric(&metrics, "parley_broker_resubscribes_total"),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three instances on `redis`, a victim node that serves neither the presence keys nor
/// the live room, and ann (instance 0) and bob (instance 1) in a room on the victim
/// (`down`) and one on another node (`live`), one message in each already delivered.
struct Outage {
    cluster: Cluster,
    victim: usize,
    down: String,
    live: String,
    ann: Client,
    bob: Client,
}

impl Outage {
    async fn start(redis: &RedisCluster, name: &str) -> Outage {
        let rooms = redis.rooms_on_every_node().await;
        let cluster = parley_on(redis, name, |_| {}).await;
        let home = redis.node_of("{parley}").await;
        let victim = (0..3).find(|i| *i != home).unwrap();
        let other = (0..3).find(|i| *i != home && *i != victim).unwrap();
        let (down, live) = (rooms[victim].clone(), rooms[other].clone());
        let mut ann = cluster.client(0, "ann").await;
        let mut bob = cluster.client(1, "bob").await;
        for c in [&mut ann, &mut bob] {
            c.join(&down).await;
            c.join(&live).await;
        }
        ann.send_msg(&down, "d-before", "before").await;
        ann.send_msg(&live, "l-before", "before").await;
        let got = messages(&mut bob, 2).await;
        assert_gap_free(&of_room(&got, &down), 1, 1);
        assert_gap_free(&of_room(&got, &live), 1, 1);
        Outage {
            cluster,
            victim,
            down,
            live,
            ann,
            bob,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_redis_cluster_node_degrades_its_own_rooms_only() {
    let mut redis = RedisCluster::start("outage").await;
    let Outage {
        cluster,
        victim,
        down,
        live,
        mut ann,
        mut bob,
    } = Outage::start(&redis, "rcluster-outage").await;
    let filled = |i: usize| {
        let addr = cluster.addr(i);
        async move {
            let (_, m) = http_get(addr, "/metrics").await;
            metric(&m, "parley_broker_filled_messages_total")
        }
    };
    let filled_before = [filled(0).await, filled(1).await];

    redis.nodes[victim].kill();
    // Sends to the stopped node's room succeed (the log has them) and are delivered
    // where they were sent.
    for k in 0..5 {
        ann.send_msg(&down, &format!("d-{k}"), "during").await;
    }
    // Both instances find the node gone (instance 0 by its failed publish, instance 1
    // by its lost connection) and mark its slots, not the others, degraded.
    for i in [0, 1] {
        wait_metrics(&cluster, i, "a degraded slot", |m| {
            metric(m, "parley_broker_degraded_slots") >= 1.0
        })
        .await;
    }
    // The live room keeps delivering in real time both ways for several heartbeats:
    // every message arrives live (nothing is filled from the log, so none was held back
    // as if Redis were down) and the instances stay ready all along.
    const LIVE: u64 = 30;
    for k in 0..LIVE / 2 {
        ann.send_msg(&live, &format!("l-ann-{k}"), "during").await;
        bob.send_msg(&live, &format!("l-bob-{k}"), "during").await;
        for i in [0, 1] {
            assert_eq!(http_get(cluster.addr(i), "/readyz").await.0, 200, "{i}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Bob reads until every live message is in. The stopped node's room usually gives
    // him nothing meanwhile, but a recovery on instance 1 may read that room's log early
    // (under load, a heartbeat's resubscription after the lost node connection can run
    // before the node is known dead): what arrives so is the start of the room, in order.
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, async {
        while of_room(&got, &live).len() < LIVE as usize {
            got.extend(messages(&mut bob, 1).await);
        }
    })
    .await
    .expect("the live room's messages while a node is down");
    assert_gap_free(&of_room(&got, &live), 2, LIVE + 1);
    let early = of_room(&got, &down);
    assert_gap_free(&early, 2, 1 + early.len() as u64);
    assert_eq!(filled(0).await, filled_before[0], "instance 0: all live");
    let filled_1 = filled(1).await - filled_before[1];
    if early.is_empty() {
        assert_eq!(filled_1, 0.0, "instance 1: all live");
    } else {
        // Only the stopped node's room came from the log (5 sends): the live room's
        // 30 all came live.
        eprintln!(
            "instance 1 read {} of the stopped node's room from the log while it was down",
            early.len()
        );
        assert!(
            (early.len() as f64..=5.0).contains(&filled_1),
            "instance 1 filled {filled_1}, bob got {} early",
            early.len()
        );
    }

    // The node returns: what was sent to its room meanwhile arrives once, in order,
    // without anything new being sent; live fan-out through it works again.
    redis.start_node(victim).await;
    for i in 0..3 {
        redis.wait_ok(i).await;
    }
    let mut down_got = early.clone();
    down_got.extend(of_room(&messages(&mut bob, 5 - early.len()).await, &down));
    assert_gap_free(&down_got, 2, 6);
    for i in [0, 1] {
        wait_metrics(&cluster, i, "no degraded slot", |m| {
            metric(m, "parley_broker_degraded_slots") == 0.0
                && metric(m, "parley_broker_resubscribes_total") >= 1.0
        })
        .await;
    }
    bob.send_msg(&down, "d-after", "after").await;
    let got = messages(&mut ann, 7 + 1 + LIVE as usize).await;
    assert_gap_free(&of_room(&got, &down), 1, 7);
    assert_gap_free(&of_room(&got, &live), 1, LIVE + 1);
    let got = messages(&mut bob, 1).await;
    assert_eq!(of_room(&got, &down), vec![(7, "after".to_string())]);
    ann.nothing_pushed(Duration::from_millis(300)).await;
    bob.nothing_pushed(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_presence_node_down_makes_presence_unavailable_and_rooms_elsewhere_flow() {
    let mut redis = RedisCluster::start("presence-down").await;
    let rooms = redis.rooms_on_every_node().await;
    let cluster = parley_on(&redis, "rcluster-presence-down", |_| {}).await;
    let home = redis.node_of("{parley}").await;
    let live = rooms[(0..3).find(|i| *i != home).unwrap()].clone();
    let mut ann = cluster.client(0, "ann").await;
    let mut bob = cluster.client(1, "bob").await;
    for c in [&mut ann, &mut bob] {
        c.join(&live).await;
    }
    assert!(presence_of(&mut bob, "ann").await.online);

    redis.nodes[home].kill();
    // Presence queries fail once the heartbeat finds the node gone.
    let deadline = tokio::time::Instant::now() + 2 * WAIT;
    loop {
        let reply = bob
            .request(Cmd::Presence(proto::PresenceQuery {
                users: vec!["ann".into()],
            }))
            .await;
        if let Kind::Error(_) = reply {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "presence failing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Messages in a room on another node flow live; the instances stay ready.
    for k in 0..3 {
        ann.send_msg(&live, &format!("l-{k}"), "during").await;
    }
    let got = tokio::time::timeout(WAIT, messages(&mut bob, 3))
        .await
        .expect("the live room's messages while the presence node is down");
    assert_gap_free(&of_room(&got, &live), 1, 3);
    for i in [0, 1] {
        assert_eq!(http_get(cluster.addr(i), "/readyz").await.0, 200);
    }

    // The node returns empty: every instance writes its users again.
    redis.start_node(home).await;
    for i in 0..3 {
        redis.wait_ok(i).await;
    }
    let deadline = tokio::time::Instant::now() + 4 * WAIT;
    loop {
        let reply = bob
            .request(Cmd::Presence(proto::PresenceQuery {
                users: vec!["ann".into()],
            }))
            .await;
        if let Kind::PresenceList(l) = reply
            && l.users[0].online
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "ann online again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = messages(&mut ann, 3).await;
    assert_gap_free(&of_room(&got, &live), 1, 3);
}

/// Reads `c`'s pushes until `room`'s message `seq` (skipping other rooms' and earlier
/// ones), failing unless it comes within `bound` or another comes in its place. Returns
/// the other rooms' messages it skipped (room, seq), for a later failure to show.
async fn live_in_room(
    c: &mut Client,
    room: &str,
    seq: u64,
    bound: Duration,
    what: &str,
) -> Vec<(String, u64)> {
    let mut skipped = Vec::new();
    let got = tokio::time::timeout(bound, async {
        loop {
            let got = messages(c, 1).await;
            skipped.extend(
                got.iter()
                    .filter(|(r, ..)| r != room)
                    .map(|(r, s, _)| (r.clone(), *s)),
            );
            if let Some((s, _)) = of_room(&got, room).pop()
                && s >= seq
            {
                return s;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not within {bound:?}"));
    assert_eq!(got, seq, "{what}");
    skipped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_cluster_node_stalls_only_its_own_rooms() {
    // A node that hangs (SIGSTOP: connections are accepted and commands sent, nothing is
    // answered) rather than refusing: only its rooms wait; the others deliver live, well
    // within the client's 2 s response timeout, for longer than its retries take.
    const BOUND: Duration = Duration::from_millis(1000);
    let redis = RedisCluster::start("hang").await;
    let Outage {
        cluster,
        victim,
        down,
        live,
        mut ann,
        mut bob,
    } = Outage::start(&redis, "rcluster-hang").await;

    redis.nodes[victim].signal("STOP");
    // Publishes to the hung node's room (the log has them; they are delivered here).
    for k in 0..5 {
        ann.send_msg(&down, &format!("d-{k}"), "during").await;
    }
    // A user on the third instance subscribes the hung node's room first, then the live
    // one: the second subscription does not wait for the first.
    let mut cid = cluster.client(2, "cid").await;
    cid.join(&down).await;
    cid.join(&live).await;
    // The live room, both ways, for several of the client's timeouts: every message
    // arrives within BOUND of its send; the instances stay ready.
    let mut seq = 1;
    let start = tokio::time::Instant::now();
    let mut k = 0;
    // What bob got of other rooms meanwhile, with when (none of the hung node's room is
    // expected before it resumes).
    let mut bob_skipped = Vec::new();
    while start.elapsed() < Duration::from_secs(7) {
        let from = if k % 2 == 0 { &mut ann } else { &mut bob };
        from.send_msg(&live, &format!("l-{k}"), "during").await;
        seq += 1;
        let at = start.elapsed();
        for (name, c) in [("ann", &mut ann), ("bob", &mut bob), ("cid", &mut cid)] {
            let what = format!("live message {seq} ({at:?} after the stop) to {name}");
            let skipped = live_in_room(c, &live, seq, BOUND, &what).await;
            if name == "bob" && !skipped.is_empty() {
                bob_skipped.push((start.elapsed(), skipped));
            }
        }
        for i in 0..3 {
            assert_eq!(http_get(cluster.addr(i), "/readyz").await.0, 200, "{i}");
        }
        k += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every instance marked the hung node's slots, not the others, degraded: the ones
    // that sent to it (instance 0 its room's publishes, instance 2 cid's subscription)
    // and instance 1, which only receives from it, by its probe of the node.
    for i in [0, 1, 2] {
        wait_metrics(&cluster, i, "a degraded slot", |m| {
            metric(m, "parley_broker_degraded_slots") >= 1.0
        })
        .await;
    }

    // The node resumes: its slots recover, and the room goes on with nothing lost, in
    // order. Instance 1 repairs the room when the node is back: bob gets what was sent
    // meanwhile with nothing new sent.
    redis.nodes[victim].signal("CONT");
    for i in [0, 1, 2] {
        wait_metrics(&cluster, i, "no degraded slot", |m| {
            metric(m, "parley_broker_degraded_slots") == 0.0
        })
        .await;
    }
    // As in the stopped node's test: a recovery on instance 1 may read the hung node's
    // room from the log before the node is known hung (under load it did, 9 ms after the
    // stop): what bob got so is the start of the room, in order, and the rest follows.
    let early: Vec<u64> = bob_skipped
        .iter()
        .flat_map(|(_, got)| got.iter().filter(|(r, _)| *r == down).map(|(_, s)| *s))
        .collect();
    assert_eq!(
        early,
        (2..2 + early.len() as u64).collect::<Vec<_>>(),
        "the hung node's room read early is its start, in order: {bob_skipped:?}"
    );
    let mut seqs = early.clone();
    tokio::time::timeout(4 * WAIT, async {
        while seqs.last().is_none_or(|s| *s < 6) {
            seqs.extend(
                of_room(&messages(&mut bob, 1).await, &down)
                    .iter()
                    .map(|(s, _)| *s),
            );
        }
    })
    .await
    .expect("the hung node's room repaired at instance 1 when it resumed");
    assert_eq!(
        seqs,
        (2..=6).collect::<Vec<_>>(),
        "in order, once each ({} read early); bob's other rooms' messages while it hung: \
         {bob_skipped:?}",
        early.len()
    );
    ann.send_msg(&down, "d-after", "after").await;
    // (cid joined after 2-6 were sent: his first is 7.)
    for (c, first) in [(&mut bob, 7), (&mut cid, 7)] {
        let got = tokio::time::timeout(4 * WAIT, async {
            let mut got = Vec::new();
            while got.last().is_none_or(|(s, _)| *s < 7) {
                got.extend(of_room(&messages(c, 1).await, &down));
            }
            got
        })
        .await
        .expect("the hung node's room after it resumed");
        assert_gap_free(&got, first, 7);
    }
}

impl RedisCluster {
    /// The node (index) serving each of `keys`, read once (one `CLUSTER NODES` per
    /// node, one `CLUSTER KEYSLOT` per key on one connection).
    async fn nodes_of(&self, keys: &[String]) -> Vec<usize> {
        let mut ranges = Vec::new();
        for i in 0..3 {
            let mine = self.ranges_of(i).await;
            ranges.extend(mine.into_iter().map(|(lo, hi)| (lo, hi, i)));
        }
        let mut conn = self.node(0).await;
        let mut out = Vec::new();
        for key in keys {
            let slot = keyslot(&mut conn, key).await;
            let (.., i) = ranges
                .iter()
                .find(|(lo, hi, _)| (*lo..=*hi).contains(&slot))
                .expect("a node serves every slot");
            out.push(*i);
        }
        out
    }

    /// The number of distinct slots among `keys`.
    async fn slots_of(&self, keys: &[String]) -> usize {
        let mut conn = self.node(0).await;
        let mut slots = std::collections::HashSet::new();
        for key in keys {
            let slot = keyslot(&mut conn, key).await;
            slots.insert(slot);
        }
        slots.len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_cluster_nodes_slots_are_marked_together_and_come_back_together() {
    // An instance with many channels on a node that dies marks all of their slots
    // degraded at once (one probe, or one failure, stands for the node), not a few at a
    // time as each slot's own command fails; when the node is back they all recover,
    // subscribed again (a signal reaches each user whose channel lives there).
    let mut redis = RedisCluster::start("together").await;
    let cluster = parley_on(&redis, "rcluster-together", |_| {}).await;
    let home = redis.node_of("{parley}").await;
    let victim = (0..3).find(|i| *i != home).unwrap();
    // A room on a node that stays up, so that they can be signalled.
    let lobby = redis.rooms_on_every_node().await[home].clone();
    // 48 users on instance 1: their user channels spread over every node.
    let names: Vec<String> = (0..48).map(|k| format!("u{k}")).collect();
    let mut users = Vec::new();
    for name in &names {
        let mut c = cluster.client(1, name).await;
        c.join(&lobby).await;
        users.push(c);
    }
    let channels: Vec<String> = names.iter().map(|n| format!("parley:user:{n}")).collect();
    let owners = redis.nodes_of(&channels).await;
    let mut on_victim: Vec<String> = channels
        .iter()
        .zip(&owners)
        .filter(|(_, o)| **o == victim)
        .map(|(c, _)| c.clone())
        .collect();
    if redis.nodes_of(&["parley:all".to_string()]).await[0] == victim {
        on_victim.push("parley:all".into());
    }
    let expected = redis.slots_of(&on_victim).await;
    assert!(
        expected > 8,
        "more slots on the victim than a recovery tries at once: {expected}"
    );
    // A heartbeat has read the slot map (the first one, 2 s after the start).
    tokio::time::sleep(Duration::from_millis(2500)).await;

    redis.nodes[victim].kill();
    let deadline = tokio::time::Instant::now() + 2 * WAIT;
    let first = loop {
        let (_, m) = http_get(cluster.addr(1), "/metrics").await;
        let n = metric(&m, "parley_broker_degraded_slots");
        if n > 0.0 {
            break n;
        }
        assert!(tokio::time::Instant::now() < deadline, "a degraded slot");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        first, expected as f64,
        "every slot of instance 1's channels on the dead node, at once"
    );
    // Still all of them a few heartbeats later, and the instance ready.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, m) = http_get(cluster.addr(1), "/metrics").await;
    assert_eq!(metric(&m, "parley_broker_degraded_slots"), expected as f64);
    assert_eq!(http_get(cluster.addr(1), "/readyz").await.0, 200);

    redis.start_node(victim).await;
    for i in 0..3 {
        redis.wait_ok(i).await;
    }
    wait_metrics(&cluster, 1, "the dead node's slots recovered", |m| {
        metric(m, "parley_broker_degraded_slots") == 0.0
            && metric(m, "parley_broker_resubscribes_total") >= 1.0
    })
    .await;
    // Every user whose channel lives on the restarted node (it lost its subscriptions)
    // is reached again through it.
    let mut sender = cluster.client(2, "sender").await;
    sender.join(&lobby).await;
    for (k, (name, owner)) in names.iter().zip(&owners).enumerate() {
        if *owner != victim {
            continue;
        }
        match sender
            .request(Cmd::Signal(proto::Signal {
                to_user: name.clone(),
                kind: "ping".into(),
                payload: format!("{k}"),
            }))
            .await
        {
            Kind::Done(_) => {}
            other => panic!("expected done, got {other:?}"),
        }
        let s = tokio::time::timeout(
            WAIT,
            users[k].next_of(|k| match k {
                Kind::Signal(s) => Some(s),
                _ => None,
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("{name}'s signal through the restarted node"));
        assert_eq!(s.payload, format!("{k}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_storm_against_a_dead_redis_cluster_node_holds_up_no_other_node() {
    // Right after a node dies, a user joins many rooms whose channels live on it (one
    // subscription per slot, each bound to fail), then a room on a live node: that one
    // is subscribed at once (the dead node's slots wait behind each other, not the live
    // node's), and once the node is back every room of the storm delivers again.
    const BOUND: Duration = Duration::from_millis(1000);
    let mut redis = RedisCluster::start("storm").await;
    let Outage {
        cluster,
        victim,
        live,
        mut ann,
        ..
    } = Outage::start(&redis, "rcluster-storm").await;
    let candidates: Vec<String> = (0..400).map(|k| format!("storm-{k}")).collect();
    let channels: Vec<String> = candidates
        .iter()
        .map(|r| format!("parley:room:{r}"))
        .collect();
    let owners = redis.nodes_of(&channels).await;
    let storm: Vec<String> = candidates
        .iter()
        .zip(&owners)
        .filter(|(_, o)| **o == victim)
        .map(|(r, _)| r.clone())
        .take(60)
        .collect();
    assert_eq!(storm.len(), 60);

    redis.nodes[victim].kill();
    let mut cid = cluster.client(2, "cid").await;
    for room in &storm {
        cid.join(room).await;
    }
    cid.join(&live).await;
    // (ann's first message in the live room was seq 1, before cid joined.)
    ann.send_msg(&live, "l-storm", "during").await;
    live_in_room(
        &mut cid,
        &live,
        2,
        BOUND,
        "the live room right after the storm",
    )
    .await;

    // Messages to the storm's rooms while the node is down (the log has them).
    for room in storm.iter().take(3) {
        ann.join(room).await;
        ann.send_msg(room, &format!("{room}-during"), "during")
            .await;
    }
    redis.start_node(victim).await;
    for i in 0..3 {
        redis.wait_ok(i).await;
    }
    // Every instance: ann's (0) marked the node down when its sends to the storm's rooms
    // failed, and publishes only locally until its own probe finds the node back.
    for i in 0..3 {
        wait_metrics(&cluster, i, "the storm's slots recovered", |m| {
            metric(m, "parley_broker_degraded_slots") == 0.0
        })
        .await;
    }
    // What was sent meanwhile arrives (repaired), and live delivery works again in
    // every room of the storm.
    let got = tokio::time::timeout(4 * WAIT, messages(&mut cid, 3))
        .await
        .expect("the storm's rooms repaired after the node came back");
    for room in storm.iter().take(3) {
        assert_eq!(
            of_room(&got, room),
            vec![(1, "during".to_string())],
            "{room}"
        );
    }
    for room in storm.iter().skip(3).take(5) {
        ann.join(room).await;
        ann.send_msg(room, &format!("{room}-after"), "after").await;
        live_in_room(&mut cid, room, 1, BOUND, "a storm room after the recovery").await;
    }
}

/// `key`'s cluster slot, as the node on `conn` computes it (`CLUSTER KEYSLOT`).
async fn keyslot(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}
