//! Shared test harness: a real parley server on an ephemeral port (in-process, memory
//! backends) and a real WebSocket client (tokio-tungstenite, an independent
//! implementation of RFC 6455).
#![allow(dead_code)]

use std::{collections::VecDeque, net::SocketAddr, time::Duration};

use futures_util::{SinkExt, StreamExt};
use parley::{
    auth::Authenticator,
    codec::{self, Encoding},
    config::Config,
    proto::{self, ClientFrame, ServerFrame, client_frame::Cmd, server_frame::Kind},
    server::Server,
};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest, http::HeaderValue, protocol::CloseFrame},
};

pub mod pg;

pub const WAIT: Duration = Duration::from_secs(5);
/// The HTTP/2 client connection preface (RFC 9113 §3.4), for raw-frame tests.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: what a client sends right after the preface.
pub const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// The `kind` of the signal a client sends itself to mark a point in its push stream
/// (see [`Client::probe`]); such pushes never reach a client's inbox.
pub const PROBE: &str = "parley-test-probe";

/// A message for a store test: body `body of <id>`, metadata `k = <id>`.
pub fn store_message(room: &str, sender: &str, id: &str) -> parley::store::NewMessage {
    parley::store::NewMessage {
        room: room.into(),
        sender: sender.into(),
        client_msg_id: id.into(),
        body: format!("body of {id}"),
        metadata: [("k".to_string(), id.to_string())].into(),
        ts: 1_700_000_000_000,
        attachments: Vec::new(),
    }
}

/// Waits until `cond` holds (checked every 10 ms, for up to 10 s): for tests that wait
/// on something the server does in the background, without guessing a sleep.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A `next_of` picker for one push kind: `client.next_of(pushed!(Receipt))`.
#[macro_export]
macro_rules! pushed {
    ($variant:ident) => {
        |k: parley::proto::server_frame::Kind| match k {
            parley::proto::server_frame::Kind::$variant(v) => Some(v),
            _ => None,
        }
    };
}

pub struct TestServer {
    pub server: Server,
    pub config: Config,
    /// With `PARLEY_TEST_STORE=postgres`: the server's own database, dropped after it.
    pub db: Option<pg::TestDb>,
}

pub fn test_config() -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.auth.jwt_secret = "test-secret".into();
    c.store.path = ":memory:".into();
    // Shutdown tests want the disconnects at once (the drain delay has its own test).
    c.server.drain_delay = Duration::ZERO;
    // Tests send and connect far faster than people do; the limits have their own tests.
    c.limits = parley::config::LimitsConfig::off();
    // Uploads land under target/tmp (cargo's scratch space for tests), never in data/.
    c.files.dir = format!(
        "{}/parley-test-files-{}",
        env!("CARGO_TARGET_TMPDIR"),
        std::process::id()
    );
    c
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config();
        let db = if pg::selected() {
            let db = pg::TestDb::create().await;
            db.apply(&mut config);
            Some(db)
        } else {
            None
        };
        edit(&mut config);
        // On port 0 the server takes a free TCP port, then QUIC (with TLS) the same
        // number over UDP, which a QUIC client of a test beside may hold: take another.
        let mut tries = 0;
        let server = loop {
            match Server::start(config.clone()).await {
                Err(parley::server::ServerError::Bind { source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse
                        && config.server.listen.port() == 0
                        && tries < 5 =>
                {
                    tries += 1;
                }
                started => break started.expect("server starts"),
            }
        };
        Self { server, config, db }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// `POST /api/v1/tickets` with `token`: the ticket, or the refusal (status, body).
    pub async fn try_ticket(&self, token: &str) -> Result<String, HttpReply> {
        let auth = format!("Bearer {token}");
        let r = http(
            self.addr(),
            "POST",
            "/api/v1/tickets",
            &[("authorization", &auth)],
            "",
        )
        .await;
        if r.status != 200 {
            return Err(r);
        }
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            v["expiresInMs"],
            self.config.auth.ticket_ttl.as_millis() as u64
        );
        Ok(v["ticket"].as_str().unwrap().to_string())
    }

    /// Whether the server still holds the session.
    pub fn session_alive(&self, id: &str) -> bool {
        self.server.state().core.sessions.get(id).is_some()
    }

    /// Waits until the reaper has removed the session.
    pub async fn session_reaped(&self, id: &str) {
        eventually("the session is reaped", || !self.session_alive(id)).await;
    }

    pub fn token(&self, user: &str) -> String {
        Authenticator::new(&self.config.auth)
            .unwrap()
            .mint(user, Duration::from_secs(3600))
            .unwrap()
    }

    pub fn expired_token(&self, user: &str) -> String {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - 3600;
        Authenticator::new(&self.config.auth)
            .unwrap()
            .mint_with_exp(user, exp)
            .unwrap()
    }

    /// A connected, authenticated client.
    pub async fn client(&self, user: &str, encoding: Encoding) -> Client {
        let mut c = Client::open(self.addr(), Some(encoding)).await;
        let connected = c.connect(&self.token(user)).await;
        assert_eq!(connected.user_id, user);
        c
    }

    /// Plain HTTP GET; returns (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.addr(), path).await
    }
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, None, "").await
}

