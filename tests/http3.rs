//! HTTP/3 and WebTransport (`/wt`) against the real server, with real QUIC clients over
//! loopback: quinn + hyperium's h3 client for HTTP/3 requests, and `wtransport` (an
//! independent WebTransport implementation) for `/wt` sessions. WebSocket peers are
//! tokio-tungstenite over TLS, as in tests/tls.rs. One test runs two instances on a private
//! redis-server (tests/cluster/harness.rs) to check `/wt` without sticky sessions.

mod common;
#[path = "cluster/harness.rs"]
mod harness;

use std::{collections::VecDeque, net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Buf, Bytes, BytesMut};
use common::*;
use futures_util::{SinkExt, StreamExt};
use hyper::http;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{self, RootCertStore, pki_types::ServerName},
};
use tokio_tungstenite::{WebSocketStream, tungstenite::Message};

fn h3_addr(t: &TestServer) -> SocketAddr {
    t.server.http3_addr().expect("HTTP/3 listens with TLS")
}

/// A rustls client trusting the test certificate, offering `alpn`.
fn client_tls(certs: &Certs, alpn: &[&[u8]], tls13: bool) -> rustls::ClientConfig {
    let mut roots = RootCertStore::empty();
    roots.add(certs.cert_der.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(parley::server::crypto_provider());
    let builder = if tls13 {
        builder.with_protocol_versions(&[&rustls::version::TLS13])
    } else {
        builder.with_safe_default_protocol_versions()
    };
    let mut config = builder
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

// ---------------------------------------------------------------------------------------
// HTTP/3 requests (quinn + h3)

type H3Send = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;
type H3Stream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// One HTTP/3 connection; requests on it are multiplexed.
struct H3 {
    send: H3Send,
    _quic: quinn::Connection,
    _endpoint: quinn::Endpoint,
    authority: String,
}

impl H3 {
    async fn connect(t: &TestServer, certs: &Certs) -> H3 {
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls(certs, &[b"h3"], true))
                .unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let addr = h3_addr(t);
        let quic = tokio::time::timeout(WAIT, endpoint.connect(addr, "localhost").unwrap())
            .await
            .expect("QUIC handshake in time")
            .expect("QUIC handshake");
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(quic.clone()))
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        H3 {
            send,
            _quic: quic,
            _endpoint: endpoint,
            authority: format!("localhost:{}", addr.port()),
        }
    }

    /// Sends a request; the response head and the stream to read its body from.
    async fn start(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (http::Response<()>, H3Stream) {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.authority));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut stream = self.send.send_request(req.body(()).unwrap()).await.unwrap();
        if !body.is_empty() {
            stream
                .send_data(Bytes::copy_from_slice(body.as_bytes()))
                .await
                .unwrap();
        }
        stream.finish().await.unwrap();
        let response = tokio::time::timeout(WAIT, stream.recv_response())
            .await
            .expect("response head in time")
            .unwrap();
        (response, stream)
    }

    /// A whole request: status, headers, body.
    async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, http::HeaderMap, Bytes) {
        let (response, mut stream) = self.start(method, path, headers, body).await;
        let mut out = BytesMut::new();
        while let Some(mut chunk) = tokio::time::timeout(WAIT, stream.recv_data())
            .await
            .expect("body in time")
            .unwrap()
        {
            out.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        (
            response.status().as_u16(),
            response.headers().clone(),
            out.freeze(),
        )
    }
}

/// Reads Server-Sent Events from an HTTP/3 response body: the next `data:` as JSON.
struct H3Sse {
    stream: H3Stream,
    text: String,
}

impl H3Sse {
    async fn next_data(&mut self) -> (Option<u64>, Value) {
        loop {
            if let Some(end) = self.text.find("\n\n") {
                let event: String = self.text.drain(..end + 2).collect();
                let mut id = None;
                let mut data = None;
                for line in event.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = v.parse().ok();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(v).unwrap());
                    }
                }
                if let Some(data) = data {
                    return (id, data);
                }
                continue;
            }
            let mut chunk = tokio::time::timeout(WAIT, self.stream.recv_data())
                .await
                .expect("an SSE event in time")
                .unwrap()
                .expect("the SSE stream stays open");
            let bytes = chunk.copy_to_bytes(chunk.remaining());
            self.text.push_str(std::str::from_utf8(&bytes).unwrap());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Frame peers: WebTransport (wtransport) and WebSocket over TLS (tokio-tungstenite)

