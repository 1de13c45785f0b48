//! Defects found by trying parley as an attacker and as a careless operator would, one
//! test each, every one also checking that a well-behaved client on the same server is
//! unaffected and loses nothing.

mod common;

use std::time::Duration;

use common::*;
use parley::{
    auth::Authenticator,
    codec::Encoding,
    proto::{self, client_frame::Cmd, server_frame::Kind},
};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// Bob and carl in room `r`; carl checks that he keeps getting everything.
async fn bystanders(t: &TestServer) -> (Client, Client) {
    let mut bob = t.client("bob", Encoding::Proto).await;
    let mut carl = t.client("carl", Encoding::Json).await;
    bob.join("r").await;
    carl.join("r").await;
    (bob, carl)
}

async fn still_chatting(bob: &mut Client, carl: &mut Client, id: &str) {
    let sent = bob.send_msg("r", id, "still here").await;
    let m = carl.next_message().await;
    assert_eq!((m.seq, m.body.as_str()), (sent.seq, "still here"));
}

#[tokio::test]
async fn a_leaked_ticket_never_outlives_its_token() {
    let t = TestServer::start().await;
    let (mut bob, mut carl) = bystanders(&t).await;
    // A token that expires in two seconds (the leeway is 5 s: account for it).
    let auth = Authenticator::new(&t.config.auth).unwrap();
    let exp = parley::auth::unix_now() + 2;
    let short = auth.mint_with_exp("ann", exp).unwrap();
    let Ok(ticket) = t.try_ticket(&short).await else {
        panic!("a ticket is minted while the token is valid")
    };
    eventually("the token expired", || parley::auth::unix_now() > exp).await;
    let r = http(t.addr(), "GET", &format!("/sse?ticket={ticket}"), &[], "").await;
    assert_eq!(r.status, 401);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["code"], "ERROR_CODE_TOKEN_EXPIRED");
    still_chatting(&mut bob, &mut carl, "1").await;
}

#[tokio::test]
async fn seqs_past_two_to_the_63_never_wrap() {
    let t = TestServer::start().await;
    let (mut bob, mut carl) = bystanders(&t).await;
    for i in 1..=3 {
        bob.send_msg("r", &i.to_string(), "m").await;
    }
    let huge = u64::MAX;
    for after in [huge, 1 << 63, (1 << 63) - 1] {
        let Kind::History(h) = bob
            .request(Cmd::History(proto::History {
                room: "r".into(),
                after_seq: Some(after),
                ..Default::default()
            }))
            .await
        else {
            panic!()
        };
        assert!(h.messages.is_empty(), "after {after}: {:?}", h.messages);
        let Kind::Sync(s) = bob
            .request(Cmd::Sync(proto::Sync {
                rooms: [("r".to_string(), after)].into(),
                limit: 0,
            }))
            .await
        else {
            panic!()
        };
        assert!(s.rooms[0].messages.is_empty(), "sync after {after}");
        let auth = format!("Bearer {}", t.token("bob"));
        let r = http(
            t.addr(),
            "GET",
            &format!("/api/v1/rooms/r/messages?after_seq={after}"),
            &[("authorization", &auth)],
            "",
        )
        .await;
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(v.get("messages").is_none(), "HTTP after {after}: {v}");
    }
    // Past u64 entirely: refused as input, not wrapped either.
    let r = http(
        t.addr(),
        "GET",
        "/api/v1/rooms/r/messages?after_seq=18446744073709551616",
        &[("authorization", &format!("Bearer {}", t.token("bob")))],
        "",
    )
    .await;
    assert_eq!(r.status, 400);
    for _ in 0..3 {
        carl.next_message().await;
    }
    still_chatting(&mut bob, &mut carl, "4").await;
}

