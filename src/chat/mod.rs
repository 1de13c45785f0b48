//! The chat domain: rooms, membership, messages, history and sync.
//!
//! Knows the [`Store`] and [`Broker`] traits and the local [`Hub`]; knows nothing of
//! HTTP, WebSocket or sessions (a session is just a [`hub::Recipient`]).
//!
//! Ordering: appends and publishes for one room happen under that room's lock stripe, so
//! every instance sees a room's messages published in seq order.

pub mod hub;

use std::sync::Arc;

use crate::{
    auth::now_ms,
    broker::Broker,
    codec::Push,
    config::ChatConfig,
    error::ChatError,
    proto::{self, RoomState, server_frame::Kind},
    store::{NewMessage, Range, Store},
};
use hub::{Hub, Recipient};

/// Number of per-room lock stripes (rooms hash onto them).
const STRIPES: usize = 256;

pub struct Chat {
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    hub: Arc<Hub>,
    config: ChatConfig,
    stripes: Vec<tokio::sync::Mutex<()>>,
}

fn invalid(msg: impl Into<String>) -> ChatError {
    ChatError::InvalidArgument(msg.into())
}

impl Chat {
    pub fn new(
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        hub: Arc<Hub>,
        config: ChatConfig,
    ) -> Self {
        let stripes = (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect();
        Self {
            store,
            broker,
            hub,
            config,
            stripes,
        }
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn stripe(&self, room: &str) -> &tokio::sync::Mutex<()> {
        // FNV-1a: stable and cheap; no need for DoS resistance with 256 buckets.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in room.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        &self.stripes[(h % STRIPES as u64) as usize]
    }

    fn check_room(&self, room: &str) -> Result<(), ChatError> {
        if room.is_empty() || room.len() > self.config.max_room_name_bytes {
            return Err(invalid(format!(
                "room name must be 1..={} bytes",
                self.config.max_room_name_bytes
            )));
        }
        if !room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:@-".contains(&b))
        {
            return Err(invalid("room name may only contain A-Z a-z 0-9 _ . : @ -"));
        }
        Ok(())
    }

    async fn check_member(&self, room: &str, user: &str) -> Result<(), ChatError> {
        self.check_room(room)?;
        if self.store.is_member(room, user).await? {
            Ok(())
        } else {
            Err(ChatError::NotMember(room.to_string()))
        }
    }

    /// Registers a session for live delivery and returns its user's rooms.
    pub async fn attach(&self, recipient: Arc<dyn Recipient>) -> Result<Vec<RoomState>, ChatError> {
        let user = recipient.user().to_string();
        // Attach first, then read the rooms: a join racing with this attach then reaches
        // the hub entry either way.
        self.hub.attach(recipient);
        let rooms = self.store.rooms_of(&user).await?;
        for r in &rooms {
            self.hub.joined(&user, &r.room);
        }
        Ok(rooms)
    }

    pub fn detach(&self, user: &str, recipient_id: u64) {
        self.hub.detach(user, recipient_id);
    }

    pub async fn rooms_of(&self, user: &str) -> Result<Vec<RoomState>, ChatError> {
        Ok(self.store.rooms_of(user).await?)
    }

    pub async fn join(&self, user: &str, room: &str) -> Result<proto::Joined, ChatError> {
        self.check_room(room)?;
        let last_seq = self.store.join(room, user).await?;
        self.hub.joined(user, room);
        Ok(proto::Joined {
            room: room.to_string(),
            last_seq,
        })
    }

    pub async fn leave(&self, user: &str, room: &str) -> Result<proto::Left, ChatError> {
        self.check_room(room)?;
        if !self.store.leave(room, user).await? {
            return Err(ChatError::NotMember(room.to_string()));
        }
        self.hub.left(user, room);
        Ok(proto::Left {
            room: room.to_string(),
        })
    }

    pub async fn send(&self, user: &str, send: proto::Send) -> Result<proto::Sent, ChatError> {
        let c = &self.config;
        if send.client_msg_id.is_empty() || send.client_msg_id.len() > c.max_client_msg_id_bytes {
            return Err(invalid(format!(
                "client_msg_id must be 1..={} bytes",
                c.max_client_msg_id_bytes
            )));
        }
        let meta_bytes: usize = send.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        if send.body.len() + meta_bytes > c.max_body_bytes {
            return Err(invalid(format!(
                "body and metadata exceed {} bytes",
                c.max_body_bytes
            )));
        }
        if send.metadata.len() > c.max_metadata_entries {
            return Err(invalid(format!(
                "more than {} metadata entries",
                c.max_metadata_entries
            )));
        }
        self.check_member(&send.room, user).await?;

        let _order = self.stripe(&send.room).lock().await;
        let appended = self
            .store
            .append(NewMessage {
                room: send.room,
                sender: user.to_string(),
                client_msg_id: send.client_msg_id,
                body: send.body,
                metadata: send.metadata,
                ts: now_ms(),
            })
            .await?;
        let m = &appended.message;
        if !appended.duplicate {
            let push = Arc::new(Push::new(Kind::Message((**m).clone())));
            if let Err(e) = self.broker.publish(&m.room, push).await {
                // The message is durable; members repair the gap by log sync.
                tracing::warn!(room = %m.room, seq = m.seq, error = %e, "publish failed");
            }
        }
        Ok(proto::Sent {
            room: m.room.clone(),
            seq: m.seq,
            ts: m.ts,
            duplicate: appended.duplicate,
        })
    }

    fn page_limit(&self, limit: u32) -> usize {
        let limit = if limit == 0 {
            self.config.history_default_limit
        } else {
            limit
        };
        limit.min(self.config.history_max_limit) as usize
    }

    pub async fn history(
        &self,
        user: &str,
        req: proto::History,
    ) -> Result<proto::HistoryPage, ChatError> {
        self.check_member(&req.room, user).await?;
        if req.before_seq != 0 && req.after_seq != 0 {
            return Err(invalid("give before_seq or after_seq, not both"));
        }
        let range = if req.after_seq != 0 {
            Range::After(req.after_seq)
        } else if req.before_seq != 0 {
            Range::Before(req.before_seq)
        } else {
            Range::Before(u64::MAX)
        };
        let page = self
            .store
            .history(&req.room, range, self.page_limit(req.limit))
            .await?;
        Ok(proto::HistoryPage {
            room: req.room,
            messages: page.messages.iter().map(|m| (**m).clone()).collect(),
            more: page.more,
        })
    }

    /// Log sync: for each listed room, what came after the client's last seq.
    pub async fn sync(&self, user: &str, req: proto::Sync) -> Result<proto::SyncResult, ChatError> {
        const MAX_ROOMS: usize = 1000;
        if req.rooms.len() > MAX_ROOMS {
            return Err(invalid(format!("sync at most {MAX_ROOMS} rooms at once")));
        }
        let limit = self.page_limit(req.limit);
        let mut rooms = Vec::with_capacity(req.rooms.len());
        for (room, last_seq) in req.rooms {
            self.check_member(&room, user).await?;
            let page = self
                .store
                .history(&room, Range::After(last_seq), limit)
                .await?;
            rooms.push(proto::HistoryPage {
                room,
                messages: page.messages.iter().map(|m| (**m).clone()).collect(),
                more: page.more,
            });
        }
        Ok(proto::SyncResult { rooms })
    }
}
