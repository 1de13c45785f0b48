//! Instruction counts of the delivery hot path (gungraun: valgrind's callgrind driven from
//! `cargo bench --bench delivery`; needs `valgrind` and the `gungraun-runner` binary of
//! the same version as the `gungraun` crate, see docs/BENCHMARKS.md). One run each, so
//! a change's cost shows to the instruction, whatever else the machine is doing.
//!
//! - `delivery::fanout`: one push to a room of N attached sessions through the real
//!   [`Hub`](parley::delivery::Hub) and session queues, then every connection's real
//!   [`Outbox`] hands out its pushes and the WebSocket writer's work is done on them —
//!   position and shared body copied into a yawc WebSocket's write buffer
//!   (`start_send_parts`), one `flush` — into an
//!   in-memory sink instead of a socket. Divide by N for instructions per delivery.
//!   `fanout_batch` does the same with 10 pushes queued before the connections run (a
//!   saturated server: each wake-up writes several frames).
//! - `delivery::idle`: one heartbeat round of N idle connections: each outbox's timer
//!   fires (a paused tokio clock, advanced by the runtime), it says `Idle`, and a ping is
//!   written. Divide by N for the per-connection idle cost.
//!
//! Setup (building the core, sessions, attachments, sockets) is not counted.

use std::{
    hint::black_box,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt};
