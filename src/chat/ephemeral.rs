//! The chat events that are not stored: presence (a user's sessions coming and going,
//! last seen), typing and signals (WebRTC or any app payload, user to user).

use std::sync::Arc;

use super::{Chat, ChatError, invalid};
use crate::{
    auth::now_ms,
    broker::UserPresence,
    codec::Push,
    delivery::{KnownRooms, Recipient, Target},
    proto::{self, RoomState, server_frame::Kind},
};

impl Chat {
    /// Registers a session for live delivery and returns its user's rooms, with what the
    /// joins that follow may take from that read ([`super::RoomsSeen`]). The user's first
    /// session here makes it online for the users it shares a room with.
    pub async fn attach(
        &self,
        recipient: Arc<dyn Recipient>,
    ) -> Result<(Vec<RoomState>, Option<Box<super::RoomsSeen>>), ChatError> {
        let user = recipient.user_key();
        // Attach first, then read the rooms: a join racing with this attach then reaches
        // the hub entry either way.
        let first = self.hub.attach(recipient);
        if first {
            self.broker.user_online(&user);
        }
        let stamp = self.changes_now();
        let rooms = self.store.rooms_of(&user).await?;
        for r in &rooms {
            self.hub.joined(&user, &r.room, Some(r.members));
            self.broker.watch_room(&r.room, r.last_seq);
        }
        if first
            && self.anyone_to_tell(&user, rooms.iter().map(|r| (&*r.room, Some(r.members))))
            && !self.online_elsewhere(&user).await
        {
            self.tell_co_members(user.to_string(), &rooms, true, 0)
                .await;
        }
        let seen = Self::seen(stamp, &rooms);
        Ok((rooms, seen))
    }

    /// [`crate::broker::Broker::online_elsewhere`], with no call (and no boxed future)
    /// where the hub is the whole picture.
    async fn online_elsewhere(&self, user: &str) -> bool {
        !self.broker.local_only() && self.broker.online_elsewhere(user).await
    }

    /// Whether a presence push about `user` through its `rooms` (each with its member
    /// count, if known) can reach anyone. Always with a broker that reaches other
    /// instances; with the in-process one only when one of the rooms that would carry it
    /// (small, or of unknown size) has a session of another user here. Otherwise the push
    /// is not built: a connect or close of a user alone in its rooms costs no `Push`, no
    /// publish and no room snapshots.
    fn anyone_to_tell<'a>(
        &self,
        user: &str,
        mut rooms: impl Iterator<Item = (&'a str, Option<u64>)>,
    ) -> bool {
        !self.broker.local_only()
            || rooms.any(|(room, members)| {
                members.is_none_or(|m| !self.is_large(m)) && self.hub.has_co_member(room, user)
            })
    }

    /// Tells the users `user` shares a small room with (of `rooms`, its rooms) that it
    /// came online, or went offline at `last_seen`. The one place a presence change is
    /// announced: a session's first attach, its last detach, a dead instance's users.
    async fn tell_co_members(
        &self,
        user: String,
        rooms: &[RoomState],
        online: bool,
        last_seen: i64,
    ) {
        let rooms = self.small_rooms(rooms.iter().map(|r| (r.room.as_str(), r.members)));
        self.tell_co_members_in(user, rooms, online, last_seen)
            .await;
    }

    /// [`Chat::tell_co_members`] through `rooms`, the small ones of the user's rooms.
    async fn tell_co_members_in(
        &self,
        user: String,
        rooms: Vec<String>,
        online: bool,
        last_seen: i64,
    ) {
        if rooms.is_empty() {
            return;
        }
        let push = Arc::new(Push::new(Kind::Presence(proto::Presence {
            user: user.clone(),
            online,
            last_seen,
        })));
        self.publish(Target::CoMembers { rooms, user }, push).await;
    }

