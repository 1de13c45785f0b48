//! The chat domain: rooms, membership, messages, history, sync, direct messages, read
//! markers, typing, presence, signalling and announcements.
//!
//! Knows the [`Store`] and [`Broker`] traits and the local [`Hub`]; knows nothing of
//! HTTP, WebSocket or sessions (a session is just a [`Recipient`]).
//!
//! - this file: the chat commands (validation, then store, then publish);
//! - [`sequencer`]: publishes of a room leave in seq order while appends are pipelined
//!   through group commits;
//! - [`typing`]: the typing rate limiter;
//! - [`presence`]: last-seen times;
//! - [`error`]: the errors a command can give, with their wire codes.

pub mod error;
pub mod presence;
pub mod sequencer;
pub mod typing;

pub use error::{ChatError, retry_ms, wire_error};

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::{
    auth::{now_ms, valid_user_id},
    broker::{Broker, UserPresence},
    codec::Push,
    config::{ChatConfig, LimitsConfig},
    delivery::{Hub, Recipient, Target},
    files::clean_name,
    proto::{self, RoomState, server_frame::Kind},
    ratelimit::{Rate, RateLimiter},
    store::{NewMessage, Range, Store, StoreError, dm_room},
};
use presence::LastSeen;
use sequencer::Sequencer;
use typing::TypingLimiter;

/// A submitted send: resolves with the `sent` reply once the message is durable.
pub type PendingSend =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<proto::Sent, ChatError>> + Send>>;

/// A publish that takes longer than this gives up its turn (the message is durable;
/// members repair the gap by log sync), so a stuck broker cannot stall a stripe.
const PUBLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Most attachments on one message.
pub const MAX_ATTACHMENTS: usize = 10;

pub struct Chat {
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    hub: Arc<Hub>,
    config: ChatConfig,
    sequencer: Arc<Sequencer>,
    typing: TypingLimiter,
    last_seen: LastSeen,
    limits: Limits,
}

/// The per-user limits chat enforces (see `config::LimitsConfig`).
struct Limits {
    sends: RateLimiter<String>,
    joins: RateLimiter<String>,
    /// `signal` commands per sender.
    signals: RateLimiter<String>,
    /// Signal bytes (kind + payload) per recipient, from all senders together.
    signal_bytes: RateLimiter<String>,
    /// `history` and `sync` requests per user.
    reads: RateLimiter<String>,
    max_rooms_per_user: u64,
}

impl Limits {
    fn new(l: &LimitsConfig) -> Self {
        Self {
            sends: RateLimiter::new(Rate::new(l.sends_per_second, l.sends_burst)),
            joins: RateLimiter::new(Rate::new(l.joins_per_second, l.joins_burst)),
            signals: RateLimiter::new(Rate::new(l.signals_per_second, l.signals_burst)),
            signal_bytes: RateLimiter::new(Rate::new(
                l.signal_bytes_per_second,
                l.signal_bytes_burst,
            )),
            reads: RateLimiter::new(Rate::new(l.reads_per_second, l.reads_burst)),
            max_rooms_per_user: l.max_rooms_per_user,
        }
    }
}

fn invalid(msg: impl Into<String>) -> ChatError {
    ChatError::InvalidArgument(msg.into())
}

fn room_state_push(room: &str, user: &str, action: &str, by: &str) -> Arc<Push> {
    Arc::new(Push::new(Kind::Membership(proto::Membership {
        room: room.into(),
        user: user.into(),
        action: action.into(),
        by: by.into(),
    })))
}

impl Chat {
    pub fn new(
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        hub: Arc<Hub>,
        config: ChatConfig,
    ) -> Self {
        Self {
            store,
            broker,
            hub,
            typing: TypingLimiter::new(config.typing_interval),
            config,
            sequencer: Arc::new(Sequencer::new()),
            last_seen: LastSeen::new(),
            limits: Limits::new(&LimitsConfig::off()),
        }
    }

    /// The durable log (for `/readyz`'s health check).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Applies the per-user limits of `limits` (none by default).
    pub fn with_limits(mut self, limits: &LimitsConfig) -> Self {
        self.limits = Limits::new(limits);
        self
    }

    /// A send (or a join) of `user` may go ahead now, or `RateLimited` with a hint.
    fn spend(
        bucket: &RateLimiter<String>,
        user: &str,
        what: &'static str,
    ) -> Result<(), ChatError> {
        bucket
            .check(user)
            .map_err(|retry_after| ChatError::RateLimited { what, retry_after })
    }