#[allow(clippy::large_enum_variant)]
enum Wire {
    Wt {
        conn: wtransport::Connection,
        send: wtransport::SendStream,
        recv: wtransport::RecvStream,
        buf: BytesMut,
        proto: bool,
        _endpoint: wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>,
    },
    Ws(Box<WebSocketStream<TlsStream<TcpStream>>>),
}

/// A chat client speaking JSON frames (or protobuf, converted) over either wire.
struct Peer {
    wire: Wire,
    next_id: u64,
    inbox: VecDeque<Value>,
    session_id: String,
    last_pos: u64,
}

async fn open_wt(t: &TestServer, certs: &Certs, query: &str) -> wtransport::Connection {
    open_wt_raw(t, certs, query).await.0
}

async fn open_wt_raw(
    t: &TestServer,
    certs: &Certs,
    query: &str,
) -> (
    wtransport::Connection,
    wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>,
) {
    let config = wtransport::ClientConfig::builder()
        .with_bind_address("127.0.0.1:0".parse().unwrap())
        .with_custom_tls(client_tls(certs, &[b"h3"], true))
        .build();
    let endpoint = wtransport::Endpoint::client(config).unwrap();
    let url = format!("https://127.0.0.1:{}/wt?{query}", h3_addr(t).port());
    let conn = tokio::time::timeout(WAIT, endpoint.connect(url))
        .await
        .expect("WebTransport session in time")
        .expect("WebTransport session established");
    (conn, endpoint)
}

impl Peer {
    /// A WebTransport session at `/wt?{query}` with its stream open (nothing sent yet).
    async fn wt(t: &TestServer, certs: &Certs, query: &str) -> Peer {
        let (conn, endpoint) = open_wt_raw(t, certs, query).await;
        let (send, recv) = conn.open_bi().await.unwrap().await.unwrap();
        Peer::new(Wire::Wt {
            conn,
            send,
            recv,
            buf: BytesMut::new(),
            proto: query.contains("enc=proto"),
            _endpoint: endpoint,
        })
    }

    /// A WebSocket over TLS (HTTP/1.1), JSON subprotocol.
    async fn ws(t: &TestServer, certs: &Certs) -> Peer {
        let tcp = TcpStream::connect(t.addr()).await.unwrap();
        let tls = TlsConnector::from(Arc::new(client_tls(certs, &[b"http/1.1"], false)))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let ws = wss_json_over(t, tls).await;
        Peer::new(Wire::Ws(Box::new(ws)))
    }

    fn new(wire: Wire) -> Peer {
        Peer {
            wire,
            next_id: 1,
            inbox: VecDeque::new(),
            session_id: String::new(),
            last_pos: 0,
        }
    }

    async fn write(&mut self, frame: &Value) {
        match &mut self.wire {
            Wire::Wt { send, proto, .. } => {
                let bytes = if *proto {
                    let f: parley::proto::ClientFrame =
                        serde_json::from_value(frame.clone()).unwrap();
                    parley::codec::encode_client(parley::codec::Encoding::Proto, &f).to_vec()
                } else {
                    frame.to_string().into_bytes()
                };
                let mut out = Vec::new();
                prost::encoding::encode_varint(bytes.len() as u64, &mut out);
                out.extend_from_slice(&bytes);
                send.write_all(&out).await.unwrap();
            }
            Wire::Ws(ws) => ws.send(Message::text(frame.to_string())).await.unwrap(),
        }
    }

    /// The next frame, or `None` once the server closed.
    async fn read(&mut self) -> Option<Value> {
        tokio::time::timeout(WAIT, self.read_untimed())
            .await
            .expect("a frame in time")
    }

