//! Messages: send (to a room, or to a user through their direct-message room), with
//! attachments; the admin post; history and sync (log reads within a reply budget);
//! announcements.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::{Chat, ChatError, MAX_ATTACHMENTS, PUBLISH_TIMEOUT, PendingSend, invalid};
use crate::{
    auth::now_ms,
    codec::Push,
    delivery::Target,
    files::clean_name,
    proto::{self, server_frame::Kind},
    store::{NewMessage, Range, StoreError, dm_room},
};

impl Chat {
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
                self.hub.joined(user, &room, Some(2));
                self.hub.joined(&send.to_user, &room, Some(2));
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
    /// stall its stripe. The turn covers only handing the push to the broker, which
    /// queues it without waiting for Redis (`Broker::publish`): a hot room's rate is not
    /// bound by one Redis round trip per message. The returned future resolves with the
    /// `sent` reply.
    fn submit(&self, message: NewMessage) -> PendingSend {
        let store = &self.store;
        let (mut turn, appended) = self
            .sequencer
            .order(&message.room.clone(), || store.append(message));
        let (tx, rx) = oneshot::channel();
        let broker = self.broker.clone();
        let changes = self.changes.clone();
        tokio::spawn(async move {
            let result = appended.await;
            if result.is_ok() {
                // Counted before the ack and the push (`Chat::changes`).
                changes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
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
