//! The one outbox of a transport connection: everything the connection must send, in the
//! order it must be sent — replies, pushes, heartbeats and the final close — as one
//! stream of [`Out`] items. WebSocket, SSE, long-poll and the HTTP command endpoint only
//! turn these into bytes and write them; every decision about delivery, acks, timeouts
//! and closing is made here.
//!
//! Order: queued replies first, then a close once one is decided, then replies that
//! became ready (pipelined sends whose commit finished), then the session's pushes. So a
//! sender sees its `sent` before its own message.
//!
//! Dropping the outbox detaches the session (the grace period starts): whatever way the
//! transport ends — closed, errored, cancelled, panicked — the session never stays
//! attached to a connection that is gone.
//!
//! Owns: reply queue, pipelined replies, heartbeat and silence timers, auth deadline,
//! shutdown. Not: bytes, framing, sockets (`transport`).

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::{FutureExt, StreamExt, stream::FuturesOrdered};

use tokio::{
    sync::futures::OwnedNotified,
    time::{Instant, Sleep, sleep_until},
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::{
    Attachment, Session,
    conn::{CloseReason, Conn, Finished, LaterReply, Outcome, Running, Start},
};
use crate::{
    codec::DecodeError,
    proto::{ClientFrame, ErrorCode, ServerFrame},
};

/// Most pushes handed out at once.
pub const BATCH: usize = 256;
/// [`Outbox::ready`] looks at the shutdown token every this many calls. A waiting
/// connection sees shutdown at once (its wait includes the token); this check is for one
/// that never waits because pushes keep coming, and the token's check takes a lock that
/// every connection shares, so it is not made on every delivery wake-up.
const SHUTDOWN_EVERY: u8 = 16;
/// Most commands one connection may have waiting for their replies by default (read
/// and waiting to run, running, pipelined sends waiting for their commit); past it the
/// transport stops reading, which pushes back on the client (`ws.max_commands_in_flight`).
pub const MAX_IN_FLIGHT: usize = 64;

/// What to send next.
pub enum Out {
    /// A reply or an error frame (no position).
    Frame(ServerFrame),
    /// Pushes in position order (each frame carries its position).
    Pushes(super::Pushes),
    /// Nothing was sent for an idle interval: send the transport's keep-alive (WebSocket
    /// ping, SSE comment) — or, for a long-poll, end the request empty.
    Idle,
    /// The last item: send `why.frame()` (the `disconnect` frame) and close with
    /// `why.code()`. Nothing follows.
    Close(CloseReason),
}

/// Timers of one outbox.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutboxConfig {
    /// Yield [`Out::Idle`] every this long (None: never): the heartbeat cadence, or a
    /// long-poll's hold time.
    pub idle: Option<Duration>,
    /// Close with 4009 when nothing was received for this long (checked when idle).
    pub silence_limit: Option<Duration>,
    /// Close with 4002 when no `connect` succeeded by then.
    pub connect_deadline: Option<Instant>,
    /// After pushes wake an idle connection, wait this long before taking them, so
    /// pushes arriving together leave in one write (`ws.coalesce`; zero: at once).
    pub coalesce: Duration,
    /// Most commands in flight (see [`MAX_IN_FLIGHT`]); 0 means [`MAX_IN_FLIGHT`].
    pub max_in_flight: usize,
}

/// [`OutboxConfig`] and the outbox's instants, in milliseconds (every byte here is paid
/// by every idle connection: 48 B, where durations and `Instant`s took 80).
///
/// An instant is kept as whole milliseconds after `base`, the outbox's own (4 B, not an
/// `Instant`'s 16), rounded up: a timer armed at a deadline never fires before it, and a
/// sign of life is never taken as older than it was. One base per outbox, not one for
/// the process: a runtime with a paused clock (tests) has instants of its own. Past
/// `u32`'s reach (the base ~49 days behind), [`Timers::rebase`] moves the base up.
struct Timers {
    base: Instant,
    idle_ms: u32,
    silence_ms: u32,
    coalesce_ms: u32,
    /// Instants, after `base` (`NONE`: none).
    connect_deadline: u32,
    next_idle: u32,
    /// Until when pushes wait to leave together (see `OutboxConfig::coalesce`).
    coalescing: u32,
    last_seen: u32,
}

