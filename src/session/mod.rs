//! The transport-agnostic session layer (DESIGN.md, delivery model point 3).
//!
//! A [`Session`] belongs to one authenticated user and outlives its transport: every push
//! gets the next session position; the attached transport takes pushes in position order
//! and the client acknowledges positions; when the transport drops, the session keeps its
//! queue for the grace period, and a resume with the last seen position — on any
//! transport — replays exactly the pushes after it.
//!
//! Memory is bounded twice: pushes not yet written (`max_queue_bytes`, overflow kills the
//! session as a slow consumer) and pushes written but not acknowledged
//! (`replay_buffer_bytes`, overflow forgets the oldest; a resume from before them falls
//! back to log sync). Ephemeral pushes (signals, typing) never count towards the kill:
//! one that finds the unsent queue more than half full is dropped instead, so another
//! user cannot get a session cut by sending it signals.
//!
//! Owns: positions, queues, acks, resume, attach/detach, expiry. Not: sockets or
//! encodings (`transport`), rooms and messages (`chat`).

pub mod conn;
pub mod connect;
pub mod outbox;
mod registry;
pub mod tickets;

pub use conn::{CloseReason, Conn, Outcome};
pub use connect::{ConnectError, ConnectRequest, Core, Credential, Opened};
pub use outbox::{Loss, Out, Outbox, OutboxConfig, Wait, Waits};
pub use registry::{Sessions, TooManySessions};

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use crate::{codec::Push, compact::saturating_u32, delivery::Recipient};

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Death {
    /// Unsent pushes exceeded `max_queue_bytes`.
    SlowConsumer,
    /// Detached for longer than the grace period, or removed.
    Expired,
    /// The client ended it (the `end` command).
    Ended,
}

/// Byte bounds of one session. Kept as `u32`s (the configuration allows at most 1 GiB;
/// a larger bound would read as 4 GiB): with them a [`Session`] is 176 B, so its `Arc`
/// takes jemalloc's 192 B size class, not the 224 B one.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    max_queue_bytes: u32,
    replay_buffer_bytes: u32,
}

impl Limits {
    pub fn new(max_queue_bytes: usize, replay_buffer_bytes: usize) -> Self {
        Self {
            max_queue_bytes: saturating_u32(max_queue_bytes),
            replay_buffer_bytes: saturating_u32(replay_buffer_bytes),
        }
    }

    fn max_queue_bytes(&self) -> usize {
        self.max_queue_bytes as usize
    }

    fn replay_buffer_bytes(&self) -> usize {
        self.replay_buffer_bytes as usize
    }
}

/// A drained queue with room for more entries than this is given back (see `shrink`).
const SHRINK_ABOVE: usize = 16;

/// One held push. Its position is not stored (the queue's positions are contiguous, the
/// last one `next_pos - 1`) nor its cost (the push has it): a session's queue is one
/// pointer per push. During a join burst into a big room every member's queue grows by
/// one entry per later member until the client acknowledges (an SSE client every 5 s),
/// and those grown-and-given-back queues set the heap's high-water mark
/// (docs/BENCHMARKS.md, "Round eight: SSE memory, the replay queue and the join burst").
type Entry = Arc<Push>;

/// The right of one transport to deliver this session's pushes. A newer attach (a resume
/// from another transport) revokes it.
#[derive(Clone)]
pub struct Attachment {
    generation: u64,
    notify: Arc<Notify>,
}

impl Attachment {
    /// Resolves when pushes may be ready, or the attachment was revoked.
    pub async fn ready(&self) {
        self.notify.notified().await
    }

    /// [`Attachment::ready`] as an owned future (for a hand-written future to hold
    /// beside the outbox it borrows).
    pub(crate) fn woken(&self) -> tokio::sync::futures::OwnedNotified {
        self.notify.clone().notified_owned()
    }
}

