//! `idle`: N authenticated connections (connect with a token; no rooms, or each joined to
//! one room with `join`) held open while the server's heartbeats are answered. Measures
//! the server's memory per connection (RSS delta / N) and the connect + auth (+ join)
//! rate.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::{Report, Run, Sampler, run_id};
use crate::{
    probe::{Probe, Usage},
    report::{Panel, Series, Table},
    stats::Tick,
    target::TransportKind,
    transport::{Connection, Step},
    ui::{bytes, si},
    wire::{self, Incoming},
};
use parley::proto::{self, client_frame::Cmd};

#[derive(Debug, Clone, Serialize)]
pub struct Params {
    pub connections: usize,
    /// How long to hold the connections once all are open.
    pub hold: Duration,
    /// Pause before each memory reading, so the server settles.
    pub settle: Duration,
    /// Each connection joins this room once authenticated (a run id is appended, so a
    /// run starts with an empty room).
    pub join: Option<String>,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            connections: 1000,
            hold: Duration::from_secs(10),
            settle: Duration::from_secs(2),
            join: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub scenario: &'static str,
    pub transport: &'static str,
    pub encoding: &'static str,
    pub params: Params,
    pub connected: u64,
    pub failed: u64,
    pub failures_by_step: Vec<(Step, u64)>,
    pub failure_samples: Vec<String>,
    /// Seconds to open and authenticate every connection.
    pub connect_s: f64,
    pub connects_per_s: f64,
    /// Connections the server closed while they were held.
    pub dropped: u64,
    pub server_before: Option<Usage>,
    /// With every connection open, after `settle`.
    pub server_connected: Option<Usage>,
    /// At the end of the hold.
    pub server_end: Option<Usage>,
    /// After the connections were closed, after `settle` (sessions may still be in their
    /// grace period).
    pub server_closed: Option<Usage>,
    /// (server_connected.rss - server_before.rss) / connected.
    pub server_bytes_per_connection: Option<f64>,
    /// Same at the end of the hold.
    pub server_bytes_per_connection_end: Option<f64>,
    /// The generator's own RSS delta per connection.
    pub client_bytes_per_connection: f64,
    /// (connections open, server RSS) while connecting.
    pub rss_curve: Vec<(u64, u64)>,
    pub ticks: Vec<Tick>,
}