    /// `user` may become a member of one more room: a quick refusal that spends no join
    /// token. Only a hint under concurrency — the store enforces `max_rooms_per_user`
    /// atomically when the membership is written (`Store::join`, `create_room`,
    /// `ensure_dm`).
    async fn check_room_quota(&self, user: &str) -> Result<(), ChatError> {
        let max = self.limits.max_rooms_per_user;
        if max > 0 && self.store.rooms_of(user).await?.len() as u64 >= max {
            return Err(ChatError::LimitExceeded(format!(
                "{user} is a member of {max} rooms already (limits.max_rooms_per_user)"
            )));
        }
        Ok(())
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
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
            .all(|b| b.is_ascii_alphanumeric() || b"_.:@|+-".contains(&b))
        {
            return Err(invalid(
                "room name may only contain A-Z a-z 0-9 _ . : @ | + -",
            ));
        }
        Ok(())
    }

    fn check_message(
        &self,
        client_msg_id: &str,
        body: &str,
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), ChatError> {
        let c = &self.config;
        if client_msg_id.is_empty() || client_msg_id.len() > c.max_client_msg_id_bytes {
            return Err(invalid(format!(
                "client_msg_id must be 1..={} bytes",
                c.max_client_msg_id_bytes
            )));
        }
        // PostgreSQL cannot keep U+0000 in text: refused on every store alike, before
        // anything is written.
        if client_msg_id.contains('\0')
            || body.contains('\0')
            || metadata
                .iter()
                .any(|(k, v)| k.contains('\0') || v.contains('\0'))
        {
            return Err(invalid(
                "body, metadata and client_msg_id may not contain U+0000 (NUL)",
            ));
        }
        let meta_bytes: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        if body.len() + meta_bytes > c.max_body_bytes {
            return Err(invalid(format!(
                "body and metadata exceed {} bytes",
                c.max_body_bytes
            )));
        }
        if metadata.len() > c.max_metadata_entries {
            return Err(invalid(format!(
                "more than {} metadata entries",
                c.max_metadata_entries
            )));
        }
        Ok(())
    }

    fn check_user(user: &str) -> Result<(), ChatError> {
        if valid_user_id(user) {
            Ok(())
        } else {
            Err(invalid(format!("bad user id {user:?}")))
        }
    }

    async fn publish(&self, target: Target, push: Arc<Push>) {
        if let Err(e) = self.broker.publish(target, push).await {
            tracing::warn!(error = %e, "publish failed");
        }
    }