impl Timers {
    const NONE: u32 = u32::MAX;
    /// How far back the base goes when it moves (~24.8 days before the instant that
    /// moved it): a sign of life older than that reads as that old.
    const REACH_MS: u64 = 1 << 31;

    fn ms(d: Option<Duration>) -> u32 {
        d.map_or(Self::NONE, |d| {
            d.as_millis().min(u32::MAX as u128 - 1) as u32
        })
    }

    fn get(ms: u32) -> Option<Duration> {
        (ms != Self::NONE).then(|| Duration::from_millis(ms.into()))
    }

    fn new(c: &OutboxConfig, now: Instant) -> Self {
        let mut timers = Self {
            base: now,
            idle_ms: Self::ms(c.idle),
            silence_ms: Self::ms(c.silence_limit),
            coalesce_ms: Self::ms(Some(c.coalesce).filter(|d| !d.is_zero())),
            connect_deadline: Self::NONE,
            next_idle: Self::NONE,
            coalescing: Self::NONE,
            last_seen: 0,
        };
        timers.connect_deadline = timers.after(c.connect_deadline);
        timers.next_idle = timers.after(c.idle.map(|d| now + d));
        timers
    }

    /// The instant `ms` stands for (`None` for `NONE`).
    fn at(&self, ms: u32) -> Option<Instant> {
        (ms != Self::NONE).then(|| self.base + Duration::from_millis(ms.into()))
    }

    /// `at` as milliseconds after the base, rounded up (`NONE` for `None`; an instant
    /// before the base reads as the base). Moves the base first when `at` is out of reach.
    fn after(&mut self, at: Option<Instant>) -> u32 {
        let Some(at) = at else {
            return Self::NONE;
        };
        let ms = Self::ceil_ms(at.saturating_duration_since(self.base));
        if ms < u64::from(Self::NONE) {
            return ms as u32;
        }
        self.rebase(ms - Self::REACH_MS);
        Self::REACH_MS as u32
    }

    fn ceil_ms(d: Duration) -> u64 {
        let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
        ms.min(u64::MAX as u128) as u64
    }

    /// Moves the base `shift` ms later; each instant keeps its place, one before the new
    /// base reading as the base.
    fn rebase(&mut self, shift: u64) {
        self.base += Duration::from_millis(shift);
        for ms in [
            &mut self.connect_deadline,
            &mut self.next_idle,
            &mut self.coalescing,
            &mut self.last_seen,
        ] {
            if *ms != Self::NONE {
                *ms = u64::from(*ms).saturating_sub(shift) as u32;
            }
        }
    }

    fn set_next_idle(&mut self, at: Option<Instant>) {
        self.next_idle = self.after(at);
    }

    fn set_coalescing(&mut self, until: Option<Instant>) {
        self.coalescing = self.after(until);
    }

    fn see(&mut self, now: Instant) {
        self.last_seen = self.after(Some(now));
    }

    fn next_idle(&self) -> Option<Instant> {
        self.at(self.next_idle)
    }

    fn coalescing(&self) -> Option<Instant> {
        self.at(self.coalescing)
    }

    /// How long since the last sign of life.
    fn silent_for(&self, now: Instant) -> Duration {
        let seen = self.base + Duration::from_millis(self.last_seen.into());
        now.saturating_duration_since(seen)
    }
}

