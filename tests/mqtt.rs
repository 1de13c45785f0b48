//! MQTT 3.1.1 and 5.0 on the same sessions as `/ws`: over WebSocket at `/mqtt`, and on the
//! plain TCP (or TLS) listener `[mqtt] listen`. Real device clients (Python `paho-mqtt`, npm
//! `mqtt` = MQTT.js) chat with a parley WebSocket client; raw packets (built with the codec
//! crate, sent over tokio-tungstenite or a bare socket) check refusals, limits and
//! idempotence; MQTT.js publishing at QoS 1 into a `kill -9` loses nothing acked.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{TestServer, WAIT, http_request};
use futures_util::{SinkExt, StreamExt};
use mqtt_proto::{
    Pid, QoS, QosPid, TopicFilter, TopicName,
    v3::{Connect, ConnectReturnCode, Packet, Publish, Subscribe, SubscribeReturnCode},
    v5,
};
use parley::{codec::Encoding, proto::client_frame::Cmd};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest, http::HeaderValue},
};

/// The Python with `paho-mqtt`: `PARLEY_TEST_MQTT_PYTHON`, else the venv scripts/test
/// makes under target/.
fn mqtt_python() -> PathBuf {
    if let Ok(p) = std::env::var("PARLEY_TEST_MQTT_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/mqtt-venv/bin/python");
    assert!(
        venv.exists(),
        "the MQTT tests need Python `paho-mqtt` from PyPI: run scripts/test (it installs \
         it into target/mqtt-venv), or pip install it and set PARLEY_TEST_MQTT_PYTHON to \
         that python"
    );
    venv
}

/// tests/mqttjs (MQTT.js), as scripts/test installs it: `node` and its node_modules.
fn mqttjs() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mqttjs");
    assert!(
        dir.join("node_modules/mqtt").exists(),
        "the MQTT.js tests need npm `mqtt`: run scripts/test (it runs `npm ci` in \
         tests/mqttjs), or run `npm ci` there yourself"
    );
    dir.join("client.mjs")
}

/// A device client running one scenario (tests/python/mqtt_client.py or
/// tests/mqttjs/client.mjs): its JSON lines as they come.
struct Device {
    lines: tokio::sync::mpsc::UnboundedReceiver<Value>,
    child: std::process::Child,
}

impl Device {
    /// paho-mqtt over WebSocket at `/mqtt`.
    fn start(t: &TestServer, scenario: &str, token: &str, username: Option<&str>) -> Device {
        Self::paho(t.addr(), false, scenario, token, username)
    }

    /// paho-mqtt speaking MQTT 5 over WebSocket at `/mqtt`.
    fn paho5(t: &TestServer, scenario: &str, token: &str, username: Option<&str>) -> Device {
        Self::paho_as(t.addr(), false, true, scenario, token, username)
    }

    /// paho-mqtt at `addr`: `/mqtt` there, or plain MQTT/TCP when `tcp`.
    fn paho(
        addr: std::net::SocketAddr,
        tcp: bool,
        scenario: &str,
        token: &str,
        username: Option<&str>,
    ) -> Device {
        Self::paho_as(addr, tcp, false, scenario, token, username)
    }

    /// paho-mqtt at `addr`, MQTT 5 when `v5` (else 3.1.1).
    fn paho_as(
        addr: std::net::SocketAddr,
        tcp: bool,
        v5: bool,
        scenario: &str,
        token: &str,
        username: Option<&str>,
    ) -> Device {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/mqtt_client.py");
        let mut cmd = Command::new(mqtt_python());
        cmd.arg(script)
            .args([scenario, &addr.ip().to_string(), &addr.port().to_string()])
            .arg(token);
        if let Some(u) = username {
            cmd.arg(u);
        }
        if tcp {
            cmd.env("MQTT_TRANSPORT", "tcp");
        }
        if v5 {
            cmd.env("MQTT_PROTOCOL", "5");
        }
        Self::spawn(cmd)
    }

    /// MQTT.js at `url` (`ws://…/mqtt` or `mqtt://…`).
    fn mqttjs(url: &str, scenario: &str, token: &str, username: &str) -> Device {
        Self::mqttjs_as(url, false, scenario, token, username)
    }

    /// MQTT.js at `url`, MQTT 5 when `v5` (else 3.1.1).
    fn mqttjs_as(url: &str, v5: bool, scenario: &str, token: &str, username: &str) -> Device {
        let mut cmd = Command::new("node");
        cmd.arg(mqttjs()).args([scenario, url, token, username]);
        if v5 {
            cmd.env("MQTT_PROTOCOL", "5");
        }
        Self::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Device {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the device client runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str(&line) {
                    Ok(v) => {
                        let _ = tx.send(v);
                    }
                    Err(_) => eprintln!("python: {line}"),
                }
            }
        });
        Device { lines, child }
    }

    async fn line(&mut self) -> Value {
        tokio::time::timeout(Duration::from_secs(15), self.lines.recv())
            .await
            .expect("the device reports in time")
            .expect("the device exited early (see its stderr above)")
    }

    fn finish(mut self) {
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the device script failed: {status}");
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Only when the test failed before `finish`: never leave the process behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_paho_device_and_a_websocket_client_chat_both_ways() {
    let t = TestServer::start().await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;

    let mut device = Device::start(&t, "chat", &t.token("sensor-1"), Some("sensor-1"));
    let ready = device.line().await;
    assert_eq!(ready["suback"], serde_json::json!([1]), "{ready}");

    let sent = alice.send_msg("lobby", "m1", "hello device").await;
    // The device's publish reaches alice exactly once, after her own message.
    assert_eq!(alice.next_message().await.body, "hello device");
    let from_device = alice.next_message().await;
    assert_eq!(from_device.body, "from-device");
    assert_eq!(from_device.sender, "sensor-1");
    assert_eq!(from_device.seq, sent.seq + 1);
    no_more_messages(&mut alice).await;

    let summary = device.line().await;
    assert_eq!(
        summary["received"],
        serde_json::json!({"topic": "rooms/lobby", "payload": "hello device", "qos": 1}),
        "{summary}"
    );
    assert_eq!(summary["acked"], true, "{summary}");
    device.finish();

    let (_, metrics) = t.http_get("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("transport=\"mqtt\"") && l.starts_with("parley_frames_in")),
        "mqtt frames are counted:\n{metrics}"
    );
}

