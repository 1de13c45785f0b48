//! Room order on the receiving side: every room message an instance delivers — whether it
//! came from Redis, from this instance's own publish, or from the store — passes through
//! [`RoomOrder`], which hands it to the local hub in seq order.
//!
//! With several instances the store fixes `seq` at commit, and instances publish after
//! their commits, so two instances' publishes of one room can reach a receiver in either
//! order, and a publish can be lost (Redis down, a dropped subscription). Per watched room
//! the receiver keeps the last delivered seq and the messages that arrived early:
//!
//! - the next seq is delivered at once, then whatever early messages now follow it;
//! - a seq at or below the last delivered one is dropped (a duplicate);
//! - a later seq is held; after `gap_hold` the gap is filled from the store
//!   (`history(room, After(last))`) and delivery continues.
//!
//! [`RoomOrder::repair`] reads the store past the last delivered seq unconditionally: after
//! a (re)subscription, publishes made while the channel was not subscribed are found.
//!
//! Owns: per-room delivery position and the early-message buffer. Not: subscriptions
//! (`redis`), what a session does with a gap it sees itself (log sync).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;

use crate::{
    codec::Push,
    delivery::{Hub, Target},
    metrics::BrokerMetrics,
    proto::{Message, server_frame::Kind},
};

/// The durable log as the receiver reads it (the store, wired in by `server`; the broker
/// layer does not import the store).
#[async_trait]
pub trait Log: Send + Sync + 'static {
    /// At most `limit` messages of `room` with seq > `after`, oldest first, and whether
    /// more follow.
    async fn after(
        &self,
        room: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<Arc<Message>>, bool), String>;
}

/// Early messages held per room at most; past it the gap is filled at once.
const MAX_EARLY: usize = 10_000;
/// Messages read from the store per page while filling a gap.
const FILL_PAGE: usize = 500;

#[derive(Default)]
struct RoomSeq {
    /// Highest seq delivered here.
    last: u64,
    /// Messages that arrived before the ones in front of them.
    early: BTreeMap<u64, Arc<Push>>,
    /// A fill is scheduled or running.
    filling: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct RoomOrder {
    hub: Arc<Hub>,
    log: Arc<dyn Log>,
    hold: Duration,
    metrics: BrokerMetrics,
    rooms: Mutex<HashMap<String, Arc<Mutex<RoomSeq>>>>,
}

impl RoomOrder {
    pub fn new(hub: Arc<Hub>, log: Arc<dyn Log>, hold: Duration, metrics: BrokerMetrics) -> Self {
        Self {
            hub,
            log,
            hold,
            metrics,
            rooms: Mutex::default(),
        }
    }

    fn room(&self, room: &str) -> Option<Arc<Mutex<RoomSeq>>> {
        lock(&self.rooms).get(room).cloned()
    }

    /// Starts ordering `room`, whose local members have seen its log up to `last_seq`.
    /// A room already ordered keeps its position. Returns whether it is new.
    pub fn watch(&self, room: &str, last_seq: u64) -> bool {
        let mut rooms = lock(&self.rooms);
        if rooms.contains_key(room) {
            return false;
        }
        rooms.insert(
            room.to_string(),
            Arc::new(Mutex::new(RoomSeq {
                last: last_seq,
                ..Default::default()
            })),
        );
        true
    }

    /// Stops ordering `room` (no local members left).
    pub fn forget(&self, room: &str) {
        lock(&self.rooms).remove(room);
    }

    /// The rooms being ordered.
    pub fn rooms(&self) -> Vec<String> {
        lock(&self.rooms).keys().cloned().collect()
    }

    /// The last seq delivered in `room` (for tests and repair).
    pub fn last_delivered(&self, room: &str) -> Option<u64> {
        self.room(room).map(|r| lock(&r).last)
    }

    /// Delivers `push` (message `seq` of `room`) in order. A room that is not watched
    /// has no local members to order for: the push goes straight to the hub.
    pub fn on_message(self: &Arc<Self>, room: &str, seq: u64, push: Arc<Push>) {
        let Some(state) = self.room(room) else {
            self.hub.deliver(&Target::Room(room.to_string()), &push);
            return;
        };
        let mut st = lock(&state);
        if seq <= st.last || st.early.contains_key(&seq) {
            self.metrics.duplicates.inc();
            return;
        }
        if seq == st.last + 1 {
            self.deliver(room, &mut st, seq, &push);
            return;
        }
        st.early.insert(seq, push);
        if st.early.len() > MAX_EARLY {
            self.schedule_fill(room, &mut st, Duration::ZERO);
        } else {
            self.schedule_fill(room, &mut st, self.hold);
        }
    }

    /// Delivers `seq` (the next one) and every early message that now follows.
    fn deliver(&self, room: &str, st: &mut RoomSeq, seq: u64, push: &Arc<Push>) {
        let target = Target::Room(room.to_string());
        self.hub.deliver(&target, push);
        st.last = seq;
        while let Some(entry) = st.early.first_entry() {
            if *entry.key() > st.last + 1 {
                break;
            }
            let (s, p) = entry.remove_entry();
            if s == st.last + 1 {
                self.hub.deliver(&target, &p);
                st.last = s;
            }
        }
    }

