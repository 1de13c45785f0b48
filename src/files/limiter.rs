//! The per-user upload rate: at most N uploads started per user per minute, counted on
//! this instance (with many instances, each allows N).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

const WINDOW: Duration = Duration::from_secs(60);

pub struct UploadLimiter {
    per_window: u32,
    /// user → (window start, uploads started in it).
    users: Mutex<HashMap<String, (Instant, u32)>>,
}

impl UploadLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_window: per_minute,
            users: Mutex::new(HashMap::new()),
        }
    }

    /// Counts an upload by `user`; over the rate, how long until the user's window ends
    /// (when an upload would be accepted again).
    pub fn allow(&self, user: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if users.len() > 10_000 {
            users.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let entry = users.entry(user.to_string()).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        if entry.1 >= self.per_window {
            return Err(WINDOW.saturating_sub(now.duration_since(entry.0)));
        }
        entry.1 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_user() {
        let l = UploadLimiter::new(2);
        assert!(l.allow("a").is_ok() && l.allow("a").is_ok());
        let wait = l.allow("a").unwrap_err();
        assert!(wait > Duration::from_secs(59) && wait <= WINDOW, "{wait:?}");
        assert!(l.allow("b").is_ok());
    }
}