pub struct Outbox {
    conn: Conn,
    replies: VecDeque<ServerFrame>,
    /// Pipelined replies waiting for their commit; allocated on the first one (most
    /// connections never pipeline, and an idle connection should cost little).
    later: Option<Box<FuturesOrdered<LaterReply>>>,
    /// The command running beside the writer ([`Outbox::submit`]), if any.
    running: Option<Running>,
    /// Commands read while another ran, in order; allocated when the first waits.
    /// Boxed: 8 bytes in every idle connection rather than a `VecDeque`'s 32.
    #[allow(clippy::box_collection)]
    waiting: Option<Box<VecDeque<Result<ClientFrame, DecodeError>>>>,
    max_in_flight: u16,
    closing: Option<CloseReason>,
    closed: bool,
    /// [`Outbox::ready`] found nothing, and nothing has changed since but what a wait
    /// would see (a push wakes, a timer fires): `next` may wait at once instead of
    /// looking again (saves a session lock per delivery wake-up).
    drained: bool,
    /// Counts [`Outbox::ready`] calls, to look at the shutdown token only every
    /// [`SHUTDOWN_EVERY`]th time (see there).
    looks: u8,
    /// The timers and instants, compact (every byte here is paid by every idle
    /// connection).
    timers: Timers,
    shutdown: CancellationToken,
    /// The shutdown wait and the one timer, in one allocation (see [`Waits`]); `None`
    /// for an outbox whose waits live in its caller's pinned future
    /// ([`Outbox::apart`], [`Wait::poll_next_in`]).
    waits: Option<Pin<Box<Waits>>>,
    /// Whether `waits.timer` is armed at its deadline (not fired since): its own deadline
    /// says when, so no second copy of the instant is kept (16 B per connection).
    timer_armed: bool,
}

impl Outbox {
    pub fn new(conn: Conn, config: OutboxConfig, shutdown: CancellationToken) -> Self {
        let mut outbox = Self::without_waits(conn, config, shutdown);
        outbox.waits = Some(Box::pin(outbox.new_waits()));
        outbox
    }

    /// An outbox and its [`Waits`] apart, for a caller that keeps the two side by side
    /// in one pinned future and waits with [`Wait::poll_next_in`], always with these
    /// `Waits` (a pending long-poll: no box of the outbox's own, one allocation fewer).
    pub fn apart(conn: Conn, config: OutboxConfig, shutdown: CancellationToken) -> (Self, Waits) {
        let outbox = Self::without_waits(conn, config, shutdown);
        let waits = outbox.new_waits();
        (outbox, waits)
    }

    fn new_waits(&self) -> Waits {
        Waits {
            timer: sleep_until(Instant::now()),
            shutdown: self.shutdown.clone().cancelled_owned(),
        }
    }

    fn without_waits(conn: Conn, config: OutboxConfig, shutdown: CancellationToken) -> Self {
        Self {
            conn,
            replies: VecDeque::new(),
            later: None,
            running: None,
            waiting: None,
            max_in_flight: match config.max_in_flight {
                0 => MAX_IN_FLIGHT,
                n => n,
            }
            .min(u16::MAX as usize) as u16,
            closing: None,
            closed: false,
            drained: false,
            looks: 0,
            timers: Timers::new(&config, Instant::now()),
            waits: None,
            shutdown,
            timer_armed: false,
        }
    }

    pub fn session(&self) -> Option<&Arc<Session>> {
        self.conn.session()
    }

