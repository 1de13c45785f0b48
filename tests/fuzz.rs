//! Property-based fuzzing on the stable toolchain (proptest): both frame decoders, the
//! SSE, long-poll and HTTP command request parsing, and the session state machine.
//!
//! - Decoders: arbitrary and mutated bytes never panic `codec::decode_client`; every
//!   `ClientFrame` round-trips through both encodings.
//! - Requests: random query strings, `Last-Event-ID`, `Authorization`, `Origin` and
//!   `Content-Type` headers and bodies, sent through the real router in-process
//!   (`tower::ServiceExt::oneshot` on `parley::server::router`): never a panic, never a
//!   5xx.
//! - Sessions: random sequences of push / take / ack / detach / attach / resume / kill
//!   against a simple model: positions are contiguous, a resume replays exactly what the
//!   model says, and the byte bounds hold.
//!
//! Briefly in `cargo test` (64 cases per property unless `PROPTEST_CASES` says
//! otherwise); longer with `PROPTEST_CASES=100000 cargo test --release --test fuzz`.

mod common;

use std::{
    collections::VecDeque,
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{body::Body, http::Request};
use common::*;
use parley::{
    codec::{self, Encoding, Push},
    delivery::Recipient,
    proto::{self, ClientFrame, client_frame::Cmd, server_frame::Kind},
    server::router,
    session::{Death, Session, Take},
};
use proptest::{collection::vec, prelude::*, test_runner::TestCaseError};
use tower::ServiceExt;

/// Cases per property: 64 by default, `PROPTEST_CASES` when set.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        cases,
        // Findings become regression tests in this file, not files in the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Frames

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_.@-]{0,12}",
        any::<String>(),
        Just(String::new()),
        Just("\u{0}\u{feff}\u{10ffff}\"\\".to_string()),
    ]
}

fn number() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..100u64,
        Just(u64::MAX),
        Just(i64::MAX as u64),
        Just(i64::MAX as u64 + 1),
        any::<u64>(),
    ]
}

fn cmd() -> impl Strategy<Value = Cmd> {
    prop_oneof![
        (text(), text(), number()).prop_map(|(token, session_id, last_pos)| Cmd::Connect(
            proto::Connect {
                token,
                session_id,
                last_pos,
            }
        )),
        text().prop_map(|room| Cmd::Join(proto::Join { room })),
        text().prop_map(|room| Cmd::Leave(proto::Leave { room })),
        (text(), text(), text(), vec((text(), text()), 0..4), text()).prop_map(
            |(room, client_msg_id, body, metadata, to_user)| {
                Cmd::Send(proto::Send {
                    room,
                    client_msg_id,
                    body,
                    metadata: metadata.into_iter().collect(),
                    to_user,
                    ..Default::default()
                })
            }
        ),
        (
            text(),
            number(),
            proptest::option::of(number()),
            any::<u32>()
        )
            .prop_map(|(room, before_seq, after_seq, limit)| Cmd::History(
                proto::History {
                    room,
                    before_seq,
                    after_seq,
                    limit,
                }
            )),
        (vec((text(), number()), 0..4), any::<u32>()).prop_map(|(rooms, limit)| {
            Cmd::Sync(proto::Sync {
                rooms: rooms.into_iter().collect(),
                limit,
            })
        }),
        Just(Cmd::Ping(proto::Ping {})),
        number().prop_map(|pos| Cmd::Ack(proto::Ack { pos })),
        (text(), any::<bool>())
            .prop_map(|(room, private)| Cmd::CreateRoom(proto::CreateRoom { room, private })),
        (text(), text()).prop_map(|(room, user)| Cmd::Invite(proto::Invite { room, user })),
        text().prop_map(|room| Cmd::Members(proto::Members { room })),
        (any::<bool>(), text(), any::<u32>()).prop_map(|(public, after, limit)| {
            Cmd::Rooms(proto::Rooms {
                public,
                after,
                limit,
            })
        }),
        (text(), number()).prop_map(|(room, seq)| Cmd::Read(proto::Read { room, seq })),
        text().prop_map(|room| Cmd::Typing(proto::Typing { room })),
        vec(text(), 0..4).prop_map(|users| Cmd::Presence(proto::PresenceQuery { users })),
        (text(), text(), text()).prop_map(|(to_user, kind, payload)| Cmd::Signal(proto::Signal {
            to_user,
            kind,
            payload
        })),
    ]
}

