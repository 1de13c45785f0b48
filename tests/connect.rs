//! One connect path, one set of answers: every credential case run against every
//! transport that opens a session (WebSocket `connect`, SSE with a bearer header, SSE
//! with a ticket, and `POST /session`, where long-poll clients start). A table, not four
//! copies: each case states what every transport must answer.

mod common;

use common::*;
use parley::{
    auth::Authenticator,
    codec::Encoding,
    config::{AuthConfig, JwtKey},
    proto::{self, ErrorCode, server_frame::Kind},
};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Ws,
    SseBearer,
    SseTicket,
    HttpSession,
}

const TRANSPORTS: [Transport; 4] = [
    Transport::Ws,
    Transport::SseBearer,
    Transport::SseTicket,
    Transport::HttpSession,
];

/// What a connect attempt got.
#[derive(Debug)]
enum Answer {
    Connected(proto::Connected),
    /// The error code; for WebSocket also the close code that followed.
    Refused(ErrorCode, Option<u16>),
}

fn code_from_json(v: &Value) -> ErrorCode {
    let name = v["code"]
        .as_str()
        .unwrap_or_else(|| panic!("error JSON: {v}"));
    ErrorCode::from_str_name(name).unwrap_or_else(|| panic!("unknown code {name}"))
}

/// Tries to open (or resume) a session over `transport` with `token`.
async fn connect(
    t: &TestServer,
    transport: Transport,
    token: &str,
    session_id: &str,
    last_pos: u64,
) -> Answer {
    match transport {
        Transport::Ws => {
            let mut c = Client::open(t.addr(), Some(Encoding::Json)).await;
            let frame = proto::Connect {
                token: token.into(),
                session_id: session_id.into(),
                last_pos,
            };
            match c.request(proto::client_frame::Cmd::Connect(frame)).await {
                Kind::Connected(c) => Answer::Connected(c),
                Kind::Error(e) => {
                    let code = code_of(&e);
                    let closed = c.closed().await;
                    Answer::Refused(code, closed.code)
                }
                other => panic!("{other:?}"),
            }
        }
        Transport::SseBearer | Transport::SseTicket => {
            let auth = format!("Bearer {token}");
            let resume = format!("session_id={session_id}&last_pos={last_pos}");
            let (path, headers) = if transport == Transport::SseTicket {
                let ticket = match t.try_ticket(token).await {
                    Ok(ticket) => ticket,
                    Err(r) => {
                        let v: Value = serde_json::from_slice(&r.body).unwrap();
                        return Answer::Refused(code_from_json(&v), None);
                    }
                };
                (format!("/sse?ticket={ticket}&{resume}"), vec![])
            } else {
                (
                    format!("/sse?{resume}"),
                    vec![("authorization", auth.as_str())],
                )
            };
            let mut s = SseClient::open(t.addr(), &path, &headers).await;
            if s.status != 200 {
                let v: Value = serde_json::from_slice(&s.body_bytes().await).unwrap();
                return Answer::Refused(code_from_json(&v), None);
            }
            match s.next().await.expect("first event").frame().kind {
                Some(Kind::Connected(c)) => Answer::Connected(c),
                other => panic!("{other:?}"),
            }
        }
        Transport::HttpSession => {
            let body = json!({"id":"1","connect":{"token":token,"sessionId":session_id,"lastPos":last_pos.to_string()}});
            let r = http(t.addr(), "POST", "/session", &[], body.to_string()).await;
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            if r.status != 200 {
                return Answer::Refused(code_from_json(&v), None);
            }
            let c: proto::ServerFrame = serde_json::from_value(v).unwrap();
            match c.kind {
                Some(Kind::Connected(c)) => Answer::Connected(c),
                other => panic!("{other:?}"),
            }
        }
    }
}

fn refused(a: Answer, transport: Transport, code: ErrorCode) {
    match a {
        Answer::Refused(got, close) => {
            assert_eq!(got, code, "{transport:?}");
            if transport == Transport::Ws {
                assert_eq!(close, Some(4001), "{transport:?} closes with 4001");
            }
        }
        Answer::Connected(c) => panic!("{transport:?}: connected as {c:?}"),
    }
}

fn connected(a: Answer, transport: Transport) -> proto::Connected {
    match a {
        Answer::Connected(c) => c,
        Answer::Refused(code, close) => panic!("{transport:?}: refused {code:?} {close:?}"),
    }
}

