//! What every listener serves (HTTP/1.1, HTTP/2, HTTP/3): `/poll` dispatched before the
//! router, every other path through the router, and on TCP the `Alt-Svc` header.
//!
//! `/poll` is not an axum route because a pending long-poll holds its request's future
//! for as long as it waits (up to `poll.max_hold`), and axum boxes every route's future
//! (the route's `BoxCloneSyncService`) and keeps room for a whole request beside it in
//! the router's future. Here the poll's future is named all the way down
//! ([`PollService`]: CORS, compression, the forward to the session's owner, the method
//! check, the poll itself, none boxed), so a pending poll is one allocation: hyper's
//! in-flight box (docs/BENCHMARKS.md, "Round seven: a pending long-poll").

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use axum::{
    Router,
    body::Body,
    extract::Request,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
    routing::future::RouteFuture,
};
use bytes::Bytes;
use futures_util::future::Either;
use tower::{Layer, Service};
use tower_http::compression::{
    Compression, CompressionBody, CompressionLayer, DefaultPredicate, Predicate,
};

use super::{Ctx, cors, forward::ToOwner, poll};

/// The path served before the router.
pub const POLL: &str = "/poll";

/// `/poll` without CORS: the method check (405 with `Allow: GET,HEAD`), the forward to
/// the session's owner, the poll.
type Bare = poll::GetOnly<ToOwner<poll::Poll>>;
/// With compression when `server.http_compression` (its body made an axum body again).
type Compressed = tower::util::Either<
    tower::util::MapResponse<
        Compression<Bare, WhenAsked>,
        fn(axum::http::Response<CompressionBody<Body>>) -> Response,
    >,
    Bare,
>;
/// `/poll` as [`App`] serves it: CORS outermost (as on the router's routes), when the
/// app has CORS.
pub type PollService = tower::util::Either<cors::Late<Compressed>, Compressed>;

/// tower-http's default compression predicate (the one on the router's routes), made
/// when a response asks: the compression layer's future keeps its predicate, and the
/// default one is ~160 bytes of constants.
#[derive(Clone, Copy)]
pub struct WhenAsked;

impl Predicate for WhenAsked {
    fn should_compress<B>(&self, response: &axum::http::Response<B>) -> bool
    where
        B: http_body::Body,
    {
        DefaultPredicate::new().should_compress(response)
    }
}

/// See the module's note. One `Arc`, as small as the `Router` it replaced in every
/// connection's task (the task keeps its service twice: its argument and hyper's).
#[derive(Clone)]
pub struct App(Arc<Parts>);

struct Parts {
    router: Router,
    poll: PollService,
    alt_svc: Option<HeaderValue>,
}

impl App {
    /// `router` (with its state, and without a `/poll` route) and `/poll` for `ctx`,
    /// with CORS when `cors` (as the router's routes have it or not).
    pub fn new(ctx: &Ctx, router: Router, cors: bool) -> Self {
        let bare = poll::GetOnly(
            super::forward::ToOwnerLayer::new(ctx.clone()).layer(poll::Poll::new(ctx.clone())),
        );
        let config = &ctx.core.config;
        let compressed: Compressed = if config.server.http_compression {
            let into: fn(_) -> Response = IntoResponse::into_response;
            tower::util::Either::Left(tower::util::MapResponse::new(
                CompressionLayer::new().compress_when(WhenAsked).layer(bare),
                into,
            ))
        } else {
            tower::util::Either::Right(bare)
        };
        let poll = if cors {
            tower::util::Either::Left(cors::Late::new(config.clone(), compressed))
        } else {
            tower::util::Either::Right(compressed)
        };
        Self(Arc::new(Parts {
            router,
            poll,
            alt_svc: None,
        }))
    }

    /// Every response advertises HTTP/3 with this `Alt-Svc` value (RFC 7838).
    pub fn with_alt_svc(self, value: HeaderValue) -> Self {
        let Parts { router, poll, .. } = Arc::try_unwrap(self.0).unwrap_or_else(|shared| Parts {
            router: shared.router.clone(),
            poll: shared.poll.clone(),
            alt_svc: None,
        });
        Self(Arc::new(Parts {
            router,
            poll,
            alt_svc: Some(value),
        }))
    }
}

impl<B> Service<axum::http::Request<B>> for App
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = AppFuture;

    /// Always ready: the router is, and so is every layer of `/poll` (none of them
    /// waits for capacity), which is called without a `poll_ready` of its own.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    /// The service called is a clone (of the router, an `Arc`; of `/poll`'s layers, two
    /// `Arc`s): the app is shared by every connection's task.
    fn call(&mut self, req: axum::http::Request<B>) -> AppFuture {
        let parts = &*self.0;
        let inner = if req.uri().path() == POLL {
            Either::Right(parts.poll.clone().call(req.map(Body::new)))
        } else {
            Either::Left(parts.router.clone().call(req))
        };
        AppFuture {
            inner,
            alt_svc: parts.alt_svc.is_some().then(|| self.0.clone()),
        }
    }
}

type PollFuture = <PollService as Service<Request>>::Future;

pin_project_lite::pin_project! {
    /// [`App`]'s future: the router's or `/poll`'s, inline (hyper boxes it once).
    pub struct AppFuture {
        #[pin]
        inner: Either<RouteFuture<Infallible>, PollFuture>,
        // The app, when it has an `Alt-Svc` value.
        alt_svc: Option<Arc<Parts>>,
    }
}

impl Future for AppFuture {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = ready!(this.inner.poll(cx));
        if let Some(value) = this.alt_svc.as_deref().and_then(|p| p.alt_svc.clone()) {
            response.headers_mut().insert(header::ALT_SVC, value);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pending poll is this future (in hyper's in-flight box): the poll's own
    /// (`poll::tests::the_pending_poll_stays_small`) and its layers' few bytes. The
    /// router's future beside it (`RouteFuture`, with room for a request) is smaller.
    /// At most 512 B: jemalloc's 512 B size class, and the poll's only allocation (it was
    /// 360 B here and a 184 B box of the outbox's; then 536 B, in the 640 B class, until
    /// the outbox kept its instants as milliseconds).
    #[test]
    fn a_pending_poll_is_one_small_future() {
        let app = std::mem::size_of::<AppFuture>();
        let poll = std::mem::size_of::<PollFuture>();
        let waiting = std::mem::size_of::<poll::Waiting>();
        let route = std::mem::size_of::<RouteFuture<Infallible>>();
        eprintln!("AppFuture {app} B: /poll's {poll} (Waiting {waiting}), the router's {route}");
        assert!(
            route <= poll,
            "the router's future ({route} B) sets the size"
        );
        assert!(
            poll <= waiting + 176 && app <= poll + 16 && app <= 512,
            "a pending poll's future is {app} bytes (/poll's {poll}, Waiting {waiting})"
        );
    }
}