/// A plain HTTP/1.1 request (optionally with a bearer token and a JSON body); returns
/// (status, body).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How a connection ended.
#[derive(Debug)]
pub struct Closed {
    /// The `disconnect` frame sent before the close, if any.
    pub disconnect: Option<proto::Disconnect>,
    /// Error frames received on the way.
    pub errors: Vec<proto::Error>,
    pub code: Option<u16>,
}

pub struct Client {
    pub ws: Ws,
    pub encoding: Encoding,
    next_id: u64,
    /// Pushes (and stray frames) received while waiting for a reply.
    pub inbox: VecDeque<ServerFrame>,
    pub session_id: String,
    pub user_id: String,
    /// Highest push position seen.
    pub last_pos: u64,
}

fn is_probe(frame: &ServerFrame) -> bool {
    matches!(&frame.kind, Some(Kind::Signal(s)) if s.kind == PROBE)
}

impl Client {
    /// Opens a WebSocket, offering the encoding's subprotocol (or none).
    pub async fn open(addr: SocketAddr, encoding: Option<Encoding>) -> Client {
        let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
        if let Some(e) = encoding {
            req.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_static(e.subprotocol()),
            );
        }
        let (ws, resp) = tokio_tungstenite::connect_async(req)
            .await
            .expect("ws connects");
        let negotiated = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| Encoding::from_subprotocol(v.to_str().unwrap()).unwrap());
        assert_eq!(
            negotiated, encoding,
            "server echoes the offered subprotocol"
        );
        Client {
            ws,
            encoding: encoding.unwrap_or(Encoding::Json),
            next_id: 1,
            inbox: VecDeque::new(),
            session_id: String::new(),
            user_id: String::new(),
            last_pos: 0,
        }
    }

    /// A connected client on a [`tiny_socket`]: the server's writes to it block soon
    /// whenever the test stops reading.
    pub async fn tiny(t: &TestServer, user: &str, encoding: Encoding) -> Client {
        let mut req = format!("ws://{}/ws", t.addr())
            .into_client_request()
            .unwrap();
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(encoding.subprotocol()),
        );
        let tcp = MaybeTlsStream::Plain(tiny_socket(t.addr()).await);
        let (ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
        let mut c = Client {
            ws,
            encoding,
            next_id: 1,
            inbox: VecDeque::new(),
            session_id: String::new(),
            user_id: String::new(),
            last_pos: 0,
        };
        c.connect(&t.token(user)).await;
        c
    }

    pub async fn send_raw(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("send");
    }

    /// Sends a command; returns its id.
    pub async fn send(&mut self, cmd: Cmd) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let frame = ClientFrame { id, cmd: Some(cmd) };
        let bytes = codec::encode_client(self.encoding, &frame);
        let msg = match self.encoding {
            Encoding::Json => Message::Text(String::from_utf8(bytes.to_vec()).unwrap().into()),
            Encoding::Proto => Message::Binary(bytes),
        };
        self.send_raw(msg).await;
        id
    }

    /// The next data frame from the socket (not the inbox); probes are dropped.
    pub async fn read(&mut self) -> Option<ServerFrame> {
        loop {
            let frame = self.read_any().await?;
            if is_probe(&frame) {
                // Another session of the same user probed.
                continue;
            }
            return Some(frame);
        }
    }

    /// The next data frame from the socket, probes included.
    async fn read_any(&mut self) -> Option<ServerFrame> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("frame in time")?;
            let frame = match msg.ok()? {
                Message::Text(t) => codec_decode(Encoding::Json, t.as_bytes()),
                Message::Binary(b) => codec_decode(Encoding::Proto, &b),
                Message::Close(_) => return None,
                _ => continue,
            };
            if frame.pos > 0 {
                assert_eq!(frame.pos, self.last_pos + 1, "push positions have no gaps");
                self.last_pos = frame.pos;
            }
            return Some(frame);
        }
    }

    /// Marks a point in this client's push stream and waits until it passes: the client
    /// signals itself, and the signal push is queued behind every push queued for this
    /// session before it. Pushes read on the way go to the inbox.
    pub async fn probe(&mut self) {
        let id = self
            .send(Cmd::Signal(proto::Signal {
                to_user: self.user_id.clone(),
                kind: PROBE.into(),
                payload: String::new(),
            }))
            .await;
        let (mut replied, mut probed) = (false, false);
        while !replied || !probed {
            let frame = self.read_any().await.expect("probe before close");
            if is_probe(&frame) {
                probed = true;
            } else if frame.id == id && frame.pos == 0 {
                assert!(matches!(frame.kind, Some(Kind::Done(_))), "{frame:?}");
                replied = true;
            } else {
                self.inbox.push_back(frame);
            }
        }
    }

    /// Nothing was pushed to this client within `settle` (and before its probe).
    pub async fn nothing_pushed(&mut self, settle: Duration) {
        tokio::time::sleep(settle).await;
        self.probe().await;
        assert!(self.inbox.is_empty(), "unexpected pushes: {:?}", self.inbox);
    }

    /// Sends a command and waits for its reply; pushes go to the inbox.
    pub async fn request(&mut self, cmd: Cmd) -> Kind {
        let id = self.send(cmd).await;
        loop {
            let frame = self.read().await.expect("reply before close");
            if frame.id == id && frame.pos == 0 {
                return frame.kind.expect("reply has a kind");
            }
            self.inbox.push_back(frame);
        }
    }

    pub async fn connect(&mut self, token: &str) -> proto::Connected {
        self.connect_with(proto::Connect {
            token: token.into(),
            ..Default::default()
        })
        .await
    }

    pub async fn connect_with(&mut self, c: proto::Connect) -> proto::Connected {
        match self.request(Cmd::Connect(c)).await {
            Kind::Connected(c) => {
                self.session_id = c.session_id.clone();
                self.user_id = c.user_id.clone();
                c
            }
            other => panic!("expected connected, got {other:?}"),
        }
    }

    pub async fn join(&mut self, room: &str) -> proto::Joined {
        match self
            .request(Cmd::Join(proto::Join { room: room.into() }))
            .await
        {
            Kind::Joined(j) => j,
            other => panic!("expected joined, got {other:?}"),
        }
    }

    pub async fn send_msg(&mut self, room: &str, cmid: &str, body: &str) -> proto::Sent {
        let send = proto::Send {
            room: room.into(),
            client_msg_id: cmid.into(),
            body: body.into(),
            ..Default::default()
        };
        match self.request(Cmd::Send(send)).await {
            Kind::Sent(s) => s,
            other => panic!("expected sent, got {other:?}"),
        }
    }

    /// The next push (from the inbox first).
    pub async fn next_push(&mut self) -> ServerFrame {
        if let Some(f) = self.inbox.pop_front() {
            return f;
        }
        self.read().await.expect("push before close")
    }

    /// The next `message` push, skipping membership, presence and receipt pushes.
    pub async fn next_message(&mut self) -> proto::Message {
        loop {
            match self.next_push().await.kind {
                Some(Kind::Message(m)) => return m,
                Some(Kind::Membership(_) | Kind::Presence(_) | Kind::Receipt(_)) => continue,
                other => panic!("expected message, got {other:?}"),
            }
        }
    }

    /// The next push of the given kind, skipping others (membership, presence, …).
    pub async fn next_of<T>(&mut self, pick: impl Fn(Kind) -> Option<T>) -> T {
        loop {
            if let Some(v) = self.next_push().await.kind.and_then(&pick) {
                return v;
            }
        }
    }

    /// The next raw WebSocket message (control frames included).
    pub async fn ws_next(&mut self) -> Message {
        tokio::time::timeout(WAIT, self.ws.next())
            .await
            .expect("message in time")
            .expect("open")
            .expect("ok")
    }

    /// Reads until the server closes; collects the disconnect frame, errors and code.
    pub async fn closed(mut self) -> Closed {
        let mut out = Closed {
            disconnect: None,
            errors: Vec::new(),
            code: None,
        };
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("close in time");
            match msg {
                Some(Ok(Message::Text(t))) => {
                    collect(&mut out, codec_decode(Encoding::Json, t.as_bytes()))
                }
                Some(Ok(Message::Binary(b))) => {
                    collect(&mut out, codec_decode(Encoding::Proto, &b))
                }
                Some(Ok(Message::Close(frame))) => {
                    out.code = frame.map(|f: CloseFrame| u16::from(f.code));
                    return out;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    eprintln!("closed(): error {e}");
                    return out;
                }
                None => return out,
            }
        }
    }
}