#[tokio::test]
async fn every_transport_answers_every_credential_the_same_way() {
    let t = TestServer::start().await;
    let forged = Authenticator::new(&AuthConfig {
        jwt_secret: "not-the-server-secret".into(),
        ..AuthConfig::default()
    })
    .unwrap()
    .mint("ann", std::time::Duration::from_secs(60))
    .unwrap();
    for transport in TRANSPORTS {
        // A valid token: a new session for its user.
        let c = connected(
            connect(&t, transport, &t.token("ann"), "", 0).await,
            transport,
        );
        assert_eq!(
            (c.user_id.as_str(), c.resumed),
            ("ann", false),
            "{transport:?}"
        );
        assert!(t.session_alive(&c.session_id));

        // No token, a forged one, garbage: UNAUTHORIZED. An expired one: TOKEN_EXPIRED.
        for bad in ["", &forged, "not.a.jwt"] {
            refused(
                connect(&t, transport, bad, "", 0).await,
                transport,
                ErrorCode::Unauthorized,
            );
        }
        refused(
            connect(&t, transport, &t.expired_token("ann"), "", 0).await,
            transport,
            ErrorCode::TokenExpired,
        );
    }
}

#[tokio::test]
async fn every_transport_resumes_only_the_users_own_session() {
    let t = TestServer::start().await;
    for transport in TRANSPORTS {
        // A session of ann's, opened on the same transport and then left.
        let first = connected(
            connect(&t, transport, &t.token("ann"), "", 0).await,
            transport,
        );
        let sid = first.session_id;
        // Ann resumes it.
        let again = connected(
            connect(&t, transport, &t.token("ann"), &sid, 0).await,
            transport,
        );
        assert!(again.resumed, "{transport:?}");
        assert_eq!(again.session_id, sid, "{transport:?}");
        // Eve naming ann's session gets a session of her own; ann's is untouched.
        let eve = connected(
            connect(&t, transport, &t.token("eve"), &sid, 0).await,
            transport,
        );
        assert!(!eve.resumed, "{transport:?}");
        assert_ne!(eve.session_id, sid, "{transport:?}");
        assert_eq!(eve.user_id, "eve");
        assert!(t.session_alive(&sid), "{transport:?}");
        // A position the session never reached cannot be replayed: a new session.
        let future = connected(
            connect(&t, transport, &t.token("ann"), &sid, 99).await,
            transport,
        );
        assert!(!future.resumed, "{transport:?}");
        assert_ne!(future.session_id, sid, "{transport:?}");
    }
}

/// Key rotation and `aud`/`iss` over real connections: a server whose main key is `k2`
/// and which still accepts `k1`, and that requires an audience and an issuer. Tokens
/// signed by either key verify; a wrong or unknown `kid`, a wrong `aud` or `iss` is
/// UNAUTHORIZED (close 4001 on WebSocket), an expired old-key token TOKEN_EXPIRED.
#[tokio::test]
async fn every_transport_honours_key_rotation_audience_and_issuer() {
    let t = TestServer::start_with(|c| {
        c.auth.jwt_secret = "new-secret".into();
        c.auth.key_id = "k2".into();
        c.auth.extra_keys = vec![JwtKey {
            kid: "k1".into(),
            secret: "old-secret".into(),
            ..JwtKey::default()
        }];
        c.auth.audience = "parley".into();
        c.auth.issuer = "https://id.example.com".into();
    })
    .await;
    // An issuer's signer: `secret` under `kid`, with the given `aud` and `iss`.
    let signer = |secret: &str, kid: &str, aud: &str, iss: &str| {
        Authenticator::new(&AuthConfig {
            jwt_secret: secret.into(),
            key_id: kid.into(),
            audience: aud.into(),
            issuer: iss.into(),
            ..AuthConfig::default()
        })
        .unwrap()
    };
    let iss = "https://id.example.com";
    let ttl = std::time::Duration::from_secs(60);
    let old = signer("old-secret", "k1", "parley", iss);
    let new = signer("new-secret", "k2", "parley", iss);
    let refusals = [
        // The new secret under an unknown kid, and under none.
        signer("new-secret", "k3", "parley", iss)
            .mint("ann", ttl)
            .unwrap(),
        signer("new-secret", "", "parley", iss)
            .mint("ann", ttl)
            .unwrap(),
        // The old secret claiming the new key's id.
        signer("old-secret", "k2", "parley", iss)
            .mint("ann", ttl)
            .unwrap(),
        // Another service's audience, another issuer, neither.
        signer("new-secret", "k2", "other", iss)
            .mint("ann", ttl)
            .unwrap(),
        signer("new-secret", "k2", "parley", "https://evil.example.com")
            .mint("ann", ttl)
            .unwrap(),
        signer("new-secret", "k2", "", "").mint("ann", ttl).unwrap(),
    ];
    let expired_old = old.mint_with_exp("ann", 1_000_000).unwrap();
    for transport in TRANSPORTS {
        for (signed, name) in [(&old, "old key"), (&new, "new key")] {
            let c = connected(
                connect(&t, transport, &signed.mint("ann", ttl).unwrap(), "", 0).await,
                transport,
            );
            assert_eq!(c.user_id, "ann", "{transport:?} {name}");
        }
        for bad in &refusals {
            refused(
                connect(&t, transport, bad, "", 0).await,
                transport,
                ErrorCode::Unauthorized,
            );
        }
        refused(
            connect(&t, transport, &expired_old, "", 0).await,
            transport,
            ErrorCode::TokenExpired,
        );
    }
}