    async fn read_untimed(&mut self) -> Option<Value> {
        match &mut self.wire {
            Wire::Wt {
                recv, buf, proto, ..
            } => loop {
                let mut view = &buf[..];
                if let Ok(len) = prost::encoding::decode_varint(&mut view) {
                    let head = buf.len() - view.len();
                    if view.len() as u64 >= len {
                        buf.advance(head);
                        let frame = buf.split_to(len as usize);
                        return Some(if *proto {
                            let f = codec_decode(parley::codec::Encoding::Proto, &frame);
                            serde_json::to_value(&f).unwrap()
                        } else {
                            serde_json::from_slice(&frame).unwrap()
                        });
                    }
                }
                let mut chunk = [0u8; 4096];
                match recv.read(&mut chunk).await {
                    Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
                    _ => return None,
                }
            },
            Wire::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                    Some(Ok(_)) => {}
                }
            },
        }
    }

    /// Sends a command and waits for its reply (pushes meanwhile go to the inbox).
    async fn request(&mut self, mut cmd: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = json!(id.to_string());
        self.write(&cmd).await;
        loop {
            let f = self.read().await.expect("a reply before the close");
            if f.get("pos").is_some() {
                self.inbox.push_back(f);
            } else if f["id"] == json!(id.to_string()) {
                return f;
            }
        }
    }

    async fn connect(&mut self, connect: Value) -> Value {
        let reply = self.request(json!({ "connect": connect })).await;
        let connected = reply["connected"].clone();
        assert!(connected.is_object(), "connected: {reply}");
        self.session_id = connected["sessionId"].as_str().unwrap().to_string();
        connected
    }

    async fn join(&mut self, room: &str) {
        let r = self.request(json!({"join": {"room": room}})).await;
        assert!(r.get("joined").is_some(), "{r}");
    }

    async fn say(&mut self, room: &str, cmid: &str, body: &str) {
        let r = self
            .request(json!({"send": {"room": room, "clientMsgId": cmid, "body": body}}))
            .await;
        assert!(r.get("sent").is_some(), "{r}");
    }

    /// The next push (position-checked: each is exactly one past the last seen).
    async fn next_push(&mut self) -> Value {
        let f = match self.inbox.pop_front() {
            Some(f) => f,
            None => loop {
                let f = self.read().await.expect("a push before the close");
                if f.get("pos").is_some() {
                    break f;
                }
            },
        };
        let pos: u64 = f["pos"].as_str().unwrap().parse().unwrap();
        assert_eq!(pos, self.last_pos + 1, "positions are contiguous: {f}");
        self.last_pos = pos;
        f
    }

    /// Pushes until a message with `body` (which must come), returning it.
    async fn message(&mut self, body: &str) -> Value {
        loop {
            let f = self.next_push().await;
            if f["message"]["body"] == json!(body) {
                return f["message"].clone();
            }
            assert!(f.get("message").is_none(), "unexpected message {f}");
        }
    }

    /// Drops the transport without a goodbye (the session waits for a resume).
    fn vanish(self) {
        if let Wire::Wt { conn, .. } = &self.wire {
            conn.close(0u32.into(), b"gone");
        }
        drop(self);
    }
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn http3_serves_healthz_and_tcp_responses_advertise_it() {
    let certs = make_certs("healthz");
    let t = tls_server(&certs, |_| {}).await;
    let port = h3_addr(&t).port();
    assert_eq!(
        port,
        t.addr().port(),
        "UDP on the TCP listener's port number"
    );

    // HTTP/1.1 over TLS: Alt-Svc names the QUIC port.
    let tcp = TcpStream::connect(t.addr()).await.unwrap();
    let tls = TlsConnector::from(Arc::new(client_tls(&certs, &[b"http/1.1"], false)))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, http_body_util::Empty<Bytes>>(
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/healthz")
        .header("host", "localhost")
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["alt-svc"],
        format!("h3=\":{port}\"; ma=86400").as_str()
    );
    // /poll too (served before the router, transport::app::App), here a refusal.
    sender.ready().await.unwrap();
    let req = hyper::Request::get("/poll?session_id=nope&wait=0")
        .header("host", "localhost")
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["alt-svc"],
        format!("h3=\":{port}\"; ma=86400").as_str()
    );

    // HTTP/3.
    let mut h3 = H3::connect(&t, &certs).await;
    let (status, headers, body) = h3.request("GET", "/healthz", &[], "").await;
    assert_eq!((status, &body[..]), (200, &b"ok\n"[..]));
    assert!(headers.get("alt-svc").is_none(), "HTTP/3 needs no Alt-Svc");
    let (status, headers, _) = h3
        .request("GET", "/poll?session_id=nope&wait=0", &[], "")
        .await;
    assert_eq!(status, 401);
    assert!(headers.get("alt-svc").is_none(), "HTTP/3 needs no Alt-Svc");
    let (status, _, body) = h3.request("GET", "/no-such-route", &[], "").await;
    assert_eq!(status, 404);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], "ERROR_CODE_NOT_FOUND");
    // An API request with a body (a ticket) on the same connection.
    let auth = format!("Bearer {}", t.token("ann"));
    let (status, _, body) = h3
        .request("POST", "/api/v1/tickets", &[("authorization", &auth)], "")
        .await;
    assert_eq!(status, 200, "{body:?}");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(v["ticket"].is_string());
}

