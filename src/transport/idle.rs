//! Telling when an HTTP/2 connection carries nothing, so that it can be closed.
//!
//! hyper closes an idle HTTP/1 keep-alive connection by its header read timeout, but an
//! HTTP/2 connection that opens no stream (or stops opening them) would stay forever: its
//! keep-alive PINGs are answered by any live client. [`Streams`] counts the requests of
//! one connection that are open — from the moment the request reaches the router until
//! its response body has been sent or dropped (a pending long-poll and an SSE stream are
//! open for as long as they last) — and [`Streams::idle_for`] resolves once none has been
//! open for a given time; the server then sends GOAWAY.
//!
//! A WebSocket over HTTP/2 (RFC 8441 extended CONNECT) lives on after its response: such
//! a connection is marked as tunnelled, and the server lets it run until its streams end
//! (no new requests are accepted after the GOAWAY).
//!
//! Owns: the per-connection count. Not: the deadlines themselves (`server`).

use std::{
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::Body,
    http::{Method, Request, Response},
};
use hyper::body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep, sleep_until};

/// The open requests of one connection.
#[derive(Clone)]
pub struct Streams(Arc<Mutex<State>>);

struct State {
    open: usize,
    /// When `open` last dropped to zero (or the connection began).
    idle_since: Instant,
    /// A CONNECT (WebSocket over HTTP/2) succeeded on this connection.
    tunnelled: bool,
}

impl Default for Streams {
    fn default() -> Self {
        Self::new()
    }
}

impl Streams {
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(State {
            open: 0,
            idle_since: Instant::now(),
            tunnelled: false,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one more open request until the returned guard is dropped.
    fn open(&self) -> Open {
        self.lock().open += 1;
        Open(self.clone())
    }

    /// Whether a WebSocket tunnel was opened on the connection.
    pub fn tunnelled(&self) -> bool {
        self.lock().tunnelled
    }

    /// Whether no request is open now.
    pub fn quiet(&self) -> bool {
        self.lock().open == 0
    }

    /// Resolves once no request has been open for `limit`. Wakes once per `limit` at
    /// most while requests are open. A future of its own (its `Sleep`, reset in place,
    /// and two fields): every HTTP/2 connection's task holds it while it lives.
    pub fn idle_for(&self, limit: Duration) -> IdleFor<'_> {
        IdleFor {
            streams: self,
            limit,
            sleep: sleep_until(self.due(limit)),
        }
    }

    /// [`Streams::idle_for`] for a future that keeps the timer itself (the server's
    /// HTTP/2 connection task): ready once no request has been open for `limit`;
    /// `sleep` starts at [`Streams::due`] and is reset in place.
    pub fn poll_idle_for(
        &self,
        limit: Duration,
        mut sleep: Pin<&mut Sleep>,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        loop {
            {
                let s = self.lock();
                if s.open == 0 && s.idle_since + limit <= Instant::now() {
                    return Poll::Ready(());
                }
            }
            std::task::ready!(sleep.as_mut().poll(cx));
            sleep.as_mut().reset(self.due(limit));
        }
    }

    /// When the connection will have been idle for `limit`, if no request opens or
    /// ends before (`limit` from now while one is open).
    pub fn due(&self, limit: Duration) -> Instant {
        let s = self.lock();
        if s.open == 0 {
            s.idle_since + limit
        } else {
            Instant::now() + limit
        }
    }
}

pin_project_lite::pin_project! {
    /// [`Streams::idle_for`]'s future.
    pub struct IdleFor<'a> {
        streams: &'a Streams,
        limit: Duration,
        #[pin]
        sleep: Sleep,
    }
}

impl Future for IdleFor<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        this.streams.poll_idle_for(*this.limit, this.sleep, cx)
    }
}

/// One open request; dropping it closes it.
struct Open(Streams);

impl Drop for Open {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.open -= 1;
        if s.open == 0 {
            s.idle_since = Instant::now();
        }
    }
}

/// A service that counts its requests as open in [`Streams`] until their response
/// bodies are done.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    streams: Streams,
}

impl<S> Counted<S> {
    pub fn new(inner: S, streams: Streams) -> Self {
        Self { inner, streams }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<Request<B>> for Counted<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    /// The box holds the inner future once: an `async move` block awaiting it held it
    /// twice (the captured future and the one being awaited, ~1,088 bytes for a
    /// pending long-poll instead of ~552). Whether the request is a CONNECT is in the
    /// box's type, not a field: a pending long-poll's box is 512 bytes, jemalloc's
    /// 512-byte class (with a flag, 520: the 640-byte one).
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let open = Some(self.streams.open());
        let connect = req.method() == Method::CONNECT;
        let response = self.inner.call(req);
        if connect {
            Box::pin(CountedFuture::<_, Connect> {
                response,
                open,
                kind: PhantomData,
            })
        } else {
            Box::pin(CountedFuture::<_, NotConnect> {
                response,
                open,
                kind: PhantomData,
            })
        }
    }
}