    /// The server's metrics (for a transport that counts without a handle of its own).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        self.conn.metrics()
    }

    /// The server's configuration (for a transport that reads it without a handle of
    /// its own).
    pub fn config(&self) -> &crate::config::Config {
        self.conn.config()
    }

    /// Whether the transport should read more client frames: not closing, and not too
    /// many replies pending.
    pub fn accepting(&self) -> bool {
        self.closing.is_none() && !self.closed && self.in_flight() < usize::from(self.max_in_flight)
    }

    /// Whether the outbox is done: it handed out [`Out::Close`] (or the client closed on
    /// purpose). Nothing more comes out of it.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Whether something is queued or pending (a reply will come).
    pub fn expecting(&self) -> bool {
        !self.replies.is_empty() || self.in_flight() > 0 || self.closing.is_some()
    }

    /// Commands read whose reply has not been handed out yet.
    fn in_flight(&self) -> usize {
        self.later.as_ref().map_or(0, |l| l.len())
            + usize::from(self.running.is_some())
            + self.waiting.as_ref().map_or(0, |w| w.len())
    }

    /// Takes one client frame (or why it could not be decoded) to run beside the writer:
    /// it starts at once unless a command is running, else it waits its turn (commands
    /// run one at a time, in order, so replies keep the order of their commands; only
    /// pipelined sends answer when their commit is done). Its reply comes out of
    /// [`Outbox::next`] / [`Outbox::ready`]; pushes and heartbeats go on meanwhile.
    pub fn submit(&mut self, frame: Result<ClientFrame, DecodeError>) {
        self.seen();
        self.drained = false;
        if !self.accepting() {
            return;
        }
        if self.running.is_some() || self.waiting.as_ref().is_some_and(|w| !w.is_empty()) {
            self.waiting.get_or_insert_default().push_back(frame);
            return;
        }
        self.begin(frame);
    }

    /// Starts one command; its outcome is applied at once if it has one.
    fn begin(&mut self, frame: Result<ClientFrame, DecodeError>) {
        match frame {
            Ok(f) => match self.conn.start(f) {
                Start::Done(outcome) => self.apply(outcome),
                Start::Running(run) => self.running = Some(run),
            },
            Err(e) => self.apply(Outcome::Reply(self.conn.bad_frame(e))),
        }
    }

    /// The running command ended: its outcome, then the commands that waited, until one
    /// runs again.
    fn ran(&mut self, finished: Finished) {
        self.running = None;
        self.drained = false;
        let outcome = self.conn.finish(finished);
        self.apply(outcome);
        while self.running.is_none() && !self.closed && self.closing.is_none() {
            let Some(next) = self.waiting.as_mut().and_then(|w| w.pop_front()) else {
                break;
            };
            self.begin(next);
        }
        if self.waiting.as_ref().is_some_and(|w| w.is_empty()) {
            self.waiting = None;
        }
    }

    fn apply(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Reply(reply) => self.replies.push_back(reply),
            Outcome::Silent => {}
            Outcome::Later(reply) => self.later.get_or_insert_default().push_back(reply),
            Outcome::Close(reply, why) => {
                self.replies.push_back(reply);
                self.close(why);
            }
        }
    }

    /// Lets the running command finish (the connection is ending): a command is never
    /// cut off halfway (a `connect` binds its session, so dropping the outbox detaches
    /// it). Commands that waited are dropped unrun.
    pub async fn settle(&mut self) {
        self.waiting = None;
        if let Some(run) = self.running.take() {
            let finished = run.await;
            let outcome = self.conn.finish(finished);
            drop(outcome);
        }
    }

    /// The client showed a sign of life (any frame, pongs included).
    pub fn seen(&mut self) {
        self.timers.see(Instant::now());
    }

    /// Runs one client frame (or reports why it could not be decoded); its reply, if
    /// any, comes out of [`Outbox::next`].
    pub async fn receive(&mut self, frame: Result<ClientFrame, DecodeError>) {
        self.seen();
        self.drained = false;
        if !self.accepting() {
            return;
        }
        let outcome = match frame {
            // Boxed: the command's state lives on the heap while it runs, not in every
            // idle connection's future.
            Ok(f) => Box::pin(self.conn.handle(f)).await,
            Err(e) => Outcome::Reply(self.conn.bad_frame(e)),
        };
        self.apply(outcome);
    }

    /// A client frame over `max` bytes: an error, then close 1009.
    pub fn too_large(&mut self, max: usize) {
        self.seen();
        self.drained = false;
        let frame = self.conn.error(
            ErrorCode::FrameTooLarge,
            format!("frame exceeds {max} bytes"),
        );
        self.replies.push_back(frame);
        self.close(CloseReason::FrameTooLarge);
    }

    /// The client closed on purpose: end the session now (no resume will come).
    pub fn client_closed(&mut self) {
        self.drained = false;
        self.conn.end();
        self.closed = true;
    }

    /// A watch that resolves when this connection can no longer deliver its session: the
    /// session died (its queue overflowed while a write was blocked, say) or another
    /// transport took it over. A transport races its blocked writes against it, so the
    /// queue bound holds even while the socket does not drain.
    pub fn loss(&self) -> Loss<'_> {
        // Borrowed: made for every write, looked at only when a write blocks.
        Loss(self.conn.session().zip(self.conn.attachment()))
    }

    /// Decides to close (the first reason wins).
    pub fn close(&mut self, why: CloseReason) {
        self.drained = false;
        if self.closing.is_none() && !self.closed {
            self.closing = Some(why);
        }
    }

    /// What can be sent right now, without waiting (`None`: nothing yet, or closed).
    /// A transport that just wrote calls this to write on before it waits again.
    pub fn ready(&mut self) -> Option<Out> {
        self.drained = false;
        loop {
            if self.closed {
                return None;
            }
            if let Some(finished) = self.running.as_mut().and_then(|r| r.now_or_never()) {
                self.ran(finished);
            }
            if let Some(frame) = self.replies.pop_front() {
                if self.replies.is_empty() {
                    // Give the buffer back: most connections queue a reply now and then,
                    // and an idle one should not keep room for four.
                    self.replies = VecDeque::new();
                }
                return Some(Out::Frame(frame));
            }
            if let Some(why) = self.closing.take() {
                self.closed = true;
                return Some(Out::Close(why));
            }
            self.looks = self.looks.wrapping_add(1);
            if self.looks % SHUTDOWN_EVERY == 0 && self.shutdown.is_cancelled() {
                self.close(CloseReason::ShuttingDown);
                continue;
            }
            if let Some(later) = self.later.as_mut().filter(|l| !l.is_empty())
                && let Some(Some(reply)) = later.next().now_or_never()
            {
                return Some(Out::Frame(reply));
            }
            if self
                .timers
                .coalescing()
                .is_some_and(|until| until <= Instant::now())
            {
                self.timers.set_coalescing(None);
            }
            if self.timers.coalescing == Timers::NONE {
                match self.conn.take(BATCH) {
                    Ok(pushes) if !pushes.is_empty() => return Some(Out::Pushes(pushes)),
                    Ok(_) => {}
                    Err(why) => {
                        self.close(why);
                        continue;
                    }
                }
            }
            self.drained = true;
            return None;
        }
    }

    /// The next thing to send. Cancel-safe: nothing is lost when the returned future is
    /// dropped before it resolves. After [`Out::Close`] it never resolves.
    ///
    /// A hand-written future ([`Next`]), not an `async fn`: an idle connection's task
    /// holds it while it waits, and an `async fn` would hold its sub-futures (the
    /// `select!` over the timer, the pushes' wake-up, the running command, the pipelined
    /// replies and the shutdown signal, each in its own `async` block) and its locals
    /// side by side. `Next` holds the outbox, the wake-up registration and
    /// whether the timer is armed; everything else it polls in place, where it lives.
    // Not `Iterator::next`: it returns a future (what every transport awaits).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Next<'_> {
        Next {
            outbox: self,
            wait: Wait::new(),
        }
    }

    /// One look at what ends a wait, in this order (the old `select!`'s, biased): the
    /// timer first, so that a connection that is always woken still gets its heartbeat
    /// and silence check; shutdown last, so that a connection woken by pushes (the common
    /// case, once per delivery batch) returns without polling it — its poll takes the
    /// token's lock, shared by every connection (`Outbox::ready` looks at the token too).
    fn poll_wait(
        &mut self,
        mut waits: Pin<&mut Waits>,
        woken: Pin<&mut Option<OwnedNotified>>,
        timer_on: bool,
        cx: &mut Context<'_>,
    ) -> Poll<Event> {
        if timer_on && waits.as_mut().project().timer.poll(cx).is_ready() {
            return Poll::Ready(Event::Timer);
        }
        if let Some(woken) = woken.as_pin_mut()
            && woken.poll(cx).is_ready()
        {
            return Poll::Ready(Event::Woken);
        }
        if let Some(later) = self.later.as_deref_mut().filter(|l| !l.is_empty())
            && let Poll::Ready(Some(reply)) = later.poll_next_unpin(cx)
        {
            return Poll::Ready(Event::Reply(reply));
        }
        if let Some(running) = self.running.as_mut()
            && let Poll::Ready(finished) = running.as_mut().poll(cx)
        {
            return Poll::Ready(Event::Ran(finished));
        }
        if waits.project().shutdown.poll(cx).is_ready() {
            return Poll::Ready(Event::Shutdown);
        }
        Poll::Pending
    }

    /// Sets up one wait: arms the one timer for the nearest deadline (an idle
    /// connection holds one timer, not three: connect, idle, and the end of a coalescing
    /// pause) and registers for the pushes' wake-up. Returns whether the timer is armed.
    fn arm(&mut self, waits: Pin<&mut Waits>, mut woken: Pin<&mut Option<OwnedNotified>>) -> bool {
        let wake = [
            self.connect_deadline(),
            self.timers.next_idle(),
            self.timers.coalescing(),
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(at) = wake
            && !(self.timer_armed && waits.timer.deadline() == at)
        {
            waits.project().timer.reset(at);
            self.timer_armed = true;
        }
        // While coalescing, pushes wait for the timer, not for their wake-up.
        woken.set(
            self.conn
                .attachment()
                .filter(|_| self.timers.coalescing == Timers::NONE)
                .map(Attachment::woken),
        );
        wake.is_some()
    }

    /// The connect deadline, while it is in force (not connected yet). The same during a
    /// wait and when it ends: nothing changes the connection meanwhile.
    fn connect_deadline(&self) -> Option<Instant> {
        self.timers
            .at(self.timers.connect_deadline)
            .filter(|_| !self.conn.is_connected())
    }

    /// What a wait's end means: `Some` to hand out, `None` to look again.
    fn on_event(&mut self, event: Event) -> Option<Out> {
        match event {
            Event::Shutdown => self.close(CloseReason::ShuttingDown),
            Event::Reply(reply) => return Some(Out::Frame(reply)),
            Event::Ran(finished) => self.ran(finished),
            Event::Woken => {
                if let Some(coalesce) = Timers::get(self.timers.coalesce_ms) {
                    self.timers.set_coalescing(Some(Instant::now() + coalesce));
                }
            }
            Event::Timer => {
                // Fired: the next wait arms it anew, even for the same instant.
                self.timer_armed = false;
                let now = Instant::now();
                if self.connect_deadline().is_some_and(|d| d <= now) {
                    let frame = self
                        .conn
                        .error(ErrorCode::AuthTimeout, "no connect within the auth timeout");
                    self.replies.push_back(frame);
                    self.close(CloseReason::AuthTimeout);
                    return None;
                }
                if self.timers.next_idle().is_none_or(|d| d > now) {
                    // The end of a coalescing pause (or an early wake-up).
                    return None;
                }
                if self.running.is_some() {
                    // The server is the slow one: the client is not to blame for the
                    // frames not read meanwhile.
                    self.seen();
                }
                if Timers::get(self.timers.silence_ms)
                    .is_some_and(|limit| self.timers.silent_for(now) >= limit)
                {
                    self.close(CloseReason::HeartbeatTimeout);
                    return None;
                }
                let next = Timers::get(self.timers.idle_ms).map(|d| now + d);
                self.timers.set_next_idle(next);
                return Some(Out::Idle);
            }
        }
        None
    }
}