fn frame() -> impl Strategy<Value = ClientFrame> {
    (number(), proptest::option::of(cmd())).prop_map(|(id, cmd)| ClientFrame { id, cmd })
}

/// A byte-level change to an encoded frame.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        match *m {
            Mutation::Flip(i, b) if len > 0 => bytes[i % len] ^= b,
            Mutation::Insert(i, b) => bytes.insert(i % (len + 1), b),
            Mutation::Remove(i) if len > 0 => {
                bytes.remove(i % len);
            }
            Mutation::Truncate(i) => bytes.truncate(i % (len + 1)),
            _ => {}
        }
    }
    bytes
}

fn encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![Just(Encoding::Proto), Just(Encoding::Json)]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(
        enc in encoding(),
        bytes in vec(any::<u8>(), 0..512),
    ) {
        let _ = codec::decode_client(enc, &bytes);
    }

    #[test]
    fn decoders_never_panic_on_mutated_frames(
        enc in encoding(),
        f in frame(),
        mutations in vec(mutation(), 1..6),
    ) {
        let bytes = mutate(codec::encode_client(enc, &f).to_vec(), &mutations);
        let _ = codec::decode_client(enc, &bytes);
    }

    #[test]
    fn json_decoder_never_panics_on_json_shaped_input(
        pieces in vec(prop_oneof![
            Just("{"), Just("}"), Just("["), Just("]"), Just(","), Just(":"),
            Just("\"id\""), Just("\"connect\""), Just("\"send\""), Just("\"history\""),
            Just("\"afterSeq\""), Just("\"lastPos\""), Just("\"metadata\""),
            Just("\"18446744073709551616\""), Just("-1"), Just("1e400"), Just("null"),
            Just("true"), Just("\"\\ud800\""), Just("\"\\u0000\""), Just("0.5"),
        ], 0..40),
    ) {
        let _ = codec::decode_client(Encoding::Json, pieces.concat().as_bytes());
    }

    #[test]
    fn every_client_frame_round_trips(f in frame()) {
        for enc in [Encoding::Proto, Encoding::Json] {
            let bytes = codec::encode_client(enc, &f);
            let back = codec::decode_client(enc, &bytes)
                .map_err(|e| TestCaseError::fail(format!("{enc:?}: {e}")))?;
            prop_assert_eq!(&back, &f, "{:?}", enc);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Requests: /sse, /poll, /session, /session/{id}, the HTTP API

/// A server for the request properties (one per test binary run), with live sessions of
/// `ann` to name, and long-poll holds kept short so a request never waits long.
struct Http {
    t: TestServer,
    rt: tokio::runtime::Runtime,
    token: String,
    sessions: Vec<String>,
}

fn http_server() -> &'static Http {
    static HTTP: OnceLock<Http> = OnceLock::new();
    HTTP.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (t, token, sessions) = rt.block_on(async {
            let t = TestServer::start_with(|c| {
                c.poll.max_hold = Duration::from_millis(50);
                c.poll.default_hold = Duration::ZERO;
                c.session.grace_period = Duration::from_secs(600);
            })
            .await;
            let token = t.token("ann");
            let mut sessions = Vec::new();
            for _ in 0..2 {
                let body = serde_json::json!({"id":"1","connect":{"token":token}});
                let r = http(t.addr(), "POST", "/session", &[], body.to_string()).await;
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                sessions.push(v["connected"]["sessionId"].as_str().unwrap().to_string());
            }
            (t, token, sessions)
        });
        Http {
            t,
            rt,
            token,
            sessions,
        }
    })
}

