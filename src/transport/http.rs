//! The command endpoint of the HTTP transports. SSE and long-poll only carry frames
//! downstream; a client sends its commands as POSTs, authenticated with its bearer token:
//!
//! - `POST /session` with a `connect` frame opens (or resumes) a session without
//!   attaching a transport, and answers `connected`; long-poll clients start here.
//! - `POST /session/{id}` with any other frame runs it on that session and answers with
//!   the reply frame (`204 No Content` for `ack`). Replies come in the POST response,
//!   never on the stream; pushes come on the stream.
//!
//! Bodies are one JSON frame, or one protobuf frame with `Content-Type:
//! application/x-protobuf` (the reply then comes as protobuf too).

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use crate::{
    api::{ApiError, authenticate},
    codec::{self, Encoding},
    metrics::TransportLabel,
    proto::{ErrorCode, ServerFrame, client_frame::Cmd, server_frame::Kind},
    server::AppState,
    session::{Conn, Outcome, Session},
};

pub const PROTOBUF: &str = "application/x-protobuf";
const LABEL: TransportLabel = TransportLabel { transport: "http" };

/// The encoding a request body is in.
pub fn body_encoding(headers: &HeaderMap) -> Encoding {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct.starts_with(PROTOBUF) {
        Encoding::Proto
    } else {
        Encoding::Json
    }
}

/// One frame as an HTTP response body.
pub fn frame_response(status: StatusCode, encoding: Encoding, frame: &ServerFrame) -> Response {
    let content_type = match encoding {
        Encoding::Proto => PROTOBUF,
        Encoding::Json => "application/json",
    };
    let mut r = (status, codec::encode_server(encoding, frame)).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The caller's session `id`, or the error to answer with.
pub fn owned_session(app: &AppState, user: &str, id: &str) -> Result<Arc<Session>, ApiError> {
    app.core
        .sessions
        .get(id)
        .filter(|s| s.user_id() == user)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::SessionNotFound,
                "no such session: connect again and sync",
            )
        })
}

/// `POST /session`: a `connect` frame opens or resumes a session.
pub async fn connect(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let encoding = body_encoding(&headers);
    app.core.metrics.frames_in.get_or_create(&LABEL).inc();
    let frame = match codec::decode_client(encoding, &body) {
        Ok(f) => f,
        Err(e) => {
            let conn = Conn::new(app.core.clone());
            return frame_response(StatusCode::BAD_REQUEST, encoding, &conn.bad_frame(e));
        }
    };
    let Some(Cmd::Connect(c)) = frame.cmd else {
        return ApiError::new(
            ErrorCode::InvalidArgument,
            "POST /session takes a connect frame",
        )
        .into_response();
    };
    // The bearer header, or else the token in the frame.
    let user = match authenticate(&app, &headers) {
        Ok(u) => u,
        Err(e) if c.token.is_empty() => return e.into_response(),
        Err(_) => match app.core.auth.verify(&c.token) {
            Ok(u) => u,
            Err(e) => {
                return ApiError::new(ErrorCode::Unauthorized, e.to_string()).into_response();
            }
        },
    };
    let hold = app.core.config.poll.default_hold;
    match app
        .core
        .open_session(&user, &c.session_id, c.last_pos, hold, false)
        .await
    {
        Ok((_, _, connected)) => {
            let reply = ServerFrame {
                id: frame.id,
                pos: 0,
                kind: Some(Kind::Connected(connected)),
            };
            frame_response(StatusCode::OK, encoding, &reply)
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// `POST /session/{id}`: one command on an existing session.
pub async fn command(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let user = match authenticate(&app, &headers) {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let session = match owned_session(&app, &user, &id) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let encoding = body_encoding(&headers);
    app.core.metrics.frames_in.get_or_create(&LABEL).inc();
    let mut conn = Conn::bound(app.core.clone(), session, None);
    let frame = match codec::decode_client(encoding, &body) {
        Ok(f) => f,
        Err(e) => return frame_response(StatusCode::BAD_REQUEST, encoding, &conn.bad_frame(e)),
    };
    match conn.handle(frame).await {
        Outcome::Reply(reply) | Outcome::Close(reply, _) => {
            app.core.metrics.frames_out.get_or_create(&LABEL).inc();
            frame_response(StatusCode::OK, encoding, &reply)
        }
        Outcome::Later(reply) => {
            app.core.metrics.frames_out.get_or_create(&LABEL).inc();
            frame_response(StatusCode::OK, encoding, &reply.await)
        }
        Outcome::Silent => StatusCode::NO_CONTENT.into_response(),
    }
}