pin_project_lite::pin_project! {
    /// What every outbox waits on besides its session, in one box (every idle connection
    /// pays a box's allocator overhead and pointer, so one rather than two): both must
    /// stay pinned while registered, and the outbox itself is moved around. A caller
    /// that is pinned itself holds them inline instead ([`Outbox::apart`]).
    pub struct Waits {
        // The one timer (connect deadline, heartbeat, coalescing), armed at its
        // deadline and re-armed only when that changes: a fresh timer per wait would
        // cost a timer-wheel insert and remove per delivery wake-up.
        #[pin]
        timer: Sleep,
        // Waits for the shutdown signal. Registered once, not on every wait: all
        // connections wait on the same token, whose waiter list has one lock.
        #[pin]
        shutdown: WaitForCancellationFutureOwned,
    }
}

/// Where a [`Next`] is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Not polled yet.
    New,
    /// Looks at what is ready before it waits.
    Look,
    /// Waits (the timer is armed and the wake-up registered).
    Wait,
}

pin_project_lite::pin_project! {
    /// The future of [`Outbox::next`]. Dropping it loses nothing: the outbox keeps every
    /// state, and a dropped wake-up registration that had been woken passes its wake-up
    /// on (tokio's `Notify`), so the next wait sees it.
    pub struct Next<'a> {
        outbox: &'a mut Outbox,
        #[pin]
        wait: Wait,
    }
}

