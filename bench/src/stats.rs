//! Measurements: HDR latency histograms (recorded from thousands of tasks into a few
//! sharded histograms, drained once a second) and the per-second time series that the
//! progress bar, the JSON output and the charts are made of.

use std::sync::{
    Mutex, MutexGuard,
    atomic::{AtomicU64, Ordering},
};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, from 1 µs to one hour, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

const SHARDS: usize = 8;

/// A value alone on its cache line(s): counters written by different generator threads
/// must not share one (false sharing costs a cache-line transfer per write).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Padded<T>(pub T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A counter written by many threads, one cache line per shard; read by summing.
#[derive(Debug)]
pub struct ShardedCounter {
    shards: Vec<Padded<AtomicU64>>,
}

impl ShardedCounter {
    pub fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1)).map(|_| Padded::default()).collect(),
        }
    }

    /// Adds `n` on shard `hint % shards`.
    pub fn add(&self, hint: usize, n: u64) {
        self.shards[hint % self.shards.len()].fetch_add(n, Ordering::Relaxed);
    }

    pub fn sum(&self) -> u64 {
        self.shards.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }
}

/// A latency recorder shared by many tasks: one histogram per shard, so recorders on
/// different threads (one shard each) never wait for one another.
pub struct Latency {
    shards: Vec<Padded<Mutex<Histogram<u64>>>>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        Self::with_shards(SHARDS)
    }

    /// One histogram per shard (use one per generator thread).
    pub fn with_shards(shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1))
                .map(|_| Padded(Mutex::new(histogram())))
                .collect(),
        }
    }

    fn shard(&self, hint: usize) -> MutexGuard<'_, Histogram<u64>> {
        self.shards[hint % self.shards.len()]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Records one latency; `hint` spreads recorders over the shards (any number).
    pub fn record(&self, hint: usize, nanos: u64) {
        self.shard(hint).saturating_record((nanos / 1000).max(1));
    }

    /// Records several latencies under one lock.
    pub fn record_all(&self, hint: usize, nanos: &[u64]) {
        let mut h = self.shard(hint);
        for &n in nanos {
            h.saturating_record((n / 1000).max(1));
        }
    }

    /// Moves everything recorded so far into `into`.
    pub fn drain_into(&self, into: &mut Histogram<u64>) {
        for i in 0..self.shards.len() {
            let mut h = self.shard(i);
            if !h.is_empty() {
                // Same bounds on both sides: adding cannot fail.
                let _ = into.add(&*h);
                h.reset();
            }
        }
    }
}

/// A latency distribution summarized, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// The latency-by-percentile curve (for charts): (percentile, ms) pairs from 0 to
/// 99.999, denser near the tail.
pub fn percentile_curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    // 1 - 10^-(k/10): 0, 20.6, 36.9 ... 99.999.
    for k in 0..=50 {
        let q = 1.0 - 10f64.powf(-(k as f64) / 10.0);
        out.push((q * 100.0, h.value_at_quantile(q) as f64 / 1000.0));
    }
    out
}

/// One second of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tick {
    /// Seconds since the measured phase began.
    pub t_s: f64,
    /// Messages published (fanout/chat) or handshakes completed (storm) per second.
    pub sent_per_s: f64,
    /// Messages delivered to counted members per second.
    pub delivered_per_s: f64,
    /// Latency of what was delivered in this second.
    pub latency: Percentiles,
    /// Server CPU, percent of one core.
    pub server_cpu: Option<f64>,
    /// Generator CPU, percent of one core.
    pub client_cpu: f64,
    /// Server RSS, bytes.
    pub server_rss: Option<u64>,
    /// Server open file descriptors.
    pub server_fds: Option<u64>,
}

/// Median of some numbers (the mean of the two middle ones for an even count).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_drain_into_one_histogram() {
        let l = Latency::new();
        for i in 0..1000u64 {
            l.record(i as usize, (i + 1) * 1_000_000);
        }
        let mut h = histogram();
        l.drain_into(&mut h);
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 1000);
        assert!((p.p50_ms - 500.0).abs() < 2.0, "{p:?}");
        assert!((p.max_ms - 1000.0).abs() < 2.0, "{p:?}");
        let mut again = histogram();
        l.drain_into(&mut again);
        assert!(again.is_empty());
        assert_eq!(percentile_curve(&h).len(), 51);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
