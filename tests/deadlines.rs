//! Every stage before a request exists has a deadline (`server.*_timeout`), so sockets
//! that say nothing, or only part of what they must, cannot hold connection slots: raw
//! TCP sockets on loopback that send nothing, part of the HTTP/2 preface, part of an
//! HTTP/1 request head, or an HTTP/2 preface and then no request, are each timed until
//! the server closes them; a well-behaved client beside them is unaffected. The deadlines
//! are short here (through the configuration) so the tests stay fast; TLS handshakes are
//! in `tests/tls.rs`.

mod common;

use std::time::Duration;

use common::{PREFACE, SETTINGS, TestServer, http_get};
use futures_util::SinkExt;
use hyper::{Request, body::Bytes};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parley::{codec::Encoding, config::Config};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

/// Short deadlines for every stage.
fn short(c: &mut Config) {
    c.server.preface_timeout = Duration::from_millis(400);
    c.server.header_read_timeout = Duration::from_millis(400);
    c.server.h2_idle_timeout = Duration::from_millis(400);
    c.server.h2_keep_alive_interval = Duration::from_millis(300);
    c.server.h2_keep_alive_timeout = Duration::from_millis(300);
}

/// Waits for the server to close `s` (just answered) without sending anything more, and
/// checks how long it stayed open idle.
async fn closed_idle_within(s: TcpStream, idle: std::ops::Range<Duration>) {
    let answered = Instant::now();
    let (rest, at) = until_closed(s).await;
    assert!(rest.is_empty(), "closed without an answer");
    let waited = at - answered;
    assert!(idle.contains(&waited), "closed after {waited:?}");
}

/// Reads what the server sends until it closes the connection; the bytes and when.
/// Panics if it is still open after 10 s.
async fn until_closed(mut s: TcpStream) -> (Vec<u8>, Instant) {
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server never closed the connection");
    (got, Instant::now())
}

/// Opens a socket and sends `first`.
async fn socket_sending(t: &TestServer, first: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(t.addr()).await.unwrap();
    s.write_all(first).await.unwrap();
    s
}

/// The HTTP/2 frame types in `bytes` (a server's side of a connection, after nothing).
fn h2_frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        types.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    types
}

#[tokio::test]
async fn silent_and_partial_preface_sockets_are_cut_at_the_preface_deadline() {
    let t = TestServer::start_with(short).await;
    let mut bob = t.client("bob", Encoding::Json).await;

    let start = Instant::now();
    let silent = socket_sending(&t, b"").await;
    let partial = socket_sending(&t, &PREFACE[..16]).await;
    let (silent, partial) = tokio::join!(until_closed(silent), until_closed(partial));
    for (what, (bytes, at)) in [("silent", silent), ("partial preface", partial)] {
        let after = at - start;
        assert!(
            after >= Duration::from_millis(350) && after < Duration::from_secs(3),
            "{what}: closed after {after:?}"
        );
        assert!(bytes.is_empty(), "{what}: nothing is answered");
    }
    // bob's WebSocket, connected before and idle meanwhile, is unaffected.
    bob.join("r").await;
    bob.send_msg("r", "m1", "still here").await;
}

#[tokio::test]
async fn silent_sockets_hold_the_connection_limit_only_until_the_deadline() {
    let t = TestServer::start_with(|c| {
        short(c);
        c.limits.max_connections = 3;
    })
    .await;
    let start = Instant::now();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(socket_sending(&t, b"").await);
    }
    // The server is full: a new client is refused while the silent sockets are held...
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(http_get(t.addr(), "/healthz").await.0, 503);
    for s in held {
        let (_, at) = until_closed(s).await;
        assert!(at - start < Duration::from_secs(3));
    }
    // ...and served once the deadline freed their slots.
    assert_eq!(http_get(t.addr(), "/healthz").await.0, 200);
}

