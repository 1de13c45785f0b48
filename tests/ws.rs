//! The WebSocket channel end to end: real clients against a server on an ephemeral port.

mod common;

use std::{collections::HashSet, time::Duration};

use common::*;
use futures_util::SinkExt;
use parley::{
    codec::Encoding,
    proto::{self, ErrorCode, client_frame::Cmd, server_frame::Kind},
};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn two_users_chat_in_both_encodings() {
    let t = TestServer::start().await;
    for (room, a_enc, b_enc) in [
        ("json-room", Encoding::Json, Encoding::Json),
        ("proto-room", Encoding::Proto, Encoding::Proto),
        ("mixed-room", Encoding::Json, Encoding::Proto),
    ] {
        let mut ann = t.client("ann", a_enc).await;
        let mut bob = t.client("bob", b_enc).await;
        assert_eq!(ann.join(room).await.last_seq, 0);
        bob.join(room).await;

        let sent = ann.send_msg(room, "m1", "hello bob").await;
        assert_eq!((sent.seq, sent.duplicate), (1, false));
        let got = bob.next_message().await;
        assert_eq!(
            (got.room.as_str(), got.seq, got.sender.as_str()),
            (room, 1, "ann")
        );
        assert_eq!(got.body, "hello bob");
        assert_eq!(got.client_msg_id, "m1");
        // The sender's own sessions get the message too.
        assert_eq!(ann.next_message().await.seq, 1);

        let sent = bob.send_msg(room, "m1", "hi ann").await;
        assert_eq!(
            sent.seq, 2,
            "same client_msg_id from another user is a new message"
        );
        assert_eq!(ann.next_message().await.body, "hi ann");
        assert_eq!(bob.next_message().await.seq, 2);
    }
}

#[tokio::test]
async fn no_subprotocol_gets_the_default_json_encoding() {
    let t = TestServer::start().await;
    let mut c = Client::open(t.addr(), None).await;
    c.connect(&t.token("ann")).await;
    assert!(matches!(
        c.request(Cmd::Ping(proto::Ping {})).await,
        Kind::Pong(_)
    ));
}

#[tokio::test]
async fn one_total_order_under_concurrent_senders() {
    let t = TestServer::start().await;
    let room = "busy";
    let mut watcher = t.client("watcher", Encoding::Proto).await;
    watcher.join(room).await;
    const SENDERS: usize = 4;
    const EACH: usize = 50;
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let mut c = t.client(&format!("user{s}"), Encoding::Json).await;
        c.join(room).await;
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..EACH {
                seqs.push(
                    c.send_msg(room, &format!("{i}"), &format!("{s}:{i}"))
                        .await
                        .seq,
                );
            }
            seqs
        }));
    }
    let mut acked = HashSet::new();
    for task in tasks {
        let seqs = task.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one sender's seqs increase"
        );
        acked.extend(seqs);
    }
    assert_eq!(acked.len(), SENDERS * EACH, "every ack has its own seq");
    let mut per_sender_last = [None::<usize>; SENDERS];
    for expected in 1..=(SENDERS * EACH) as u64 {
        let m = watcher.next_message().await;
        assert_eq!(m.seq, expected, "delivered in seq order with no gaps");
        let (s, i) = m.body.split_once(':').unwrap();
        let (s, i): (usize, usize) = (s.parse().unwrap(), i.parse().unwrap());
        assert!(
            per_sender_last[s].is_none_or(|last| last < i),
            "sender order kept"
        );
        per_sender_last[s] = Some(i);
    }
}

#[tokio::test]
async fn resend_with_same_client_msg_id_is_idempotent() {
    let t = TestServer::start().await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Json).await;
    ann.join("r").await;
    bob.join("r").await;
    let first = ann.send_msg("r", "same-id", "once").await;
    let again = ann.send_msg("r", "same-id", "once").await;
    assert_eq!(again.seq, first.seq);
    assert!(again.duplicate && !first.duplicate);
    let next = ann.send_msg("r", "other-id", "twice").await;
    assert_eq!(next.seq, first.seq + 1);
    // Bob sees each message once.
    assert_eq!(bob.next_message().await.body, "once");
    assert_eq!(bob.next_message().await.body, "twice");
}

