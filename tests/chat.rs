//! Chat features end to end over real WebSocket and HTTP clients: offline sync, DMs,
//! private rooms, read markers across sessions, typing, presence, signalling,
//! announcements and the HTTP API.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use parley::{
    codec::Encoding,
    proto::{self, ErrorCode, client_frame::Cmd, server_frame::Kind},
};

async fn ok(c: &mut Client, cmd: Cmd) -> Kind {
    match c.request(cmd).await {
        Kind::Error(e) => panic!("unexpected error {e:?}"),
        k => k,
    }
}

async fn err(c: &mut Client, cmd: Cmd) -> ErrorCode {
    match c.request(cmd).await {
        Kind::Error(e) => code_of(&e),
        k => panic!("expected an error, got {k:?}"),
    }
}

async fn create_private(c: &mut Client, room: &str) {
    ok(
        c,
        Cmd::CreateRoom(proto::CreateRoom {
            room: room.into(),
            private: true,
        }),
    )
    .await;
}

/// No push of any kind arrives within `d`, nor before a probe sent after it.
async fn nothing_pushed(c: &mut Client, d: Duration) {
    c.nothing_pushed(d).await;
}

#[tokio::test]
async fn offline_user_syncs_exactly_what_it_missed_in_every_room() {
    let t = TestServer::start().await;
    let rooms = ["r1", "r2", "r3"];
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Proto).await;
    for r in rooms {
        ann.join(r).await;
        bob.join(r).await;
        bob.send_msg(r, &format!("{r}-seen"), "before").await;
    }
    // Ann's view before going offline: one message per room.
    let known: BTreeMap<String, u64> = rooms.iter().map(|r| (r.to_string(), 1)).collect();
    drop(ann);
    let mut expected = BTreeMap::new();
    for (i, r) in rooms.iter().enumerate() {
        for j in 0..(i + 1) * 3 {
            bob.send_msg(r, &format!("{r}-{j}"), &format!("{r} #{j}"))
                .await;
            expected
                .entry(r.to_string())
                .or_insert_with(Vec::new)
                .push(format!("{r} #{j}"));
        }
    }
    // A new session: log sync from the last seqs ann had, in pages of 4.
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut cursor = known;
    loop {
        let Kind::Sync(s) = ok(
            &mut ann,
            Cmd::Sync(proto::Sync {
                rooms: cursor.clone(),
                limit: 4,
            }),
        )
        .await
        else {
            panic!()
        };
        let mut more = false;
        for page in s.rooms {
            for m in &page.messages {
                assert_eq!(m.seq, cursor[&page.room] + 1, "no gap, no duplicate");
                cursor.insert(page.room.clone(), m.seq);
                got.entry(page.room.clone())
                    .or_default()
                    .push(m.body.clone());
            }
            more |= page.more;
        }
        if !more {
            break;
        }
    }
    assert_eq!(got, expected);
}

#[tokio::test]
async fn gap_in_live_seqs_is_filled_by_history_after() {
    let t = TestServer::start().await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Json).await;
    ann.join("r").await;
    bob.join("r").await;
    for i in 1..=2 {
        bob.send_msg("r", &i.to_string(), &i.to_string()).await;
    }
    assert_eq!(ann.next_message().await.seq, 1);
    assert_eq!(ann.next_message().await.seq, 2);
    // Ann is out of the room while 3..=5 are sent, then back for 6: her live stream
    // really jumps from 2 to 6.
    ok(&mut ann, Cmd::Leave(proto::Leave { room: "r".into() })).await;
    for i in 3..=5 {
        bob.send_msg("r", &i.to_string(), &i.to_string()).await;
    }
    ann.join("r").await;
    bob.send_msg("r", "6", "6").await;
    assert_eq!(ann.next_message().await.seq, 6, "a gap in live seqs");
    // The client asks for exactly the gap.
    let Kind::History(h) = ok(
        &mut ann,
        Cmd::History(proto::History {
            room: "r".into(),
            after_seq: Some(2),
            limit: 3,
            ..Default::default()
        }),
    )
    .await
    else {
        panic!()
    };
    assert_eq!(
        h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [3, 4, 5]
    );
    assert!(h.more);
    let Kind::History(h) = ok(
        &mut ann,
        Cmd::History(proto::History {
            room: "r".into(),
            before_seq: 3,
            ..Default::default()
        }),
    )
    .await
    else {
        panic!()
    };
    assert_eq!(h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2]);
    assert!(!h.more);
}