#[tokio::test]
async fn without_tls_or_when_disabled_there_is_no_quic_listener() {
    let t = TestServer::start().await;
    assert!(t.server.http3_addr().is_none());
    let r = t.http_get("/healthz").await;
    assert_eq!(r.0, 200);
    let certs = make_certs("off");
    let t = tls_server(&certs, |c| c.http3.enabled = false).await;
    assert!(t.server.http3_addr().is_none());
}

#[tokio::test]
async fn webtransport_chats_with_websocket_in_the_same_room() {
    let certs = make_certs("chat");
    let t = tls_server(&certs, |_| {}).await;
    let mut ann = Peer::wt(&t, &certs, "enc=json").await;
    let connected = ann.connect(json!({"token": t.token("ann")})).await;
    assert_eq!(connected["userId"], "ann");
    ann.join("lobby").await;
    let mut bob = Peer::ws(&t, &certs).await;
    bob.connect(json!({"token": t.token("bob")})).await;
    bob.join("lobby").await;

    ann.say("lobby", "a-1", "hello from QUIC").await;
    let m = bob.message("hello from QUIC").await;
    assert_eq!(m["sender"], "ann");
    assert_eq!(ann.message("hello from QUIC").await["seq"], m["seq"]);

    bob.say("lobby", "b-1", "hello from TCP").await;
    assert_eq!(ann.message("hello from TCP").await["sender"], "bob");

    // Counted as its own transport.
    let mut h3 = H3::connect(&t, &certs).await;
    let (_, _, metrics) = h3.request("GET", "/metrics", &[], "").await;
    let metrics = String::from_utf8(metrics.to_vec()).unwrap();
    assert!(
        metrics.contains("parley_connections{transport=\"wt\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("parley_frames_in_total{transport=\"wt\"} 3"));
}

#[tokio::test]
async fn webtransport_speaks_length_delimited_protobuf() {
    let certs = make_certs("proto");
    let t = tls_server(&certs, |_| {}).await;
    let mut ann = Peer::wt(&t, &certs, "enc=proto").await;
    ann.connect(json!({"token": t.token("ann")})).await;
    ann.join("lobby").await;
    ann.say("lobby", "a-1", "binary").await;
    let m = ann.message("binary").await;
    assert_eq!(m["sender"], "ann");
    // A pong for a ping, a bad frame answered with an error (not a close).
    let pong = ann.request(json!({"ping": {}})).await;
    assert!(pong.get("pong").is_some(), "{pong}");
}

#[tokio::test]
async fn resume_moves_between_webtransport_and_websocket_with_exact_positions() {
    let certs = make_certs("resume");
    let t = tls_server(&certs, |_| {}).await;
    let mut bob = Peer::ws(&t, &certs).await;
    bob.connect(json!({"token": t.token("bob")})).await;
    bob.join("lobby").await;

    // ann on WebTransport sees m1, then vanishes.
    let mut ann = Peer::wt(&t, &certs, "enc=json").await;
    ann.connect(json!({"token": t.token("ann")})).await;
    ann.join("lobby").await;
    bob.say("lobby", "b-1", "m1").await;
    ann.message("m1").await;
    let (session, seen) = (ann.session_id.clone(), ann.last_pos);
    ann.vanish();
    bob.say("lobby", "b-2", "m2").await;
    bob.say("lobby", "b-3", "m3").await;

    // Resumed over WebSocket: exactly what came after `seen`, at its positions.
    let mut ann = Peer::ws(&t, &certs).await;
    let c = ann
        .connect(
            json!({"token": t.token("ann"), "sessionId": session, "lastPos": seen.to_string()}),
        )
        .await;
    assert_eq!(c["resumed"], true, "{c}");
    assert_eq!(ann.session_id, session);
    ann.last_pos = seen;
    ann.message("m2").await;
    ann.message("m3").await;
    let seen = ann.last_pos;
    ann.vanish();
    bob.say("lobby", "b-4", "m4").await;

    // And back to WebTransport (protobuf this time).
    let mut ann = Peer::wt(&t, &certs, "enc=proto").await;
    let c = ann
        .connect(
            json!({"token": t.token("ann"), "sessionId": session, "lastPos": seen.to_string()}),
        )
        .await;
    assert_eq!(c["resumed"], true, "{c}");
    ann.last_pos = seen;
    ann.message("m4").await;
    // Nothing else: a probe message comes right after m4.
    bob.say("lobby", "b-5", "m5").await;
    ann.message("m5").await;
}

/// No sticky sessions for `/wt` either: two instances (in this process) on one private
/// redis-server and one shared store. A WebTransport user on one instance and a WebSocket
/// user on the other chat live; the WebTransport user's session, lost on the first
/// instance, reconnects to the second: `resumed: false` (its session lives on the first)
/// and a log sync from its last seq gives exactly what it missed, then live delivery
/// continues there (README, "No sticky sessions").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_users_chat_across_instances_and_continue_on_another() {
    let certs = make_certs("wt-cluster");
    // Redis and the shared store only: the instances are TLS servers started here.
    let cluster = harness::Cluster::start("wt", 0).await;
    let shared = |c: &mut parley::config::Config| {
        c.store = cluster.config.store.clone();
        c.broker = cluster.config.broker.clone();
        c.files = cluster.config.files.clone();
    };
    let a = tls_server(&certs, shared).await;
    let b = tls_server(&certs, shared).await;

    let mut ann = Peer::wt(&a, &certs, "enc=json").await;
    ann.connect(json!({"token": a.token("ann")})).await;
    ann.join("lobby").await;
    let mut bob = Peer::ws(&b, &certs).await;
    bob.connect(json!({"token": b.token("bob")})).await;
    bob.join("lobby").await;

    ann.say("lobby", "a-1", "from QUIC on a").await;
    let m = bob.message("from QUIC on a").await;
    assert_eq!(
        (m["sender"].clone(), m["seq"].clone()),
        (json!("ann"), json!("1"))
    );
    ann.message("from QUIC on a").await;
    bob.say("lobby", "b-1", "from TCP on b").await;
    assert_eq!(ann.message("from TCP on b").await["seq"], json!("2"));
    bob.message("from TCP on b").await;

    // ann's session on `a` is lost with its transport; bob goes on.
    let (session, seen) = (ann.session_id.clone(), ann.last_pos);
    ann.vanish();
    for (cmid, body) in [("b-2", "m3"), ("b-3", "m4")] {
        bob.say("lobby", cmid, body).await;
        bob.message(body).await;
    }

    let mut ann = Peer::wt(&b, &certs, "enc=proto").await;
    let c = ann
        .connect(
            json!({"token": b.token("ann"), "sessionId": session, "lastPos": seen.to_string()}),
        )
        .await;
    // proto3 JSON leaves a false `resumed` out.
    assert_ne!(c["resumed"], json!(true), "{c}");
    assert_ne!(
        ann.session_id, session,
        "a new session on the other instance"
    );
    let lobby = c["rooms"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["room"] == "lobby"))
        .unwrap_or_else(|| panic!("lobby among the rooms: {c}"));
    assert_eq!(lobby["lastSeq"], json!("4"), "{c}");
    let sync = ann
        .request(json!({"sync": {"rooms": {"lobby": "2"}}}))
        .await;
    let got: Vec<Value> = sync["sync"]["rooms"][0]["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("a sync page: {sync}"))
        .iter()
        .map(|m| json!([m["seq"], m["body"]]))
        .collect();
    assert_eq!(got, vec![json!(["3", "m3"]), json!(["4", "m4"])], "{sync}");

    // Live again, now on `b`, from a user on `b` and from one on `a`.
    bob.say("lobby", "b-4", "m5").await;
    bob.message("m5").await;
    assert_eq!(ann.message("m5").await["seq"], json!("5"));
    let mut cy = Peer::ws(&a, &certs).await;
    cy.connect(json!({"token": a.token("cy")})).await;
    cy.join("lobby").await;
    cy.say("lobby", "c-1", "m6 from a").await;
    assert_eq!(ann.message("m6 from a").await["seq"], json!("6"));
    assert_eq!(bob.message("m6 from a").await["seq"], json!("6"));
}