#[tokio::test]
async fn dropped_socket_resumes_with_exactly_the_missed_frames() {
    for enc in [Encoding::Json, Encoding::Proto] {
        let t = TestServer::start().await;
        let mut ann = t.client("ann", enc).await;
        let mut bob = t.client("bob", Encoding::Json).await;
        ann.join("r").await;
        bob.join("r").await;
        for i in 1..=5 {
            bob.send_msg("r", &format!("a{i}"), &format!("{i}")).await;
        }
        // Ann reads 3 of 5 pushes, then her socket dies without a close handshake.
        for i in 1..=3 {
            assert_eq!(ann.next_message().await.seq, i);
        }
        let (session_id, last_pos) = (ann.session_id.clone(), ann.last_pos);
        drop(ann);
        for i in 6..=8 {
            bob.send_msg("r", &format!("a{i}"), &format!("{i}")).await;
        }
        let mut back = Client::open(t.addr(), Some(enc)).await;
        let c = back
            .connect_with(proto::Connect {
                token: t.token("ann"),
                session_id: session_id.clone(),
                last_pos,
            })
            .await;
        assert!(c.resumed);
        assert_eq!(c.session_id, session_id);
        back.last_pos = last_pos;
        for i in 4..=8 {
            // `read` checks that positions continue from last_pos with no gap.
            let f = back.next_push().await;
            assert_eq!(f.pos, last_pos + i - 3, "positions continue");
            match f.kind {
                Some(Kind::Message(m)) => assert_eq!(m.seq, i),
                other => panic!("{other:?}"),
            }
        }
        // Nothing else arrives: a ping's pong is the next frame.
        assert!(matches!(
            back.request(Cmd::Ping(proto::Ping {})).await,
            Kind::Pong(_)
        ));
        assert!(
            back.inbox.is_empty(),
            "no duplicates after the replay: {:?}",
            back.inbox
        );
    }
}

#[tokio::test]
async fn resume_on_a_second_socket_moves_the_session() {
    let t = TestServer::start().await;
    let mut first = t.client("ann", Encoding::Json).await;
    let mut second = Client::open(t.addr(), Some(Encoding::Json)).await;
    let c = second
        .connect_with(proto::Connect {
            token: t.token("ann"),
            session_id: first.session_id.clone(),
            last_pos: 0,
        })
        .await;
    assert!(c.resumed);
    // The first socket is told why and closed.
    first.send(Cmd::Ping(proto::Ping {})).await;
    let closed = first.closed().await;
    assert_eq!(closed.code, Some(4010));
    assert_eq!(
        closed.disconnect.map(|d| (d.code, d.reconnect)),
        Some((4010, false))
    );
}

#[tokio::test]
async fn resume_of_an_unknown_or_foreign_session_starts_a_new_one() {
    let t = TestServer::start().await;
    let ann = t.client("ann", Encoding::Json).await;
    let mut eve = Client::open(t.addr(), Some(Encoding::Json)).await;
    let c = eve
        .connect_with(proto::Connect {
            token: t.token("eve"),
            session_id: ann.session_id.clone(),
            last_pos: 0,
        })
        .await;
    assert!(!c.resumed, "a session is only resumed by its own user");
    assert_ne!(c.session_id, ann.session_id);
    let mut x = Client::open(t.addr(), Some(Encoding::Json)).await;
    let c = x
        .connect_with(proto::Connect {
            token: t.token("x"),
            session_id: "nope".into(),
            last_pos: 7,
        })
        .await;
    assert!(!c.resumed);
}