#[tokio::test]
async fn direct_messages_create_one_room_both_users_see() {
    let t = TestServer::start().await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Proto).await;
    let dm = |to: &str, id: &str, body: &str| {
        Cmd::Send(proto::Send {
            to_user: to.into(),
            client_msg_id: id.into(),
            body: body.into(),
            ..Default::default()
        })
    };
    let Kind::Sent(s1) = ok(&mut bob, dm("ann", "1", "hi ann")).await else {
        panic!()
    };
    assert_eq!((s1.room.as_str(), s1.seq), ("dm:ann:bob", 1));
    let Kind::Sent(s2) = ok(&mut ann, dm("bob", "1", "hi bob")).await else {
        panic!()
    };
    assert_eq!(
        (s2.room.as_str(), s2.seq),
        ("dm:ann:bob", 2),
        "the same canonical room"
    );
    assert_eq!(ann.next_message().await.body, "hi ann");
    assert_eq!(bob.next_message().await.body, "hi ann");
    assert_eq!(bob.next_message().await.body, "hi bob");
    for (c, peer) in [(&mut ann, "bob"), (&mut bob, "ann")] {
        let Kind::Rooms(list) = ok(c, Cmd::Rooms(proto::Rooms::default())).await else {
            panic!()
        };
        assert_eq!(list.rooms.len(), 1);
        let r = &list.rooms[0];
        assert_eq!(
            (r.room.as_str(), r.dm_peer.as_str(), r.private, r.last_seq),
            ("dm:ann:bob", peer, true, 2)
        );
    }
    // Nobody else can read, join or be invited into it.
    let mut eve = t.client("eve", Encoding::Json).await;
    let h = Cmd::History(proto::History {
        room: "dm:ann:bob".into(),
        ..Default::default()
    });
    assert_eq!(err(&mut eve, h).await, ErrorCode::NotMember);
    assert_eq!(
        err(
            &mut eve,
            Cmd::Join(proto::Join {
                room: "dm:ann:bob".into()
            })
        )
        .await,
        ErrorCode::Forbidden
    );
    let inv = Cmd::Invite(proto::Invite {
        room: "dm:ann:bob".into(),
        user: "eve".into(),
    });
    assert_eq!(err(&mut ann, inv).await, ErrorCode::Forbidden);
    assert_eq!(
        err(&mut ann, dm("ann", "x", "me")).await,
        ErrorCode::InvalidArgument
    );
}