    /// [`Chat::tell_co_members`] that `user` went offline, reading its rooms.
    async fn tell_offline(&self, user: String, last_seen: i64) {
        match self.store.rooms_of(&user).await {
            Ok(rooms) => self.tell_co_members(user, &rooms, false, last_seen).await,
            Err(e) => tracing::warn!(error = %e, "presence: rooms_of failed"),
        }
    }

    /// [`Chat::tell_co_members`] that `user` went offline from this instance, through
    /// `known`, its rooms as the hub knew them at its last detach: with every member count
    /// known (told at the user's attach or join here), no store read; else the rooms are
    /// read as [`Chat::tell_offline`] does.
    async fn tell_offline_from(&self, user: String, known: KnownRooms, last_seen: i64) {
        let counted: Option<Vec<(&str, u64)>> = known
            .iter()
            .map(|(room, members)| members.map(|m| (&**room, m)))
            .collect();
        match counted {
            Some(rooms) => {
                let rooms = self.small_rooms(rooms.into_iter());
                self.tell_co_members_in(user, rooms, false, last_seen).await;
            }
            None => self.tell_offline(user, last_seen).await,
        }
    }

    /// The rooms small enough to broadcast presence through, of (room, member count).
    fn small_rooms<'a>(&self, rooms: impl Iterator<Item = (&'a str, u64)>) -> Vec<String> {
        rooms
            .filter(|(_, members)| !self.is_large(*members))
            .map(|(room, _)| room.to_string())
            .collect()
    }

    /// Removes a session from live delivery; the user's last one makes it offline.
    pub fn detach(self: &Arc<Self>, user: &str, recipient_id: u64) {
        let Some(known) = self.hub.detach(user, recipient_id) else {
            return;
        };
        let now = now_ms();
        self.last_seen.went_offline(user, now);
        self.broker.user_offline(user, now);
        self.broker
            .unwatch_rooms(&mut known.iter().map(|(room, _)| &**room));
        if known.is_empty()
            || !self.anyone_to_tell(user, known.iter().map(|(room, m)| (&**room, *m)))
        {
            // In no room, or in none with another user's session here: nobody to tell,
            // and no need to read the store.
            return;
        }
        let this = self.clone();
        let user = user.to_string();
        let mut tell = Box::pin(async move {
            if !this.online_elsewhere(&user).await {
                this.tell_offline_from(user, known, now).await;
            }
        });
        // Polled here first: with the in-process broker (and every member count known)
        // it finishes at once, and a close costs no task of its own. What must wait (the
        // Redis broker, a store read) goes on in a task, which polls it again with its
        // own waker.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if std::future::Future::poll(tell.as_mut(), &mut cx).is_pending() {
            tokio::spawn(tell);
        }
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
            if !self.hub.is_local(&user) {
                self.tell_offline(user, last_seen).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Mutex, time::Duration};

    use super::*;
    use crate::{
        broker::local::LocalBroker,
        config::{ChatConfig, StoreConfig},
        delivery::Hub,
        store::{Store, sqlite::SqliteStore},
    };

    /// One session of `user` that keeps the presence pushes it gets.
    struct Seen {
        id: u64,
        user: &'static str,
        presence: Mutex<Vec<(String, bool)>>,
    }

    impl Recipient for Seen {
        fn recipient_id(&self) -> u64 {
            self.id
        }
        fn user(&self) -> &str {
            self.user
        }
        fn push(&self, push: &Arc<Push>) {
            let frame: proto::ServerFrame =
                prost::Message::decode(&push.frame(crate::codec::Encoding::Proto, 1)[..]).unwrap();
            if let Some(Kind::Presence(p)) = frame.kind {
                self.presence.lock().unwrap().push((p.user, p.online));
            }
        }
    }

    fn seen(id: u64, user: &'static str) -> Arc<Seen> {
        Arc::new(Seen {
            id,
            user,
            presence: Mutex::default(),
        })
    }

    async fn offline_of(s: &Seen, user: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !s.presence.lock().unwrap().contains(&(user.into(), false)) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no offline push for {user}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A user's last detach tells the co-members of its small rooms that it went offline
    /// from the rooms the hub holds (their counts as of its attach and joins), and not
    /// those of a large room. A room joined on another instance (no count told here)
    /// has the rooms read from the store instead, which still reaches its co-members.
    #[tokio::test]
    async fn the_last_detach_tells_co_members_of_small_rooms_offline() {
        let hub = Arc::new(Hub::new());
        let broker = Arc::new(LocalBroker::new(hub.clone()));
        let store = Arc::new(
            SqliteStore::open(&StoreConfig {
                path: ":memory:".into(),
                ..StoreConfig::default()
            })
            .unwrap(),
        );
        let config = ChatConfig {
            large_room_members: 2,
            ..ChatConfig::default()
        };
        let chat = Arc::new(Chat::new(store.clone(), broker, hub.clone(), config));
        for (room, user) in [
            ("small", "ann"),
            ("pair", "ann"),
            ("big", "cat"),
            ("big", "dan"),
        ] {
            chat.join(user, room).await.unwrap();
        }
        let (ann, cat) = (seen(1, "ann"), seen(2, "cat"));
        chat.attach(ann.clone()).await.unwrap();
        chat.attach(cat.clone()).await.unwrap();
        // Bob attaches in no room, then joins: small has 2 members, big 3 (large).
        chat.attach(seen(3, "bob")).await.unwrap();
        chat.join("bob", "small").await.unwrap();
        chat.join("bob", "big").await.unwrap();
        chat.detach("bob", 3);
        offline_of(&ann, "bob").await;
        assert!(cat.presence.lock().unwrap().is_empty(), "big is large");

        // Eve's room was joined elsewhere: this hub has no count for it.
        chat.attach(seen(4, "eve")).await.unwrap();
        store.join("pair", "eve", 0).await.unwrap();
        hub.joined("eve", "pair", None);
        chat.detach("eve", 4);
        offline_of(&ann, "eve").await;
    }

    /// The in-process broker, counting publishes.
    struct Counting {
        local: LocalBroker,
        publishes: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl crate::broker::Broker for Counting {
        fn local_only(&self) -> bool {
            true
        }
        async fn publish(
            &self,
            target: Target,
            push: Arc<Push>,
        ) -> Result<(), crate::broker::BrokerError> {
            self.publishes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.local.publish(target, push).await
        }
    }

    /// With the in-process broker, a user alone (here) in its rooms comes and goes with
    /// no presence push built or published; with a co-member here, both are told.
    #[tokio::test]
    async fn presence_with_nobody_to_tell_is_not_published() {
        let hub = Arc::new(Hub::new());
        let broker = Arc::new(Counting {
            local: LocalBroker::new(hub.clone()),
            publishes: Default::default(),
        });
        let store = Arc::new(
            SqliteStore::open(&StoreConfig {
                path: ":memory:".into(),
                ..StoreConfig::default()
            })
            .unwrap(),
        );
        let chat = Arc::new(Chat::new(
            store.clone(),
            broker.clone(),
            hub.clone(),
            ChatConfig::default(),
        ));
        let published = || broker.publishes.load(std::sync::atomic::Ordering::SeqCst);
        store.join("solo", "ann", 0).await.unwrap();
        store.join("solo", "bob", 0).await.unwrap();
        chat.attach(seen(1, "ann")).await.unwrap();
        chat.detach("ann", 1);
        assert_eq!(published(), 0, "bob is not here: nobody to tell");

        let bob = seen(2, "bob");
        chat.attach(bob.clone()).await.unwrap();
        assert_eq!(published(), 0, "ann is not here");
        chat.attach(seen(3, "ann")).await.unwrap();
        assert_eq!(published(), 1, "bob is told ann is online");
        chat.detach("ann", 3);
        assert_eq!(published(), 2, "and offline");
        offline_of(&bob, "ann").await;
        assert!(bob.presence.lock().unwrap().contains(&("ann".into(), true)));
    }
}
