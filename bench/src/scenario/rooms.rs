//! The engine behind `fanout` and `chat`: members that each join one room; some publish
//! on a schedule; every member checks what it receives.
//!
//! Phases: connect + authenticate + join every member (bounded concurrency) → start
//! together → publish for the duration (or until each publisher's quota) → collect every
//! publisher's acknowledged seqs → wait until every member has received up to its room's
//! last seq (bounded by the drain timeout) → stop and verify.
//!
//! Verification, per member: each push's session `pos` is the previous + 1; each
//! message's `seq` is the previous + 1 (a lower one is a duplicate, a higher one a gap);
//! in the end it has every seq its room's publishers were acknowledged for. Per room: the
//! acknowledged seqs are exactly base+1 ..= base+count (one total order, nothing
//! skipped).

use std::{
    future::Future,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::Poll,
    time::{Duration, Instant},
};

use anyhow::bail;
use futures_util::task::AtomicWaker;
use parley::proto::{self, client_frame::Cmd, server_frame::Kind};
use serde::Serialize;
use tokio::{
    sync::{Semaphore, mpsc},
    time::MissedTickBehavior,
};
use tokio_util::sync::CancellationToken;

use super::{Run, Sampler};
use crate::{
    stats::{self, Latency, Padded, Percentiles, ShardedCounter, Tick},
    target::TransportKind,
    transport::Connection,
    wire::{self, Peek, Received},
};

/// One member of one room.
#[derive(Debug, Clone)]
pub struct MemberSpec {
    pub user: String,
    /// Index into [`Plan::rooms`].
    pub room: usize,
    /// Messages per second this member publishes (0: it only listens).
    pub rate: f64,
    /// Stop publishing after this many messages.
    pub quota: Option<u64>,
    /// Whether its deliveries and latencies count in the results (fanout counts the
    /// subscribers, not the publishers' copies of their own messages).
    pub counted: bool,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub rooms: Vec<String>,
    pub members: Vec<MemberSpec>,
    /// How long publishers publish.
    pub duration: Duration,
    /// Bytes per message body (at least the timestamp).
    pub body_bytes: usize,
    /// After publishing: how long to wait for acks and for every delivery.
    pub drain_timeout: Duration,
    /// Members acknowledge their session position every this many pushes, as real
    /// clients do (so the server can drop its replay buffers); 0 = never.
    pub ack_every: u64,
    /// Progress bar label.
    pub label: &'static str,
}

/// Problems found by the checks, summed over members.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Verification {
    /// Messages acknowledged to a publisher but not received by a member by the end of
    /// the run (after the drain timeout), summed over members.
    pub lost: u64,
    /// Messages received more than once or out of order.
    pub duplicates: u64,
    /// Push positions that were not the previous + 1.
    pub pos_errors: u64,
    /// Members the server disconnected during the run.
    pub disconnected: u64,
    /// Close codes of those disconnects (code → members).
    pub close_codes: Vec<(u16, u64)>,
    /// Sends answered with an error.
    pub publish_errors: u64,
    /// Sends never answered.
    pub unacked: u64,
    /// Rooms whose acknowledged seqs were not gap-free.
    pub seq_gaps_in_acks: u64,
    /// Members that had not received everything when the drain timeout ran out.
    pub incomplete_members: u64,
    /// A few error messages, for the log.
    pub samples: Vec<String>,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicates == 0
            && self.pos_errors == 0
            && self.disconnected == 0
            && self.publish_errors == 0
            && self.unacked == 0
            && self.seq_gaps_in_acks == 0
            && self.incomplete_members == 0
    }
}

/// Publishers later than this at p99 (ms) mean the generator limited the run.
pub const GENERATOR_LAG_LIMIT_MS: f64 = 5.0;
/// A generator at this share of its cores (percent of one, per core it may use) may be
/// what limits the run.
pub const GENERATOR_CPU_LIMIT: f64 = 95.0;

