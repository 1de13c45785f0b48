//! `fanout`: one room, N subscribers, P publishers sending R msgs/s in total for D
//! seconds. Measures deliveries per second and end-to-end latency at the subscribers,
//! and verifies that every subscriber got every message exactly once, in seq order.

use std::time::Duration;

use serde::Serialize;

use super::{
    Report, Run,
    rooms::{self, MemberSpec, Outcome, Plan},
    run_id,
};
use crate::{
    report::{Panel, Series, Table, nines},
    ui::{bytes, si},
};

#[derive(Debug, Clone, Serialize)]
pub struct Params {
    pub subscribers: usize,
    pub publishers: usize,
    /// Messages per second, all publishers together.
    pub rate: f64,
    pub duration: Duration,
    /// Stop after this many messages in total (`None`: only the duration bounds it).
    pub messages: Option<u64>,
    pub body_bytes: usize,
    pub drain_timeout: Duration,
    /// Acknowledge the session position every this many pushes (0 = never).
    pub ack_every: u64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            subscribers: 1000,
            publishers: 1,
            rate: 100.0,
            duration: Duration::from_secs(10),
            messages: None,
            body_bytes: 100,
            drain_timeout: Duration::from_secs(15),
            ack_every: 100,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    pub scenario: &'static str,
    pub transport: &'static str,
    pub encoding: &'static str,
    pub params: Params,
    /// Deliveries per second offered: rate × subscribers.
    pub offered_deliveries_per_s: f64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Runs the fan-out scenario.
pub async fn run(run: &Run, params: &Params) -> anyhow::Result<FanoutReport> {
    anyhow::ensure!(params.subscribers > 0, "need at least one subscriber");
    anyhow::ensure!(params.publishers > 0, "need at least one publisher");
    anyhow::ensure!(params.rate > 0.0, "the rate must be positive");
    let id = run_id();
    let p = params.publishers;
    let per_publisher = params.rate / p as f64;
    let mut members: Vec<MemberSpec> = (0..p)
        .map(|i| MemberSpec {
            user: format!("pub-{id}-{i}"),
            room: 0,
            rate: per_publisher,
            quota: params
                .messages
                .map(|m| m / p as u64 + u64::from((i as u64) < m % p as u64)),
            counted: false,
        })
        .collect();
    members.extend((0..params.subscribers).map(|i| MemberSpec {
        user: format!("sub-{id}-{i}"),
        room: 0,
        rate: 0.0,
        quota: None,
        counted: true,
    }));
    let plan = Plan {
        rooms: vec![format!("fanout-{id}")],
        members,
        duration: params.duration,
        body_bytes: params.body_bytes,
        drain_timeout: params.drain_timeout,
        ack_every: params.ack_every,
        label: "fanout",
    };
    let outcome = rooms::run(run, plan).await?;
    Ok(FanoutReport {
        scenario: "fanout",
        transport: run.target.transport.name(),
        encoding: run.target.encoding.subprotocol(),
        params: params.clone(),
        offered_deliveries_per_s: params.rate * params.subscribers as f64,
        outcome,
    })
}

/// Rows shared by fanout and chat tables.
pub(crate) fn outcome_rows(t: &mut Table, o: &Outcome) {
    t.row(
        "connect+auth+join",
        format!(
            "{} in {:.2} s ({}/s)",
            o.members,
            o.connect_s,
            si(o.connects_per_s)
        ),
    );
    t.row(
        "published",
        format!(
            "{} in {:.2} s ({}/s)",
            o.published,
            o.publish_s,
            si(o.published as f64 / o.publish_s.max(1e-9))
        ),
    );
    t.row(
        "delivered",
        format!("{} of {} expected", o.delivered, o.expected_deliveries),
    );
    t.row(
        "delivered/s (window)",
        format!(
            "{} over {:.2} s",
            si(o.delivered_per_s),
            o.delivery_window_s
        ),
    );
    t.row("delivered/s (steady median)", si(o.steady_delivered_per_s));
    let l = &o.latency;
    t.row(
        "latency p50/p90/p99",
        format!("{:.2} / {:.2} / {:.2} ms", l.p50_ms, l.p90_ms, l.p99_ms),
    );
    t.row(
        "latency p99.9/max",
        format!("{:.2} / {:.2} ms", l.p999_ms, l.max_ms),
    );
    let g = &o.generator_lag;
    t.row(
        "generator send lag p99/max",
        format!(
            "{:.2} / {:.2} ms{}",
            g.p99_ms,
            g.max_ms,
            if o.generator_bound {
                "  GENERATOR-BOUND: the generator, not the server, may be the limit"
            } else {
                ""
            }
        ),
    );
    if let Some(c) = o.server_cpu {
        t.row("server CPU (mean)", format!("{c:.0}% of a core"));
    }
    t.row(
        "generator CPU (mean)",
        format!("{:.0}% of a core", o.client_cpu),
    );
    if let (Some(b), Some(c)) = (o.server_rss_before, o.server_rss_connected) {
        t.row(
            "server RSS before/connected",
            format!("{} / {}", bytes(b as f64), bytes(c as f64)),
        );
    }
    if let Some(a) = o.server_rss_after {
        t.row("server RSS after", bytes(a as f64));
    }
    let v = &o.verification;
    t.row(
        "verification",
        if v.ok() {
            "OK: nothing lost, duplicated or reordered".to_string()
        } else {
            format!(
                "FAILED: undelivered {} dup {} pos-errors {} disconnected {} (codes {:?}) publish-errors {} unacked {} incomplete members {}",
                v.lost,
                v.duplicates,
                v.pos_errors,
                v.disconnected,
                v.close_codes,
                v.publish_errors,
                v.unacked,
                v.incomplete_members
            )
        },
    );
}

/// Chart panels shared by fanout and chat.
pub(crate) fn outcome_panels(o: &Outcome, offered: Option<f64>) -> Vec<Panel> {
    let ts = |f: &dyn Fn(&crate::stats::Tick) -> f64| -> Vec<(f64, f64)> {
        o.ticks.iter().map(|t| (t.t_s, f(t))).collect()
    };
    let mut throughput = Panel::new("Throughput", "seconds", "messages/s")
        .with(Series::new("delivered/s", ts(&|t| t.delivered_per_s)));
    if let Some(offered) = offered {
        throughput = throughput.with(Series::new(
            "offered deliveries/s",
            o.ticks.iter().map(|t| (t.t_s, offered)).collect(),
        ));
    }
    let latency = Panel::new("Latency per second", "seconds", "ms (log)")
        .log_y()
        .with(Series::new("p50", ts(&|t| t.latency.p50_ms)))
        .with(Series::new("p90", ts(&|t| t.latency.p90_ms)))
        .with(Series::new("p99", ts(&|t| t.latency.p99_ms)))
        .with(Series::new("max", ts(&|t| t.latency.max_ms)));
    let by_percentile = Panel::new(
        "Latency by percentile (whole run)",
        "percentile",
        "ms (log)",
    )
    .log_y()
    .nines()
    .with(Series::new(
        "latency",
        o.latency_curve
            .iter()
            .map(|&(p, ms)| (nines(p), ms))
            .collect(),
    ));
    let cpu = Panel::new("CPU", "seconds", "% of one core")
        .with(Series::new("server", ts(&|t| t.server_cpu.unwrap_or(0.0))))
        .with(Series::new("generator", ts(&|t| t.client_cpu)));
    vec![throughput, latency, by_percentile, cpu]
}

impl Report for FanoutReport {
    fn title(&self) -> String {
        format!(
            "fanout: {} subscribers, {} msgs/s, {} ({})",
            self.params.subscribers, self.params.rate, self.transport, self.encoding
        )
    }

    fn table(&self) -> Table {
        let mut t = Table::new(self.title());
        t.row("offered deliveries/s", si(self.offered_deliveries_per_s));
        outcome_rows(&mut t, &self.outcome);
        t
    }

    fn panels(&self) -> Vec<Panel> {
        outcome_panels(&self.outcome, Some(self.offered_deliveries_per_s))
    }

    fn ok(&self) -> bool {
        self.outcome.verification.ok()
    }

    fn headline(&self) -> Vec<(&'static str, f64)> {
        outcome_headline(&self.outcome)
    }
}

pub(crate) fn outcome_headline(o: &Outcome) -> Vec<(&'static str, f64)> {
    vec![
        ("delivered/s (window)", o.delivered_per_s),
        ("delivered/s (steady median)", o.steady_delivered_per_s),
        ("latency p50 ms", o.latency.p50_ms),
        ("latency p99 ms", o.latency.p99_ms),
        ("latency max ms", o.latency.max_ms),
        ("connects/s", o.connects_per_s),
        ("server CPU %", o.server_cpu.unwrap_or(f64::NAN)),
        ("generator CPU %", o.client_cpu),
        ("generator bound", f64::from(u8::from(o.generator_bound))),
    ]
}
