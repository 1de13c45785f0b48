//! The PostgreSQL store against a real PostgreSQL (`PARLEY_TEST_PG_URL`; `scripts/test`
//! starts a private cluster): several store instances — separate pools, as separate
//! parley processes would have — appending to one room get one gap-free order, a resend
//! through another instance returns the original, migrations apply to an empty database
//! and are idempotent, and `/readyz` reports a lost PostgreSQL. The contract every
//! backend keeps (history, rooms, read markers, files, …) is `tests/store_contract.rs`,
//! which runs on PostgreSQL too.

mod common;

use std::{sync::Arc, time::Duration};

use common::{pg::TestDb, store_message as msg, *};
use parley::{
    config::{StoreBackend, StoreConfig},
    store::{
        NewRoom, Range, RoomMeta, Store, StoreError,
        postgres::{self, PostgresStore},
    },
};

fn config(db: &TestDb) -> StoreConfig {
    StoreConfig {
        backend: StoreBackend::Postgres,
        postgres_url: db.url.clone(),
        postgres_pool_size: 4,
        postgres_writers: 2,
        ..Default::default()
    }
}

async fn open(db: &TestDb) -> Arc<PostgresStore> {
    Arc::new(PostgresStore::open(&config(db)).await.expect("store opens"))
}

async fn all(store: &PostgresStore, room: &str) -> Vec<Arc<parley::proto::Message>> {
    let mut out = Vec::new();
    loop {
        let after = out
            .last()
            .map_or(0, |m: &Arc<parley::proto::Message>| m.seq);
        let page = store.history(room, Range::After(after), 100).await.unwrap();
        out.extend(page.messages);
        if !page.more {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_from_several_instances_form_one_gap_free_order() {
    let db = TestDb::create().await;
    let instances = [open(&db).await, open(&db).await, open(&db).await];
    instances[0].join("r", "u0", 0).await.unwrap();
    const EACH: usize = 200;
    let mut tasks = Vec::new();
    for (n, store) in instances.iter().enumerate() {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            // Called one after another, resolved together: one instance's seqs follow
            // its call order (the Store::append contract), batched into few commits.
            let futures: Vec<_> = (0..EACH)
                .map(|i| store.append(msg("r", &format!("u{n}"), &format!("{n}-{i}"))))
                .collect();
            let results = futures_util::future::join_all(futures).await;
            results
                .into_iter()
                .map(|r| {
                    let a = r.unwrap();
                    assert!(!a.duplicate);
                    (a.message.seq, a.message.client_msg_id.clone())
                })
                .collect::<Vec<_>>()
        }));
    }
    // Meanwhile one of the senders leaves and rejoins through another instance: the
    // membership change and the append batches touch the same rows (room counter, the
    // sender's read marker) and must neither deadlock nor fail.
    let churn = {
        let store = instances[1].clone();
        tokio::spawn(async move {
            for _ in 0..30 {
                store.join("r", "u1", 0).await.unwrap();
                store.leave("r", "u1").await.unwrap();
            }
        })
    };
    churn.await.unwrap();
    let mut acked = Vec::new();
    for t in tasks {
        let mine = t.await.unwrap();
        assert!(
            mine.windows(2).all(|w| w[0].0 < w[1].0),
            "one instance's appends get increasing seqs in call order"
        );
        acked.extend(mine);
    }
    acked.sort();
    let seqs: Vec<u64> = acked.iter().map(|a| a.0).collect();
    assert_eq!(
        seqs,
        (1..=3 * EACH as u64).collect::<Vec<_>>(),
        "every seq once, no gap"
    );
    // The log agrees with the acks, and every instance reads the same log.
    for store in &instances {
        let log = all(store, "r").await;
        let got: Vec<(u64, String)> = log
            .iter()
            .map(|m| (m.seq, m.client_msg_id.clone()))
            .collect();
        assert_eq!(got, acked);
        assert_eq!(store.room("r").await.unwrap().unwrap().last_seq, 600);
    }
    // The senders' read markers moved to their last message.
    let rooms = instances[2].rooms_of("u0").await.unwrap();
    assert_eq!(rooms[0].last_seq, 600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_through_another_instance_returns_the_original() {
    let db = TestDb::create().await;
    let (a, b) = (open(&db).await, open(&db).await);
    a.join("r", "u", 0).await.unwrap();
    // The same 100 ids sent through both instances at once (a client that retried on
    // another instance while its first attempt was still in flight).
    let ids: Vec<String> = (0..100).map(|i| format!("id-{i}")).collect();
    let fa: Vec<_> = ids.iter().map(|id| a.append(msg("r", "u", id))).collect();
    let fb: Vec<_> = ids.iter().map(|id| b.append(msg("r", "u", id))).collect();
    let (ra, rb) = tokio::join!(
        futures_util::future::join_all(fa),
        futures_util::future::join_all(fb)
    );
    for (x, y) in ra.into_iter().zip(rb) {
        let (x, y) = (x.unwrap(), y.unwrap());
        assert_eq!(x.message.seq, y.message.seq, "one message per id");
        assert_eq!(x.message.body, y.message.body);
        assert_eq!(
            y.message.metadata.get("k"),
            Some(&x.message.client_msg_id),
            "the duplicate carries the original's metadata"
        );
        assert!(
            x.duplicate != y.duplicate,
            "exactly one of the two wrote it"
        );
    }
    assert_eq!(a.room("r").await.unwrap().unwrap().last_seq, 100);
    assert_eq!(all(&b, "r").await.len(), 100);
    // Later, through either instance: still the original.
    let again = b.append(msg("r", "u", "id-7")).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.message.client_msg_id, "id-7");
    // The same id from another sender is another message.
    a.join("r", "v", 0).await.unwrap();
    let other = b.append(msg("r", "v", "id-7")).await.unwrap();
    assert!(!other.duplicate);
    assert_eq!(other.message.seq, 101);
}

#[tokio::test]
async fn a_message_postgresql_refuses_fails_alone_and_leaves_no_gap() {
    let db = TestDb::create().await;
    let s = open(&db).await;
    s.join("r", "u", 0).await.unwrap();
    // PostgreSQL text cannot hold NUL: that append fails, the others queued with it
    // (one batch) still commit, in call order, without a gap.
    let futures: Vec<_> = (0..10)
        .map(|i| {
            let mut m = msg("r", "u", &i.to_string());
            if i == 4 {
                m.body = "nul \0 byte".into();
            }
            s.append(m)
        })
        .collect();
    let results = futures_util::future::join_all(futures).await;
    let seqs: Vec<Option<u64>> = results
        .iter()
        .map(|r| r.as_ref().ok().map(|a| a.message.seq))
        .collect();
    assert_eq!(
        seqs,
        [1, 2, 3, 4]
            .map(Some)
            .into_iter()
            .chain([None])
            .chain([5, 6, 7, 8, 9].map(Some))
            .collect::<Vec<_>>()
    );
    assert!(matches!(&results[4], Err(StoreError::Backend(_))));
    assert_eq!(all(&s, "r").await.len(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_to_an_empty_database_and_are_idempotent() {
    let db = TestDb::create().await;
    // Three instances starting together on an empty database: one migrates, the others
    // wait for it and find nothing to do.
    let c = config(&db);
    let (x, y, z) = tokio::join!(
        PostgresStore::open(&c),
        PostgresStore::open(&c),
        PostgresStore::open(&c),
    );
    let (x, _y, _z) = (x.unwrap(), y.unwrap(), z.unwrap());
    assert_eq!(
        x.schema_version().await.unwrap(),
        postgres::schema_version()
    );
    assert!(x.create_room(NewRoom::private("r", "u"), 0).await.unwrap());
    x.append(msg("r", "u", "a")).await.unwrap();
    drop(x);
    // Reopening keeps data and schema.
    let s = open(&db).await;
    assert_eq!(
        s.schema_version().await.unwrap(),
        postgres::schema_version()
    );
    assert_eq!(
        s.room("r").await.unwrap(),
        Some(RoomMeta {
            private: true,
            last_seq: 1,
            members: 1
        })
    );
    // A database migrated by a newer parley is refused, with a reason.
    let (admin, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .execute(
            "INSERT INTO parley_schema_version (version) VALUES (9999)",
            &[],
        )
        .await
        .unwrap();
    let err = PostgresStore::open(&config(&db)).await.err().unwrap();
    assert!(err.to_string().contains("newer"), "{err}");
}

/// A TCP relay between parley and PostgreSQL that the test can cut and restore.
struct Relay {
    port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
    upstream: String,
}

impl Relay {
    async fn start(upstream: String) -> Self {
        let mut r = Relay {
            port: 0,
            task: None,
            upstream,
        };
        r.up().await;
        r
    }

    /// Listens (again, on the same port) and relays every connection.
    async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        self.port = listener.local_addr().unwrap().port();
        let upstream = self.upstream.clone();
        self.task = Some(tokio::spawn(async move {
            let mut relays = tokio::task::JoinSet::new();
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    return;
                };
                let upstream = upstream.clone();
                relays.spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        }));
    }

    /// Stops listening and cuts every relayed connection (the JoinSet aborts them).
    async fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_a_lost_postgresql_and_recovers() {
    let db = TestDb::create().await;
    let pg: tokio_postgres::Config = db.url.parse().unwrap();
    let host = match &pg.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        other => panic!("PARLEY_TEST_PG_URL must name a TCP host, not {other:?}"),
    };
    let mut relay = Relay::start(format!("{host}:{}", pg.get_ports()[0])).await;
    let relayed = db.url.replace(
        &format!("{host}:{}", pg.get_ports()[0]),
        &format!("127.0.0.1:{}", relay.port),
    );
    let t = TestServer::start_with(|c| {
        db.apply(c);
        c.store.postgres_url = relayed;
    })
    .await;
    let ready = || async { http(t.addr(), "GET", "/readyz", &[], "").await };
    assert_eq!(ready().await.status, 200);
    let mut c = Client::open(t.addr(), None).await;
    c.connect(&t.token("ann")).await;
    c.join("r").await;
    assert_eq!(c.send_msg("r", "before", "before").await.seq, 1);

    relay.down().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = ready().await;
        if r.status == 503 {
            assert!(
                String::from_utf8_lossy(&r.body).contains("PostgreSQL"),
                "the reason names the store"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "readyz stays 200");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    relay.up().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ready().await.status != 200 {
        assert!(tokio::time::Instant::now() < deadline, "readyz recovers");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The pool reconnected: sending works again and continues the room's order.
    let mut c = Client::open(t.addr(), None).await;
    c.connect(&t.token("ann")).await;
    assert_eq!(c.send_msg("r", "after", "after").await.seq, 2);
    t.server.shutdown();
    relay.down().await;
}

#[tokio::test]
async fn a_server_whose_postgresql_is_unreachable_does_not_start_and_says_why() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = test_config();
    config.store.backend = StoreBackend::Postgres;
    config.store.postgres_url = format!("postgres://parley:hunter2@127.0.0.1:{port}/parley");
    let err = parley::server::Server::start(config)
        .await
        .err()
        .expect("no server without its store")
        .to_string();
    assert!(
        err.contains("connecting to PostgreSQL") && err.contains("refused"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "no password in the error: {err}");
}

/// Issue 20, item 7: `limits.max_rooms_per_user` holds across instances: 12 joins of one
/// user at once, through three stores on one database (three instances), with a cap of
/// 5 leave the user in exactly 5 rooms; the refused ones say so. Direct-message rooms and
/// room creation count against the same cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_cap_holds_across_instances() {
    let db = TestDb::create().await;
    let instances = [open(&db).await, open(&db).await, open(&db).await];
    let joins = (0..12).map(|i| {
        let store = instances[i % 3].clone();
        async move { store.join(&format!("r{i}"), "u", 5).await }
    });
    let results = futures_util::future::join_all(joins).await;
    let joined = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(joined, 5, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert!(
                matches!(e, StoreError::TooManyRooms { max: 5, .. }),
                "{e:?}"
            );
        }
    }
    let s = &instances[0];
    assert_eq!(s.rooms_of("u").await.unwrap().len(), 5);
    // A room the user is in may be joined again; a new one, a new DM or a creation not.
    let mine = s.rooms_of("u").await.unwrap()[0].room.clone();
    s.join(&mine, "u", 5).await.unwrap();
    assert!(s.join("new", "u", 5).await.is_err());
    assert!(s.ensure_dm("dm:u:v", "u", "v", 5).await.is_err());
    assert!(
        s.room("dm:u:v").await.unwrap().is_none(),
        "nothing half-made"
    );
    assert!(
        s.create_room(NewRoom::public("mine", "u"), 5)
            .await
            .is_err()
    );
    // Another user is not affected.
    s.ensure_dm("dm:v:w", "v", "w", 5).await.unwrap();
}