/// What the engine measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub members: usize,
    pub rooms: usize,
    pub publishers: usize,
    /// Seconds to connect, authenticate and join every member.
    pub connect_s: f64,
    /// Members connected per second.
    pub connects_per_s: f64,
    /// Messages published (acknowledged).
    pub published: u64,
    /// Seconds publishers actually published.
    pub publish_s: f64,
    /// Deliveries expected at counted members (Σ over counted members of their room's
    /// messages).
    pub expected_deliveries: u64,
    /// Deliveries counted.
    pub delivered: u64,
    /// Seconds from the first publish until the last delivery (or the drain timeout).
    pub delivery_window_s: f64,
    /// delivered / delivery_window_s.
    pub delivered_per_s: f64,
    /// Median of the per-second delivery rate while publishers were publishing.
    pub steady_delivered_per_s: f64,
    /// Scheduled send → delivery (coordinated-omission free: a late send counts its
    /// lateness).
    pub latency: Percentiles,
    /// Scheduled → actual send, at the publishers: the generator's own lag.
    pub generator_lag: Percentiles,
    /// Whether the generator, not the server, limited the run: publishers more than
    /// [`GENERATOR_LAG_LIMIT_MS`] late at p99, or the generator's core near full.
    pub generator_bound: bool,
    /// (percentile, ms): the latency-by-percentile curve.
    pub latency_curve: Vec<(f64, f64)>,
    pub server_rss_before: Option<u64>,
    pub server_rss_connected: Option<u64>,
    pub server_rss_after: Option<u64>,
    /// Mean CPU while measuring, percent of one core.
    pub server_cpu: Option<f64>,
    pub client_cpu: f64,
    pub ticks: Vec<Tick>,
    pub verification: Verification,
}

#[derive(Debug)]
struct AckReport {
    room: usize,
    seqs: Vec<u64>,
    errors: u64,
    unacked: u64,
    error_sample: Option<String>,
}

/// The per-member delivery check. Every push position must be the previous + 1; every
/// message seq the previous + 1: a lower one is a duplicate (or arrived out of order), a
/// higher one a gap, whose skipped messages are counted as lost at the end
/// ([`DeliveryCheck::lost`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeliveryCheck {
    pub last_pos: u64,
    pub base_seq: u64,
    pub last_seq: u64,
    pub unique: u64,
    pub duplicates: u64,
    pub pos_errors: u64,
}

impl DeliveryCheck {
    /// A member that joined when the room's last seq was `base_seq`.
    pub fn new(base_seq: u64) -> Self {
        Self {
            base_seq,
            last_seq: base_seq,
            ..Self::default()
        }
    }

    /// A push that is not a message: only its position is checked.
    pub fn push(&mut self, pos: u64) {
        if pos != self.last_pos + 1 {
            self.pos_errors += 1;
        }
        self.last_pos = self.last_pos.max(pos);
    }

    /// A message push.
    pub fn message(&mut self, pos: u64, seq: u64) {
        self.push(pos);
        if seq <= self.last_seq {
            self.duplicates += 1;
        } else {
            self.unique += 1;
            self.last_seq = seq;
        }
    }

    /// Messages of `base_seq + 1 ..= final_seq` never received.
    pub fn lost(&self, final_seq: u64) -> u64 {
        final_seq
            .saturating_sub(self.base_seq)
            .saturating_sub(self.unique)
    }

    /// Whether everything up to `final_seq` arrived exactly once, in order.
    pub fn ok(&self, final_seq: u64) -> bool {
        self.lost(final_seq) == 0 && self.duplicates == 0 && self.pos_errors == 0
    }
}

#[derive(Debug, Default)]
struct MemberResult {
    room: usize,
    counted: bool,
    check: DeliveryCheck,
    closed: Option<Option<u16>>,
    error: Option<String>,
}

struct Shared {
    run: Run,
    plan: Plan,
    connect: Semaphore,
    /// Cancelled when every member is connected: publishing starts.
    go: CancellationToken,
    /// Cancelled to end the run (or to abort it).
    stop: CancellationToken,
    /// The shared clock: message bodies carry nanoseconds since this instant.
    epoch: Instant,
    /// When publishers stop (set just before `go`).
    publish_until: OnceLock<Instant>,
    /// Last seq received, per member (each on its own cache line: neighbours live on
    /// different generator threads).
    progress: Vec<Padded<AtomicU64>>,
    sent: AtomicU64,
    /// Counted deliveries, one shard per generator thread.
    delivered: ShardedCounter,
    latency: Latency,
    /// How late each send left against its schedule (the generator's own lag).
    send_lag: Latency,
    /// Set with `stop` ([`Shared::stop_members`]): what members look at in their loop,
    /// a load where the token's `is_cancelled` takes its mutex.
    stopping: AtomicBool,
    /// Each member's waker for the stop, registered without a lock on every wait
    /// (waiting on the token re-takes its mutex at every poll, once per wake-up).
    stop_wakers: Vec<Padded<AtomicWaker>>,
}

