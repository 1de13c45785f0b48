//! `/ws`: the WebSocket transport (yawc: RFC 6455 with permessage-deflate support, and an
//! axum extractor).
//!
//! Encoding is chosen by subprotocol (`parley.v1.proto` binary, `parley.v1.json` text,
//! config default when none is offered). One task per connection drives reads, writes,
//! heartbeats and the auth deadline with a `select!`; pushes are written in batches (feed
//! many frames, one flush).

use std::time::Duration;

use axum::{
    body::Body,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, stream::FuturesOrdered};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::Instrument;
use yawc::{
    HttpWebSocket, IncomingUpgrade, Options,
    close::CloseCode,
    frame::{Frame, OpCode},
};

use super::{BATCH, origin_allowed};
use crate::{
    codec::{self, Encoding},
    metrics::TransportLabel,
    proto::{ErrorCode, ServerFrame},
    server::AppState,
    session::{
        Conn, Outcome,
        conn::{CloseReason, LaterReply},
    },
};

const LABEL: TransportLabel = TransportLabel { transport: "ws" };
/// Most commands one connection may have waiting for their replies.
const MAX_IN_FLIGHT: usize = 64;

/// Picks the encoding from the offered subprotocols: the first one parley knows.
/// `Ok(None)` when none was offered, `Err` when only unknown ones were.
fn negotiate(headers: &HeaderMap) -> Result<Option<Encoding>, ()> {
    let mut offered = false;
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let Ok(value) = value.to_str() else { continue };
        for name in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            offered = true;
            if let Some(e) = Encoding::from_subprotocol(name) {
                return Ok(Some(e));
            }
        }
    }
    if offered { Err(()) } else { Ok(None) }
}

