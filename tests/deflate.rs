//! permessage-deflate on `/ws` and compression on HTTP, against real peers: raw upgrade
//! requests for the negotiation, Python `websockets` (an independent RFC 7692
//! implementation, with zlib) for compressed traffic both ways, broadcasts compressed
//! once, and bombs; the Autobahn cases (kosoku) for the WebSocket stack with parley's
//! options. The Python venv is made by scripts/test (target/ws-venv).

mod common;

#[path = "../examples/autobahn_echo.rs"]
mod autobahn_echo;

use std::{
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use common::{TestServer, http};
use parley::codec::Encoding;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The Python with `websockets` and `kosoku`: `PARLEY_TEST_WS_PYTHON`, else the venv
/// scripts/test makes under target/.
fn ws_python() -> PathBuf {
    if let Ok(p) = std::env::var("PARLEY_TEST_WS_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ws-venv/bin/python");
    assert!(
        venv.exists(),
        "the deflate tests need Python `websockets` and `kosoku` from PyPI: run \
         scripts/test (it installs them into target/ws-venv), or pip install them and set \
         PARLEY_TEST_WS_PYTHON to that python"
    );
    venv
}

/// Runs one scenario of tests/python/deflate_client.py against `t`; its JSON summary.
async fn python(t: &TestServer, scenario: &str, users: &[&str]) -> Value {
    let tokens: serde_json::Map<String, Value> = users
        .iter()
        .map(|u| (u.to_string(), Value::from(t.token(u))))
        .collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/deflate_client.py");
    let url = format!("ws://{}/ws", t.addr());
    let tokens = Value::Object(tokens).to_string();
    let python = ws_python();
    let scenario = scenario.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args([&scenario, &url, &tokens])
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python scenario failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("a summary line")).unwrap()
}

/// A raw HTTP/1.1 upgrade to `/ws` offering `extensions`: the response head, lowercased.
async fn upgrade_head(addr: SocketAddr, extensions: Option<&str>) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: parley.v1.json\r\n"
    );
    if let Some(e) = extensions {
        req.push_str(&format!("Sec-WebSocket-Extensions: {e}\r\n"));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(common::WAIT, tcp.read(&mut byte))
            .await
            .expect("response in time")
            .unwrap();
        assert_eq!(n, 1, "connection closed before the response head ended");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap().to_lowercase()
}

/// The value of the `sec-websocket-extensions` response header, if any.
fn extensions_of(head: &str) -> Option<String> {
    head.lines()
        .find_map(|l| l.strip_prefix("sec-websocket-extensions:"))
        .map(|v| v.trim().to_string())
}

#[tokio::test]
async fn negotiation_answers_the_offer_and_always_resets_the_server_context() {
    let t = TestServer::start().await;
    let addr = t.addr();
    assert!(upgrade_head(addr, None).await.starts_with("http/1.1 101"));
    assert_eq!(extensions_of(&upgrade_head(addr, None).await), None);

    // What browsers and websockets offer: the client window is asked down to 10 bits,
    // and both sides are told to reset their context after each message.
    let head = upgrade_head(addr, Some("permessage-deflate; client_max_window_bits")).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let ext = extensions_of(&head).expect("deflate accepted");
    assert!(ext.starts_with("permessage-deflate"), "{ext}");
    assert!(ext.contains("client_max_window_bits=10"), "{ext}");
    assert!(ext.contains("server_no_context_takeover"), "{ext}");
    assert!(ext.contains("client_no_context_takeover"), "{ext}");

    // No client_max_window_bits offered: none may be answered (RFC 7692 7.1.2.2).
    let ext = extensions_of(&upgrade_head(addr, Some("permessage-deflate")).await).unwrap();
    assert!(!ext.contains("client_max_window_bits"), "{ext}");
    assert!(ext.contains("server_no_context_takeover"), "{ext}");

    // A smaller server window is honoured (that connection is compressed per message).
    let ext = extensions_of(
        &upgrade_head(addr, Some("permessage-deflate; server_max_window_bits=10")).await,
    )
    .unwrap();
    assert!(ext.contains("server_max_window_bits=10"), "{ext}");

    // An extension parley does not know is declined: the upgrade goes on without it.
    let head = upgrade_head(addr, Some("x-webkit-deflate-frame")).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert_eq!(extensions_of(&head), None);

    // Turned off: offers are ignored.
    let off = TestServer::start_with(|c| c.ws.deflate = false).await;
    let head = upgrade_head(
        off.addr(),
        Some("permessage-deflate; client_max_window_bits"),
    )
    .await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert_eq!(extensions_of(&head), None);

    // Clients may keep their context where the configuration allows it.
    let keep = TestServer::start_with(|c| c.ws.deflate_client_context_takeover = true).await;
    let ext = extensions_of(
        &upgrade_head(
            keep.addr(),
            Some("permessage-deflate; client_max_window_bits"),
        )
        .await,
    )
    .unwrap();
    assert!(!ext.contains("client_no_context_takeover"), "{ext}");
    assert!(ext.contains("server_no_context_takeover"), "{ext}");
}

