//! permessage-deflate costs (criterion; `cargo bench --bench deflate`).
//!
//! First prints the bytes on the wire for a chat payload mix (each push's WebSocket
//! payload as parley sends it, with and without compression, both encodings). Then:
//!
//! - `deflate_per_recipient/*`: what each recipient of a push costs — the plain splice
//!   (`Push::frame`), the compressed-once splice (`Push::deflated_frame`: stored block +
//!   shared compressed body, the body compressed on the first call only), and
//!   compressing each recipient's frame (what a server that compresses per connection
//!   does, with a reset compressor as without context takeover).
//! - `deflate_once/*`: the one compression of a push's body (paid once per broadcast).

use std::{hint::black_box, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use parley::{
    codec::{Encoding, Push},
    config::WsConfig,
    deflate,
    proto::{self, server_frame::Kind},
};

// The binary's allocator (jemalloc by default), so that counts here match the server's.
parley::build_allocator!();

const ENCODINGS: [(Encoding, &str); 2] = [(Encoding::Proto, "proto"), (Encoding::Json, "json")];

fn message(seq: u64, body: &str, metadata: &[(&str, &str)]) -> Kind {
    Kind::Message(proto::Message {
        room: "team-product".into(),
        seq,
        sender: "maria.k".into(),
        client_msg_id: format!("web-7f3a9c-{seq}"),
        body: body.into(),
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ts: 1_764_230_400_000 + seq as i64 * 1234,
        ..Default::default()
    })
}

/// Short texts (about 60 % of chat traffic), messages with JSON-ish metadata, and a few
/// of several KB (a pasted log or a long post): 100 messages, in proportion.
fn mix() -> Vec<(&'static str, Kind)> {
    let short = [
        "ok",
        "see you at 5?",
        "lol that's great",
        "on my way, 10 min",
        "Thanks! Merged.",
        "can you review #4821 when you have a minute?",
    ];
    let medium = "Meeting moved to 15:30 in room B. Please bring the quarterly numbers and \
                  your questions for the team.";
    let meta = [
        ("client", "ios/5.2.1"),
        ("reply_to", "1734"),
        ("mentions", "[\"bob\",\"cid\"]"),
        ("format", "markdown"),
    ];
    let log_line = "2026-11-27T14:03:11.482Z WARN api::orders request_id=9f2c41 user=1187 \
                    upstream=payments latency_ms=812 status=503 retrying attempt=2\n";
    let long = log_line.repeat(25);
    let mut out = Vec::new();
    for i in 0..100u64 {
        let (kind, k) = match i % 20 {
            0..=11 => ("short", message(i, short[i as usize % short.len()], &[])),
            12..=18 => ("medium+metadata", message(i, medium, &meta)),
            _ => ("several KB", message(i, &long, &[("format", "code")])),
        };
        out.push((kind, k));
    }
    out
}

/// Bytes on the wire (WebSocket payloads) for the mix, with parley's defaults: bodies
/// under `ws.deflate_min_bytes` go uncompressed.
fn print_sizes() {
    let ws = WsConfig::default();
    eprintln!(
        "\nbytes on the wire, payload mix of 100 pushes (level {}, min {} B):",
        ws.deflate_level, ws.deflate_min_bytes
    );
    eprintln!("| encoding | kind | pushes | plain | deflate (compressed once) | ratio |");
    eprintln!("| --- | --- | --- | --- | --- | --- |");
    for (encoding, name) in ENCODINGS {
        let mut totals: Vec<(&str, usize, usize, usize)> = Vec::new();
        for (kind, k) in mix() {
            let push = Push::new(k);
            let plain = push.frame(encoding, 1234).len();
            let wire = if push.body(encoding).len() >= ws.deflate_min_bytes {
                push.deflated_frame(encoding, 1234, ws.deflate_level).len()
            } else {
                plain
            };
            match totals.iter_mut().find(|t| t.0 == kind) {
                Some(t) => {
                    t.1 += 1;
                    t.2 += plain;
                    t.3 += wire;
                }
                None => totals.push((kind, 1, plain, wire)),
            }
        }
        let all = totals
            .iter()
            .fold((0, 0, 0), |a, t| (a.0 + t.1, a.1 + t.2, a.2 + t.3));
        totals.push(("all", all.0, all.1, all.2));
        for (kind, n, plain, wire) in totals {
            eprintln!(
                "| {name} | {kind} | {n} | {plain} | {wire} | {:.2} |",
                wire as f64 / plain as f64
            );
        }
    }
}

fn per_recipient(c: &mut Criterion) {
    print_sizes();
    let level = WsConfig::default().deflate_level;
    let mut g = c.benchmark_group("deflate_per_recipient");
    let samples = mix();
    let picks = [("medium", &samples[12].1), ("several_kb", &samples[19].1)];
    for (encoding, ename) in ENCODINGS {
        for (kname, kind) in picks {
            let push = Push::new(kind.clone());
            let _ = push.deflated_body(encoding, level);
            let mut pos = 1u64;
            g.bench_function(format!("{ename}/{kname}/plain_splice"), |b| {
                b.iter(|| {
                    pos += 1;
                    black_box(push.frame(encoding, pos))
                })
            });
            g.bench_function(format!("{ename}/{kname}/compressed_once_splice"), |b| {
                b.iter(|| {
                    pos += 1;
                    black_box(push.deflated_frame(encoding, pos, level))
                })
            });
            g.bench_function(format!("{ename}/{kname}/compress_per_recipient"), |b| {
                b.iter(|| {
                    pos += 1;
                    let frame = push.frame(encoding, pos);
                    black_box(deflate::compress_body(&frame, level))
                })
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("deflate_once");
    for (encoding, ename) in ENCODINGS {
        for (kname, kind) in picks {
            g.bench_function(format!("{ename}/{kname}/first_compression"), |b| {
                b.iter(|| {
                    let push = Push::new(kind.clone());
                    black_box(push.deflated_body(encoding, level).len())
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    targets = per_recipient
}
criterion_main!(benches);
