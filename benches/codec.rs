//! Micro-benchmarks of parley's hot path (criterion; `cargo bench --bench codec`).
//!
//! - `codec/*`: encode and decode of a client `send` and a server `message` push in both
//!   encodings.
//! - `per_recipient/*`: what each recipient of a push costs to frame — `Push::frame`
//!   (body encoded once, the session position spliced in front) against a full encode of
//!   the frame per recipient.
//! - `fanout/*`: one push delivered to N local sessions through the real `Hub` and
//!   `Session` queues, then taken off each queue as a transport would (and framed).
//!
//! Measurement times are short so the whole file runs in a few minutes on 2 cores.

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use parley::{
    broker::Target,
    codec::{self, Encoding, Push},
    config::Config,
    proto::{self, ClientFrame, ServerFrame, client_frame::Cmd, server_frame::Kind},
    server::build_core,
    session::{Attachment, Take},
};
use prost::Message as _;

// The binary's allocator (jemalloc by default), so that counts here match the server's.
parley::build_allocator!();

const ENCODINGS: [(Encoding, &str); 2] = [(Encoding::Proto, "proto"), (Encoding::Json, "json")];

/// A 100-byte body, like the load generator's.
fn body() -> String {
    format!("{}:{}", 123_456_789_012u64, "x".repeat(87))
}

fn send_frame() -> ClientFrame {
    ClientFrame {
        id: 42,
        cmd: Some(Cmd::Send(proto::Send {
            room: "lobby".into(),
            client_msg_id: "pub-1-12345".into(),
            body: body(),
            ..Default::default()
        })),
    }
}

fn message(seq: u64) -> Kind {
    Kind::Message(proto::Message {
        room: "lobby".into(),
        seq,
        sender: "pub-1".into(),
        client_msg_id: "pub-1-12345".into(),
        body: body(),
        ts: 1_764_000_000_000,
        ..Default::default()
    })
}

fn push_frame(pos: u64) -> ServerFrame {
    ServerFrame {
        id: 0,
        pos,
        kind: Some(message(7)),
    }
}

fn decode_server(encoding: Encoding, bytes: &[u8]) -> ServerFrame {
    match encoding {
        Encoding::Proto => ServerFrame::decode(bytes).expect("decodes"),
        Encoding::Json => serde_json::from_slice(bytes).expect("decodes"),
    }
}

fn bench_codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    let send = send_frame();
    let push = push_frame(1234);
    for (enc, name) in ENCODINGS {
        let client_bytes = codec::encode_client(enc, &send);
        let server_bytes = codec::encode_server(enc, &push);
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("encode_client_send", name), |b| {
            b.iter(|| codec::encode_client(enc, black_box(&send)))
        });
        g.bench_function(BenchmarkId::new("decode_client_send", name), |b| {
            b.iter(|| codec::decode_client(enc, black_box(&client_bytes)).expect("decodes"))
        });
        g.bench_function(BenchmarkId::new("encode_server_message", name), |b| {
            b.iter(|| codec::encode_server(enc, black_box(&push)))
        });
        g.bench_function(BenchmarkId::new("decode_server_message", name), |b| {
            b.iter(|| decode_server(enc, black_box(&server_bytes)))
        });
    }
    g.finish();
}

fn bench_per_recipient(c: &mut Criterion) {
    let mut g = c.benchmark_group("per_recipient");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20)
        .throughput(Throughput::Elements(1));
    for (enc, name) in ENCODINGS {
        // Encode-once: the body is cached in the push; each recipient costs a splice.
        let push = Push::new(message(7));
        let _ = push.body(enc);
        let mut pos = 0u64;
        g.bench_function(BenchmarkId::new("push_frame_splice", name), |b| {
            b.iter(|| {
                pos += 1;
                push.frame(enc, black_box(pos))
            })
        });
        // The naive alternative: a full encode of the frame for every recipient.
        let kind = message(7);
        g.bench_function(BenchmarkId::new("full_encode", name), |b| {
            b.iter(|| {
                pos += 1;
                let frame = ServerFrame {
                    id: 0,
                    pos: black_box(pos),
                    kind: Some(kind.clone()),
                };
                codec::encode_server(enc, &frame)
            })
        });
    }
    g.finish();
}

/// N sessions of N users, all members of one room, each attached as a transport would be.
struct Room {
    core: Arc<parley::session::Core>,
    sessions: Vec<(Arc<parley::session::Session>, Attachment)>,
}

const ROOM: &str = "bench";

impl Room {
    fn new(n: usize) -> Room {
        let mut config = Config::default();
        config.store.path = ":memory:".into();
        let core = build_core(config).expect("core builds");
        let hub = core.chat.hub().clone();
        let sessions = (0..n)
            .map(|i| {
                let user = format!("u{i}");
                let s = core.sessions.create(&user).expect("no session limit here");
                hub.attach(s.clone());
                hub.joined(&user, ROOM, None);
                let a = s.attach().expect("fresh session attaches");
                (s, a)
            })
            .collect();
        Room { core, sessions }
    }

    fn deliver(&self, push: &Arc<Push>) -> usize {
        self.core
            .chat
            .hub()
            .deliver(&Target::Room(ROOM.into()), push)
    }

    /// Takes every queued push off every session; frames them when `encoding` is given.
    fn drain(&self, encoding: Option<Encoding>) -> usize {
        let mut bytes = 0;
        for (s, a) in &self.sessions {
            if let Take::Pushes(p) = s.take(a, 256) {
                if let Some(enc) = encoding {
                    for (pos, push) in p {
                        bytes += push.frame(enc, pos).len();
                    }
                }
            }
        }
        bytes
    }
}

fn bench_fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    for n in [100usize, 1_000, 10_000] {
        let room = Room::new(n);
        assert_eq!(room.core.chat.hub().room_size(ROOM), n);
        g.throughput(Throughput::Elements(n as u64));
        let mut seq = 0;
        g.bench_function(BenchmarkId::new("hub_deliver_and_take", n), |b| {
            b.iter(|| {
                seq += 1;
                let push = Arc::new(Push::new(message(seq)));
                let delivered = room.deliver(&push);
                room.drain(None);
                delivered
            })
        });
        for (enc, name) in ENCODINGS {
            g.bench_function(
                BenchmarkId::new(format!("deliver_take_frame_{name}"), n),
                |b| {
                    b.iter(|| {
                        seq += 1;
                        let push = Arc::new(Push::new(message(seq)));
                        room.deliver(&push);
                        room.drain(Some(enc))
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, bench_codec, bench_per_recipient, bench_fanout);
criterion_main!(benches);