pub async fn run(run: &Run, params: &Params) -> anyhow::Result<IdleReport> {
    anyhow::ensure!(params.connections > 0, "need at least one connection");
    let n = params.connections;
    let id = run_id();
    tokio::time::sleep(params.settle).await;
    let server_before = run.server_usage();
    let me = Probe::me();
    let client_before = me.usage().map(|u| u.rss).unwrap_or(0);

    let permits = Arc::new(Semaphore::new(run.connect_concurrency.max(1)));
    let stop = CancellationToken::new();
    let dropped = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let target = run.target.clone();
        let permits = permits.clone();
        let stop = stop.clone();
        let ready = ready_tx.clone();
        let dropped = dropped.clone();
        let user = format!("idle-{id}-{i}");
        let room = params.join.as_ref().map(|r| format!("{r}-{id}"));
        tasks.push(run.spawn(i, async move {
            let opened = async {
                let _permit = permits
                    .acquire()
                    .await
                    .map_err(|e| (Step::Tcp, e.to_string()))?;
                let token = target
                    .token(&user)
                    .map_err(|e| (Step::Auth, e.to_string()))?;
                let (mut conn, connected) =
                    Connection::open_authenticated(&target, i, &user, &token)
                        .await
                        .map_err(|e| (e.step, e.to_string()))?;
                if let Some(room) = &room {
                    conn.join(room)
                        .await
                        .map_err(|e| (Step::Join, format!("{e:#}")))?;
                }
                Ok((conn, connected))
            };
            let opened = tokio::select! {
                r = opened => r,
                _ = stop.cancelled() => return,
            };
            let mut conn = match opened {
                Ok((c, _)) => {
                    let _ = ready.send(Ok(()));
                    c
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            drop(ready);
            // Hold: keep reading so heartbeats are answered, and acknowledge pushes (the
            // `joined` notices of later members) as the SDK does (web/src/parley.ts,
            // `#scheduleAck`), so the server may drop them from its replay buffer: the
            // latest position, once per `ack_delay` after a push (SSE 5 s, as each ack is
            // a POST there; 1 s otherwise; long-poll's cursor acknowledges by itself).
            // One ack per push made an SSE client fall behind by thousands of POSTs in a
            // big room, and its server hold the unacknowledged pushes meanwhile.
            let encoding = conn.encoding();
            let ack_delay = match target.transport {
                TransportKind::Sse => Duration::from_secs(5),
                _ => Duration::from_secs(1),
            };
            let (mut last_pos, mut acked_pos) = (0u64, 0u64);
            let ack_timer = tokio::time::sleep(Duration::ZERO);
            tokio::pin!(ack_timer);
            let mut ack_armed = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = &mut ack_timer, if ack_armed => {
                        ack_armed = false;
                        if last_pos > acked_pos {
                            acked_pos = last_pos;
                            let _ = conn.send(Cmd::Ack(proto::Ack { pos: last_pos })).await;
                        }
                    }
                    r = conn.recv() => match r {
                        Ok(Incoming::Frame(bytes)) => {
                            let pos = wire::decode(encoding, &bytes).map_or(0, |f| f.pos);
                            last_pos = last_pos.max(pos);
                            if pos > 0 && !ack_armed {
                                ack_armed = true;
                                ack_timer
                                    .as_mut()
                                    .reset(tokio::time::Instant::now() + ack_delay);
                            }
                        }
                        Ok(Incoming::Closed(_)) | Err(_) => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    },
                }
            }
            conn.close().await;
        }));
    }
    drop(ready_tx);

    let bar = run.ui.counter(n as u64, "connecting");
    let mut connected = 0u64;
    let mut failed = 0u64;
    let mut by_step = std::collections::HashMap::<Step, u64>::new();
    let mut samples = Vec::new();
    let mut rss_curve = Vec::new();
    if let Some(u) = &server_before {
        rss_curve.push((0, u.rss));
    }
    let mut sample_every = tokio::time::interval(Duration::from_millis(250));
    while connected + failed < n as u64 {
        tokio::select! {
            r = ready_rx.recv() => match r {
                Some(Ok(())) => { connected += 1; bar.inc(1); }
                Some(Err((step, e))) => {
                    failed += 1;
                    *by_step.entry(step).or_default() += 1;
                    if samples.len() < 5 { samples.push(e); }
                    bar.inc(1);
                }
                None => break,
            },
            _ = sample_every.tick() => {
                if let Some(u) = run.server_usage() {
                    rss_curve.push((connected, u.rss));
                }
            }
        }
    }
    let connect_s = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    tokio::time::sleep(params.settle).await;
    let server_connected = run.server_usage();
    if let Some(u) = &server_connected {
        rss_curve.push((connected, u.rss));
    }
    let client_connected = me.usage().map(|u| u.rss).unwrap_or(0);

    // Hold.
    let mut sampler = Sampler::new(run.server);
    let mut ticks = Vec::new();
    let bar = run.ui.timer(params.hold.as_secs(), "holding");
    let hold_until = tokio::time::Instant::now() + params.hold;
    let mut every_second = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(hold_until) => break,
            _ = every_second.tick() => {
                let t = sampler.tick(0, 0);
                bar.set_position(t.t_s as u64);
                bar.set_message(format!(
                    "{} open, server RSS {}, cpu server {:.0}% gen {:.0}%",
                    connected - dropped.load(Ordering::Relaxed),
                    bytes(t.server_rss.unwrap_or(0) as f64),
                    t.server_cpu.unwrap_or(0.0),
                    t.client_cpu
                ));
                ticks.push(t);
            }
        }
    }
    bar.finish_and_clear();
    let server_end = run.server_usage();

    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    tokio::time::sleep(params.settle).await;
    let server_closed = run.server_usage();

    let per_conn = |u: &Option<Usage>| match (&server_before, u) {
        (Some(b), Some(a)) if connected > 0 => {
            Some((a.rss as f64 - b.rss as f64) / connected as f64)
        }
        _ => None,
    };
    let mut failures_by_step: Vec<_> = by_step.into_iter().collect();
    failures_by_step.sort_by_key(|(s, _)| format!("{s:?}"));
    Ok(IdleReport {
        scenario: "idle",
        transport: run.target.transport.name(),
        encoding: run.target.encoding.subprotocol(),
        params: params.clone(),
        connected,
        failed,
        failures_by_step,
        failure_samples: samples,
        connect_s,
        connects_per_s: connected as f64 / connect_s.max(1e-9),
        dropped: dropped.load(Ordering::Relaxed),
        server_bytes_per_connection: per_conn(&server_connected),
        server_bytes_per_connection_end: per_conn(&server_end),
        server_before,
        server_connected,
        server_end,
        server_closed,
        client_bytes_per_connection: (client_connected as f64 - client_before as f64)
            / connected.max(1) as f64,
        rss_curve,
        ticks,
    })
}

