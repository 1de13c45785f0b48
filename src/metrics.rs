//! Prometheus metrics (`GET /metrics`): connections by transport, frames in/out by
//! transport, errors by code, sessions and messages.

use std::{
    cell::Cell,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet, text::encode},
    metrics::{
        MetricType, TypedMetric,
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::proto::ErrorCode;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    pub transport: &'static str,
}

/// The transports whose series [`Metrics::transport`] keeps (the `transport` label of
/// each transport module's `LABEL`).
const TRANSPORTS: [&str; 6] = ["ws", "wt", "mqtt", "sse", "poll", "http"];

/// One transport's series of the labelled families, looked up once per process (a
/// family lookup takes its lock and hashes the label: four per connection in a connect
/// storm). Cloned handles share the family's value.
pub struct TransportSeries {
    pub connections: Gauge,
    pub frames_in: HotCounter,
    pub frames_out: HotCounter,
}

/// One open connection of a transport, counted in `connections` from [`OpenConnection::open`]
/// until it is dropped (a drop guard, so every way a connection ends counts it down).
pub struct OpenConnection {
    connections: Gauge,
}

impl OpenConnection {
    pub fn open(metrics: &Metrics, label: &'static TransportLabel) -> Self {
        let connections = metrics.transport(label).connections.clone();
        connections.inc();
        Self { connections }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.connections.dec();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

/// Shards of a [`HotCounter`].
const HOT_SHARDS: usize = 16;

/// One shard: alone on its cache line(s).
#[derive(Debug, Default)]
#[repr(align(128))]
struct HotShard(AtomicU64);

static NEXT_HOT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard of every [`HotCounter`], assigned on first use.
    static HOT_SHARD: Cell<Option<usize>> = const { Cell::new(None) };
}

/// A Prometheus counter bumped from every core at a high rate (frames in and out: one
/// bump per socket write): each thread adds to a shard of its own, on its own cache
/// line, and a scrape sums them. One shared `AtomicU64` would move its cache line
/// between cores on every write of every connection.
///
/// An `Arc` of an array, not of a slice: a thin pointer, 8 B in every connection that
/// keeps one (a WebSocket keeps two), not 16.
#[derive(Clone, Debug)]
pub struct HotCounter(Arc<[HotShard; HOT_SHARDS]>);

impl Default for HotCounter {
    fn default() -> Self {
        Self(Arc::new(std::array::from_fn(|_| HotShard::default())))
    }
}

impl HotCounter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        let i = HOT_SHARD.with(|c| {
            c.get().unwrap_or_else(|| {
                let i = NEXT_HOT_SHARD.fetch_add(1, Ordering::Relaxed) % HOT_SHARDS;
                c.set(Some(i));
                i
            })
        });
        self.0[i].0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for HotCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for HotCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Fan-out between instances (the Redis broker; all zero with the in-process one).
#[derive(Clone)]
pub struct BrokerMetrics {
    /// Envelopes published to Redis.
    pub publishes: Counter<u64, AtomicU64>,
    /// Publishes that failed or were skipped while Redis was unreachable.
    pub publish_failures: Counter<u64, AtomicU64>,
    /// Pipelines of publishes sent to Redis (`publishes / publish_batches`: the mean
    /// batch).
    pub publish_batches: Counter<u64, AtomicU64>,
    /// Envelopes received from other instances.
    pub received: Counter<u64, AtomicU64>,
    /// Seconds from publish (sender's clock) to receipt.
    pub receive_lag: Histogram,
    /// Room gaps filled from the store (a publish came late, was lost, or Redis was down).
    pub gap_fills: Counter<u64, AtomicU64>,
    /// Messages delivered from the store rather than from Redis.
    pub filled_messages: Counter<u64, AtomicU64>,
    /// Room messages dropped because that seq was delivered already.
    pub duplicates: Counter<u64, AtomicU64>,
    /// Reconnects to Redis after which every channel was subscribed again and every room
    /// repaired from the log (with a Redis Cluster: recoveries of the slots whose node
    /// failed or whose node connection was replaced, their rooms only).
    pub resubscribes: Counter<u64, AtomicU64>,
    /// Redis Cluster: slots (of this instance's channels) whose node failed and does not
    /// answer yet; their rooms deliver locally only (0 with one Redis).
    pub degraded_slots: Gauge,
}

impl BrokerMetrics {
    fn new() -> Self {
        Self {
            publishes: Counter::default(),
            publish_failures: Counter::default(),
            publish_batches: Counter::default(),
            received: Counter::default(),
            receive_lag: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            gap_fills: Counter::default(),
            filled_messages: Counter::default(),
            duplicates: Counter::default(),
            resubscribes: Counter::default(),
            degraded_slots: Gauge::default(),
        }
    }

    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("broker");
        r.register(
            "publishes",
            "Envelopes published to Redis",
            self.publishes.clone(),
        );
        r.register(
            "publish_failures",
            "Publishes that failed or were skipped while Redis was unreachable",
            self.publish_failures.clone(),
        );
        r.register(
            "publish_batches",
            "Pipelines of publishes sent to Redis (publishes / publish_batches: the mean batch)",
            self.publish_batches.clone(),
        );
        r.register(
            "received",
            "Envelopes received from other instances",
            self.received.clone(),
        );
        r.register(
            "receive_lag_seconds",
            "Publish to receipt, by the sender's clock",
            self.receive_lag.clone(),
        );
        r.register(
            "gap_fills",
            "Room seq gaps filled from the store",
            self.gap_fills.clone(),
        );
        r.register(
            "filled_messages",
            "Messages delivered from the store instead of Redis",
            self.filled_messages.clone(),
        );
        r.register(
            "duplicates",
            "Room messages dropped as already delivered",
            self.duplicates.clone(),
        );
        r.register(
            "resubscribes",
            "Reconnects to Redis followed by resubscribe and log repair",
            self.resubscribes.clone(),
        );
        r.register(
            "degraded_slots",
            "Redis Cluster slots whose node failed: their rooms deliver locally only",
            self.degraded_slots.clone(),
        );
    }
}

