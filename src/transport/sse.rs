//! `/sse`: Server-Sent Events, the fallback for proxies that break WebSocket.
//!
//! `GET /sse?ticket=T` (or with an `Authorization: Bearer` header) opens a session and
//! streams it as `text/event-stream`: first the `connected` reply (no `id:`), then every
//! push as `id: <pos>` + `data: <JSON frame>`. Because the event id is the session
//! position, the browser's automatic reconnect sends `Last-Event-ID` and resumes exactly
//! after the last event it saw, with no client code (see `session::tickets` for how the
//! used ticket allows that one reconnect path). Idle streams get `: ping` comments; a
//! `retry:` hint tells the browser when to reconnect. Commands go to `POST /session/{id}`.
//!
//! The stream only frames what the connection's [`Outbox`] hands it; the connect (ticket
//! or bearer) goes through the session layer's one connect path. Writes are bounded by
//! `sse.write_timeout` (see `transport::deadline`).

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use crate::metrics::HotCounter;
use axum::{
    Extension,
    body::{Body, Bytes},
    extract::{Query, State, rejection::QueryRejection},
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use bytes::{BufMut, BytesMut};
use http_body::{Body as _, Frame};
use hyper::{
    ext::DetachBody,
    upgrade::{OnUpgrade, Upgraded},
};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use std::io::IoSlice;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{
    Ctx,
    bearer::{ApiError, bearer},
    deadline::WriteDeadline,
    origin_allowed,
};
use crate::{
    codec::{self, Encoding, Push},
    metrics::TransportLabel,
    proto::{ErrorCode, ServerFrame, server_frame::Kind},
    session::{Conn, ConnectRequest, Credential, Out, Outbox, OutboxConfig, Wait},
};

const LABEL: TransportLabel = TransportLabel { transport: "sse" };

#[derive(Deserialize)]
pub struct SseQuery {
    ticket: Option<String>,
    /// Explicit resume (e.g. after getting a new ticket): session and last position.
    session_id: Option<String>,
    last_pos: Option<u64>,
    /// A listen-only stream: the session refuses commands other than ack and ping.
    #[serde(default)]
    receive_only: bool,
}

/// One event: `id:` when given, then the JSON frame `write` appends as its data line.
fn event(out: &mut BytesMut, id: Option<u64>, write: impl FnOnce(&mut BytesMut)) {
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(itoa::Buffer::new().format(id).as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"data: ");
    // JSON frames never contain raw newlines, so one data line holds the frame.
    write(out);
    out.put_slice(b"\n\n");
}

fn frame_event(out: &mut BytesMut, frame: &ServerFrame) {
    let json = codec::encode_server(Encoding::Json, frame);
    event(out, None, |out| out.put_slice(&json));
}

/// Per-stream state. Dropping it (client gone) drops the outbox, which detaches the
/// session.
struct Stream {
    /// (The server's metrics, for the connection count's decrement, are the outbox's.)
    outbox: Outbox,
    /// This transport's counter, looked up once (not a labelled-family lookup per chunk).
    frames_out: HotCounter,
    first: Option<Bytes>,
    // (Whether the final event went is the outbox's `closed`: a flag here took 8 B.)
}

impl Drop for Stream {
    fn drop(&mut self) {
        let connections = &self.outbox.metrics().connections;
        connections.get_or_create(&LABEL).dec();
    }
}

pin_project_lite::pin_project! {
    /// The response body: the stream's state and the outbox's wait on it, side by side
    /// (`session::Wait`, as a pending long-poll holds them), so the body is a type with
    /// a name that axum boxes once. It was `stream::unfold` over an `async fn`: the
    /// state, and beside it the `async fn`'s frame (a borrow of the state, the outbox's
    /// `Next`), in a 400 B box; this one is 352 ([`tests::an_idle_stream_stays_small`]).
    /// Every idle stream holds it.
    struct Events {
        stream: Stream,
        #[pin]
        wait: Wait,
    }
}

impl http_body::Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    /// The next chunk to write: the retry hint, a reply, a batch of events, a heartbeat
    /// comment, or the final disconnect; then the end.
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let mut this = self.project();
        let s = this.stream;
        if let Some(first) = s.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if s.outbox.closed() {
            return Poll::Ready(None);
        }
        let next = ready!(this.wait.as_mut().poll_next(&mut s.outbox, cx));
        // The next chunk waits afresh (as a new `Outbox::next` would).
        this.wait.set(Wait::new());
        let mut out = BytesMut::new();
        match next {
            Out::Frame(frame) => {
                frame_event(&mut out, &frame);
                s.count(1);
            }
            Out::Pushes(pushes) => {
                s.events(&mut out, &pushes);
                s.count(pushes.len() as u64);
            }
            Out::Idle => {
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b": ping\n\n")))));
            }
            Out::Close(why) => {
                // The last event: the outbox is closed now, and the body ends next.
                frame_event(&mut out, &why.frame());
            }
        }
        Poll::Ready(Some(Ok(Frame::data(out.freeze()))))
    }
}