#[tokio::test]
async fn private_room_is_unreadable_to_non_members_over_ws_and_http() {
    let t = TestServer::start().await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut eve = t.client("eve", Encoding::Json).await;
    create_private(&mut ann, "vault").await;
    ann.send_msg("vault", "1", "the code is 1234").await;
    assert_eq!(
        err(
            &mut eve,
            Cmd::Join(proto::Join {
                room: "vault".into()
            })
        )
        .await,
        ErrorCode::Forbidden
    );
    let h = Cmd::History(proto::History {
        room: "vault".into(),
        ..Default::default()
    });
    assert_eq!(err(&mut eve, h).await, ErrorCode::NotMember);
    let s = Cmd::Sync(proto::Sync {
        rooms: [("vault".to_string(), 0)].into(),
        limit: 0,
    });
    assert_eq!(err(&mut eve, s).await, ErrorCode::NotMember);
    let m = Cmd::Members(proto::Members {
        room: "vault".into(),
    });
    assert_eq!(err(&mut eve, m).await, ErrorCode::NotMember);
    let send = proto::Send {
        room: "vault".into(),
        client_msg_id: "e".into(),
        body: "x".into(),
        ..Default::default()
    };
    assert_eq!(err(&mut eve, Cmd::Send(send)).await, ErrorCode::NotMember);
    let eve_token = t.token("eve");
    let (status, body) = http_request(
        t.addr(),
        "GET",
        "/api/v1/rooms/vault/messages",
        Some(&eve_token),
        "",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(!body.contains("1234"));
    let (status, _) = http_request(
        t.addr(),
        "GET",
        "/api/v1/rooms/vault/members",
        Some(&eve_token),
        "",
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = http_request(
        t.addr(),
        "POST",
        "/api/v1/rooms/vault/messages",
        Some(&eve_token),
        r#"{"clientMsgId":"h1","body":"let me in"}"#,
    )
    .await;
    assert_eq!(status, 403);
    // Eve got nothing from the room live either.
    nothing_pushed(&mut eve, Duration::from_millis(100)).await;
    // After an invitation she can read.
    ok(
        &mut ann,
        Cmd::Invite(proto::Invite {
            room: "vault".into(),
            user: "eve".into(),
        }),
    )
    .await;
    let (status, body) = http_request(
        t.addr(),
        "GET",
        "/api/v1/rooms/vault/messages",
        Some(&eve_token),
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("1234"));
}

#[tokio::test]
async fn read_marker_on_one_session_updates_the_others_unread_count() {
    let t = TestServer::start().await;
    let mut phone = t.client("ann", Encoding::Json).await;
    let mut laptop = t.client("ann", Encoding::Proto).await;
    let mut bob = t.client("bob", Encoding::Json).await;
    phone.join("r").await;
    bob.join("r").await;
    for i in 1..=5 {
        bob.send_msg("r", &i.to_string(), "m").await;
    }
    let Kind::Rooms(list) = ok(&mut laptop, Cmd::Rooms(proto::Rooms::default())).await else {
        panic!()
    };
    assert_eq!((list.rooms[0].unread, list.rooms[0].read_seq), (5, 0));
    ok(
        &mut phone,
        Cmd::Read(proto::Read {
            room: "r".into(),
            seq: 3,
        }),
    )
    .await;
    // The laptop (same user) learns the new marker and count by push ...
    let receipt = laptop.next_of(pushed!(Receipt)).await;
    assert_eq!(
        (receipt.user.as_str(), receipt.seq, receipt.unread),
        ("ann", 3, 2)
    );
    // ... bob sees it as a read receipt ...
    let receipt = bob.next_of(pushed!(Receipt)).await;
    assert_eq!((receipt.user.as_str(), receipt.seq), ("ann", 3));
    // ... and the stored count agrees, over WebSocket and HTTP.
    let Kind::Rooms(list) = ok(&mut laptop, Cmd::Rooms(proto::Rooms::default())).await else {
        panic!()
    };
    assert_eq!((list.rooms[0].unread, list.rooms[0].read_seq), (2, 3));
    let (status, body) =
        http_request(t.addr(), "GET", "/api/v1/rooms", Some(&t.token("ann")), "").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["rooms"][0]["unread"], "2");
    // Markers never move back, and are capped at the last seq.
    ok(
        &mut phone,
        Cmd::Read(proto::Read {
            room: "r".into(),
            seq: 1,
        }),
    )
    .await;
    ok(
        &mut phone,
        Cmd::Read(proto::Read {
            room: "r".into(),
            seq: 99,
        }),
    )
    .await;
    let Kind::Rooms(list) = ok(&mut laptop, Cmd::Rooms(proto::Rooms::default())).await else {
        panic!()
    };
    assert_eq!((list.rooms[0].unread, list.rooms[0].read_seq), (0, 5));
    // Sending marks your own message read.
    bob.send_msg("r", "6", "m").await;
    phone.send_msg("r", "mine", "m").await;
    let Kind::Rooms(list) = ok(&mut laptop, Cmd::Rooms(proto::Rooms::default())).await else {
        panic!()
    };
    assert_eq!((list.rooms[0].unread, list.rooms[0].read_seq), (0, 7));
}

#[tokio::test]
async fn typing_and_presence_reach_co_members_and_nobody_else() {
    // A long interval: the second event is surely inside it. That one is allowed again
    // after the interval is checked on paused time (chat::typing's unit tests).
    let t = TestServer::start_with(|c| c.chat.typing_interval = Duration::from_secs(60)).await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Json).await;
    let mut eve = t.client("eve", Encoding::Json).await;
    ann.join("r").await;
    bob.join("r").await;
    eve.join("elsewhere").await;
    let typing = || Cmd::Typing(proto::Typing { room: "r".into() });
    ok(&mut ann, typing()).await;
    let ev = bob.next_of(pushed!(Typing)).await;
    assert_eq!((ev.room.as_str(), ev.user.as_str()), ("r", "ann"));
    // Rate-limited within the interval, per user and room: bob may still type.
    assert_eq!(err(&mut ann, typing()).await, ErrorCode::RateLimited);
    ok(&mut bob, typing()).await;
    let ev = ann.next_of(pushed!(Typing)).await;
    assert_eq!(ev.user, "bob");
    // Non-members cannot type into the room.
    assert_eq!(err(&mut eve, typing()).await, ErrorCode::NotMember);

    // Ann's own sessions get no typing event, and eve (not in r) nothing at all.
    eve.next_of(pushed!(Membership)).await;
    nothing_pushed(&mut eve, Duration::from_millis(100)).await;
    let mut own = Vec::new();
    while let Some(f) = ann.inbox.pop_front() {
        own.push(f);
    }
    assert!(
        own.iter().all(|f| !matches!(f.kind, Some(Kind::Typing(_)))),
        "{own:?}"
    );
    nothing_pushed(&mut ann, Duration::from_millis(0)).await;
}

#[tokio::test]
async fn presence_push_on_first_session_and_after_the_last_one_ends() {
    let t = TestServer::start().await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut eve = t.client("eve", Encoding::Json).await;
    ann.join("r").await;
    {
        let mut bob = t.client("bob", Encoding::Json).await;
        bob.join("r").await;
        bob.ws.close(None).await.unwrap();
    }
    // Bob shares r with ann: she gets offline (he was online before joining r, so his
    // online push had nobody to go to).
    let p = ann.next_of(pushed!(Presence)).await;
    assert_eq!((p.user.as_str(), p.online), ("bob", false));
    assert!(p.last_seen > 0);
    // Bob comes back: his first session makes him online for ann.
    let _bob = t.client("bob", Encoding::Json).await;
    let p = ann.next_of(pushed!(Presence)).await;
    assert_eq!((p.user.as_str(), p.online), ("bob", true));
    // Eve shares no room with bob: nothing.
    nothing_pushed(&mut eve, Duration::from_millis(100)).await;
    let q = Cmd::Presence(proto::PresenceQuery {
        users: vec!["bob".into()],
    });
    let Kind::PresenceList(p) = ok(&mut eve, q).await else {
        panic!()
    };
    assert!(p.users[0].online);
}

