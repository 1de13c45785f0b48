//! Bearer-token auth for the HTTP paths (API, long-poll, SSE without a ticket, commands)
//! and the HTTP error type: a status plus the wire error as JSON, the same body on every
//! HTTP path (axum's own rejections of a bad query, path or body are mapped onto it, never
//! its `text/plain`).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use axum::{
    Json,
    body::{Body, Bytes},
    extract::{
        Request,
        rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection},
    },
    http::{HeaderMap, HeaderValue, StatusCode, Version, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http_body::{Body as _, Frame, SizeHint};

use super::Ctx;
use crate::{
    chat::{ChatError, wire_error},
    proto::{self, ErrorCode},
    session::ConnectError,
};

/// An HTTP error: status plus the wire error as JSON.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub proto::Error);

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(status_of(code), wire_error(code, message))
    }
}

/// The HTTP status for a wire error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Unauthorized | ErrorCode::TokenExpired => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden | ErrorCode::NotMember => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::SessionNotFound => StatusCode::GONE,
        ErrorCode::RoomExists => StatusCode::CONFLICT,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::LimitExceeded => StatusCode::FORBIDDEN,
        ErrorCode::FrameTooLarge | ErrorCode::FileTooLarge | ErrorCode::QuotaExceeded => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        ErrorCode::RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    }
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        Self(status_of(e.code()), e.to_proto())
    }
}

impl From<ConnectError> for ApiError {
    fn from(e: ConnectError) -> Self {
        Self(status_of(e.code()), e.to_proto())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return too_large();
        }
        Self::new(ErrorCode::BadFrame, e.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return too_large();
        }
        Self::new(ErrorCode::BadFrame, e.body_text())
    }
}

/// A query string that does not parse: a negative or too large number, a repeated key.
impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self::new(ErrorCode::InvalidArgument, e.body_text())
    }
}

/// A path parameter that does not parse (a room or id that is not UTF-8 once decoded).
impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        if e.status().is_server_error() {
            tracing::error!(error = %e.body_text(), "path extraction failed");
            return Self::new(ErrorCode::Internal, "internal error");
        }
        Self::new(ErrorCode::InvalidArgument, e.body_text())
    }
}

/// A method the route does not take: 405 with the Error JSON and (set by axum) `Allow`,
/// not axum's empty body. The `fallback` of every API route.
pub async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        wire_error(
            ErrorCode::InvalidArgument,
            "method not allowed here (see Allow)",
        ),
    )
}

/// A path no route takes: 404 with the Error JSON, like every other refusal, not axum's
/// empty body. The router's fallback.
pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such path")
}

/// A body over the limit (`ws.max_frame_bytes`, as for a WebSocket frame).
fn too_large() -> ApiError {
    ApiError::new(ErrorCode::FrameTooLarge, "body exceeds ws.max_frame_bytes")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = self.1.retry_after_ms;
        let mut r = (self.0, Json(self.1)).into_response();
        if retry_after > 0 {
            // Whole seconds, rounded up (the JSON has the milliseconds).
            r.headers_mut()
                .insert(header::RETRY_AFTER, retry_after.div_ceil(1000).into());
        }
        r
    }
}

/// Who is calling.
pub enum Caller {
    User(String),
    Admin,
}

/// The token of an `Authorization: Bearer` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Compares without an early exit, so the admin token cannot be guessed byte by byte.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The caller behind the bearer token: the admin (its token) or a user (a JWT, checked
/// through the session layer's one connect path).
pub fn caller(ctx: &Ctx, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let Some(token) = bearer(headers) else {
        ctx.core.metrics.error(ErrorCode::Unauthorized);
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "missing Authorization: Bearer",
        ));
    };
    let admin = &ctx.core.config.auth.admin_token;
    if !admin.is_empty() && same(token, admin) {
        return Ok(Caller::Admin);
    }
    Ok(Caller::User(ctx.core.authenticate(token)?))
}

/// The user behind the request's bearer token (the admin token is refused).
pub fn user(ctx: &Ctx, headers: &HeaderMap) -> Result<String, ApiError> {
    match caller(ctx, headers)? {
        Caller::User(u) => Ok(u),
        Caller::Admin => Err(ApiError::new(ErrorCode::Forbidden, "use a user token")),
    }
}

