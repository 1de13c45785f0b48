//! Replays every example in docs/PROTOCOL.md against a running server: client blocks are
//! sent, server blocks must match the next frame that actor's connection receives, and
//! `close` blocks the close code. Also checks that every command and every server frame
//! kind has at least one example.

mod common;

use std::collections::{BTreeSet, HashMap};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

struct Block {
    kind: String,
    dir: String,
    actor: String,
    body: String,
    line: usize,
}

fn blocks(doc: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut lines = doc.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let words: Vec<&str> = info.split_whitespace().collect();
        let mut body = String::new();
        for (_, l) in lines.by_ref() {
            if l.starts_with("```") {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        if let [kind, dir @ ("client" | "server"), actor] = words[..] {
            out.push(Block {
                kind: kind.into(),
                dir: dir.into(),
                actor: actor.into(),
                body: body.trim_end().into(),
                line: n + 1,
            });
        }
    }
    out
}

/// `expected` with `"$ANY"` matching any value.
fn matches(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::String(s), _) if s == "$ANY" => true,
        (Value::Object(e), Value::Object(a)) => {
            e.len() == a.len()
                && e.iter()
                    .all(|(k, v)| a.get(k).is_some_and(|av| matches(v, av)))
        }
        (Value::Array(e), Value::Array(a)) => {
            e.len() == a.len() && e.iter().zip(a).all(|(e, a)| matches(e, a))
        }
        (e, a) => e == a,
    }
}

#[tokio::test]
async fn every_example_in_protocol_md_holds() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md")).unwrap();
    let blocks = blocks(&doc);
    assert!(blocks.len() > 30, "found {} example blocks", blocks.len());
    const ADMIN: &str = "test-admin-token";
    let t = TestServer::start_with(|c| c.auth.admin_token = ADMIN.into()).await;
    let mut http_status: HashMap<String, (u16, String)> = HashMap::new();
    let mut conns: HashMap<String, Ws> = HashMap::new();
    let mut sessions: HashMap<String, String> = HashMap::new();
    let mut client_cmds = BTreeSet::new();
    let mut server_kinds = BTreeSet::new();

    for b in &blocks {
        let user = b.actor.split('#').next().unwrap().to_string();
        let at = format!(
            "docs/PROTOCOL.md:{} ({} {} {})",
            b.line, b.kind, b.dir, b.actor
        );
        if b.kind == "http" {
            if b.dir == "client" {
                let (request, body) = b.body.split_once('\n').unwrap_or((&b.body, ""));
                let (method, path) = request.split_once(' ').unwrap();
                let token = match b.actor.as_str() {
                    "admin" => Some(ADMIN.to_string()),
                    "anonymous" => None,
                    _ => Some(t.token(&user)),
                };
                let reply = http_request(t.addr(), method, path, token.as_deref(), body).await;
                http_status.insert(b.actor.clone(), reply);
            } else {
                let (status, body) = b.body.split_once('\n').unwrap_or((&b.body, ""));
                let (got_status, got_body) = http_status
                    .remove(&b.actor)
                    .unwrap_or_else(|| panic!("{at}: no request"));
                assert_eq!(
                    got_status,
                    status.trim().parse::<u16>().unwrap(),
                    "{at}: {got_body}"
                );
                let expected: Value =
                    serde_json::from_str(body).unwrap_or_else(|e| panic!("{at}: {e}"));
                let actual: Value = serde_json::from_str(&got_body)
                    .unwrap_or_else(|e| panic!("{at}: {e}: {got_body}"));
                assert!(
                    matches(&expected, &actual),
                    "{at}\nexpected {expected}\n  actual {actual}"
                );
            }
            continue;
        }
        if !conns.contains_key(&b.actor) {
            let c = Client::open(t.addr(), Some(parley::codec::Encoding::Json)).await;
            conns.insert(b.actor.clone(), c.ws);
        }
        let ws = conns.get_mut(&b.actor).unwrap();
        let mut text = b.body.clone();
        for (name, sid) in &sessions {
            text = text.replace(&format!("$SESSION({name})"), sid);
        }
        text = text
            .replace(&format!("$TOKEN({user})"), &t.token(&user))
            .replace(&format!("$EXPIRED_TOKEN({user})"), &t.expired_token(&user));
        let at = format!(
            "docs/PROTOCOL.md:{} ({} {} {})",
            b.line, b.kind, b.dir, b.actor
        );
        match (b.kind.as_str(), b.dir.as_str()) {
            ("json", "client") => {
                let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{at}: {e}"));
                client_cmds.extend(
                    v.as_object()
                        .unwrap()
                        .keys()
                        .filter(|k| *k != "id")
                        .cloned(),
                );
                ws.send(Message::Text(text.into())).await.unwrap();
            }
            ("text", "client") => ws.send(Message::Text(text.into())).await.unwrap(),
            ("close", "client") => {
                let code: u16 = text.trim().parse().unwrap();
                let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
                    code: code.into(),
                    reason: "".into(),
                };
                ws.send(Message::Close(Some(frame))).await.unwrap();
            }
            ("json", "server") => {
                let expected: Value =
                    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{at}: {e}"));
                let actual = loop {
                    let msg = tokio::time::timeout(WAIT, ws.next())
                        .await
                        .unwrap_or_else(|_| panic!("{at}: no frame within {WAIT:?}"))
                        .unwrap_or_else(|| panic!("{at}: connection closed"))
                        .unwrap();
                    match msg {
                        Message::Text(t) => break serde_json::from_str::<Value>(&t).unwrap(),
                        Message::Close(c) => panic!("{at}: closed {c:?}"),
                        _ => continue,
                    }
                };
                assert!(
                    matches(&expected, &actual),
                    "{at}\nexpected {expected}\n  actual {actual}"
                );
                let obj = actual.as_object().unwrap();
                server_kinds.extend(obj.keys().filter(|k| *k != "id" && *k != "pos").cloned());
                if let Some(sid) = obj.get("connected").and_then(|c| c["sessionId"].as_str()) {
                    sessions.insert(user.clone(), sid.to_string());
                }
            }
            ("close", "server") => {
                let code: u16 = text.trim().parse().unwrap();
                let got = loop {
                    match tokio::time::timeout(WAIT, ws.next())
                        .await
                        .expect("close in time")
                    {
                        Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
                        Some(Ok(Message::Text(t))) => panic!("{at}: unexpected frame {t}"),
                        Some(Ok(_)) => continue,
                        _ => break None,
                    }
                };
                assert_eq!(got, Some(code), "{at}");
            }
            other => panic!("{at}: unknown block {other:?}"),
        }
    }

    let want_cmds = [
        "ack", "connect", "history", "join", "leave", "ping", "send", "sync",
    ];
    for c in want_cmds {
        assert!(client_cmds.contains(c), "no example of client command {c}");
    }
    let want_kinds = [
        "connected",
        "disconnect",
        "error",
        "history",
        "joined",
        "left",
        "message",
        "pong",
        "sent",
        "sync",
    ];
    for k in want_kinds {
        assert!(server_kinds.contains(k), "no example of server frame {k}");
    }
}