pub struct Metrics {
    registry: Registry,
    pub broker: BrokerMetrics,
    pub connections: Family<TransportLabel, Gauge>,
    pub frames_in: Family<TransportLabel, HotCounter>,
    pub frames_out: Family<TransportLabel, HotCounter>,
    pub errors: Family<CodeLabel, Counter>,
    pub messages: Counter<u64, AtomicU64>,
    /// HTTP/1 keep-alive connections that gave back their HTTP state while idle
    /// (`server.keep_alive_release`); each one whose client sends again is served by a
    /// new one.
    pub http1_idle_releases: Counter<u64, AtomicU64>,
    /// [`Metrics::transport`]'s series, by the index of the name in [`TRANSPORTS`].
    transports: [OnceLock<TransportSeries>; TRANSPORTS.len()],
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("parley");
        let connections = Family::<TransportLabel, Gauge>::default();
        let frames_in = Family::<TransportLabel, HotCounter>::default();
        let frames_out = Family::<TransportLabel, HotCounter>::default();
        let errors = Family::<CodeLabel, Counter>::default();
        let messages = Counter::default();
        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        registry.register("frames_in", "Client frames received", frames_in.clone());
        registry.register("frames_out", "Server frames sent", frames_out.clone());
        registry.register("errors", "Error replies sent, by code", errors.clone());
        registry.register("messages", "Chat messages accepted", messages.clone());
        let http1_idle_releases = Counter::default();
        registry.register(
            "http1_idle_releases",
            "Idle HTTP/1 keep-alive connections that gave back their HTTP state (server.keep_alive_release)",
            http1_idle_releases.clone(),
        );
        let broker = BrokerMetrics::new();
        broker.register(&mut registry);
        Self {
            registry,
            broker,
            connections,
            frames_in,
            frames_out,
            errors,
            messages,
            http1_idle_releases,
            transports: Default::default(),
        }
    }

    /// The series of `label`'s transport in `connections`, `frames_in` and `frames_out`,
    /// created in the families at the first call (so a scrape shows them from the
    /// transport's first connection on, as a lookup there would), then kept.
    pub fn transport(&self, label: &'static TransportLabel) -> &TransportSeries {
        let i = TRANSPORTS
            .iter()
            .position(|t| *t == label.transport)
            .expect("a transport named in metrics::TRANSPORTS");
        self.transports[i].get_or_init(|| TransportSeries {
            connections: self.connections.get_or_create(label).clone(),
            frames_in: self.frames_in.get_or_create(label).clone(),
            frames_out: self.frames_out.get_or_create(label).clone(),
        })
    }

    /// Frames sent so far on every transport (those that sent any): how busy the server
    /// has been, read every few seconds by the heap trim (`server::spawn_memory_trim`).
    pub fn frames_out_total(&self) -> u64 {
        ["ws", "sse", "poll", "http", "wt", "mqtt"]
            .iter()
            .filter_map(|&transport| {
                self.frames_out
                    .get(&TransportLabel { transport })
                    .map(|c| c.get())
            })
            .sum()
    }

    /// Open client connections on every transport: with the live sessions, what the
    /// heap trim watches fall (`server::spawn_memory_trim`).
    pub fn connections_total(&self) -> u64 {
        ["ws", "sse", "poll", "http", "wt", "mqtt"]
            .iter()
            .filter_map(|&transport| {
                self.connections
                    .get(&TransportLabel { transport })
                    .map(|c| c.get().max(0) as u64)
            })
            .sum()
    }

    pub fn error(&self, code: ErrorCode) {
        self.errors
            .get_or_create(&CodeLabel {
                code: code.as_str_name(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self, sessions: usize) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        // Sessions are counted live rather than tracked, so they cannot drift.
        let body = out.trim_end_matches("# EOF\n");
        // rustls counts the TLS keys it gave back (`tls.idle_keys_after`), process-wide.
        let released = tokio_rustls::rustls::idle_keys::released();
        format!(
            "{body}# HELP parley_sessions Live sessions (attached or in grace period).\n# TYPE parley_sessions gauge\nparley_sessions {sessions}\n# HELP parley_tls_idle_keys_released Expanded TLS 1.3 traffic keys given back by idle connections (tls.idle_keys_after).\n# TYPE parley_tls_idle_keys_released counter\nparley_tls_idle_keys_released_total {released}\n# EOF\n"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bumps from many threads (several shards) all count, and a scrape shows their sum
    /// as a Prometheus counter with its transport label.
    #[test]
    fn hot_counters_sum_their_shards_in_the_scrape() {
        let m = Metrics::new();
        let label = TransportLabel { transport: "ws" };
        let out = m.frames_out.get_or_create(&label).clone();
        std::thread::scope(|s| {
            for t in 0..HOT_SHARDS + 3 {
                let out = out.clone();
                s.spawn(move || {
                    for _ in 0..1000 {
                        out.inc();
                    }
                    out.inc_by(t as u64);
                });
            }
        });
        let n = HOT_SHARDS + 3;
        let want = (n * 1000 + n * (n - 1) / 2) as u64;
        assert_eq!(out.get(), want);
        let text = m.render(0);
        assert!(text.contains("# TYPE parley_frames_out counter"), "{text}");
        assert!(
            text.contains("\nparley_tls_idle_keys_released_total 0\n# EOF\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "parley_frames_out_total{{transport=\"ws\"}} {want}"
            )),
            "{text}"
        );
    }

    /// The series a transport keeps (`Metrics::transport`) are the families' own: a
    /// scrape shows what was counted through them, an open connection counts up and its
    /// drop counts down, and a transport not used yet shows no series.
    #[test]
    fn transport_series_are_the_families_series() {
        static WS: TransportLabel = TransportLabel { transport: "ws" };
        let m = Metrics::new();
        let text = m.render(0);
        assert!(!text.contains("transport=\"ws\""), "{text}");
        let open = OpenConnection::open(&m, &WS);
        m.transport(&WS).frames_in.inc_by(3);
        m.transport(&WS).frames_out.inc();
        let text = m.render(0);
        assert!(
            text.contains("parley_connections{transport=\"ws\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("parley_frames_in_total{transport=\"ws\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("parley_frames_out_total{transport=\"ws\"} 1"),
            "{text}"
        );
        assert_eq!(m.frames_in.get_or_create(&WS).get(), 3);
        drop(open);
        assert!(
            m.render(0)
                .contains("parley_connections{transport=\"ws\"} 0")
        );
        assert!(!m.render(0).contains("transport=\"sse\""));
    }
}
