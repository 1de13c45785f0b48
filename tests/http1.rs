//! HTTP/1.1 over raw TCP, byte for byte: what the patched hyper (vendor/hyper: a
//! connection that waits holds no read or write buffer; reads into an unallocated buffer
//! go through a 1 KiB buffer on the stack first) must still get exactly right. Request
//! heads that arrive in small pieces or are larger than that stack buffer, keep-alive
//! requests after idle pauses, pipelined requests, bodies that arrive after their head
//! and in pieces, and SSE streams and pending polls whose client goes away.

mod common;

use std::time::Duration;

use common::*;
use parley::{
    metrics::TransportLabel,
    proto::{self, ErrorCode},
};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Long enough for the server to have read everything there was and to wait again (the
/// point where it gives its buffers back).
const IDLE: Duration = Duration::from_millis(50);

/// One HTTP/1.1 response.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A raw keep-alive connection; reads responses with a `Content-Length`.
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(t: &TestServer) -> Raw {
        Raw {
            tcp: TcpStream::connect(t.addr()).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }

    /// Writes `bytes` in pieces of `piece` bytes with a pause after each.
    async fn write_in_pieces(&mut self, bytes: &[u8], piece: usize, pause: Duration) {
        for chunk in bytes.chunks(piece) {
            self.write(chunk).await;
            tokio::time::sleep(pause).await;
        }
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
            .await
            .expect("response in time")
            .unwrap();
        assert!(n > 0, "the server closed the connection");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// The next response on the connection.
    async fn response(&mut self) -> Response {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            self.fill().await;
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).unwrap();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_string(), v.trim().to_string())
            })
            .collect();
        let mut r = Response {
            status: status.parse().unwrap(),
            headers,
            body: Vec::new(),
        };
        let len: usize = r
            .header("content-length")
            .expect("a Content-Length")
            .parse()
            .unwrap();
        while self.buf.len() < len {
            self.fill().await;
        }
        r.body = self.buf.drain(..len).collect();
        r
    }
}

/// `GET /healthz` with a padding header of `pad` bytes.
fn healthz(pad: usize) -> Vec<u8> {
    format!(
        "GET /healthz HTTP/1.1\r\nHost: parley\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(pad)
    )
    .into_bytes()
}

async fn assert_healthy(raw: &mut Raw) {
    let r = raw.response().await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok\n"[..]));
}

#[tokio::test]
async fn heads_small_large_in_pieces_and_pipelined_on_one_connection() {
    let t = TestServer::start().await;
    let mut raw = Raw::connect(&t).await;

    // A small head, then (after the connection waited with no buffer) heads larger than
    // the stack buffer: in one write, and in pieces with pauses in between.
    raw.write(&healthz(0)).await;
    assert_healthy(&mut raw).await;
    tokio::time::sleep(IDLE).await;
    raw.write(&healthz(3000)).await;
    assert_healthy(&mut raw).await;
    tokio::time::sleep(IDLE).await;
    raw.write_in_pieces(&healthz(5000), 700, Duration::from_millis(5))
        .await;
    assert_healthy(&mut raw).await;
    raw.write_in_pieces(&healthz(10), 1, Duration::from_millis(1))
        .await;
    assert_healthy(&mut raw).await;

    // Pipelined: three requests in one write, the middle one larger than the stack
    // buffer, answered in order.
    let mut three = healthz(0);
    three.extend(
        b"GET /readyz HTTP/1.1\r\nHost: parley\r\nX-Pad: "
            .iter()
            .chain(&[b'q'; 2000])
            .chain(b"\r\n\r\n"),
    );
    three.extend(healthz(1));
    raw.write(&three).await;
    assert_healthy(&mut raw).await;
    assert_eq!(raw.response().await.status, 200);
    assert_healthy(&mut raw).await;

    // Still usable after one more pause.
    tokio::time::sleep(IDLE).await;
    raw.write(&healthz(0)).await;
    assert_healthy(&mut raw).await;
}

