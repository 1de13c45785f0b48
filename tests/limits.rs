//! The limits of `[limits]`, one test each: what the client over a limit gets (a
//! documented error, with a retry hint for rates) and that a well-behaved client beside
//! it is unaffected and loses nothing.

mod common;

use std::time::Duration;

use common::*;
use parley::{
    codec::Encoding,
    config::{Config, LimitsConfig},
    proto::{self, ErrorCode, client_frame::Cmd, server_frame::Kind},
};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

async fn with_limits(edit: impl FnOnce(&mut LimitsConfig)) -> TestServer {
    TestServer::start_with(|c: &mut Config| {
        c.limits = LimitsConfig::off();
        edit(&mut c.limits);
    })
    .await
}

fn error_of(kind: Kind) -> proto::Error {
    match kind {
        Kind::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn send(room: &str, id: &str) -> Cmd {
    Cmd::Send(proto::Send {
        room: room.into(),
        client_msg_id: id.into(),
        body: id.into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn sends_over_the_rate_get_rate_limited_with_a_retry_hint() {
    let t = with_limits(|l| {
        l.sends_per_second = 2.0;
        l.sends_burst = 3.0;
    })
    .await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Proto).await;
    ann.join("r").await;
    bob.join("r").await;
    for i in 0..3 {
        ann.send_msg("r", &i.to_string(), "burst").await;
    }
    let e = error_of(ann.request(send("r", "over")).await);
    assert_eq!(code_of(&e), ErrorCode::RateLimited);
    assert!(
        (1..=500).contains(&e.retry_after_ms),
        "retry hint {}",
        e.retry_after_ms
    );
    // The connection stays, and the message was not stored.
    let Kind::Rooms(list) = ann.request(Cmd::Rooms(proto::Rooms::default())).await else {
        panic!()
    };
    assert_eq!(list.rooms[0].last_seq, 3);
    // Bob has his own bucket.
    bob.send_msg("r", "b", "bob's").await;
    // After the hint, ann may send again.
    tokio::time::sleep(Duration::from_millis(u64::from(e.retry_after_ms) + 50)).await;
    ann.send_msg("r", "after", "ok again").await;
    // Over HTTP too, with Retry-After.
    let auth = format!("Bearer {}", t.token("ann"));
    let mut limited = None;
    for i in 0..5 {
        let r = http(
            t.addr(),
            "POST",
            "/api/v1/rooms/r/messages",
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            format!(r#"{{"clientMsgId":"h{i}","body":"x"}}"#),
        )
        .await;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("the HTTP API is limited too");
    assert!(r.headers.contains_key("retry-after"));
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["code"], "ERROR_CODE_RATE_LIMITED");
    assert!(v["retryAfterMs"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn joins_are_rate_limited_and_rooms_per_user_capped() {
    let t = with_limits(|l| {
        l.joins_per_second = 1.0;
        l.joins_burst = 2.0;
        l.max_rooms_per_user = 3;
    })
    .await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Json).await;
    ann.join("a").await;
    ann.join("b").await;
    let join = |room: &str| Cmd::Join(proto::Join { room: room.into() });
    let e = error_of(ann.request(join("c")).await);
    assert_eq!(code_of(&e), ErrorCode::RateLimited);
    assert!(e.retry_after_ms > 0);
    // Joining a room one is already in costs nothing.
    assert!(matches!(ann.request(join("a")).await, Kind::Joined(_)));
    tokio::time::sleep(Duration::from_millis(u64::from(e.retry_after_ms) + 50)).await;
    ann.join("c").await;
    // Three rooms: the fourth is over the cap, whatever the rate.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let e = error_of(ann.request(join("d")).await);
    assert_eq!(code_of(&e), ErrorCode::LimitExceeded);
    assert_eq!(e.retry_after_ms, 0);
    // Invitations and new DMs count too.
    bob.join("e").await;
    let e = error_of(
        bob.request(Cmd::Invite(proto::Invite {
            room: "e".into(),
            user: "ann".into(),
        }))
        .await,
    );
    assert_eq!(code_of(&e), ErrorCode::LimitExceeded);
    let dm = Cmd::Send(proto::Send {
        to_user: "ann".into(),
        client_msg_id: "dm".into(),
        body: "hi".into(),
        ..Default::default()
    });
    assert_eq!(
        code_of(&error_of(bob.request(dm).await)),
        ErrorCode::LimitExceeded
    );
    // Leaving makes room again; bob was never affected.
    assert!(matches!(
        ann.request(Cmd::Leave(proto::Leave { room: "a".into() }))
            .await,
        Kind::Left(_)
    ));
    ann.join("d").await;
    bob.join("f").await;
}

#[tokio::test]
async fn sessions_per_user_are_capped() {
    let t = with_limits(|l| l.max_sessions_per_user = 2).await;
    let phone = t.client("ann", Encoding::Json).await;
    let _laptop = t.client("ann", Encoding::Json).await;
    let mut third = Client::open(t.addr(), Some(Encoding::Json)).await;
    let e = error_of(
        third
            .request(Cmd::Connect(proto::Connect {
                token: t.token("ann"),
                ..Default::default()
            }))
            .await,
    );
    assert_eq!(code_of(&e), ErrorCode::LimitExceeded);
    // Other users are not affected; the same user may still resume her own sessions.
    let _bob = t.client("bob", Encoding::Json).await;
    let resumed = third
        .connect_with(proto::Connect {
            token: t.token("ann"),
            session_id: phone.session_id.clone(),
            last_pos: phone.last_pos,
        })
        .await;
    assert!(resumed.resumed);
    // A session that ends (a deliberate close) frees its place.
    third.ws.close(None).await.unwrap();
    t.session_reaped(&phone.session_id).await;
    let _again = t.client("ann", Encoding::Json).await;
}

/// Opens a TCP connection from `source` (a loopback address) and sends a plain GET.
async fn get_from(t: &TestServer, source: &str, path: &str) -> (TcpStream, String) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(t.addr()).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap_or(0);
    (s, String::from_utf8_lossy(&buf[..n]).to_string())
}

#[tokio::test]
async fn connections_per_ip_and_in_total_are_capped() {
    let t = with_limits(|l| {
        l.max_connections_per_ip = 2;
        l.max_connections = 3;
    })
    .await;
    // Two kept-alive connections from 127.0.0.1: the third from there is refused.
    let (_a, r) = get_from(&t, "127.0.0.1", "/healthz").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let (_b, _) = get_from(&t, "127.0.0.1", "/healthz").await;
    let (_c, r) = get_from(&t, "127.0.0.1", "/healthz").await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.contains("ERROR_CODE_LIMIT_EXCEEDED"), "{r}");
    // Another address still gets in, until the total is reached.
    let (_d, r) = get_from(&t, "127.0.0.2", "/healthz").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let (_e, r) = get_from(&t, "127.0.0.3", "/healthz").await;
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    // Closing one frees its place.
    drop(_a);
    let mut admitted = false;
    for _ in 0..100 {
        let (_f, r) = get_from(&t, "127.0.0.1", "/healthz").await;
        if r.starts_with("HTTP/1.1 200") {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted, "a freed place is reused");
}

#[tokio::test]
async fn connection_attempts_and_tickets_per_ip_are_rate_limited() {
    let t = with_limits(|l| {
        l.connects_per_ip_per_second = 0.5;
        l.connects_per_ip_burst = 3.0;
        l.tickets_per_ip_per_second = 0.5;
        l.tickets_per_ip_burst = 1.0;
    })
    .await;
    // Tickets: one from 127.0.0.4, then 429 with Retry-After.
    let token = t.token("ann");
    let ticket = |source: &'static str| {
        let token = token.clone();
        let addr = t.addr();
        async move {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
            let mut s = socket.connect(addr).await.unwrap();
            let req = format!(
                "POST /api/v1/tickets HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    assert!(ticket("127.0.0.4").await.starts_with("HTTP/1.1 200"));
    let r = ticket("127.0.0.4").await;
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    assert!(r.to_ascii_lowercase().contains("retry-after: 2"), "{r}");
    assert!(r.contains("ERROR_CODE_RATE_LIMITED"), "{r}");
    // Connection attempts: 127.0.0.4 spent 2 of its 3; the fourth is refused with 429.
    let (_s, r) = get_from(&t, "127.0.0.4", "/healthz").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let (_s, r) = get_from(&t, "127.0.0.4", "/healthz").await;
    assert!(r.starts_with("HTTP/1.1 429"), "{r}");
    assert!(r.contains("retryAfterMs"), "{r}");
    // Another address is not affected.
    let (_s, r) = get_from(&t, "127.0.0.5", "/healthz").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

/// Issue 20, item 7: the room cap holds when one user's sessions join at once. The store
/// checks and inserts in one step (SQLite: its one writer; PostgreSQL: a per-user lock
/// held to commit, so across instances too).
#[tokio::test]
async fn the_room_cap_holds_under_concurrent_joins() {
    let t = with_limits(|l| l.max_rooms_per_user = 5).await;
    let mut sessions = Vec::new();
    for _ in 0..8 {
        sessions.push(t.client("ann", Encoding::Proto).await);
    }
    let mut bob = t.client("bob", Encoding::Json).await;
    for round in 0..3 {
        let joins = sessions.iter_mut().enumerate().map(|(i, c)| async move {
            c.request(Cmd::Join(proto::Join {
                room: format!("r{round}-{i}"),
            }))
            .await
        });
        let mut joined = 0;
        for reply in futures_util::future::join_all(joins).await {
            match reply {
                Kind::Joined(_) => joined += 1,
                Kind::Error(e) => assert_eq!(code_of(&e), ErrorCode::LimitExceeded),
                other => panic!("{other:?}"),
            }
        }
        let Kind::Rooms(list) = sessions[0]
            .request(Cmd::Rooms(proto::Rooms::default()))
            .await
        else {
            panic!()
        };
        assert_eq!(
            (joined, list.rooms.len()),
            (5, 5),
            "round {round}: a cap of 5"
        );
        // Leave them all for the next round.
        for r in list.rooms {
            let left = sessions[0]
                .request(Cmd::Leave(proto::Leave { room: r.room }))
                .await;
            assert!(matches!(left, Kind::Left(_)));
        }
    }
    // Another user was never limited by ann's joins.
    for i in 0..5 {
        bob.join(&format!("b{i}")).await;
    }
}

/// Issue 20, item 3: `signal` is rate-limited per sender, and the bytes one user is sent
/// are budgeted per recipient across all senders; the refused sender gets RATE_LIMITED
/// with a hint, and the recipient keeps its session and gets what was accepted.
#[tokio::test]
async fn signals_are_rate_limited_per_sender_and_budgeted_per_recipient() {
    let t = with_limits(|l| {
        l.signals_per_second = 1.0;
        l.signals_burst = 3.0;
        l.signal_bytes_per_second = 2_000.0;
        l.signal_bytes_burst = 40_000.0;
    })
    .await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Proto).await;
    let mut carl = t.client("carl", Encoding::Json).await;
    for c in [&mut ann, &mut bob, &mut carl] {
        c.join("r").await;
    }
    let signal = |to: &str, payload: usize| {
        Cmd::Signal(proto::Signal {
            to_user: to.into(),
            kind: "ice".into(),
            payload: "x".repeat(payload),
        })
    };
    // The per-sender rate: 3 at once, then a hint.
    for _ in 0..3 {
        assert!(matches!(
            ann.request(signal("bob", 10)).await,
            Kind::Done(_)
        ));
    }
    let e = error_of(ann.request(signal("bob", 10)).await);
    assert_eq!(code_of(&e), ErrorCode::RateLimited);
    assert!((1..=1000).contains(&e.retry_after_ms), "{e:?}");
    // The per-recipient budget: carl's 2 × 15 KB fit in bob's 40 KB; a third sender's
    // 15 KB does not, though that sender has spent nothing.
    for _ in 0..2 {
        assert!(matches!(
            carl.request(signal("bob", 15_000)).await,
            Kind::Done(_)
        ));
    }
    let mut dan = t.client("dan", Encoding::Json).await;
    dan.join("r").await;
    let e = error_of(dan.request(signal("bob", 15_000)).await);
    assert_eq!(code_of(&e), ErrorCode::RateLimited);
    assert!(e.retry_after_ms > 0);
    // Others may still be signalled by dan.
    assert!(matches!(
        dan.request(signal("carl", 15_000)).await,
        Kind::Done(_)
    ));
    // Bob got the five that were accepted and is still connected.
    for _ in 0..5 {
        bob.next_of(|k| match k {
            Kind::Signal(s) => Some(s),
            _ => None,
        })
        .await;
    }
    assert!(t.session_alive(&bob.session_id));
    ann.send_msg("r", "m", "hi").await;
    assert_eq!(bob.next_message().await.body, "hi");
}

/// Issue 20, item 4: `history` and `sync` share one per-user rate.
#[tokio::test]
async fn history_and_sync_are_rate_limited() {
    let t = with_limits(|l| {
        l.reads_per_second = 1.0;
        l.reads_burst = 2.0;
    })
    .await;
    let mut ann = t.client("ann", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Json).await;
    ann.join("r").await;
    let history = || {
        Cmd::History(proto::History {
            room: "r".into(),
            ..Default::default()
        })
    };
    let sync = || {
        Cmd::Sync(proto::Sync {
            rooms: [("r".to_string(), 0)].into(),
            limit: 0,
        })
    };
    assert!(matches!(ann.request(history()).await, Kind::History(_)));
    assert!(matches!(ann.request(sync()).await, Kind::Sync(_)));
    let e = error_of(ann.request(history()).await);
    assert_eq!(code_of(&e), ErrorCode::RateLimited);
    assert!(e.retry_after_ms > 0);
    assert_eq!(
        code_of(&error_of(ann.request(sync()).await)),
        ErrorCode::RateLimited
    );
    // Bob has his own bucket; ann may read again after the hint.
    assert!(matches!(bob.request(sync()).await, Kind::Sync(_)));
    tokio::time::sleep(Duration::from_millis(u64::from(e.retry_after_ms) + 50)).await;
    assert!(matches!(ann.request(history()).await, Kind::History(_)));
}