#[tokio::test]
async fn signals_reach_only_their_target_user() {
    let t = TestServer::start().await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob1 = t.client("bob", Encoding::Json).await;
    let mut bob2 = t.client("bob", Encoding::Proto).await;
    let mut eve = t.client("eve", Encoding::Json).await;
    let sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n";
    let sig = Cmd::Signal(proto::Signal {
        to_user: "bob".into(),
        kind: "offer".into(),
        payload: sdp.into(),
    });
    // Only to a user one shares a room with: a direct-message room is enough.
    assert_eq!(err(&mut ann, sig.clone()).await, ErrorCode::Forbidden);
    let dm = Cmd::Send(proto::Send {
        to_user: "bob".into(),
        client_msg_id: "call".into(),
        body: "calling you".into(),
        ..Default::default()
    });
    ok(&mut ann, dm).await;
    for b in [&mut ann, &mut bob1, &mut bob2] {
        b.next_message().await;
    }
    ok(&mut ann, sig).await;
    for b in [&mut bob1, &mut bob2] {
        let s = b.next_of(pushed!(Signal)).await;
        assert_eq!(
            (s.from_user.as_str(), s.kind.as_str(), s.payload.as_str()),
            ("ann", "offer", sdp)
        );
    }
    nothing_pushed(&mut eve, Duration::from_millis(100)).await;
    nothing_pushed(&mut ann, Duration::from_millis(0)).await;
    let sig = Cmd::Signal(proto::Signal {
        to_user: "nobody".into(),
        kind: "ice".into(),
        payload: "x".into(),
    });
    assert_eq!(err(&mut ann, sig).await, ErrorCode::Forbidden);
    // Signals are not stored anywhere: bob's only room is the DM.
    let Kind::Rooms(r) = ok(&mut bob1, Cmd::Rooms(proto::Rooms::default())).await else {
        panic!()
    };
    assert_eq!(r.rooms.len(), 1);
    assert_eq!(r.rooms[0].last_seq, 1);
}

/// Issue 20, item 3: a user who shares nothing with bob is refused; one who shares a
/// room and floods him with 800 signals of 15 KB (no rate limits configured here) gets
/// every one answered, but bob's session only drops signals — it is never cut as a slow
/// consumer — and a message sent after the flood still reaches him.
#[tokio::test]
async fn a_signal_flood_never_costs_the_recipient_its_session() {
    let t = TestServer::start_with(|c| {
        c.session.max_queue_bytes = 256 * 1024;
        // What is under test is the queue bound, not the write deadline.
        c.ws.write_timeout = Duration::from_secs(60);
    })
    .await;
    let mut ann = t.client("ann", Encoding::Json).await;
    // Bob's socket buffers little, so his queue fills while he does not read.
    let mut bob = Client::tiny(&t, "bob", Encoding::Proto).await;
    let mut mal = t.client("mal", Encoding::Proto).await;
    let mut eve = t.client("eve", Encoding::Proto).await;
    for c in [&mut ann, &mut bob, &mut mal] {
        c.join("r").await;
    }
    let payload = "x".repeat(15_000);
    let signal = |payload: &str| {
        Cmd::Signal(proto::Signal {
            to_user: "bob".into(),
            kind: "ice".into(),
            payload: payload.into(),
        })
    };
    // A stranger is refused outright.
    assert_eq!(err(&mut eve, signal("x")).await, ErrorCode::Forbidden);
    // Bob reads nothing while mal floods him (12 MB; his queue holds 256 KiB).
    for _ in 0..800 {
        ok(&mut mal, signal(&payload)).await;
    }
    ann.send_msg("r", "after", "still there?").await;
    let mut signals = 0;
    let m = loop {
        match bob.next_push().await.kind {
            Some(Kind::Signal(_)) => signals += 1,
            Some(Kind::Message(m)) => break m,
            Some(Kind::Membership(_) | Kind::Presence(_)) => {}
            other => panic!("bob expected signals then the message, got {other:?}"),
        }
    };
    assert_eq!(m.body, "still there?");
    assert!(
        (1..800).contains(&signals),
        "some signals were dropped, not the session: {signals}"
    );
    // Bob's session is the same one, and works.
    bob.probe().await;
    assert!(t.session_alive(&bob.session_id));
}

/// Issue 20, item 3: a read that does not move the marker publishes no receipt.
#[tokio::test]
async fn only_a_read_that_moves_the_marker_sends_a_receipt() {
    let t = TestServer::start().await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Proto).await;
    ann.join("r").await;
    bob.join("r").await;
    bob.send_msg("r", "1", "one").await;
    ann.next_message().await;
    let read = |seq| {
        Cmd::Read(proto::Read {
            room: "r".into(),
            seq,
        })
    };
    ok(&mut ann, read(1)).await;
    let r = bob.next_of(pushed!(Receipt)).await;
    assert_eq!((r.user.as_str(), r.seq), ("ann", 1));
    // Again, behind the marker, and past the room's end (capped at 1): no receipts.
    for seq in [1, 0, 1, 99] {
        ok(&mut ann, read(seq)).await;
    }
    nothing_pushed(&mut bob, Duration::from_millis(100)).await;
    // The reader's own sessions saw the one move too, and nothing after it.
    let r = ann.next_of(pushed!(Receipt)).await;
    assert_eq!(r.seq, 1);
    nothing_pushed(&mut ann, Duration::ZERO).await;
}