#[tokio::test]
async fn sse_long_poll_and_commands_over_http3() {
    let certs = make_certs("sse");
    let t = tls_server(&certs, |_| {}).await;
    let auth = format!("Bearer {}", t.token("ann"));
    let mut h3 = H3::connect(&t, &certs).await;

    // SSE: a stream and the commands for its session multiplexed on one connection.
    let (response, stream) = h3
        .start("GET", "/sse", &[("authorization", &auth)], "")
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut sse = H3Sse {
        stream,
        text: String::new(),
    };
    let (_, connected) = sse.next_data().await;
    let session = connected["connected"]["sessionId"]
        .as_str()
        .unwrap()
        .to_string();
    let join = json!({"id": "2", "join": {"room": "lobby"}}).to_string();
    let path = format!("/session/{session}");
    let json_auth = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let (status, _, body) = h3.request("POST", &path, &json_auth, &join).await;
    assert_eq!(status, 200, "{body:?}");
    let (id, joined) = sse.next_data().await;
    assert_eq!(id, Some(1));
    assert_eq!(joined["membership"]["action"], "joined");
    let mut bob = Peer::wt(&t, &certs, "enc=json").await;
    bob.connect(json!({"token": t.token("bob")})).await;
    bob.join("lobby").await;
    bob.say("lobby", "b-1", "to sse").await;
    loop {
        let (id, f) = sse.next_data().await;
        if f["message"]["body"] == "to sse" {
            assert!(id.unwrap() > 1);
            break;
        }
    }

    // Long-poll: POST /session, then GET /poll held until the message comes.
    let connect = json!({"id": "1", "connect": {}}).to_string();
    let (status, _, body) = h3.request("POST", "/session", &json_auth, &connect).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    let polled = v["connected"]["sessionId"].as_str().unwrap().to_string();
    let (status, _, _) = h3
        .request("POST", &format!("/session/{polled}"), &json_auth, &join)
        .await;
    assert_eq!(status, 200);
    // ann is in the lobby already (her SSE session joined it): nothing to poll yet.
    let (status, headers, body) = h3
        .request(
            "GET",
            &format!("/poll?session_id={polled}&cursor=0&wait=0"),
            &json_auth,
            "",
        )
        .await;
    assert_eq!((status, &body[..]), (200, &b"[]"[..]));
    let cursor = headers["x-parley-cursor"].to_str().unwrap().to_string();
    let poll = format!("/poll?session_id={polled}&cursor={cursor}&wait=5");
    let pending = {
        let mut h3b = H3::connect(&t, &certs).await;
        let auth = auth.clone();
        tokio::spawn(async move {
            h3b.request("GET", &poll, &[("authorization", auth.as_str())], "")
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    bob.say("lobby", "b-2", "to poll").await;
    let (status, _, body) = pending.await.unwrap();
    assert_eq!(status, 200);
    let frames: Vec<Value> = serde_json::from_slice(&body).unwrap();
    assert!(
        frames.iter().any(|f| f["message"]["body"] == "to poll"),
        "{frames:?}"
    );
}

#[tokio::test]
async fn typing_rides_datagrams_when_asked_and_messages_stay_on_the_stream() {
    let certs = make_certs("dgram");
    let t = tls_server(&certs, |_| {}).await;
    let mut ann = Peer::wt(&t, &certs, "enc=json&datagrams=1").await;
    ann.connect(json!({"token": t.token("ann")})).await;
    ann.join("lobby").await;
    let mut bob = Peer::ws(&t, &certs).await;
    bob.connect(json!({"token": t.token("bob")})).await;
    bob.join("lobby").await;
    let r = bob.request(json!({"typing": {"room": "lobby"}})).await;
    assert!(r.get("done").is_some(), "{r}");
    let Wire::Wt { conn, .. } = &ann.wire else {
        unreachable!()
    };
    let datagram = tokio::time::timeout(WAIT, conn.receive_datagram())
        .await
        .expect("a datagram in time")
        .unwrap();
    let typing: Value = serde_json::from_slice(&datagram.payload()).unwrap();
    assert_eq!(typing["typing"]["user"], "bob");
    assert!(typing.get("pos").is_none(), "datagrams carry no position");

    // A message stays on the stream; its position skips the typing push's.
    bob.say("lobby", "b-1", "reliable").await;
    let m = loop {
        let f = ann.read().await.unwrap();
        assert!(f.get("typing").is_none(), "typing went as a datagram");
        if f["message"]["body"] == "reliable" {
            break f;
        }
    };
    assert!(m["pos"].is_string());
}

#[tokio::test]
async fn a_session_without_a_stream_is_closed_at_the_connect_deadline() {
    let certs = make_certs("deadline");
    let t = tls_server(&certs, |c| {
        c.auth.connect_timeout = Duration::from_millis(300);
    })
    .await;
    let conn = open_wt(&t, &certs, "").await;
    let start = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(3), conn.closed())
        .await
        .expect("closed by the server");
    assert!(start.elapsed() >= Duration::from_millis(250));
    // A stream but no connect frame: a disconnect 4002, then the end.
    let mut ann = Peer::wt(&t, &certs, "enc=json").await;
    let f = ann.read().await.expect("an error frame");
    assert_eq!(f["error"]["code"], "ERROR_CODE_AUTH_TIMEOUT", "{f}");
    let f = ann.read().await.expect("the disconnect frame");
    assert_eq!(f["disconnect"]["code"], 4002, "{f}");
    assert!(ann.read().await.is_none());
}

#[tokio::test]
async fn webtransport_from_a_foreign_origin_is_refused() {
    let certs = make_certs("origin");
    let t = tls_server(&certs, |_| {}).await;
    let config = wtransport::ClientConfig::builder()
        .with_bind_address("127.0.0.1:0".parse().unwrap())
        .with_custom_tls(client_tls(&certs, &[b"h3"], true))
        .build();
    let endpoint = wtransport::Endpoint::client(config).unwrap();
    let url = format!("https://127.0.0.1:{}/wt", h3_addr(&t).port());
    let options = wtransport::endpoint::ConnectOptions::builder(url)
        .add_header("origin", "https://evil.example")
        .build();
    let r = tokio::time::timeout(WAIT, endpoint.connect(options))
        .await
        .expect("an answer in time");
    assert!(r.is_err(), "a foreign origin gets no session");
}

#[tokio::test]
async fn shutdown_tells_webtransport_sessions_to_reconnect() {
    let certs = make_certs("shutdown");
    let t = tls_server(&certs, |_| {}).await;
    let mut ann = Peer::wt(&t, &certs, "enc=json").await;
    ann.connect(json!({"token": t.token("ann")})).await;
    t.server.shutdown();
    let f = loop {
        let f = ann.read().await.expect("the disconnect frame");
        if f.get("disconnect").is_some() {
            break f;
        }
    };
    assert_eq!(f["disconnect"]["code"], 1001, "{f}");
    assert_eq!(f["disconnect"]["reconnect"], true, "{f}");
    assert!(ann.read().await.is_none(), "then the stream ends");
}

// ---------------------------------------------------------------------------------------
// What a stranger's UDP packets can make the server hold, before any session: a QUIC
// handshake that stalls, admission, and the stateless Retry. A small UDP relay sits
// between a real quinn client and the server and decides what crosses.

/// A UDP relay to `server`: the client's datagrams cross while `forward` says so (it is
/// given how many crossed before), the server's always come back. Returns the relay's
/// address and the first byte of every datagram the server sent.
async fn relay(
    server: SocketAddr,
    forward: impl Fn(usize) -> bool + Send + 'static,
) -> (SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
        let (mut client, mut crossed) = (None, 0);
        loop {
            tokio::select! {
                r = front.recv_from(&mut up) => {
                    let Ok((n, from)) = r else { return };
                    client = Some(from);
                    if forward(crossed) {
                        crossed += 1;
                        let _ = back.send(&up[..n]).await;
                    }
                }
                r = back.recv(&mut down) => {
                    let Ok(n) = r else { return };
                    seen2.lock().unwrap().push(down[0]);
                    if let Some(c) = client {
                        let _ = front.send_to(&down[..n], c).await;
                    }
                }
            }
        }
    });
    (addr, seen)
}