    /// Members read anything; non-members read public rooms only.
    async fn check_read(&self, room: &str, user: &str) -> Result<(), ChatError> {
        self.check_room(room)?;
        let meta = self
            .store
            .room(room)
            .await?
            .ok_or_else(|| ChatError::NotFound(room.into()))?;
        if meta.private && !self.store.is_member(room, user).await? {
            return Err(ChatError::NotMember(room.into()));
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

    /// Registers a session for live delivery and returns its user's rooms. The user's
    /// first session here makes it online for the users it shares a room with.
    pub async fn attach(&self, recipient: Arc<dyn Recipient>) -> Result<Vec<RoomState>, ChatError> {
        let user = recipient.user().to_string();
        // Attach first, then read the rooms: a join racing with this attach then reaches
        // the hub entry either way.
        let first = self.hub.attach(recipient);
        if first {
            self.broker.user_online(&user);
        }
        let rooms = self.store.rooms_of(&user).await?;
        for r in &rooms {
            self.hub.joined(&user, &r.room);
            self.broker.watch_room(&r.room, r.last_seq);
        }
        if first && !self.broker.online_elsewhere(&user).await {
            let push = Arc::new(Push::new(Kind::Presence(proto::Presence {
                user: user.clone(),
                online: true,
                last_seen: 0,
            })));
            let rooms = self.small_rooms(&rooms);
            if !rooms.is_empty() {
                self.publish(Target::CoMembers { rooms, user }, push).await;
            }
        }
        Ok(rooms)
    }

    fn is_large(&self, members: u64) -> bool {
        members > self.config.large_room_members
    }

    /// The rooms small enough to broadcast presence through.
    fn small_rooms(&self, rooms: &[RoomState]) -> Vec<String> {
        rooms
            .iter()
            .filter(|r| !self.is_large(r.members))
            .map(|r| r.room.clone())
            .collect()
    }

    /// Who hears about a membership change or receipt concerning `user`: the room, or in
    /// a large room only the user's own sessions.
    fn audience(&self, room: &str, user: &str, members: u64) -> Target {
        if self.is_large(members) {
            Target::User(user.to_string())
        } else {
            Target::Room(room.to_string())
        }
    }

    async fn members_of(&self, room: &str) -> Result<u64, ChatError> {
        Ok(self.store.room(room).await?.map_or(0, |m| m.members))
    }

    /// Removes a session from live delivery; the user's last one makes it offline.
    pub fn detach(self: &Arc<Self>, user: &str, recipient_id: u64) {
        let Some(local_rooms) = self.hub.detach(user, recipient_id) else {
            return;
        };
        let now = now_ms();
        self.last_seen.went_offline(user, now);
        self.broker.user_offline(user, now);
        self.broker.unwatch_rooms(&local_rooms);
        if local_rooms.is_empty() {
            // In no room: nobody to tell, and no need to read the store.
            return;
        }
        let push = Arc::new(Push::new(Kind::Presence(proto::Presence {
            user: user.to_string(),
            online: false,
            last_seen: now,
        })));
        let this = self.clone();
        let user = user.to_string();
        tokio::spawn(async move {
            if this.broker.online_elsewhere(&user).await {
                return;
            }
            let rooms = match this.store.rooms_of(&user).await {
                Ok(rooms) => this.small_rooms(&rooms),
                Err(e) => {
                    tracing::warn!(error = %e, "presence: rooms_of failed");
                    return;
                }
            };
            if !rooms.is_empty() {
                this.publish(Target::CoMembers { rooms, user }, push).await;
            }
        });
    }

    pub async fn rooms_of(&self, user: &str) -> Result<Vec<RoomState>, ChatError> {
        Ok(self.store.rooms_of(user).await?)
    }

    pub async fn create_room(
        &self,
        user: &str,
        req: proto::CreateRoom,
    ) -> Result<RoomState, ChatError> {
        self.check_room(&req.room)?;
        if req.room.starts_with("dm:") {
            return Err(invalid(
                "room names starting with dm: are reserved for direct messages",
            ));
        }
        self.check_room_quota(user).await?;
        Self::spend(&self.limits.joins, user, "joins")?;
        let max = self.limits.max_rooms_per_user;
        if !self
            .store
            .create_room(&req.room, user, req.private, max)
            .await?
        {
            return Err(ChatError::RoomExists(req.room));
        }
        self.hub.joined(user, &req.room);
        self.broker.member_joined(user, &req.room, 0);
        self.publish(
            Target::Room(req.room.clone()),
            room_state_push(&req.room, user, "joined", ""),
        )
        .await;
        Ok(RoomState {
            room: req.room,
            private: req.private,
            members: 1,
            ..Default::default()
        })
    }

    pub async fn join(&self, user: &str, room: &str) -> Result<proto::Joined, ChatError> {
        self.check_room(room)?;
        let existing = self.store.room(room).await?;
        match &existing {
            Some(meta) if meta.private => {
                if self.store.is_member(room, user).await? {
                    return Ok(proto::Joined {
                        room: room.into(),
                        last_seq: meta.last_seq,
                    });
                }
                return Err(ChatError::Forbidden(format!(
                    "room {room:?} is private: ask a member for an invite"
                )));
            }
            None if room.starts_with("dm:") => {
                return Err(ChatError::Forbidden(
                    "direct-message rooms are created by sending".into(),
                ));
            }
            _ => {}
        }
        let already = self.store.is_member(room, user).await?;
        let meta = match existing {
            // A member joining again (every reconnect does) writes nothing: the room and
            // the membership are as they were read.
            Some(meta) if already => meta,
            _ => {
                if !already {
                    // A refused join costs no token: the quota first.
                    self.check_room_quota(user).await?;
                    Self::spend(&self.limits.joins, user, "joins")?;
                }
                self.store
                    .join(room, user, self.limits.max_rooms_per_user)
                    .await?
            }
        };
        self.hub.joined(user, room);
        self.broker.member_joined(user, room, meta.last_seq);
        if !already {
            let to = self.audience(room, user, meta.members);
            self.publish(to, room_state_push(room, user, "joined", ""))
                .await;
        }
        Ok(proto::Joined {
            room: room.to_string(),
            last_seq: meta.last_seq,
        })
    }

    pub async fn leave(&self, user: &str, room: &str) -> Result<proto::Left, ChatError> {
        self.check_room(room)?;
        if !self.store.leave(room, user).await? {
            return Err(ChatError::NotMember(room.to_string()));
        }
        let to = self.audience(room, user, self.members_of(room).await?);
        self.publish(to, room_state_push(room, user, "left", ""))
            .await;
        self.hub.left(user, room);
        self.broker.member_left(user, room);
        Ok(proto::Left {
            room: room.to_string(),
        })
    }

    pub async fn invite(&self, user: &str, req: proto::Invite) -> Result<proto::Done, ChatError> {
        Self::check_user(&req.user)?;
        self.check_member(&req.room, user).await?;
        if req.room.starts_with("dm:") {
            return Err(ChatError::Forbidden(
                "direct-message rooms have exactly two members".into(),
            ));
        }
        if !self.store.is_member(&req.room, &req.user).await? {
            self.check_room_quota(&req.user).await?;
            Self::spend(&self.limits.joins, user, "joins")?;
            let max = self.limits.max_rooms_per_user;
            let meta = self.store.join(&req.room, &req.user, max).await?;
            self.hub.joined(&req.user, &req.room);
            self.broker
                .member_joined(&req.user, &req.room, meta.last_seq);
            let to = self.audience(&req.room, &req.user, meta.members);
            self.publish(to, room_state_push(&req.room, &req.user, "invited", user))
                .await;
        }
        Ok(proto::Done {})
    }

    pub async fn members(&self, user: &str, room: &str) -> Result<proto::MemberList, ChatError> {
        self.check_read(room, user).await?;
        Ok(proto::MemberList {
            room: room.into(),
            users: self.store.members(room).await?,
        })
    }

    /// Posts a message. With `to_user` instead of `room`, a direct message: the pair's DM
    /// room is created on first use.
    pub async fn send(&self, user: &str, send: proto::Send) -> Result<proto::Sent, ChatError> {
        self.submit_send(user, send).await?.await
    }

    /// Validates and submits a send; the returned future resolves when the message is
    /// durable (the `sent` reply). The message's place in the room's order is fixed when
    /// this returns, so a connection may submit its next command before the previous
    /// send has committed: that is how one client pipelines sends through group commits.
    pub async fn submit_send(
        &self,
        user: &str,
        mut send: proto::Send,
    ) -> Result<PendingSend, ChatError> {
        self.check_message(&send.client_msg_id, &send.body, &send.metadata)?;
        Self::spend(&self.limits.sends, user, "messages")?;
        let attachments = self
            .resolve_attachments(user, std::mem::take(&mut send.attachments))
            .await?;
        if !send.to_user.is_empty() {
            if !send.room.is_empty() {
                return Err(invalid("give room or to_user, not both"));
            }
            Self::check_user(&send.to_user)?;
            if send.to_user == user {
                return Err(invalid("cannot send a direct message to yourself"));
            }
            let room = dm_room(user, &send.to_user);
            if self.store.room(&room).await?.is_none() {
                self.check_room_quota(user).await?;
                self.check_room_quota(&send.to_user).await?;
                let max = self.limits.max_rooms_per_user;
                self.store
                    .ensure_dm(&room, user, &send.to_user, max)
                    .await?;
                self.hub.joined(user, &room);
                self.hub.joined(&send.to_user, &room);
                self.broker.member_joined(user, &room, 0);
                self.broker.member_joined(&send.to_user, &room, 0);
            }
            send.room = room;
        } else {
            self.check_member(&send.room, user).await?;
        }
        Ok(self.submit(NewMessage {
            room: send.room,
            sender: user.to_string(),
            client_msg_id: send.client_msg_id,
            body: send.body,
            metadata: send.metadata,
            ts: now_ms(),
            attachments,
        }))
    }

    /// The attachments of a send, filled in from the uploads: only files `user` uploaded
    /// (anything else reads as unknown, so ids cannot be probed); the client may only
    /// choose the shown `name`, which is cleaned like an upload's (`files::clean_name`).
    async fn resolve_attachments(
        &self,
        user: &str,
        wanted: Vec<proto::Attachment>,
    ) -> Result<Vec<proto::Attachment>, ChatError> {
        if wanted.len() > MAX_ATTACHMENTS {
            return Err(invalid(format!(
                "at most {MAX_ATTACHMENTS} attachments per message"
            )));
        }
        let mut out = Vec::with_capacity(wanted.len());
        for a in wanted {
            if a.name.len() > 255 {
                return Err(invalid("attachment name longer than 255 bytes"));
            }
            match self.store.file(&a.file_id).await? {
                // Clients may save the file as this name: cleaned exactly like an
                // upload's (an empty result shows the upload's own name).
                Some(f) if f.owner == user => out.push(f.attachment(&clean_name(&a.name))),
                _ => return Err(invalid(format!("unknown file {:?}", a.file_id))),
            }
        }
        Ok(out)
    }

    /// A server-side post (admin HTTP API): no membership check, same limits as `send`.
    pub async fn post_as_admin(&self, message: NewMessage) -> Result<proto::Sent, ChatError> {
        self.check_room(&message.room)?;
        Self::check_user(&message.sender)?;
        self.check_message(&message.client_msg_id, &message.body, &message.metadata)?;
        self.submit(message).await
    }

    /// Appends and publishes in seq order (see the module comment). The order is fixed
    /// now; the publishing part runs in its own task, so a caller that goes away cannot
    /// stall its stripe. The returned future resolves with the `sent` reply.
    fn submit(&self, message: NewMessage) -> PendingSend {
        let store = &self.store;
        let (mut turn, appended) = self
            .sequencer
            .order(&message.room.clone(), || store.append(message));
        let (tx, rx) = oneshot::channel();
        let broker = self.broker.clone();
        tokio::spawn(async move {
            let result = appended.await;
            // The sender's ack goes as soon as the message is durable (before the push,
            // which waits for its turn).
            let _ = tx.send(result.clone());
            turn.wait().await;
            if let Ok(a) = &result
                && !a.duplicate
            {
                let m = &a.message;
                let push = Arc::new(Push::new(Kind::Message((**m).clone())));
                let publish = broker.publish(Target::Room(m.room.clone()), push);
                match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
                    Ok(Ok(())) => {}
                    // The message is durable; members repair the gap by log sync.
                    Ok(Err(e)) => {
                        tracing::warn!(room = %m.room, seq = m.seq, error = %e, "publish failed")
                    }
                    Err(_) => tracing::warn!(room = %m.room, seq = m.seq, "publish timed out"),
                }
            }
            // Dropping the turn hands the stripe on, also when this task panics.
            drop(turn);
        });
        Box::pin(async move {
            let appended = rx
                .await
                .map_err(|_| StoreError::Backend("append task failed".into()))?;
            let appended = appended.map_err(|e| match e {
                StoreError::NoSuchRoom(r) => ChatError::NotFound(r),
                e => ChatError::Store(e),
            })?;
            let m = &appended.message;
            Ok(proto::Sent {
                room: m.room.clone(),
                seq: m.seq,
                ts: m.ts,
                duplicate: appended.duplicate,
            })
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

    /// A page of one room's log: members read any room, other users public rooms only
    /// (as `sync` and `members`). Counted against `limits.reads_per_second` and cut to
    /// `chat.max_reply_bytes` (then `more` is set, and the client pages on).
    pub async fn history(
        &self,
        user: &str,
        req: proto::History,
    ) -> Result<proto::HistoryPage, ChatError> {
        self.check_room(&req.room)?;
        let range = match (req.after_seq, req.before_seq) {
            (Some(_), before) if before != 0 => {
                return Err(invalid("give before_seq or after_seq, not both"));
            }
            (Some(after), _) => Range::After(after),
            (None, 0) => Range::Before(u64::MAX),
            (None, before) => Range::Before(before),
        };
        Self::spend(&self.limits.reads, user, "history and sync requests")?;
        self.check_read(&req.room, user).await?;
        let page = self
            .store
            .history(&req.room, range, self.page_limit(req.limit))
            .await?;
        let mut budget = self.config.max_reply_bytes;
        let newest_first = matches!(range, Range::Before(_));
        let (messages, cut) = fit(page.messages, &mut budget, newest_first, true);
        Ok(proto::HistoryPage {
            room: req.room,
            messages,
            more: page.more || cut,
        })
    }

    /// Log sync: for each listed room, what came after the client's last seq (who may
    /// read what as for `history`). Rooms are answered in name order until the messages
    /// reach `chat.max_reply_bytes`; the page where that happens and every room after it
    /// come back with `more` set (the latter with no messages): the client syncs the
    /// rooms with `more` again from the seqs it now has, as it does for a full page. So
    /// the cut needs no field of its own, and older clients already follow it.
    pub async fn sync(&self, user: &str, req: proto::Sync) -> Result<proto::SyncResult, ChatError> {
        const MAX_ROOMS: usize = 1000;
        if req.rooms.len() > MAX_ROOMS {
            return Err(invalid(format!("sync at most {MAX_ROOMS} rooms at once")));
        }
        for room in req.rooms.keys() {
            self.check_room(room)?;
        }
        Self::spend(&self.limits.reads, user, "history and sync requests")?;
        let limit = self.page_limit(req.limit);
        // One read for the rooms the user is in; only the others need a look each.
        let member_of: std::collections::HashSet<String> = if req.rooms.is_empty() {
            Default::default()
        } else {
            self.store
                .rooms_of(user)
                .await?
                .into_iter()
                .map(|r| r.room)
                .collect()
        };
        // Every room is checked before any is read: the answer (an error for a room the
        // user may not read) does not depend on where the reply is cut.
        for room in req.rooms.keys() {
            if !member_of.contains(room) {
                self.check_read(room, user).await?;
            }
        }
        let mut budget = self.config.max_reply_bytes;
        let mut cut = false;
        let mut rooms = Vec::with_capacity(req.rooms.len());
        // A BTreeMap: in name order.
        for (room, last_seq) in req.rooms {
            if cut {
                rooms.push(proto::HistoryPage {
                    room,
                    messages: Vec::new(),
                    more: true,
                });
                continue;
            }
            let page = self
                .store
                .history(&room, Range::After(last_seq), limit)
                .await?;
            // The first message of the reply goes whatever its size: every reply
            // makes progress.
            let first = budget == self.config.max_reply_bytes;
            let (messages, left_out) = fit(page.messages, &mut budget, false, first);
            cut = left_out;
            rooms.push(proto::HistoryPage {
                room,
                messages,
                more: page.more || left_out,
            });
        }
        Ok(proto::SyncResult { rooms })
    }

    /// Moves the user's read marker; all members' sessions (the user's own included, for
    /// badge sync) get a receipt — in a large room only the user's own — when it moved.
    /// A read that does not move the marker (repeated, or behind it) publishes nothing.
    pub async fn read(&self, user: &str, req: proto::Read) -> Result<proto::Done, ChatError> {
        self.check_room(&req.room)?;
        let Some(marker) = self.store.set_read(&req.room, user, req.seq).await? else {
            return Err(ChatError::NotMember(req.room));
        };
        if !marker.moved {
            return Ok(proto::Done {});
        }
        let push = Arc::new(Push::new(Kind::Receipt(proto::Receipt {
            room: req.room.clone(),
            user: user.into(),
            seq: marker.seq,
            unread: marker.unread,
        })));
        let to = self.audience(&req.room, user, self.members_of(&req.room).await?);
        self.publish(to, push).await;
        Ok(proto::Done {})
    }

    pub async fn typing(&self, user: &str, req: proto::Typing) -> Result<proto::Done, ChatError> {
        self.check_member(&req.room, user).await?;
        if let Err(retry_after) = self.typing.check(user, &req.room) {
            return Err(ChatError::RateLimited {
                what: "typing events",
                retry_after,
            });
        }
        if self.is_large(self.members_of(&req.room).await?) {
            // Accepted, but not broadcast: one push per member is too much for a hint.
            return Ok(proto::Done {});
        }
        let push = Arc::new(Push::new(Kind::Typing(proto::TypingEvent {
            room: req.room.clone(),
            user: user.into(),
        })));
        self.publish(
            Target::RoomExcept {
                room: req.room,
                user: user.into(),
            },
            push,
        )
        .await;
        Ok(proto::Done {})
    }

    pub async fn presence(
        &self,
        req: proto::PresenceQuery,
    ) -> Result<proto::PresenceList, ChatError> {
        if req.users.len() > 500 {
            return Err(invalid("ask for at most 500 users at once"));
        }
        if let Some(cluster) = self.cluster_presence(&req.users).await? {
            let users = req
                .users
                .into_iter()
                .zip(cluster)
                .map(|(user, p)| proto::Presence {
                    user,
                    online: p.online,
                    last_seen: p.last_seen,
                })
                .collect();
            return Ok(proto::PresenceList { users });
        }
        let users = req
            .users
            .into_iter()
            .map(|user| {
                let online = self.hub.is_local(&user);
                let seen = if online { 0 } else { self.last_seen.get(&user) };
                proto::Presence {
                    user,
                    online,
                    last_seen: seen,
                }
            })
            .collect();
        Ok(proto::PresenceList { users })
    }

    /// Hands a payload to `to_user`'s sessions. Only to a user the sender shares a room
    /// with (a direct-message room counts) or to the sender's own sessions; the sender
    /// is held to `limits.signals_per_second`, and all senders together to
    /// `limits.signal_bytes_per_second` per recipient. A recipient's session drops a
    /// signal rather than overflow its queue (see `Session`'s push), so no sender can get
    /// another user disconnected as a slow consumer.
    pub async fn signal(&self, user: &str, req: proto::Signal) -> Result<proto::Done, ChatError> {
        Self::check_user(&req.to_user)?;
        let bytes = req.payload.len() + req.kind.len();
        if bytes > self.config.max_body_bytes {
            return Err(invalid(format!(
                "signal exceeds {} bytes",
                self.config.max_body_bytes
            )));
        }
        Self::spend(&self.limits.signals, user, "signals")?;
        let own = req.to_user == user;
        if !own && !self.store.share_a_room(user, &req.to_user).await? {
            return Err(ChatError::Forbidden(format!(
                "you share no room with {:?}: signal only users you share a room with",
                req.to_user
            )));
        }
        let online = self.hub.is_local(&req.to_user)
            || self
                .cluster_presence(std::slice::from_ref(&req.to_user))
                .await?
                .is_some_and(|p| p.first().is_some_and(|p| p.online));
        if !online {
            return Err(ChatError::UserOffline(req.to_user));
        }
        if !own {
            self.limits
                .signal_bytes
                .check_cost(&req.to_user, bytes.max(1) as f64)
                .map_err(|retry_after| ChatError::RateLimited {
                    what: "signal bytes to this user",
                    retry_after,
                })?;
        }
        let push = Arc::new(Push::new(Kind::Signal(proto::SignalEvent {
            from_user: user.into(),
            kind: req.kind,
            payload: req.payload,
        })));
        self.publish(Target::User(req.to_user), push).await;
        Ok(proto::Done {})
    }

    /// Presence as the whole cluster sees it (`None` with the in-process broker, where
    /// the hub knows everything).
    async fn cluster_presence(
        &self,
        users: &[String],
    ) -> Result<Option<Vec<UserPresence>>, ChatError> {
        self.broker.presence(users).await.map_err(ChatError::from)
    }

    /// Tells co-members that users of a dead instance went offline (run periodically;
    /// a no-op with the in-process broker).
    pub async fn sweep_presence(&self) {
        for (user, last_seen) in self.broker.orphaned_users().await {
            if self.hub.is_local(&user) {
                continue;
            }
            let rooms = match self.store.rooms_of(&user).await {
                Ok(rooms) => self.small_rooms(&rooms),
                Err(e) => {
                    tracing::warn!(error = %e, "presence: rooms_of failed");
                    continue;
                }
            };
            if rooms.is_empty() {
                continue;
            }
            let push = Arc::new(Push::new(Kind::Presence(proto::Presence {
                user: user.clone(),
                online: false,
                last_seen,
            })));
            self.publish(Target::CoMembers { rooms, user }, push).await;
        }
    }

    /// The broker (for `/readyz`).
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// A server-side announcement to a room's members or (room `None`) to everyone.
    pub async fn announce(&self, room: Option<String>, body: String) -> Result<(), ChatError> {
        if body.is_empty() || body.len() > self.config.max_body_bytes {
            return Err(invalid(format!(
                "body must be 1..={} bytes",
                self.config.max_body_bytes
            )));
        }
        let target = match &room {
            Some(r) => {
                self.check_room(r)?;
                if self.store.room(r).await?.is_none() {
                    return Err(ChatError::NotFound(r.clone()));
                }
                Target::Room(r.clone())
            }
            None => Target::All,
        };
        let push = Arc::new(Push::new(Kind::Announcement(proto::Announcement {
            room: room.unwrap_or_default(),
            body,
            ts: now_ms(),
        })));
        self.publish(target, push).await;
        Ok(())
    }
}

/// The messages of a page that fit in `budget` bytes (protobuf size), kept from the end
/// nearest the reader's position: the oldest for an `After` page, the newest for a
/// `Before` page (`newest_first`); `budget` is charged. Returns them and whether any were
/// left out. With `at_least_one` the first kept message goes even when it alone is over
/// the budget, so paging always makes progress.
fn fit(
    messages: Vec<Arc<proto::Message>>,
    budget: &mut usize,
    newest_first: bool,
    at_least_one: bool,
) -> (Vec<proto::Message>, bool) {
    use prost::Message as _;
    let total = messages.len();
    let mut kept: Vec<proto::Message> = Vec::with_capacity(total);
    let mut take = |m: &Arc<proto::Message>, kept: &mut Vec<proto::Message>| {
        // The field tag and length prefix around each message: a few bytes.
        let cost = m.encoded_len() + 8;
        if cost > *budget && !(at_least_one && kept.is_empty()) {
            return false;
        }
        *budget = budget.saturating_sub(cost);
        kept.push((**m).clone());
        true
    };
    if newest_first {
        for m in messages.iter().rev() {
            if !take(m, &mut kept) {
                break;
            }
        }
        kept.reverse();
    } else {
        for m in &messages {
            if !take(m, &mut kept) {
                break;
            }
        }
    }
    let cut = kept.len() < total;
    (kept, cut)
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    };

    use async_trait::async_trait;

    use super::*;
    use crate::{
        broker::{BrokerError, local::LocalBroker},
        config::StoreConfig,
        store::sqlite::SqliteStore,
    };

    /// A broker whose next room publish panics once armed (a bug in a backend), and
    /// that otherwise delivers locally.
    struct PanicsOnce {
        armed: AtomicBool,
        local: LocalBroker,
    }

    #[async_trait]
    impl Broker for PanicsOnce {
        async fn publish(&self, target: Target, push: Arc<Push>) -> Result<(), BrokerError> {
            if matches!(target, Target::Room(_)) && self.armed.swap(false, Ordering::SeqCst) {
                panic!("broker bug");
            }
            self.local.publish(target, push).await
        }
    }

    /// Collects the seqs of the messages pushed to it.
    struct Inbox {
        id: u64,
        seqs: Mutex<Vec<u64>>,
    }

    impl Recipient for Inbox {
        fn recipient_id(&self) -> u64 {
            self.id
        }
        fn user(&self) -> &str {
            "bob"
        }
        fn push(&self, push: &Arc<Push>) {
            let frame: proto::ServerFrame =
                prost::Message::decode(&push.frame(crate::codec::Encoding::Proto, 1)[..]).unwrap();
            if let Some(Kind::Message(m)) = frame.kind {
                self.seqs.lock().unwrap().push(m.seq);
            }
        }
    }

    #[tokio::test]
    async fn a_panic_in_publish_does_not_wedge_the_room() {
        let hub = Arc::new(Hub::new());
        let broker = Arc::new(PanicsOnce {
            armed: AtomicBool::new(false),
            local: LocalBroker::new(hub.clone()),
        });
        let store = Arc::new(
            SqliteStore::open(&StoreConfig {
                path: ":memory:".into(),
                ..StoreConfig::default()
            })
            .unwrap(),
        );
        let chat = Chat::new(store, broker.clone(), hub, ChatConfig::default());
        let bob = Arc::new(Inbox {
            id: 1,
            seqs: Mutex::default(),
        });
        chat.join("ann", "r").await.unwrap();
        chat.join("bob", "r").await.unwrap();
        chat.attach(bob.clone()).await.unwrap();
        let send = |id: &str| proto::Send {
            room: "r".into(),
            client_msg_id: id.into(),
            body: id.into(),
            ..Default::default()
        };
        broker.armed.store(true, Ordering::SeqCst);
        // The publish of message 1 panics; it is durable all the same.
        assert_eq!(chat.send("ann", send("1")).await.unwrap().seq, 1);
        // Messages 2 and 3 of the same room (so the same stripe) are still published.
        assert_eq!(chat.send("ann", send("2")).await.unwrap().seq, 2);
        assert_eq!(chat.send("ann", send("3")).await.unwrap().seq, 3);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while bob.seqs.lock().unwrap().len() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stripe is wedged: {:?}",
                bob.seqs.lock().unwrap()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // 1 was lost to the panic (log sync repairs it); 2 and 3 came, in order.
        assert_eq!(*bob.seqs.lock().unwrap(), [2, 3]);
    }
}
