//! `/poll`: HTTP long-poll, the fallback of last resort.
//!
//! `GET /poll?session_id=S&cursor=P[&wait=SECONDS]` with the bearer token. The cursor is
//! the last position the client has: it acknowledges everything up to it, and the reply
//! holds the pushes after it — as soon as there are any, or an empty list when the hold
//! time (`wait`, default `poll.default_hold`, at most `poll.max_hold`; 0 = plain polling)
//! passes. A reply that got lost is simply delivered again by the next poll with the same
//! cursor. One pending poll per session: a newer one ends the older with an empty reply.
//! A session with no poll for the grace period expires like any detached session.
//!
//! Replies are a JSON array of frames, or with `Accept: application/x-protobuf` a
//! sequence of length-delimited protobuf frames (varint length, then the frame). The
//! header `X-Parley-Cursor` carries the cursor for the next poll. Commands go to
//! `POST /session/{id}` (sessions start with `POST /session`).

use std::{
    convert::Infallible, future::Future, pin::Pin, sync::Arc, task::Context, time::Duration,
};

use axum::{
    extract::{Query, Request},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use bytes::{BufMut, BytesMut};
use futures_util::future::Either;
use serde::Deserialize;

use super::{
    Ctx,
    bearer::{ApiError, user},
    http::PROTOBUF,
    origin_allowed,
};
use crate::{
    codec::{Encoding, Push},
    metrics::TransportLabel,
    proto::ErrorCode,
    session::{CloseReason, Conn, Out, Outbox, OutboxConfig, Wait, Waits},
};

const LABEL: TransportLabel = TransportLabel { transport: "poll" };

#[derive(Deserialize)]
pub struct PollQuery {
    session_id: String,
    #[serde(default)]
    cursor: u64,
    /// Hold time in seconds.
    wait: Option<u64>,
}

fn respond(encoding: Encoding, cursor: u64, pushes: &[(u64, Arc<Push>)]) -> Response {
    let mut body = BytesMut::new();
    match encoding {
        Encoding::Json => {
            body.put_u8(b'[');
            for (i, (pos, push)) in pushes.iter().enumerate() {
                if i > 0 {
                    body.put_u8(b',');
                }
                push.write_frame(Encoding::Json, *pos, &mut body);
            }
            body.put_u8(b']');
        }
        Encoding::Proto => {
            for (pos, push) in pushes {
                let (prefix, shared) = push.frame_parts(Encoding::Proto, *pos);
                let len = prefix.len() + shared.len();
                prost::encoding::encode_varint(len as u64, &mut body);
                body.put_slice(prefix.as_slice());
                body.put_slice(shared);
            }
        }
    }
    let next = pushes.last().map_or(cursor, |(pos, _)| *pos);
    let mut r = (StatusCode::OK, body.freeze()).into_response();
    let h = r.headers_mut();
    let ct = if encoding == Encoding::Proto {
        PROTOBUF
    } else {
        "application/json"
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-parley-cursor", HeaderValue::from(next));
    r
}

/// `GET /poll`, as a service rather than an axum handler (served by `server::App`,
/// before the router). The request is read (and dropped) when it is called, and the
/// future that waits, which lives as long as the poll is pending, holds only what the
/// reply needs. (An axum handler's future also keeps the request's head and body slot
/// for its whole life, ~250 bytes per pending poll; the request's headers and URI would
/// also keep hyper's read buffer alive.)
#[derive(Clone)]
pub struct Poll(Ctx);

impl Poll {
    pub fn new(ctx: Ctx) -> Self {
        Self(ctx)
    }
}

/// An answer given when the request comes.
type Answered = std::future::Ready<Result<Response, Infallible>>;

fn answered(response: Response) -> Answered {
    std::future::ready(Ok(response))
}

impl tower::Service<Request> for Poll {
    type Response = Response;
    type Error = Infallible;
    /// Not boxed: every layer around it up to the connection's in-flight box (hyper's,
    /// one per request) has a named future, so a pending poll is one allocation. A
    /// refusal's response is room beside the waiting state, which is larger.
    type Future = Either<Answered, Waiting>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let (parts, _body) = req.into_parts();
        let started = Query::<PollQuery>::try_from_uri(&parts.uri)
            .map_err(ApiError::from)
            .and_then(|Query(q)| Held::start(&self.0, parts.headers, parts.uri, q));
        match started {
            Ok((held, waits)) => Either::Right(Waiting {
                held,
                wait: Wait::new(),
                waits,
            }),
            Err(refused) => Either::Left(answered(refused.into_response())),
        }
    }
}

/// `/poll` answers GET (and HEAD) only: any other method gets 405 with `Allow`, as an
/// axum `get_service` route answers, before the request is forwarded or started. The
/// route is served without axum's method router (whose every endpoint is one more boxed
/// future held by a pending poll; see `server::App`).
#[derive(Clone)]
pub struct GetOnly<S>(pub S);

impl<S> tower::Service<Request> for GetOnly<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<S::Future, Answered>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        if req.method() == Method::GET || req.method() == Method::HEAD {
            return Either::Left(self.0.call(req));
        }
        let refused = (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, HeaderValue::from_static("GET,HEAD"))],
        );
        Either::Right(answered(refused.into_response()))
    }
}

pin_project_lite::pin_project! {
    /// A pending poll: its [`Held`] and the outbox's wait on it, side by side (the wait's
    /// state apart from the outbox, `session::Wait`, so no borrow between the two), and
    /// the outbox's timer and shutdown wait (`session::Waits`), pinned here rather than
    /// in a box of the outbox's own: one allocation per pending poll, hyper's.
    pub struct Waiting {
        held: Held,
        #[pin]
        wait: Wait,
        #[pin]
        waits: Waits,
    }
}

