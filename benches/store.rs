//! Durable append throughput and latency of the stores with group commit.
//!
//! `cargo bench --bench store` — for each `synchronous` mode and number of concurrent
//! senders, appends to a fresh database file for a fixed time and prints appends/s and
//! per-append latency percentiles (from submit to durable commit). Senders spread over
//! 16 rooms ("rooms") or all write one room ("one room"), each awaiting its append before
//! sending the next, like a chat client waiting for its ack.
//!
//! With `PARLEY_BENCH_PG_URL` (a PostgreSQL URL whose user may CREATE DATABASE, e.g. from
//! `scripts/postgres start DIR`), the same runs on the PostgreSQL store in a fresh
//! database each, in the same sitting, plus runs where the senders are spread over
//! several store instances (separate pools, as separate parley processes would have)
//! that all append to one room.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use parley::{
    config::{StoreBackend, StoreConfig, Synchronous},
    store::{NewMessage, Store, postgres::PostgresStore, sqlite::SqliteStore},
};

// The binary's allocator (jemalloc by default), so that counts here match the server's.
parley::build_allocator!();

const RUN: Duration = Duration::from_secs(3);

#[derive(Clone, Copy)]
enum Backend {
    Sqlite(Synchronous),
    /// PostgreSQL with this many store instances.
    Postgres(usize),
}

/// Runs `sql` on the server `admin` names.
async fn admin(admin: &str, sql: &str) {
    let (client, conn) = tokio_postgres::connect(admin, tokio_postgres::NoTls)
        .await
        .expect("PARLEY_BENCH_PG_URL answers");
    tokio::spawn(conn);
    client.batch_execute(sql).await.unwrap();
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("a postgres://host/db URL");
    format!("{base}/{db}")
}

async fn run(backend: Backend, senders: usize, rooms: usize) -> (f64, Vec<Duration>) {
    let dir = std::env::temp_dir().join(format!("parley-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pg_url = std::env::var("PARLEY_BENCH_PG_URL").unwrap_or_default();
    let db = format!("parley_bench_{}", std::process::id());
    let stores: Vec<Arc<dyn Store>> = match backend {
        Backend::Sqlite(sync) => {
            let config = StoreConfig {
                path: dir.join("bench.db").to_str().unwrap().into(),
                synchronous: sync,
                ..Default::default()
            };
            vec![Arc::new(SqliteStore::open(&config).unwrap())]
        }
        Backend::Postgres(instances) => {
            admin(&pg_url, &format!("CREATE DATABASE {db}")).await;
            let config = StoreConfig {
                backend: StoreBackend::Postgres,
                postgres_url: with_database(&pg_url, &db),
                ..Default::default()
            };
            let mut v: Vec<Arc<dyn Store>> = Vec::new();
            for _ in 0..instances {
                v.push(Arc::new(PostgresStore::open(&config).await.unwrap()));
            }
            v
        }
    };
    let store = stores[0].clone();
    for r in 0..rooms {
        store.join(&format!("room{r}"), "sender", 0).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..senders {
        let (store, stop) = (stores[s % stores.len()].clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                store
                    .append(NewMessage {
                        room: format!("room{}", s % rooms),
                        sender: format!("s{s}"),
                        client_msg_id: i.to_string(),
                        body: "x".repeat(100),
                        metadata: Default::default(),
                        ts: 0,
                        attachments: Vec::new(),
                    })
                    .await
                    .unwrap();
                latencies.push(t.elapsed());
                i += 1;
            }
            latencies
        }));
    }
    tokio::time::sleep(RUN).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    drop(store);
    drop(stores);
    let _ = std::fs::remove_dir_all(&dir);
    if let Backend::Postgres(_) = backend {
        admin(&pg_url, &format!("DROP DATABASE {db} WITH (FORCE)")).await;
    }
    all.sort();
    (all.len() as f64 / elapsed, all)
}

fn pct(v: &[Duration], p: f64) -> String {
    let d = v[((v.len() - 1) as f64 * p) as usize];
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn main() {
    // `cargo test --benches` runs bench targets with no `--bench` flag: skip the long runs.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut backends = vec![
        Backend::Sqlite(Synchronous::Full),
        Backend::Sqlite(Synchronous::Normal),
    ];
    if std::env::var("PARLEY_BENCH_PG_URL").is_ok() {
        backends.extend([Backend::Postgres(1), Backend::Postgres(3)]);
    } else {
        eprintln!("(set PARLEY_BENCH_PG_URL to measure the PostgreSQL store too)");
    }
    println!("| store | instances | senders | rooms | appends/s | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|---|---|");
    for backend in backends {
        let (name, instances, runs): (String, usize, &[(usize, usize)]) = match backend {
            Backend::Sqlite(sync) => (
                format!("sqlite {}", sync.as_str().to_lowercase()),
                1,
                &[(1, 1), (16, 16), (64, 16), (256, 16), (64, 1), (256, 1)],
            ),
            Backend::Postgres(1) => (
                "postgres".into(),
                1,
                &[(1, 1), (16, 16), (64, 16), (256, 16), (64, 1), (256, 1)],
            ),
            Backend::Postgres(n) => ("postgres".into(), n, &[(64, 1), (256, 1)]),
        };
        for &(senders, rooms) in runs {
            let (rate, lat) = rt.block_on(run(backend, senders, rooms));
            println!(
                "| {name} | {instances} | {senders} | {rooms} | {rate:.0} | {} | {} | {} |",
                pct(&lat, 0.5),
                pct(&lat, 0.99),
                pct(&lat, 1.0),
            );
        }
    }
}