use gungraun::{library_benchmark, library_benchmark_group, main};
use parley::{
    codec::{Encoding, Push},
    config::{Config, WsConfig},
    delivery::Target,
    proto::{self, server_frame::Kind},
    server::build_core,
    session::{Attachment, Conn, Core, Out, Outbox, OutboxConfig},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use yawc::{
    Role, WebSocket,
    frame::{Frame, OpCode},
};

// The binary's allocator (jemalloc by default), so that counts here match the server's.
parley::build_allocator!();

/// A socket that takes every write at once and never has anything to read.
#[derive(Default)]
struct Sink {
    written: usize,
    writes: usize,
}

impl AsyncRead for Sink {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for Sink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written += buf.len();
        self.writes += 1;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = bufs.iter().map(|b| b.len()).sum();
        self.written += n;
        self.writes += 1;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

const ROOM: &str = "bench";

/// A 100-byte body, like the load generator's.
fn push(seq: u64) -> Arc<Push> {
    Arc::new(Push::new(Kind::Message(proto::Message {
        room: ROOM.into(),
        seq,
        sender: "pub-1".into(),
        client_msg_id: "pub-1-12345".into(),
        body: format!("{}:{}", 123_456_789_012u64, "x".repeat(87)),
        ts: 1_764_000_000_000,
        ..Default::default()
    })))
}

/// One connection: its outbox (bound to an attached session) and its WebSocket.
struct Connection {
    outbox: Outbox,
    socket: WebSocket<Sink>,
    attachment: Attachment,
}

/// N connections in one room, with the runtime their timers belong to.
struct Bench {
    rt: tokio::runtime::Runtime,
    core: Arc<Core>,
    conns: Vec<Connection>,
}

fn setup(n: usize, paused: bool) -> Bench {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_time();
    if paused {
        builder.start_paused(true);
    }
    let rt = builder.build().expect("runtime");
    let mut config = Config::default();
    config.store.path = ":memory:".into();
    let core = build_core(config).expect("core builds");
    let hub = core.chat.hub().clone();
    let ws = WsConfig::default();
    let conns = {
        let _enter = rt.enter();
        (0..n)
            .map(|i| {
                let user = format!("u{i}");
                let session = core.sessions.create(&user).expect("no session limit here");
                hub.attach(session.clone());
                hub.joined(&user, ROOM, None);
                let attachment = session.attach().expect("fresh session attaches");
                // The attach wake-up is consumed, as a running connection would have.
                rt.block_on(attachment.ready());
                let mut outbox = Outbox::new(
                    Conn::bound(core.clone(), session, Some(attachment.clone())),
                    OutboxConfig {
                        idle: Some(ws.heartbeat_interval),
                        ..Default::default()
                    },
                    CancellationToken::new(),
                );
                assert!(outbox.ready().is_none());
                let options = parley::transport::ws::options(&ws);
                let socket =
                    WebSocket::from_stream(Sink::default(), Role::Server, options).expect("socket");
                Connection {
                    outbox,
                    socket,
                    attachment,
                }
            })
            .collect()
    };
    let mut b = Bench { rt, core, conns };
    // One delivery first, so the bench sees a running room (hub snapshot built, socket
    // buffers in use), not the first push after everyone joined.
    let delivered = b
        .core
        .chat
        .hub()
        .deliver(&Target::Room(ROOM.into()), &push(0));
    assert_eq!(delivered, n);
    assert_eq!(write_ready(&mut b), n);
    for c in &b.conns {
        // A wake-up left over from that push is consumed, as a waiting connection would.
        let _ = c.attachment.ready().now_or_never();
    }
    b
}

/// Every connection writes what its outbox has ready; returns the frames written.
fn write_ready(b: &mut Bench) -> usize {
    let mut frames = 0;
    for c in &mut b.conns {
        while let Some(out) = c.outbox.ready() {
            frames += write(&mut c.socket, out);
        }
    }
    frames
}

fn setup_fanout(n: usize) -> (Bench, Vec<Arc<Push>>) {
    (setup(n, false), vec![push(1)])
}

fn setup_fanout_batch(n: usize) -> (Bench, Vec<Arc<Push>>) {
    (setup(n, false), (1..=10).map(push).collect())
}

fn setup_idle(n: usize) -> Bench {
    setup(n, true)
}

/// What the WebSocket task does with one outbox item.
fn write(socket: &mut WebSocket<Sink>, out: Out) -> usize {
    let mut frames = 0;
    let done = async {
        match out {
            Out::Pushes(pushes) => {
                // As `transport::ws` writes pushes: the position and the shared body
                // copied straight into yawc's write buffer.
                for (pos, p) in pushes {
                    frames += 1;
                    std::future::poll_fn(|cx| socket.poll_ready_unpin(cx)).await?;
                    let (prefix, shared) = p.frame_parts(Encoding::Proto, pos);
                    assert!(socket.start_send_parts(
                        OpCode::Binary,
                        false,
                        prefix.as_slice(),
                        shared
                    ));
                }
                socket.flush().await
            }
            Out::Idle => {
                frames += 1;
                socket.send(Frame::ping(Bytes::new())).await
            }
            Out::Frame(_) | Out::Close(_) => Ok(()),
        }
    }
    .now_or_never();
    assert!(matches!(done, Some(Ok(()))), "the sink never blocks");
    frames
}

/// The measured part of both fan-out benches: each push through the hub, then every
/// connection writes what became ready.
fn deliver_and_write(mut b: Bench, pushes: Vec<Arc<Push>>) -> usize {
    let hub = b.core.chat.hub().clone();
    let target = Target::Room(ROOM.into());
    let mut delivered = 0;
    for p in &pushes {
        delivered += hub.deliver(&target, black_box(p));
    }
    let frames = write_ready(&mut b);
    assert_eq!(frames, delivered);
    std::mem::forget(b);
    black_box(frames)
}

#[library_benchmark]
#[bench::n100(args = (100), setup = setup_fanout)]
#[bench::n1000(args = (1000), setup = setup_fanout)]
fn fanout((b, pushes): (Bench, Vec<Arc<Push>>)) -> usize {
    deliver_and_write(b, pushes)
}

#[library_benchmark]
#[bench::n100(args = (100), setup = setup_fanout_batch)]
#[bench::n1000(args = (1000), setup = setup_fanout_batch)]
fn fanout_batch((b, pushes): (Bench, Vec<Arc<Push>>)) -> usize {
    deliver_and_write(b, pushes)
}

#[library_benchmark]
#[bench::n100(args = (100), setup = setup_idle)]
#[bench::n1000(args = (1000), setup = setup_idle)]
fn idle(mut b: Bench) -> usize {
    let mut pings = 0;
    let rt = &b.rt;
    for c in &mut b.conns {
        let out = rt.block_on(c.outbox.next());
        assert!(matches!(out, Out::Idle));
        pings += write(&mut c.socket, out);
    }
    std::mem::forget(b);
    black_box(pings)
}

library_benchmark_group!(name = delivery, benchmarks = [fanout, fanout_batch, idle]);

main!(library_benchmark_groups = delivery);