/// A piece of a request that refers to the server's real state, resolved per request.
#[derive(Debug, Clone)]
enum Value {
    Raw(String),
    Number(u64),
    Session(usize),
    Token,
    Ticket,
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => text().prop_map(Value::Raw),
        2 => number().prop_map(Value::Number),
        1 => Just(Value::Raw("-1".into())),
        1 => Just(Value::Raw("18446744073709551616".into())),
        1 => Just(Value::Raw("%zz%".into())),
        2 => (0..3usize).prop_map(Value::Session),
        1 => Just(Value::Token),
        1 => Just(Value::Ticket),
    ]
}

const KEYS: [&str; 12] = [
    "ticket",
    "session_id",
    "last_pos",
    "receive_only",
    "cursor",
    "wait",
    "after_seq",
    "before_seq",
    "limit",
    "room",
    "encoding",
    "x",
];

fn query() -> impl Strategy<Value = Vec<(String, Value)>> {
    let session = (0..3usize).prop_map(|i| vec![("session_id".to_string(), Value::Session(i))]);
    let pairs = vec(
        (
            prop_oneof![4 => proptest::sample::select(&KEYS[..]).prop_map(String::from), 1 => text()],
            value(),
        ),
        0..5,
    );
    // Often a real session first, so the rest of the query is parsed for it.
    (proptest::option::of(session), pairs)
        .prop_map(|(first, rest)| first.into_iter().flatten().chain(rest).collect())
}

/// Percent-encodes all but unreserved characters, so any text fits in a URI.
fn escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Target {
    Sse,
    Poll,
    Session,
    Command(Value),
    Messages(Value),
    Tickets,
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        3 => Just(Target::Sse),
        3 => Just(Target::Poll),
        2 => Just(Target::Session),
        2 => prop_oneof![
            3 => (0..3usize).prop_map(Value::Session),
            1 => value(),
        ]
        .prop_map(Target::Command),
        1 => value().prop_map(Target::Messages),
        1 => Just(Target::Tickets),
    ]
}

#[derive(Debug, Clone)]
struct Req {
    target: Target,
    query: Vec<(String, Value)>,
    auth: Option<Value>,
    last_event_id: Option<Value>,
    origin: Option<String>,
    protobuf: bool,
    body: Vec<u8>,
    /// For `POST /session`: a well-formed `connect` (session to resume, last position)
    /// instead of `body`.
    connect: Option<(Option<Value>, u64)>,
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..256),
        (encoding(), frame(), vec(mutation(), 0..3))
            .prop_map(|(enc, f, m)| mutate(codec::encode_client(enc, &f).to_vec(), &m)),
        frame().prop_map(|f| codec::encode_client(Encoding::Json, &f).to_vec()),
    ]
}

/// Mostly a valid token, so requests get past authentication into the parsing behind it.
fn auth() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        6 => Just(Some(Value::Token)),
        1 => Just(None),
        2 => value().prop_map(Some),
    ]
}

/// Mostly none (not a browser), sometimes a foreign or malformed one.
fn origin() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        6 => Just(None),
        1 => Just(Some("https://evil.example".to_string())),
        1 => Just(Some("null".to_string())),
        1 => "[ -~]{0,20}".prop_map(Some),
    ]
}

/// A `connect` body for `POST /session` with the real token, possibly resuming one of the
/// live sessions from some position.
fn connect_body() -> impl Strategy<Value = Option<(Option<usize>, u64)>> {
    prop_oneof![
        1 => Just(None),
        1 => (proptest::option::of(0..3usize), number()).prop_map(Some),
    ]
}

fn request() -> impl Strategy<Value = Req> {
    (
        target(),
        query(),
        auth(),
        proptest::option::of(value()),
        origin(),
        any::<bool>(),
        body(),
        connect_body(),
    )
        .prop_map(
            |(target, query, auth, last_event_id, origin, protobuf, body, connect)| {
                let body = match (&target, connect) {
                    (Target::Session, Some((session, last_pos))) => {
                        let session = session.map(Value::Session);
                        return Req {
                            target,
                            query,
                            auth,
                            last_event_id,
                            origin,
                            protobuf: false,
                            body: Vec::new(),
                            connect: Some((session, last_pos)),
                        };
                    }
                    _ => body,
                };
                Req {
                    target,
                    query,
                    auth,
                    last_event_id,
                    origin,
                    protobuf,
                    body,
                    connect: None,
                }
            },
        )
}