/// Issue 20, item 6: a resume whose room read fails (a store error) must not leave the
/// session attached: it stays detached and expires after its grace period, as if the
/// resume had never been tried. (SQLite only: the test makes the store fail by hiding a
/// table of the database file.)
#[tokio::test]
async fn a_failed_resume_leaves_the_session_to_expire() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("parley-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("p.db");
    let path_str = path.to_str().unwrap().to_string();
    let t = TestServer::start_with(|c| {
        c.store.path = path_str;
        c.session.grace_period = std::time::Duration::from_millis(500);
    })
    .await;
    if t.db.is_some() {
        // The PostgreSQL pass: this test is about the SQLite file.
        return;
    }
    let mut ann = t.client("ann", Encoding::Json).await;
    ann.join("r").await;
    let (sid, pos) = (ann.session_id.clone(), ann.last_pos);
    drop(ann);
    // The store now fails the resume's room read.
    let db = rusqlite::Connection::open(&path).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    db.execute_batch("ALTER TABLE members RENAME TO members_hidden")
        .unwrap();
    let mut again = Client::open(t.addr(), Some(Encoding::Json)).await;
    let reply = again
        .request(proto::client_frame::Cmd::Connect(proto::Connect {
            token: t.token("ann"),
            session_id: sid.clone(),
            last_pos: pos,
        }))
        .await;
    match reply {
        Kind::Error(e) => assert_eq!(code_of(&e), ErrorCode::Internal),
        other => panic!("expected INTERNAL, got {other:?}"),
    }
    db.execute_batch("ALTER TABLE members_hidden RENAME TO members")
        .unwrap();
    // Nobody holds the session: it expires.
    t.session_reaped(&sid).await;
    // And the store works again for everyone.
    let mut bob = t.client("bob", Encoding::Json).await;
    bob.join("r").await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 20, item 6: a ticket is claimed by its first use in the same step that checks
/// it: of two uses at once, exactly one opens a session; the other is told the ticket is
/// used.
#[tokio::test]
async fn a_ticket_opens_one_session_even_when_used_twice_at_once() {
    let t = TestServer::start().await;
    let token = t.token("ann");
    for round in 0..10 {
        let Ok(tk) = t.try_ticket(&token).await else {
            panic!("a ticket")
        };
        let url = format!("/sse?ticket={tk}");
        let (a, b) = tokio::join!(
            SseClient::open(t.addr(), &url, &[]),
            SseClient::open(t.addr(), &url, &[])
        );
        let mut statuses = [a.status, b.status];
        statuses.sort();
        assert_eq!(statuses, [200, 401], "round {round}");
        let refused = if a.status == 401 { a } else { b };
        let v: Value = serde_json::from_slice(&refused.body_bytes().await).unwrap();
        assert_eq!(v["code"], "ERROR_CODE_UNAUTHORIZED");
        assert!(v["message"].as_str().unwrap().contains("used"), "{v}");
    }
}