fn collect(out: &mut Closed, f: ServerFrame) {
    match f.kind {
        Some(Kind::Disconnect(d)) => out.disconnect = Some(d),
        Some(Kind::Error(e)) => out.errors.push(e),
        _ => {}
    }
}

pub fn codec_decode(encoding: Encoding, bytes: &[u8]) -> ServerFrame {
    match encoding {
        Encoding::Json => serde_json::from_slice(bytes).expect("server JSON decodes"),
        Encoding::Proto => prost::Message::decode(bytes).expect("server protobuf decodes"),
    }
}

pub fn code_of(e: &proto::Error) -> proto::ErrorCode {
    proto::ErrorCode::try_from(e.code).unwrap()
}

/// An HTTP/1.1 response read with hyper: status, headers and (for non-streaming use)
/// the whole body.
pub struct HttpReply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: bytes::Bytes,
}

/// A request with arbitrary headers over a fresh HTTP/1.1 connection (hyper client).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<bytes::Bytes>,
) -> HttpReply {
    use http_body_util::BodyExt;
    let response = http_stream(addr, method, path, headers, body).await;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("body in time")
        .unwrap()
        .to_bytes();
    HttpReply {
        status,
        headers,
        body,
    }
}

/// Opens a session over HTTP (`POST /session` with `connect`) with `authorization`;
/// its id.
pub async fn open_http_session(addr: SocketAddr, authorization: &str) -> String {
    let r = http(
        addr,
        "POST",
        "/session",
        &[("authorization", authorization)],
        r#"{"id":"1","connect":{}}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["connected"]["sessionId"].as_str().unwrap().to_string()
}

/// `POST /session/{id}` with a JSON command and `authorization`; the status and the
/// reply frame (`null` for an empty body).
pub async fn session_command(
    addr: SocketAddr,
    authorization: &str,
    session: &str,
    cmd: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = http(
        addr,
        "POST",
        &format!("/session/{session}"),
        &[
            ("authorization", authorization),
            ("content-type", "application/json"),
        ],
        cmd.to_string(),
    )
    .await;
    let v = if r.body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&r.body).unwrap()
    };
    (r.status, v)
}