/// A new session of ann's (the pooled ones may have been ended by earlier cases).
async fn fresh_session(h: &Http) -> String {
    let body = serde_json::json!({"id":"1","connect":{"token":h.token}}).to_string();
    let req = Request::post("/session")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("request");
    let Ok(resp) = router(h.t.server.state().clone()).oneshot(req).await;
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    v["connected"]["sessionId"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn resolve(h: &Http, v: &Value) -> String {
    match v {
        Value::Raw(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Session(0) => fresh_session(h).await,
        Value::Session(i) => h.sessions.get(*i).cloned().unwrap_or_default(),
        Value::Token => h.token.clone(),
        Value::Ticket => h.t.try_ticket(&h.token).await.unwrap_or_default(),
    }
}

async fn send(h: &Http, r: &Req) -> Result<(), TestCaseError> {
    let mut q = Vec::new();
    for (k, v) in &r.query {
        q.push(format!("{}={}", escape(k), escape(&resolve(h, v).await)));
    }
    let q = q.join("&");
    let (method, path) = match &r.target {
        Target::Sse => ("GET", "/sse".to_string()),
        Target::Poll => ("GET", "/poll".to_string()),
        Target::Session => ("POST", "/session".to_string()),
        Target::Command(id) => (
            "POST",
            format!("/session/{}", escape(&resolve(h, id).await)),
        ),
        Target::Messages(room) => (
            "GET",
            format!("/api/v1/rooms/{}/messages", escape(&resolve(h, room).await)),
        ),
        Target::Tickets => ("POST", "/api/v1/tickets".to_string()),
    };
    let uri = if q.is_empty() {
        path
    } else {
        format!("{path}?{q}")
    };
    let mut b = Request::builder().method(method).uri(&uri);
    if let Some(a) = &r.auth {
        b = b.header(
            "authorization",
            format!("Bearer {}", escape(&resolve(h, a).await)),
        );
    }
    if let Some(id) = &r.last_event_id {
        b = b.header("last-event-id", escape(&resolve(h, id).await));
    }
    if let Some(o) = &r.origin {
        b = b.header("origin", o.as_str());
    }
    if r.protobuf {
        b = b.header("content-type", "application/x-protobuf");
    } else {
        b = b.header("content-type", "application/json");
    }
    let body = match &r.connect {
        Some((session, last_pos)) => {
            let session_id = match session {
                Some(v) => resolve(h, v).await,
                None => String::new(),
            };
            serde_json::json!({"id": "1", "connect": {
                "token": h.token, "sessionId": session_id, "lastPos": last_pos.to_string(),
            }})
            .to_string()
            .into_bytes()
        }
        None => r.body.clone(),
    };
    let req = b
        .body(Body::from(body))
        .map_err(|e| TestCaseError::reject(e.to_string()))?;
    let ctx = h.t.server.state().clone();
    let resp = tokio::time::timeout(Duration::from_secs(10), router(ctx).oneshot(req))
        .await
        .map_err(|_| TestCaseError::fail(format!("{uri}: no answer in 10 s")))?
        .map_err(|e| TestCaseError::fail(format!("{uri}: {e}")))?;
    let status = resp.status();
    prop_assert!(
        !status.is_server_error(),
        "{} {} answered {}",
        method,
        uri,
        status
    );
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn requests_never_panic_or_answer_5xx(r in request()) {
        let h = http_server();
        h.rt.block_on(send(h, &r))?;
    }
}

// ---------------------------------------------------------------------------------------
// The session state machine

const MAX_QUEUE: usize = 2048;
const REPLAY: usize = 1024;

/// A session core for the model tests: `session.max_queue_bytes` and
/// `session.replay_buffer_bytes` small enough that random pushes reach both bounds.
fn sessions() -> &'static parley::session::Sessions {
    static CORE: OnceLock<(tokio::runtime::Runtime, Arc<parley::session::Core>)> = OnceLock::new();
    let (_, core) = CORE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let core = {
            let _guard = rt.enter();
            let mut c = test_config();
            c.session.max_queue_bytes = MAX_QUEUE;
            c.session.replay_buffer_bytes = REPLAY;
            parley::server::build_core(c).expect("core")
        };
        (rt, core)
    });
    &core.sessions
}

