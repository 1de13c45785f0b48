//! SSE and long-poll on the same session layer as WebSocket: a three-transport chat,
//! Last-Event-ID resume, long-poll hold/cursor/one-pending rules, a WS → SSE → poll → WS
//! handover with an exact check, session expiry then log sync, tickets, origins, CORS.

mod common;

use std::time::{Duration, Instant};

use common::*;
use parley::{
    codec::Encoding,
    proto::{self, ServerFrame, server_frame::Kind},
};
use serde_json::{Value, json};

fn bearer(t: &TestServer, user: &str) -> String {
    format!("Bearer {}", t.token(user))
}

async fn ticket(t: &TestServer, user: &str) -> String {
    match t.try_ticket(&t.token(user)).await {
        Ok(ticket) => ticket,
        Err(r) => panic!("ticket refused: {}", r.status),
    }
}

/// POST /session/{id} with a JSON command; the reply frame.
async fn command(t: &TestServer, user: &str, session: &str, cmd: Value) -> (u16, Value) {
    common::session_command(t.addr(), &bearer(t, user), session, &cmd).await
}

/// A long-poll client: its session id and cursor.
struct Poller {
    user: String,
    session: String,
    cursor: u64,
}

impl Poller {
    async fn connect(t: &TestServer, user: &str) -> Poller {
        let auth = bearer(t, user);
        let session = open_http_session(t.addr(), &auth).await;
        Poller {
            user: user.into(),
            session,
            cursor: 0,
        }
    }

    async fn poll_raw(&self, t: &TestServer, cursor: u64, wait: u64) -> HttpReply {
        let auth = bearer(t, &self.user);
        let path = format!(
            "/poll?session_id={}&cursor={cursor}&wait={wait}",
            self.session
        );
        http(t.addr(), "GET", &path, &[("authorization", &auth)], "").await
    }

    /// One poll from the current cursor; advances it.
    async fn poll(&mut self, t: &TestServer, wait: u64) -> Vec<ServerFrame> {
        let r = self.poll_raw(t, self.cursor, wait).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let frames: Vec<ServerFrame> = serde_json::from_slice(&r.body).unwrap();
        for f in &frames {
            assert_eq!(f.pos, self.cursor + 1, "poll positions have no gap");
            self.cursor = f.pos;
        }
        let header: u64 = r.headers["x-parley-cursor"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(header, self.cursor);
        frames
    }

    async fn send(&self, t: &TestServer, room: &str, id: &str, body: &str) -> Value {
        let cmd = json!({"id":"9","send":{"room":room,"clientMsgId":id,"body":body}});
        let (status, v) = command(t, &self.user, &self.session, cmd).await;
        assert_eq!(status, 200, "{v}");
        v
    }
}

fn bodies(frames: &[ServerFrame]) -> Vec<String> {
    frames
        .iter()
        .filter_map(|f| match &f.kind {
            Some(Kind::Message(m)) => Some(m.body.clone()),
            _ => None,
        })
        .collect()
}

async fn sse_messages(s: &mut SseClient, n: usize) -> Vec<(u64, proto::Message)> {
    let mut out = Vec::new();
    while out.len() < n {
        let (id, f) = s.next_frame().await;
        assert_eq!(id, Some(f.pos), "the event id is the session position");
        if let Some(Kind::Message(m)) = f.kind {
            out.push((f.pos, m));
        }
    }
    out
}

#[tokio::test]
async fn ws_sse_and_poll_users_chat_in_one_room() {
    let t = TestServer::start().await;
    let mut ann = t.client("ann", Encoding::Proto).await;
    ann.join("mix").await;

    let tk = ticket(&t, "bob").await;
    let mut bob = SseClient::open(t.addr(), &format!("/sse?ticket={tk}"), &[]).await;
    assert_eq!(bob.status, 200);
    assert_eq!(bob.headers["content-type"], "text/event-stream");
    assert_eq!(bob.headers["x-accel-buffering"], "no");
    assert!(
        bob.headers["cache-control"]
            .to_str()
            .unwrap()
            .contains("no-cache")
    );
    let first = bob.next().await.unwrap();
    assert_eq!((first.retry, first.id), (Some(2000), None));
    let Some(Kind::Connected(c)) = first.frame().kind else {
        panic!("{first:?}")
    };
    let bob_session = c.session_id;
    let (status, v) = command(
        &t,
        "bob",
        &bob_session,
        json!({"id":"1","join":{"room":"mix"}}),
    )
    .await;
    assert_eq!((status, &v["joined"]["room"]), (200, &json!("mix")));

    let mut carol = Poller::connect(&t, "carol").await;
    let (status, _) = command(
        &t,
        "carol",
        &carol.session,
        json!({"id":"1","join":{"room":"mix"}}),
    )
    .await;
    assert_eq!(status, 200);

    ann.send_msg("mix", "a", "from ws").await;
    let (_, v) = command(
        &t,
        "bob",
        &bob_session,
        json!({"id":"2","send":{"room":"mix","clientMsgId":"b","body":"from sse"}}),
    )
    .await;
    assert_eq!(v["id"], "2");
    assert_eq!(
        v["sent"]["seq"], "2",
        "the reply comes in the POST response"
    );
    carol.send(&t, "mix", "c", "from poll").await;

    let want = ["from ws", "from sse", "from poll"];
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.push(ann.next_message().await.body);
    }
    assert_eq!(seen, want);
    let got: Vec<String> = sse_messages(&mut bob, 3)
        .await
        .into_iter()
        .map(|(_, m)| m.body)
        .collect();
    assert_eq!(got, want);
    let mut got = Vec::new();
    while got.len() < 3 {
        got.extend(bodies(&carol.poll(&t, 5).await));
    }
    assert_eq!(got, want);
}