impl Future for Waiting {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let outbox = &mut this.held.outbox;
        let next = std::task::ready!(this.wait.poll_next_in(outbox, this.waits, cx));
        std::task::Poll::Ready(Ok(this.held.reply(next)))
    }
}

/// A poll that waits: what the reply needs, and nothing of the request. Counted as an
/// open `/poll` connection while it lives.
struct Held {
    outbox: Outbox,
    encoding: Encoding,
    cursor: u64,
    /// The poll waits (a hold time above 0) and idle HTTP/1 connections give their state
    /// back (`server.keep_alive_release`): the reply keeps its connection's ([`keep_state`]).
    keep: bool,
}

/// Asks the HTTP/1 connection a long-poll's reply goes out on to keep its HTTP state
/// until `server.keep_alive_idle` (vendor/hyper's `ext::NextIdleTimeout`), not to give
/// it back after `server.keep_alive_release`: the client's next poll comes one round
/// trip after the reply, which on a mobile network is often longer than the release, and
/// a poll served by a new HTTP state costs ~25k instructions. A connection whose last
/// request was anything else (an SSE client's acks, seconds apart) is released as
/// before. HTTP/2 connections ignore it (they never release).
pub(crate) fn keep_state(config: &crate::config::ServerConfig, response: &mut Response) {
    response
        .extensions_mut()
        .insert(hyper::ext::NextIdleTimeout(config.h1_idle()));
}

impl Drop for Held {
    fn drop(&mut self) {
        let connections = &self.outbox.metrics().connections;
        connections.get_or_create(&LABEL).dec();
    }
}

impl Held {
    /// The poll and its outbox's [`Waits`] (made together, waited on together).
    fn start(
        ctx: &Ctx,
        headers: HeaderMap,
        uri: Uri,
        q: PollQuery,
    ) -> Result<(Held, Waits), ApiError> {
        if !origin_allowed(&ctx.core.config.server, &headers, &uri) {
            return Err(ApiError::new(ErrorCode::Forbidden, "origin not allowed"));
        }
        let user = user(ctx, &headers)?;
        let encoding = match headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
            Some(a) if a.contains(PROTOBUF) => Encoding::Proto,
            _ => Encoding::Json,
        };
        let (session, attachment) = ctx
            .core
            .continue_from(&user, &q.session_id, q.cursor)
            .map_err(ApiError::from)?;
        let config = &ctx.core.config.poll;
        let hold = q
            .wait
            .map_or(config.default_hold, Duration::from_secs)
            .min(config.max_hold);
        // The hold time is this outbox's idle interval: idle means "answer empty".
        let (outbox, waits) = Outbox::apart(
            Conn::bound(ctx.core.clone(), session, Some(attachment)),
            OutboxConfig {
                idle: Some(hold),
                ..Default::default()
            },
            ctx.connection_shutdown(),
        );
        // Counted while it lives (`Held`'s drop); the outbox has the metrics, so the
        // poll keeps no handle of its own.
        outbox.metrics().connections.get_or_create(&LABEL).inc();
        let held = Held {
            outbox,
            encoding,
            cursor: q.cursor,
            keep: !hold.is_zero() && ctx.core.config.server.h1_release().is_some(),
        };
        Ok((held, waits))
    }

    fn reply(&self, next: Out) -> Response {
        let mut response = self.respond(next);
        if self.keep {
            keep_state(&self.outbox.config().server, &mut response);
        }
        response
    }

    fn respond(&self, next: Out) -> Response {
        let (encoding, cursor) = (self.encoding, self.cursor);
        match next {
            Out::Pushes(pushes) => {
                let n = pushes.len() as u64;
                let metrics = self.outbox.metrics();
                metrics.frames_out.get_or_create(&LABEL).inc_by(n);
                respond(encoding, cursor, &pushes)
            }
            // Nothing within the hold time, a newer poll took over, or the server is
            // shutting down: an empty answer (the client polls again, elsewhere if need be).
            Out::Idle
            | Out::Frame(_)
            | Out::Close(CloseReason::SessionMoved | CloseReason::ShuttingDown) => {
                respond(encoding, cursor, &[])
            }
            Out::Close(_) => {
                ApiError::new(ErrorCode::SessionNotFound, "session ended").into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pending poll holds this future, inline in hyper's in-flight box (with the
    /// layers' few bytes around it): the `Held`, the wait's state and the outbox's
    /// `Waits` (its timer and shutdown wait, which other transports' outboxes box). (As a
    /// boxed `async fn` it held the `Held` twice, 880 bytes; as a boxed `async` block
    /// with `Next`, 336 in a release build; 320 with the outbox's two boxes, 312 with
    /// one; 488 with that box's 184 B inline and no metrics handle of its own; 456 with
    /// the outbox's instants in milliseconds. A debug build lays it out as a release
    /// build does, near enough.)
    #[test]
    fn the_pending_poll_stays_small() {
        let held = std::mem::size_of::<Held>();
        let outbox = std::mem::size_of::<Outbox>();
        let waits = std::mem::size_of::<Waits>();
        let waiting = std::mem::size_of::<Waiting>();
        let future = std::mem::size_of::<<Poll as tower::Service<Request>>::Future>();
        eprintln!(
            "Held {held} B (Outbox {outbox}), Waits {waits} B, Waiting {waiting} B, \
             Poll's future {future} B"
        );
        assert!(
            held <= outbox + 16,
            "the poll holds {held} bytes besides its outbox's {outbox}"
        );
        assert!(
            waiting <= held + waits + 72 && future <= waiting + 8 && future <= 456,
            "the pending poll's future is {future} bytes (Waiting {waiting}, its Held {held})"
        );
    }
}
