//! The scenarios, as library functions: each takes a [`Run`] (where and how to connect,
//! which server process to watch) and its own parameters, and returns a report that
//! serializes to JSON, renders as a table and draws as chart panels.
//!
//! - [`idle`]: N authenticated connections held open → server bytes per connection.
//! - [`fanout`]: one room, N subscribers, publishers at R msgs/s → deliveries/s, latency.
//! - [`chat`]: N users in rooms of K, each sending every T seconds → the realistic mix.
//! - [`storm`]: connect/auth/disconnect churn → handshakes/s, errors, fds and memory.
//!
//! `fanout` and `chat` share one engine ([`rooms`]): members that join one room each, some
//! of which publish on a schedule, all of which check what they receive.

pub mod chat;
pub mod fanout;
pub mod idle;
pub mod rooms;
pub mod shards;
pub mod storm;

use std::{future::Future, sync::Arc, time::Instant};

use serde::Serialize;

use crate::{
    probe::{CpuMeter, Probe, Usage},
    report::{Panel, Table},
    stats::Tick,
    target::Target,
    ui::Ui,
};

/// Where a scenario runs: the target, the server process to watch (if known) and how
/// aggressively to open connections.
#[derive(Debug, Clone)]
pub struct Run {
    pub target: Target,
    /// Where listeners connect, in turn (empty: `target`), e.g. the other instances of
    /// a cluster.
    pub listener_targets: Vec<Target>,
    /// The server process, for RSS / fds / CPU (`None`: not measured).
    pub server: Option<Probe>,
    pub ui: Ui,
    /// Connection attempts in flight at once.
    pub connect_concurrency: usize,
    /// Per-thread connection shards (`None`: connections are tasks of the caller's
    /// runtime).
    pub shards: Option<Arc<shards::Shards>>,
}

impl Run {
    pub fn new(target: Target) -> Self {
        Self {
            target,
            listener_targets: Vec::new(),
            server: None,
            ui: Ui::hidden(),
            connect_concurrency: 128,
            shards: None,
        }
    }

    /// Spawns connection `i`'s task: on its shard, or on the caller's runtime.
    pub(crate) fn spawn<F>(&self, i: usize, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.shards {
            Some(s) => s.spawn(i, fut),
            None => tokio::spawn(fut),
        }
    }

    /// How many counter and histogram shards to keep: one per generator thread (eight
    /// without shards, as before).
    pub(crate) fn counter_shards(&self) -> usize {
        self.shards.as_ref().map_or(8, |s| s.len())
    }

    /// Connection `i`'s counter shard (its thread's, with shards).
    pub(crate) fn shard_of(&self, i: usize) -> usize {
        i % self.counter_shards()
    }

    /// CPUs the generator can use: its shard threads, or the CPUs it may run on.
    pub(crate) fn generator_cores(&self) -> usize {
        match &self.shards {
            Some(s) => s.len().min(crate::probe::allowed_cpus().len().max(1)),
            None => crate::probe::allowed_cpus().len().max(1),
        }
    }

    pub(crate) fn server_usage(&self) -> Option<Usage> {
        self.server.and_then(|p| p.usage().ok())
    }
}

/// What every scenario report offers the CLI.
pub trait Report: Serialize {
    /// The summary table.
    fn table(&self) -> Table;
    /// Chart panels (may be empty).
    fn panels(&self) -> Vec<Panel>;
    /// Whether the run verified (nothing lost, duplicated or failed).
    fn ok(&self) -> bool;
    fn title(&self) -> String;
    /// The few numbers that repeated runs are compared by (their medians are reported).
    fn headline(&self) -> Vec<(&'static str, f64)>;
}

/// Takes one [`Tick`] per call: rates since the previous call, CPU of both processes,
/// server memory and fds.
pub(crate) struct Sampler {
    start: Instant,
    last: Instant,
    last_sent: u64,
    last_delivered: u64,
    server: Option<(Probe, CpuMeter)>,
    me: CpuMeter,
}

impl Sampler {
    pub(crate) fn new(server: Option<Probe>) -> Self {
        let now = Instant::now();
        Self {
            start: now,
            last: now,
            last_sent: 0,
            last_delivered: 0,
            server: server.map(|p| (p, CpuMeter::new(p))),
            me: CpuMeter::new(Probe::me()),
        }
    }

    /// A tick from cumulative counters.
    pub(crate) fn tick(&mut self, sent: u64, delivered: u64) -> Tick {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64().max(1e-9);
        let mut t = Tick {
            t_s: now.duration_since(self.start).as_secs_f64(),
            sent_per_s: sent.saturating_sub(self.last_sent) as f64 / dt,
            delivered_per_s: delivered.saturating_sub(self.last_delivered) as f64 / dt,
            client_cpu: self.me.percent(),
            ..Tick::default()
        };
        if let Some((probe, cpu)) = &mut self.server {
            t.server_cpu = Some(cpu.percent());
            if let Ok(u) = probe.usage() {
                t.server_rss = Some(u.rss);
                t.server_fds = Some(u.fds);
            }
        }
        self.last = now;
        self.last_sent = sent;
        self.last_delivered = delivered;
        t
    }
}

/// Mean of the CPU columns over ticks: (server, generator), percent of one core.
pub(crate) fn mean_cpu(ticks: &[Tick]) -> (Option<f64>, f64) {
    if ticks.is_empty() {
        return (None, 0.0);
    }
    let n = ticks.len() as f64;
    let server: Vec<f64> = ticks.iter().filter_map(|t| t.server_cpu).collect();
    let s = (!server.is_empty()).then(|| server.iter().sum::<f64>() / server.len() as f64);
    (s, ticks.iter().map(|t| t.client_cpu).sum::<f64>() / n)
}

/// A run-unique suffix for room and user names.
pub(crate) fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}{:x}", std::process::id(), nanos & 0xffff_ffff)
}