/// Issue 20, item 13: U+0000 in a body, metadata or client_msg_id is refused with
/// INVALID_ARGUMENT on every store (PostgreSQL cannot keep it; it used to answer
/// INTERNAL there), over WebSocket and the HTTP API alike; nothing is stored and the
/// room goes on.
#[tokio::test]
async fn a_nul_character_is_refused_alike_on_every_store() {
    let t = TestServer::start().await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Proto).await;
    ann.join("r").await;
    bob.join("r").await;
    let with = |id: &str, body: &str, meta: Option<(&str, &str)>| {
        Cmd::Send(proto::Send {
            room: "r".into(),
            client_msg_id: id.into(),
            body: body.into(),
            metadata: meta
                .map(|(k, v)| [(k.to_string(), v.to_string())].into())
                .unwrap_or_default(),
            ..Default::default()
        })
    };
    for cmd in [
        with("1", "a\0b", None),
        with("2", "ok", Some(("k", "v\0"))),
        with("3", "ok", Some(("k\0", "v"))),
        with("4\0", "ok", None),
    ] {
        assert_eq!(err(&mut ann, cmd).await, ErrorCode::InvalidArgument);
    }
    let auth = format!("Bearer {}", t.token("ann"));
    let r = http(
        t.addr(),
        "POST",
        "/api/v1/rooms/r/messages",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        r#"{"clientMsgId":"h","body":"a\u0000b"}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["code"], "ERROR_CODE_INVALID_ARGUMENT");
    // Nothing was stored; the next message is seq 1 and reaches bob.
    assert_eq!(ann.send_msg("r", "5", "fine").await.seq, 1);
    assert_eq!(bob.next_message().await.body, "fine");
}

/// Issue 20, item 4: history and sync replies are cut at `chat.max_reply_bytes`, with
/// `more` on the page where the cut fell and on every room after it, so a client that
/// follows `more` gets every message exactly once. Public rooms are readable by
/// non-members (as `history`), private ones only by members.
#[tokio::test]
async fn history_and_sync_replies_are_cut_at_max_reply_bytes() {
    let t = TestServer::start_with(|c| c.chat.max_reply_bytes = 64 * 1024).await;
    let mut ann = t.client("ann", Encoding::Proto).await;
    let mut eve = t.client("eve", Encoding::Json).await;
    let body = "y".repeat(10_000);
    let rooms = ["a", "b", "c"];
    for r in rooms {
        ann.join(r).await;
        for i in 0..8 {
            ann.send_msg(r, &format!("{r}{i}"), &body).await;
        }
    }
    // Eve is in none of them: public rooms are readable all the same.
    let mut cursor: BTreeMap<String, u64> = rooms.iter().map(|r| (r.to_string(), 0)).collect();
    let mut replies = 0;
    let mut got = 0;
    loop {
        let Kind::Sync(s) = ok(
            &mut eve,
            Cmd::Sync(proto::Sync {
                rooms: cursor.clone(),
                limit: 0,
            }),
        )
        .await
        else {
            panic!()
        };
        replies += 1;
        assert_eq!(s.rooms.len(), 3, "every room is listed");
        let bytes: usize = s
            .rooms
            .iter()
            .flat_map(|p| &p.messages)
            .map(prost::Message::encoded_len)
            .sum();
        assert!(bytes <= 64 * 1024, "reply of {bytes} bytes");
        let mut more = false;
        for page in s.rooms {
            for m in &page.messages {
                assert_eq!(m.seq, cursor[&page.room] + 1, "no gap, no duplicate");
                cursor.insert(page.room.clone(), m.seq);
                got += 1;
            }
            more |= page.more;
        }
        if !more {
            break;
        }
        assert!(replies < 10, "sync makes progress");
    }
    assert_eq!(got, 24);
    assert!(
        replies >= 4,
        "240 KB came in replies of at most 64 KiB: {replies}"
    );
    // History: the newest that fit, with more.
    let Kind::History(h) = ok(
        &mut eve,
        Cmd::History(proto::History {
            room: "a".into(),
            limit: 8,
            ..Default::default()
        }),
    )
    .await
    else {
        panic!()
    };
    let seqs: Vec<u64> = h.messages.iter().map(|m| m.seq).collect();
    assert!(h.more);
    assert!(seqs.len() < 8 && seqs.last() == Some(&8), "{seqs:?}");
    // A private room: members only, for sync as for history.
    ann.request(Cmd::CreateRoom(proto::CreateRoom {
        room: "p".into(),
        private: true,
    }))
    .await;
    let sync_p = Cmd::Sync(proto::Sync {
        rooms: [("p".to_string(), 0)].into(),
        limit: 0,
    });
    assert_eq!(err(&mut eve, sync_p.clone()).await, ErrorCode::NotMember);
    // Also when it comes after the point where the reply would be cut.
    let mut all: BTreeMap<String, u64> = rooms.iter().map(|r| (r.to_string(), 0)).collect();
    all.insert("p".into(), 0);
    let sync_all = Cmd::Sync(proto::Sync {
        rooms: all,
        limit: 0,
    });
    assert_eq!(err(&mut eve, sync_all).await, ErrorCode::NotMember);
    assert!(matches!(ok(&mut ann, sync_p).await, Kind::Sync(_)));
}