impl Report for IdleReport {
    fn title(&self) -> String {
        format!(
            "idle: {} connections, {} ({})",
            self.params.connections, self.transport, self.encoding
        )
    }

    fn table(&self) -> Table {
        let mut t = Table::new(self.title());
        t.row(
            "connected",
            format!("{} ({} failed)", self.connected, self.failed),
        );
        t.row(
            "connect+auth",
            format!("{:.2} s ({}/s)", self.connect_s, si(self.connects_per_s)),
        );
        let mib = |u: &Option<Usage>| {
            u.as_ref().map_or("n/a".to_string(), |u| {
                format!("{} ({} fds)", bytes(u.rss as f64), u.fds)
            })
        };
        t.row("server RSS before", mib(&self.server_before));
        t.row("server RSS connected", mib(&self.server_connected));
        t.row("server RSS end of hold", mib(&self.server_end));
        t.row("server RSS after close", mib(&self.server_closed));
        t.row(
            "server bytes/connection",
            self.server_bytes_per_connection
                .map_or("n/a (no --server-pid)".into(), bytes),
        );
        t.row(
            "  ... at end of hold",
            self.server_bytes_per_connection_end
                .map_or("n/a".into(), bytes),
        );
        t.row(
            "generator bytes/connection",
            bytes(self.client_bytes_per_connection),
        );
        t.row("dropped while held", self.dropped.to_string());
        if !self.failure_samples.is_empty() {
            t.row(
                "failures",
                format!("{:?}: {}", self.failures_by_step, self.failure_samples[0]),
            );
        }
        t
    }

    fn panels(&self) -> Vec<Panel> {
        vec![
            Panel::new("Server RSS while connecting", "connections", "MiB").with(Series::new(
                "server RSS",
                self.rss_curve
                    .iter()
                    .map(|&(c, r)| (c as f64, r as f64 / 1048576.0))
                    .collect(),
            )),
        ]
    }

    fn ok(&self) -> bool {
        self.failed == 0 && self.dropped == 0
    }

    fn headline(&self) -> Vec<(&'static str, f64)> {
        vec![
            (
                "server bytes/connection",
                self.server_bytes_per_connection.unwrap_or(f64::NAN),
            ),
            (
                "server bytes/connection (end of hold)",
                self.server_bytes_per_connection_end.unwrap_or(f64::NAN),
            ),
            ("connects/s", self.connects_per_s),
            (
                "generator bytes/connection",
                self.client_bytes_per_connection,
            ),
        ]
    }
}