#[derive(Debug, Clone)]
enum Op {
    /// A push whose body has this many bytes.
    Push(usize),
    Take(usize),
    /// Take with an attachment an earlier attach or resume replaced.
    TakeStale,
    /// Ack a position this far around the newest one taken.
    Ack(i64),
    Detach,
    Attach,
    /// Resume from a position this far around the newest one taken.
    Resume(i64),
    Kill,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..300usize).prop_map(Op::Push),
        4 => (0..6usize).prop_map(Op::Take),
        1 => Just(Op::TakeStale),
        3 => (-4..3i64).prop_map(Op::Ack),
        1 => Just(Op::Detach),
        1 => Just(Op::Attach),
        2 => (-6..3i64).prop_map(Op::Resume),
        1 => (0..40u8).prop_map(|n| if n == 0 { Op::Kill } else { Op::Take(1) }),
    ]
}

/// The model: what a session must hold, by its documented rules.
#[derive(Debug, Default)]
struct Model {
    /// (pos, cost): `queue[..sent]` written, the rest not.
    queue: VecDeque<(u64, usize)>,
    sent: usize,
    next_pos: u64,
    dead: bool,
    attached: bool,
    /// The newest position handed to a transport (for picking acks and resumes).
    newest_taken: u64,
}

impl Model {
    fn unsent(&self) -> usize {
        self.queue.iter().skip(self.sent).map(|e| e.1).sum()
    }
    fn retained(&self) -> usize {
        self.queue.iter().take(self.sent).map(|e| e.1).sum()
    }
    fn die(&mut self) {
        self.dead = true;
        self.queue.clear();
        self.sent = 0;
    }
    fn push(&mut self, cost: usize) {
        if self.dead {
            return;
        }
        self.queue.push_back((self.next_pos, cost));
        self.next_pos += 1;
        if self.unsent() > MAX_QUEUE {
            self.die();
        }
    }
    fn take(&mut self, max: usize) -> Vec<u64> {
        let end = (self.sent + max).min(self.queue.len());
        let out: Vec<u64> = self.queue.range(self.sent..end).map(|e| e.0).collect();
        self.sent = end;
        while self.retained() > REPLAY && self.sent > 0 {
            self.queue.pop_front();
            self.sent -= 1;
        }
        if let Some(&p) = out.last() {
            self.newest_taken = p;
        }
        out
    }
    fn ack(&mut self, pos: u64) {
        while self.sent > 0 && self.queue.front().is_some_and(|e| e.0 <= pos) {
            self.queue.pop_front();
            self.sent -= 1;
        }
    }
    fn resume(&mut self, last: u64) -> bool {
        if self.dead || last >= self.next_pos {
            return false;
        }
        let first = self.next_pos - self.queue.len() as u64;
        if last + 1 < first {
            return false;
        }
        while self.queue.front().is_some_and(|e| e.0 <= last) {
            self.queue.pop_front();
        }
        self.sent = 0;
        true
    }
}

fn around(base: u64, delta: i64) -> u64 {
    base.saturating_add_signed(delta)
}

fn positions(t: Take) -> Result<Vec<u64>, TestCaseError> {
    match t {
        Take::Pushes(v) => Ok(v.into_iter().map(|(p, _)| p).collect()),
        Take::Revoked => Err(TestCaseError::fail("revoked")),
        Take::Dead(d) => Err(TestCaseError::fail(format!("dead: {d:?}"))),
    }
}