/// Middleware: a response to an HTTP/1 request whose body the handler did not read to its
/// end (an upload refused from its headers: too large, over quota, too fast, no token)
/// says `Connection: close`. hyper cannot reuse such a connection (the rest of the body
/// is still coming) and closes it after the response; with the header a pooled client
/// knows that, instead of sending its next request into a closed socket.
pub async fn close_if_unread(req: Request, next: Next) -> Response {
    let http1 = req.version() <= Version::HTTP_11;
    if !http1 || req.body().is_end_stream() {
        return next.run(req).await;
    }
    let ended = Arc::new(AtomicBool::new(false));
    let req = req.map(|body| {
        Body::new(Watched {
            body,
            ended: ended.clone(),
        })
    });
    let mut response = next.run(req).await;
    if !ended.load(Ordering::Acquire) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A request body that notes when it has been read to its end.
struct Watched {
    body: Body,
    ended: Arc<AtomicBool>,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.body.is_end_stream() {
            self.ended.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The layer that times request bodies: a body must arrive in full within
/// `server.body_read_timeout` of its head. Without it a client that sends a head and
/// then one byte now and then holds its connection slot, its request task and up to
/// `ws.max_frame_bytes` of buffer for as long as it likes (the head has
/// `header_read_timeout`, the socket's writes `write_timeout`, but reading a body had no
/// deadline). Past the deadline the body fails, whatever the handler answers becomes 408
/// with the Error JSON, and the connection is closed (HTTP/1: `Connection: close`; hyper
/// drops a connection whose body was not read to its end). Uploads (`POST
/// /api/v1/files`) are not timed by it: they have their own idle deadline.
#[derive(Clone, Copy)]
pub struct BodyDeadlineLayer(std::time::Duration);

impl BodyDeadlineLayer {
    pub fn new(limit: std::time::Duration) -> Self {
        Self(limit)
    }
}

impl<S> tower::Layer<S> for BodyDeadlineLayer {
    type Service = BodyDeadline<S>;
    fn layer(&self, inner: S) -> BodyDeadline<S> {
        BodyDeadline {
            limit: self.0,
            inner,
        }
    }
}

/// See [`BodyDeadlineLayer`]. A hand-written service, not `axum::middleware::from_fn`:
/// a request without a body (every GET, so every pending long-poll and SSE stream) gets
/// the inner route's future itself, with no box around it; only a request with a body
/// (a command, an API call: short-lived) is boxed.
#[derive(Clone)]
pub struct BodyDeadline<S> {
    limit: std::time::Duration,
    inner: S,
}

type Timing = Pin<Box<dyn Future<Output = Result<Response, std::convert::Infallible>> + Send>>;

impl<S> tower::Service<Request> for BodyDeadline<S>
where
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::Either<S::Future, Timing>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        use futures_util::future::Either;
        let upload = req.method() == axum::http::Method::POST && req.uri().path() == UPLOADS;
        if req.body().is_end_stream() || upload {
            return Either::Left(self.inner.call(req));
        }
        let limit = self.limit;
        let http1 = req.version() <= Version::HTTP_11;
        let expired = Arc::new(AtomicBool::new(false));
        let req = req.map(|body| {
            Body::new(Timed {
                body,
                deadline: Box::pin(tokio::time::sleep(limit)),
                expired: expired.clone(),
            })
        });
        let call = self.inner.call(req);
        Either::Right(Box::pin(async move {
            let Ok(response) = call.await;
            if !expired.load(Ordering::Acquire) {
                return Ok(response);
            }
            let mut response = ApiError(
                StatusCode::REQUEST_TIMEOUT,
                wire_error(
                    ErrorCode::BadFrame,
                    format!(
                        "the request body did not arrive within server.body_read_timeout ({}) of its head",
                        humantime::format_duration(limit)
                    ),
                ),
            )
            .into_response();
            if http1 {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response)
        }))
    }
}

/// The upload route, timed by its own idle deadline instead of [`BodyDeadline`].
const UPLOADS: &str = "/api/v1/files";

/// The request body was not in by its deadline.
#[derive(Debug, thiserror::Error)]
#[error("request body deadline passed")]
struct BodyTimedOut;

/// A request body that fails once its deadline passes before its end.
struct Timed {
    body: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    expired: Arc<AtomicBool>,
}

impl http_body::Body for Timed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.expired.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
