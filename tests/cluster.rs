//! Many instances: three `parley` processes sharing one store and a private
//! `redis-server` (started here on a free port, killed at the end). Users on different
//! instances chat as if on one; order, idempotency and presence hold across instances;
//! Redis restarts and dead instances are survived.

mod common;
#[path = "cluster/harness.rs"]
mod harness;

use std::{collections::BTreeMap, time::Duration};

use common::{Client, WAIT, assert_gap_free, code_of, http_get, metric, presence_of};
use harness::Cluster;
use parley::{
    config::PubSubMode,
    proto::{self, ErrorCode, client_frame::Cmd, server_frame::Kind},
};

/// Reads `n` message pushes; returns (seq, body) in the order they came.
async fn messages(c: &mut Client, n: usize) -> Vec<(u64, String)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let m = c.next_message().await;
        out.push((m.seq, m.body));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_different_instances_chat_in_rooms_and_dms() {
    let cluster = Cluster::start("chat", 3).await;
    let mut ann = cluster.client(0, "ann").await;
    let mut bob = cluster.client(1, "bob").await;
    let mut cat = cluster.client(2, "cat").await;
    for c in [&mut ann, &mut bob, &mut cat] {
        c.join("lobby").await;
    }
    // Each sends in turn; everyone (the sender included) sees all of it in seq order.
    let mut n = 0;
    for round in 0..10 {
        for c in [&mut ann, &mut bob, &mut cat] {
            let sent = c
                .send_msg("lobby", &format!("{}-{round}", c.user_id), "hi")
                .await;
            n += 1;
            assert_eq!(sent.seq, n);
        }
    }
    for c in [&mut ann, &mut bob, &mut cat] {
        assert_gap_free(&messages(c, 30).await, 1, 30);
    }

    // A direct message from an instance to a user on another.
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
    assert_eq!(
        (m.room.as_str(), m.seq, m.body.as_str()),
        (sent.room.as_str(), 1, "psst")
    );
    assert_eq!(m.sender, "ann");
    // Bob is not in the DM: nothing more for him.
    bob.nothing_pushed(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_from_every_instance_give_one_order_everywhere() {
    let cluster = Cluster::start("order", 3).await;
    const EACH: usize = 40;
    // Two subscribers per instance.
    let mut subscribers = Vec::new();
    for i in 0..3 {
        for k in 0..2 {
            let mut c = cluster.client(i, &format!("sub{i}{k}")).await;
            c.join("busy").await;
            subscribers.push(c);
        }
    }
    // One sender per instance, all at once, each pipelining its sends.
    let mut senders = Vec::new();
    for i in 0..3 {
        let mut c = cluster.client(i, &format!("pub{i}")).await;
        c.join("busy").await;
        senders.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for k in 0..EACH {
                ids.push(
                    c.send(Cmd::Send(proto::Send {
                        room: "busy".into(),
                        client_msg_id: format!("{i}-{k}"),
                        body: format!("{i}-{k}"),
                        ..Default::default()
                    }))
                    .await,
                );
            }
            let mut acked = 0;
            while acked < EACH {
                let f = c.read().await.expect("replies");
                if f.pos == 0 && matches!(f.kind, Some(Kind::Sent(_))) {
                    acked += 1;
                }
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    let total = 3 * EACH;
    let mut orders: Vec<BTreeMap<u64, String>> = Vec::new();
    for c in &mut subscribers {
        let got = messages(c, total).await;
        assert_gap_free(&got, 1, total as u64);
        orders.push(got.into_iter().collect());
    }
    for o in &orders[1..] {
        assert_eq!(o, &orders[0], "every subscriber sees the same seq order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_nothing_and_delivery_resumes_by_itself() {
    redis_restart(Cluster::start("redis-restart", 3).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_under_sharded_pubsub_loses_nothing_either() {
    // Shard channels are not resubscribed by the connection manager: parley's own
    // resubscribe after the loss must do it.
    redis_restart(Cluster::start_with("redis-restart-sharded", 3, sharded).await).await;
}

fn sharded(c: &mut parley::config::Config) {
    c.broker.pubsub = PubSubMode::Sharded;
}

/// Stops Redis under a cluster of three with a room, sends, starts Redis again: the
/// messages sent meanwhile reach every instance once, in order, by themselves.
async fn redis_restart(mut cluster: Cluster) {
    let mut ann = cluster.client(0, "ann").await;
    let mut bob = cluster.client(1, "bob").await;
    let mut cat = cluster.client(2, "cat").await;
    for c in [&mut ann, &mut bob, &mut cat] {
        c.join("r").await;
    }
    ann.send_msg("r", "before", "before").await;
    for c in [&mut bob, &mut cat] {
        assert_gap_free(&messages(c, 1).await, 1, 1);
    }

    cluster.stop_redis();
    // The instances notice: not ready while Redis is gone.
    let addr = cluster.addr(1);
    let deadline = tokio::time::Instant::now() + WAIT;
    while http_get(addr, "/readyz").await.0 != 503 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz never said 503"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Sends still succeed (the log is fine); they reach the sender's instance only.
    for k in 0..5 {
        ann.send_msg("r", &format!("during-{k}"), "during").await;
    }

    cluster.start_redis().await;
    for i in 0..3 {
        cluster.wait_ready(i).await;
    }
    // Without anything new being sent, the repair after the resubscribe delivers what
    // was missed, once.
    for c in [&mut bob, &mut cat] {
        assert_gap_free(&messages(c, 5).await, 2, 6);
    }
    // The metrics say how: a resubscribe, and messages delivered from the log.
    let (_, metrics) = http_get(cluster.addr(1), "/metrics").await;
    assert!(metric(&metrics, "parley_broker_resubscribes_total") >= 1.0);
    assert!(metric(&metrics, "parley_broker_filled_messages_total") >= 5.0);
    // Presence was rebuilt in the new Redis.
    assert!(presence_of(&mut cat, "bob").await.online);
    // Live fan-out works again.
    bob.send_msg("r", "after", "after").await;
    for c in [&mut ann, &mut cat] {
        let got = messages(c, if c.user_id == "ann" { 7 } else { 1 }).await;
        assert_eq!(got.last().unwrap().0, 7);
    }
    cat.nothing_pushed(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_pubsub_carries_rooms_direct_messages_and_presence() {
    let cluster = Cluster::start_with("sharded", 3, sharded).await;
    let mut ann = cluster.client(0, "ann").await;
    let mut bob = cluster.client(1, "bob").await;
    let mut cat = cluster.client(2, "cat").await;
    for c in [&mut ann, &mut bob, &mut cat] {
        c.join("lobby").await;
    }
    // Concurrent pipelined sends from every instance: one order everywhere.
    for round in 0..20 {
        for c in [&mut ann, &mut bob, &mut cat] {
            c.send(Cmd::Send(proto::Send {
                room: "lobby".into(),
                client_msg_id: format!("{}-{round}", c.user_id),
                body: format!("{}-{round}", c.user_id),
                ..Default::default()
            }))
            .await;
        }
    }
    let mut orders = Vec::new();
    for c in [&mut ann, &mut bob, &mut cat] {
        // Each client's own 20 `sent` replies come between the pushes.
        let mut got = Vec::new();
        while got.len() < 60 {
            if let Some(m) = c
                .next_of(|k| match k {
                    Kind::Message(m) => Some(Some(m)),
                    Kind::Sent(_) => Some(None),
                    _ => None,
                })
                .await
            {
                got.push((m.seq, m.body));
            }
        }
        assert_gap_free(&got, 1, 60);
        orders.push(got);
    }
    assert_eq!(orders[0], orders[1]);
    assert_eq!(orders[0], orders[2]);
    // A direct message to a user on another instance (the user's channel).
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
    assert!(presence_of(&mut cat, "bob").await.online);

    // Redis saw shard channels only: SPUBLISH calls, no PUBLISH, no classic channel.
    let url = format!("redis://127.0.0.1:{}/", cluster.redis_port);
    let mut redis = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let shard: Vec<String> = redis::cmd("PUBSUB")
        .arg("SHARDCHANNELS")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        shard.contains(&"parley:room:lobby".to_string()),
        "{shard:?}"
    );
    assert!(shard.contains(&"parley:user:cat".to_string()), "{shard:?}");
    assert!(shard.contains(&"parley:all".to_string()), "{shard:?}");
    let classic: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(classic, Vec::<String>::new());
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(stats.contains("cmdstat_spublish:"), "{stats}");
    assert!(!stats.contains("cmdstat_publish:"), "{stats}");
}

/// A TCP relay to Redis that holds every byte `delay` in each direction: a Redis one
/// round trip of `2 × delay` away, as across availability zones.
struct SlowLink {
    port: u16,
    to: std::sync::Arc<std::sync::atomic::AtomicU16>,
    accept: tokio::task::JoinHandle<()>,
}

impl SlowLink {
    async fn start(delay: Duration) -> SlowLink {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let to = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(0));
        let target = to.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let port = target.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                    else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(delayed(cr, sw, delay), delayed(sr, cw, delay));
                });
            }
        });
        SlowLink { port, to, accept }
    }

    /// Points `config`'s Redis URL (the cluster's own Redis) through this link.
    fn route(&self, config: &mut parley::config::Config) {
        let redis_port: u16 = config
            .broker
            .redis_url
            .trim_end_matches('/')
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        self.to
            .store(redis_port, std::sync::atomic::Ordering::SeqCst);
        config.broker.redis_url = format!("redis://127.0.0.1:{}/", self.port);
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read (chunks overlap in
/// flight: a latency, not a rate limit).
async fn delayed(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            let _ = tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec()));
        }
    };
    let write = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_room_is_not_bound_by_one_redis_round_trip_per_message() {
    // Redis 50 ms away: one round trip per message would cap one room at 20 messages/s.
    const ONE_WAY: Duration = Duration::from_millis(25);
    const N: u64 = 200;
    let link = SlowLink::start(ONE_WAY).await;
    let cluster = Cluster::start_with("hot-room", 2, |c| link.route(c)).await;
    let mut ann = cluster.client(0, "ann").await;
    let mut bob = cluster.client(1, "bob").await;
    ann.join("hot").await;
    bob.join("hot").await;
    // Wait until bob's instance hears the room (its subscription went through the link).
    ann.send_msg("hot", "warm-up", "warm-up").await;
    assert_gap_free(&messages(&mut bob, 1).await, 1, 1);

    let gap_fills = |text: &str| metric(text, "parley_broker_gap_fills_total");
    let fills_before = gap_fills(&http_get(cluster.addr(1), "/metrics").await.1);
    let start = tokio::time::Instant::now();
    for k in 0..N {
        ann.send(Cmd::Send(proto::Send {
            room: "hot".into(),
            client_msg_id: format!("m{k}"),
            body: format!("m{k}"),
            ..Default::default()
        }))
        .await;
    }
    let got = messages(&mut bob, N as usize).await;
    let took = start.elapsed();
    assert_gap_free(&got, 2, N + 1);
    let serial = 2 * ONE_WAY * N as u32;
    eprintln!(
        "{N} messages of one room over a {:?} Redis round trip: {took:?} ({:.0}/s; one round trip each: {serial:?})",
        2 * ONE_WAY,
        N as f64 / took.as_secs_f64()
    );
    // Batched: a few round trips per burst, far from one per message.
    assert!(
        took < serial / 3,
        "{N} messages took {took:?}, one Redis round trip each would take {serial:?}"
    );
    // The batches kept the room's order on the wire: bob's instance never had to fill
    // a gap from the log.
    let fills_after = gap_fills(&http_get(cluster.addr(1), "/metrics").await.1);
    assert_eq!(fills_after, fills_before, "publishes arrived out of order");
    let (_, metrics) = http_get(cluster.addr(0), "/metrics").await;
    let publishes = metric(&metrics, "parley_broker_publishes_total");
    let batches = metric(&metrics, "parley_broker_publish_batches_total");
    assert!(
        publishes / batches > 2.0,
        "{publishes} publishes in {batches} batches"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_cluster_wide_and_a_dead_instance_takes_its_users_offline() {
    // A closed session counts as online for its grace period: keep that short here.
    let mut cluster = Cluster::start_with("presence", 3, |c| {
        c.session.grace_period = Duration::from_millis(300);
    })
    .await;
    let mut watcher = cluster.client(2, "watcher").await;
    watcher.join("team").await;
    assert!(!presence_of(&mut watcher, "dan").await.online);

    // dan has sessions on instances 0 and 1.
    let mut dan0 = cluster.client(0, "dan").await;
    dan0.join("team").await;
    let dan1 = cluster.client(1, "dan").await;
    assert!(presence_of(&mut watcher, "dan").await.online);

    // A signal reaches him from an instance where he has no session.
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
    let s = dan0.next_of(common_pushed_signal).await;
    assert_eq!(
        (s.from_user.as_str(), s.kind.as_str()),
        ("watcher", "offer")
    );

    // Closing one of his sessions leaves him online through the other.
    drop(dan0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(presence_of(&mut watcher, "dan").await.online);

    // Instance 1 dies: within presence_ttl + a heartbeat he is offline everywhere, and
    // his co-member hears it.
    cluster.instances[1].proc.kill();
    drop(dan1);
    let p = tokio::time::timeout(
        Duration::from_secs(8),
        watcher.next_of(|k| match k {
            Kind::Presence(p) if p.user == "dan" && !p.online => Some(p),
            _ => None,
        }),
    )
    .await
    .expect("an offline push within presence_ttl + heartbeat");
    assert!(p.last_seen > 0);
    let now = presence_of(&mut watcher, "dan").await;
    assert!(!now.online);
    assert!(now.last_seen > 0);
    // And signalling him is refused cluster-wide.
    match watcher
        .request(Cmd::Signal(proto::Signal {
            to_user: "dan".into(),
            kind: "offer".into(),
            payload: "sdp".into(),
        }))
        .await
    {
        Kind::Error(e) => assert_eq!(code_of(&e), ErrorCode::UserOffline),
        other => panic!("expected USER_OFFLINE, got {other:?}"),
    }
}

fn common_pushed_signal(k: Kind) -> Option<proto::SignalEvent> {
    match k {
        Kind::Signal(s) => Some(s),
        _ => None,
    }
}

fn bearer(cluster: &Cluster, user: &str) -> String {
    format!("Bearer {}", cluster.token(user))
}

/// `POST /session/{id}` at instance `i` with a JSON command; the reply.
async fn command(
    cluster: &Cluster,
    i: usize,
    user: &str,
    session: &str,
    cmd: serde_json::Value,
) -> (u16, serde_json::Value) {
    common::session_command(cluster.addr(i), &bearer(cluster, user), session, &cmd).await
}

/// The message seqs among `frames`, checking positions follow `last_pos` without a gap.
fn message_seqs(frames: &[proto::ServerFrame], last_pos: &mut u64, seqs: &mut Vec<u64>) {
    for f in frames {
        assert_eq!(f.pos, *last_pos + 1, "positions without gap or repeat");
        *last_pos = f.pos;
        if let Some(Kind::Message(m)) = &f.kind {
            seqs.push(m.seq);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_and_long_poll_sessions_hop_between_instances_without_loss_or_repeat() {
    let cluster = Cluster::start("no-sticky", 3).await;
    let mut ann = cluster.client(2, "ann").await;
    ann.join("r").await;

    // A long-poll session opened on instance 0, joined through instance 1.
    let auth = bearer(&cluster, "pat");
    let poll_session = common::open_http_session(cluster.addr(0), &auth).await;
    let (status, v) = command(
        &cluster,
        1,
        "pat",
        &poll_session,
        serde_json::json!({"id":"2","join":{"room":"r"}}),
    )
    .await;
    assert_eq!((status, v["joined"]["room"].as_str()), (200, Some("r")));

    // An SSE session: ticket minted on instance 1, stream opened on instance 0.
    let auth = bearer(&cluster, "sid");
    let r = common::http(
        cluster.addr(1),
        "POST",
        "/api/v1/tickets",
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let ticket = v["ticket"].as_str().unwrap().to_string();
    let path = format!("/sse?ticket={ticket}");
    let mut sse = common::SseClient::open(cluster.addr(0), &path, &[]).await;
    assert_eq!(sse.status, 200);
    let (_, first) = sse.next_frame().await;
    let Some(Kind::Connected(c)) = first.kind else {
        panic!("expected connected, got {first:?}")
    };
    let sse_session = c.session_id;
    let (status, _) = command(
        &cluster,
        2,
        "sid",
        &sse_session,
        serde_json::json!({"id":"2","join":{"room":"r"}}),
    )
    .await;
    assert_eq!(status, 200);

    let (mut poll_pos, mut poll_seqs, mut poll_cursor) = (0, Vec::new(), 0u64);
    let (mut sse_pos, mut sse_seqs) = (0, Vec::new());
    const ROUNDS: usize = 6;
    const PER_ROUND: usize = 4;
    for round in 0..ROUNDS {
        for k in 0..PER_ROUND {
            ann.send_msg("r", &format!("{round}-{k}"), "x").await;
        }
        let want = (round + 1) * PER_ROUND;
        // Long-poll: every GET on the next instance.
        let mut hop = round;
        while poll_seqs.len() < want {
            hop += 1;
            let i = hop % 3;
            let path = format!("/poll?session_id={poll_session}&cursor={poll_cursor}&wait=1");
            let auth = bearer(&cluster, "pat");
            let r = common::http(
                cluster.addr(i),
                "GET",
                &path,
                &[("authorization", &auth)],
                "",
            )
            .await;
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            let frames: Vec<proto::ServerFrame> = serde_json::from_slice(&r.body).unwrap();
            message_seqs(&frames, &mut poll_pos, &mut poll_seqs);
            poll_cursor = poll_pos;
        }
        // SSE: read this round's events, then reconnect elsewhere with Last-Event-ID.
        while sse_seqs.len() < want {
            let (id, frame) = sse.next_frame().await;
            if id.is_none() {
                continue;
            }
            message_seqs(&[frame], &mut sse_pos, &mut sse_seqs);
        }
        drop(sse);
        let i = (round + 1) % 3;
        let last = sse_pos.to_string();
        sse = common::SseClient::open(cluster.addr(i), &path, &[("last-event-id", &last)]).await;
        assert_eq!(sse.status, 200, "reconnect on instance {i}");
    }
    let all: Vec<u64> = (1..=(ROUNDS * PER_ROUND) as u64).collect();
    assert_eq!(poll_seqs, all, "long-poll: everything once, in order");
    assert_eq!(sse_seqs, all, "SSE: everything once, in order");
}

/// ann on instance 0 and bob on instance 1 in room "r"; ann sends `n` messages and bob
/// has seen seqs 1..=n.
async fn ann_sends_to_bob(cluster: &Cluster, n: u64) -> (Client, Client) {
    let mut ann = cluster.client(0, "ann").await;
    let mut bob = cluster.client(1, "bob").await;
    ann.join("r").await;
    bob.join("r").await;
    for k in 0..n {
        ann.send_msg("r", &format!("a{k}"), "x").await;
    }
    assert_gap_free(&messages(&mut bob, n as usize).await, 1, n);
    (ann, bob)
}

/// The seqs a `sync` of `room` after `after` returns.
async fn synced_seqs(c: &mut Client, room: &str, after: u64) -> Vec<u64> {
    let page = match c
        .request(Cmd::Sync(proto::Sync {
            rooms: [(room.to_string(), after)].into(),
            limit: 0,
        }))
        .await
    {
        Kind::Sync(s) => s.rooms.into_iter().next().unwrap(),
        other => panic!("expected sync, got {other:?}"),
    };
    page.messages.iter().map(|m| m.seq).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_instance_continue_elsewhere_with_everything_acked_once() {
    let mut cluster = Cluster::start("kill", 3).await;
    let (mut ann, bob) = ann_sends_to_bob(&cluster, 5).await;
    let (old_session, old_pos) = (bob.session_id.clone(), bob.last_pos);

    // bob's instance dies mid-chat; ann keeps sending (every send acked).
    cluster.instances[1].proc.kill();
    drop(bob);
    for k in 5..10 {
        ann.send_msg("r", &format!("a{k}"), "x").await;
    }

    // bob reconnects to another instance: his session died with its instance, so he
    // log-syncs from his last seq and gets exactly what he missed.
    let mut bob = common::Client::open(cluster.addr(2), Some(parley::codec::Encoding::Proto)).await;
    let connected = bob
        .connect_with(proto::Connect {
            token: cluster.token("bob"),
            session_id: old_session,
            last_pos: old_pos,
        })
        .await;
    assert!(!connected.resumed);
    let r = connected.rooms.iter().find(|r| r.room == "r").unwrap();
    assert_eq!(r.last_seq, 10);
    let seqs = synced_seqs(&mut bob, "r", 5).await;
    assert_eq!(seqs, (6..=10).collect::<Vec<_>>());
    // Live delivery continues on the new instance, without repeats.
    ann.send_msg("r", "a10", "x").await;
    assert_gap_free(&messages(&mut bob, 1).await, 11, 11);
    bob.nothing_pushed(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_tells_clients_to_reconnect_and_they_continue_elsewhere() {
    let mut cluster = Cluster::start("rolling", 3).await;
    let (mut ann, mut bob) = ann_sends_to_bob(&cluster, 3).await;

    // Instance 1 is stopped the polite way: bob is told to reconnect.
    let stopping = {
        let mut proc = std::mem::replace(&mut cluster.instances[1].proc, harness::Proc::none());
        std::thread::spawn(move || proc.terminate())
    };
    let d = bob.next_of(|k| match k {
        Kind::Disconnect(d) => Some(d),
        _ => None,
    });
    let d = tokio::time::timeout(WAIT, d)
        .await
        .expect("a disconnect frame");
    assert!(d.reconnect, "{d:?}");
    stopping.join().unwrap();
    for k in 3..6 {
        ann.send_msg("r", &format!("a{k}"), "x").await;
    }

    // He continues on instance 2 from his last seq.
    let mut bob = cluster.client(2, "bob").await;
    let seqs = synced_seqs(&mut bob, "r", 3).await;
    assert_eq!(seqs, [4, 5, 6]);
    ann.send_msg("r", "a6", "x").await;
    assert_gap_free(&messages(&mut bob, 1).await, 7, 7);
}

/// `GET /sse` at `addr` with `path` and `Last-Event-ID: last`: the refusal's status and
/// error code.
async fn sse_refusal(addr: std::net::SocketAddr, path: &str, last: &str) -> (u16, String) {
    let sse = common::SseClient::open(addr, path, &[("last-event-id", last)]).await;
    let status = sse.status;
    let body = sse.body_bytes().await;
    let v: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| panic!("error JSON, got {}", String::from_utf8_lossy(&body)));
    (status, v["code"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_reconnect_after_its_instance_restarted_gets_410_session_not_found() {
    let mut cluster = Cluster::start("sse-restart", 2).await;
    let auth = bearer(&cluster, "sid");
    let r = common::http(
        cluster.addr(0),
        "POST",
        "/api/v1/tickets",
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let ticket = v["ticket"].as_str().unwrap().to_string();
    let path = format!("/sse?ticket={ticket}");
    let mut sse = common::SseClient::open(cluster.addr(0), &path, &[]).await;
    assert_eq!(sse.status, 200);
    let (_, first) = sse.next_frame().await;
    assert!(matches!(first.kind, Some(Kind::Connected(_))), "{first:?}");

    // The instance holding the session restarts (a new instance id, nothing kept).
    drop(sse);
    cluster.restart_instance(0).await;
    // The browser's reconnect, wherever it lands, learns that the session is gone, as
    // PROTOCOL.md says: it opens a new session and syncs.
    for i in [0, 1] {
        assert_eq!(
            sse_refusal(cluster.addr(i), &path, "0").await,
            (410, "ERROR_CODE_SESSION_NOT_FOUND".to_string()),
            "reconnect on instance {i}"
        );
    }
    // A ticket nobody issued is still unknown (401), reconnect or not.
    let forged = format!(
        "{}0{}",
        &ticket[..ticket.len() - 41],
        &ticket[ticket.len() - 40..]
    );
    let forged = if forged == ticket {
        format!(
            "{}1{}",
            &ticket[..ticket.len() - 41],
            &ticket[ticket.len() - 40..]
        )
    } else {
        forged
    };
    assert_eq!(
        sse_refusal(cluster.addr(1), &format!("/sse?ticket={forged}"), "0").await,
        (401, "ERROR_CODE_UNAUTHORIZED".to_string())
    );
    // The used ticket opens nothing new either.
    let sse = common::SseClient::open(cluster.addr(1), &path, &[]).await;
    assert_eq!(sse.status, 401);
    // The client starts over and is served.
    let mut sid = cluster.client(1, "sid").await;
    sid.join("r").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_live_sessions_are_still_relayed_while_redis_is_down() {
    let mut cluster = Cluster::start("relay-outage", 2).await;
    // pat's long-poll session lives on instance 0; ann chats on instance 0 as well.
    let auth = bearer(&cluster, "pat");
    let session = common::open_http_session(cluster.addr(0), &auth).await;
    let mut ann = cluster.client(0, "ann").await;
    ann.join("r").await;
    // Instance 1 has seen instance 0's address by heartbeat (it never relayed yet).
    tokio::time::sleep(Duration::from_millis(800)).await;

    cluster.stop_redis();
    let deadline = tokio::time::Instant::now() + WAIT;
    while http_get(cluster.addr(1), "/readyz").await.0 != 503 {
        assert!(tokio::time::Instant::now() < deadline, "never noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Commands and polls for pat's session that land on instance 1 reach it.
    let (status, v) = command(
        &cluster,
        1,
        "pat",
        &session,
        serde_json::json!({"id":"2","join":{"room":"r"}}),
    )
    .await;
    assert_eq!(
        (status, v["joined"]["room"].as_str()),
        (200, Some("r")),
        "{v}"
    );
    ann.send_msg("r", "m1", "during the outage").await;
    let mut seqs = Vec::new();
    let (mut pos, mut cursor) = (0, 0);
    while seqs.is_empty() {
        let path = format!("/poll?session_id={session}&cursor={cursor}&wait=1");
        let r = common::http(
            cluster.addr(1),
            "GET",
            &path,
            &[("authorization", &auth)],
            "",
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let frames: Vec<proto::ServerFrame> = serde_json::from_slice(&r.body).unwrap();
        message_seqs(&frames, &mut pos, &mut seqs);
        cursor = pos;
    }
    assert_eq!(seqs, [1]);
    // A session nobody holds is still gone.
    let (status, _) = command(
        &cluster,
        1,
        "pat",
        "ffff.0000",
        serde_json::json!({"id":"3","ping":{}}),
    )
    .await;
    assert_eq!(status, 410);
}

/// A join right after a connect answers what changed on another instance between the
/// two (a message committed there, a leave there), as a join that reads the store does:
/// a connect's read of the rooms is reused by its joins only with the in-process broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_after_a_connect_sees_what_another_instance_changed_in_between() {
    let cluster = Cluster::start("joinseen", 2).await;
    let mut bob = cluster.client(1, "bob").await;
    bob.join("r").await;
    let mut ann = cluster.client(1, "ann").await;
    ann.join("r").await;
    let first = bob.send_msg("r", "b1", "one").await;

    // A message committed on instance 1 between a connect and a join on instance 0.
    let mut late = Client::open(cluster.addr(0), None).await;
    let c = late.connect(&cluster.token("ann")).await;
    let seen = c.rooms.iter().find(|r| r.room == "r").expect("r").last_seq;
    assert_eq!(seen, first.seq);
    let between = bob.send_msg("r", "b2", "two").await;
    assert_eq!(
        late.join("r").await.last_seq,
        between.seq,
        "the join's last seq includes the message committed after the connect"
    );
    loop {
        let m = late.next_message().await;
        if m.seq >= between.seq {
            assert_eq!(m.seq, between.seq, "delivered live");
            break;
        }
    }

    // A leave on instance 1 between a connect and a join on instance 0.
    let mut rejoin = Client::open(cluster.addr(0), None).await;
    rejoin.connect(&cluster.token("ann")).await;
    assert!(matches!(
        ann.request(Cmd::Leave(proto::Leave { room: "r".into() }))
            .await,
        Kind::Left(_)
    ));
    rejoin.join("r").await;
    let members = match bob
        .request(Cmd::Members(proto::Members { room: "r".into() }))
        .await
    {
        Kind::Members(m) => m.users,
        k => panic!("expected members, got {k:?}"),
    };
    assert!(
        members.contains(&"ann".to_string()),
        "the join after the leave made ann a member again: {members:?}"
    );
}