struct State {
    /// Entries still held: `queue[..sent]` written and not yet acknowledged,
    /// `queue[sent..]` not yet written. Positions are contiguous: `queue[i]` is at
    /// [`State::first_pos`]` + i`.
    queue: VecDeque<Entry>,
    sent: usize,
    next_pos: u64,
    unsent_bytes: usize,
    retained_bytes: usize,
    generation: u64,
    attached: Option<Attachment>,
    /// A push woke the attached transport and it has not taken since: later pushes
    /// need no wake-up of their own (one per batch, not one per push, and no stored
    /// permit that would wake the transport again for pushes it already wrote).
    woken: bool,
    detached_since: Option<Instant>,
    dead: Option<Death>,
}

impl State {
    /// The position of `queue[0]` (of the next push when the queue is empty).
    fn first_pos(&self) -> u64 {
        self.next_pos - self.queue.len() as u64
    }
}

/// Pushes in position order, each with its session position. Up to 4 are held inline:
/// a connection woken by a push usually takes one or a few, without an allocation.
pub type Pushes = smallvec::SmallVec<[(u64, Arc<Push>); 4]>;

/// What a transport gets when it asks for pushes.
pub enum Take {
    /// Pushes in position order (possibly none).
    Pushes(Pushes),
    /// Another transport resumed this session.
    Revoked,
    Dead(Death),
}

impl Take {
    /// Whether the asking transport still holds the session.
    pub fn is_current(&self) -> bool {
        matches!(self, Take::Pushes(_))
    }
}

pub struct Session {
    /// Shared with the registry's key (one allocation per session, not two).
    id: Arc<str>,
    pub(crate) user: Arc<str>,
    recipient_id: u64,
    /// Opened by a listen-only SSE stream: commands other than ack/ping are refused.
    receive_only: std::sync::atomic::AtomicBool,
    limits: Limits,
    state: Mutex<State>,
}

impl Session {
    fn new(id: Arc<str>, user: &str, recipient_id: u64, limits: Limits) -> Self {
        Self {
            id,
            user: user.into(),
            recipient_id,
            receive_only: Default::default(),
            limits,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                sent: 0,
                next_pos: 1,
                unsent_bytes: 0,
                retained_bytes: 0,
                generation: 0,
                attached: None,
                woken: false,
                detached_since: Some(Instant::now()),
                dead: None,
            }),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn user_id(&self) -> &str {
        &self.user
    }