impl Shared {
    /// Ends the run (or aborts it): cancels `stop` and wakes every member.
    fn stop_members(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.cancel();
        for w in &self.stop_wakers {
            w.wake();
        }
    }

    /// Resolves once [`Shared::stop_members`] was called.
    fn stopped(&self, i: usize) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.stopping.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.stop_wakers[i].register(cx.waker());
            if self.stopping.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

/// Runs the plan.
pub async fn run(run: &Run, plan: Plan) -> anyhow::Result<Outcome> {
    let n = plan.members.len();
    if n == 0 {
        bail!("no members");
    }
    let publishers = plan.members.iter().filter(|m| m.rate > 0.0).count();
    let shared = Arc::new(Shared {
        run: run.clone(),
        connect: Semaphore::new(run.connect_concurrency.max(1)),
        go: CancellationToken::new(),
        stop: CancellationToken::new(),
        epoch: Instant::now(),
        publish_until: OnceLock::new(),
        progress: (0..n).map(|_| Padded::default()).collect(),
        sent: AtomicU64::new(0),
        delivered: ShardedCounter::new(run.counter_shards()),
        latency: Latency::with_shards(run.counter_shards()),
        send_lag: Latency::with_shards(run.counter_shards()),
        stopping: AtomicBool::new(false),
        stop_wakers: (0..n).map(|_| Padded::default()).collect(),
        plan,
    });
    let rss_before = run.server_usage().map(|u| u.rss);

    // Connect everyone.
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<AckReport>();
    let mut tasks = Vec::with_capacity(n);
    let connect_start = Instant::now();
    for i in 0..n {
        let shared = shared.clone();
        let ready = ready_tx.clone();
        let acks = ack_tx.clone();
        tasks.push(run.spawn(i, member(i, shared, ready, acks)));
    }
    drop(ready_tx);
    drop(ack_tx);
    let bar = run.ui.counter(n as u64, "connecting");
    let mut failures = 0usize;
    let mut first_failure = None;
    for _ in 0..n {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                failures += 1;
                first_failure.get_or_insert(e);
            }
            None => break,
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let connect_s = connect_start.elapsed().as_secs_f64();
    if failures > 0 {
        shared.stop_members();
        for t in tasks {
            let _ = t.await;
        }
        bail!(
            "{failures} of {n} members failed to connect; first error: {}",
            first_failure.unwrap_or_default()
        );
    }
    let rss_connected = run.server_usage().map(|u| u.rss);

    // Publish.
    let plan = &shared.plan;
    let t0 = Instant::now();
    let _ = shared.publish_until.set(t0 + plan.duration);
    shared.go.cancel();
    let mut sampler = Sampler::new(run.server);
    let mut ticks = Vec::new();
    let mut total = stats::histogram();
    let mut interval = stats::histogram();
    let mut every_second = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let bar = run.ui.timer(plan.duration.as_secs(), plan.label);
    let mut take_tick = |ticks: &mut Vec<Tick>, total: &mut hdrhistogram::Histogram<u64>| {
        interval.reset();
        shared.latency.drain_into(&mut interval);
        let _ = total.add(&interval);
        let mut t = sampler.tick(shared.sent.load(Ordering::Relaxed), shared.delivered.sum());
        t.latency = Percentiles::of(&interval);
        ticks.push(t.clone());
        t
    };
    let mut reports = Vec::with_capacity(publishers);
    let ack_deadline = tokio::time::Instant::from_std(t0 + plan.duration + plan.drain_timeout);
    let mut publish_s = plan.duration.as_secs_f64();
    while reports.len() < publishers {
        tokio::select! {
            r = ack_rx.recv() => match r {
                Some(r) => {
                    reports.push(r);
                    if reports.len() == publishers {
                        publish_s = t0.elapsed().as_secs_f64().min(publish_s);
                    }
                }
                None => break,
            },
            _ = every_second.tick() => {
                let t = take_tick(&mut ticks, &mut total);
                bar.set_position(t.t_s as u64);
                bar.set_message(format!(
                    "sent {}/s  delivered {}/s  p99 {:.1} ms  cpu server {:.0}% gen {:.0}%",
                    crate::ui::si(t.sent_per_s),
                    crate::ui::si(t.delivered_per_s),
                    t.latency.p99_ms,
                    t.server_cpu.unwrap_or(0.0),
                    t.client_cpu,
                ));
            }
            _ = tokio::time::sleep_until(ack_deadline) => break,
        }
    }
    bar.finish_and_clear();
    let publishing_ticks = ticks.len();

    // Each room's final seq, from the acks.
    let (_, finals, _) = tally(&reports, plan, publishers);

    // Wait for every delivery.
    let drain_deadline = if reports.len() < publishers {
        // Publishers still waiting for acks: the server is behind; do not wait twice.
        tokio::time::Instant::now()
    } else {
        ack_deadline.max(tokio::time::Instant::now() + plan.drain_timeout)
    };
    let spinner = run.ui.spinner("draining");
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    let done = |i: usize| {
        let m = &plan.members[i];
        let target = finals[m.room];
        target == 0 || shared.progress[i].load(Ordering::Relaxed) >= target
    };
    let window_end = loop {
        tokio::select! {
            _ = poll.tick() => {
                let waiting = (0..n).filter(|&i| !done(i) && !tasks[i].is_finished()).count();
                if waiting == 0 {
                    break Instant::now();
                }
                spinner.set_message(format!("{waiting} members still receiving"));
            }
            _ = every_second.tick() => {
                take_tick(&mut ticks, &mut total);
            }
            _ = tokio::time::sleep_until(drain_deadline) => break Instant::now(),
        }
    };
    spinner.finish_and_clear();
    shared.stop_members();
    take_tick(&mut ticks, &mut total);
    let rss_after = run.server_usage().map(|u| u.rss);

    // Collect and verify (with acks that arrived late, when the run was stopped).
    let mut results = Vec::with_capacity(n);
    for t in tasks {
        results.push(t.await.unwrap_or_else(|e| MemberResult {
            error: Some(format!("member task failed: {e}")),
            ..MemberResult::default()
        }));
    }
    while let Ok(r) = ack_rx.try_recv() {
        reports.push(r);
    }
    let (mut verification, finals, published) = tally(&reports, plan, publishers);
    let mut expected = 0u64;
    let mut codes = std::collections::BTreeMap::<u16, u64>::new();
    for r in results {
        let target = finals[r.room];
        let c = &r.check;
        if r.counted {
            expected += target.saturating_sub(c.base_seq);
        }
        verification.lost += c.lost(target);
        verification.duplicates += c.duplicates;
        verification.pos_errors += c.pos_errors;
        if c.last_seq < target && r.closed.is_none() {
            verification.incomplete_members += 1;
        }
        if let Some(code) = r.closed {
            verification.disconnected += 1;
            *codes.entry(code.unwrap_or(0)).or_default() += 1;
        }
        if let Some(e) = r.error {
            if verification.samples.len() < 10 {
                verification.samples.push(e);
            }
        }
    }
    verification.close_codes = codes.into_iter().collect();
    let delivered = shared.delivered.sum();
    let window = window_end.duration_since(t0).as_secs_f64().max(1e-9);
    let mut steady: Vec<f64> = ticks[..publishing_ticks.min(ticks.len())]
        .iter()
        .map(|t| t.delivered_per_s)
        .collect();
    // The first second includes the ramp-up; drop it when there is more.
    if steady.len() > 2 {
        steady.remove(0);
    }
    let (server_cpu, client_cpu) =
        super::mean_cpu(&ticks[..publishing_ticks.max(1).min(ticks.len())]);
    let mut lag = stats::histogram();
    shared.send_lag.drain_into(&mut lag);
    let generator_lag = Percentiles::of(&lag);
    let generator_bound = generator_lag.p99_ms > GENERATOR_LAG_LIMIT_MS
        || client_cpu >= GENERATOR_CPU_LIMIT * run.generator_cores() as f64;
    Ok(Outcome {
        members: n,
        rooms: plan.rooms.len(),
        publishers,
        connect_s,
        connects_per_s: n as f64 / connect_s.max(1e-9),
        published,
        publish_s,
        expected_deliveries: expected,
        delivered,
        delivery_window_s: window,
        delivered_per_s: delivered as f64 / window,
        steady_delivered_per_s: stats::median(&mut steady),
        latency: Percentiles::of(&total),
        generator_lag,
        generator_bound,
        latency_curve: stats::percentile_curve(&total),
        server_rss_before: rss_before,
        server_rss_connected: rss_connected,
        server_rss_after: rss_after,
        server_cpu,
        client_cpu,
        ticks,
        verification,
    })
}

/// Sums the publishers' ack reports: the verification so far, each room's last seq,
/// and how many messages were published (acknowledged).
fn tally(reports: &[AckReport], plan: &Plan, publishers: usize) -> (Verification, Vec<u64>, u64) {
    let mut verification = Verification::default();
    let mut seqs_by_room: Vec<Vec<u64>> = vec![Vec::new(); plan.rooms.len()];
    for r in reports {
        seqs_by_room[r.room].extend_from_slice(&r.seqs);
        verification.publish_errors += r.errors;
        verification.unacked += r.unacked;
        if let Some(e) = &r.error_sample {
            if verification.samples.len() < 5 {
                verification.samples.push(e.clone());
            }
        }
    }
    let missing_reports = publishers.saturating_sub(reports.len());
    if missing_reports > 0 {
        verification.samples.push(format!(
            "{missing_reports} publishers never reported their acks"
        ));
        verification.unacked += missing_reports as u64;
    }
    let mut finals = vec![0u64; plan.rooms.len()];
    let mut published = 0u64;
    for (room, seqs) in seqs_by_room.iter_mut().enumerate() {
        seqs.sort_unstable();
        published += seqs.len() as u64;
        if let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) {
            finals[room] = last;
            let contiguous = seqs.windows(2).all(|w| w[1] == w[0] + 1);
            if !contiguous || last - first + 1 != seqs.len() as u64 {
                verification.seq_gaps_in_acks += 1;
                verification.samples.push(format!(
                    "room {}: acked seqs {first}..={last} are not gap-free ({} acks)",
                    plan.rooms[room],
                    seqs.len()
                ));
            }
        }
    }
    (verification, finals, published)
}

