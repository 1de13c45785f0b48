//! `/mqtt`: MQTT 3.1.1 over WebSocket on the same sessions as `/ws`. A real device client
//! (Python `paho-mqtt`) chats with a parley WebSocket client; raw packets (built with the
//! codec crate, sent over tokio-tungstenite) check refusals, limits and idempotence.

mod common;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{TestServer, WAIT};
use futures_util::{SinkExt, StreamExt};
use mqtt_proto::{
    Pid, Protocol, QoS, QosPid, TopicFilter, TopicName,
    v3::{Connect, ConnectReturnCode, Packet, Publish, Subscribe, SubscribeReturnCode},
};
use parley::codec::Encoding;
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

/// tests/python/mqtt_client.py running one scenario: its JSON lines as they come.
struct Device {
    lines: tokio::sync::mpsc::UnboundedReceiver<Value>,
    child: std::process::Child,
}

impl Device {
    fn start(t: &TestServer, scenario: &str, token: &str, username: Option<&str>) -> Device {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/mqtt_client.py");
        let addr = t.addr();
        let mut cmd = Command::new(mqtt_python());
        cmd.arg(script)
            .args([scenario, &addr.ip().to_string(), &addr.port().to_string()])
            .arg(token);
        if let Some(u) = username {
            cmd.arg(u);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python runs");
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

/// A raw MQTT client over tokio-tungstenite.
struct Raw {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    buf: Vec<u8>,
    close_code: Option<u16>,
}

impl Raw {
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
            ws,
            buf: Vec::new(),
            close_code: None,
        }
    }

    /// Opened and CONNECTed as `user` (keep-alive `keep_alive` seconds).
    async fn connected(t: &TestServer, user: &str, keep_alive: u16) -> Raw {
        let mut raw = Raw::open(t).await;
        let mut connect = Connect::new(user.into(), keep_alive);
        connect.password = Some(t.token(user).into_bytes().into());
        raw.send(&Packet::Connect(connect)).await;
        match raw.next().await {
            Some(Packet::Connack(c)) => assert_eq!(c.code, ConnectReturnCode::Accepted),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        raw
    }

    async fn send(&mut self, p: &Packet) {
        self.send_bytes(p.encode().unwrap().as_ref().to_vec()).await;
    }

    async fn send_bytes(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::Binary(bytes.into())).await.unwrap();
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
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a packet or the close in time");
            match msg {
                Some(Ok(Message::Binary(b))) => self.buf.extend_from_slice(&b),
                Some(Ok(Message::Close(f))) => {
                    self.close_code = f.map(|f| u16::from(f.code));
                    return None;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
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
async fn wildcards_and_other_topics_are_refused_in_the_suback() {
    let t = TestServer::start().await;
    let mut raw = Raw::connected(&t, "sensor-1", 30).await;
    let codes = raw
        .subscribe(1, &["rooms/#", "rooms/lobby", "#", "rooms/+", "dm/bob"])
        .await;
    use SubscribeReturnCode::{Failure, MaxLevel1};
    assert_eq!(codes, [Failure, MaxLevel1, Failure, Failure, Failure]);
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
    text.ws.send(Message::Text("hello".into())).await.unwrap();
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
async fn an_mqtt5_connect_is_answered_unsupported_version() {
    let t = TestServer::start().await;
    let mut raw = Raw::open(&t).await;
    let mut connect = Connect::new("d".into(), 30);
    connect.protocol = Protocol::V311;
    let mut bytes = Packet::Connect(connect).encode().unwrap().as_ref().to_vec();
    // Fixed header (2) + protocol name (2 + 4): the level byte.
    assert_eq!(bytes[8], 4);
    bytes[8] = 5;
    // v5 has a properties length after the keep-alive: none.
    bytes.insert(12, 0);
    bytes[1] += 1;
    raw.send_bytes(bytes).await;
    let msg = tokio::time::timeout(WAIT, raw.ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        msg,
        Message::Binary(vec![0x20, 0x03, 0x00, 0x84, 0x00].into())
    );
}

/// What one unauthenticated socket can hold: an upgraded /mqtt that never sends CONNECT
/// is closed at `auth.connect_timeout`, and one that sends half a packet is closed too.
#[tokio::test]
async fn a_socket_that_never_connects_is_closed_at_the_connect_deadline() {
    let t = TestServer::start_with(|c| c.auth.connect_timeout = Duration::from_millis(500)).await;
    for first in [None, Some(vec![0x10u8, 0x7f])] {
        let mut raw = Raw::open(&t).await;
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