#[tokio::test]
async fn announcements_need_the_admin_token_and_reach_their_audience() {
    let t = TestServer::start_with(|c| c.auth.admin_token = "root-token".into()).await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Proto).await;
    ann.join("news").await;
    let post = |token: Option<&str>, body: &'static str| {
        let addr = t.addr();
        let token = token.map(str::to_string);
        async move { http_request(addr, "POST", "/api/v1/announce", token.as_deref(), body).await }
    };
    assert_eq!(post(None, r#"{"body":"x"}"#).await.0, 401);
    assert_eq!(post(Some(&t.token("ann")), r#"{"body":"x"}"#).await.0, 403);
    assert_eq!(post(Some("wrong"), r#"{"body":"x"}"#).await.0, 401);
    assert_eq!(post(Some("root-token"), r#"{"body":""}"#).await.0, 400);
    assert_eq!(post(Some("root-token"), "not json").await.0, 400);
    assert_eq!(
        post(Some("root-token"), r#"{"room":"nope","body":"x"}"#)
            .await
            .0,
        404
    );

    assert_eq!(
        post(Some("root-token"), r#"{"room":"news","body":"room only"}"#)
            .await
            .0,
        202
    );
    let a = ann.next_of(pushed!(Announcement)).await;
    assert_eq!((a.room.as_str(), a.body.as_str()), ("news", "room only"));
    assert_eq!(
        post(Some("root-token"), r#"{"body":"everyone"}"#).await.0,
        202
    );
    let a = bob.next_of(pushed!(Announcement)).await;
    assert_eq!(
        a.body, "everyone",
        "bob is in no room and gets only the global one"
    );
    let a = ann.next_of(pushed!(Announcement)).await;
    assert_eq!(a.body, "everyone");
}

#[tokio::test]
async fn http_api_reads_and_posts_like_the_websocket() {
    let t = TestServer::start_with(|c| c.auth.admin_token = "root-token".into()).await;
    let mut ann = t.client("ann", Encoding::Json).await;
    ann.join("r").await;
    let tok = t.token("ann");
    let (status, body) = http_request(
        t.addr(),
        "POST",
        "/api/v1/rooms/r/messages",
        Some(&tok),
        r#"{"clientMsgId":"h1","body":"via http"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let sent: proto::Sent = serde_json::from_str(&body).unwrap();
    assert_eq!(sent.seq, 1);
    let m = ann.next_message().await;
    assert_eq!((m.body.as_str(), m.sender.as_str()), ("via http", "ann"));
    // Idempotent like send.
    let (_, body) = http_request(
        t.addr(),
        "POST",
        "/api/v1/rooms/r/messages",
        Some(&tok),
        r#"{"clientMsgId":"h1","body":"via http"}"#,
    )
    .await;
    assert!(
        serde_json::from_str::<proto::Sent>(&body)
            .unwrap()
            .duplicate
    );
    // Users cannot pick a sender; the admin can.
    let (status, _) = http_request(
        t.addr(),
        "POST",
        "/api/v1/rooms/r/messages",
        Some(&tok),
        r#"{"clientMsgId":"h2","body":"x","sender":"ceo"}"#,
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = http_request(
        t.addr(),
        "POST",
        "/api/v1/rooms/r/messages",
        Some("root-token"),
        r#"{"clientMsgId":"h2","body":"from the server"}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(ann.next_message().await.sender, "system");
    let (status, body) = http_request(
        t.addr(),
        "GET",
        "/api/v1/rooms/r/messages?after_seq=1",
        Some(&tok),
        "",
    )
    .await;
    assert_eq!(status, 200);
    let page: proto::HistoryPage = serde_json::from_str(&body).unwrap();
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [2]);
    let (status, body) =
        http_request(t.addr(), "GET", "/api/v1/rooms/r/members", Some(&tok), "").await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"room":"r","users":["ann"]}"#)
    );
    let (status, _) = http_request(
        t.addr(),
        "GET",
        "/api/v1/rooms",
        Some(&t.expired_token("ann")),
        "",
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn large_rooms_do_not_broadcast_per_member_events() {
    let t = TestServer::start_with(|c| c.chat.large_room_members = 2).await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Json).await;
    ann.join("big").await;
    bob.join("big").await;
    // Two members: still small, ann saw bob join.
    let m = ann
        .next_of(|k| {
            if let Kind::Membership(m) = k {
                (m.user == "bob").then_some(m)
            } else {
                None
            }
        })
        .await;
    assert_eq!(m.action, "joined");
    // The third member makes it large: only carol's own sessions hear of her join.
    let mut carol = t.client("carol", Encoding::Json).await;
    carol.join("big").await;
    let m = carol.next_of(pushed!(Membership)).await;
    assert_eq!((m.user.as_str(), m.action.as_str()), ("carol", "joined"));
    // Typing is accepted but not delivered; a read receipt reaches only the reader.
    ok(
        &mut carol,
        Cmd::Typing(proto::Typing { room: "big".into() }),
    )
    .await;
    ann.send_msg("big", "1", "hello").await;
    ok(
        &mut carol,
        Cmd::Read(proto::Read {
            room: "big".into(),
            seq: 1,
        }),
    )
    .await;
    let r = carol.next_of(pushed!(Receipt)).await;
    assert_eq!((r.user.as_str(), r.seq, r.unread), ("carol", 1, 0));
    // Messages still reach everyone; bob saw nothing but ann's message in between.
    assert_eq!(bob.next_message().await.body, "hello");
    nothing_pushed(&mut bob, Duration::from_millis(100)).await;
    let leftover: Vec<_> = bob.inbox.drain(..).collect();
    assert!(leftover.is_empty());
    // Carol leaves: the count drops to 2, a small room again, so everyone hears it.
    ok(&mut carol, Cmd::Leave(proto::Leave { room: "big".into() })).await;
    let Kind::Rooms(r) = ok(&mut ann, Cmd::Rooms(proto::Rooms::default())).await else {
        panic!()
    };
    assert_eq!(r.rooms[0].members, 2);
    let m = bob.next_of(pushed!(Membership)).await;
    assert_eq!((m.user.as_str(), m.action.as_str()), ("carol", "left"));
}

/// Issue 25: a user's HTTP API request is a command like a session's (one dispatch in
/// `session::conn::execute`), so it is counted like one: a message posted over HTTP in
/// `parley_messages_total`, a refused read in `parley_errors_total` with its code.
#[tokio::test]
async fn http_api_commands_are_counted_like_session_commands() {
    let t = TestServer::start().await;
    let mut ann = t.client("ann", Encoding::Json).await;
    create_private(&mut ann, "vault").await;
    let (status, body) = http_request(
        t.addr(),
        "POST",
        "/api/v1/rooms/vault/messages",
        Some(&t.token("ann")),
        r#"{"clientMsgId":"h1","body":"via http"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = http_request(
        t.addr(),
        "GET",
        "/api/v1/rooms/vault/messages",
        Some(&t.token("eve")),
        "",
    )
    .await;
    assert_eq!(status, 403);
    let (_, metrics) = t.http_get("/metrics").await;
    for line in [
        "parley_messages_total 1",
        "parley_errors_total{code=\"ERROR_CODE_NOT_MEMBER\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
}

/// The room browser: any signed-in user pages through the public rooms (never a private
/// room or a DM) with member counts, `more` saying whether to ask again; the page size is
/// capped by the server; the HTTP API answers the same.
#[tokio::test]
async fn the_room_browser_lists_public_rooms_a_page_at_a_time() {
    let t = TestServer::start().await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Proto).await;
    for i in 0..205 {
        ann.join(&format!("pub{i:03}")).await;
    }
    bob.join("pub007").await;
    create_private(&mut ann, "pub007-secret").await;
    ok(
        &mut ann,
        Cmd::Send(proto::Send {
            to_user: "bob".into(),
            client_msg_id: "d1".into(),
            body: "hi".into(),
            ..Default::default()
        }),
    )
    .await;
    ann.send_msg("pub001", "m1", "hello").await;

    let browse = |after: &str, limit: u32| {
        Cmd::Rooms(proto::Rooms {
            public: true,
            after: after.into(),
            limit,
        })
    };
    // Eve is in no room and still sees every public one, once, in order.
    let mut eve = t.client("eve", Encoding::Json).await;
    let mut seen: Vec<proto::RoomState> = Vec::new();
    loop {
        let after = seen.last().map(|r| r.room.clone()).unwrap_or_default();
        let Kind::Rooms(page) = ok(&mut eve, browse(&after, 60)).await else {
            panic!()
        };
        assert!(page.rooms.len() <= 60);
        seen.extend(page.rooms);
        if !page.more {
            break;
        }
    }
    let names: Vec<_> = seen.iter().map(|r| r.room.clone()).collect();
    let expected: Vec<_> = (0..205).map(|i| format!("pub{i:03}")).collect();
    assert_eq!(
        names, expected,
        "no private room, no DM, each public room once"
    );
    assert_eq!((seen[1].last_seq, seen[1].members), (1, 1));
    assert_eq!(seen[7].members, 2);
    assert!(seen.iter().all(|r| !r.private && r.unread == 0));

    // No limit: 50; a huge one: 200.
    let Kind::Rooms(page) = ok(&mut eve, browse("", 0)).await else {
        panic!()
    };
    assert_eq!((page.rooms.len(), page.more), (50, true));
    let Kind::Rooms(page) = ok(&mut eve, browse("", u32::MAX)).await else {
        panic!()
    };
    assert_eq!((page.rooms.len(), page.more), (200, true));
    let Kind::Rooms(page) = ok(&mut eve, browse("pub199", 5)).await else {
        panic!()
    };
    assert_eq!(page.rooms.len(), 5);
    assert!(!page.more, "the last page");
    // A cursor that cannot be a room name is refused.
    assert_eq!(
        err(&mut eve, browse("no spaces", 5)).await,
        ErrorCode::InvalidArgument
    );
    // The browser does not touch eve's own list.
    let Kind::Rooms(mine) = ok(&mut eve, Cmd::Rooms(proto::Rooms::default())).await else {
        panic!()
    };
    assert!(mine.rooms.is_empty() && !mine.more);

    let (status, body) = http_request(
        t.addr(),
        "GET",
        "/api/v1/rooms?public=true&after=pub006&limit=2",
        Some(&t.token("eve")),
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let list: proto::RoomList = serde_json::from_str(&body).unwrap();
    let names: Vec<_> = list.rooms.iter().map(|r| r.room.as_str()).collect();
    assert_eq!((names, list.more), (vec!["pub007", "pub008"], true));
}

/// The members of `room`, as `c` reads them.
async fn members_of(c: &mut Client, room: &str) -> Vec<String> {
    match ok(c, Cmd::Members(proto::Members { room: room.into() })).await {
        Kind::Members(m) => m.users,
        k => panic!("expected members, got {k:?}"),
    }
}

/// The seq of `c`'s next message after seq `after` (older ones, committed before its
/// connect and pushed around it, are skipped: the `connected` reply covered them).
async fn message_after(c: &mut Client, after: u64) -> u64 {
    loop {
        let m = c.next_message().await;
        if m.seq > after {
            return m.seq;
        }
    }
}

/// `room`'s last seq in a `connected` reply.
fn connected_seq(c: &proto::Connected, room: &str) -> u64 {
    c.rooms
        .iter()
        .find(|r| r.room == room)
        .unwrap_or_else(|| panic!("{room} in {c:?}"))
        .last_seq
}

/// A join right after a connect may answer from the connect's read of its rooms (no
/// store read of its own) only while nothing it reads changed since: a message committed
/// or a leave between the connect and the join must show in the join's answer exactly as
/// without that shortcut, on a new session and on a resumed one, and the message is
/// delivered live once.
#[tokio::test]
async fn a_join_after_a_connect_answers_what_changed_in_between() {
    let t = TestServer::start().await;
    let mut bob = t.client("bob", Encoding::Json).await;
    bob.join("r").await;
    let mut ann = t.client("ann", Encoding::Json).await;
    ann.join("r").await;
    bob.send_msg("r", "b1", "one").await;

    // Nothing in between: the room as the connect read it.
    let mut quiet = Client::open(t.addr(), Some(Encoding::Json)).await;
    let c = quiet.connect(&t.token("ann")).await;
    assert_eq!(connected_seq(&c, "r"), 1);
    assert_eq!(quiet.join("r").await.last_seq, 1);
    let sent = bob.send_msg("r", "b2", "two").await;
    assert_eq!(message_after(&mut quiet, 1).await, sent.seq);

    // A message committed between the connect and the join.
    let mut late = Client::open(t.addr(), Some(Encoding::Json)).await;
    let c = late.connect(&t.token("ann")).await;
    assert_eq!(connected_seq(&c, "r"), 2);
    let between = bob.send_msg("r", "b3", "three").await;
    assert_eq!(between.seq, 3);
    assert_eq!(
        late.join("r").await.last_seq,
        3,
        "the join's last seq includes the message committed after the connect"
    );
    let after = bob.send_msg("r", "b4", "four").await;
    assert_eq!(
        message_after(&mut late, 2).await,
        between.seq,
        "delivered live"
    );
    assert_eq!(late.next_message().await.seq, after.seq, "and only once");

    // A leave (on another session of the same user) between the connect and the join:
    // the join makes the user a member again.
    let mut rejoin = Client::open(t.addr(), Some(Encoding::Json)).await;
    rejoin.connect(&t.token("ann")).await;
    assert!(matches!(
        ok(&mut ann, Cmd::Leave(proto::Leave { room: "r".into() })).await,
        Kind::Left(_)
    ));
    assert!(!members_of(&mut bob, "r").await.contains(&"ann".to_string()));
    assert_eq!(rejoin.join("r").await.last_seq, 4);
    assert!(
        members_of(&mut bob, "r").await.contains(&"ann".to_string()),
        "the join after the leave made ann a member again"
    );
    let sent = bob.send_msg("r", "b5", "five").await;
    assert_eq!(message_after(&mut rejoin, 4).await, sent.seq);

    // A resumed session: a message committed between the resume and the join.
    let mut moved = Client::open(t.addr(), Some(Encoding::Json)).await;
    moved.last_pos = rejoin.last_pos;
    let c = moved
        .connect_with(proto::Connect {
            token: t.token("ann"),
            session_id: rejoin.session_id.clone(),
            last_pos: rejoin.last_pos,
        })
        .await;
    assert!(c.resumed);
    assert_eq!(connected_seq(&c, "r"), 5);
    let between = bob.send_msg("r", "b6", "six").await;
    assert_eq!(moved.join("r").await.last_seq, between.seq);
    assert_eq!(message_after(&mut moved, 5).await, between.seq);
}