/// Sends a request and returns the response with its body still streaming.
pub async fn http_stream(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<bytes::Bytes>,
) -> hyper::Response<hyper::body::Incoming> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(http_body_util::Full::new(body.into())).unwrap();
    tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("response in time")
        .unwrap()
}

/// One Server-Sent Event (or comment).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<u64>,
    pub retry: Option<u64>,
    pub data: Option<String>,
    pub comment: bool,
}

impl SseEvent {
    pub fn frame(&self) -> ServerFrame {
        serde_json::from_str(self.data.as_deref().expect("data")).expect("data is a JSON frame")
    }
}

/// A streaming `text/event-stream` reader.
pub struct SseClient {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    body: hyper::body::Incoming,
    buf: String,
}

impl SseClient {
    pub async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let r = http_stream(addr, "GET", path, headers, bytes::Bytes::new()).await;
        SseClient {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            body: r.into_body(),
            buf: String::new(),
        }
    }

    /// The rest of the body (an error response's JSON).
    pub async fn body_bytes(self) -> bytes::Bytes {
        use http_body_util::BodyExt;
        let rest = tokio::time::timeout(WAIT, self.body.collect())
            .await
            .expect("body in time")
            .expect("body");
        let mut out = self.buf.into_bytes();
        out.extend_from_slice(&rest.to_bytes());
        out.into()
    }

    /// The next event or comment; `None` when the stream ended.
    pub async fn next(&mut self) -> Option<SseEvent> {
        use http_body_util::BodyExt;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = SseEvent::default();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        ev.id = Some(v.parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("retry: ") {
                        ev.retry = Some(v.parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        ev.data = Some(v.to_string());
                    } else if line.starts_with(':') {
                        ev.comment = true;
                    }
                }
                return Some(ev);
            }
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .expect("event in time")?;
            if let Ok(data) = frame.ok()?.into_data() {
                self.buf.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    }

    /// The next event that carries data, skipping heartbeats.
    pub async fn next_frame(&mut self) -> (Option<u64>, ServerFrame) {
        loop {
            let ev = self.next().await.expect("stream open");
            if ev.data.is_some() {
                return (ev.id, ev.frame());
            }
        }
    }
}

