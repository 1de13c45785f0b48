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

use std::sync::Arc;

use crate::metrics::HotCounter;
use axum::{
    Extension,
    body::{Body, Bytes},
    extract::{Query, State, rejection::QueryRejection},
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use bytes::{BufMut, BytesMut};
use futures_util::stream;
use serde::Deserialize;

use super::{
    Ctx,
    bearer::{ApiError, bearer},
    deadline::WriteDeadline,
    origin_allowed,
};
use crate::{
    codec::{self, Encoding, Push},
    metrics::{Metrics, TransportLabel},
    proto::{ErrorCode, ServerFrame, server_frame::Kind},
    session::{Conn, ConnectRequest, Credential, Out, Outbox, OutboxConfig},
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
    outbox: Outbox,
    metrics: Arc<Metrics>,
    /// This transport's counter, looked up once (not a labelled-family lookup per chunk).
    frames_out: HotCounter,
    first: Option<Bytes>,
    done: bool,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.metrics.connections.get_or_create(&LABEL).dec();
    }
}

impl Stream {
    /// The next chunk to write: the retry hint, a reply, a batch of events, a heartbeat
    /// comment, or the final disconnect.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        if self.done {
            return None;
        }
        // Nothing held across the wait but the outbox's own future: every idle stream
        // holds this future.
        let next = self.outbox.next().await;
        let mut out = BytesMut::new();
        match next {
            Out::Frame(frame) => {
                frame_event(&mut out, &frame);
                self.count(1);
            }
            Out::Pushes(pushes) => {
                self.events(&mut out, &pushes);
                self.count(pushes.len() as u64);
            }
            Out::Idle => return Some(Bytes::from_static(b": ping\n\n")),
            Out::Close(why) => {
                self.done = true;
                frame_event(&mut out, &why.frame());
            }
        }
        Some(out.freeze())
    }

    fn events(&self, out: &mut BytesMut, pushes: &[(u64, Arc<Push>)]) {
        for (pos, push) in pushes {
            event(out, Some(*pos), |out| {
                push.write_frame(Encoding::Json, *pos, out)
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
        metrics: core.metrics.clone(),
        frames_out: core.metrics.frames_out.get_or_create(&LABEL).clone(),
        first: Some(first.freeze()),
        done: false,
    };
    let body = stream::unfold(state, |mut s| async move {
        let chunk = s.next_chunk().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), s))
    });
    let mut response = Body::from_stream(body).into_response();
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
