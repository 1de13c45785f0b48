//! The ordering sequencer: publishes of one room leave in the order their messages were
//! handed to the store, while the appends themselves are pipelined through group
//! commits.
//!
//! Rooms hash onto [`STRIPES`] stripes. [`Sequencer::order`] takes the stripe's next
//! ticket in the same critical section that fixes the message's place in the log; the
//! returned [`Turn`] waits until every earlier ticket of the stripe has published. A
//! `Turn` is a drop guard: however its holder ends (done, cancelled, panicked), the
//! stripe moves on — at once if the turn had come, or the moment it comes otherwise — so
//! no failure can wedge the rooms that share its stripe.
//!
//! Owns: tickets and turns. Not: what is published, or where (`chat`, `broker`).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::oneshot;

/// Number of ordering stripes (rooms hash onto them).
pub const STRIPES: usize = 256;

/// Whose turn it is, who waits for a later one, and which later tickets were given up.
/// Only the next ticket's waiter is woken on each advance: waking every waiter would cost
/// O(pending²) when a group commit completes many appends of one stripe at once.
#[derive(Default)]
struct Stripe {
    next_ticket: u64,
    published: u64,
    waiting: HashMap<u64, oneshot::Sender<()>>,
    abandoned: HashSet<u64>,
}

impl Stripe {
    /// The current turn is over: move to the next ticket that is still wanted.
    fn advance(&mut self) {
        self.published += 1;
        while self.abandoned.remove(&self.published) {
            self.published += 1;
        }
        if let Some(tx) = self.waiting.remove(&self.published) {
            // A waiter that is gone was marked abandoned before its sender dropped.
            let _ = tx.send(());
        }
    }
}

pub struct Sequencer {
    stripes: Arc<[Mutex<Stripe>]>,
}

impl Default for Sequencer {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
        }
    }
}

fn lock(m: &Mutex<Stripe>) -> MutexGuard<'_, Stripe> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The stripe a key (room) orders on. FNV-1a: stable and cheap; no need for DoS
/// resistance with 256 buckets.
pub fn stripe_of(key: &str) -> usize {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in key.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    (h % STRIPES as u64) as usize
}

impl Sequencer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `fix_order` (which fixes the item's place, e.g. hands it to the store) and
    /// takes the stripe's next ticket in the same critical section.
    pub fn order<T>(&self, key: &str, fix_order: impl FnOnce() -> T) -> (Turn, T) {
        let index = stripe_of(key);
        let mut stripe = lock(&self.stripes[index]);
        let out = fix_order();
        let ticket = stripe.next_ticket;
        stripe.next_ticket += 1;
        drop(stripe);
        let turn = Turn {
            stripes: self.stripes.clone(),
            index,
            ticket,
            state: TurnState::Waiting,
        };
        (turn, out)
    }
}

#[derive(PartialEq, Eq)]
enum TurnState {
    Waiting,
    Holding,
}

/// One ticket of a stripe. [`Turn::wait`] resolves when it is this ticket's turn;
/// dropping the `Turn` ends it (see the module comment).
pub struct Turn {
    stripes: Arc<[Mutex<Stripe>]>,
    index: usize,
    ticket: u64,
    state: TurnState,
}

impl Turn {
    /// Waits until every earlier ticket of the stripe is done. Cancel-safe.
    pub async fn wait(&mut self) {
        if self.state == TurnState::Holding {
            return;
        }
        let woken = {
            let mut stripe = lock(&self.stripes[self.index]);
            if stripe.published == self.ticket {
                self.state = TurnState::Holding;
                return;
            }
            let (tx, rx) = oneshot::channel();
            stripe.waiting.insert(self.ticket, tx);
            rx
        };
        // The sender is only dropped after sending, or when this turn is dropped.
        let _ = woken.await;
        self.state = TurnState::Holding;
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut stripe = lock(&self.stripes[self.index]);
        if stripe.published == self.ticket {
            // Our turn (held, or arrived while nobody was waiting): pass it on.
            stripe.advance();
        } else {
            // Not yet our turn: skip this ticket when it comes.
            stripe.waiting.remove(&self.ticket);
            stripe.abandoned.insert(self.ticket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[tokio::test]
    async fn turns_come_in_ticket_order() {
        let seq = Sequencer::new();
        let log = Arc::new(StdMutex::new(Vec::new()));
        let mut tasks = Vec::new();
        let mut turns: Vec<Turn> = (0..20).map(|_| seq.order("room", || ()).0).collect();
        // Start them in reverse: each still publishes in ticket order.
        while let Some(mut turn) = turns.pop() {
            let log = log.clone();
            let n = turn.ticket;
            tasks.push(tokio::spawn(async move {
                turn.wait().await;
                log.lock().unwrap().push(n);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*log.lock().unwrap(), (0..20).collect::<Vec<u64>>());
    }

    #[tokio::test]
    async fn a_panic_while_holding_the_turn_does_not_wedge_the_stripe() {
        let seq = Sequencer::new();
        let (mut first, _) = seq.order("room", || ());
        let (mut second, _) = seq.order("room", || ());
        let crashed = tokio::spawn(async move {
            first.wait().await;
            panic!("publish failed hard");
        });
        assert!(crashed.await.unwrap_err().is_panic());
        tokio::time::timeout(std::time::Duration::from_secs(5), second.wait())
            .await
            .expect("the next turn comes after a panic");
    }

    #[tokio::test]
    async fn an_abandoned_ticket_is_skipped_when_its_turn_comes() {
        let seq = Sequencer::new();
        let (mut first, _) = seq.order("room", || ());
        let (second, _) = seq.order("room", || ());
        let (mut third, _) = seq.order("room", || ());
        // The second holder goes away before its turn (cancelled or panicked early).
        drop(second);
        first.wait().await;
        let waiting = tokio::spawn(async move { third.wait().await });
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("third gets its turn")
            .unwrap();
    }

    #[test]
    fn stripes_are_stable() {
        assert_eq!(stripe_of("lobby"), stripe_of("lobby"));
        assert!(stripe_of("lobby") < STRIPES);
    }
}