/// A TCP connection to the server that accepts very little unread data (so the
/// server's writes block soon once the client stops reading).
pub async fn tiny_socket(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

/// A member that will stop reading: a JSON WebSocket on a [`tiny_socket`] that connects
/// as `user` and joins `room`, read up to the join's reply. Returns the socket (the test
/// reads no more from it) and the session id.
pub async fn stalling_member(
    t: &TestServer,
    user: &str,
    room: &str,
) -> (WebSocketStream<TcpStream>, String) {
    let mut req = format!("ws://{}/ws", t.addr())
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("parley.v1.json"),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, tiny_socket(t.addr()).await)
        .await
        .unwrap();
    let token = t.token(user);
    for frame in [
        format!(r#"{{"id":1,"connect":{{"token":"{token}"}}}}"#),
        format!(r#"{{"id":2,"join":{{"room":"{room}"}}}}"#),
    ] {
        ws.send(Message::Text(frame.into())).await.unwrap();
    }
    let mut sid = String::new();
    loop {
        let Some(Ok(Message::Text(text))) = ws.next().await else {
            panic!("closed before the join was answered")
        };
        if let Some(rest) = text.split("\"sessionId\":\"").nth(1) {
            sid = rest.split('"').next().unwrap().to_string();
        }
        if text.contains("\"joined\"") {
            return (ws, sid);
        }
    }
}

/// A raw WebSocket client on a plain TCP socket: sends the upgrade request (with
/// `extensions` as `Sec-WebSocket-Extensions`, if any) and reads the response head.
/// Returns the socket, positioned at the first frame, and the head.
pub async fn raw_ws(addr: SocketAddr, extensions: Option<&str>) -> (TcpStream, String) {
    raw_ws_on(TcpStream::connect(addr).await.unwrap(), extensions).await
}

/// [`raw_ws`] on a stream the caller connected (say a [`tiny_socket`], or a TLS stream).
pub async fn raw_ws_on<S>(mut s: S, extensions: Option<&str>) -> (S, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ext = extensions
        .map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: parley.v1.json\r\n{ext}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (s, head)
}

/// One client frame: `first` is the first header byte (FIN, RSV, opcode); the payload is
/// masked as RFC 6455 requires of clients.
pub fn masked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut out = vec![first];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=65535 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Reads server frames until a close frame: its code (`Some(0)` for a close frame with
/// no code), or `None` when the connection ended (EOF or reset) without one.
pub async fn read_close_code(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<u16> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // Whole frames in `buf` (server frames are unmasked).
        while buf.len() >= 2 {
            let (len, head) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if buf.len() < head + len {
                break;
            }
            if buf[0] & 0x0f == 0x8 {
                let p = &buf[head..head + len];
                return Some(if p.len() >= 2 {
                    u16::from_be_bytes([p[0], p[1]])
                } else {
                    0
                });
            }
            buf.drain(..head + len);
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no close within {WAIT:?}"),
        }
    }
}

/// A self-signed certificate (for `localhost` and `127.0.0.1`) and its key as PEM files in
/// a temp dir, removed on drop.
pub struct Certs {
    pub dir: std::path::PathBuf,
    pub cert_der: tokio_rustls::rustls::pki_types::CertificateDer<'static>,
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn make_certs(name: &str) -> Certs {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let key = rcgen::generate_simple_self_signed(names).unwrap();
    let dir = std::env::temp_dir().join(format!("parley-certs-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), key.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.signing_key.serialize_pem()).unwrap();
    Certs {
        dir,
        cert_der: key.cert.der().clone(),
    }
}

/// A test server serving TLS with `certs` (and HTTP/3, which TLS enables), `edit` applied
/// to its configuration.
pub async fn tls_server(certs: &Certs, edit: impl FnOnce(&mut Config)) -> TestServer {
    let (cert, key) = (certs.dir.join("cert.pem"), certs.dir.join("key.pem"));
    TestServer::start_with(|c| {
        c.tls.cert_file = Some(cert.to_str().unwrap().into());
        c.tls.key_file = Some(key.to_str().unwrap().into());
        edit(c);
    })
    .await
}

/// The value of an unlabelled sample in an OpenMetrics text (`/metrics`).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics"))
}

/// `user`'s presence, asked through `c`.
pub async fn presence_of(c: &mut Client, user: &str) -> proto::Presence {
    match c
        .request(Cmd::Presence(proto::PresenceQuery {
            users: vec![user.into()],
        }))
        .await
    {
        Kind::PresenceList(mut l) => l.users.remove(0),
        other => panic!("expected presence list, got {other:?}"),
    }
}

/// `got`'s seqs are exactly `from..=to`, in order, once each.
pub fn assert_gap_free(got: &[(u64, String)], from: u64, to: u64) {
    let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (from..=to).collect::<Vec<_>>(), "in order, once each");
}

/// A WebSocket client speaking `parley.v1.json` over an established TLS stream `tls` to
/// `t` (`wss://localhost:PORT/ws`).
pub async fn wss_json_over<S>(t: &TestServer, tls: S) -> WebSocketStream<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let url = format!("wss://localhost:{}/ws", t.addr().port());
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "parley.v1.json".parse().unwrap());
    tokio_tungstenite::client_async(req, tls).await.unwrap().0
}

/// Sends the JSON command `cmd` over `ws` and returns the first JSON reply that has
/// `key`, skipping pings and other pushes (within [`WAIT`]).
pub async fn ask_json<S>(ws: &mut WebSocketStream<S>, cmd: String, key: &str) -> serde_json::Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(cmd.into()).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a reply")
            .expect("the stream is open")
            .expect("a frame");
        if !frame.is_text() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&frame.into_text().unwrap()).unwrap();
        if v.get(key).is_some() {
            return v;
        }
    }
}