/// Whether a [`CountedFuture`]'s request is a CONNECT (WebSocket over HTTP/2), whose
/// successful response marks the tunnel: [`Connect`] or [`NotConnect`].
trait RequestKind {
    const CONNECT: bool;
}

struct Connect;

impl RequestKind for Connect {
    const CONNECT: bool = true;
}

struct NotConnect;

impl RequestKind for NotConnect {
    const CONNECT: bool = false;
}

pin_project_lite::pin_project! {
    /// [`Counted`]'s future: the inner service's, then its response with the request
    /// still counted as open until the body is done.
    struct CountedFuture<F, K> {
        #[pin]
        response: F,
        // Taken by the response's body; `None` once ready.
        open: Option<Open>,
        kind: PhantomData<K>,
    }
}

impl<F, E, K: RequestKind> Future for CountedFuture<F, K>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.response.poll(cx))?;
        let open = this
            .open
            .take()
            .expect("CountedFuture polled after it completed");
        if K::CONNECT && response.status().is_success() {
            open.0.lock().tunnelled = true;
        }
        Poll::Ready(Ok(
            response.map(|body| Body::new(WithGuard { body, _open: open }))
        ))
    }
}

/// hyper's HTTP/2 server spawns a task per request that holds the service's future until
/// the response is sent, then the response body. Served as a hyper service directly, that
/// future is the box above (16 bytes); through `hyper_util`'s `TowerToHyperService` it
/// was a `Oneshot` with room for a clone of the service and for the request (~300 bytes),
/// held by every streaming response (an SSE stream) for its whole life.
impl<S, B> hyper::service::Service<Request<B>> for Counted<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn call(&self, req: Request<B>) -> Self::Future {
        let mut this = self.clone();
        // axum's router is always ready; a service that is not is waited for (with the
        // request's task's waker) in the box.
        let noop = &mut Context::from_waker(std::task::Waker::noop());
        match tower::Service::poll_ready(&mut this, noop) {
            Poll::Ready(Ok(())) => tower::Service::call(&mut this, req),
            Poll::Ready(Err(e)) => Box::pin(std::future::ready(Err(e))),
            Poll::Pending => Box::pin(tower::ServiceExt::oneshot(this, req)),
        }
    }
}

/// A response body that keeps its request open until it is dropped.
struct WithGuard {
    body: Body,
    _open: Open,
}

impl hyper::body::Body for WithGuard {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pending request's box holds its inner future once, and a few bytes.
    #[test]
    fn the_counted_future_holds_the_inner_one_once() {
        struct Big(#[allow(dead_code)] [u8; 512]);
        impl Future for Big {
            type Output = Result<Response<Body>, std::convert::Infallible>;
            fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
                Poll::Pending
            }
        }
        let size = std::mem::size_of::<CountedFuture<Big, NotConnect>>();
        assert!(size <= 512 + 8, "CountedFuture<512 B> is {size} B");
    }

    /// A pending long-poll over HTTP/2 is the app's future in this box: at most 512 B,
    /// jemalloc's 512 B class (520 with a CONNECT flag beside it took the 640 B one).
    #[test]
    fn a_pending_requests_box_fits_512_bytes() {
        let size =
            std::mem::size_of::<CountedFuture<crate::transport::app::AppFuture, NotConnect>>();
        assert!(size <= 512, "a pending request's box is {size} B");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_only_after_the_last_request_ended_for_the_limit() {
        let s = Streams::new();
        let limit = Duration::from_secs(10);
        let start = Instant::now();
        s.idle_for(limit).await;
        assert_eq!(start.elapsed(), limit, "idle from the start");

        let open = s.open();
        let waiter = tokio::spawn({
            let s = s.clone();
            async move {
                let t = Instant::now();
                s.idle_for(limit).await;
                t.elapsed()
            }
        });
        tokio::time::sleep(Duration::from_secs(25)).await;
        drop(open);
        // Idle from the moment the request ended: 25 s + 10 s after the wait began.
        assert_eq!(waiter.await.unwrap(), Duration::from_secs(35));
    }
}