impl Future for Next<'_> {
    type Output = Out;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Out> {
        let this = self.project();
        this.wait.poll_next(this.outbox, cx)
    }
}

pin_project_lite::pin_project! {
    /// A wait's own state, apart from the outbox it waits on: [`Next`] is this and a
    /// borrow of the outbox. A future that owns its outbox keeps the two side by side
    /// (`transport::poll`'s pending poll: a future with a name, no box of its own) and
    /// polls this with [`Wait::poll_next`]. The same guarantees as [`Next`]'s.
    pub struct Wait {
        step: Step,
        timer_on: bool,
        // The pushes' wake-up, registered while waiting.
        #[pin]
        woken: Option<OwnedNotified>,
    }
}

impl Default for Wait {
    fn default() -> Self {
        Self::new()
    }
}

impl Wait {
    /// A wait not polled yet.
    pub fn new() -> Self {
        Self {
            step: Step::New,
            timer_on: false,
            woken: None,
        }
    }

    /// [`Next`]'s poll: always the same `outbox` for one `Wait`, waiting on the
    /// outbox's own [`Waits`].
    pub fn poll_next(self: Pin<&mut Self>, outbox: &mut Outbox, cx: &mut Context<'_>) -> Poll<Out> {
        // Taken out for the poll (the outbox is borrowed beside it). An outbox made
        // [`Outbox::apart`] gets a box here if it is ever waited on this way (a fresh
        // timer's deadline is not the armed one, so the next wait arms it anew).
        let mut waits = match outbox.waits.take() {
            Some(waits) => waits,
            None => Box::pin(outbox.new_waits()),
        };
        let polled = self.poll_next_in(outbox, waits.as_mut(), cx);
        outbox.waits = Some(waits);
        polled
    }