#[tokio::test]
async fn a_broadcast_is_compressed_once_for_all_recipients() {
    let t = TestServer::start().await;
    let out = python(&t, "broadcast", &["ann", "bob", "cid", "dan"]).await;
    let recipients = out["recipients"].as_object().unwrap();
    assert_eq!(recipients.len(), 3);
    let shared: std::collections::HashSet<&str> = recipients
        .values()
        .map(|r| r["shared"].as_str().unwrap())
        .collect();
    assert_eq!(shared.len(), 1, "one compressed body for every recipient");
    for r in recipients.values() {
        assert!(
            r["wire"].as_u64() < r["plain"].as_u64(),
            "compressed is smaller: {r}"
        );
    }
}

#[tokio::test]
async fn clients_compress_with_and_without_context_takeover() {
    // Default: parley answers client_no_context_takeover even when not offered.
    let t = TestServer::start().await;
    let out = python(&t, "takeover", &["eve"]).await;
    let header = out["header"].as_str().unwrap();
    assert!(header.contains("client_no_context_takeover"), "{header}");
    assert_eq!(out["acks"], serde_json::json!(["1", "2", "3", "4", "5"]));

    // Allowed to keep context: the client's later messages refer to earlier ones, and
    // the server inflates them with that history.
    let t = TestServer::start_with(|c| c.ws.deflate_client_context_takeover = true).await;
    let out = python(&t, "takeover", &["eve"]).await;
    let header = out["header"].as_str().unwrap();
    assert!(!header.contains("client_no_context_takeover"), "{header}");
    assert!(header.contains("client_max_window_bits=10"), "{header}");
    assert_eq!(out["acks"], serde_json::json!(["1", "2", "3", "4", "5"]));
    // A client that offers no context takeover itself gets it answered.
    let offered = out["no_context_offer"].as_str().unwrap();
    assert!(offered.contains("client_no_context_takeover"), "{offered}");
}

#[tokio::test]
async fn a_client_without_the_extension_chats_uncompressed() {
    let t = TestServer::start().await;
    let out = python(&t, "plain", &["ann", "bob"]).await;
    assert_eq!(out["header"], Value::Null);
}

#[tokio::test]
async fn compressed_bombs_are_refused_and_others_are_unaffected() {
    let t = TestServer::start().await;
    let out = python(&t, "bomb", &["ann", "bob"]).await;
    let bombs = out["bombs"].as_array().unwrap();
    // Just past the limit: parley's own error, then close 1009.
    assert_eq!(bombs[0]["close"], 1009);
    assert_eq!(
        bombs[0]["errors"],
        serde_json::json!(["ERROR_CODE_FRAME_TOO_LARGE"])
    );
    // 64 MiB inflated: stopped while inflating (at twice the limit), close 1009.
    assert_eq!(bombs[1]["close"], 1009);
}