/// A QUIC client endpoint trusting the test certificate (ALPN h3).
fn quic_client(certs: &Certs) -> quinn::Endpoint {
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls(certs, &[b"h3"], true))
            .unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

/// A QUIC v1 long-header packet's type: 0 Initial, 1 0-RTT, 2 Handshake, 3 Retry.
fn long_header_type(first: u8) -> Option<u8> {
    (first & 0x80 != 0).then_some((first >> 4) & 0x3)
}

#[tokio::test]
async fn a_stalled_quic_handshake_holds_its_slot_only_until_the_handshake_deadline() {
    let certs = make_certs("stall");
    let t = tls_server(&certs, |c| {
        c.limits.max_connections = 1;
        c.server.tls_handshake_timeout = Duration::from_millis(600);
    })
    .await;
    let server = h3_addr(&t);
    // The stranger: its first Initial reaches the server, nothing after it does, so the
    // server's handshake waits for a client that never answers.
    let (hole, _) = relay(server, |crossed| crossed == 0).await;
    let stranger = quic_client(&certs);
    let stalled = stranger.connect(hole, "localhost").unwrap();
    let start = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(150)).await;

    // The only slot is taken: a real client is refused at once.
    let client = quic_client(&certs);
    let refused = tokio::time::timeout(WAIT, client.connect(server, "localhost").unwrap())
        .await
        .expect("an answer in time");
    match refused {
        Err(quinn::ConnectionError::ConnectionClosed(close)) => {
            assert_eq!(
                close.error_code,
                quinn::TransportErrorCode::CONNECTION_REFUSED
            )
        }
        other => panic!("expected CONNECTION_REFUSED, got {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_millis(600),
        "refused while the stalled handshake held the slot"
    );

    // After the deadline the slot is free again.
    tokio::time::sleep_until(start + Duration::from_millis(900)).await;
    let quic = tokio::time::timeout(WAIT, client.connect(server, "localhost").unwrap())
        .await
        .expect("handshake in time")
        .expect("admitted once the stalled handshake was dropped");
    quic.close(0u32.into(), b"done");
    drop(stalled);
}

