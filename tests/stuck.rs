//! No stuck sockets: a client that never reads again — over WebSocket or SSE — is cut
//! by the write deadline, while the other clients in the same room get every message
//! without waiting on it. The never-reading clients use a tiny receive buffer so the
//! server's writes block quickly.

mod common;

use std::time::Duration;

use common::*;
use parley::{
    codec::Encoding,
    proto::{self, server_frame::Kind},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `parley_connections{transport="…"}` from /metrics.
async fn connections(t: &TestServer, transport: &str) -> u64 {
    let (_, body) = t.http_get("/metrics").await;
    let key = format!("parley_connections{{transport=\"{transport}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0, |v| v.trim().parse().unwrap())
}

async fn wait_for_connections(t: &TestServer, transport: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = connections(t, transport).await;
        if now == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{transport} connections stayed at {now}, want {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bob floods the room with `n` messages of 15 KB while carl, reading normally, must
/// get each one; returns how long carl waited at most for a message.
async fn flood_and_check_carl(bob: &mut Client, carl: &mut Client, n: usize) -> Duration {
    let body = "x".repeat(15_000);
    let mut worst = Duration::ZERO;
    for i in 0..n {
        let sent = bob.send_msg("r", &i.to_string(), &body).await;
        let started = std::time::Instant::now();
        let m = carl.next_message().await;
        worst = worst.max(started.elapsed());
        assert_eq!(m.seq, sent.seq, "carl gets every message, in order");
    }
    worst
}

fn config(c: &mut parley::config::Config) {
    // The queue bound would also cut the stuck client; make it large so the write
    // deadline is what is tested here.
    c.session.max_queue_bytes = 256 * 1024 * 1024;
    c.ws.write_timeout = Duration::from_secs(1);
    c.sse.write_timeout = Duration::from_secs(1);
}

#[tokio::test]
async fn a_websocket_client_that_never_reads_is_cut_and_others_are_unaffected() {
    let t = TestServer::start_with(config).await;
    let mut bob = t.client("bob", Encoding::Proto).await;
    let mut carl = t.client("carl", Encoding::Json).await;
    bob.join("r").await;
    carl.join("r").await;

    // Ann connects and joins, then never reads again.
    let (ann, _) = stalling_member(&t, "ann", "r").await;
    assert_eq!(connections(&t, "ws").await, 3);

    let worst = flood_and_check_carl(&mut bob, &mut carl, 500).await;
    // Ann's connection is gone: cut by the write deadline, not by her.
    wait_for_connections(&t, "ws", 2).await;
    assert!(worst < Duration::from_secs(5), "carl waited {worst:?}");
    // Ann's session survives the cut (detached, waiting for a resume), and nothing
    // was lost for her: the log has all 500.
    let mut back = t.client("ann", Encoding::Json).await;
    let Kind::Rooms(list) = back
        .request(proto::client_frame::Cmd::Rooms(proto::Rooms::default()))
        .await
    else {
        panic!()
    };
    assert_eq!(list.rooms[0].last_seq, 500);
    drop(ann);
}

#[tokio::test]
async fn an_sse_client_that_never_reads_is_cut_and_others_are_unaffected() {
    let t = TestServer::start_with(config).await;
    let mut bob = t.client("bob", Encoding::Proto).await;
    let mut carl = t.client("carl", Encoding::Json).await;
    bob.join("r").await;
    carl.join("r").await;

    // Ann opens an SSE stream, joins by POST, then never reads the stream again.
    let mut ann = tiny_socket(t.addr()).await;
    let token = t.token("ann");
    let req =
        format!("GET /sse HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n");
    ann.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !String::from_utf8_lossy(&head).contains("sessionId") {
        let mut buf = [0u8; 1024];
        let n = ann.read(&mut buf).await.unwrap();
        assert!(n > 0, "stream ended early");
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let sid = text.split("\"sessionId\":\"").nth(1).unwrap();
    let sid = sid.split('"').next().unwrap().to_string();
    let r = http(
        t.addr(),
        "POST",
        &format!("/session/{sid}"),
        &[("authorization", &format!("Bearer {token}"))],
        r#"{"id":"1","join":{"room":"r"}}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(connections(&t, "sse").await, 1);

    let worst = flood_and_check_carl(&mut bob, &mut carl, 500).await;
    wait_for_connections(&t, "sse", 0).await;
    assert!(worst < Duration::from_secs(5), "carl waited {worst:?}");
    assert!(t.session_alive(&sid), "detached, waiting for a resume");
    drop(ann);
}
