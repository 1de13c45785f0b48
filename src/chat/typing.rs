//! The typing rate limiter: a user's typing events in one room are accepted at most once
//! per `chat.typing_interval`. Runs on tokio's clock, so tests can use paused time.
//!
//! Owns: when each (user, room) last typed. Not: who hears about it (`chat`).

use std::{collections::HashMap, sync::Mutex, time::Duration};

use tokio::time::Instant;

/// Forget entries once the map grows past this many (older than the interval).
const PRUNE_ABOVE: usize = 10_000;

pub struct TypingLimiter {
    interval: Duration,
    last: Mutex<HashMap<(String, String), Instant>>,
}

impl TypingLimiter {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Mutex::default(),
        }
    }

    /// Whether `user` may send a typing event in `room` now (if so, it counts); else
    /// how long until it may.
    pub fn check(&self, user: &str, room: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let key = (user.to_string(), room.to_string());
        if let Some(t) = last.get(&key) {
            let since = now.duration_since(*t);
            if since < self.interval {
                return Err(self.interval - since);
            }
        }
        last.insert(key, now);
        if last.len() > PRUNE_ABOVE {
            let interval = self.interval;
            last.retain(|_, t| now.duration_since(*t) < interval);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl TypingLimiter {
        fn allow(&self, user: &str, room: &str) -> bool {
            self.check(user, room).is_ok()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_event_per_interval_per_user_and_room() {
        let t = TypingLimiter::new(Duration::from_millis(1000));
        assert!(t.allow("ann", "lobby"));
        assert_eq!(t.check("ann", "lobby"), Err(Duration::from_millis(1000)));
        // Other rooms and other users are independent.
        assert!(t.allow("ann", "other"));
        assert!(t.allow("bob", "lobby"));
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!t.allow("ann", "lobby"));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(t.allow("ann", "lobby"));
        assert!(!t.allow("ann", "lobby"));
    }

    #[tokio::test(start_paused = true)]
    async fn old_entries_are_pruned() {
        let t = TypingLimiter::new(Duration::from_millis(10));
        for i in 0..=PRUNE_ABOVE {
            assert!(t.allow(&format!("u{i}"), "r"));
        }
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(t.allow("late", "r"));
        assert_eq!(t.last.lock().unwrap().len(), 1);
    }
}
