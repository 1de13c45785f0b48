//! Token buckets keyed by who is asking (a user, an IP address): each key may spend
//! `burst` tokens at once and regains `rate` per second. Over the limit the caller gets
//! how long to wait — the retry hint clients see — and nothing else changes. Runs on
//! tokio's clock, so tests can use paused time.
//!
//! Owns: bucket arithmetic and a bounded map of buckets. Not: what is limited or what
//! the client is told (`chat`, `session`, `transport`).

use std::{borrow::Borrow, collections::HashMap, hash::Hash, sync::Mutex, time::Duration};

use tokio::time::Instant;

/// Forget full buckets once the map grows past this many keys.
const PRUNE_ABOVE: usize = 10_000;

/// A rate: `rate` per second, `burst` at once. `rate == 0` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub rate: f64,
    pub burst: f64,
}

impl Rate {
    pub fn new(rate: f64, burst: f64) -> Self {
        Self { rate, burst }
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

pub struct RateLimiter<K> {
    rate: Rate,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Eq + Hash> RateLimiter<K> {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: Mutex::default(),
        }
    }

    /// Spends one token of `key`'s bucket; `Err(wait)` when there is none, with how long
    /// until there is. Allocates a key only for a bucket it has not seen; costs nothing
    /// when the rate is off.
    pub fn check<Q>(&self, key: &Q) -> Result<(), Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.check_cost(key, 1.0)
    }

    /// Spends `cost` tokens of `key`'s bucket at once (a byte budget: cost = bytes), or
    /// `Err(wait)` until that many are there; nothing is spent on a refusal. A cost over
    /// the burst can never pass: configurations keep the burst above the largest cost.
    pub fn check_cost<Q>(&self, key: &Q, cost: f64) -> Result<(), Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let Rate { rate, burst } = self.rate;
        if rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > PRUNE_ABOVE {
            // A full bucket holds nothing worth remembering.
            buckets
                .retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * rate < burst);
        }
        if !buckets.contains_key(key) {
            buckets.insert(
                key.to_owned(),
                Bucket {
                    tokens: burst,
                    last: now,
                },
            );
        }
        let b = buckets.get_mut(key).expect("just inserted");
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(burst);
        b.last = now;
        if b.tokens >= cost {
            b.tokens -= cost;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((cost - b.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_rate_with_a_retry_hint() {
        let l: RateLimiter<String> = RateLimiter::new(Rate::new(2.0, 3.0));
        for _ in 0..3 {
            l.check("ann").unwrap();
        }
        let wait = l.check("ann").unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Others are not affected.
        l.check("bob").unwrap();
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(l.check("ann").is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        l.check("ann").unwrap();
        assert!(l.check("ann").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cost_is_spent_whole_or_not_at_all() {
        let l: RateLimiter<String> = RateLimiter::new(Rate::new(1000.0, 4000.0));
        l.check_cost("bob", 3000.0).unwrap();
        // 1000 left: 1500 more needs half a second, and the refusal spends nothing.
        assert_eq!(
            l.check_cost("bob", 1500.0).unwrap_err(),
            Duration::from_millis(500)
        );
        l.check_cost("bob", 1000.0).unwrap();
        tokio::time::advance(Duration::from_millis(500)).await;
        l.check_cost("bob", 500.0).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn zero_rate_is_unlimited() {
        let l: RateLimiter<u32> = RateLimiter::new(Rate::new(0.0, 0.0));
        for _ in 0..1000 {
            l.check(&1).unwrap();
        }
    }
}