#[tokio::test]
async fn session_expires_after_the_grace_period_then_log_sync_recovers() {
    let t = TestServer::start_with(|c| c.session.grace_period = Duration::from_millis(200)).await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Json).await;
    ann.join("r").await;
    bob.join("r").await;
    bob.send_msg("r", "1", "seen").await;
    assert_eq!(ann.next_message().await.seq, 1);
    let (sid, pos) = (ann.session_id.clone(), ann.last_pos);
    drop(ann);
    bob.send_msg("r", "2", "missed").await;
    t.session_reaped(&sid).await;
    let mut back = Client::open(t.addr(), Some(Encoding::Json)).await;
    let c = back
        .connect_with(proto::Connect {
            token: t.token("ann"),
            session_id: sid,
            last_pos: pos,
        })
        .await;
    assert!(!c.resumed, "expired session is not resumed");
    assert_eq!(
        c.rooms
            .iter()
            .map(|r| (r.room.as_str(), r.last_seq))
            .collect::<Vec<_>>(),
        [("r", 2)]
    );
    let sync = back
        .request(Cmd::Sync(proto::Sync {
            rooms: [("r".to_string(), 1)].into(),
            limit: 0,
        }))
        .await;
    let Kind::Sync(s) = sync else {
        panic!("{sync:?}")
    };
    assert_eq!(s.rooms.len(), 1);
    assert_eq!(
        s.rooms[0]
            .messages
            .iter()
            .map(|m| m.body.as_str())
            .collect::<Vec<_>>(),
        ["missed"]
    );
    assert!(!s.rooms[0].more);
}

#[tokio::test]
async fn detached_session_that_overflows_is_dropped() {
    let t = TestServer::start_with(|c| c.session.max_queue_bytes = 2000).await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Json).await;
    ann.join("r").await;
    bob.join("r").await;
    let sid = ann.session_id.clone();
    // Control: a detached session within its bounds resumes and replays exactly.
    let pos = ann.last_pos;
    drop(ann);
    bob.send_msg("r", "first", "within bounds").await;
    let mut ann = Client::open(t.addr(), Some(Encoding::Json)).await;
    ann.last_pos = pos;
    let c = ann
        .connect_with(proto::Connect {
            token: t.token("ann"),
            session_id: sid.clone(),
            last_pos: pos,
        })
        .await;
    assert!(c.resumed && c.session_id == sid);
    assert_eq!(ann.next_message().await.body, "within bounds");
    // Now it overflows while detached.
    drop(ann);
    for i in 0..40 {
        bob.send_msg("r", &i.to_string(), &"x".repeat(100)).await;
    }
    let mut back = Client::open(t.addr(), Some(Encoding::Json)).await;
    let c = back
        .connect_with(proto::Connect {
            token: t.token("ann"),
            session_id: sid.clone(),
            last_pos: 0,
        })
        .await;
    assert!(!c.resumed, "an overflowed session cannot replay exactly");
    assert_ne!(c.session_id, sid, "a new session");
    assert!(!t.session_alive(&sid), "the overflowed one is gone");
    // Nothing is lost: the log has all 41 messages after the first one.
    let Kind::Sync(sync) = back
        .request(Cmd::Sync(proto::Sync {
            rooms: [("r".to_string(), 0)].into(),
            limit: 100,
        }))
        .await
    else {
        panic!()
    };
    assert_eq!(sync.rooms[0].messages.len(), 41);
}

#[tokio::test]
async fn acked_pushes_are_not_replayed() {
    let t = TestServer::start().await;
    let mut ann = t.client("ann", Encoding::Json).await;
    ann.join("r").await;
    for i in 1..=3 {
        ann.send_msg("r", &i.to_string(), "m").await;
    }
    while ann.last_pos < 4 {
        ann.next_push().await;
    }
    ann.send(Cmd::Ack(proto::Ack { pos: 3 })).await;
    let sid = ann.session_id.clone();
    assert!(matches!(
        ann.request(Cmd::Ping(proto::Ping {})).await,
        Kind::Pong(_)
    ));
    drop(ann);
    // From the acked position: resumed, and only what came after it is replayed.
    let mut back = Client::open(t.addr(), Some(Encoding::Json)).await;
    back.last_pos = 3;
    let c = back
        .connect_with(proto::Connect {
            token: t.token("ann"),
            session_id: sid.clone(),
            last_pos: 3,
        })
        .await;
    assert!(c.resumed && c.session_id == sid);
    assert_eq!(back.next_push().await.pos, 4);
    drop(back);
    // From before the ack: those pushes are forgotten, so it cannot be exact.
    let mut late = Client::open(t.addr(), Some(Encoding::Json)).await;
    let c = late
        .connect_with(proto::Connect {
            token: t.token("ann"),
            session_id: sid.clone(),
            last_pos: 1,
        })
        .await;
    assert!(!c.resumed);
    assert_ne!(c.session_id, sid);
}