#[tokio::test]
async fn history_pages_from_the_oldest_message_with_after_seq_zero() {
    let t = TestServer::start().await;
    let (mut bob, _carl) = bystanders(&t).await;
    for i in 1..=5 {
        bob.send_msg("r", &i.to_string(), "m").await;
    }
    let page = |after: Option<u64>| {
        Cmd::History(proto::History {
            room: "r".into(),
            after_seq: after,
            limit: 2,
            ..Default::default()
        })
    };
    let Kind::History(h) = bob.request(page(Some(0))).await else {
        panic!()
    };
    assert_eq!(h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2]);
    assert!(h.more);
    // Absent: the newest page.
    let Kind::History(h) = bob.request(page(None)).await else {
        panic!()
    };
    assert_eq!(h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [4, 5]);
    // The JSON mapping: "afterSeq": "0" is present, and means the same.
    let mut json = t.client("dave", Encoding::Json).await;
    json.send_raw(Message::Text(
        r#"{"id":"7","history":{"room":"r","afterSeq":"0","limit":1}}"#.into(),
    ))
    .await;
    let f = json.read().await.unwrap();
    let Some(Kind::History(h)) = f.kind else {
        panic!("{f:?}")
    };
    assert_eq!(h.messages[0].seq, 1);
}

#[tokio::test]
async fn an_oversize_http_command_gets_the_documented_error_json() {
    let t = TestServer::start_with(|c| c.ws.max_frame_bytes = 4096).await;
    let (mut bob, mut carl) = bystanders(&t).await;
    let auth = format!("Bearer {}", t.token("bob"));
    let body = format!(
        r#"{{"id":"1","send":{{"room":"r","clientMsgId":"x","body":"{}"}}}}"#,
        "x".repeat(8192)
    );
    for path in ["/session", &format!("/session/{}", bob.session_id)] {
        let r = http(
            t.addr(),
            "POST",
            path,
            &[("authorization", &auth)],
            body.clone(),
        )
        .await;
        assert_eq!(r.status, 413, "{path}");
        assert_eq!(r.headers["content-type"], "application/json");
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["code"], "ERROR_CODE_FRAME_TOO_LARGE", "{path}: {v}");
    }
    let r = http(
        t.addr(),
        "POST",
        "/api/v1/rooms/r/messages",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        format!(r#"{{"clientMsgId":"y","body":"{}"}}"#, "y".repeat(8192)),
    )
    .await;
    assert_eq!(r.status, 413);
    still_chatting(&mut bob, &mut carl, "1").await;
}

#[tokio::test]
async fn shutdown_is_not_ready_first_then_stops() {
    let t = TestServer::start_with(|c| c.server.drain_delay = Duration::from_millis(800)).await;
    let mut ann = t.client("ann", Encoding::Json).await;
    ann.join("r").await;
    assert_eq!(t.http_get("/readyz").await.0, 200);
    t.server.shutdown();
    // Not ready at once, while still serving: new clients still get in.
    assert_eq!(t.http_get("/readyz").await.0, 503);
    assert_eq!(t.http_get("/healthz").await.0, 200);
    let mut late = t.client("late", Encoding::Json).await;
    late.join("r").await;
    // Then everyone is told to reconnect.
    for c in [ann, late] {
        let closed = c.closed().await;
        assert_eq!(closed.code, Some(1001));
    }
}