    /// [`Wait::poll_next`] on `waits` held by the caller: always the same `outbox` and
    /// `waits` for one `Wait` (those [`Outbox::apart`] made together).
    pub fn poll_next_in(
        self: Pin<&mut Self>,
        outbox: &mut Outbox,
        mut waits: Pin<&mut Waits>,
        cx: &mut Context<'_>,
    ) -> Poll<Out> {
        let mut this = self.project();
        loop {
            if *this.step != Step::Wait {
                if outbox.closed {
                    // Never resolves (nothing follows a close).
                    return Poll::Pending;
                }
                // Just looked (the transport wrote until `ready` said nothing): wait
                // first.
                let look = *this.step == Step::Look || !std::mem::take(&mut outbox.drained);
                if look && let Some(out) = outbox.ready() {
                    return Poll::Ready(out);
                }
                *this.timer_on = outbox.arm(waits.as_mut(), this.woken.as_mut());
                *this.step = Step::Wait;
            }
            let event = std::task::ready!(outbox.poll_wait(
                waits.as_mut(),
                this.woken.as_mut(),
                *this.timer_on,
                cx
            ));
            this.woken.set(None);
            *this.step = Step::Look;
            if let Some(out) = outbox.on_event(event) {
                return Poll::Ready(out);
            }
        }
    }
}

/// What ended a wait.
enum Event {
    Shutdown,
    Reply(ServerFrame),
    /// The running command ended.
    Ran(Finished),
    /// The session has pushes (or was revoked, or died).
    Woken,
    Timer,
}

/// See [`Outbox::loss`].
pub struct Loss<'a>(Option<(&'a Arc<Session>, &'a Attachment)>);