/// On shutdown a keep-alive connection still in hyper's hands (no idle release) is asked
/// to finish and closes at once, not when its idle time or the drain's limit is up.
#[tokio::test]
async fn shutdown_closes_a_keep_alive_connection_at_once() {
    let t = TestServer::start_with(|c| {
        c.server.keep_alive_idle = Duration::from_secs(60);
        c.server.keep_alive_release = Duration::from_secs(60);
        c.server.header_read_timeout = Duration::from_secs(60);
        c.server.shutdown_timeout = Duration::from_secs(60);
    })
    .await;
    let mut raw = Raw::connect(&t).await;
    raw.write(&healthz(0)).await;
    assert_healthy(&mut raw).await;
    tokio::time::sleep(IDLE).await;
    let asked = std::time::Instant::now();
    t.server.shutdown();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.tcp.read_to_end(&mut rest))
        .await
        .expect("closed within 5 s of the shutdown")
        .unwrap();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(asked.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn bodies_arriving_after_their_head_and_in_pieces_arrive_whole() {
    let t = TestServer::start().await;
    let token = t.token("ann");
    let mut raw = Raw::connect(&t).await;
    let upload = |len: usize| {
        let head = format!(
            "POST /api/v1/files?name=b.bin HTTP/1.1\r\nHost: parley\r\n\
             Authorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {len}\r\n\r\n"
        );
        // Bytes that no sniffer mistakes for a known type, different at every offset.
        let body: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        (head.into_bytes(), body)
    };
    let check = |r: Response, body: &[u8]| {
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        // proto3 JSON: a uint64 is a string.
        assert_eq!(v["size"], body.len().to_string(), "{v}");
        let sha: String = Sha256::digest(body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(v["sha256"].as_str(), Some(sha.as_str()));
    };

    // The head alone, a pause (the server waits for the body), then the body in pieces:
    // one byte, then pieces around the stack buffer's size, with pauses.
    let (head, body) = upload(20_000);
    raw.write(&head).await;
    tokio::time::sleep(IDLE).await;
    raw.write(&body[..1]).await;
    tokio::time::sleep(IDLE).await;
    raw.write_in_pieces(&body[1..], 1500, Duration::from_millis(5))
        .await;
    let r = raw.response().await;
    check(r, &body);

    // Head and body in one write, larger than the stack buffer, on the same connection.
    let (mut head, body) = upload(3000);
    head.extend_from_slice(&body);
    raw.write(&head).await;
    check(raw.response().await, &body);

    // A small one after a pause.
    tokio::time::sleep(IDLE).await;
    let (mut head, body) = upload(10);
    head.extend_from_slice(&body);
    raw.write(&head).await;
    check(raw.response().await, &body);
}

/// The server's open connections of one transport (the `/metrics` gauge).
fn open(t: &TestServer, transport: &'static str) -> i64 {
    t.server
        .state()
        .core
        .metrics
        .connections
        .get_or_create(&TransportLabel { transport })
        .get()
}

#[tokio::test]
async fn streams_and_polls_end_when_their_client_goes() {
    let t = TestServer::start().await;

    // An SSE stream, read up to its first event, then left idle (the server watches the
    // connection for EOF with no buffer), then closed by the client.
    let ticket = t.try_ticket(&t.token("ann")).await.ok().unwrap();
    let mut sse = Raw::connect(&t).await;
    sse.write(
        format!(
            "GET /sse?ticket={ticket} HTTP/1.1\r\nHost: parley\r\nAccept: text/event-stream\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    while !sse.buf.windows(11).any(|w| w == b"\"connected\"") {
        sse.fill().await;
    }
    assert!(sse.buf.starts_with(b"HTTP/1.1 200 OK\r\n"));
    eventually("the stream is counted", || open(&t, "sse") == 1).await;
    tokio::time::sleep(IDLE).await;
    drop(sse);
    eventually("the server ends the stream", || open(&t, "sse") == 0).await;

    // A pending long-poll, closed by the client while it waits.
    let auth = format!("Bearer {}", t.token("bob"));
    let session = open_http_session(t.addr(), &auth).await;
    let mut poll = Raw::connect(&t).await;
    poll.write(poll_request(&session, &auth, 30).as_bytes())
        .await;
    eventually("the poll is pending", || open(&t, "poll") == 1).await;
    tokio::time::sleep(IDLE).await;
    drop(poll);
    eventually("the server ends the poll", || open(&t, "poll") == 0).await;

    // The same poll on a connection that stays: answered (empty) after its hold time.
    let mut poll = Raw::connect(&t).await;
    poll.write(poll_request(&session, &auth, 1).as_bytes())
        .await;
    let r = poll.response().await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"[]"[..]));
    assert_eq!(r.header("x-parley-cursor"), Some("0"));
}

/// A raw `GET /poll` for `session` from cursor 0, held up to `wait` seconds.
fn poll_request(session: &str, auth: &str, wait: u32) -> String {
    format!(
        "GET /poll?session_id={session}&cursor=0&wait={wait} HTTP/1.1\r\nHost: parley\r\n\
         Authorization: {auth}\r\n\r\n"
    )
}

/// The Error JSON of a response, checked to be labelled as JSON.
fn error_of(r: &Response, what: &str) -> proto::Error {
    assert_eq!(r.header("content-type"), Some("application/json"), "{what}");
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{what}: {e}"))
}

#[tokio::test]
async fn bad_queries_and_paths_answer_the_error_json() {
    let t = TestServer::start().await;
    let auth = format!("Bearer {}", t.token("ann"));
    for (method, path) in [
        ("GET", "/api/v1/rooms/lobby/messages?after_seq=-1"),
        ("GET", "/api/v1/rooms/lobby/messages?limit=4294967296"),
        ("GET", "/api/v1/rooms/lobby/messages?limit=1&limit=2"),
        ("GET", "/api/v1/rooms/lobby/messages?before_seq=x"),
        ("GET", "/api/v1/rooms/%FF/messages"),
        ("GET", "/api/v1/rooms/%C3%28/members"),
        ("POST", "/api/v1/rooms/%FF/messages"),
        ("GET", "/api/v1/files/%FF"),
        ("DELETE", "/api/v1/files/%FF"),
        ("POST", "/api/v1/files/%FF/url"),
        ("POST", "/api/v1/files?name=a&name=b"),
        ("POST", "/session/%FF"),
        ("GET", "/sse?last_pos=x"),
        ("GET", "/sse?receive_only=maybe"),
        ("GET", "/api/v1/rooms?limit=-1"),
    ] {
        let what = format!("{method} {path}");
        let body = if method == "POST" { "{}" } else { "" };
        let mut raw = Raw::connect(&t).await;
        raw.write(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: parley\r\nAuthorization: {auth}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await;
        let r = raw.response().await;
        assert_eq!(r.status, 400, "{what}");
        let e = error_of(&r, &what);
        assert_eq!(
            code_of(&e),
            ErrorCode::InvalidArgument,
            "{what}: {}",
            e.message
        );
        assert!(!e.message.is_empty());
    }
    // A bad long-poll query, a method a route does not take: the Error JSON too.
    let mut raw = Raw::connect(&t).await;
    raw.write(
        format!(
            "GET /poll?session_id=s&cursor=-1 HTTP/1.1\r\nHost: parley\r\nAuthorization: {auth}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let r = raw.response().await;
    assert_eq!(r.status, 400);
    assert_eq!(code_of(&error_of(&r, "poll")), ErrorCode::InvalidArgument);
    for (method, path, allow) in [
        ("PUT", "/api/v1/files", "POST"),
        ("PATCH", "/api/v1/files/0123", "GET,HEAD,DELETE"),
        ("DELETE", "/api/v1/rooms/lobby/messages", "GET,HEAD,POST"),
    ] {
        raw.write(
            format!("{method} {path} HTTP/1.1\r\nHost: parley\r\nAuthorization: {auth}\r\n\r\n")
                .as_bytes(),
        )
        .await;
        let r = raw.response().await;
        let what = format!("{method} {path}");
        assert_eq!(r.status, 405, "{what}");
        assert_eq!(code_of(&error_of(&r, &what)), ErrorCode::InvalidArgument);
        assert_eq!(r.header("allow"), Some(allow), "{what}");
    }
    // /poll takes GET (and HEAD) only; anything else is refused before the poll starts
    // or is forwarded, as axum's method router answered it (transport::app::App).
    raw.write(
        format!("POST /poll?session_id=s HTTP/1.1\r\nHost: parley\r\nAuthorization: {auth}\r\nContent-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let r = raw.response().await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET,HEAD"));
    // A path no route takes: 404 with the Error JSON, with or without a token.
    for auth in [format!("Authorization: {auth}\r\n"), String::new()] {
        raw.write(format!("GET /no/such/path HTTP/1.1\r\nHost: parley\r\n{auth}\r\n").as_bytes())
            .await;
        let r = raw.response().await;
        assert_eq!(r.status, 404);
        assert_eq!(code_of(&error_of(&r, "unknown path")), ErrorCode::NotFound);
    }
}

#[tokio::test]
async fn an_upload_refused_before_its_body_is_read_says_connection_close() {
    let t = TestServer::start_with(|c| {
        c.files.max_file_bytes = 1000;
        c.files.uploads_per_minute = 2;
    })
    .await;
    let auth = format!("Bearer {}", t.token("ann"));
    let upload = |auth: &str, len: usize, sent: usize| {
        format!(
            "POST /api/v1/files?name=f HTTP/1.1\r\nHost: parley\r\nAuthorization: {auth}\r\n\
             Content-Length: {len}\r\n\r\n{}",
            "x".repeat(sent)
        )
        .into_bytes()
    };
    // A whole small upload: 201, and the connection stays open for the next request.
    let mut raw = Raw::connect(&t).await;
    raw.write(&upload(&auth, 10, 10)).await;
    let r = raw.response().await;
    assert_eq!(r.status, 201);
    assert_eq!(r.header("connection"), None);
    raw.write(&healthz(0)).await;
    assert_healthy(&mut raw).await;

    // Refused from the headers, most of the body still to come: the Error JSON, then
    // the connection closes, and the response said so. (Two uploads a minute: the one
    // above and the refused large one count.)
    for (what, request, status, code) in [
        (
            "too large",
            upload(&auth, 5000, 100),
            413,
            ErrorCode::FileTooLarge,
        ),
        (
            "no token",
            upload("Bearer x", 500, 100),
            401,
            ErrorCode::Unauthorized,
        ),
        (
            "too fast",
            upload(&auth, 500, 100),
            429,
            ErrorCode::RateLimited,
        ),
    ] {
        let mut raw = Raw::connect(&t).await;
        raw.write(&request).await;
        let r = raw.response().await;
        assert_eq!(r.status, status, "{what}");
        let e = error_of(&r, what);
        assert_eq!(code_of(&e), code, "{what}");
        assert_eq!(r.header("connection"), Some("close"), "{what}");
        let mut rest = [0u8; 16];
        let n = tokio::time::timeout(WAIT, raw.tcp.read(&mut rest))
            .await
            .expect("the server closes the connection");
        assert!(matches!(n, Ok(0) | Err(_)), "{what}: {n:?}");
    }
}

/// `/poll` has no body limit or body deadline of its own because it never reads a body:
/// a stranger's GET that declares a gigabyte and sends some of it gets its answer at
/// once (401, from the headers), and the connection closes rather than waiting for or
/// taking in the rest.
#[tokio::test]
async fn a_poll_with_a_body_it_never_reads_is_answered_and_closed() {
    let t = TestServer::start().await;
    let mut raw = Raw::connect(&t).await;
    raw.write(
        format!(
            "GET /poll?session_id=s&cursor=0&wait=30 HTTP/1.1\r\nHost: parley\r\n\
             Authorization: Bearer x\r\nContent-Length: 1000000000\r\n\r\n{}",
            "x".repeat(64 * 1024)
        )
        .as_bytes(),
    )
    .await;
    let r = raw.response().await;
    assert_eq!(r.status, 401);
    assert_eq!(code_of(&error_of(&r, "poll")), ErrorCode::Unauthorized);
    let mut rest = [0u8; 16];
    let n = tokio::time::timeout(WAIT, raw.tcp.read(&mut rest))
        .await
        .expect("the server closes the connection");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}