/// One member: connect, join, wait for the start, then publish (if it does) and receive
/// until stopped. It reads from the moment it has joined: the server pushes membership
/// and presence events while the others join, and a member that does not read would be
/// disconnected as a slow consumer.
async fn member(
    i: usize,
    shared: Arc<Shared>,
    ready: mpsc::UnboundedSender<Result<(), String>>,
    acks: mpsc::UnboundedSender<AckReport>,
) -> MemberResult {
    let spec = shared.plan.members[i].clone();
    let run = &shared.run;
    let shard = run.shard_of(i);
    let mut result = MemberResult {
        room: spec.room,
        counted: spec.counted,
        ..MemberResult::default()
    };
    let room = shared.plan.rooms[spec.room].clone();

    // Publishers stay on WebSocket when the run is over SSE or long-poll (their sends
    // would otherwise be one POST round-trip each); listeners use the run's transport.
    let ws_target;
    let target = if spec.rate > 0.0
        && !matches!(run.target.transport, TransportKind::Ws | TransportKind::Wt)
    {
        ws_target = run.target.over_websocket();
        &ws_target
    } else if spec.rate == 0.0 && !run.listener_targets.is_empty() {
        &run.listener_targets[i % run.listener_targets.len()]
    } else {
        &run.target
    };
    let opened = async {
        let _permit = shared.connect.acquire().await?;
        let token = target.token(&spec.user)?;
        let (mut conn, _) = Connection::open_authenticated(target, i, &spec.user, &token).await?;
        let base = conn.join(&room).await?;
        anyhow::Ok((conn, base))
    };
    let opened = tokio::select! {
        r = opened => r,
        _ = shared.stop.cancelled() => return result,
    };
    let (mut conn, base) = match opened {
        Ok(pair) => {
            let _ = ready.send(Ok(()));
            pair
        }
        Err(e) => {
            let _ = ready.send(Err(format!("{}: {e:#}", spec.user)));
            return result;
        }
    };
    drop(ready);
    result.check = DeliveryCheck::new(base);
    shared.progress[i].store(base, Ordering::Relaxed);

    let publishing = spec.rate > 0.0;
    let quota = spec.quota.unwrap_or(u64::MAX);
    let mut started = false;
    let mut sending = false;
    let mut schedule: Option<tokio::time::Interval> = None;
    let mut until = Instant::now() + Duration::from_secs(24 * 3600);
    let mut sent = 0u64;
    let mut outstanding = 0u64;
    let mut report = publishing.then(|| AckReport {
        room: spec.room,
        seqs: Vec::new(),
        errors: 0,
        unacked: 0,
        error_sample: None,
    });
    let encoding = conn.encoding();
    let ack_every = shared.plan.ack_every;
    let mut last_acked = 0u64;
    let mut latencies = Vec::new();
    let go = shared.go.clone();
    let go_signal = go.cancelled();
    tokio::pin!(go_signal);
    let publish_over = tokio::time::sleep_until(tokio::time::Instant::from_std(until));
    tokio::pin!(publish_over);

    loop {
        // The stop is polled last, with no lock ([`Shared::stopped`]); a member with
        // frames to read checks the flag after each batch instead.
        tokio::select! {
            biased;
            _ = &mut go_signal, if !started => {
                started = true;
                if publishing {
                    // Staggered over one period so publishers do not all fire at once.
                    let period = Duration::from_secs_f64(1.0 / spec.rate);
                    let offset = period.mul_f64((i as f64 * 0.618_033_988_7).fract());
                    let mut interval =
                        tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
                    interval.set_missed_tick_behavior(MissedTickBehavior::Burst);
                    schedule = Some(interval);
                    until = shared.publish_until.get().copied().unwrap_or_else(Instant::now);
                    publish_over
                        .as_mut()
                        .reset(tokio::time::Instant::from_std(until));
                    sending = true;
                }
            }
            readable = conn.readable() => {
                if let Err(e) = readable {
                    result.closed = Some(None);
                    result.error = Some(format!("{}: {e:#}", spec.user));
                    break;
                }
                // Every frame one read brought is checked here, then counted, timed
                // (one clock read) and acknowledged together.
                let mut counted = 0u64;
                let mut now = None;
                let mut end = false;
                loop {
                    let bytes = match conn.next_buffered() {
                        Ok(Some(Received::Frame(b))) => b,
                        Ok(None) => break,
                        Ok(Some(Received::Closed(code))) => {
                            result.closed = Some(code);
                            end = true;
                            break;
                        }
                        Err(e) => {
                            result.closed = Some(None);
                            result.error = Some(format!("{}: {e:#}", spec.user));
                            end = true;
                            break;
                        }
                    };
                    match wire::peek(encoding, bytes) {
                        Peek::Message(m) => {
                            result.check.message(m.pos, m.seq);
                            if spec.counted {
                                counted += 1;
                                if let Some(sent_at) = wire::body_sent_at(&m.body) {
                                    let now = *now.get_or_insert_with(|| {
                                        shared.epoch.elapsed().as_nanos() as u64
                                    });
                                    latencies.push(now.saturating_sub(sent_at));
                                }
                            }
                        }
                        Peek::OtherPush { pos } => {
                            // Membership, presence ...: only the position matters here.
                            result.check.push(pos);
                        }
                        Peek::Other => {
                            let frame = match wire::decode(encoding, bytes) {
                                Ok(f) => f,
                                Err(e) => {
                                    result.error.get_or_insert(format!("{}: {e:#}", spec.user));
                                    continue;
                                }
                            };
                            if frame.pos > 0 {
                                result.check.push(frame.pos);
                            }
                            match (frame.kind, report.as_mut()) {
                                (Some(Kind::Sent(s)), Some(r)) if frame.id != 0 => {
                                    outstanding = outstanding.saturating_sub(1);
                                    if s.duplicate {
                                        r.errors += 1;
                                        r.error_sample.get_or_insert(format!("send acked as duplicate: seq {}", s.seq));
                                    } else {
                                        r.seqs.push(s.seq);
                                    }
                                }
                                (Some(Kind::Error(e)), Some(r)) if frame.id != 0 => {
                                    outstanding = outstanding.saturating_sub(1);
                                    r.errors += 1;
                                    r.error_sample.get_or_insert(format!("{}: send failed: {} ({})", spec.user, e.message, e.code));
                                }
                                (Some(Kind::Disconnect(d)), _) => {
                                    result.error.get_or_insert(format!("{}: disconnect {} {}", spec.user, d.code, d.reason));
                                }
                                (Some(Kind::Error(e)), _) => {
                                    result.error.get_or_insert(format!("{}: error {} ({})", spec.user, e.message, e.code));
                                }
                                _ => {}
                            }
                            if started && !sending && outstanding == 0 {
                                if let Some(r) = report.take() {
                                    let _ = acks.send(r);
                                }
                            }
                        }
                    }
                }
                shared.progress[i].store(result.check.last_seq, Ordering::Relaxed);
                if counted > 0 {
                    shared.delivered.add(shard, counted);
                    shared.latency.record_all(shard, &latencies);
                    latencies.clear();
                }
                if end || shared.stopping.load(Ordering::Acquire) {
                    break;
                }
                let last_pos = result.check.last_pos;
                if ack_every > 0 && last_pos >= last_acked + ack_every {
                    last_acked = last_pos;
                    let ack = Cmd::Ack(proto::Ack { pos: last_pos });
                    if let Err(e) = conn.send(ack).await {
                        result.closed = Some(None);
                        result.error = Some(format!("{}: {e:#}", spec.user));
                        break;
                    }
                }
            }
            _ = &mut publish_over, if sending => {
                sending = false;
                if outstanding == 0 {
                    if let Some(r) = report.take() {
                        let _ = acks.send(r);
                    }
                }
            }
            scheduled = tick(&mut schedule), if sending => {
                if Instant::now() >= until || sent >= quota {
                    sending = false;
                    if outstanding == 0 {
                        if let Some(r) = report.take() {
                            let _ = acks.send(r);
                        }
                    }
                    continue;
                }
                // The body carries the *scheduled* send time, not the actual one: a
                // generator that falls behind (or a server that stalls its reads) then
                // shows up in the latency instead of hiding it (coordinated omission).
                // How late the generator itself was is recorded apart.
                let now = Instant::now();
                let scheduled = scheduled.into_std().min(now);
                let at = scheduled.saturating_duration_since(shared.epoch).as_nanos() as u64;
                shared
                    .send_lag
                    .record(shard, now.duration_since(scheduled).as_nanos() as u64);
                let send = proto::Send {
                    room: room.clone(),
                    client_msg_id: format!("{}-{sent}", spec.user),
                    body: wire::body(at, shared.plan.body_bytes),
                    ..Default::default()
                };
                if let Err(e) = conn.send(Cmd::Send(send)).await {
                    result.closed = Some(None);
                    result.error = Some(format!("{}: {e:#}", spec.user));
                    break;
                }
                sent += 1;
                outstanding += 1;
                shared.sent.fetch_add(1, Ordering::Relaxed);
            }
            _ = shared.stopped(i) => break,
        }
    }
    if let Some(mut r) = report.take() {
        r.unacked = outstanding;
        let _ = acks.send(r);
    }
    conn.close().await;
    result
}

