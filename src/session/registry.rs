//! All live sessions of this instance, by id, and the reaper that removes expired ones.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use rand::RngCore;
use tokio::time::Instant;

use super::{Limits, Session};
use crate::{chat::Chat, config::SessionConfig};

pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
    next_recipient: AtomicU64,
    config: SessionConfig,
    chat: Arc<Chat>,
}

impl Sessions {
    pub fn new(config: SessionConfig, chat: Arc<Chat>) -> Self {
        Self {
            map: Mutex::default(),
            next_recipient: AtomicU64::new(1),
            config,
            chat,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new, unattached session for `user` (not yet registered for delivery).
    pub fn create(&self, user: &str) -> Arc<Session> {
        let mut raw = [0u8; 16];
        rand::rng().fill_bytes(&mut raw);
        let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let limits = Limits {
            max_queue_bytes: self.config.max_queue_bytes,
            replay_buffer_bytes: self.config.replay_buffer_bytes,
        };
        let rid = self.next_recipient.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session::new(id.clone(), user, rid, limits));
        self.lock().insert(id, session.clone());
        session
    }

    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.lock().get(id).cloned()
    }

    /// Removes the session from the registry and from live delivery.
    pub fn remove(&self, session: &Session) {
        let removed = self.lock().remove(session.id());
        if removed.is_some() {
            self.chat.detach(session.user_id(), session.recipient_id);
        }
    }

    /// Ends a session now (the client closed its connection on purpose).
    pub fn end(&self, session: &Session) {
        session.kill(super::Death::Expired);
        self.remove(session);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every session that is dead or detached past the grace period.
    pub fn reap(&self) -> usize {
        let now = Instant::now();
        let expired: Vec<Arc<Session>> = self
            .lock()
            .values()
            .filter(|s| s.expired(now, self.config.grace_period))
            .cloned()
            .collect();
        for s in &expired {
            s.kill(super::Death::Expired);
            self.remove(s);
        }
        expired.len()
    }
}