impl Stream {
    /// A batch's events in one buffer of the size they need (up to `BATCH` events, tens
    /// of KiB in a big room's join burst: grown by doubling, the buffer was allocated
    /// up to ten times per batch).
    fn events(&self, out: &mut BytesMut, pushes: &[(u64, Arc<Push>)]) {
        // Per event, beside its frame: `id: ` + at most 20 digits + `\n`, `data: `,
        // `\n\n`.
        const FRAMING: usize = 4 + 20 + 1 + 6 + 2;
        let size = pushes
            .iter()
            .map(|(pos, push)| {
                let (prefix, shared) = push.frame_parts(Encoding::Json, *pos);
                prefix.len() + shared.len() + FRAMING
            })
            .sum();
        out.reserve(size);
        for (pos, push) in pushes {
            event(out, Some(*pos), |out| {
                let (prefix, shared) = push.frame_parts(Encoding::Json, *pos);
                out.put_slice(prefix.as_slice());
                out.put_slice(shared);
            });
        }
    }

    fn count(&self, n: u64) {
        self.frames_out.inc_by(n);
    }
}

pub async fn handler(
    State(ctx): State<Ctx>,
    deadline: Option<Extension<WriteDeadline>>,
    detach: Option<Extension<OnUpgrade>>,
    headers: HeaderMap,
    uri: Uri,
    query: Result<Query<SseQuery>, QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(rejected) => return ApiError::from(rejected).into_response(),
    };
    if !origin_allowed(&ctx.core.config.server, &headers, &uri) {
        return ApiError::new(ErrorCode::Forbidden, "origin not allowed").into_response();
    }
    if ctx.shutting_down() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let core = &ctx.core;
    let credential = match (&q.ticket, bearer(&headers)) {
        (Some(ticket), _) => Credential::Ticket {
            ticket,
            reconnect: last_event_id.is_some(),
        },
        (None, Some(token)) => Credential::Token(token),
        (None, None) => {
            core.metrics.error(ErrorCode::Unauthorized);
            return ApiError::new(
                ErrorCode::Unauthorized,
                "give ?ticket= or Authorization: Bearer",
            )
            .into_response();
        }
    };
    let heartbeat = core.config.sse.heartbeat_interval;
    let request = ConnectRequest {
        credential,
        session_id: q.session_id.as_deref().unwrap_or(""),
        last_pos: last_event_id.or(q.last_pos).unwrap_or(0),
        attach: true,
        heartbeat,
        receive_only: q.receive_only,
    };
    let opened = match core.connect(request).await {
        Ok(opened) => opened,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let Some(attachment) = opened.attachment else {
        return ApiError::new(ErrorCode::SessionNotFound, "session ended").into_response();
    };
    if let Some(Extension(d)) = deadline {
        d.set(core.config.sse.write_timeout);
    }

    let mut first = BytesMut::new();
    first.put_slice(b"retry: ");
    first.put_slice(
        itoa::Buffer::new()
            .format(core.config.sse.retry.as_millis())
            .as_bytes(),
    );
    first.put_u8(b'\n');
    frame_event(
        &mut first,
        &ServerFrame {
            id: 0,
            pos: 0,
            kind: Some(Kind::Connected(opened.connected)),
        },
    );
    core.metrics.connections.get_or_create(&LABEL).inc();
    let outbox = Outbox::new(
        Conn::bound(core.clone(), opened.session, Some(attachment)),
        OutboxConfig {
            idle: Some(heartbeat),
            ..Default::default()
        },
        ctx.connection_shutdown(),
    );
    let state = Stream {
        outbox,
        frames_out: core.metrics.frames_out.get_or_create(&LABEL).clone(),
        first: Some(first.freeze()),
    };
    let body = Events {
        stream: state,
        wait: Wait::new(),
    };
    let mut response = match detach {
        // HTTP/1.1: hyper writes the head and hands the socket over; this stream's own
        // task writes the body ([`stream_detached`]), without hyper's connection beside it.
        Some(Extension(upgrade)) => {
            ctx.tracker.spawn(stream_detached(upgrade, body));
            let mut response = Body::empty().into_response();
            response.extensions_mut().insert(DetachBody);
            response.headers_mut().insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
            response
        }
        // HTTP/2 (and HTTP/1.1 without the detach): hyper streams the body.
        None => Body::new(body).into_response(),
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The body of an SSE stream over HTTP/1.1 after hyper has written its head and handed
/// the socket over (vendor/hyper change 9, `detach_event_streams`): the events as chunks
/// of the chunked body the head announced, as hyper would frame them, then the last
/// chunk. An idle stream so holds its socket, its events and this task, not hyper's
/// HTTP/1 connection (its task, buffers and state, ~1.2 KB). The client sends nothing on
/// this connection after its request (its commands go on another): anything it sends,
/// or its close, ends the stream. Writes are bounded by `sse.write_timeout` through the
/// socket's own deadline, as before the hand-over.
///
/// Hand-written rather than an `async` block: the block kept the `select!` between the
/// events and the client's byte, the chunk writer's frame and a `Frame` (with room for
/// trailers) beside the events, a 784 B future in an 896 B task; this one keeps the
/// chunk being written and little else ([`tests::a_detached_stream_stays_small`]). (An
/// `async fn` was worse still, 1,408 B: it kept its `events` argument and the pinned
/// local beside each other.)
fn stream_detached(upgrade: OnUpgrade, events: Events) -> Detached {
    Detached {
        events,
        io: Io::Upgrading(upgrade),
        step: Step::Idle,
        head: [0; 18],
        head_len: 0,
        sent: 0,
        data: Bytes::new(),
    }
}

/// Where a detached stream's socket is.
enum Io {
    /// hyper has not yet written the head and handed the socket over.
    Upgrading(OnUpgrade),
    Open(TokioIo<Upgraded>),
}

/// What a detached stream is doing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Waiting for the next event (and watching for the client's close).
    Idle,
    /// Writing a chunk: `head` (its size line), `data`, CRLF.
    Chunk,
    /// Flushing the chunk written.
    Flush,
    /// Writing the last chunk, then shutting the socket.
    Last,
    Shutdown,
}

pin_project_lite::pin_project! {
    /// [`stream_detached`]'s future.
    struct Detached {
        #[pin]
        events: Events,
        io: Io,
        step: Step,
        // The chunk being written: its size line, its data, then CRLF; `sent` bytes of
        // the three are written (a `u32`, beside the head's bytes: 8 B less, and the
        // task's cell 512 B, not 640; a chunk is one batch of events, far below 4 GiB,
        // and a larger one would end the stream).
        head: [u8; 18],
        head_len: u8,
        sent: u32,
        data: Bytes,
    }
}

impl Future for Detached {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if let Io::Upgrading(upgrade) = this.io {
            match ready!(Pin::new(upgrade).poll(cx)) {
                Ok(upgraded) => *this.io = Io::Open(TokioIo::new(upgraded)),
                // The head could not be written (the client went away first).
                Err(_) => return Poll::Ready(()),
            }
        }
        let Io::Open(io) = this.io else {
            unreachable!("open above")
        };
        loop {
            match *this.step {
                Step::Idle => match this.events.as_mut().poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        // An empty chunk would end the body; `Events` yields only data.
                        if let Ok(data) = frame.into_data()
                            && !data.is_empty()
                        {
                            if u32::try_from(data.len() + this.head.len() + 2).is_err() {
                                let bytes = data.len();
                                tracing::warn!(bytes, "an SSE chunk over 4 GiB: ending the stream");
                                return Poll::Ready(());
                            }
                            *this.head_len = format_chunk_size(this.head, data.len()) as u8;
                            *this.data = data;
                            *this.sent = 0;
                            *this.step = Step::Chunk;
                        }
                    }
                    Poll::Ready(None) => {
                        this.head[..3].copy_from_slice(b"0\r\n");
                        *this.head_len = 3;
                        *this.data = Bytes::new();
                        *this.sent = 0;
                        *this.step = Step::Last;
                    }
                    Poll::Pending => {
                        // The client sends nothing after its request: a byte, its close
                        // or an error ends the stream.
                        let mut probe = [0u8; 1];
                        let mut buf = ReadBuf::new(&mut probe);
                        return match Pin::new(&mut *io).poll_read(cx, &mut buf) {
                            Poll::Ready(_) => Poll::Ready(()),
                            Poll::Pending => Poll::Pending,
                        };
                    }
                },
                Step::Chunk | Step::Last => {
                    let head = &this.head[..*this.head_len as usize];
                    let parts: [&[u8]; 3] = [head, this.data, b"\r\n"];
                    // Within `u32` (checked when the chunk was taken).
                    let total = head.len() + this.data.len() + 2;
                    // One vectored write where the socket takes it all (as hyper's
                    // chunked encoder writes a chunk).
                    while (*this.sent as usize) < total {
                        let mut skip = *this.sent as usize;
                        let mut bufs = [IoSlice::new(&[]); 3];
                        let mut n = 0;
                        for part in parts {
                            if skip >= part.len() {
                                skip -= part.len();
                            } else {
                                bufs[n] = IoSlice::new(&part[skip..]);
                                skip = 0;
                                n += 1;
                            }
                        }
                        match ready!(Pin::new(&mut *io).poll_write_vectored(cx, &bufs[..n])) {
                            Ok(0) | Err(_) => return Poll::Ready(()),
                            // At most `total - sent`: within `u32`.
                            Ok(written) => *this.sent += written as u32,
                        }
                    }
                    // The chunk's buffer goes back now, not when the next event comes.
                    *this.data = Bytes::new();
                    *this.step = if *this.step == Step::Last {
                        Step::Shutdown
                    } else {
                        Step::Flush
                    };
                }
                Step::Flush => {
                    if ready!(Pin::new(&mut *io).poll_flush(cx)).is_err() {
                        return Poll::Ready(());
                    }
                    *this.step = Step::Idle;
                }
                Step::Shutdown => {
                    let _ = ready!(Pin::new(&mut *io).poll_shutdown(cx));
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// `len` in hex and CRLF into `out`; returns how many bytes.
fn format_chunk_size(out: &mut [u8; 18], len: usize) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = ((usize::BITS - len.leading_zeros()).div_ceil(4)).max(1) as usize;
    for i in 0..digits {
        out[digits - 1 - i] = HEX[(len >> (4 * i)) & 0xf];
    }
    out[digits] = b'\r';
    out[digits + 1] = b'\n';
    digits + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every idle SSE stream holds its body (in axum's body box): the stream's state
    /// and the outbox's wait, nothing more (debug build: `Stream` 280, `Wait` 72;
    /// `stream::unfold` was 400).
    #[test]
    fn an_idle_stream_stays_small() {
        let events = std::mem::size_of::<Events>();
        let stream = std::mem::size_of::<Stream>();
        let wait = std::mem::size_of::<Wait>();
        eprintln!("Events {events} B: Stream {stream}, Wait {wait}");
        assert!(
            events <= stream + wait && events <= 352,
            "an idle stream's body is {events} bytes (Stream {stream}, Wait {wait})"
        );
    }

    /// A detached stream's task holds its events, its socket and the chunk being
    /// written: the `async` block it replaced was a 784 B future (an 896 B task). A
    /// tokio task is its future plus 104 B in cells of 128 B, and the task tracker adds
    /// 8 B: at most 400 B is a 512 B cell (it was 424 B, a 640 B cell, until the stream
    /// kept no metrics handle and no `done` flag of its own, and `sent` a `u32`).
    #[test]
    fn a_detached_stream_stays_small() {
        let detached = std::mem::size_of::<Detached>();
        let events = std::mem::size_of::<Events>();
        eprintln!("Detached {detached} B (Events {events})");
        assert!(
            detached <= events + 128 && detached <= 400,
            "a detached stream's future is {detached} bytes (Events {events})"
        );
    }
}