#[tokio::test]
async fn an_http1_request_head_must_arrive_within_the_header_deadline() {
    let t = TestServer::start_with(short).await;
    let start = Instant::now();
    // The first byte settles HTTP/1; the head never ends.
    let s = socket_sending(&t, b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
    let (_, at) = until_closed(s).await;
    let after = at - start;
    assert!(
        after >= Duration::from_millis(350) && after < Duration::from_secs(3),
        "closed after {after:?}"
    );
    // A complete request is served.
    assert_eq!(http_get(t.addr(), "/healthz").await.0, 200);
}

/// Reads from `s` until `want` has arrived (a response's end); panics after 5 s.
async fn read_until(s: &mut TcpStream, want: &str) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains(want) {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the response in time");
    String::from_utf8(got).unwrap()
}

#[tokio::test]
async fn an_idle_http1_keep_alive_connection_is_closed_after_keep_alive_idle() {
    let t = TestServer::start_with(|c| {
        c.server.header_read_timeout = Duration::from_secs(5);
        c.server.keep_alive_idle = Duration::from_millis(300);
        c.sse.heartbeat_interval = Duration::from_millis(100);
    })
    .await;
    // One request answered, then nothing: closed after the idle time, not the 5 s a
    // head may take (before `server.keep_alive_idle` it stayed open that long).
    let mut s = socket_sending(&t, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(read_until(&mut s, "ok\n").await.starts_with("HTTP/1.1 200"));
    closed_idle_within(s, Duration::from_millis(250)..Duration::from_secs(3)).await;

    // A head begun within the idle time has the header deadline from then on: it may
    // take longer than the idle time to finish, and is answered.
    let mut s = socket_sending(&t, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    read_until(&mut s, "ok\n").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.write_all(b"Host: x\r\n\r\n").await.unwrap();
    assert!(read_until(&mut s, "ok\n").await.starts_with("HTTP/1.1 200"));

    // An SSE stream over HTTP/1 is a request in progress, not an idle connection: it
    // outlives the idle time.
    let bearer = format!("Bearer {}", t.token("ann"));
    let mut sse = common::SseClient::open(t.addr(), "/sse", &[("authorization", &bearer)]).await;
    assert_eq!(sse.status, 200);
    let until = Instant::now() + Duration::from_millis(1200);
    while Instant::now() < until {
        sse.next().await.expect("the SSE stream is still open");
    }
}

#[tokio::test]
async fn a_keep_alive_connection_serves_again_after_an_idle_gap_then_closes() {
    // Idle for `keep_alive_release` (200 ms) between requests, hyper's connection state is
    // dropped and the socket waited on alone (vendor/hyper change 7): the same socket
    // still serves the next request seconds later, a WebSocket upgrade too, and is
    // closed after `keep_alive_idle` in all.
    let t = TestServer::start_with(|c| {
        c.server.header_read_timeout = Duration::from_secs(10);
        c.server.keep_alive_idle = Duration::from_millis(2500);
        c.server.keep_alive_release = Duration::from_millis(200);
    })
    .await;
    let mut s = socket_sending(&t, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(read_until(&mut s, "ok\n").await.starts_with("HTTP/1.1 200"));
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(read_until(&mut s, "ok\n").await.starts_with("HTTP/1.1 200"));
    }
    closed_idle_within(s, Duration::from_millis(2400)..Duration::from_secs(5)).await;

    // A request after a gap longer than the release may upgrade the same socket (a new
    // hyper connection, with upgrades, serves it).
    let mut s = socket_sending(&t, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    read_until(&mut s, "ok\n").await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Protocol: parley.v1.json\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_until(&mut s, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

/// Twelve keep-alive connections, each answered once, then idle; after `write_at` each
/// sends its next request, and the server's runtime is held up (this test's thread
/// blocked: the server runs on it) until `resume_at`, past the end of an idle stage
/// (`keep_alive_idle`, or `keep_alive_release` when the connection gives back its HTTP
/// state). When the server runs again, both that stage's end and a request have come:
/// the request must be served, as hyper serves one it finds before it closes. Closing
/// the socket with the request unread resets the connection under the client that sent
/// it (round eleven's `sse11` so reset SSE command connections, whose acks came as their
/// idle time ended: docs/BENCHMARKS.md, round twelve).
async fn requests_as_an_idle_stage_ends(
    idle_ms: u64,
    release_ms: u64,
    write_at_ms: u64,
    resume_at_ms: u64,
) {
    let t = TestServer::start_with(|c| {
        c.server.header_read_timeout = Duration::from_secs(10);
        c.server.keep_alive_idle = Duration::from_millis(idle_ms);
        c.server.keep_alive_release = Duration::from_millis(release_ms);
    })
    .await;
    const GET: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut sockets = Vec::new();
    for _ in 0..12 {
        let mut s = socket_sending(&t, GET).await;
        assert!(read_until(&mut s, "ok\n").await.starts_with("HTTP/1.1 200"));
        sockets.push(s);
    }
    let answered = Instant::now();
    tokio::time::sleep_until(answered + Duration::from_millis(write_at_ms)).await;
    for s in &mut sockets {
        s.write_all(GET).await.unwrap();
    }
    let resume = answered + Duration::from_millis(resume_at_ms);
    std::thread::sleep(resume.saturating_duration_since(Instant::now()));
    for (i, s) in sockets.iter_mut().enumerate() {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            while !String::from_utf8_lossy(&got).contains("ok\n") {
                match s.read(&mut buf).await {
                    Ok(0) => return Err("closed".to_string()),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(e.to_string()),
                }
            }
            Ok(())
        })
        .await
        .expect("an answer or the end in time");
        assert_eq!(read, Ok(()), "connection {i}: the request was not served");
        assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    }
}

#[tokio::test]
async fn a_request_that_arrives_as_keep_alive_idle_ends_is_served_not_reset() {
    // Released after 1 s, waited on alone until 1.5 s: the request comes at 1.2 s, the
    // server sees it at 2 s.
    requests_as_an_idle_stage_ends(1500, 1000, 1200, 2000).await;
}

#[tokio::test]
async fn a_request_that_arrives_as_keep_alive_release_ends_is_served() {
    // Released after 1 s: the request comes at 0.8 s, the server sees it at 1.4 s (as
    // hyper's connection would have given its state back).
    requests_as_an_idle_stage_ends(3000, 1000, 800, 1400).await;
}

#[tokio::test]
async fn without_a_release_a_request_that_arrives_as_keep_alive_idle_ends_is_served() {
    // `keep_alive_release = 0`: hyper's connection waits the whole idle time itself
    // (before round twelve, always).
    requests_as_an_idle_stage_ends(1000, 0, 800, 1400).await;
}

/// `parley_http1_idle_releases_total` from `/metrics`: idle HTTP/1 connections that gave
/// back their HTTP state (`server.keep_alive_release`).
async fn idle_releases(t: &TestServer) -> u64 {
    let (status, metrics) = t.http_get("/metrics").await;
    assert_eq!(status, 200);
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("parley_http1_idle_releases_total "))
        .expect("the counter")
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_long_polls_connection_keeps_its_state_past_the_release() {
    // A long-poll client whose next poll comes later than `keep_alive_release` (its round
    // trip, 500 ms here) finds its connection still in hyper: a long-poll's reply asks
    // for `keep_alive_idle` next (vendor/hyper's `ext::NextIdleTimeout`), so the poll is
    // not served by a new HTTP state. Any other reply (here a plain poll's) is released
    // after the short release, as an SSE client's acks are.
    let t = TestServer::start_with(|c| {
        c.server.header_read_timeout = Duration::from_secs(10);
        c.server.keep_alive_idle = Duration::from_secs(5);
        c.server.keep_alive_release = Duration::from_millis(200);
    })
    .await;
    let bearer = format!("Bearer {}", t.token("ann"));
    let session = common::open_http_session(t.addr(), &bearer).await;
    let poll = |wait: u64| {
        format!(
            "GET /poll?session_id={session}&cursor=0&wait={wait} HTTP/1.1\r\nHost: x\r\n\
             Authorization: {bearer}\r\n\r\n"
        )
    };
    let before = idle_releases(&t).await;
    // A long-poll (held 1 s: nothing comes), answered; the next poll 500 ms later.
    let mut s = socket_sending(&t, poll(1).as_bytes()).await;
    assert!(read_until(&mut s, "]").await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        idle_releases(&t).await,
        before,
        "the long-poll's connection gave its state back between polls"
    );
    // A plain poll (no hold) on the same connection: its reply is released as any other.
    s.write_all(poll(0).as_bytes()).await.unwrap();
    assert!(read_until(&mut s, "]").await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(idle_releases(&t).await, before + 1);
    // And served again by a new state, still keep-alive.
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_until(&mut s, "ok\n").await.starts_with("HTTP/1.1 200"));
}

/// A real HTTP/2 client (hyper's, h2c) connected to the server: its request sender, and
/// its connection's task, which ends (with when) once the server closes the connection.
async fn h2c_client(
    t: &TestServer,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>,
    tokio::task::JoinHandle<(Result<(), hyper::Error>, Instant)>,
) {
    let tcp = TcpStream::connect(t.addr()).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(async move { (conn.await, Instant::now()) });
    (sender, conn)
}

/// [`h2c_client`] after one request answered (`/healthz`).
async fn h2c_after_a_request(
    t: &TestServer,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>,
    tokio::task::JoinHandle<(Result<(), hyper::Error>, Instant)>,
) {
    let (mut sender, conn) = h2c_client(t).await;
    let r = sender
        .send_request(h2c_get(t, "/healthz", &[]))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    (sender, conn)
}

/// A GET of `path` on the server, with `headers`.
fn h2c_get(
    t: &TestServer,
    path: &str,
    headers: &[(&str, String)],
) -> Request<http_body_util::Empty<Bytes>> {
    let mut r = Request::get(format!("http://{}{path}", t.addr()));
    for (name, value) in headers {
        r = r.header(*name, value);
    }
    r.body(http_body_util::Empty::new()).unwrap()
}

#[tokio::test]
async fn an_h2c_connection_without_requests_gets_goaway_and_is_closed() {
    let t = TestServer::start_with(short).await;
    let start = Instant::now();
    // The whole preface and SETTINGS, then nothing: never answers the server's PINGs.
    let mut preface = PREFACE.to_vec();
    preface.extend_from_slice(SETTINGS);
    let raw = socket_sending(&t, &preface).await;
    // A real HTTP/2 client that makes one request, then idles.
    let (_sender, conn) = h2c_after_a_request(&t).await;
    let requested = Instant::now();

    let (bytes, at) = until_closed(raw).await;
    let after = at - start;
    assert!(
        after >= Duration::from_millis(350) && after < Duration::from_secs(4),
        "raw h2c: closed after {after:?}"
    );
    assert!(
        h2_frame_types(&bytes).contains(&7),
        "a GOAWAY came first: {:?}",
        h2_frame_types(&bytes)
    );
    let (_, closed) = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the idle client connection is closed")
        .unwrap();
    let after = closed - requested;
    assert!(
        after >= Duration::from_millis(350) && after < Duration::from_secs(3),
        "client: closed {after:?} after its request"
    );
}

/// On shutdown an h2c connection gets its GOAWAY and is closed at once: not at its idle
/// deadline (an hour here) nor at the end of the shutdown's drain (a minute), which then
/// ends at once too.
#[tokio::test]
async fn shutdown_closes_an_h2c_connection_at_once() {
    let t = TestServer::start_with(|c| {
        c.server.h2_idle_timeout = Duration::from_secs(3600);
        c.server.shutdown_timeout = Duration::from_secs(60);
    })
    .await;
    let (_sender, conn) = h2c_after_a_request(&t).await;
    let asked = Instant::now();
    t.server.shutdown();
    let (ended, _) = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the client's connection is closed within 5 s of the shutdown")
        .unwrap();
    ended.expect("closed after a GOAWAY, not reset");
    tokio::time::timeout(Duration::from_secs(5), t.server.wait())
        .await
        .expect("the drain ends once the connection is closed")
        .unwrap();
    assert!(asked.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn open_h2_streams_and_websocket_tunnels_outlive_the_idle_deadline() {
    let t = TestServer::start_with(|c| {
        short(c);
        c.sse.heartbeat_interval = Duration::from_millis(100);
    })
    .await;
    // An SSE stream over h2c: a request open for as long as it lasts.
    let (mut sender, conn) = h2c_client(&t).await;
    let bearer = format!("Bearer {}", t.token("ann"));
    let r = sender
        .send_request(h2c_get(&t, "/sse", &[("authorization", bearer)]))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.into_body();

    // A WebSocket over HTTP/2 (RFC 8441) on a connection of its own.
    let tcp = TcpStream::connect(t.addr()).await.unwrap();
    let url: url::Url = format!("http://{}/ws", t.addr()).parse().unwrap();
    let builder =
        hyper::http::Request::builder().header("sec-websocket-protocol", "parley.v1.json");
    let mut ws = yawc::http2::handshake(url, tcp, yawc::Options::default(), builder)
        .await
        .expect("extended CONNECT accepted");
    let connect = format!(r#"{{"id":"1","connect":{{"token":"{}"}}}}"#, t.token("bob"));
    ws.send(yawc::frame::Frame::text(connect)).await.unwrap();
    ws.next_frame().await.unwrap();

    // Three idle deadlines later both still deliver.
    let until = Instant::now() + Duration::from_millis(1300);
    let mut sse_bytes = 0;
    while Instant::now() < until {
        use http_body_util::BodyExt;
        let frame = tokio::time::timeout(Duration::from_secs(2), body.frame())
            .await
            .expect("the SSE stream keeps sending heartbeats")
            .expect("the SSE stream is still open")
            .unwrap();
        sse_bytes += frame.data_ref().map_or(0, |d| d.len());
    }
    assert!(sse_bytes > 0);
    assert!(!conn.is_finished(), "the SSE connection is still open");
    ws.send(yawc::frame::Frame::text(r#"{"id":"2","ping":{}}"#))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(2), ws.next_frame())
        .await
        .expect("the WebSocket over HTTP/2 still answers")
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(pong.payload()).unwrap();
    assert_eq!(v["id"], "2", "{v}");
}

#[tokio::test]
async fn a_request_body_trickling_in_gets_408_at_the_body_deadline() {
    let t = TestServer::start_with(|c| {
        short(c);
        c.server.body_read_timeout = Duration::from_millis(500);
    })
    .await;
    let start = Instant::now();
    // A head announcing 64 bytes, then 10 of them and one more every 100 ms: it would take
    // 5.4 s, past the deadline.
    let s = socket_sending(
        &t,
        b"POST /session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n{\"connect\":",
    )
    .await;
    let (mut rd, mut wr) = s.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..54 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if wr.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the server never closed the connection");
    let after = start.elapsed();
    trickle.abort();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(text.contains("body_read_timeout"), "{text}");
    assert!(
        after >= Duration::from_millis(450) && after < Duration::from_secs(4),
        "answered and closed after {after:?}"
    );
    // A body that arrives in time, in pieces, is served as before.
    let mut s = socket_sending(
        &t,
        b"POST /session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"}").await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    let text = String::from_utf8_lossy(&got);
    // `{}` is a frame without a command: refused for what it says, not for its timing.
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(!text.contains("body_read_timeout"), "{text}");
}