fn run_session(ops: &[Op]) -> Result<(), TestCaseError> {
    let reg = sessions();
    let s: Arc<Session> = reg.create("ann").expect("no session limit");
    let mut m = Model {
        next_pos: 1,
        ..Model::default()
    };
    let mut current = None;
    let mut stale = Vec::new();
    for op in ops {
        match *op {
            Op::Push(n) => {
                let push = Arc::new(Push::new(Kind::Announcement(proto::Announcement {
                    body: "x".repeat(n),
                    ..Default::default()
                })));
                m.push(push.cost());
                s.push(&push);
            }
            Op::Take(max) => {
                let Some(a) = &current else { continue };
                let got = s.take(a, max);
                if m.dead {
                    prop_assert!(matches!(got, Take::Dead(_)), "a dead session takes Dead");
                    continue;
                }
                if !m.attached {
                    prop_assert!(matches!(got, Take::Revoked), "detached takes Revoked");
                    continue;
                }
                let got = positions(got)?;
                let want = m.take(max);
                prop_assert_eq!(&got, &want);
                prop_assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "contiguous");
            }
            Op::TakeStale => {
                let Some(a) = stale.last() else { continue };
                let got = s.take(a, 10);
                if m.dead {
                    prop_assert!(matches!(got, Take::Dead(_)));
                } else {
                    prop_assert!(matches!(got, Take::Revoked), "a replaced attachment");
                }
            }
            Op::Ack(d) => {
                let pos = around(m.newest_taken, d);
                m.ack(pos);
                s.ack(pos);
            }
            Op::Detach => {
                if let Some(a) = &current {
                    s.detach(a);
                    m.attached = false;
                }
            }
            Op::Attach => {
                let a = s.attach();
                prop_assert_eq!(a.is_some(), !m.dead);
                if let Some(a) = a {
                    stale.extend(current.replace(a));
                    m.attached = true;
                }
            }
            Op::Resume(d) => {
                let last = around(m.newest_taken, d);
                let a = s.resume(last);
                let ok = m.resume(last);
                prop_assert_eq!(a.is_some(), ok, "resume from {}", last);
                if let Some(a) = a {
                    stale.extend(current.replace(a));
                    m.attached = true;
                    // The replay is exactly the model's queue after `last`.
                    let want: Vec<u64> = m.queue.iter().map(|e| e.0).collect();
                    if let Some(&first) = want.first() {
                        prop_assert_eq!(first, last + 1, "replay starts right after");
                    }
                    let got = positions(s.take(current.as_ref().expect("set"), 1 << 20))?;
                    let took = m.take(1 << 20);
                    prop_assert_eq!(&got, &want);
                    prop_assert_eq!(&got, &took);
                }
            }
            Op::Kill => {
                s.kill(Death::SlowConsumer);
                m.die();
            }
        }
        // The bounds the model keeps, and the ones the session must honour with it.
        prop_assert!(m.dead || m.unsent() <= MAX_QUEUE);
        prop_assert!(m.retained() <= REPLAY);
        let now = tokio::time::Instant::now();
        prop_assert_eq!(s.expired(now, Duration::from_secs(3600)), m.dead);
        prop_assert_eq!(s.expired(now, Duration::ZERO), m.dead || !m.attached);
    }
    reg.end(&s);
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn session_matches_the_model(ops in vec(op(), 1..120)) {
        run_session(&ops)?;
    }
}

/// Positions stay contiguous across a resume on another transport: a plain scripted case
/// the property above explores at random, kept as an example.
#[test]
fn session_resume_after_replay_buffer_overflow_falls_back() {
    let ops = [
        Op::Attach,
        Op::Push(200),
        Op::Push(200),
        Op::Push(200),
        Op::Push(200),
        Op::Push(200),
        Op::Take(5),
        Op::Resume(-4),
        Op::Resume(0),
        Op::Push(10),
        Op::Take(1),
    ];
    run_session(&ops).unwrap();
}
