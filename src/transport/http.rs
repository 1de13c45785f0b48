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

use axum::{
    body::Bytes,
    extract::{
        Path, State,
        rejection::{BytesRejection, PathRejection},
    },
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use super::{
    Ctx,
    bearer::{ApiError, bearer, user},
};
use crate::{
    codec::{self, Encoding},
    metrics::TransportLabel,
    proto::{ErrorCode, ServerFrame, client_frame::Cmd, server_frame::Kind},
    session::{Conn, ConnectRequest, Credential, Out, Outbox, OutboxConfig},
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

fn bad_frame(ctx: &Ctx, encoding: Encoding, e: codec::DecodeError) -> Response {
    ctx.core.metrics.error(ErrorCode::BadFrame);
    let frame = ServerFrame {
        id: 0,
        pos: 0,
        kind: Some(Kind::Error(crate::chat::wire_error(
            ErrorCode::BadFrame,
            e.to_string(),
        ))),
    };
    frame_response(StatusCode::BAD_REQUEST, encoding, &frame)
}

/// `POST /session`: a `connect` frame opens or resumes a session.
pub async fn connect(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let encoding = body_encoding(&headers);
    ctx.core.metrics.frames_in.get_or_create(&LABEL).inc();
    let frame = match codec::decode_client(encoding, &body) {
        Ok(f) => f,
        Err(e) => return bad_frame(&ctx, encoding, e),
    };
    let Some(Cmd::Connect(c)) = frame.cmd else {
        return ApiError::new(
            ErrorCode::InvalidArgument,
            "POST /session takes a connect frame",
        )
        .into_response();
    };
    // The token in the frame, or else the bearer header.
    let token = if c.token.is_empty() {
        bearer(&headers).unwrap_or("")
    } else {
        &c.token
    };
    let request = ConnectRequest {
        credential: Credential::Token(token),
        session_id: &c.session_id,
        last_pos: c.last_pos,
        attach: false,
        heartbeat: ctx.core.config.poll.default_hold,
        receive_only: false,
    };
    match ctx.core.connect(request).await {
        Ok(opened) => {
            let reply = ServerFrame {
                id: frame.id,
                pos: 0,
                kind: Some(Kind::Connected(opened.connected)),
            };
            frame_response(StatusCode::OK, encoding, &reply)
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// `POST /session/{id}`: one command on an existing session.
pub async fn command(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let user = match user(&ctx, &headers) {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let id = match id {
        Ok(Path(id)) => id,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let session = match ctx.core.session_of(&user, &id) {
        Ok(s) => s,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let encoding = body_encoding(&headers);
    ctx.core.metrics.frames_in.get_or_create(&LABEL).inc();
    let frame = codec::decode_client(encoding, &body);
    if let Err(e) = frame {
        return bad_frame(&ctx, encoding, e);
    }
    // A command-only binding: its outbox has replies, never pushes. It ignores the
    // shutdown signal, so a command already running still gets its reply.
    let mut outbox = Outbox::new(
        Conn::bound(ctx.core.clone(), session, None),
        OutboxConfig::default(),
        tokio_util::sync::CancellationToken::new(),
    );
    outbox.receive(frame).await;
    if !outbox.expecting() {
        return StatusCode::NO_CONTENT.into_response();
    }
    match outbox.next().await {
        Out::Frame(reply) => {
            ctx.core.metrics.frames_out.get_or_create(&LABEL).inc();
            frame_response(StatusCode::OK, encoding, &reply)
        }
        Out::Close(why) => frame_response(StatusCode::OK, encoding, &why.frame()),
        Out::Pushes(_) | Out::Idle => StatusCode::NO_CONTENT.into_response(),
    }
}