#[tokio::test]
async fn connect_without_a_valid_token_is_refused_with_its_code() {
    let t = TestServer::start().await;
    // paho reports 3.1.1 CONNACK codes as MQTT 5 reason codes: 4 (bad user name or
    // password) as 134, 5 (not authorized) as 135. MQTT 3.1.1 sends a password only
    // with a username, so paho without a username sends no token at all.
    let cases = [
        ("not-a-jwt".to_string(), Some("sensor-1"), 134),
        (t.expired_token("sensor-1"), Some("sensor-1"), 134),
        (t.token("sensor-1"), Some("someone-else"), 134),
        (t.token("sensor-1"), None, 135),
    ];
    for (token, username, code) in cases {
        let mut device = Device::start(&t, "connect", &token, username);
        let report = device.line().await;
        assert_eq!(report["connack"], code, "{report}");
        device.finish();
    }
    // No password at all: not authorized (raw, paho always sends one with a username).
    let mut raw = Raw::open(&t).await;
    raw.send(&Packet::Connect(Connect::new("d".into(), 30)))
        .await;
    match raw.next().await {
        Some(Packet::Connack(c)) => assert_eq!(c.code, ConnectReturnCode::NotAuthorized),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert_eq!(raw.next().await, None, "closed after the refusal");
    // The right token with a matching username is accepted.
    let mut device = Device::start(&t, "connect", &t.token("sensor-1"), Some("sensor-1"));
    assert_eq!(device.line().await["connack"], 0);
    device.finish();
}

/// A byte stream to the plain MQTT listener (TCP or TLS).
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// What a raw client's packets travel in.
enum RawIo {
    Ws(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
    Stream(Box<dyn Stream>),
}

/// A raw MQTT client over tokio-tungstenite, or over a bare stream.
struct Raw {
    io: RawIo,
    buf: Vec<u8>,
    close_code: Option<u16>,
}

impl Raw {
    /// Over a bare stream (the `[mqtt] listen` listener).
    fn on(stream: impl Stream + 'static) -> Raw {
        Raw {
            io: RawIo::Stream(Box::new(stream)),
            buf: Vec::new(),
            close_code: None,
        }
    }

    /// Connected over TCP to `addr` as `user`, CONNECTed with keep-alive `keep_alive`.
    async fn tcp_connected(
        t: &TestServer,
        addr: std::net::SocketAddr,
        user: &str,
        keep_alive: u16,
    ) -> Raw {
        let mut raw = Raw::on(TcpStream::connect(addr).await.unwrap());
        raw.connect(t, user, keep_alive).await;
        raw
    }

    async fn connect(&mut self, t: &TestServer, user: &str, keep_alive: u16) {
        let mut connect = Connect::new(user.into(), keep_alive);
        connect.password = Some(t.token(user).into_bytes().into());
        self.send(&Packet::Connect(connect)).await;
        match self.next().await {
            Some(Packet::Connack(c)) => assert_eq!(c.code, ConnectReturnCode::Accepted),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn open(t: &TestServer) -> Raw {
        let mut req = format!("ws://{}/mqtt", t.addr())
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
        let (ws, resp) = tokio_tungstenite::connect_async(req)
            .await
            .expect("upgrade");
        assert_eq!(resp.headers()["sec-websocket-protocol"], "mqtt");
        Raw {
            io: RawIo::Ws(Box::new(ws)),
            buf: Vec::new(),
            close_code: None,
        }
    }

    /// Opened and CONNECTed as `user` (keep-alive `keep_alive` seconds).
    async fn connected(t: &TestServer, user: &str, keep_alive: u16) -> Raw {
        let mut raw = Raw::open(t).await;
        raw.connect(t, user, keep_alive).await;
        raw
    }

    /// The WebSocket under a `/mqtt` client.
    fn ws(&mut self) -> &mut WebSocketStream<MaybeTlsStream<TcpStream>> {
        match &mut self.io {
            RawIo::Ws(ws) => ws,
            RawIo::Stream(_) => panic!("not a WebSocket client"),
        }
    }

    async fn send(&mut self, p: &Packet) {
        self.send_bytes(p.encode().unwrap().as_ref().to_vec()).await;
    }

    async fn send_bytes(&mut self, bytes: Vec<u8>) {
        match &mut self.io {
            RawIo::Ws(ws) => ws.send(Message::Binary(bytes.into())).await.unwrap(),
            RawIo::Stream(s) => {
                use tokio::io::AsyncWriteExt;
                s.write_all(&bytes).await.unwrap();
            }
        }
    }

    /// The next packet; `None` once the server closed.
    async fn next(&mut self) -> Option<Packet> {
        loop {
            if !self.buf.is_empty()
                && let Some(p) = Packet::decode(&self.buf).expect("the server's packet decodes")
            {
                let len = p.encode_len().unwrap();
                self.buf.drain(..len);
                return Some(p);
            }
            if !self.more().await {
                return None;
            }
        }
    }

    /// The next MQTT 5 packet; `None` once the server closed.
    async fn next5(&mut self) -> Option<v5::Packet> {
        loop {
            if !self.buf.is_empty()
                && let Some(p) = v5::Packet::decode(&self.buf).expect("the server's packet decodes")
            {
                let len = p.encode_len().unwrap();
                self.buf.drain(..len);
                return Some(p);
            }
            if !self.more().await {
                return None;
            }
        }
    }

    async fn send5(&mut self, p: v5::Packet) {
        self.send_bytes(p.encode().unwrap().as_ref().to_vec()).await;
    }

    /// Reads more bytes into the buffer: `false` once the server closed.
    async fn more(&mut self) -> bool {
        let ws = match &mut self.io {
            RawIo::Ws(ws) => ws,
            RawIo::Stream(s) => {
                use tokio::io::AsyncReadExt;
                let mut chunk = [0u8; 4096];
                let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
                    .await
                    .expect("a packet or the close in time");
                return match n {
                    Ok(0) | Err(_) => false,
                    Ok(n) => {
                        self.buf.extend_from_slice(&chunk[..n]);
                        true
                    }
                };
            }
        };
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a packet or the close in time");
        match msg {
            Some(Ok(Message::Binary(b))) => {
                self.buf.extend_from_slice(&b);
                true
            }
            Some(Ok(Message::Close(f))) => {
                self.close_code = f.map(|f| u16::from(f.code));
                false
            }
            Some(Ok(_)) => true,
            Some(Err(_)) | None => false,
        }
    }

    async fn subscribe(&mut self, pid: u16, filters: &[&str]) -> Vec<SubscribeReturnCode> {
        let topics = filters
            .iter()
            .map(|f| (TopicFilter::try_from(*f).unwrap(), QoS::Level1))
            .collect();
        let pid = Pid::try_from(pid).unwrap();
        self.send(&Packet::Subscribe(Subscribe::new(pid, topics)))
            .await;
        match self.next().await {
            Some(Packet::Suback(s)) => {
                assert_eq!(s.pid, pid);
                s.topics
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

/// No message reached `c` within a moment (membership and presence pushes may).
async fn no_more_messages(c: &mut common::Client) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.probe().await;
    let messages: Vec<_> = c
        .inbox
        .iter()
        .filter(|f| matches!(f.kind, Some(parley::proto::server_frame::Kind::Message(_))))
        .collect();
    assert!(messages.is_empty(), "unexpected messages: {messages:?}");
}

fn publish(pid: u16, topic: &str, body: &str, dup: bool) -> Packet {
    let mut p = Publish::new(
        QosPid::Level1(Pid::try_from(pid).unwrap()),
        TopicName::try_from(topic).unwrap(),
        body.as_bytes().to_vec().into(),
    );
    p.dup = dup;
    Packet::Publish(p)
}

#[tokio::test]
async fn topics_parley_does_not_publish_are_refused_in_the_suback() {
    let t = TestServer::start().await;
    let mut raw = Raw::connected(&t, "sensor-1", 30).await;
    let codes = raw
        .subscribe(
            1,
            &[
                "rooms/#",
                "rooms/lobby",
                "#",
                "rooms/+",
                "dm/bob",
                "elsewhere",
                "$SYS/#",
            ],
        )
        .await;
    use SubscribeReturnCode::{Failure, MaxLevel1};
    assert_eq!(
        codes,
        [
            MaxLevel1, MaxLevel1, MaxLevel1, MaxLevel1, MaxLevel1, Failure, Failure
        ]
    );
    // Still connected: PINGREQ → PINGRESP.
    raw.send(&Packet::Pingreq).await;
    assert_eq!(raw.next().await, Some(Packet::Pingresp));
}

#[tokio::test]
async fn connect_and_subscribe_in_one_websocket_message() {
    let t = TestServer::start().await;
    let mut raw = Raw::open(&t).await;
    let mut connect = Connect::new("d".into(), 30);
    connect.username = Some("sensor-1".into());
    connect.password = Some(t.token("sensor-1").into_bytes().into());
    let mut bytes = Packet::Connect(connect).encode().unwrap().as_ref().to_vec();
    let topics = vec![(TopicFilter::try_from("rooms/lobby").unwrap(), QoS::Level0)];
    let subscribe = Packet::Subscribe(Subscribe::new(Pid::try_from(3).unwrap(), topics));
    bytes.extend_from_slice(subscribe.encode().unwrap().as_ref());
    raw.send_bytes(bytes).await;
    assert!(matches!(raw.next().await, Some(Packet::Connack(_))));
    match raw.next().await {
        Some(Packet::Suback(s)) => assert_eq!(s.topics, [SubscribeReturnCode::MaxLevel0]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn a_retried_qos1_publish_is_sent_once_and_a_reused_packet_id_is_a_new_message() {
    let t = TestServer::start().await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;
    let mut raw = Raw::connected(&t, "sensor-1", 30).await;
    raw.subscribe(1, &["rooms/lobby"]).await;

    // The first PUBLISH and its DUP retry in one WebSocket message, split mid-packet
    // across a second one (a packet may span messages).
    let mut bytes = publish(7, "rooms/lobby", "once", false)
        .encode()
        .unwrap()
        .as_ref()
        .to_vec();
    bytes.extend_from_slice(
        publish(7, "rooms/lobby", "once", true)
            .encode()
            .unwrap()
            .as_ref(),
    );
    let tail = bytes.split_off(bytes.len() - 3);
    raw.send_bytes(bytes).await;
    raw.send_bytes(tail).await;

    let mut pubacks = 0;
    let mut echoes = 0;
    while pubacks == 0 || echoes == 0 {
        match raw.next().await.expect("open") {
            Packet::Puback(pid) => {
                assert_eq!(pid.value(), 7);
                pubacks += 1;
            }
            Packet::Publish(p) => {
                assert_eq!(&*p.topic_name, "rooms/lobby");
                assert_eq!(&p.payload[..], b"once");
                echoes += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(alice.next_message().await.body, "once");
    // The packet id again after its PUBACK: a new message.
    raw.send(&publish(7, "rooms/lobby", "twice", false)).await;
    assert_eq!(alice.next_message().await.body, "twice");
    no_more_messages(&mut alice).await;
}

#[tokio::test]
async fn malformed_and_oversize_packets_close_only_their_connection() {
    let t = TestServer::start_with(|c| c.mqtt.max_packet_bytes = 1024).await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;
    let mut good = Raw::connected(&t, "sensor-1", 30).await;
    good.subscribe(1, &["rooms/lobby"]).await;

    // A reserved packet type after CONNECT.
    let mut bad = Raw::connected(&t, "sensor-2", 30).await;
    bad.send_bytes(vec![0xf0, 0x00]).await;
    assert_eq!(bad.next().await, None);
    assert_eq!(bad.close_code, Some(1002));

    // Garbage instead of a CONNECT.
    let mut bad = Raw::open(&t).await;
    bad.send_bytes(vec![0x10, 0x03, 0xde, 0xad, 0xbe]).await;
    assert_eq!(bad.next().await, None);

    // A declared length over the limit closes before the bytes arrive.
    let mut big = Raw::connected(&t, "sensor-3", 30).await;
    big.send_bytes(vec![0x30, 0xff, 0xff, 0x03]).await;
    assert_eq!(big.next().await, None);
    assert_eq!(big.close_code, Some(1009));

    // A text message is not MQTT.
    let mut text = Raw::connected(&t, "sensor-4", 30).await;
    text.ws().send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(text.next().await, None);

    // Publishing outside rooms/{room}: 3.1.1 cannot refuse it with a code, so it closes.
    let mut stray = Raw::connected(&t, "sensor-5", 30).await;
    stray.send(&publish(1, "elsewhere", "x", false)).await;
    assert_eq!(stray.next().await, None);

    // The good device never noticed.
    alice.send_msg("lobby", "m1", "still here").await;
    match good.next().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"still here"),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[tokio::test]
async fn silence_past_one_and_a_half_keep_alives_closes() {
    let t = TestServer::start().await;
    let mut raw = Raw::connected(&t, "sensor-1", 1).await;
    let started = tokio::time::Instant::now();
    // WebSocket pings are answered by tungstenite only while it is read; read until the
    // close. The MQTT keep-alive wants packets, not pongs: pongs alone do not count.
    assert_eq!(raw.next().await, None);
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(1400) && after < Duration::from_secs(4),
        "closed after {after:?}"
    );
    assert_eq!(raw.close_code, Some(4009));
}

#[tokio::test]
async fn an_mqtt5_connect_without_a_valid_token_gets_its_reason_code() {
    let t = TestServer::start().await;
    let cases: [(Option<String>, Option<&str>, v5::ConnectReasonCode); 3] = [
        (None, None, v5::ConnectReasonCode::NotAuthorized),
        (
            Some("not-a-jwt".into()),
            None,
            v5::ConnectReasonCode::BadUserNameOrPassword,
        ),
        (
            Some(t.token("sensor-1")),
            Some("someone-else"),
            v5::ConnectReasonCode::BadUserNameOrPassword,
        ),
    ];
    for (token, username, code) in cases {
        let mut raw = Raw::open(&t).await;
        let mut connect = v5::Connect::new("d".into(), 30);
        connect.password = token.map(|t| t.into_bytes().into());
        connect.username = username.map(Into::into);
        raw.send5(v5::Packet::Connect(connect)).await;
        match raw.next5().await {
            Some(v5::Packet::Connack(c)) => {
                assert_eq!(c.reason_code, code);
                assert!(!c.session_present);
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
        assert!(raw.next5().await.is_none(), "closed after the refusal");
    }
}

/// What one unauthenticated socket can hold: an upgraded /mqtt or a plain TCP connection
/// to `[mqtt] listen` that never sends CONNECT is closed at `auth.connect_timeout`, and
/// one that sends half a packet is closed too.
#[tokio::test]
async fn a_socket_that_never_connects_is_closed_at_the_connect_deadline() {
    let (t, mqtt) = with_listener(|c| c.auth.connect_timeout = Duration::from_millis(500)).await;
    for (first, tcp) in [
        (None, false),
        (Some(vec![0x10u8, 0x7f]), false),
        (None, true),
        (Some(vec![0x10u8, 0x7f]), true),
    ] {
        let mut raw = if tcp {
            Raw::on(TcpStream::connect(mqtt).await.unwrap())
        } else {
            Raw::open(&t).await
        };
        if let Some(bytes) = first {
            raw.send_bytes(bytes).await;
        }
        let started = tokio::time::Instant::now();
        assert_eq!(raw.next().await, None, "no packet, only the close");
        let after = started.elapsed();
        assert!(after < Duration::from_secs(3), "closed after {after:?}");
    }
    // Another device is unaffected.
    let mut other = Raw::connected(&t, "sensor-2", 0).await;
    assert_eq!(
        other.subscribe(1, &["rooms/lobby"]).await,
        [SubscribeReturnCode::MaxLevel1]
    );
}

/// A test server with the plain MQTT listener on an ephemeral port, and that port.
async fn with_listener(edit: impl FnOnce(&mut parley::config::Config)) -> (TestServer, SocketAddr) {
    let t = TestServer::start_with(|c| {
        c.mqtt.listen = Some("127.0.0.1:0".parse().unwrap());
        edit(c);
    })
    .await;
    let addr = t.server.mqtt_addr().expect("[mqtt] listen is set");
    (t, addr)
}

#[tokio::test]
async fn a_paho_device_on_the_plain_tcp_listener_chats_both_ways() {
    // Off by default.
    let t = TestServer::start().await;
    assert_eq!(t.server.mqtt_addr(), None);
    drop(t);

    let (t, mqtt) = with_listener(|_| {}).await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;
    let mut device = Device::paho(mqtt, true, "chat", &t.token("sensor-1"), Some("sensor-1"));
    let ready = device.line().await;
    assert_eq!(ready["suback"], serde_json::json!([1]), "{ready}");

    let sent = alice.send_msg("lobby", "m1", "hello tcp device").await;
    assert_eq!(alice.next_message().await.body, "hello tcp device");
    let from_device = alice.next_message().await;
    assert_eq!(from_device.body, "from-device");
    assert_eq!(from_device.sender, "sensor-1");
    assert_eq!(from_device.seq, sent.seq + 1);
    no_more_messages(&mut alice).await;

    let summary = device.line().await;
    assert_eq!(
        summary["received"],
        serde_json::json!({"topic": "rooms/lobby", "payload": "hello tcp device", "qos": 1}),
        "{summary}"
    );
    assert_eq!(summary["acked"], true, "{summary}");
    device.finish();
}

#[tokio::test]
async fn mqttjs_chats_over_websocket_and_over_tcp() {
    let (t, mqtt) = with_listener(|_| {}).await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;
    let urls = [format!("ws://{}/mqtt", t.addr()), format!("mqtt://{mqtt}")];
    for (i, url) in urls.iter().enumerate() {
        let mut device = Device::mqttjs(url, "chat", &t.token("kiosk"), "kiosk");
        let ready = device.line().await;
        assert_eq!(ready["suback"], serde_json::json!([1]), "{url}: {ready}");
        let body = format!("hello mqttjs {i}");
        let sent = alice.send_msg("lobby", &format!("m{i}"), &body).await;
        assert_eq!(alice.next_message().await.body, body);
        let from_device = alice.next_message().await;
        assert_eq!(from_device.body, "from-mqttjs", "{url}");
        assert_eq!(from_device.sender, "kiosk");
        assert_eq!(from_device.seq, sent.seq + 1);
        no_more_messages(&mut alice).await;
        let summary = device.line().await;
        assert_eq!(
            summary["received"],
            serde_json::json!({"topic": "rooms/lobby", "payload": body, "qos": 1}),
            "{url}: {summary}"
        );
        device.finish();
    }
}

#[tokio::test]
async fn the_tcp_listener_refuses_and_limits_only_the_offending_connection() {
    let (t, mqtt) = with_listener(|c| c.mqtt.max_packet_bytes = 1024).await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;
    let mut good = Raw::tcp_connected(&t, mqtt, "sensor-1", 30).await;
    good.subscribe(1, &["rooms/lobby"]).await;

    // A bad token: CONNACK 4, then the connection ends.
    let mut bad = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    let mut connect = Connect::new("d".into(), 30);
    connect.username = Some("sensor-2".into());
    connect.password = Some(b"not-a-jwt".to_vec().into());
    bad.send(&Packet::Connect(connect)).await;
    match bad.next().await {
        Some(Packet::Connack(c)) => {
            assert_eq!(c.code, ConnectReturnCode::BadUserNameOrPassword)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert_eq!(bad.next().await, None);

    // Garbage instead of a CONNECT; a reserved packet type after one; a declared length
    // over the limit; a publish outside rooms/{room}: each closes its connection.
    let mut garbage = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    garbage.send_bytes(vec![0x10, 0x03, 0xde, 0xad, 0xbe]).await;
    assert_eq!(garbage.next().await, None);
    let mut reserved = Raw::tcp_connected(&t, mqtt, "sensor-3", 30).await;
    reserved.send_bytes(vec![0xf0, 0x00]).await;
    assert_eq!(reserved.next().await, None);
    let mut big = Raw::tcp_connected(&t, mqtt, "sensor-4", 30).await;
    big.send_bytes(vec![0x30, 0xff, 0xff, 0x03]).await;
    assert_eq!(big.next().await, None);
    let mut stray = Raw::tcp_connected(&t, mqtt, "sensor-5", 30).await;
    stray.send(&publish(1, "elsewhere", "x", false)).await;
    assert_eq!(stray.next().await, None);

    // Keep-alive: silence past 1.5 × 1 s ends the connection.
    let mut quiet = Raw::tcp_connected(&t, mqtt, "sensor-6", 1).await;
    let started = tokio::time::Instant::now();
    assert_eq!(quiet.next().await, None);
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(1400) && after < Duration::from_secs(4),
        "closed after {after:?}"
    );

    // The good device never noticed, and its QoS 1 publish is acked and delivered once.
    alice.send_msg("lobby", "m1", "still here").await;
    match good.next().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"still here"),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    assert_eq!(alice.next_message().await.body, "still here");
    good.send(&publish(9, "rooms/lobby", "from tcp", false))
        .await;
    let mut acked = false;
    while !acked {
        match good.next().await.expect("open") {
            Packet::Puback(pid) => acked = pid.value() == 9,
            Packet::Publish(p) => assert_eq!(&p.payload[..], b"from tcp"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(alice.next_message().await.body, "from tcp");
    no_more_messages(&mut alice).await;
}

#[tokio::test]
async fn the_mqtt_listener_speaks_tls_when_tls_is_configured() {
    use std::sync::Arc;
    use tokio_rustls::{
        TlsConnector,
        rustls::{ClientConfig, RootCertStore, pki_types::ServerName},
    };
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!("parley-mqtt-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, key.cert.pem()).unwrap();
    std::fs::write(&key_file, key.signing_key.serialize_pem()).unwrap();
    let (t, mqtt) = with_listener(|c| {
        c.tls.cert_file = Some(cert.to_str().unwrap().into());
        c.tls.key_file = Some(key_file.to_str().unwrap().into());
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);

    let mut roots = RootCertStore::empty();
    roots.add(key.cert.der().clone()).unwrap();
    let config = ClientConfig::builder_with_provider(parley::server::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(mqtt).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake on the MQTT listener");
    let mut device = Raw::on(tls);
    device.connect(&t, "sensor-1", 30).await;
    assert_eq!(
        device.subscribe(1, &["rooms/lobby"]).await,
        [SubscribeReturnCode::MaxLevel1]
    );
    device
        .send(&publish(1, "rooms/lobby", "over tls", false))
        .await;
    let mut got = (false, false);
    while got != (true, true) {
        match device.next().await.expect("open") {
            Packet::Puback(_) => got.0 = true,
            Packet::Publish(p) => {
                assert_eq!(&p.payload[..], b"over tls");
                got.1 = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    // Plain MQTT on the TLS port is not spoken: the handshake fails (a TLS alert at
    // most), no CONNACK in the clear.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut plain = TcpStream::connect(mqtt).await.unwrap();
    let mut connect = Connect::new("d".into(), 30);
    connect.password = Some(t.token("sensor-2").into_bytes().into());
    let bytes = Packet::Connect(connect).encode().unwrap();
    plain.write_all(bytes.as_ref()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut answer))
        .await
        .expect("closed in time");
    assert_ne!(answer.first(), Some(&0x20), "no CONNACK: {answer:?}");
}

/// The binary on the SQLite file `db` with the MQTT listener on: (process, HTTP address,
/// MQTT address).
fn start_binary(db: &Path) -> (Binary, SocketAddr, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args([
            "--config",
            "/nonexistent.toml",
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("PARLEY_STORE__PATH", db)
        .env("PARLEY_AUTH__JWT_SECRET", KILL_SECRET)
        .env("PARLEY_MQTT__LISTEN", "127.0.0.1:0")
        .env("PARLEY_LIMITS__SENDS_PER_SECOND", "0")
        .env("PARLEY_LIMITS__SENDS_BURST", "0")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut http, mut mqtt) = (None, None);
    while http.is_none() || mqtt.is_none() {
        let line = lines
            .next()
            .expect("the server logs its addresses")
            .unwrap();
        let Some(rest) = line.split("addr=").nth(1) else {
            continue;
        };
        let addr: SocketAddr = rest.split_whitespace().next().unwrap().parse().unwrap();
        if line.contains("listening for MQTT") {
            mqtt = Some(addr);
        } else if line.contains("listening") {
            http = Some(addr);
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (Binary(child), http.unwrap(), mqtt.unwrap())
}

const KILL_SECRET: &str = "mqtt-kill-secret";

/// A parley process, killed when dropped so a failing test leaves nothing running.
struct Binary(std::process::Child);

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kill_token(user: &str) -> String {
    let config = parley::config::AuthConfig {
        jwt_secret: KILL_SECRET.into(),
        ..Default::default()
    };
    parley::auth::Authenticator::new(&config)
        .unwrap()
        .mint(user, Duration::from_secs(600))
        .unwrap()
}

#[tokio::test]
async fn qos1_publishes_acked_before_a_kill_9_are_all_in_the_log_once() {
    let dir = std::env::temp_dir().join(format!("parley-mqtt-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("parley.db");

    let (mut server, _, mqtt) = start_binary(&db);
    let mut device = Device::mqttjs(
        &format!("mqtt://{mqtt}"),
        "flood",
        &kill_token("meter"),
        "meter",
    );
    assert_eq!(device.line().await["ready"], true);
    let mut acked = Vec::new();
    while acked.len() < 200 {
        let line = device.line().await;
        acked.push(line["acked"].as_str().expect("an ack").to_string());
    }
    server.0.kill().unwrap(); // SIGKILL: no shutdown path runs
    server.0.wait().unwrap();
    loop {
        let line = device.line().await;
        if line["lost"] == true {
            break;
        }
        acked.push(line["acked"].as_str().expect("an ack").to_string());
    }
    device.finish();

    let (_server, http, _) = start_binary(&db);
    let mut c = common::Client::open(http, Some(Encoding::Json)).await;
    c.connect(&kill_token("meter")).await;
    let mut log: Vec<String> = Vec::new();
    loop {
        let after = log.len() as u64;
        let sync = parley::proto::client_frame::Cmd::Sync(parley::proto::Sync {
            rooms: [("flood".to_string(), after)].into(),
            limit: 500,
        });
        let parley::proto::server_frame::Kind::Sync(s) = c.request(sync).await else {
            panic!("sync failed")
        };
        let page = s.rooms.into_iter().next().unwrap();
        for (i, m) in page.messages.iter().enumerate() {
            assert_eq!(m.seq, after + 1 + i as u64, "seqs without gaps");
        }
        log.extend(page.messages.into_iter().map(|m| m.body));
        if !page.more {
            break;
        }
    }
    let mut unique = log.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), log.len(), "no message stored twice");
    for body in &acked {
        assert!(log.contains(body), "acked {body} is in the log");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// CONNECTs `raw` as `user` with a will to `topic`; the CONNACK code, or `None` on close.
async fn connect_with_will(
    raw: &mut Raw,
    t: &TestServer,
    user: &str,
    topic: &str,
    will: &str,
) -> Option<ConnectReturnCode> {
    let mut connect = Connect::new(user.into(), 30);
    connect.username = Some(user.into());
    connect.password = Some(t.token(user).into_bytes().into());
    connect.last_will = Some(mqtt_proto::v3::LastWill {
        qos: QoS::Level1,
        retain: false,
        topic_name: TopicName::try_from(topic).unwrap(),
        message: will.as_bytes().to_vec().into(),
    });
    raw.send(&Packet::Connect(connect)).await;
    match raw.next().await {
        Some(Packet::Connack(c)) => Some(c.code),
        None => None,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn the_will_is_sent_when_a_device_drops_and_presence_goes_offline_at_once() {
    // A long grace period: presence going offline at once is the MQTT end, not the reaper.
    let (t, mqtt) = with_listener(|c| c.session.grace_period = Duration::from_secs(600)).await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;

    // Dropped without DISCONNECT: the will reaches the room, from the device's user.
    let mut device = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    let code = connect_with_will(&mut device, &t, "sensor-1", "rooms/lobby", "sensor-1 lost").await;
    assert_eq!(code, Some(ConnectReturnCode::Accepted));
    device.subscribe(1, &["rooms/lobby"]).await;
    drop(device);
    let will = alice.next_message().await;
    assert_eq!(
        (will.body.as_str(), will.sender.as_str()),
        ("sensor-1 lost", "sensor-1")
    );
    let p = alice.next_of(pushed!(Presence)).await;
    assert_eq!((p.user.as_str(), p.online), ("sensor-1", false));

    // A DISCONNECT first: no will, and offline all the same.
    let mut device = Raw::open(&t).await;
    let code = connect_with_will(&mut device, &t, "sensor-2", "rooms/lobby", "sensor-2 lost").await;
    assert_eq!(code, Some(ConnectReturnCode::Accepted));
    device.subscribe(1, &["rooms/lobby"]).await;
    device.send(&Packet::Disconnect).await;
    let p = alice.next_of(pushed!(Presence)).await;
    assert_eq!((p.user.as_str(), p.online), ("sensor-2", false));
    no_more_messages(&mut alice).await;

    // A will the server could never send is refused: closed, no CONNACK.
    let mut device = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    let code = connect_with_will(&mut device, &t, "sensor-3", "elsewhere", "x").await;
    assert_eq!(code, None);
}

/// CONNECTs `raw` as `user` with client id `client` and `clean_session`: the CONNACK's
/// session-present flag.
async fn connect_kept(
    raw: &mut Raw,
    t: &TestServer,
    user: &str,
    client: &str,
    clean: bool,
) -> bool {
    let mut connect = Connect::new(client.into(), 30);
    connect.clean_session = clean;
    connect.username = Some(user.into());
    connect.password = Some(t.token(user).into_bytes().into());
    raw.send(&Packet::Connect(connect)).await;
    match raw.next().await {
        Some(Packet::Connack(c)) => {
            assert_eq!(c.code, ConnectReturnCode::Accepted);
            c.session_present
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn a_kept_session_resumes_with_unacked_qos1_messages_sent_again_with_dup() {
    let (t, mqtt) = with_listener(|c| c.session.grace_period = Duration::from_secs(600)).await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;

    let mut device = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    assert!(!connect_kept(&mut device, &t, "sensor-1", "dev-1", false).await);
    device.subscribe(1, &["rooms/lobby"]).await;
    alice.send_msg("lobby", "m1", "one").await;
    let first = match device.next().await {
        Some(Packet::Publish(p)) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    assert_eq!((&first.payload[..], first.dup), (&b"one"[..], false));
    // Dropped before its PUBACK; a message comes while the device is away.
    drop(device);
    tokio::time::sleep(Duration::from_millis(200)).await;
    alice.send_msg("lobby", "m2", "two").await;

    let mut device = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    assert!(
        connect_kept(&mut device, &t, "sensor-1", "dev-1", false).await,
        "session present"
    );
    // No SUBSCRIBE: the subscription was kept. "one" again with DUP and its packet id,
    // then "two".
    let again = match device.next().await {
        Some(Packet::Publish(p)) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    assert_eq!((&again.payload[..], again.dup), (&b"one"[..], true));
    assert_eq!(again.qos_pid, first.qos_pid);
    device
        .send(&Packet::Puback(match again.qos_pid {
            QosPid::Level1(pid) => pid,
            _ => panic!("QoS 1"),
        }))
        .await;
    match device.next().await {
        Some(Packet::Publish(p)) => {
            assert_eq!((&p.payload[..], p.dup), (&b"two"[..], false));
            if let QosPid::Level1(pid) = p.qos_pid {
                device.send(&Packet::Puback(pid)).await;
            }
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    // What the device publishes on the resumed session is a new message, not taken for
    // an earlier one.
    device
        .send(&publish(1, "rooms/lobby", "from resumed", false))
        .await;
    loop {
        match device.next().await.expect("open") {
            Packet::Puback(_) => break,
            Packet::Publish(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(alice.next_message().await.body, "one");
    assert_eq!(alice.next_message().await.body, "two");
    assert_eq!(alice.next_message().await.body, "from resumed");
    // A DISCONNECT keeps it too; a clean session then discards it.
    device.send(&Packet::Disconnect).await;
    while let Some(p) = device.next().await {
        assert!(matches!(p, Packet::Publish(_)), "{p:?}");
    }
    let mut device = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    assert!(connect_kept(&mut device, &t, "sensor-1", "dev-1", false).await);
    drop(device);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut device = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    assert!(!connect_kept(&mut device, &t, "sensor-1", "dev-1", true).await);
    drop(device);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut device = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    assert!(!connect_kept(&mut device, &t, "sensor-1", "dev-1", false).await);

    // A kept session needs a client id.
    let mut anonymous = Raw::open(&t).await;
    let mut connect = Connect::new("".into(), 30);
    connect.clean_session = false;
    connect.password = Some(t.token("sensor-2").into_bytes().into());
    anonymous.send(&Packet::Connect(connect)).await;
    match anonymous.next().await {
        Some(Packet::Connack(c)) => assert_eq!(c.code, ConnectReturnCode::IdentifierRejected),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// The next PUBLISH on `raw` (PUBACKing it), skipping PUBACKs: (topic, payload, dup).
async fn next_publish(raw: &mut Raw) -> (String, String) {
    loop {
        match raw.next().await.expect("open") {
            Packet::Publish(p) => {
                if let QosPid::Level1(pid) = p.qos_pid {
                    raw.send(&Packet::Puback(pid)).await;
                }
                return (
                    p.topic_name.to_string(),
                    String::from_utf8(p.payload.to_vec()).unwrap(),
                );
            }
            Packet::Puback(_) => {}
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn dm_typing_presence_and_announcement_topics_with_wildcards() {
    let t = TestServer::start_with(|c| c.auth.admin_token = "root-token".into()).await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;
    let mut bob = t.client("bob", Encoding::Json).await;
    bob.join("lobby").await;
    let mut device = Raw::connected(&t, "sensor-1", 30).await;
    // rooms/lobby joins; rooms/# overlaps it (one PUBLISH per message, at the higher QoS).
    let filters = [
        "rooms/lobby",
        "rooms/#",
        "dm/+",
        "presence/+",
        "announcements",
    ];
    assert_eq!(device.subscribe(1, &filters).await.len(), 5);

    alice.send_msg("lobby", "m1", "room message").await;
    assert_eq!(
        next_publish(&mut device).await,
        ("rooms/lobby".into(), "room message".into())
    );
    alice
        .request(Cmd::Typing(parley::proto::Typing {
            room: "lobby".into(),
        }))
        .await;
    assert_eq!(
        next_publish(&mut device).await,
        ("rooms/lobby/typing".into(), "alice".into())
    );
    alice
        .request(Cmd::Send(parley::proto::Send {
            to_user: "sensor-1".into(),
            client_msg_id: "dm1".into(),
            body: "psst".into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(
        next_publish(&mut device).await,
        ("dm/alice".into(), "psst".into())
    );
    bob.ws.close(None).await.unwrap();
    assert_eq!(
        next_publish(&mut device).await,
        ("presence/bob".into(), "offline".into())
    );
    let announce = http_request(
        t.addr(),
        "POST",
        "/api/v1/announce",
        Some("root-token"),
        r#"{"body":"maintenance at noon"}"#,
    )
    .await;
    assert_eq!(announce.0, 202);
    assert_eq!(
        next_publish(&mut device).await,
        ("announcements".into(), "maintenance at noon".into())
    );

    // The device answers the DM, and types in the lobby.
    device
        .send(&publish(5, "dm/alice", "hello alice", false))
        .await;
    // (Past alice's own messages coming back to her.)
    let dm = loop {
        let m = alice.next_of(pushed!(Message)).await;
        if m.sender != "alice" {
            break m;
        }
    };
    assert_eq!(
        (dm.body.as_str(), dm.sender.as_str()),
        ("hello alice", "sensor-1")
    );
    assert_eq!(dm.room, "dm:alice:sensor-1");
    let typing = publish(6, "rooms/lobby/typing", "", false);
    device.send(&typing).await;
    let event = alice.next_of(pushed!(Typing)).await;
    assert_eq!(
        (event.room.as_str(), event.user.as_str()),
        ("lobby", "sensor-1")
    );
    let mut acks = Vec::new();
    while acks.len() < 2 {
        match device.next().await.expect("open") {
            Packet::Puback(pid) => acks.push(pid.value()),
            Packet::Publish(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    acks.sort();
    assert_eq!(acks, [5, 6]);
}

#[tokio::test]
async fn the_json_payload_option_sends_the_push_object() {
    let t = TestServer::start_with(|c| {
        c.mqtt.payload = parley::config::MqttPayload::Json;
    })
    .await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;
    let mut device = Raw::connected(&t, "sensor-1", 30).await;
    device.subscribe(1, &["rooms/lobby"]).await;
    let sent = alice.send_msg("lobby", "m1", "as json").await;
    let (topic, payload) = next_publish(&mut device).await;
    assert_eq!(topic, "rooms/lobby");
    let m: Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(m["body"], "as json", "{m}");
    assert_eq!(m["sender"], "alice", "{m}");
    assert_eq!(m["seq"], sent.seq.to_string(), "{m}");
}

#[tokio::test]
async fn a_new_connection_with_the_same_client_id_takes_the_kept_session_over() {
    let (t, mqtt) = with_listener(|c| c.session.grace_period = Duration::from_secs(600)).await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;
    // The old connection is still open (think: half-open behind a NAT) when the device
    // comes back on a new one.
    let mut old = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    assert!(!connect_kept(&mut old, &t, "sensor-1", "dev-1", false).await);
    old.subscribe(1, &["rooms/lobby"]).await;
    alice.send_msg("lobby", "m1", "before").await;
    assert_eq!(
        next_publish(&mut old).await,
        ("rooms/lobby".into(), "before".into())
    );

    let mut new = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    assert!(
        connect_kept(&mut new, &t, "sensor-1", "dev-1", false).await,
        "the old connection's session, handed over"
    );
    assert_eq!(old.next().await, None, "the old connection is closed");
    alice.send_msg("lobby", "m2", "after").await;
    assert_eq!(
        next_publish(&mut new).await,
        ("rooms/lobby".into(), "after".into())
    );

    // Another client id of the same user is left alone.
    let mut other = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    assert!(!connect_kept(&mut other, &t, "sensor-1", "dev-2", true).await);
    new.send(&Packet::Pingreq).await;
    assert_eq!(new.next().await, Some(Packet::Pingresp));
}

// MQTT 5.0: the same endpoints and sessions, with reason codes where 3.1.1 can only
// close, and the session expiry interval for the kept session.

#[tokio::test]
async fn a_paho_mqtt5_device_chats_with_reason_codes_and_user_properties() {
    let t = TestServer::start().await;
    // CONNACK reason codes: a bad token, a user name that is not the token's (0x86); no
    // password (paho sends it only with a user name: 0x87).
    for (token, username, code) in [
        ("not-a-jwt".to_string(), Some("sensor-1"), 0x86),
        (t.token("sensor-1"), Some("someone-else"), 0x86),
        (t.token("sensor-1"), None, 0x87),
    ] {
        let mut device = Device::paho5(&t, "connect", &token, username);
        let report = device.line().await;
        assert_eq!(report["connack"], code, "{report}");
        device.finish();
    }

    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;
    // paho sends the password only with a user name, in MQTT 5 too (a raw client below
    // sends it alone).
    let mut device = Device::paho5(&t, "chat", &t.token("sensor-1"), Some("sensor-1"));
    let ready = device.line().await;
    assert_eq!(ready["suback"], serde_json::json!([1]), "{ready}");
    let sent = alice.send_msg("lobby", "m1", "hello v5").await;
    assert_eq!(alice.next_message().await.body, "hello v5");
    // The device's QoS 1 publish reaches alice once, its user property as metadata.
    let from_device = alice.next_message().await;
    assert_eq!(from_device.body, "from-device");
    assert_eq!(from_device.sender, "sensor-1");
    assert_eq!(from_device.seq, sent.seq + 1);
    assert_eq!(
        from_device.metadata.get("sensor").map(String::as_str),
        Some("t1")
    );
    no_more_messages(&mut alice).await;
    let summary = device.line().await;
    assert_eq!(
        summary["received"],
        serde_json::json!({"topic": "rooms/lobby", "payload": "hello v5", "qos": 1}),
        "{summary}"
    );
    assert_eq!(summary["puback"], 0, "{summary}");
    device.finish();
}

/// MQTT 5 flow control: paho with Receive Maximum 2, holding its PUBACKs, never has more
/// than 2 QoS 1 PUBLISHes outstanding; the rest wait on the server and all arrive, in
/// order, as it acknowledges.
#[tokio::test]
async fn an_mqtt5_receive_maximum_holds_publishes_until_pubacks_come() {
    let t = TestServer::start().await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;
    let mut device = Device::paho5(&t, "flow", &t.token("sensor-1"), Some("sensor-1"));
    let ready = device.line().await;
    assert_eq!(ready["suback"], serde_json::json!([1]), "{ready}");
    let bodies: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
    for (i, body) in bodies.iter().enumerate() {
        alice.send_msg("lobby", &format!("c{i}"), body).await;
    }
    let summary = device.line().await;
    assert_eq!(summary["received"], serde_json::json!(bodies), "{summary}");
    assert_eq!(summary["most_unacked"], 2, "{summary}");
    device.finish();
}

#[tokio::test]
async fn an_mqtt5_publish_the_server_refuses_gets_a_puback_reason_and_the_connection_stays() {
    let t = TestServer::start().await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;
    alice.join("secret").await;
    let mut device = Device::paho5(&t, "refused", &t.token("sensor-1"), Some("sensor-1"));
    let summary = device.line().await;
    // Not a member of rooms/secret: 0x87 not authorized; the next publish on the same
    // connection goes through.
    assert_eq!(summary["refused"], 0x87, "{summary}");
    assert_eq!(summary["after"], 0, "{summary}");
    device.finish();
    assert_eq!(alice.next_message().await.body, "after");
    no_more_messages(&mut alice).await;

    // Raw: a bad topic (0x90) and a payload that is not UTF-8 (0x99) at QoS 1, a bad
    // topic at QoS 0 (dropped); SUBACK reason codes per filter. Still open after all.
    let mut raw = Raw::open(&t).await;
    let mut connect = v5::Connect::new("raw".into(), 30);
    connect.password = Some(t.token("sensor-2").into_bytes().into());
    raw.send5(v5::Packet::Connect(connect)).await;
    match raw.next5().await {
        Some(v5::Packet::Connack(c)) => {
            assert_eq!(c.reason_code, v5::ConnectReasonCode::Success);
            assert_eq!(c.properties.max_qos, Some(QoS::Level1));
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let pid = |n| Pid::try_from(n).unwrap();
    let publish = |qos_pid, topic: &str, payload: &'static [u8]| {
        v5::Packet::Publish(v5::Publish::new(
            qos_pid,
            TopicName::try_from(topic).unwrap(),
            payload.into(),
        ))
    };
    raw.send5(publish(QosPid::Level0, "elsewhere", b"x")).await;
    raw.send5(publish(QosPid::Level1(pid(1)), "elsewhere", b"x"))
        .await;
    raw.send5(publish(QosPid::Level1(pid(2)), "rooms/lobby", b"\xff"))
        .await;
    for (n, code) in [
        (1, v5::PubackReasonCode::TopicNameInvalid),
        (2, v5::PubackReasonCode::PayloadFormatInvalid),
    ] {
        match raw.next5().await {
            Some(v5::Packet::Puback(a)) => assert_eq!((a.pid, a.reason_code), (pid(n), code)),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    let options = v5::SubscriptionOptions::new(QoS::Level1);
    let topics = ["rooms/lobby", "elsewhere", "presence/+"]
        .iter()
        .map(|f| (TopicFilter::try_from(*f).unwrap(), options))
        .collect();
    raw.send5(v5::Packet::Subscribe(v5::Subscribe::new(pid(3), topics)))
        .await;
    match raw.next5().await {
        Some(v5::Packet::Suback(s)) => assert_eq!(
            s.topics,
            [
                v5::SubscribeReasonCode::GrantedQoS1,
                v5::SubscribeReasonCode::TopicFilterInvalid,
                v5::SubscribeReasonCode::GrantedQoS1,
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let filters = ["presence/+", "rooms/nowhere"]
        .iter()
        .map(|f| TopicFilter::try_from(*f).unwrap())
        .collect();
    raw.send5(v5::Packet::Unsubscribe(v5::Unsubscribe::new(
        pid(4),
        filters,
    )))
    .await;
    match raw.next5().await {
        Some(v5::Packet::Unsuback(u)) => assert_eq!(
            u.topics,
            [
                v5::UnsubscribeReasonCode::Success,
                v5::UnsubscribeReasonCode::NoSubscriptionExisted,
            ]
        ),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    raw.send5(v5::Packet::Pingreq).await;
    assert_eq!(raw.next5().await, Some(v5::Packet::Pingresp));
    // QoS 2: DISCONNECT 0x9B (QoS not supported), then the close.
    raw.send5(publish(QosPid::Level2(pid(5)), "rooms/lobby", b"x"))
        .await;
    match raw.next5().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::QoSNotSupported)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(raw.next5().await.is_none());

    // Retain Available 0 in the CONNACK: a retained PUBLISH is DISCONNECT 0x9A, and a
    // CONNECT whose will asks to be retained is CONNACK 0x9A.
    let mut raw = Raw::open(&t).await;
    let mut connect = v5::Connect::new("raw-retain".into(), 30);
    connect.password = Some(t.token("sensor-2").into_bytes().into());
    raw.send5(v5::Packet::Connect(connect)).await;
    match raw.next5().await {
        Some(v5::Packet::Connack(c)) => {
            assert_eq!(c.reason_code, v5::ConnectReasonCode::Success);
            assert_eq!(c.properties.retain_available, Some(false));
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let mut retained = v5::Publish::new(
        QosPid::Level1(pid(1)),
        TopicName::try_from("rooms/lobby").unwrap(),
        b"kept?".as_slice().into(),
    );
    retained.retain = true;
    raw.send5(v5::Packet::Publish(retained)).await;
    match raw.next5().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::RetainNotSupported)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(raw.next5().await.is_none());
    let mut raw = Raw::open(&t).await;
    let mut connect = v5::Connect::new("raw-will".into(), 30);
    connect.password = Some(t.token("sensor-2").into_bytes().into());
    let mut will = v5::LastWill::new(
        QoS::Level0,
        TopicName::try_from("rooms/lobby").unwrap(),
        b"gone".as_slice().into(),
    );
    will.retain = true;
    connect.last_will = Some(will);
    raw.send5(v5::Packet::Connect(connect)).await;
    match raw.next5().await {
        Some(v5::Packet::Connack(c)) => {
            assert_eq!(c.reason_code, v5::ConnectReasonCode::RetainNotSupported)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert!(raw.next5().await.is_none());
    // None of it reached the room.
    no_more_messages(&mut alice).await;
}

#[tokio::test]
async fn mqttjs_speaks_mqtt5_over_websocket_and_over_tcp() {
    let (t, mqtt) = with_listener(|_| {}).await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;
    let urls = [format!("ws://{}/mqtt", t.addr()), format!("mqtt://{mqtt}")];
    for (i, url) in urls.iter().enumerate() {
        let mut device = Device::mqttjs_as(url, true, "chat", &t.token("kiosk"), "kiosk");
        let ready = device.line().await;
        assert_eq!(ready["suback"], serde_json::json!([1]), "{url}: {ready}");
        let body = format!("hello mqttjs 5 {i}");
        let sent = alice.send_msg("lobby", &format!("m{i}"), &body).await;
        assert_eq!(alice.next_message().await.body, body);
        let from_device = alice.next_message().await;
        assert_eq!(from_device.body, "from-mqttjs", "{url}");
        assert_eq!(from_device.seq, sent.seq + 1);
        no_more_messages(&mut alice).await;
        let summary = device.line().await;
        assert_eq!(summary["received"]["payload"], body, "{url}: {summary}");
        assert_eq!(summary["puback"], 0, "{url}: {summary}");
        device.finish();
    }
}

/// CONNECTs `raw` in MQTT 5 as `user` with client id `client`, `clean_start` and a
/// session expiry interval: the CONNACK.
async fn connect5(
    raw: &mut Raw,
    t: &TestServer,
    user: &str,
    client: &str,
    clean_start: bool,
    expiry: Option<u32>,
) -> v5::Connack {
    let mut connect = v5::Connect::new(client.into(), 30);
    connect.clean_start = clean_start;
    connect.properties.session_expiry_interval = expiry;
    connect.password = Some(t.token(user).into_bytes().into());
    raw.send5(v5::Packet::Connect(connect)).await;
    match raw.next5().await {
        Some(v5::Packet::Connack(c)) => {
            assert_eq!(c.reason_code, v5::ConnectReasonCode::Success);
            c
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// The next MQTT 5 PUBLISH on `raw`.
async fn next_publish5(raw: &mut Raw) -> v5::Publish {
    match raw.next5().await {
        Some(v5::Packet::Publish(p)) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[tokio::test]
async fn an_mqtt5_session_expiry_interval_keeps_the_session_and_resumes_with_dup() {
    let (t, mqtt) = with_listener(|c| c.session.grace_period = Duration::from_secs(60)).await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;
    let options = v5::SubscriptionOptions::new(QoS::Level1);
    let lobby = vec![(TopicFilter::try_from("rooms/lobby").unwrap(), options)];

    // Expiry 3600 s asked, the grace period (60 s) granted and said in CONNACK.
    let mut device = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    let connack = connect5(&mut device, &t, "sensor-1", "dev-1", true, Some(3600)).await;
    assert!(!connack.session_present);
    assert_eq!(connack.properties.session_expiry_interval, Some(60));
    let pid = Pid::try_from(1).unwrap();
    device
        .send5(v5::Packet::Subscribe(v5::Subscribe::new(
            pid,
            lobby.clone(),
        )))
        .await;
    assert!(matches!(device.next5().await, Some(v5::Packet::Suback(_))));
    let mut send = parley::proto::Send {
        room: "lobby".into(),
        client_msg_id: "m1".into(),
        body: "one".into(),
        ..Default::default()
    };
    send.metadata.insert("unit".into(), "celsius".into());
    alice.request(Cmd::Send(send)).await;
    let first = next_publish5(&mut device).await;
    assert_eq!((&first.payload[..], first.dup), (&b"one"[..], false));
    // Message metadata as user properties.
    let props = &first.properties.user_properties;
    assert_eq!(props.len(), 1, "{props:?}");
    assert_eq!((&*props[0].name, &*props[0].value), ("unit", "celsius"));
    // Dropped before its PUBACK; a message comes while the device is away.
    drop(device);
    tokio::time::sleep(Duration::from_millis(200)).await;
    alice.send_msg("lobby", "m2", "two").await;

    let mut device = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    let connack = connect5(&mut device, &t, "sensor-1", "dev-1", false, Some(60)).await;
    assert!(connack.session_present);
    // No SUBSCRIBE: kept. "one" again with DUP, same packet id, then "two".
    let again = next_publish5(&mut device).await;
    assert_eq!((&again.payload[..], again.dup), (&b"one"[..], true));
    assert_eq!(again.qos_pid, first.qos_pid);
    assert_eq!(again.properties.user_properties.len(), 1);
    let next = next_publish5(&mut device).await;
    assert_eq!((&next.payload[..], next.dup), (&b"two"[..], false));
    for p in [again, next] {
        if let QosPid::Level1(pid) = p.qos_pid {
            device
                .send5(v5::Packet::Puback(v5::Puback::new_success(pid)))
                .await;
        }
    }
    // A DISCONNECT with session expiry 0 ends the session: a CONNECT without clean
    // start finds none.
    let mut disconnect = v5::Disconnect::new_normal();
    disconnect.properties.session_expiry_interval = Some(0);
    device.send5(v5::Packet::Disconnect(disconnect)).await;
    assert!(device.next5().await.is_none());
    let mut device = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    let connack = connect5(&mut device, &t, "sensor-1", "dev-1", false, None).await;
    assert!(!connack.session_present);
    // No expiry interval (0): the session ends with the connection, nothing is kept.
    drop(device);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut device = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    let connack = connect5(&mut device, &t, "sensor-1", "dev-1", false, Some(60)).await;
    assert!(!connack.session_present);
}

/// Nothing more comes on `raw` for a while.
async fn quiet5(raw: &mut Raw) {
    let more = tokio::time::timeout(Duration::from_millis(300), raw.next5()).await;
    assert!(more.is_err(), "expected nothing, got {more:?}");
}

/// MQTT 5 Receive Maximum 1 with a kept session: one PUBLISH out at a time, before and
/// after a resume (where the unacknowledged one is sent again first and what was held
/// back follows, in order, one PUBACK at a time); a Receive Maximum of 0 is refused.
#[tokio::test]
async fn an_mqtt5_receive_maximum_holds_across_a_resumed_session() {
    let (t, mqtt) = with_listener(|c| c.session.grace_period = Duration::from_secs(60)).await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;
    let connect = |clean_start: bool, receive_max: u16| {
        let mut c = v5::Connect::new("dev-1".into(), 30);
        c.clean_start = clean_start;
        c.properties.session_expiry_interval = Some(60);
        c.properties.receive_max = Some(receive_max);
        c.password = Some(t.token("sensor-1").into_bytes().into());
        v5::Packet::Connect(c)
    };
    let mut zero = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    zero.send5(connect(true, 0)).await;
    match zero.next5().await {
        Some(v5::Packet::Connack(c)) => {
            assert_eq!(c.reason_code, v5::ConnectReasonCode::ProtocolError)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }

    let mut device = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    device.send5(connect(true, 1)).await;
    assert!(matches!(device.next5().await, Some(v5::Packet::Connack(_))));
    let options = v5::SubscriptionOptions::new(QoS::Level1);
    let lobby = vec![(TopicFilter::try_from("rooms/lobby").unwrap(), options)];
    let pid = Pid::try_from(1).unwrap();
    device
        .send5(v5::Packet::Subscribe(v5::Subscribe::new(pid, lobby)))
        .await;
    assert!(matches!(device.next5().await, Some(v5::Packet::Suback(_))));
    for i in 1..=3 {
        alice
            .send_msg("lobby", &format!("m{i}"), &format!("b{i}"))
            .await;
    }
    let first = next_publish5(&mut device).await;
    assert_eq!((&first.payload[..], first.dup), (&b"b1"[..], false));
    quiet5(&mut device).await;
    // Dropped before its PUBACK, with two messages held back.
    drop(device);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut device = Raw::on(TcpStream::connect(mqtt).await.unwrap());
    device.send5(connect(false, 1)).await;
    match device.next5().await {
        Some(v5::Packet::Connack(c)) => assert!(c.session_present),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let again = next_publish5(&mut device).await;
    assert_eq!((&again.payload[..], again.dup), (&b"b1"[..], true));
    assert_eq!(again.qos_pid, first.qos_pid);
    let mut last = again;
    for body in ["b2", "b3"] {
        quiet5(&mut device).await;
        let QosPid::Level1(pid) = last.qos_pid else {
            panic!("QoS 1 expected");
        };
        device
            .send5(v5::Packet::Puback(v5::Puback::new_success(pid)))
            .await;
        last = next_publish5(&mut device).await;
        assert_eq!((&last.payload[..], last.dup), (body.as_bytes(), false));
    }
    quiet5(&mut device).await;
}

#[tokio::test]
async fn an_mqtt5_connection_taken_over_hears_why() {
    let t = TestServer::start().await;
    let mut old = Raw::open(&t).await;
    connect5(&mut old, &t, "sensor-1", "dev-1", true, Some(30)).await;
    let mut new = Raw::open(&t).await;
    // An empty client id gets one assigned, said in CONNACK.
    let mut anon = Raw::open(&t).await;
    let connack = connect5(&mut anon, &t, "sensor-1", "", true, None).await;
    assert!(
        connack
            .properties
            .assigned_client_id
            .as_ref()
            .is_some_and(|id| id.starts_with("parley-")),
        "{connack:?}"
    );
    let connack = connect5(&mut new, &t, "sensor-1", "dev-1", false, Some(30)).await;
    assert!(connack.session_present, "handed over");
    match old.next5().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::SessionTakenOver)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(old.next5().await.is_none());
    assert_eq!(old.close_code, Some(4010));
}

#[tokio::test]
async fn an_mqtt5_client_gets_no_publish_over_its_maximum_packet_size() {
    let t = TestServer::start().await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;
    let mut raw = Raw::open(&t).await;
    let mut connect = v5::Connect::new("small".into(), 30);
    connect.password = Some(t.token("sensor-1").into_bytes().into());
    connect.properties.max_packet_size = Some(64);
    raw.send5(v5::Packet::Connect(connect)).await;
    match raw.next5().await {
        Some(v5::Packet::Connack(c)) => assert_eq!(c.reason_code, v5::ConnectReasonCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let options = v5::SubscriptionOptions::new(QoS::Level0);
    let lobby = vec![(TopicFilter::try_from("rooms/lobby").unwrap(), options)];
    let pid = Pid::try_from(1).unwrap();
    raw.send5(v5::Packet::Subscribe(v5::Subscribe::new(pid, lobby)))
        .await;
    assert!(matches!(raw.next5().await, Some(v5::Packet::Suback(_))));
    alice.send_msg("lobby", "m1", &"x".repeat(100)).await;
    alice.send_msg("lobby", "m2", "small").await;
    // The 100-byte message is over 64 bytes as a PUBLISH: only "small" comes.
    assert_eq!(&next_publish5(&mut raw).await.payload[..], b"small");
}

#[tokio::test]
async fn mqtt5_oversize_packets_and_silence_get_their_reason_codes() {
    let t = TestServer::start_with(|c| c.mqtt.max_packet_bytes = 1024).await;
    // A CONNECT over the limit: CONNACK 0x95, then the close.
    let mut raw = Raw::open(&t).await;
    let mut connect = v5::Connect::new("d".into(), 30);
    connect.password = Some(vec![b'x'; 2000].into());
    raw.send5(v5::Packet::Connect(connect)).await;
    match raw.next5().await {
        Some(v5::Packet::Connack(c)) => {
            assert_eq!(c.reason_code, v5::ConnectReasonCode::PacketTooLarge)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert!(raw.next5().await.is_none());
    assert_eq!(raw.close_code, Some(1009));

    // A declared length over the limit after CONNECT: DISCONNECT 0x95, then the close.
    let mut big = Raw::open(&t).await;
    connect5(&mut big, &t, "sensor-1", "big", true, None).await;
    big.send_bytes(vec![0x30, 0xff, 0xff, 0x03]).await;
    match big.next5().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::PacketTooLarge)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(big.next5().await.is_none());
    assert_eq!(big.close_code, Some(1009));

    // Keep-alive 1 s and silence: DISCONNECT 0x8D after 1.5 s.
    let mut quiet = Raw::open(&t).await;
    let mut connect = v5::Connect::new("quiet".into(), 1);
    connect.password = Some(t.token("sensor-2").into_bytes().into());
    quiet.send5(v5::Packet::Connect(connect)).await;
    assert!(matches!(quiet.next5().await, Some(v5::Packet::Connack(_))));
    match quiet.next5().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::KeepAliveTimeout)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(quiet.next5().await.is_none());
    assert_eq!(quiet.close_code, Some(4009));
}

#[tokio::test]
async fn an_mqtt5_will_carries_its_user_properties_and_a_bad_one_is_refused() {
    let t = TestServer::start().await;
    let mut alice = t.client("alice", Encoding::Json).await;
    alice.join("lobby").await;
    let will = |topic: &str, payload: &'static [u8]| {
        let mut w = v5::LastWill::new(
            QoS::Level0,
            TopicName::try_from(topic).unwrap(),
            payload.into(),
        );
        w.properties.user_properties = vec![v5::UserProperty {
            name: "battery".into(),
            value: "low".into(),
        }];
        w
    };
    // A will parley could never send: CONNACK 0x90 (topic) or 0x99 (payload).
    for (topic, payload, code) in [
        (
            "elsewhere",
            &b"bye"[..],
            v5::ConnectReasonCode::TopicNameInvalid,
        ),
        (
            "rooms/lobby",
            &b"\xff"[..],
            v5::ConnectReasonCode::PayloadFormatInvalid,
        ),
    ] {
        let mut raw = Raw::open(&t).await;
        let mut connect = v5::Connect::new("w".into(), 30);
        connect.password = Some(t.token("sensor-1").into_bytes().into());
        connect.last_will = Some(will(topic, payload));
        raw.send5(v5::Packet::Connect(connect)).await;
        match raw.next5().await {
            Some(v5::Packet::Connack(c)) => assert_eq!(c.reason_code, code),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        assert!(raw.next5().await.is_none());
    }
    // DISCONNECT 0x04 (with will message): the will is sent, its user properties as the
    // message's metadata.
    let mut raw = Raw::open(&t).await;
    let mut connect = v5::Connect::new("w".into(), 30);
    connect.password = Some(t.token("sensor-1").into_bytes().into());
    connect.last_will = Some(will("rooms/lobby", b"going away"));
    raw.send5(v5::Packet::Connect(connect)).await;
    assert!(matches!(raw.next5().await, Some(v5::Packet::Connack(_))));
    let options = v5::SubscriptionOptions::new(QoS::Level0);
    let lobby = vec![(TopicFilter::try_from("rooms/lobby").unwrap(), options)];
    raw.send5(v5::Packet::Subscribe(v5::Subscribe::new(
        Pid::try_from(1).unwrap(),
        lobby,
    )))
    .await;
    assert!(matches!(raw.next5().await, Some(v5::Packet::Suback(_))));
    raw.send5(v5::Packet::Disconnect(v5::Disconnect::new(
        v5::DisconnectReasonCode::DisconnectWithWillMessage,
    )))
    .await;
    assert!(raw.next5().await.is_none());
    let m = alice.next_message().await;
    assert_eq!(
        (m.body.as_str(), m.sender.as_str()),
        ("going away", "sensor-1")
    );
    assert_eq!(m.metadata.get("battery").map(String::as_str), Some("low"));
}