#[tokio::test]
async fn sse_reconnect_with_last_event_id_resumes_exactly() {
    let t = TestServer::start().await;
    let mut ann = t.client("ann", Encoding::Json).await;
    ann.join("r").await;
    let tk = ticket(&t, "bob").await;
    let url = format!("/sse?ticket={tk}");
    let mut bob = SseClient::open(t.addr(), &url, &[]).await;
    let Some(Kind::Connected(c)) = bob.next_frame().await.1.kind else {
        panic!()
    };
    command(
        &t,
        "bob",
        &c.session_id,
        json!({"id":"1","join":{"room":"r"}}),
    )
    .await;
    for i in 1..=4 {
        ann.send_msg("r", &i.to_string(), &format!("m{i}")).await;
    }
    let got = sse_messages(&mut bob, 2).await;
    let last_id = got[1].0;
    drop(bob); // the stream breaks after two messages
    for i in 5..=6 {
        ann.send_msg("r", &i.to_string(), &format!("m{i}")).await;
    }
    // What EventSource does by itself: the same URL plus Last-Event-ID.
    let lei = last_id.to_string();
    let mut bob = SseClient::open(t.addr(), &url, &[("last-event-id", &lei)]).await;
    assert_eq!(bob.status, 200);
    let Some(Kind::Connected(c2)) = bob.next_frame().await.1.kind else {
        panic!()
    };
    assert!(c2.resumed);
    assert_eq!(c2.session_id, c.session_id);
    let got = sse_messages(&mut bob, 4).await;
    let positions: Vec<u64> = got.iter().map(|(p, _)| *p).collect();
    assert_eq!(positions, (last_id + 1..=last_id + 4).collect::<Vec<_>>());
    let seqs: Vec<u64> = got.iter().map(|(_, m)| m.seq).collect();
    assert_eq!(seqs, [3, 4, 5, 6], "exactly the missed messages");
    // Nothing more: the next thing on the stream is a heartbeat or a new push.
    ann.send_msg("r", "7", "m7").await;
    assert_eq!(sse_messages(&mut bob, 1).await[0].1.seq, 7);
}