fn gunzip(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[tokio::test]
async fn http_replies_are_compressed_by_accept_encoding_but_never_sse() {
    let t = TestServer::start().await;
    let mut ann = t.client("ann", Encoding::Json).await;
    ann.join("big").await;
    for i in 0..20 {
        ann.send_msg(
            "big",
            &format!("m-{i}"),
            "a chat message that repeats itself",
        )
        .await;
    }
    let auth = format!("Bearer {}", t.token("ann"));
    let path = "/api/v1/rooms/big/messages?after_seq=0&limit=50";
    let plain = http(t.addr(), "GET", path, &[("authorization", &auth)], "").await;
    assert_eq!(plain.status, 200);
    assert!(plain.headers.get("content-encoding").is_none());

    let gz = http(
        t.addr(),
        "GET",
        path,
        &[("authorization", &auth), ("accept-encoding", "gzip")],
        "",
    )
    .await;
    assert_eq!(gz.status, 200);
    assert_eq!(gz.headers["content-encoding"], "gzip");
    assert!(gz.body.len() < plain.body.len() / 2, "{}", gz.body.len());
    assert_eq!(gunzip(&gz.body), plain.body);
    for enc in ["br", "zstd"] {
        let r = http(
            t.addr(),
            "GET",
            path,
            &[("authorization", &auth), ("accept-encoding", enc)],
            "",
        )
        .await;
        assert_eq!(r.headers["content-encoding"], enc);
        assert!(r.body.len() < plain.body.len() / 2);
    }

    // Long-poll replies too.
    let session = http(
        t.addr(),
        "POST",
        "/session",
        &[("authorization", &auth), ("accept-encoding", "gzip")],
        r#"{"id":"1","connect":{}}"#,
    )
    .await;
    let v: Value = serde_json::from_slice(&gunzip(&session.body)).unwrap();
    let id = v["connected"]["sessionId"].as_str().unwrap().to_string();
    for i in 0..10 {
        ann.send_msg(
            "big",
            &format!("p-{i}"),
            "a chat message that repeats itself",
        )
        .await;
    }
    let poll = http(
        t.addr(),
        "GET",
        &format!("/poll?session_id={id}&cursor=0&wait=0"),
        &[("authorization", &auth), ("accept-encoding", "gzip")],
        "",
    )
    .await;
    assert_eq!(poll.status, 200);
    assert_eq!(poll.headers["content-encoding"], "gzip");
    let frames: Vec<Value> = serde_json::from_slice(&gunzip(&poll.body)).unwrap();
    assert!(frames.len() >= 10, "{frames:?}");

    // SSE stays uncompressed (and so incremental): the first event arrives as is.
    let ticket = t
        .try_ticket(&t.token("ann"))
        .await
        .unwrap_or_else(|r| panic!("ticket refused: {}", r.status));
    let sse = common::http_stream(
        t.addr(),
        "GET",
        &format!("/sse?ticket={ticket}"),
        &[("accept-encoding", "gzip, br, zstd")],
        "",
    )
    .await;
    assert_eq!(sse.status(), 200);
    assert!(sse.headers().get("content-encoding").is_none());
}

#[tokio::test]
async fn http_compression_can_be_turned_off() {
    let t = TestServer::start_with(|c| c.server.http_compression = false).await;
    let auth = format!("Bearer {}", t.token("ann"));
    let r = http(
        t.addr(),
        "GET",
        "/api/v1/rooms",
        &[("authorization", &auth), ("accept-encoding", "gzip")],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.headers.get("content-encoding").is_none());
}

/// The Autobahn cases that run in seconds: framing, pings, reserved bits, opcodes,
/// fragmentation, UTF-8, close handling, and permessage-deflate echoes of small and
/// mid-sized messages, against an echo endpoint built with `/ws`'s own options. The full run (groups 1-7, 9, 10, 12) is a documented command in
/// docs/BENCHMARKS.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_fast_subset_passes_with_parleys_websocket_options() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(autobahn_echo::serve(listener));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/autobahn.py");
    let outdir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("autobahn-fast");
    let mut cases: Vec<String> = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "10.*"]
        .map(String::from)
        .to_vec();
    // Compression: text (JSON) and binary data, 1000 messages each of 16 B to 4 KiB.
    for sub in 1..=2 {
        cases.extend((1..=5).map(|i| format!("12.{sub}.{i}")));
    }
    let mut cmd = Command::new(ws_python());
    cmd.arg(script).args(["-p", "4", "-o"]).arg(&outdir);
    for c in &cases {
        cmd.args(["-i", c]);
    }
    cmd.arg(addr.to_string());
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("kosoku runs"))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "Autobahn cases failed:\n{stdout}\n{stderr}"
    );
    // kosoku 0.1.0 has 257 cases in this selection; all of them ran and passed.
    assert!(stdout.contains("257 cases passed"), "{stdout}\n{stderr}");
}