    pub fn set_receive_only(&self) {
        self.receive_only
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_receive_only(&self) -> bool {
        self.receive_only.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn die(state: &mut State, why: Death) {
        if state.dead.is_none() {
            state.dead = Some(why);
        }
        state.queue = VecDeque::new();
        state.sent = 0;
        state.unsent_bytes = 0;
        state.retained_bytes = 0;
        if let Some(a) = &state.attached {
            a.notify.notify_one();
        }
    }

    /// Ends the session (it will be reaped).
    pub fn kill(&self, why: Death) {
        Self::die(&mut self.lock(), why);
    }

    /// Makes the calling transport the one that delivers; revokes any previous one.
    pub fn attach(&self) -> Option<Attachment> {
        let mut s = self.lock();
        if s.dead.is_some() {
            return None;
        }
        Some(Self::attach_locked(&mut s))
    }

    fn attach_locked(s: &mut State) -> Attachment {
        s.generation += 1;
        let attachment = Attachment {
            generation: s.generation,
            notify: Arc::new(Notify::new()),
        };
        if let Some(old) = s.attached.replace(attachment.clone()) {
            old.notify.notify_one();
        }
        s.woken = true;
        s.detached_since = None;
        // Anything already queued is ready for the new transport.
        attachment.notify.notify_one();
        attachment
    }

    /// [`Session::resume_from`] and [`Session::attach`] in one step, so a transport that
    /// is still attached cannot take pushes in between.
    pub fn resume(&self, last_pos: u64) -> Option<Attachment> {
        let mut s = self.lock();
        if !Self::resume_locked(&mut s, last_pos) {
            return None;
        }
        Some(Self::attach_locked(&mut s))
    }

    /// The transport holding `attachment` is gone; the grace period starts.
    pub fn detach(&self, attachment: &Attachment) {
        let mut s = self.lock();
        if s.attached
            .as_ref()
            .is_some_and(|a| a.generation == attachment.generation)
        {
            s.attached = None;
            s.detached_since = Some(Instant::now());
        }
    }

    /// The client has every push up to `pos`: forget them.
    pub fn ack(&self, pos: u64) {
        let mut s = self.lock();
        // The written entries at or before `pos`: `queue[..n]`.
        let n = pos
            .saturating_add(1)
            .saturating_sub(s.first_pos())
            .min(s.sent as u64) as usize;
        let s = &mut *s;
        for e in s.queue.drain(..n) {
            s.retained_bytes -= e.cost();
        }
        s.sent -= n;
        if s.queue.is_empty() {
            // Everything is acknowledged: give the queue back whatever its size (an
            // idle member of a quiet room keeps no room for its last few pushes). An
            // ack comes once per many pushes, so this costs at most one allocation per
            // ack, not one per push.
            s.queue = VecDeque::new();
        }
    }

    /// Gives back what a burst grew the queue to, once it has drained: an idle session
    /// keeps no room for the thousands of pushes it once held.
    fn shrink(s: &mut State) {
        if s.queue.is_empty() && s.queue.capacity() > SHRINK_ABOVE {
            s.queue = VecDeque::new();
        }
    }

    /// Prepares a resume from `last_pos` (the last position the client saw): everything
    /// after it will be delivered again, in order. Fails when pushes after `last_pos` were
    /// already forgotten (or `last_pos` is in the future); then only log sync can help.
    pub fn resume_from(&self, last_pos: u64) -> bool {
        Self::resume_locked(&mut self.lock(), last_pos)
    }

    fn resume_locked(s: &mut State, last_pos: u64) -> bool {
        if s.dead.is_some() || last_pos >= s.next_pos {
            return false;
        }
        let first = s.first_pos();
        if last_pos + 1 < first {
            return false;
        }
        // `last_pos < next_pos`, so at most the whole queue.
        s.queue.drain(..(last_pos + 1 - first) as usize);
        s.sent = 0;
        s.unsent_bytes = s.queue.iter().map(|e| e.cost()).sum();
        s.retained_bytes = 0;
        true
    }

    /// Takes up to `max` unsent pushes for the transport holding `attachment`.
    pub fn take(&self, attachment: &Attachment, max: usize) -> Take {
        let mut s = self.lock();
        if let Some(why) = s.dead {
            return Take::Dead(why);
        }
        if s.attached
            .as_ref()
            .is_none_or(|a| a.generation != attachment.generation)
        {
            return Take::Revoked;
        }
        if max > 0 {
            // The transport looks at the queue now; the next push must wake it again.
            s.woken = false;
        }
        let start = s.sent;
        let end = (start + max).min(s.queue.len());
        let mut out = Pushes::with_capacity(end - start);
        let mut moved = 0;
        let first = s.first_pos() + start as u64;
        for (pos, e) in (first..).zip(s.queue.range(start..end)) {
            out.push((pos, e.clone()));
            moved += e.cost();
        }
        s.sent = end;
        s.unsent_bytes -= moved;
        s.retained_bytes += moved;
        // Keep the replay buffer within bounds by forgetting the oldest written pushes.
        while s.retained_bytes > self.limits.replay_buffer_bytes() && s.sent > 0 {
            let e = s.queue.pop_front().expect("sent > 0");
            s.sent -= 1;
            s.retained_bytes -= e.cost();
        }
        Self::shrink(&mut s);
        Take::Pushes(out)
    }

    /// Whether the session should be removed: dead, or detached past `grace`.
    pub fn expired(&self, now: Instant, grace: Duration) -> bool {
        let s = self.lock();
        s.dead.is_some()
            || s.detached_since
                .is_some_and(|t| now.duration_since(t) >= grace)
    }
}

/// Pushes a session may drop rather than die for.
fn is_ephemeral(push: &Push) -> bool {
    use crate::proto::server_frame::Kind;
    matches!(push.kind(), Kind::Signal(_) | Kind::Typing(_))
}

impl Recipient for Session {
    fn recipient_id(&self) -> u64 {
        self.recipient_id
    }

    fn user(&self) -> &str {
        &self.user
    }

    fn user_key(&self) -> Arc<str> {
        self.user.clone()
    }

    fn push(&self, push: &Arc<Push>) {
        let cost = push.cost();
        let mut s = self.lock();
        if s.dead.is_some() {
            return;
        }
        // A signal or a typing hint is not worth the session: other users choose when
        // they come. Past half the queue bound they are dropped (nothing to repair:
        // they are never stored); the other half stays for messages and the rest.
        if is_ephemeral(push) && s.unsent_bytes + cost > self.limits.max_queue_bytes() / 2 {
            return;
        }
        s.next_pos += 1;
        s.queue.push_back(push.clone());
        s.unsent_bytes += cost;
        if s.unsent_bytes > self.limits.max_queue_bytes() {
            Self::die(&mut s, Death::SlowConsumer);
        } else if !s.woken
            && let Some(a) = &s.attached
        {
            a.notify.notify_one();
            s.woken = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Pong, server_frame::Kind};

    fn push() -> Arc<Push> {
        Arc::new(Push::new(Kind::Pong(Pong { ts: 1 })))
    }

    fn positions(t: Take) -> Vec<u64> {
        match t {
            Take::Pushes(v) => v.into_iter().map(|(p, _)| p).collect(),
            _ => panic!("not pushes"),
        }
    }

    fn session(max_queue: usize, replay: usize) -> Session {
        Session::new("s".into(), "u", 1, Limits::new(max_queue, replay))
    }

    /// A session's `Arc` (two counts and the session) fits jemalloc's 192 B size class.
    #[test]
    fn a_session_fits_a_192_byte_size_class() {
        let size = 2 * std::mem::size_of::<usize>() + std::mem::size_of::<Session>();
        assert!(size <= 192, "{size}");
    }

    #[test]
    fn resume_replays_exactly_what_was_missed() {
        let s = session(1 << 20, 1 << 20);
        let a = s.attach().unwrap();
        for _ in 0..5 {
            s.push(&push());
        }
        assert_eq!(positions(s.take(&a, 100)), vec![1, 2, 3, 4, 5]);
        s.detach(&a);
        s.push(&push());
        // The client saw up to 3.
        assert!(s.resume_from(3));
        let b = s.attach().unwrap();
        assert!(matches!(s.take(&a, 100), Take::Revoked));
        assert_eq!(positions(s.take(&b, 100)), vec![4, 5, 6]);
        assert_eq!(positions(s.take(&b, 100)), Vec::<u64>::new());
    }

    #[tokio::test]
    async fn one_wake_up_per_batch_of_pushes() {
        use futures_util::FutureExt;
        let s = session(1 << 20, 1 << 20);
        let a = s.attach().unwrap();
        // The attach wake-up, as a transport consumes it first.
        a.ready().await;
        assert_eq!(positions(s.take(&a, 10)), Vec::<u64>::new());
        // The transport waits; two pushes arrive before it runs.
        let waiting = a.ready();
        tokio::pin!(waiting);
        assert!(waiting.as_mut().now_or_never().is_none());
        s.push(&push());
        s.push(&push());
        assert!(waiting.now_or_never().is_some(), "the first push wakes it");
        assert_eq!(positions(s.take(&a, 10)), vec![1, 2]);
        // Both were written: no second wake-up is left over for them.
        assert!(a.ready().now_or_never().is_none());
        // The next push wakes it again.
        s.push(&push());
        assert!(a.ready().now_or_never().is_some());
        assert_eq!(positions(s.take(&a, 10)), vec![3]);
    }

    /// A held push is one pointer (its position and cost are not stored), and the
    /// positions derived from the queue's place survive partial acks, the replay bound
    /// and a resume.
    #[test]
    fn a_held_push_is_one_pointer() {
        assert_eq!(std::mem::size_of::<Entry>(), std::mem::size_of::<usize>());
        let cost = push().cost();
        let s = session(1 << 20, cost * 3);
        let a = s.attach().unwrap();
        for _ in 0..5 {
            s.push(&push());
        }
        // Five written, the replay bound keeps the last three (3, 4, 5).
        assert_eq!(positions(s.take(&a, 10)), vec![1, 2, 3, 4, 5]);
        assert_eq!(s.lock().first_pos(), 3);
        s.push(&push());
        s.push(&push());
        // Acks before the held ones, of unwritten ones, and past the end leave written
        // and unacknowledged pushes alone.
        s.ack(1);
        assert_eq!(s.lock().queue.len(), 5);
        let held = |s: &Session| {
            let g = s.lock();
            (g.first_pos(), g.sent, g.retained_bytes)
        };
        s.ack(3);
        assert_eq!(held(&s), (4, 2, 2 * cost));
        s.ack(100);
        assert_eq!(held(&s), (6, 0, 0));
        assert_eq!(positions(s.take(&a, 1)), vec![6]);
        // A resume after 5 replays 6 and 7; one after 6 only 7; one from before what is
        // held fails.
        assert!(s.resume(5).is_some());
        assert_eq!(s.lock().unsent_bytes, 2 * cost);
        let a = s.resume(6).unwrap();
        assert_eq!(positions(s.take(&a, 10)), vec![7]);
        assert!(s.resume(4).is_none());
    }

    #[test]
    fn a_drained_queue_gives_its_memory_back() {
        let s = session(1 << 20, 1 << 20);
        let a = s.attach().unwrap();
        for _ in 0..1000 {
            s.push(&push());
        }
        assert!(s.lock().queue.capacity() >= 1000);
        assert_eq!(positions(s.take(&a, 2000)).len(), 1000);
        // Written but not acknowledged: still held for a resume.
        assert_eq!(s.lock().queue.len(), 1000);
        s.ack(1000);
        assert_eq!(s.lock().queue.capacity(), 0);
    }

    /// A member of a quiet room that acknowledged its few pushes holds no queue either
    /// (one push leaves room for four entries, kept by every such session until now);
    /// an ack that leaves pushes behind keeps the queue.
    #[test]
    fn a_fully_acknowledged_queue_is_given_back() {
        let s = session(1 << 20, 1 << 20);
        let a = s.attach().unwrap();
        s.push(&push());
        s.push(&push());
        assert_eq!(positions(s.take(&a, 10)), vec![1, 2]);
        s.ack(1);
        assert!(s.lock().queue.capacity() > 0, "position 2 is still held");
        assert_eq!(s.lock().queue.len(), 1);
        s.ack(2);
        assert_eq!(s.lock().queue.capacity(), 0);
        // Resume still works from what is held (nothing: all acknowledged).
        s.push(&push());
        assert_eq!(positions(s.take(&a, 10)), vec![3]);
    }

    #[test]
    fn overflow_kills_as_slow_consumer() {
        let cost = push().cost();
        let s = session(cost * 3, 1 << 20);
        let a = s.attach().unwrap();
        for _ in 0..4 {
            s.push(&push());
        }
        assert!(matches!(s.take(&a, 10), Take::Dead(Death::SlowConsumer)));
    }

    #[test]
    fn signals_are_dropped_before_they_could_overflow_the_queue() {
        use crate::proto::SignalEvent;
        let signal = || {
            Arc::new(Push::new(Kind::Signal(SignalEvent {
                from_user: "eve".into(),
                kind: "x".into(),
                payload: "y".repeat(1000),
            })))
        };
        let s = session(10 * signal().cost(), 1 << 20);
        let a = s.attach().unwrap();
        for _ in 0..100 {
            s.push(&signal());
        }
        // Half the bound went to signals; the rest were dropped, and the session lives.
        assert_eq!(positions(s.take(&a, 1000)), vec![1, 2, 3, 4, 5]);
        for _ in 0..5 {
            s.push(&signal());
        }
        // Other pushes still have the other half.
        for _ in 0..5 {
            s.push(&push());
        }
        assert_eq!(positions(s.take(&a, 1000)), (6..=15).collect::<Vec<_>>());
    }

    #[test]
    fn forgotten_pushes_make_resume_fail() {
        let cost = push().cost();
        let s = session(1 << 20, cost * 2);
        let a = s.attach().unwrap();
        for _ in 0..5 {
            s.push(&push());
        }
        s.take(&a, 10);
        // Only 4 and 5 are retained.
        assert!(!s.resume_from(2));
        assert!(s.resume_from(3));
        assert!(!s.resume_from(99));
    }
}