pub async fn handler(
    State(app): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    upgrade: IncomingUpgrade,
) -> Response {
    if !origin_allowed(&app.core.config.server, &headers, &uri) {
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    if app.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let (encoding, echo) = match negotiate(&headers) {
        Ok(Some(e)) => (e, true),
        Ok(None) => (app.core.config.ws.default_encoding, false),
        Err(()) => {
            return (
                StatusCode::BAD_REQUEST,
                "unsupported subprotocol: offer parley.v1.proto or parley.v1.json",
            )
                .into_response();
        }
    };
    let ws = &app.core.config.ws;
    // yawc enforces a hard ceiling above parley's limit (closing with 1009 itself); frames
    // between the two get parley's FRAME_TOO_LARGE error and disconnect frame first.
    let hard_limit = ws
        .max_frame_bytes
        .saturating_mul(2)
        .max(ws.max_frame_bytes + 65536);
    let options = Options::default()
        .with_max_payload_read(hard_limit)
        .with_max_read_buffer(hard_limit)
        .with_read_buffer_capacity(ws.read_buffer_bytes)
        .with_write_buffer_capacity(ws.write_buffer_bytes)
        .with_no_delay();
    let (mut response, fut) = match upgrade.upgrade(options) {
        Ok(pair) => pair,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    if echo {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(encoding.subprotocol()),
        );
    }
    let span = tracing::info_span!("ws", enc = ?encoding, user = tracing::field::Empty);
    let tracker = app.tracker.clone();
    tracker.spawn(
        async move {
            match fut.await {
                Ok(socket) => run(socket, app, encoding).await,
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        }
        .instrument(span),
    );
    response.map(Body::new)
}

/// Writes frames for one connection, counting them.
struct Writer {
    socket: HttpWebSocket,
    encoding: Encoding,
    app: AppState,
}

impl Writer {
    fn data_frame(&self, bytes: Bytes) -> Frame {
        match self.encoding {
            Encoding::Proto => Frame::binary(bytes),
            Encoding::Json => Frame::text(bytes),
        }
    }

    async fn send(&mut self, frame: &ServerFrame) -> yawc::Result<()> {
        let f = self.data_frame(codec::encode_server(self.encoding, frame));
        self.app.core.metrics.frames_out.get_or_create(&LABEL).inc();
        self.socket.send(f).await
    }

    /// Announces the close with a `disconnect` frame, then closes with the same code.
    async fn close(&mut self, why: CloseReason) {
        let write_timeout = self.app.core.config.ws.write_timeout;
        let _ = timeout(write_timeout, async {
            self.send(&why.frame()).await?;
            self.socket
                .send(Frame::close(CloseCode::from(why.code()), why.reason()))
                .await
        })
        .await;
    }

    /// Writes every queued push (batched: feed, then one flush).
    async fn drain(&mut self, conn: &Conn) -> Result<(), CloseReason> {
        loop {
            let pushes = conn.take(BATCH)?;
            if pushes.is_empty() {
                return Ok(());
            }
            let n = pushes.len() as u64;
            let write_timeout = self.app.core.config.ws.write_timeout;
            let write = async {
                for (pos, push) in pushes {
                    let f = self.data_frame(push.frame(self.encoding, pos));
                    self.socket.feed(f).await?;
                }
                self.socket.flush().await
            };
            match timeout(write_timeout, write).await {
                Ok(Ok(())) => {
                    self.app
                        .core
                        .metrics
                        .frames_out
                        .get_or_create(&LABEL)
                        .inc_by(n);
                }
                // A dead socket: the session keeps the pushes for a resume.
                Ok(Err(_)) => return Err(CloseReason::SessionExpired),
                Err(_) => return Err(CloseReason::SlowConsumer),
            }
        }
    }
}

/// Drives one connection until it closes.
async fn run(socket: HttpWebSocket, app: AppState, encoding: Encoding) {
    let metrics = app.core.metrics.clone();
    metrics.connections.get_or_create(&LABEL).inc();
    let config = app.core.config.ws.clone();
    let auth_deadline = Instant::now() + app.core.config.auth.connect_timeout;
    let mut conn = Conn::new(app.core.clone());
    let shutdown = app.shutdown.clone();
    let mut w = Writer {
        socket,
        encoding,
        app,
    };
    let mut heartbeat = tokio::time::interval_at(
        Instant::now() + config.heartbeat_interval,
        config.heartbeat_interval,
    );
    let silence_limit = config.heartbeat_interval + config.pong_timeout;
    let mut last_seen = Instant::now();
    // Replies still waiting for their commit (pipelined sends), in command order.
    let mut in_flight: FuturesOrdered<LaterReply> = FuturesOrdered::new();
    // Whether the connection's span has its user yet.
    let mut named = false;

    let close: Option<CloseReason> = loop {
        let attachment = conn.attachment().cloned();
        tokio::select! {
            // Biased, in this order: a reply that is ready goes out before pushes queued
            // after it (a sender sees its `sent` before its own message).
            biased;
            _ = shutdown.cancelled() => break Some(CloseReason::ShuttingDown),
            Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                if w.send(&reply).await.is_err() {
                    break None;
                }
            }
            // Stop reading while too many replies are pending: backpressure on a client
            // that pipelines faster than the store commits.
            frame = w.socket.next_frame(), if in_flight.len() < MAX_IN_FLIGHT => {
                let frame = match frame {
                    Ok(f) => f,
                    Err(_) => {
                        // yawc may have queued a close frame (e.g. 1009 past the hard
                        // limit); let it out.
                        let _ = timeout(Duration::from_secs(1), w.socket.flush()).await;
                        break None;
                    }
                };
                last_seen = Instant::now();
                match frame.opcode() {
                    OpCode::Text | OpCode::Binary => {}
                    OpCode::Close => {
                        // A deliberate goodbye: no resume will follow. yawc queued the
                        // close reply; let it out.
                        conn.end();
                        let _ = timeout(Duration::from_secs(1), w.socket.flush()).await;
                        break None;
                    }
                    _ => continue,
                }
                metrics.frames_in.get_or_create(&LABEL).inc();
                if frame.payload().len() > config.max_frame_bytes {
                    let msg = format!("frame exceeds {} bytes", config.max_frame_bytes);
                    let _ = w.send(&conn.error(ErrorCode::FrameTooLarge, msg)).await;
                    break Some(CloseReason::FrameTooLarge);
                }
                let outcome = match codec::decode_client(encoding, frame.payload()) {
                    // Boxed: the command's state lives on the heap while it runs, not
                    // in every idle connection's task.
                    Ok(f) => Box::pin(conn.handle(f)).await,
                    Err(e) => Outcome::Reply(conn.bad_frame(e)),
                };
                let sent = match outcome {
                    Outcome::Reply(reply) => w.send(&reply).await,
                    Outcome::Silent => Ok(()),
                    Outcome::Later(reply) => {
                        in_flight.push_back(reply);
                        Ok(())
                    }
                    Outcome::Close(reply, why) => {
                        let _ = w.send(&reply).await;
                        break Some(why);
                    }
                };
                if sent.is_err() {
                    break None;
                }
                if !named && let Some(session) = conn.session() {
                    tracing::Span::current().record("user", session.user_id());
                    named = true;
                }
                if let Err(why) = Box::pin(w.drain(&conn)).await {
                    break Some(why);
                }
            }
            _ = async { attachment.as_ref().expect("guarded").ready().await }, if attachment.is_some() => {
                // Let pushes that arrive together leave in one write (see ws.coalesce).
                if !config.coalesce.is_zero() {
                    tokio::time::sleep(config.coalesce).await;
                }
                if let Err(why) = Box::pin(w.drain(&conn)).await {
                    break Some(why);
                }
            }
            _ = sleep_until(auth_deadline), if !conn.is_connected() => {
                let frame = conn.error(ErrorCode::AuthTimeout, "no connect within the auth timeout");
                let _ = w.send(&frame).await;
                break Some(CloseReason::AuthTimeout);
            }
            _ = heartbeat.tick() => {
                if last_seen.elapsed() >= silence_limit {
                    break Some(CloseReason::HeartbeatTimeout);
                }
                if timeout(Duration::from_secs(5), w.socket.send(Frame::ping(Bytes::new()))).await.is_err() {
                    break Some(CloseReason::SlowConsumer);
                }
            }
        }
    };
    if let Some(why) = close {
        tracing::debug!(code = why.code(), reason = why.reason(), "closing");
        Box::pin(w.close(why)).await;
    }
    conn.detach();
    metrics.connections.get_or_create(&LABEL).dec();
}