#[tokio::test]
async fn metrics_are_served_as_openmetrics() {
    let t = TestServer::start().await;
    let r = http(t.addr(), "GET", "/metrics", &[], "").await;
    assert_eq!(
        r.headers["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
}

#[tokio::test]
async fn the_queue_bound_holds_while_a_write_is_blocked() {
    // A long write deadline: what cuts the stuck client here is its queue overflowing.
    let t = TestServer::start_with(|c| {
        c.session.max_queue_bytes = 64 * 1024;
        c.ws.write_timeout = Duration::from_secs(60);
    })
    .await;
    let (mut bob, mut carl) = bystanders(&t).await;
    let (ann, sid) = stalling_member(&t, "ann", "r").await;
    let started = std::time::Instant::now();
    let body = "x".repeat(15_000);
    for i in 0..400 {
        let sent = bob.send_msg("r", &i.to_string(), &body).await;
        assert_eq!(carl.next_message().await.seq, sent.seq);
    }
    // Cut as soon as the queue overflowed (plus the second the write in flight gets to
    // finish), long before the 60 s write deadline.
    t.session_reaped(&sid).await;
    loop {
        let (_, metrics) = t.http_get("/metrics").await;
        if metrics.contains("parley_connections{transport=\"ws\"} 2") {
            break; // only bob and carl are still connected
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "ann still connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    still_chatting(&mut bob, &mut carl, "last").await;
    drop(ann);
}

#[tokio::test]
async fn a_frame_far_over_the_limit_gets_close_1009_not_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = TestServer::start_with(|c| c.ws.max_frame_bytes = 4096).await;
    let (mut bob, mut carl) = bystanders(&t).await;
    for round in 0..5 {
        // A raw client: the handshake, then a masked text frame header announcing 8 MiB,
        // then payload written as fast as the socket takes it — the client is still
        // sending when the server gives up on the frame.
        let mut s = tokio::net::TcpStream::connect(t.addr()).await.unwrap();
        let req = "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        s.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"));
        let (mut rd, mut wr) = s.into_split();
        let writer = tokio::spawn(async move {
            let mut frame = vec![0x81u8, 0xff];
            frame.extend_from_slice(&(8u64 << 20).to_be_bytes());
            frame.extend_from_slice(&[1, 2, 3, 4]);
            if wr.write_all(&frame).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..128 {
                if wr.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        // The server's answer: a close frame with 1009 (0x88, length, code 0x03f1).
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, async {
            let mut buf = [0u8; 1024];
            while got.len() < 4 {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(
            got.len() >= 4 && got[0] == 0x88 && got[2..4] == [0x03, 0xf1],
            "round {round}: got {got:?}"
        );
        writer.abort();
    }
    still_chatting(&mut bob, &mut carl, "1").await;
}

/// Raw deflate of `text` with a sync flush, the 4-byte tail stripped (RFC 7692 7.2.1),
/// continuing `c`'s context.
fn deflated(c: &mut flate2::Compress, text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 64);
    c.compress_vec(text, &mut out, flate2::FlushCompress::Sync)
        .unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// Every way a client can break RFC 6455 / RFC 7692 gets the close code PROTOCOL.md
/// lists (1002 protocol error, 1007 invalid data), and the close frame reaches the
/// client although it sent more bytes after the bad frame (the server lingers rather
/// than closing with unread bytes, which would reset the connection).
#[tokio::test]
async fn protocol_errors_get_their_close_code_not_a_reset() {
    use tokio::io::AsyncWriteExt;
    let t = TestServer::start().await;
    let (mut bob, mut carl) = bystanders(&t).await;
    let text = b"hello parley, hello parley, hello parley";
    let mut context = flate2::Compress::new(flate2::Compression::default(), false);
    let first = deflated(&mut context, text);
    // The same context again: back-references into the first message, which a server
    // that answered `client_no_context_takeover` has forgotten.
    let second = deflated(&mut context, text);
    let cases: Vec<(&str, bool, Vec<u8>, u16)> = vec![
        (
            "text that is not UTF-8",
            false,
            masked_frame(0x81, &[b'{', 0xff, 0xfe]),
            1007,
        ),
        (
            "UTF-8 broken across fragments",
            false,
            [
                masked_frame(0x01, &[b'{', 0xe2]),
                masked_frame(0x80, &[0x28, 0xa1]),
            ]
            .concat(),
            1007,
        ),
        (
            "a continuation with no message",
            false,
            masked_frame(0x80, b"abc"),
            1002,
        ),
        (
            "a new message inside a fragmented one",
            false,
            [masked_frame(0x01, b"ab"), masked_frame(0x81, b"cd")].concat(),
            1002,
        ),
        ("RSV1 on a ping", true, masked_frame(0xc9, b"hi"), 1002),
        (
            "RSV1 on a continuation",
            true,
            [masked_frame(0x01, b"ab"), masked_frame(0xc0, b"cd")].concat(),
            1002,
        ),
        (
            "RSV1 without permessage-deflate",
            false,
            masked_frame(0xc1, &first),
            1002,
        ),
        (
            "a corrupt compressed message",
            true,
            masked_frame(0xc1, &[0xff; 8]),
            1007,
        ),
        (
            "context kept against client_no_context_takeover",
            true,
            [masked_frame(0xc1, &first), masked_frame(0xc1, &second)].concat(),
            1007,
        ),
    ];
    for (what, deflate, bytes, code) in cases {
        let (s, head) = raw_ws(t.addr(), deflate.then_some("permessage-deflate")).await;
        if deflate {
            assert!(head.contains("client_no_context_takeover"), "{head}");
        }
        // The bad frame, then more bytes the server will not read as frames.
        let mut out = bytes;
        out.extend(std::iter::repeat_n(0x42u8, 64 * 1024));
        let (mut rd, mut wr) = s.into_split();
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&out).await;
            wr
        });
        assert_eq!(read_close_code(&mut rd).await, Some(code), "{what}");
        writer.abort();
    }
    still_chatting(&mut bob, &mut carl, "after").await;
}

/// A client's close gets the close reply (its code echoed), and then the server closes
/// the connection at once (RFC 6455 §7.1.1: after both close frames the server closes
/// first) instead of waiting up to `CLOSE_TIMEOUT` for the client to close its side: what
/// the client writes afterwards meets a closed socket. A close frame followed by more
/// bytes (which a client must not send) still gets its reply whole: the server lingers
/// then, since closing with unread bytes would reset the connection.
#[tokio::test]
async fn a_clients_close_gets_the_reply_and_the_server_closes_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = TestServer::start().await;
    let (mut bob, mut carl) = bystanders(&t).await;
    let close = masked_frame(0x88, &[0x03, 0xe8]); // 1000
    for round in 0..3 {
        let (s, _) = raw_ws(t.addr(), None).await;
        let (mut rd, mut wr) = s.into_split();
        wr.write_all(&close).await.unwrap();
        assert_eq!(read_close_code(&mut rd).await, Some(1000), "round {round}");
        let replied = std::time::Instant::now();
        let mut rest = [0u8; 64];
        let end = tokio::time::timeout(WAIT, rd.read(&mut rest)).await;
        assert_eq!(
            end.unwrap().unwrap(),
            0,
            "round {round}: the end of the stream"
        );
        // This side stays open. The server's socket is already closed: a write now is
        // answered with a reset, and the next one fails. A lingering server would read
        // and drop them for up to CLOSE_TIMEOUT (1 s).
        let ping = masked_frame(0x89, b"late");
        loop {
            if wr.write_all(&ping).await.is_err() {
                break;
            }
            assert!(
                replied.elapsed() < Duration::from_millis(800),
                "round {round}: the server still holds the connection"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Bytes after the close frame: the reply still arrives, not a reset.
    let (s, _) = raw_ws(t.addr(), None).await;
    let (mut rd, mut wr) = s.into_split();
    let mut out = close.clone();
    out.extend(std::iter::repeat_n(0x42u8, 64 * 1024));
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&out).await;
        wr
    });
    assert_eq!(read_close_code(&mut rd).await, Some(1000));
    writer.abort();
    still_chatting(&mut bob, &mut carl, "after").await;
}

/// A client that writes pings and never reads (no token needed) used to have every ping
/// read and a pong queued for it, without bound (195 MiB of server memory for 150 MB of
/// pings). The server now owes at most one pong (the latest ping's, RFC 6455 5.5.3) and
/// stops reading while it cannot write it, so the flood backs up into the client's own
/// socket: what the server takes in stays at about what the sockets buffer.
#[tokio::test]
async fn a_ping_flood_that_never_reads_is_held_back() {
    use tokio::io::AsyncWriteExt;
    let t = TestServer::start().await;
    let (mut bob, mut carl) = bystanders(&t).await;
    let (mut s, _) = raw_ws_on(tiny_socket(t.addr()).await, None).await;
    // 500 pings of 125 bytes per write, up to 64 MiB in all, for up to 8 s.
    let ping = masked_frame(0x89, &[0x5a; 125]);
    let chunk: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 500)
        .collect();
    let limit = 64 << 20;
    let started = tokio::time::Instant::now();
    let mut written = 0usize;
    while written < limit && started.elapsed() < Duration::from_secs(8) {
        match tokio::time::timeout(Duration::from_millis(500), s.write_all(&chunk)).await {
            Ok(Ok(())) => written += chunk.len(),
            Ok(Err(e)) => panic!("the server dropped the flood: {e}"),
            // Blocked: the server stopped reading.
            Err(_) => break,
        }
    }
    assert!(
        written < 24 << 20,
        "the server took {written} bytes of pings from a client that reads nothing"
    );
    // Meanwhile everyone else chats on.
    still_chatting(&mut bob, &mut carl, "during").await;
    drop(s);
    still_chatting(&mut bob, &mut carl, "after").await;
}

/// A command waiting for the store (here a `join` whose write waits for a lock another
/// connection holds on the SQLite file; on PostgreSQL a pool wait of up to 10 s) used to
/// stop the connection's pushes and pings until it finished, and a busy room then cut
/// the client as a slow consumer. Commands now run beside the writer: pushes and pings
/// flow meanwhile, replies keep the order of their commands, and other clients are
/// unaffected.
#[tokio::test]
async fn a_slow_command_does_not_hold_up_pushes_or_pings() {
    if pg::selected() {
        // The lock below is SQLite's.
        return;
    }
    let dir = format!(
        "{}/parley-slow-store-{}",
        env!("CARGO_TARGET_TMPDIR"),
        std::process::id()
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = format!("{dir}/parley.db");
    let t = TestServer::start_with(|c| {
        c.store.path = path.clone();
        c.ws.heartbeat_interval = Duration::from_millis(200);
    })
    .await;
    let mut alice = t.client("alice", Encoding::Json).await;
    let mut bob = t.client("bob", Encoding::Json).await;
    alice.join("r").await;
    bob.join("r").await;
    while alice.inbox.pop_front().is_some() {}

    // Hold the write lock: parley's writer waits (busy timeout 5 s).
    let lock = rusqlite::Connection::open(&path).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let join = alice
        .send(Cmd::Join(proto::Join { room: "r2".into() }))
        .await;
    let ping = alice.send(Cmd::Ping(proto::Ping {})).await;

    // While alice's join waits: bob's typing reaches her, and so do the server's pings.
    let typing = bob
        .request(Cmd::Typing(proto::Typing { room: "r".into() }))
        .await;
    assert!(matches!(typing, Kind::Done(_)), "{typing:?}");
    let (mut typed, mut pinged) = (false, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !(typed && pinged) {
        let msg = tokio::time::timeout_at(deadline, futures_util::StreamExt::next(&mut alice.ws))
            .await
            .unwrap_or_else(|_| panic!("pushed {typed}, pinged {pinged} while a command waited"))
            .unwrap()
            .unwrap();
        match msg {
            Message::Ping(_) => pinged = true,
            Message::Text(t) => {
                let f = codec_decode(Encoding::Json, t.as_bytes());
                if f.pos > 0 {
                    // Read past the client's own bookkeeping.
                    alice.last_pos = f.pos;
                }
                assert_ne!(f.id, join, "the join was answered while the lock was held");
                assert_ne!(f.id, ping, "the ping overtook the join: {f:?}");
                if matches!(f.kind, Some(Kind::Typing(_))) {
                    typed = true;
                }
            }
            _ => {}
        }
    }
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);

    // Then the replies, in the order of their commands.
    let mut replies = Vec::new();
    while replies.len() < 2 {
        let f = alice.read().await.expect("replies before close");
        if f.pos == 0 && f.id != 0 {
            replies.push((f.id, f.kind));
        }
    }
    assert_eq!(replies[0].0, join);
    assert!(matches!(replies[0].1, Some(Kind::Joined(_))), "{replies:?}");
    assert_eq!(replies[1].0, ping);
    assert!(matches!(replies[1].1, Some(Kind::Pong(_))), "{replies:?}");
    // Nobody was cut.
    let sent = bob.send_msg("r", "after", "still here").await;
    assert_eq!(alice.next_message().await.seq, sent.seq);
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
}