#[tokio::test]
async fn tickets_are_single_use_and_short_lived() {
    let t = TestServer::start_with(|c| c.session.grace_period = Duration::from_millis(200)).await;
    let tk = ticket(&t, "bob").await;
    let url = format!("/sse?ticket={tk}");
    let mut s = SseClient::open(t.addr(), &url, &[]).await;
    assert_eq!(s.status, 200);
    let Some(Kind::Connected(c)) = s.next().await.unwrap().frame().kind else {
        panic!()
    };
    let session = c.session_id;
    // A second fresh use is refused, even while the first stream is open.
    let again = http(t.addr(), "GET", &url, &[], "").await;
    assert_eq!(again.status, 401);
    assert!(String::from_utf8_lossy(&again.body).contains("already used"));
    // A used ticket only ever resumes its own session, exactly: a "reconnect" from a
    // position the session cannot replay from is refused, and opens nothing new.
    let sessions = t.server.state().core.sessions.len();
    let forged = http(t.addr(), "GET", &url, &[("last-event-id", "999999")], "").await;
    assert_eq!(
        forged.status,
        410,
        "{}",
        String::from_utf8_lossy(&forged.body)
    );
    assert_eq!(
        t.server.state().core.sessions.len(),
        sessions,
        "no new session"
    );
    assert!(t.session_alive(&session), "the real session is untouched");
    // Once its session is gone, the reconnect path is closed too: the reconnect learns
    // that the session is gone (410, also after the ticket was forgotten), as
    // PROTOCOL.md says, and opens nothing.
    drop(s);
    t.session_reaped(&session).await;
    t.server.state().core.tickets.prune(|_| false);
    let late = http(t.addr(), "GET", &url, &[("last-event-id", "1")], "").await;
    assert_eq!(late.status, 410, "{}", String::from_utf8_lossy(&late.body));
    assert_eq!(t.server.state().core.sessions.len(), 0, "no new session");
    // Unknown tickets, and no credential at all.
    assert_eq!(
        http(t.addr(), "GET", "/sse?ticket=abc", &[], "")
            .await
            .status,
        401
    );
    assert_eq!(http(t.addr(), "GET", "/sse", &[], "").await.status, 401);
    // Tickets are minted only for a valid token.
    let r = http(t.addr(), "POST", "/api/v1/tickets", &[], "").await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn a_ticket_not_used_within_its_ttl_is_refused() {
    // A TTL far below the sleep, so the check cannot race the clock (the TTL arithmetic
    // itself is tested on paused time in session::tickets).
    let t = TestServer::start_with(|c| c.auth.ticket_ttl = Duration::from_millis(20)).await;
    let tk = ticket(&t, "bob").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let late = http(t.addr(), "GET", &format!("/sse?ticket={tk}"), &[], "").await;
    assert_eq!(late.status, 401);
    assert!(String::from_utf8_lossy(&late.body).contains("expired"));
}

#[tokio::test]
async fn long_poll_hold_cursor_and_one_pending_rule() {
    let t = TestServer::start().await;
    let mut ann = t.client("ann", Encoding::Json).await;
    ann.join("r").await;
    let mut bob = Poller::connect(&t, "bob").await;
    command(
        &t,
        "bob",
        &bob.session,
        json!({"id":"1","join":{"room":"r"}}),
    )
    .await;
    assert_eq!(bob.poll(&t, 1).await.len(), 1, "bob's own membership push");

    // Plain polling (wait=0) answers without holding (far below the 30 s default hold,
    // with room for a loaded machine); a held poll waits out its hold time.
    let started = Instant::now();
    assert!(bob.poll(&t, 0).await.is_empty());
    assert!(started.elapsed() < Duration::from_secs(10));
    let started = Instant::now();
    assert!(bob.poll(&t, 1).await.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "held for the wait time"
    );

    // A pending poll returns as soon as something arrives.
    let addr_t = &t;
    let (frames, _) = tokio::join!(bob.poll(addr_t, 30), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ann.send_msg("r", "1", "one").await
    });
    assert_eq!(bodies(&frames), ["one"]);

    // The cursor acks: polling again from an older cursor redelivers (a lost reply).
    ann.send_msg("r", "2", "two").await;
    ann.send_msg("r", "3", "three").await;
    let before = bob.cursor;
    assert_eq!(bodies(&bob.poll(&t, 5).await), ["two", "three"]);
    let r = bob.poll_raw(&t, before + 1, 0).await;
    let again: Vec<ServerFrame> = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        bodies(&again),
        ["three"],
        "everything after the cursor, again"
    );
    assert!(
        bob.poll(&t, 0).await.is_empty(),
        "nothing after the newest cursor"
    );

    // One pending poll per session: a newer poll ends the older with an empty reply.
    let cursor = bob.cursor;
    let older = {
        let p = Poller {
            user: "bob".into(),
            session: bob.session.clone(),
            cursor,
        };
        let t2 = t.addr();
        let auth = bearer(&t, "bob");
        tokio::spawn(async move {
            let path = format!("/poll?session_id={}&cursor={}&wait=30", p.session, p.cursor);
            let started = Instant::now();
            let r = http(t2, "GET", &path, &[("authorization", &auth)], "").await;
            (r, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (newer, _) = tokio::join!(bob.poll(&t, 5), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ann.send_msg("r", "4", "four").await
    });
    let (r, elapsed) = older.await.unwrap();
    assert_eq!((r.status, &r.body[..]), (200, &b"[]"[..]));
    assert!(
        elapsed < Duration::from_secs(5),
        "ended by the newer poll, not its hold time"
    );
    assert_eq!(bodies(&newer), ["four"]);

    // Protobuf: length-delimited frames.
    ann.send_msg("r", "5", "five").await;
    let auth = bearer(&t, "bob");
    let path = format!(
        "/poll?session_id={}&cursor={}&wait=1",
        bob.session, bob.cursor
    );
    let r = http(
        t.addr(),
        "GET",
        &path,
        &[
            ("authorization", &auth),
            ("accept", "application/x-protobuf"),
        ],
        "",
    )
    .await;
    assert_eq!(r.headers["content-type"], "application/x-protobuf");
    let mut buf = &r.body[..];
    let f: ServerFrame = prost::Message::decode_length_delimited(&mut buf).unwrap();
    assert!(buf.is_empty());
    assert_eq!(bodies(&[f]), ["five"]);
}

#[tokio::test]
async fn handover_ws_sse_poll_ws_misses_nothing_and_duplicates_nothing() {
    let t = TestServer::start().await;
    let mut bob = t.client("bob", Encoding::Json).await;
    bob.join("r").await;
    let mut next = 1;
    let mut send = async |bob: &mut Client, n: usize| {
        for _ in 0..n {
            bob.send_msg("r", &next.to_string(), &format!("m{next}"))
                .await;
            next += 1;
        }
    };
    let mut seqs: Vec<u64> = Vec::new();
    let mut last_pos;
    let note = |seqs: &mut Vec<u64>, f: &ServerFrame| {
        if let Some(Kind::Message(m)) = &f.kind {
            seqs.push(m.seq);
        }
    };

    // 1. WebSocket: read some, then the socket dies mid-stream.
    let mut ann = t.client("ann", Encoding::Proto).await;
    ann.join("r").await;
    let session = ann.session_id.clone();
    send(&mut bob, 5).await;
    while seqs.len() < 3 {
        let f = ann.next_push().await;
        note(&mut seqs, &f);
    }
    last_pos = ann.last_pos;
    drop(ann);
    send(&mut bob, 3).await;

    // 2. SSE, resuming explicitly with a fresh ticket.
    let tk = ticket(&t, "ann").await;
    let url = format!("/sse?ticket={tk}&session_id={session}&last_pos={last_pos}");
    let mut sse = SseClient::open(t.addr(), &url, &[]).await;
    let Some(Kind::Connected(c)) = sse.next_frame().await.1.kind else {
        panic!()
    };
    assert!(c.resumed && c.session_id == session);
    while seqs.len() < 7 {
        let (id, f) = sse.next_frame().await;
        assert_eq!(id, Some(last_pos + 1));
        last_pos = f.pos;
        note(&mut seqs, &f);
    }
    drop(sse);
    send(&mut bob, 3).await;

    // 3. Long-poll on the same session, from the last position seen.
    let mut poller = Poller {
        user: "ann".into(),
        session: session.clone(),
        cursor: last_pos,
    };
    while seqs.len() < 11 {
        for f in poller.poll(&t, 5).await {
            note(&mut seqs, &f);
        }
    }
    last_pos = poller.cursor;
    send(&mut bob, 2).await;

    // 4. Back to WebSocket.
    let mut ws = Client::open(t.addr(), Some(Encoding::Json)).await;
    let c = ws
        .connect_with(proto::Connect {
            token: t.token("ann"),
            session_id: session.clone(),
            last_pos,
        })
        .await;
    assert!(c.resumed);
    ws.last_pos = last_pos;
    while seqs.len() < 13 {
        let f = ws.next_push().await;
        note(&mut seqs, &f);
    }
    assert_eq!(
        seqs,
        (1..=13).collect::<Vec<u64>>(),
        "every message once, in order"
    );
    assert!(matches!(
        ws.request(proto::client_frame::Cmd::Ping(proto::Ping {}))
            .await,
        Kind::Pong(_)
    ));
    assert!(ws.inbox.is_empty(), "nothing extra: {:?}", ws.inbox);
}

#[tokio::test]
async fn expired_poll_session_is_gone_and_log_sync_recovers() {
    let t = TestServer::start_with(|c| c.session.grace_period = Duration::from_millis(200)).await;
    let mut ann = t.client("ann", Encoding::Json).await;
    ann.join("r").await;
    let mut bob = Poller::connect(&t, "bob").await;
    command(
        &t,
        "bob",
        &bob.session,
        json!({"id":"1","join":{"room":"r"}}),
    )
    .await;
    bob.poll(&t, 1).await;
    ann.send_msg("r", "1", "while away").await;
    t.session_reaped(&bob.session).await;
    let r = bob.poll_raw(&t, bob.cursor, 0).await;
    assert_eq!(r.status, 410);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["code"], "ERROR_CODE_SESSION_NOT_FOUND");
    let (status, _) = command(&t, "bob", &bob.session, json!({"id":"2","ping":{}})).await;
    assert_eq!(status, 410);
    // New session, then sync from the log.
    let bob = Poller::connect(&t, "bob").await;
    let (_, v) = command(
        &t,
        "bob",
        &bob.session,
        json!({"id":"3","sync":{"rooms":{"r":"0"}}}),
    )
    .await;
    assert_eq!(v["sync"]["rooms"][0]["messages"][0]["body"], "while away");
}

#[tokio::test]
async fn http_commands_validate_input_and_ownership() {
    let t = TestServer::start().await;
    let bob = Poller::connect(&t, "bob").await;
    let auth = bearer(&t, "bob");
    let r = http(
        t.addr(),
        "POST",
        &format!("/session/{}", bob.session),
        &[("authorization", &auth)],
        "{nope",
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("ERROR_CODE_BAD_FRAME"));
    // Another user's session is not yours.
    let (status, _) = command(&t, "eve", &bob.session, json!({"id":"1","ping":{}})).await;
    assert_eq!(status, 410);
    // ack has no reply.
    let (status, _) = command(&t, "bob", &bob.session, json!({"ack":{"pos":"0"}})).await;
    assert_eq!(status, 204);
    // Protobuf in, protobuf out.
    let frame = parley::codec::encode_client(
        Encoding::Proto,
        &proto::ClientFrame {
            id: 5,
            cmd: Some(proto::client_frame::Cmd::Ping(proto::Ping {})),
        },
    );
    let r = http(
        t.addr(),
        "POST",
        &format!("/session/{}", bob.session),
        &[
            ("authorization", &auth),
            ("content-type", "application/x-protobuf"),
        ],
        frame,
    )
    .await;
    let reply: ServerFrame = prost::Message::decode(&r.body[..]).unwrap();
    assert_eq!(reply.id, 5);
    assert!(matches!(reply.kind, Some(Kind::Pong(_))));

    // A receive-only SSE stream's session refuses commands other than ack and ping.
    let tk = ticket(&t, "carol").await;
    let mut s = SseClient::open(
        t.addr(),
        &format!("/sse?ticket={tk}&receive_only=true"),
        &[],
    )
    .await;
    let Some(Kind::Connected(c)) = s.next_frame().await.1.kind else {
        panic!()
    };
    let (_, v) = command(
        &t,
        "carol",
        &c.session_id,
        json!({"id":"1","join":{"room":"r"}}),
    )
    .await;
    assert_eq!(v["error"]["code"], "ERROR_CODE_FORBIDDEN");
    let (_, v) = command(&t, "carol", &c.session_id, json!({"id":"2","ping":{}})).await;
    assert!(v["pong"].is_object());
}

#[tokio::test]
async fn disallowed_origins_are_refused_on_ws_and_sse_and_get_no_cors() {
    let t =
        TestServer::start_with(|c| c.server.allowed_origins = vec!["https://app.example".into()])
            .await;
    let evil = [("origin", "https://evil.example")];
    // /ws: a cross-site handshake is refused before the upgrade.
    let ws_headers = [
        ("origin", "https://evil.example"),
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    assert_eq!(
        http(t.addr(), "GET", "/ws", &ws_headers, "").await.status,
        403
    );
    let mut ok_headers = ws_headers;
    ok_headers[0] = ("origin", "https://app.example");
    let r = http(t.addr(), "GET", "/ws", &ok_headers, "").await;
    assert_eq!(r.status, 101);
    // No CORS layer in front of the upgrade: a WebSocket does not use its headers.
    for h in [
        "vary",
        "access-control-allow-origin",
        "access-control-allow-credentials",
    ] {
        assert!(r.headers.get(h).is_none(), "{h} on a WebSocket upgrade");
    }
    // Same origin is always fine.
    let same = format!("http://{}", t.addr());
    ok_headers[0] = ("origin", &same);
    assert_eq!(
        http(t.addr(), "GET", "/ws", &ok_headers, "").await.status,
        101
    );

    let tk = ticket(&t, "bob").await;
    let r = http(t.addr(), "GET", &format!("/sse?ticket={tk}"), &evil, "").await;
    assert_eq!(r.status, 403);

    // CORS preflight: allowed origin echoed with credentials, never a wildcard.
    let pre = [
        ("origin", "https://app.example"),
        ("access-control-request-method", "POST"),
        ("access-control-request-headers", "authorization"),
    ];
    let r = http(t.addr(), "OPTIONS", "/api/v1/tickets", &pre, "").await;
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(r.headers["access-control-allow-credentials"], "true");
    let mut bad = pre;
    bad[0] = ("origin", "https://evil.example");
    let r = http(t.addr(), "OPTIONS", "/api/v1/tickets", &bad, "").await;
    assert!(r.headers.get("access-control-allow-origin").is_none());
    // And on a real request.
    let auth = bearer(&t, "bob");
    let r = http(
        t.addr(),
        "GET",
        "/api/v1/rooms",
        &[("origin", "https://app.example"), ("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(
        r.headers["access-control-expose-headers"],
        "x-parley-cursor"
    );
    // /poll is served before the router (transport::app::App, CORS by cors::Late): the same
    // CORS answers there, to a preflight, a poll, and not to another origin.
    let mut pre_poll = pre;
    pre_poll[1] = ("access-control-request-method", "GET");
    let r = http(t.addr(), "OPTIONS", "/poll?session_id=s", &pre_poll, "").await;
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(r.headers["access-control-allow-credentials"], "true");
    let addr = t.addr();
    let poll_from = |origin: &'static str| {
        let headers = [("origin", origin), ("authorization", auth.as_str())];
        async move { http(addr, "GET", "/poll?session_id=nope&wait=0", &headers, "").await }
    };
    let r = poll_from("https://app.example").await;
    assert_eq!(r.status, 410);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(
        r.headers["access-control-expose-headers"],
        "x-parley-cursor"
    );
    let r = poll_from("https://evil.example").await;
    assert_eq!(r.status, 403);
    assert!(r.headers.get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn shutdown_ends_sse_streams_with_a_disconnect() {
    let t = TestServer::start().await;
    let tk = ticket(&t, "bob").await;
    let mut s = SseClient::open(t.addr(), &format!("/sse?ticket={tk}"), &[]).await;
    s.next().await.unwrap();
    t.server.shutdown();
    let (_, f) = s.next_frame().await;
    let Some(Kind::Disconnect(d)) = f.kind else {
        panic!("{f:?}")
    };
    assert_eq!((d.code, d.reconnect), (1001, true));
    assert!(s.next().await.is_none(), "the stream ends");
    tokio::time::timeout(WAIT, t.server.wait())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn idle_sse_stream_gets_heartbeat_comments() {
    let t = TestServer::start_with(|c| c.sse.heartbeat_interval = Duration::from_millis(100)).await;
    let tk = ticket(&t, "bob").await;
    let mut s = SseClient::open(t.addr(), &format!("/sse?ticket={tk}"), &[]).await;
    s.next().await.unwrap();
    let ev = s.next().await.unwrap();
    assert!(ev.comment && ev.data.is_none(), "{ev:?}");
}

#[tokio::test]
async fn end_command_ends_the_session_at_once_on_sse_and_long_poll() {
    // A grace period far longer than the test: only `end` can make the sessions go.
    let t = TestServer::start_with(|c| c.session.grace_period = Duration::from_secs(300)).await;

    // SSE: `end` over a POST; the stream gets `disconnect` 1000, no reconnect, and ends.
    let tk = ticket(&t, "bob").await;
    let mut bob = SseClient::open(t.addr(), &format!("/sse?ticket={tk}"), &[]).await;
    let Some(Kind::Connected(c)) = bob.next_frame().await.1.kind else {
        panic!("no connected")
    };
    assert!(t.session_alive(&c.session_id));
    let (status, v) = command(&t, "bob", &c.session_id, json!({"id":"7","end":{}})).await;
    assert_eq!((status, &v), (200, &json!({"id":"7","done":{}})));
    assert!(
        !t.session_alive(&c.session_id),
        "gone at once, not after the grace period"
    );
    let Some(Kind::Disconnect(d)) = bob.next_frame().await.1.kind else {
        panic!("no disconnect")
    };
    assert_eq!(
        (d.code, d.reason.as_str(), d.reconnect),
        (1000, "session ended", false)
    );
    while let Some(ev) = bob.next().await {
        assert!(
            ev.data.is_none() || ev.comment,
            "nothing after the disconnect"
        );
    }
    let (status, _) = command(&t, "bob", &c.session_id, json!({"id":"8","ping":{}})).await;
    assert_eq!(status, 410);

    // Long-poll: the same command; the next poll answers 410 at once.
    let carl = Poller::connect(&t, "carl").await;
    assert!(t.session_alive(&carl.session));
    let (status, v) = command(&t, "carl", &carl.session, json!({"id":"2","end":{}})).await;
    assert_eq!((status, &v), (200, &json!({"id":"2","done":{}})));
    assert!(!t.session_alive(&carl.session));
    let started = Instant::now();
    let r = carl.poll_raw(&t, 0, 20).await;
    assert_eq!(r.status, 410);
    assert!(started.elapsed() < Duration::from_secs(5), "not held");

    // A resume of an ended session starts a new one.
    let r = http(
        t.addr(),
        "POST",
        "/session",
        &[("authorization", &bearer(&t, "carl"))],
        json!({"id":"1","connect":{"sessionId": carl.session, "lastPos": "0"}}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_ne!(v["connected"]["sessionId"], carl.session.as_str());
    assert_eq!(v["connected"]["resumed"], Value::Null);
}