#[tokio::test]
async fn silent_client_is_closed_by_the_heartbeat() {
    let t = TestServer::start_with(|c| {
        c.ws.heartbeat_interval = Duration::from_millis(150);
        c.ws.pong_timeout = Duration::from_millis(150);
    })
    .await;
    let mut c = t.client("ann", Encoding::Json).await;
    // Neither reading (so no automatic pongs) nor sending.
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Read the raw bytes: tungstenite would try to answer the queued pings while reading
    // them, and fail on the socket the server already closed (EPIPE) before it reaches
    // the close frame.
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = c.ws.get_mut() else {
        panic!("plain TCP")
    };
    let mut bytes = Vec::new();
    tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_to_end(tcp, &mut bytes))
        .await
        .expect("server closes the socket")
        .unwrap();
    let frames = raw_frames(&bytes);
    assert!(
        frames.iter().any(|(op, _)| *op == 0x9),
        "the server pinged first"
    );
    let disconnect = frames
        .iter()
        .find(|(op, p)| *op == 0x1 && p.starts_with(b"{\"disconnect\""))
        .expect("a disconnect frame");
    let f: proto::ServerFrame = serde_json::from_slice(&disconnect.1).unwrap();
    let Some(Kind::Disconnect(d)) = f.kind else {
        panic!()
    };
    assert_eq!((d.code, d.reconnect), (4009, true));
    let close = frames
        .iter()
        .find(|(op, _)| *op == 0x8)
        .expect("a close frame");
    assert_eq!(u16::from_be_bytes([close.1[0], close.1[1]]), 4009);
}

