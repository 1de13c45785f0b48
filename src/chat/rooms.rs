//! Rooms and membership: the user's room list, the public room browser, create, join, leave,
//! invite, members.

use super::{Chat, ChatError, invalid, room_state_push};
use crate::{
    delivery::Target,
    proto::{self, RoomState},
    store::{NewRoom, RoomMeta},
};

/// Most rooms a [`RoomsSeen`] keeps: a connect of a user in more keeps none (its joins
/// read as before), so a connection holds at most this many names for its joins.
const SEEN_ROOMS: usize = 16;

/// The rooms a connect read, kept by its connection for the joins that follow (a client
/// that reconnects joins its rooms again): each may be taken once, for a join of that
/// room, and is good only while [`Chat::changes`] still reads `stamp`. Made only where
/// that count sees every change (the in-process broker).
pub struct RoomsSeen {
    stamp: u64,
    /// Inline for a user in one or two rooms (one allocation less per connect).
    rooms: smallvec::SmallVec<[(Box<str>, RoomMeta); 2]>,
}

/// One room of a [`RoomsSeen`], taken for its join ([`Chat::join_seen`]).
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    stamp: u64,
    meta: RoomMeta,
}

impl RoomsSeen {
    /// The room as the connect read it, if it did (then it is no longer kept).
    pub fn take(&mut self, room: &str) -> Option<Seen> {
        let i = self.rooms.iter().position(|(r, _)| &**r == room)?;
        let (_, meta) = self.rooms.swap_remove(i);
        Some(Seen {
            stamp: self.stamp,
            meta,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

/// Public rooms in one room-browser page when the client names no limit.
pub const PUBLIC_ROOMS_PAGE: usize = 50;
/// The most public rooms in one room-browser page, whatever the client asks for.
pub const PUBLIC_ROOMS_MAX: usize = 200;

impl Chat {
    pub async fn rooms_of(&self, user: &str) -> Result<Vec<RoomState>, ChatError> {
        Ok(self.store.rooms_of(user).await?)
    }

    /// [`Chat::rooms_of`] for a connect: also what the joins that follow it may take
    /// from this read ([`RoomsSeen`]).
    pub async fn rooms_seen(
        &self,
        user: &str,
    ) -> Result<(Vec<RoomState>, Option<Box<RoomsSeen>>), ChatError> {
        // The count before the read: a change it may have missed moves the count.
        let stamp = self.changes_now();
        let rooms = self.store.rooms_of(user).await?;
        let seen = Self::seen(stamp, &rooms);
        Ok((rooms, seen))
    }

    /// What joins may take from `rooms`, read when [`Chat::changes`] read `stamp`.
    pub(super) fn seen(stamp: Option<u64>, rooms: &[RoomState]) -> Option<Box<RoomsSeen>> {
        let stamp = stamp?;
        if rooms.is_empty() || rooms.len() > SEEN_ROOMS {
            return None;
        }
        let rooms = rooms
            .iter()
            .map(|r| {
                let meta = RoomMeta {
                    private: r.private,
                    last_seq: r.last_seq,
                    members: r.members,
                };
                (r.room.as_str().into(), meta)
            })
            .collect();
        Some(Box::new(RoomsSeen { stamp, rooms }))
    }

    /// The room browser: a page of public rooms by name after `req.after`, and whether
    /// more follow.
    pub async fn public_rooms(
        &self,
        user: &str,
        req: &proto::Rooms,
    ) -> Result<proto::RoomList, ChatError> {
        if !req.after.is_empty() {
            self.check_room(&req.after)?;
        }
        Self::spend(&self.limits.reads, user, "room-browser requests")?;
        let limit = match req.limit {
            0 => PUBLIC_ROOMS_PAGE,
            n => (n as usize).min(PUBLIC_ROOMS_MAX),
        };
        // One past the page tells whether more follow.
        let mut rooms = self.store.public_rooms(&req.after, limit + 1).await?;
        let more = rooms.len() > limit;
        rooms.truncate(limit);
        Ok(proto::RoomList { rooms, more })
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
            .create_room(
                NewRoom {
                    name: &req.room,
                    creator: user,
                    private: req.private,
                },
                max,
            )
            .await?
        {
            return Err(ChatError::RoomExists(req.room));
        }
        self.hub.joined(user, &req.room, Some(1));
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
        self.join_seen(user, room, None).await
    }

    /// [`Chat::join`], with what the connection's connect read of the room, if it did
    /// ([`RoomsSeen`]): while nothing a join reads has changed since that read (no
    /// message committed, no member left, on the one instance there is), the room and the
    /// membership are as it read them, and the join reads nothing. Otherwise, or with a
    /// broker that reaches other instances, it reads them itself.
    pub async fn join_seen(
        &self,
        user: &str,
        room: &str,
        seen: Option<Seen>,
    ) -> Result<proto::Joined, ChatError> {
        self.check_room(room)?;
        // The room and the membership in one read: every reconnect joins again.
        let found = match seen {
            Some(s) if self.changes_now() == Some(s.stamp) => Some((s.meta, true)),
            _ => self.store.room_for(room, user).await?,
        };
        let already = found.as_ref().is_some_and(|(_, member)| *member);
        match &found {
            Some((meta, _)) if meta.private => {
                if already {
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
        let existing = found.map(|(meta, _)| meta);
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
        self.hub.joined(user, room, Some(meta.members));
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
        self.changed();
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
            self.hub.joined(&req.user, &req.room, Some(meta.members));
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
}