/// The bodies of room `room`'s last (up to 10) messages, asked over `ws` in JSON.
pub async fn history_bodies_json<S>(ws: &mut WebSocketStream<S>, room: &str) -> Vec<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let history = ask_json(
        ws,
        format!(r#"{{"id":"20","history":{{"room":"{room}","limit":10}}}}"#),
        "history",
    )
    .await;
    history["history"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_string())
        .collect()
}

/// Over the JSON WebSocket `ws`: connects as ann (the reply checked) and joins `room`.
pub async fn json_ann_joins<S>(ws: &mut WebSocketStream<S>, t: &TestServer, room: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let connect = format!(r#"{{"id":"1","connect":{{"token":"{}"}}}}"#, t.token("ann"));
    let connected = ask_json(ws, connect, "connected").await;
    assert_eq!(connected["connected"]["userId"], "ann");
    let join = format!(r#"{{"id":"2","join":{{"room":"{room}"}}}}"#);
    ask_json(ws, join, "joined").await;
}

/// Message bodies of the given lengths, each of its own letters.
pub fn lettered_bodies(lengths: &[usize]) -> Vec<String> {
    lengths
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            (0..len)
                .map(|j| char::from(b'a' + ((i * 7 + j) % 26) as u8))
                .collect()
        })
        .collect()
}