#[tokio::test]
async fn client_heartbeats_keep_the_connection() {
    let t = TestServer::start_with(|c| {
        c.ws.heartbeat_interval = Duration::from_millis(150);
        c.ws.pong_timeout = Duration::from_millis(600);
    })
    .await;
    let mut c = t.client("ann", Encoding::Json).await;
    // Only application pings, never reading (so no WebSocket pongs).
    for _ in 0..10 {
        c.send_raw(Message::Text(r#"{"ping":{}}"#.into())).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut pongs = 0;
    while pongs < 10 {
        match c.ws_next().await {
            Message::Text(t) => {
                assert!(t.contains("pong"), "{t}");
                pongs += 1;
            }
            Message::Close(f) => panic!("closed: {f:?}"),
            _ => {}
        }
    }
    assert_eq!(pongs, 10);
}

#[tokio::test]
async fn connect_must_come_within_the_auth_timeout() {
    let t = TestServer::start_with(|c| c.auth.connect_timeout = Duration::from_millis(200)).await;
    let c = Client::open(t.addr(), Some(Encoding::Json)).await;
    let closed = c.closed().await;
    assert_eq!(closed.code, Some(4002));
    assert_eq!(
        closed.errors.iter().map(code_of).collect::<Vec<_>>(),
        [ErrorCode::AuthTimeout]
    );
}

#[tokio::test]
async fn bad_input_gets_documented_errors_and_others_keep_chatting() {
    let t = TestServer::start_with(|c| c.ws.max_frame_bytes = 4096).await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Proto).await;
    ann.join("r").await;
    bob.join("r").await;

    // Garbage on a JSON connection and on a protobuf connection: an error, no close.
    let mut junk = t.client("junk", Encoding::Json).await;
    junk.send_raw(Message::Text("{not json".into())).await;
    assert_eq!(
        code_of(&expect_error(junk.read().await)),
        ErrorCode::BadFrame
    );
    junk.send_raw(Message::Binary(vec![0xff, 0xff, 0xff, 0xff, 0x0f].into()))
        .await;
    assert_eq!(
        code_of(&expect_error(junk.read().await)),
        ErrorCode::BadFrame
    );
    let mut pjunk = t.client("pjunk", Encoding::Proto).await;
    pjunk
        .send_raw(Message::Binary(vec![0x0a, 0xff, 0x01].into()))
        .await;
    assert_eq!(
        code_of(&expect_error(pjunk.read().await)),
        ErrorCode::BadFrame
    );
    // An unknown command: well-formed, but nothing parley knows.
    junk.send_raw(Message::Text(r#"{"id":"9","teleport":{}}"#.into()))
        .await;
    let f = junk.read().await.unwrap();
    assert_eq!(f.id, 9);
    assert_eq!(code_of(&expect_error(Some(f))), ErrorCode::UnknownCommand);
    // Invalid arguments and membership.
    let bad = junk
        .request(Cmd::Join(proto::Join {
            room: "no spaces".into(),
        }))
        .await;
    assert_eq!(code_of(&expect_error_kind(bad)), ErrorCode::InvalidArgument);
    let send = proto::Send {
        room: "r".into(),
        client_msg_id: "x".into(),
        body: "hi".into(),
        ..Default::default()
    };
    let bad = junk.request(Cmd::Send(send)).await;
    assert_eq!(code_of(&expect_error_kind(bad)), ErrorCode::NotMember);
    // The connection still works.
    assert!(matches!(
        junk.request(Cmd::Ping(proto::Ping {})).await,
        Kind::Pong(_)
    ));

    // A command before connect.
    let mut early = Client::open(t.addr(), Some(Encoding::Json)).await;
    let r = early
        .request(Cmd::Join(proto::Join { room: "r".into() }))
        .await;
    assert_eq!(code_of(&expect_error_kind(r)), ErrorCode::NotConnected);
    // connect twice.
    let r = junk
        .request(Cmd::Connect(proto::Connect {
            token: t.token("junk"),
            ..Default::default()
        }))
        .await;
    assert_eq!(code_of(&expect_error_kind(r)), ErrorCode::AlreadyConnected);

    // Oversized frame: closed with 1009.
    let mut big = t.client("big", Encoding::Json).await;
    big.send_raw(Message::Text("x".repeat(8192).into())).await;
    let closed = big.closed().await;
    assert_eq!(closed.code, Some(1009));
    assert_eq!(
        closed.errors.iter().map(code_of).collect::<Vec<_>>(),
        [ErrorCode::FrameTooLarge]
    );
    // Far past the limit, the WebSocket layer closes with 1009 before reading it all, and
    // that close frame gets out (yawc writes queued control frames when its sink is polled
    // for readiness; see `flush_queued`).
    for _ in 0..5 {
        let mut huge = t.client("huge", Encoding::Json).await;
        huge.send_raw(Message::Text("x".repeat(200_000).into()))
            .await;
        assert_eq!(huge.closed().await.code, Some(1009));
    }

    // Forged, expired and missing tokens: error frame, then close 4001.
    for (token, code) in [
        ("not.a.jwt".to_string(), ErrorCode::Unauthorized),
        (forged_token(&t), ErrorCode::Unauthorized),
        (t.expired_token("ann"), ErrorCode::TokenExpired),
        (String::new(), ErrorCode::Unauthorized),
    ] {
        let mut c = Client::open(t.addr(), Some(Encoding::Json)).await;
        c.send(Cmd::Connect(proto::Connect {
            token,
            ..Default::default()
        }))
        .await;
        let closed = c.closed().await;
        assert_eq!(
            closed.errors.iter().map(code_of).collect::<Vec<_>>(),
            [code]
        );
        assert_eq!(closed.code, Some(4001));
        assert_eq!(closed.disconnect.map(|d| d.reconnect), Some(false));
    }

    // Through all of this, ann and bob kept chatting.
    ann.send_msg("r", "still", "still here").await;
    assert_eq!(bob.next_message().await.body, "still here");
}

fn forged_token(t: &TestServer) -> String {
    let mut other = t.config.auth.clone();
    other.jwt_secret = "someone-else".into();
    parley::auth::Authenticator::new(&other)
        .unwrap()
        .mint("ann", Duration::from_secs(60))
        .unwrap()
}

fn expect_error(f: Option<proto::ServerFrame>) -> proto::Error {
    match f.and_then(|f| f.kind) {
        Some(Kind::Error(e)) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn expect_error_kind(k: Kind) -> proto::Error {
    match k {
        Kind::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn unknown_subprotocol_is_refused() {
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue};
    let t = TestServer::start().await;
    let mut req = format!("ws://{}/ws", t.addr())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
}

#[tokio::test]
async fn graceful_shutdown_tells_clients_to_reconnect() {
    let t = TestServer::start().await;
    let mut c = t.client("ann", Encoding::Json).await;
    c.ws.flush().await.unwrap();
    t.server.shutdown();
    let closed = c.closed().await;
    assert_eq!(closed.code, Some(1001));
    assert_eq!(
        closed.disconnect.map(|d| (d.code, d.reconnect)),
        Some((1001, true))
    );
    tokio::time::timeout(WAIT, t.server.wait())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let t = TestServer::start().await;
    assert_eq!(t.http_get("/healthz").await.0, 200);
    assert_eq!(t.http_get("/readyz").await.0, 200);
    let mut c = t.client("ann", Encoding::Json).await;
    c.join("r").await;
    c.send_msg("r", "1", "m").await;
    c.send_raw(Message::Text("garbage".into())).await;
    c.read().await;
    let (status, body) = t.http_get("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "parley_connections{transport=\"ws\"} 1",
        "parley_messages_total 1",
        "parley_errors_total{code=\"ERROR_CODE_BAD_FRAME\"} 1",
        "parley_sessions 1",
    ] {
        assert!(body.contains(line), "missing {line:?} in\n{body}");
    }
    assert!(body.contains("parley_frames_in_total{transport=\"ws\"}"));
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_as_slow() {
    let t = TestServer::start_with(|c| {
        c.session.max_queue_bytes = 64 * 1024;
        c.ws.write_timeout = Duration::from_secs(3);
    })
    .await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Proto).await;
    ann.join("r").await;
    bob.join("r").await;
    // Ann stops reading; bob sends far more than the socket buffers and ann's queue hold.
    let body = "x".repeat(15_000);
    for i in 0..600 {
        bob.send_msg("r", &i.to_string(), &body).await;
    }
    // Ann reads again: everything that made it, then the slow-consumer disconnect.
    let mut messages = 0;
    let closed = loop {
        let msg = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut ann.ws))
            .await
            .expect("frame in time");
        match msg {
            Some(Ok(Message::Text(t))) => {
                let f: proto::ServerFrame = serde_json::from_str(&t).unwrap();
                match f.kind {
                    Some(Kind::Message(_)) => messages += 1,
                    Some(Kind::Disconnect(d)) => break Some(d),
                    _ => {}
                }
            }
            Some(Ok(_)) => {}
            _ => break None,
        }
    };
    // The disconnect frame is best effort: it follows the frames that were in flight
    // when the queue overflowed only if those finished within a second; a client that
    // read nothing meanwhile finds the connection simply closed.
    if let Some(d) = closed {
        assert_eq!((d.code, d.reconnect), (4008, true));
    }
    assert!(messages < 600, "the queue was cut, not grown: {messages}");
    // The session is gone: resuming it fails, and log sync has all 600.
    let mut back = Client::open(t.addr(), Some(Encoding::Json)).await;
    let c = back
        .connect_with(proto::Connect {
            token: t.token("ann"),
            session_id: ann.session_id.clone(),
            last_pos: 0,
        })
        .await;
    assert!(!c.resumed);
    assert_eq!(c.rooms[0].last_seq, 600);
}

#[tokio::test]
async fn pipelined_sends_are_acked_in_order_with_increasing_seqs() {
    let t = TestServer::start().await;
    let mut ann = t.client("ann", Encoding::Proto).await;
    ann.join("r").await;
    // 100 sends without waiting for any reply.
    let mut ids = Vec::new();
    for i in 0..100 {
        let send = proto::Send {
            room: "r".into(),
            client_msg_id: i.to_string(),
            body: i.to_string(),
            ..Default::default()
        };
        ids.push(ann.send(Cmd::Send(send)).await);
    }
    let mut acks = Vec::new();
    while acks.len() < 100 {
        let f = ann.read().await.unwrap();
        if let Some(Kind::Sent(s)) = f.kind {
            acks.push((f.id, s.seq));
        }
    }
    let expected: Vec<(u64, u64)> = ids.iter().zip(1..).map(|(id, seq)| (*id, seq)).collect();
    assert_eq!(
        acks, expected,
        "replies in command order, seqs in send order"
    );
}

/// Splits unmasked server frames (payloads under 64 KiB) into (opcode, payload).
fn raw_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 2 {
        let op = bytes[0] & 0x0f;
        let (len, header) = match bytes[1] & 0x7f {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            n => (n as usize, 2),
        };
        out.push((op, bytes[header..header + len].to_vec()));
        bytes = &bytes[header + len..];
    }
    out
}
