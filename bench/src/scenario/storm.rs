//! `storm`: C workers each connect, authenticate and disconnect in a loop for D seconds.
//! Measures handshakes (connect + upgrade + auth) per second, their latency and errors,
//! and whether the server's fds and memory return to where they were.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{Report, Run, Sampler, run_id};
use crate::{
    probe::Usage,
    report::{Panel, Series, Table},
    stats::{self, Latency, Percentiles, Tick},
    transport::{Connection, Step},
    ui::{bytes, si},
};

#[derive(Debug, Clone, Serialize)]
pub struct Params {
    pub workers: usize,
    pub duration: Duration,
    /// Pause before the last reading after the storm.
    pub settle: Duration,
    /// Each handshake also joins a room (one per worker) before disconnecting.
    pub join: bool,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            workers: 64,
            duration: Duration::from_secs(10),
            settle: Duration::from_secs(2),
            join: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StormReport {
    pub scenario: &'static str,
    pub transport: &'static str,
    pub encoding: &'static str,
    pub params: Params,
    pub handshakes: u64,
    pub handshakes_per_s: f64,
    /// Time from TCP connect to the `connected` reply.
    pub handshake_latency: Percentiles,
    pub errors: u64,
    pub errors_by_step: Vec<(Step, u64)>,
    pub error_samples: Vec<String>,
    pub server_before: Option<Usage>,
    /// Right after the storm.
    pub server_after: Option<Usage>,
    /// After `settle`.
    pub server_settled: Option<Usage>,
    pub server_cpu: Option<f64>,
    pub client_cpu: f64,
    pub ticks: Vec<Tick>,
}

pub async fn run(run: &Run, params: &Params) -> anyhow::Result<StormReport> {
    anyhow::ensure!(params.workers > 0, "need at least one worker");
    let id = run_id();
    let server_before = run.server_usage();
    let handshakes = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new((
        HashMap::<Step, u64>::new(),
        Vec::<String>::new(),
    )));
    let latency = Arc::new(Latency::with_shards(run.counter_shards()));
    let start = Instant::now();
    let deadline = start + params.duration;
    let mut tasks = Vec::new();
    for w in 0..params.workers {
        let target = run.target.clone();
        let handshakes = handshakes.clone();
        let errors = errors.clone();
        let latency = latency.clone();
        let shard = run.shard_of(w);
        let user = format!("storm-{id}-{w}");
        let room = params.join.then(|| format!("storm-{id}-{w}"));
        tasks.push(run.spawn(w, async move {
            let token = match target.token(&user) {
                Ok(t) => t,
                Err(e) => {
                    errors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .1
                        .push(e.to_string());
                    return;
                }
            };
            let mut k = 0usize;
            while Instant::now() < deadline {
                let t = Instant::now();
                // Rotate source addresses (when spread) so TIME_WAIT does not pile up on
                // one of them.
                let index = w + k * 7919;
                k += 1;
                let opened =
                    match Connection::open_authenticated(&target, index, &user, &token).await {
                        Ok((mut conn, _)) => match &room {
                            Some(room) => match conn.join(room).await {
                                Ok(_) => Ok(conn),
                                Err(e) => Err(crate::transport::OpenError {
                                    step: crate::transport::Step::Join,
                                    source: e,
                                }),
                            },
                            None => Ok(conn),
                        },
                        Err(e) => Err(e),
                    };
                match opened {
                    Ok(conn) => {
                        latency.record(shard, t.elapsed().as_nanos() as u64);
                        handshakes.fetch_add(1, Ordering::Relaxed);
                        conn.close().await;
                    }
                    Err(e) => {
                        {
                            let mut g = errors.lock().unwrap_or_else(|p| p.into_inner());
                            *g.0.entry(e.step).or_default() += 1;
                            if g.1.len() < 5 {
                                g.1.push(e.to_string());
                            }
                        }
                        // Do not spin on a refusing server.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }

    let mut sampler = Sampler::new(run.server);
    let mut ticks = Vec::new();
    let mut total = stats::histogram();
    let mut interval = stats::histogram();
    let bar = run.ui.timer(params.duration.as_secs(), "storm");
    let mut every_second = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let mut tasks_done = Box::pin(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    loop {
        tokio::select! {
            _ = &mut tasks_done => break,
            _ = every_second.tick() => {
                interval.reset();
                latency.drain_into(&mut interval);
                let _ = total.add(&interval);
                let mut t = sampler.tick(handshakes.load(Ordering::Relaxed), 0);
                t.latency = Percentiles::of(&interval);
                bar.set_position(t.t_s as u64);
                bar.set_message(format!(
                    "{} handshakes/s  p99 {:.1} ms  server fds {}  cpu server {:.0}% gen {:.0}%",
                    si(t.sent_per_s),
                    t.latency.p99_ms,
                    t.server_fds.unwrap_or(0),
                    t.server_cpu.unwrap_or(0.0),
                    t.client_cpu
                ));
                ticks.push(t);
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    latency.drain_into(&mut total);
    let server_after = run.server_usage();
    tokio::time::sleep(params.settle).await;
    let server_settled = run.server_usage();
    let (server_cpu, client_cpu) = super::mean_cpu(&ticks);
    let n = handshakes.load(Ordering::Relaxed);
    let (by_step, samples) = {
        let g = errors.lock().unwrap_or_else(|p| p.into_inner());
        (g.0.clone(), g.1.clone())
    };
    let mut errors_by_step: Vec<_> = by_step.into_iter().collect();
    errors_by_step.sort_by_key(|(s, _)| format!("{s:?}"));
    Ok(StormReport {
        scenario: "storm",
        transport: run.target.transport.name(),
        encoding: run.target.encoding.subprotocol(),
        params: params.clone(),
        handshakes: n,
        handshakes_per_s: n as f64 / elapsed.max(1e-9),
        handshake_latency: Percentiles::of(&total),
        errors: errors_by_step.iter().map(|e| e.1).sum::<u64>(),
        errors_by_step,
        error_samples: samples,
        server_before,
        server_after,
        server_settled,
        server_cpu,
        client_cpu,
        ticks,
    })
}

impl Report for StormReport {
    fn title(&self) -> String {
        format!(
            "storm: {} workers, {:?}, {} ({})",
            self.params.workers, self.params.duration, self.transport, self.encoding
        )
    }

    fn table(&self) -> Table {
        let mut t = Table::new(self.title());
        t.row(
            if self.params.join {
                "handshakes (connect+upgrade+auth+join+close)"
            } else {
                "handshakes (connect+upgrade+auth+close)"
            },
            format!("{} ({}/s)", self.handshakes, si(self.handshakes_per_s)),
        );
        let l = &self.handshake_latency;
        t.row(
            "handshake latency p50/p99/max",
            format!("{:.2} / {:.2} / {:.2} ms", l.p50_ms, l.p99_ms, l.max_ms),
        );
        t.row(
            "errors",
            if self.errors == 0 {
                "0".to_string()
            } else {
                format!(
                    "{} {:?}: {}",
                    self.errors,
                    self.errors_by_step,
                    self.error_samples.first().cloned().unwrap_or_default()
                )
            },
        );
        let u = |u: &Option<Usage>| {
            u.as_ref().map_or("n/a".to_string(), |u| {
                format!("{} RSS, {} fds", bytes(u.rss as f64), u.fds)
            })
        };
        t.row("server before", u(&self.server_before));
        t.row("server right after", u(&self.server_after));
        t.row(
            format!("server after {:?}", self.params.settle),
            u(&self.server_settled),
        );
        if let Some(c) = self.server_cpu {
            t.row("server CPU (mean)", format!("{c:.0}% of a core"));
        }
        t.row(
            "generator CPU (mean)",
            format!("{:.0}% of a core", self.client_cpu),
        );
        t
    }

    fn panels(&self) -> Vec<Panel> {
        let ts = |f: &dyn Fn(&Tick) -> f64| -> Vec<(f64, f64)> {
            self.ticks.iter().map(|t| (t.t_s, f(t))).collect()
        };
        vec![
            Panel::new("Handshakes per second", "seconds", "handshakes/s")
                .with(Series::new("handshakes/s", ts(&|t| t.sent_per_s))),
            Panel::new("Handshake latency", "seconds", "ms (log)")
                .log_y()
                .with(Series::new("p50", ts(&|t| t.latency.p50_ms)))
                .with(Series::new("p99", ts(&|t| t.latency.p99_ms))),
            Panel::new("Server memory and fds", "seconds", "MiB / fds")
                .with(Series::new(
                    "RSS MiB",
                    ts(&|t| t.server_rss.unwrap_or(0) as f64 / 1048576.0),
                ))
                .with(Series::new(
                    "fds",
                    ts(&|t| t.server_fds.unwrap_or(0) as f64),
                )),
        ]
    }

    fn ok(&self) -> bool {
        self.errors == 0
    }

    fn headline(&self) -> Vec<(&'static str, f64)> {
        let fd_delta = match (&self.server_before, &self.server_settled) {
            (Some(b), Some(a)) => a.fds as f64 - b.fds as f64,
            _ => f64::NAN,
        };
        vec![
            ("handshakes/s", self.handshakes_per_s),
            ("handshake p50 ms", self.handshake_latency.p50_ms),
            ("handshake p99 ms", self.handshake_latency.p99_ms),
            ("errors", self.errors as f64),
            ("server fds delta after settle", fd_delta),
            ("server CPU %", self.server_cpu.unwrap_or(f64::NAN)),
        ]
    }
}
