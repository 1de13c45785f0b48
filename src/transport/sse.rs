//! `/sse`: Server-Sent Events, the fallback for proxies that break WebSocket.
//!
//! `GET /sse?ticket=T` (or with an `Authorization: Bearer` header) opens a session and
//! streams it as `text/event-stream`: first the `connected` reply (no `id:`), then every
//! push as `id: <pos>` + `data: <JSON frame>`. Because the event id is the session
//! position, the browser's automatic reconnect sends `Last-Event-ID` and resumes exactly
//! after the last event it saw, with no client code (see `session::tickets` for how the
//! used ticket allows that one reconnect path). Idle streams get `: ping` comments; a
//! `retry:` hint tells the browser when to reconnect. Commands go to `POST /session/{id}`.

use std::{sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use bytes::{BufMut, BytesMut};
use futures_util::stream;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::{BATCH, origin_allowed};
use crate::{
    api::{ApiError, authenticate},
    codec::{self, Encoding, Push},
    metrics::{Metrics, TransportLabel},
    proto::{ErrorCode, ServerFrame, server_frame::Kind},
    server::AppState,
    session::{CloseReason, Conn, tickets::Redeemed},
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

fn event(out: &mut BytesMut, id: Option<u64>, data: &[u8]) {
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(itoa::Buffer::new().format(id).as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"data: ");
    // JSON frames never contain raw newlines, so one data line holds the frame.
    out.put_slice(data);
    out.put_slice(b"\n\n");
}

fn frame_event(out: &mut BytesMut, frame: &ServerFrame) {
    event(out, None, &codec::encode_server(Encoding::Json, frame));
}

/// Per-stream state; detaches the session when the stream is dropped (client gone).
struct Stream {
    conn: Conn,
    metrics: Arc<Metrics>,
    heartbeat: tokio::time::Interval,
    shutdown: CancellationToken,
    first: Option<Bytes>,
    done: bool,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.conn.detach();
        self.metrics.connections.get_or_create(&LABEL).dec();
    }
}

impl Stream {
    /// The next chunk to write: a batch of events, a heartbeat, or the final disconnect.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        if self.done {
            return None;
        }
        loop {
            let attachment = self.conn.attachment()?.clone();
            match self.conn.take(BATCH) {
                Ok(pushes) if !pushes.is_empty() => return Some(self.events(&pushes)),
                Ok(_) => {}
                Err(why) => return Some(self.close(why)),
            }
            tokio::select! {
                _ = attachment.ready() => {}
                _ = self.heartbeat.tick() => return Some(Bytes::from_static(b": ping\n\n")),
                _ = self.shutdown.cancelled() => return Some(self.close(CloseReason::ShuttingDown)),
            }
        }
    }

    fn events(&self, pushes: &[(u64, Arc<Push>)]) -> Bytes {
        let mut out = BytesMut::new();
        for (pos, push) in pushes {
            event(&mut out, Some(*pos), &push.frame(Encoding::Json, *pos));
        }
        self.metrics
            .frames_out
            .get_or_create(&LABEL)
            .inc_by(pushes.len() as u64);
        out.freeze()
    }

    fn close(&mut self, why: CloseReason) -> Bytes {
        self.done = true;
        let mut out = BytesMut::new();
        frame_event(&mut out, &why.frame());
        out.freeze()
    }
}

pub async fn handler(
    State(app): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<SseQuery>,
) -> Response {
    if !origin_allowed(&app.core.config.server, &headers, &uri) {
        return ApiError::new(ErrorCode::Forbidden, "origin not allowed").into_response();
    }
    if app.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let core = &app.core;
    let (user, session_id, last_pos) = match &q.ticket {
        Some(ticket) => match core.tickets.redeem(ticket, last_event_id.is_some()) {
            Ok(Redeemed::Fresh { user }) => (user, q.session_id.clone(), q.last_pos),
            Ok(Redeemed::Resume { user, session_id }) => (user, Some(session_id), last_event_id),
            Err(e) => {
                core.metrics.error(ErrorCode::Unauthorized);
                return ApiError::new(ErrorCode::Unauthorized, e.to_string()).into_response();
            }
        },
        None => match authenticate(&app, &headers) {
            Ok(user) => (user, q.session_id.clone(), last_event_id.or(q.last_pos)),
            Err(e) => return e.into_response(),
        },
    };
    let heartbeat = core.config.sse.heartbeat_interval;
    let opened = core
        .open_session(
            &user,
            session_id.as_deref().unwrap_or(""),
            last_pos.unwrap_or(0),
            heartbeat,
            true,
        )
        .await;
    let (session, attachment, connected) = match opened {
        Ok(opened) => opened,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let Some(attachment) = attachment else {
        return ApiError::new(ErrorCode::SessionNotFound, "session ended").into_response();
    };
    if let Some(ticket) = &q.ticket {
        core.tickets.bind(ticket, session.id());
    }
    if q.receive_only {
        session.set_receive_only();
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
            kind: Some(Kind::Connected(connected)),
        },
    );
    core.metrics.connections.get_or_create(&LABEL).inc();
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + heartbeat,
        heartbeat.max(Duration::from_millis(10)),
    );
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = Stream {
        conn: Conn::bound(core.clone(), session, Some(attachment)),
        metrics: core.metrics.clone(),
        heartbeat,
        shutdown: app.shutdown.clone(),
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