/// The next tick of a publishing schedule (never, without one): the instant the send
/// was scheduled for (in `Burst` mode a late tick returns its own, earlier instant).
async fn tick(schedule: &mut Option<tokio::time::Interval>) -> tokio::time::Instant {
    match schedule {
        Some(s) => s.tick().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::DeliveryCheck;
    use crate::{
        wire::{self, Peek},
        ws_transport::FrameReader,
    };
    use parley::{
        codec::{Encoding, Push},
        proto::{Message, server_frame::Kind},
    };

    /// Server frames as they come off the wire: message pushes (pos, seq) in both
    /// encodings, each in an unmasked WebSocket frame, read back in pieces of `chunk`
    /// bytes through the generator's frame reader and checked as a member checks them.
    fn through_the_reader(
        encoding: Encoding,
        pushes: &[(u64, u64)],
        chunk: usize,
    ) -> DeliveryCheck {
        let mut wire_bytes = Vec::new();
        for &(pos, seq) in pushes {
            let body = wire::body(42, 100 + seq as usize * 10);
            let payload = Push::new(Kind::Message(Message {
                room: "r".into(),
                seq,
                body,
                ..Default::default()
            }))
            .frame(encoding, pos);
            let opcode = match encoding {
                Encoding::Proto => 0x82,
                Encoding::Json => 0x81,
            };
            wire_bytes.push(opcode);
            match payload.len() {
                n @ 0..=125 => wire_bytes.push(n as u8),
                n => {
                    wire_bytes.push(126);
                    wire_bytes.extend_from_slice(&(n as u16).to_be_bytes());
                }
            }
            wire_bytes.extend_from_slice(&payload);
        }
        let mut reader = FrameReader::with_capacity(256);
        let mut check = DeliveryCheck::new(10);
        for piece in wire_bytes.chunks(chunk) {
            reader.extend(piece);
            while let Some(f) = reader.next_frame().unwrap() {
                let Peek::Message(m) = wire::peek(encoding, f.payload) else {
                    panic!("not a message push");
                };
                assert_eq!(wire::body_sent_at(&m.body), Some(42));
                check.message(m.pos, m.seq);
            }
        }
        check
    }

    /// The whole receive path (frame reader, peek, check) counts what a server got
    /// wrong, however the frames were split across reads.
    #[test]
    fn the_frame_reader_path_counts_drops_and_duplicates() {
        for encoding in [Encoding::Proto, Encoding::Json] {
            for chunk in [1, 7, 100, 4096] {
                let clean =
                    through_the_reader(encoding, &[(1, 11), (2, 12), (3, 13), (4, 14)], chunk);
                assert!(clean.ok(14), "{encoding:?} {chunk}: {clean:?}");
                let dropped = through_the_reader(encoding, &[(1, 11), (2, 13), (3, 14)], chunk);
                assert_eq!(dropped.lost(14), 1, "{encoding:?} {chunk}");
                let duplicated =
                    through_the_reader(encoding, &[(1, 11), (2, 12), (3, 12), (4, 13)], chunk);
                assert_eq!(duplicated.duplicates, 1, "{encoding:?} {chunk}");
                let reordered = through_the_reader(encoding, &[(1, 11), (2, 13), (3, 12)], chunk);
                assert!(!reordered.ok(13), "{encoding:?} {chunk}");
                let pos_gap = through_the_reader(encoding, &[(1, 11), (3, 12)], chunk);
                assert_eq!(pos_gap.pos_errors, 1, "{encoding:?} {chunk}");
            }
        }
    }

    /// Feeds (pos, seq) message pushes to a fresh check (room at seq 10 on join).
    fn check(deliveries: &[(u64, u64)]) -> DeliveryCheck {
        let mut c = DeliveryCheck::new(10);
        for &(pos, seq) in deliveries {
            c.message(pos, seq);
        }
        c
    }

    #[test]
    fn a_clean_run_passes() {
        let c = check(&[(1, 11), (2, 12), (3, 13)]);
        assert!(c.ok(13), "{c:?}");
        // Still waiting for 14 is not ok.
        assert!(!c.ok(14));
        assert_eq!(c.lost(14), 1);
    }

    #[test]
    fn a_dropped_delivery_fails() {
        let c = check(&[(1, 11), (2, 13)]);
        assert_eq!(c.lost(13), 1);
        assert!(!c.ok(13));
    }

    #[test]
    fn a_duplicated_delivery_fails() {
        let c = check(&[(1, 11), (2, 12), (3, 12), (4, 13)]);
        assert_eq!(c.duplicates, 1);
        assert!(!c.ok(13));
    }

    #[test]
    fn a_reordered_delivery_fails() {
        let c = check(&[(1, 11), (2, 13), (3, 12)]);
        assert!(c.duplicates + c.lost(13) > 0);
        assert!(!c.ok(13));
    }

    #[test]
    fn a_position_gap_fails() {
        let mut c = check(&[(1, 11)]);
        c.push(3);
        c.message(4, 12);
        assert_eq!(c.pos_errors, 1);
        assert!(!c.ok(12));
    }
}