    fn schedule_fill(self: &Arc<Self>, room: &str, st: &mut RoomSeq, after: Duration) {
        if st.filling {
            return;
        }
        st.filling = true;
        let this = self.clone();
        let room = room.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            this.fill(&room, false).await;
        });
    }

    /// Reads the store past the last delivered seq and delivers what is there, in order.
    /// Unless `always`, only while early messages wait (the gap may have closed itself).
    async fn fill(self: &Arc<Self>, room: &str, always: bool) {
        let Some(state) = self.room(room) else {
            return;
        };
        let mut counted = false;
        loop {
            let last = {
                let mut st = lock(&state);
                if !always && st.early.is_empty() {
                    st.filling = false;
                    return;
                }
                st.last
            };
            if !counted {
                self.metrics.gap_fills.inc();
                counted = true;
            }
            let (messages, more) = match self.log.after(room, last, FILL_PAGE).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(room, error = %e, "gap fill: store read failed; retrying");
                    let mut st = lock(&state);
                    st.filling = false;
                    if !st.early.is_empty() {
                        self.schedule_fill(
                            room,
                            &mut st,
                            self.hold.max(Duration::from_millis(100)),
                        );
                    }
                    return;
                }
            };
            let mut st = lock(&state);
            for m in &messages {
                if m.seq != st.last + 1 {
                    continue;
                }
                let push = match st.early.remove(&m.seq) {
                    Some(p) => p,
                    None => {
                        self.metrics.filled_messages.inc();
                        Arc::new(Push::new(Kind::Message((**m).clone())))
                    }
                };
                let seq = m.seq;
                self.deliver(room, &mut st, seq, &push);
            }
            if more {
                continue;
            }
            st.filling = false;
            if !st.early.is_empty() {
                // The store had nothing more right after `last`: the early messages are
                // past a seq that is not committed yet (cannot happen when publishes follow
                // commits) — try again later rather than skip it.
                self.schedule_fill(room, &mut st, self.hold.max(Duration::from_millis(100)));
            }
            return;
        }
    }

    /// Delivers whatever the store has past the last delivered seq of `room` (after a
    /// subscribe or resubscribe, when publishes may have been missed).
    pub async fn repair(self: &Arc<Self>, room: &str) {
        self.fill(room, true).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;
    use crate::{delivery::Recipient, proto};

    struct Inbox {
        seqs: StdMutex<Vec<u64>>,
    }

    impl Recipient for Inbox {
        fn recipient_id(&self) -> u64 {
            1
        }
        fn user(&self) -> &str {
            "bob"
        }
        fn push(&self, push: &Arc<Push>) {
            if let Kind::Message(m) = push.kind() {
                self.seqs.lock().unwrap().push(m.seq);
            }
        }
    }

    /// A log held in memory: messages 1..=n of room "r".
    struct Appended(u64);

    #[async_trait]
    impl Log for Appended {
        async fn after(
            &self,
            _room: &str,
            after: u64,
            limit: usize,
        ) -> Result<(Vec<Arc<Message>>, bool), String> {
            let seqs: Vec<u64> = (after + 1..=self.0).collect();
            let more = seqs.len() > limit;
            Ok((
                seqs.into_iter()
                    .take(limit)
                    .map(|seq| Arc::new(message(seq)))
                    .collect(),
                more,
            ))
        }
    }

    fn message(seq: u64) -> Message {
        proto::Message {
            room: "r".into(),
            seq,
            ..Default::default()
        }
    }

    fn msg(seq: u64) -> Arc<Push> {
        Arc::new(Push::new(Kind::Message(message(seq))))
    }

    fn setup(appended: u64) -> (Arc<RoomOrder>, Arc<Inbox>) {
        let hub = Arc::new(Hub::new());
        let inbox = Arc::new(Inbox {
            seqs: StdMutex::default(),
        });
        hub.attach(inbox.clone());
        hub.joined("bob", "r", None);
        let order = Arc::new(RoomOrder::new(
            hub,
            Arc::new(Appended(appended)),
            Duration::from_millis(50),
            crate::metrics::Metrics::new().broker.clone(),
        ));
        order.watch("r", 0);
        (order, inbox)
    }

    async fn wait_for(inbox: &Inbox, n: usize) -> Vec<u64> {
        for _ in 0..200 {
            if inbox.seqs.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        inbox.seqs.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn reordered_and_repeated_publishes_come_out_in_order_once() {
        let (order, inbox) = setup(4);
        for seq in [2, 1, 1, 4, 3, 2] {
            order.on_message("r", seq, msg(seq));
        }
        assert_eq!(*inbox.seqs.lock().unwrap(), [1, 2, 3, 4]);
        assert_eq!(order.last_delivered("r"), Some(4));
    }

    #[tokio::test]
    async fn a_lost_publish_is_filled_from_the_log_after_the_hold() {
        let (order, inbox) = setup(3);
        order.on_message("r", 1, msg(1));
        // 2 never comes over the broker.
        order.on_message("r", 3, msg(3));
        assert_eq!(*inbox.seqs.lock().unwrap(), [1]);
        assert_eq!(wait_for(&inbox, 3).await, [1, 2, 3]);
        // A late copy of 2 is a duplicate now.
        order.on_message("r", 2, msg(2));
        assert_eq!(*inbox.seqs.lock().unwrap(), [1, 2, 3]);
    }

    #[tokio::test]
    async fn repair_delivers_what_was_missed_while_unsubscribed() {
        let (order, inbox) = setup(1200);
        order.on_message("r", 1, msg(1));
        order.repair("r").await;
        // Several pages.
        assert_eq!(
            *inbox.seqs.lock().unwrap(),
            (1..=1200).collect::<Vec<u64>>()
        );
    }
}