impl Loss<'_> {
    /// Resolves when the session is lost to this connection; never for a connection
    /// that delivers nothing.
    pub async fn lost(self) {
        let Some((session, attachment)) = self.0 else {
            return std::future::pending().await;
        };
        // Taking nothing only reports whether the attachment is still current. A wake
        // consumed here is harmless: `next` always looks at the queue before waiting.
        while session.take(attachment, 0).is_current() {
            attachment.ready().await;
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.conn.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The wait's behaviour (cancel safety, idle timer, shutdown) is tested in
    // tests/outbox.rs: it needs a whole core, which only the server layer assembles.

    /// What every connection holds inline, and its one box for the shutdown wait and the
    /// timer (two boxes before, of 112 and 72 B: the outbox was 224 B, and glibc paid
    /// 128 + 80 B of chunks for what is now one chunk of 192). 216 B until its instants
    /// were kept as milliseconds after a base (`Timers`).
    #[test]
    fn the_outbox_stays_small() {
        let outbox = std::mem::size_of::<Outbox>();
        let waits = std::mem::size_of::<Waits>();
        eprintln!(
            "Outbox {outbox} B, its Waits {waits} B (Sleep {} B, shutdown wait {} B)",
            std::mem::size_of::<Sleep>(),
            std::mem::size_of::<WaitForCancellationFutureOwned>()
        );
        assert!(outbox <= 184, "the outbox is {outbox} bytes");
        assert!(waits <= 184, "the outbox's waits are {waits} bytes");
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Instants as milliseconds after the outbox's base: rounded up, so a deadline's
    /// timer never fires early and a sign of life never reads as older than it was.
    #[test]
    fn timers_keep_instants_rounded_up() {
        let base = Instant::now();
        let config = OutboxConfig {
            idle: Some(ms(25_000)),
            silence_limit: Some(ms(60_000)),
            connect_deadline: Some(base + Duration::from_micros(10_000_300)),
            ..Default::default()
        };
        let mut t = Timers::new(&config, base);
        assert_eq!(t.next_idle(), Some(base + ms(25_000)));
        assert_eq!(t.at(t.connect_deadline), Some(base + ms(10_001)));
        assert_eq!(t.coalescing(), None);
        t.see(base + Duration::from_micros(1_500));
        assert_eq!(t.silent_for(base + ms(2)), Duration::ZERO);
        assert_eq!(t.silent_for(base + ms(60_002)), ms(60_000));
        t.set_coalescing(Some(base + ms(7)));
        assert_eq!(t.coalescing(), Some(base + ms(7)));
        t.set_coalescing(None);
        assert_eq!(t.coalescing(), None);
        // Before the base (a connect deadline computed earlier): the base.
        t.set_next_idle(base.checked_sub(ms(5)));
        assert_eq!(t.next_idle(), Some(base));
    }

    /// A connection older than `u32`'s milliseconds (~49.7 days): the base moves up and
    /// every instant keeps its place; one from before the new base reads as the base.
    #[test]
    fn timers_move_their_base_past_u32s_reach() {
        let base = Instant::now();
        let mut t = Timers::new(
            &OutboxConfig {
                idle: Some(ms(25_000)),
                silence_limit: Some(ms(60_000)),
                connect_deadline: Some(base + ms(10_000)),
                ..Default::default()
            },
            base,
        );
        let day = 24 * 3600 * 1000;
        // 17.3 s before the base's reach ends.
        let now = base + ms(4_294_950_000);
        t.see(now - ms(30_000));
        assert_eq!(t.base, base, "in reach: no move");
        t.set_next_idle(Some(now + ms(25_000)));
        assert!(t.base > base, "out of reach: the base moved");
        assert_eq!(t.next_idle(), Some(now + ms(25_000)));
        assert_eq!(t.silent_for(now), ms(30_000));
        assert_eq!(
            t.at(t.connect_deadline),
            Some(t.base),
            "long past: the new base"
        );
        assert_eq!(t.coalescing(), None, "none stays none");
        // And again, ~50 days later.
        let later = now + ms(50 * day);
        t.see(later);
        t.set_coalescing(Some(later + ms(3)));
        assert_eq!(t.coalescing(), Some(later + ms(3)));
        assert_eq!(t.silent_for(later + ms(1)), ms(1));
    }

    /// What an idle connection's task holds for its wait (the `async fn` it replaced
    /// held 336 B in a debug build).
    #[test]
    fn the_wait_stays_small() {
        let size = std::mem::size_of::<Next<'_>>();
        eprintln!("Next {size} B");
        assert!(size <= 80, "the outbox's wait is {size} bytes");
    }
}
