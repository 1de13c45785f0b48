//! Durable append throughput and latency of the SQLite store with group commit.
//!
//! `cargo bench --bench store` — for each `synchronous` mode and number of concurrent
//! senders, appends to a fresh database file for a fixed time and prints appends/s and
//! per-append latency percentiles (from submit to durable commit). Senders spread over
//! 16 rooms ("rooms") or all write one room ("one room"), each awaiting its append before
//! sending the next, like a chat client waiting for its ack.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use parley::{
    config::{StoreConfig, Synchronous},
    store::{NewMessage, Store, sqlite::SqliteStore},
};

const RUN: Duration = Duration::from_secs(3);

async fn run(sync: Synchronous, senders: usize, rooms: usize) -> (f64, Vec<Duration>) {
    let dir = std::env::temp_dir().join(format!("parley-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = StoreConfig {
        path: dir.join("bench.db").to_str().unwrap().into(),
        synchronous: sync,
        ..Default::default()
    };
    let store = Arc::new(SqliteStore::open(&config).unwrap());
    for r in 0..rooms {
        store.join(&format!("room{r}"), "sender").await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..senders {
        let (store, stop) = (store.clone(), stop.clone());
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
    let _ = std::fs::remove_dir_all(&dir);
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
    println!("| synchronous | senders | rooms | appends/s | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|---|");
    for sync in [Synchronous::Full, Synchronous::Normal] {
        for (senders, rooms) in [(1, 1), (16, 16), (64, 16), (256, 16), (64, 1)] {
            let (rate, lat) = rt.block_on(run(sync, senders, rooms));
            println!(
                "| {} | {senders} | {rooms} | {rate:.0} | {} | {} | {} |",
                sync.as_str().to_lowercase(),
                pct(&lat, 0.5),
                pct(&lat, 0.99),
                pct(&lat, 1.0),
            );
        }
    }
}