#[tokio::test]
async fn quic_admission_refuses_past_the_per_ip_limit() {
    let certs = make_certs("per-ip");
    let t = tls_server(&certs, |c| c.limits.max_connections_per_ip = 1).await;
    let server = h3_addr(&t);
    let client = quic_client(&certs);
    let first = tokio::time::timeout(WAIT, client.connect(server, "localhost").unwrap())
        .await
        .unwrap()
        .expect("the first connection is admitted");
    let second = tokio::time::timeout(WAIT, client.connect(server, "localhost").unwrap())
        .await
        .unwrap();
    match second {
        Err(quinn::ConnectionError::ConnectionClosed(close)) => {
            assert_eq!(
                close.error_code,
                quinn::TransportErrorCode::CONNECTION_REFUSED
            )
        }
        other => panic!("expected CONNECTION_REFUSED, got {other:?}"),
    }
    // Closing the first gives its slot back.
    first.close(0u32.into(), b"done");
    drop(first);
    let mut admitted = None;
    for _ in 0..50 {
        if let Ok(Ok(c)) =
            tokio::time::timeout(WAIT, client.connect(server, "localhost").unwrap()).await
        {
            admitted = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted.is_some(), "a slot given back is admitted again");
}

#[tokio::test]
async fn the_server_asks_for_a_retry_above_the_handshake_threshold() {
    let certs = make_certs("retry");
    // Threshold 0: every handshake from an unvalidated address needs a Retry first.
    let t = tls_server(&certs, |c| c.http3.retry_above_handshakes = 0).await;
    let (via, seen) = relay(h3_addr(&t), |_| true).await;
    let client = quic_client(&certs);
    let quic = tokio::time::timeout(WAIT, client.connect(via, "localhost").unwrap())
        .await
        .expect("handshake in time")
        .expect("a client that echoes the Retry token is served");
    let first = seen.lock().unwrap()[0];
    assert_eq!(
        long_header_type(first),
        Some(3),
        "the first answer is a Retry"
    );
    quic.close(0u32.into(), b"done");

    // Under the threshold (the default, 64) the server answers with its Initial.
    let t = tls_server(&certs, |_| {}).await;
    let (via, seen) = relay(h3_addr(&t), |_| true).await;
    let quic = tokio::time::timeout(WAIT, client.connect(via, "localhost").unwrap())
        .await
        .unwrap()
        .unwrap();
    let first = seen.lock().unwrap()[0];
    assert_eq!(
        long_header_type(first),
        Some(0),
        "no Retry below the threshold"
    );
    quic.close(0u32.into(), b"done");
}
