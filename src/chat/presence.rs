//! Presence state of this instance: when each user's last local session ended
//! (`last_seen`, Unix ms), bounded in size. Whether a user is online is the hub's
//! knowledge (it has their sessions); this module only remembers the offline side.
//!
//! Owns: last-seen times. Not: broadcasting presence changes (`chat`).

use std::{collections::HashMap, sync::Mutex};

/// Most users whose last-seen time is remembered; past it the oldest half is forgotten
/// (they then read as "unknown", `last_seen: 0`).
pub const MAX_REMEMBERED: usize = 100_000;

#[derive(Default)]
pub struct LastSeen {
    map: Mutex<HashMap<String, i64>>,
}

impl LastSeen {
    pub fn new() -> Self {
        Self::default()
    }

    /// The user's last local session ended at `at` (Unix ms).
    pub fn went_offline(&self, user: &str, at: i64) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // A user seen before (every reconnect) is updated in place: no copy of its id.
        match map.get_mut(user) {
            Some(t) => *t = at,
            None => {
                map.insert(user.to_string(), at);
            }
        }
        if map.len() > MAX_REMEMBERED {
            let mut times: Vec<i64> = map.values().copied().collect();
            let mid = times.len() / 2;
            let (_, median, _) = times.select_nth_unstable(mid);
            let cutoff = *median;
            map.retain(|_, t| *t >= cutoff);
        }
    }

    /// When the user was last seen here (0 when unknown).
    pub fn get(&self, user: &str) -> i64 {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(user)
            .copied()
            .unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_latest_time() {
        let p = LastSeen::new();
        assert_eq!(p.get("ann"), 0);
        p.went_offline("ann", 10);
        p.went_offline("ann", 20);
        assert_eq!(p.get("ann"), 20);
    }

    #[test]
    fn stays_bounded_and_keeps_the_newest() {
        let p = LastSeen::new();
        for i in 0..=MAX_REMEMBERED as i64 {
            p.went_offline(&format!("u{i}"), i);
        }
        assert!(p.len() <= MAX_REMEMBERED / 2 + 1);
        assert_eq!(p.get(&format!("u{MAX_REMEMBERED}")), MAX_REMEMBERED as i64);
        assert_eq!(p.get("u0"), 0);
    }
}
