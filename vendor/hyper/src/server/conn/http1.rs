//! HTTP/1 Server Connections.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::rt::{Read, Write};
use crate::upgrade::Upgraded;
use bytes::Bytes;
use futures_core::ready;
use httparse::ParserConfig;

use crate::body::{Body, Incoming as IncomingBody};
use crate::proto;
use crate::service::HttpService;
use crate::{
    common::time::{Dur, Time},
    rt::Timer,
};

type Http1Dispatcher<T, B, S> = proto::h1::Dispatcher<
    proto::h1::dispatch::Server<S, IncomingBody>,
    B,
    T,
    proto::ServerTransaction,
>;

pin_project_lite::pin_project! {
    /// A [`Future`](core::future::Future) representing an HTTP/1 connection, bound to a
    /// [`Service`](crate::service::Service), returned from
    /// [`Builder::serve_connection`](struct.Builder.html#method.serve_connection).
    ///
    /// To drive HTTP on this connection this future **must be polled**, typically with
    /// `.await`. If it isn't polled, no progress will be made on this connection.
    #[must_use = "futures do nothing unless polled"]
    pub struct Connection<T, S>
    where
        S: HttpService<IncomingBody>,
    {
        conn: Http1Dispatcher<T, S::ResBody, S>,
    }
}

/// A configuration builder for HTTP/1 server connections.
///
/// **Note**: The default values of options are *not considered stable*. They
/// are subject to change at any time.
///
/// # Example
///
/// ```
/// # use std::time::Duration;
/// # use hyper::server::conn::http1::Builder;
/// # fn main() {
/// let mut http = Builder::new();
/// // Set options one at a time
/// http.half_close(false);
///
/// // Or, chain multiple options
/// http.keep_alive(false).title_case_headers(true).max_buf_size(8192);
///
/// # }
/// ```
///
/// Use [`Builder::serve_connection`](struct.Builder.html#method.serve_connection)
/// to bind the built connection to a service.
#[derive(Clone, Debug)]
pub struct Builder {
    h1_parser_config: ParserConfig,
    timer: Time,
    h1_half_close: bool,
    h1_keep_alive: bool,
    h1_title_case_headers: bool,
    h1_preserve_header_case: bool,
    h1_max_headers: Option<usize>,
    h1_max_header_size: Option<usize>,
    h1_header_read_timeout: Dur,
    // PARLEY PATCH: see `Builder::idle_timeout`.
    h1_idle_timeout: Option<Duration>,
    // PARLEY PATCH: see `Builder::yield_when_idle`.
    h1_yield_when_idle: bool,
    // PARLEY PATCH: see `Builder::detach_event_streams`.
    h1_detach_event_streams: bool,
    h1_writev: Option<bool>,
    max_buf_size: Option<usize>,
    pipeline_flush: bool,
    date_header: bool,
}

/// Deconstructed parts of a `Connection`.
///
/// This allows taking apart a `Connection` at a later time, in order to
/// reclaim the IO object, and additional related pieces.
#[derive(Debug)]
#[non_exhaustive]
pub struct Parts<T, S> {
    /// The original IO object used in the handshake.
    pub io: T,
    /// A buffer of bytes that have been read but not processed as HTTP.
    ///
    /// If the client sent additional bytes after its last request, and
    /// this connection "ended" with an upgrade, the read buffer will contain
    /// those bytes.
    ///
    /// You will want to check for any existing bytes if you plan to continue
    /// communicating on the IO object.
    pub read_buf: Bytes,
    /// The `Service` used to serve this connection.
    pub service: S,
}

// ===== impl Connection =====

impl<I, S> fmt::Debug for Connection<I, S>
where
    S: HttpService<IncomingBody>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection").finish()
    }
}

impl<I, B, S> Connection<I, S>
where
    S: HttpService<IncomingBody, ResBody = B>,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    I: Read + Write + Unpin,
    B: Body + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    /// Start a graceful shutdown process for this connection.
    ///
    /// This `Connection` should continue to be polled until shutdown
    /// can finish.
    ///
    /// # Note
    ///
    /// This should only be called while the `Connection` future is still
    /// pending. If called after `Connection::poll` has resolved, this does
    /// nothing.
    pub fn graceful_shutdown(mut self: Pin<&mut Self>) {
        self.conn.disable_keep_alive();
    }

    /// Return the inner IO object, and additional information.
    ///
    /// If the IO object has been "rewound" the io will not contain those bytes rewound.
    /// This should only be called after `poll_without_shutdown` signals
    /// that the connection is "done". Otherwise, it may not have finished
    /// flushing all necessary HTTP bytes.
    ///
    /// # Panics
    /// This method will panic if this connection is using an h2 protocol.
    pub fn into_parts(self) -> Parts<I, S> {
        let (io, read_buf, dispatch) = self.conn.into_inner();
        Parts {
            io,
            read_buf,
            service: dispatch.into_service(),
        }
    }

    /// PARLEY PATCH: whether the connection completed because it was idle for the idle
    /// timeout ([`Builder::yield_when_idle`]): its IO ([`Connection::into_parts`]) is
    /// open, with nothing read ahead, and waits for the next request. `false` while it
    /// runs.
    pub fn is_idle(&self) -> bool {
        self.conn.is_idle_wait()
    }

    /// Poll the connection for completion, but without calling `shutdown`
    /// on the underlying IO.
    ///
    /// This is useful to allow running a connection while doing an HTTP
    /// upgrade. Once the upgrade is completed, the connection would be "done",
    /// but it is not desired to actually shutdown the IO object. Instead you
    /// would take it back using `into_parts`.
    pub fn poll_without_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<crate::Result<()>>
    where
        S: Unpin,
        S::Future: Unpin,
    {
        self.conn.poll_without_shutdown(cx)
    }

    /// Prevent shutdown of the underlying IO object at the end of service the request,
    /// instead run `into_parts`. This is a convenience wrapper over `poll_without_shutdown`.
    ///
    /// # Error
    ///
    /// This errors if the underlying connection protocol is not HTTP/1.
    #[allow(clippy::missing_panics_doc)]
    pub fn without_shutdown(self) -> impl Future<Output = crate::Result<Parts<I, S>>> {
        let mut zelf = Some(self);
        crate::common::future::poll_fn(move |cx| {
            ready!(zelf
                .as_mut()
                .expect("server connection polled after completion")
                .conn
                .poll_without_shutdown(cx))?;
            Poll::Ready(Ok(zelf
                .take()
                .expect("server connection missing before completion")
                .into_parts()))
        })
    }

    /// Enable this connection to support higher-level HTTP upgrades.
    ///
    /// See [the `upgrade` module](crate::upgrade) for more.
    pub fn with_upgrades(self) -> UpgradeableConnection<I, S>
    where
        I: Send,
    {
        UpgradeableConnection { inner: Some(self) }
    }
}

impl<I, B, S> Future for Connection<I, S>
where
    S: HttpService<IncomingBody, ResBody = B>,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    I: Read + Write + Unpin,
    B: Body + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Output = crate::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match ready!(Pin::new(&mut self.conn).poll(cx)) {
            Ok(done) => {
                match done {
                    // PARLEY PATCH: see `Builder::yield_when_idle`.
                    proto::Dispatched::Shutdown | proto::Dispatched::Idle => {}
                    proto::Dispatched::Upgrade(pending) => {
                        // With no `Send` bound on `I`, we can't try to do
                        // upgrades here. In case a user was trying to use
                        // `Body::on_upgrade` with this API, send a special
                        // error letting them know about that.
                        pending.manual();
                    }
                }
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

// ===== impl Builder =====

impl Builder {
    /// Create a new connection builder.
    pub fn new() -> Self {
        Self {
            h1_parser_config: ParserConfig::default(),
            timer: Time::Empty,
            h1_half_close: false,
            h1_keep_alive: true,
            h1_title_case_headers: false,
            h1_preserve_header_case: false,
            h1_max_headers: None,
            h1_max_header_size: None,
            h1_header_read_timeout: Dur::Default(Some(Duration::from_secs(30))),
            h1_idle_timeout: None,
            // PARLEY PATCH: see `Builder::yield_when_idle`.
            h1_yield_when_idle: false,
            h1_detach_event_streams: false,
            h1_writev: None,
            max_buf_size: None,
            pipeline_flush: false,
            date_header: true,
        }
    }
    /// Set whether HTTP/1 connections should support half-closures.
    ///
    /// Clients can chose to shutdown their write-side while waiting
    /// for the server to respond. Setting this to `true` will
    /// prevent closing the connection immediately if `read`
    /// detects an EOF in the middle of a request.
    ///
    /// Default is `false`.
    pub fn half_close(&mut self, val: bool) -> &mut Self {
        self.h1_half_close = val;
        self
    }

    /// Enables or disables HTTP/1 keep-alive.
    ///
    /// Default is `true`.
    pub fn keep_alive(&mut self, val: bool) -> &mut Self {
        self.h1_keep_alive = val;
        self
    }

    /// Set whether HTTP/1 connections will write header names as title case at
    /// the socket level.
    ///
    /// Default is `false`.
    pub fn title_case_headers(&mut self, enabled: bool) -> &mut Self {
        self.h1_title_case_headers = enabled;
        self
    }

    /// Set whether multiple spaces are allowed as delimiters in request lines.
    ///
    /// Default is `false`.
    pub fn allow_multiple_spaces_in_request_line_delimiters(&mut self, enabled: bool) -> &mut Self {
        self.h1_parser_config
            .allow_multiple_spaces_in_request_line_delimiters(enabled);
        self
    }

    /// Set whether HTTP/1 connections will silently ignored malformed header lines.
    ///
    /// If this is enabled and a header line does not start with a valid header
    /// name, or does not include a colon at all, the line will be silently ignored
    /// and no error will be reported.
    ///
    /// Default is `false`.
    pub fn ignore_invalid_headers(&mut self, enabled: bool) -> &mut Builder {
        self.h1_parser_config
            .ignore_invalid_headers_in_requests(enabled);
        self
    }

    /// Set whether to support preserving original header cases.
    ///
    /// Currently, this will record the original cases received, and store them
    /// in a private extension on the `Request`. It will also look for and use
    /// such an extension in any provided `Response`.
    ///
    /// Since the relevant extension is still private, there is no way to
    /// interact with the original cases. The only effect this can have now is
    /// to forward the cases in a proxy-like fashion.
    ///
    /// Default is `false`.
    pub fn preserve_header_case(&mut self, enabled: bool) -> &mut Self {
        self.h1_preserve_header_case = enabled;
        self
    }

    /// Set the maximum number of headers.
    ///
    /// When a request is received, the parser will reserve a buffer to store headers for optimal
    /// performance.
    ///
    /// If server receives more headers than the buffer size, it responds to the client with
    /// "431 Request Header Fields Too Large".
    ///
    /// Note that headers is allocated on the stack by default, which has higher performance. After
    /// setting this value, headers will be allocated in heap memory, that is, heap memory
    /// allocation will occur for each request, and there will be a performance drop of about 5%.
    ///
    /// Default is 100.
    pub fn max_headers(&mut self, val: usize) -> &mut Self {
        self.h1_max_headers = Some(val);
        self
    }

    /// Set the maximum size of request headers (including the start line) in bytes.
    ///
    /// If the client sends headers exceeding this limit, the server responds to the
    /// client with "431 Request Header Fields Too Large" and closes the connection.
    ///
    /// If not configured, then the [`max_buf_size`](Builder::max_buf_size) will naturally be reached and applied.
    ///
    /// This value is also used as the maximum size limit for chunked trailers.
    ///
    /// Default is `None`.
    pub fn max_header_size(&mut self, val: usize) -> &mut Self {
        self.h1_max_header_size = Some(val);
        self
    }

    /// Set a timeout for reading client request headers. If a client does not
    /// transmit the entire header within this time, the connection is closed.
    ///
    /// Requires a [`Timer`] set by [`Builder::timer`] to take effect. Panics if `header_read_timeout` is configured
    /// without a [`Timer`].
    ///
    /// Pass `None` to disable.
    ///
    /// Default is 30 seconds.
    pub fn header_read_timeout(&mut self, read_timeout: impl Into<Option<Duration>>) -> &mut Self {
        self.h1_header_read_timeout = Dur::Configured(read_timeout.into());
        self
    }

    /// PARLEY PATCH: set how long a connection may wait for the first byte of its next
    /// request (a keep-alive connection between requests, or a new one): past it the
    /// connection is closed, without an error. Once a byte of the head has arrived, the
    /// `header_read_timeout` alone applies, counted from when the wait began as without
    /// an idle timeout; an idle timeout longer than it has no effect. Never while a
    /// request is being served (a streaming response).
    ///
    /// Requires a [`Timer`] set by [`Builder::timer`] to take effect. Panics if
    /// `idle_timeout` is configured without a [`Timer`].
    ///
    /// Default is `None`: the header read timeout alone.
    pub fn idle_timeout(&mut self, idle: impl Into<Option<Duration>>) -> &mut Self {
        self.h1_idle_timeout = idle.into();
        self
    }

    /// PARLEY PATCH: set whether a keep-alive connection that has waited the idle
    /// timeout ([`Builder::idle_timeout`], which must be set) for its next request
    /// completes its future with `Ok(())`, instead of closing, so that its IO can be
    /// taken back ([`Connection::is_idle`], [`Connection::into_parts`]) and waited on
    /// without the connection's state (its buffers, timer, the future itself). Only with
    /// nothing held for a next request (none in flight, everything written and flushed,
    /// nothing read ahead: a read found nothing), and only after a first request was
    /// served: otherwise the idle timeout closes it, as without this option. The caller
    /// serves the IO's next bytes with a new connection, and closes it when it wants (its
    /// own idle timeout, a shutdown). A connection serving requests back to back, with
    /// gaps shorter than the idle timeout, never yields.
    ///
    /// Default is `false`.
    pub fn yield_when_idle(&mut self, enabled: bool) -> &mut Self {
        self.h1_yield_when_idle = enabled;
        self
    }

    /// PARLEY PATCH: set whether an HTTP/1.1 `GET` whose `Accept` names
    /// `text/event-stream` carries an [`OnUpgrade`](crate::upgrade::OnUpgrade) in its
    /// extensions, as a request with `Upgrade` does. A response to it with
    /// [`DetachBody`](crate::ext::DetachBody) in its extensions is written as its head
    /// alone, and the connection is then handed over through that upgrade: the caller
    /// streams the body on the IO itself (a Server-Sent Events stream, which lasts as
    /// long as the connection, without hyper's connection state beside it). A response
    /// without it is served as usual. Needs [`Connection::with_upgrades`].
    ///
    /// Default is `false`.
    pub fn detach_event_streams(&mut self, enabled: bool) -> &mut Self {
        self.h1_detach_event_streams = enabled;
        self
    }

    /// Set whether HTTP/1 connections should try to use vectored writes,
    /// or always flatten into a single buffer.
    ///
    /// Note that setting this to false may mean more copies of body data,
    /// but may also improve performance when an IO transport doesn't
    /// support vectored writes well, such as most TLS implementations.
    ///
    /// Setting this to true will force hyper to use queued strategy,
    /// which may eliminate unnecessary cloning on some TLS backends.
    ///
    /// Default is `auto`. In this mode hyper will try to guess which
    /// mode to use.
    pub fn writev(&mut self, val: bool) -> &mut Self {
        self.h1_writev = Some(val);
        self
    }

    /// Set the maximum buffer size for the connection.
    ///
    /// Default is ~400kb.
    ///
    /// # Panics
    ///
    /// The minimum value allowed is 8192. This method panics if the passed `max` is less than the minimum.
    pub fn max_buf_size(&mut self, max: usize) -> &mut Self {
        assert!(
            max >= proto::h1::MINIMUM_MAX_BUFFER_SIZE,
            "the max_buf_size cannot be smaller than the minimum that h1 specifies."
        );
        self.max_buf_size = Some(max);
        self
    }

    /// Set whether the `date` header should be included in HTTP responses.
    ///
    /// Note that including the `date` header is recommended by RFC 7231.
    ///
    /// Default is `true`.
    pub fn auto_date_header(&mut self, enabled: bool) -> &mut Self {
        self.date_header = enabled;
        self
    }

    /// Aggregates flushes to better support pipelined responses.
    ///
    /// Experimental, may have bugs.
    ///
    /// Default is `false`.
    pub fn pipeline_flush(&mut self, enabled: bool) -> &mut Self {
        self.pipeline_flush = enabled;
        self
    }

    /// Set the timer used in background tasks.
    pub fn timer<M>(&mut self, timer: M) -> &mut Self
    where
        M: Timer + Send + Sync + 'static,
    {
        self.timer = Time::Timer(Arc::new(timer));
        self
    }

    /// Bind a connection together with a [`Service`](crate::service::Service).
    ///
    /// This returns a Future that must be polled in order for HTTP to be
    /// driven on the connection.
    ///
    /// # Panics
    ///
    /// If a timeout option has been configured, but a `timer` has not been
    /// provided, calling `serve_connection` will panic.
    ///
    /// # Example
    ///
    /// ```
    /// # use hyper::{body::Incoming, Request, Response};
    /// # use hyper::service::Service;
    /// # use hyper::server::conn::http1::Builder;
    /// # use hyper::rt::{Read, Write};
    /// # async fn run<I, S>(some_io: I, some_service: S)
    /// # where
    /// #     I: Read + Write + Unpin + Send + 'static,
    /// #     S: Service<hyper::Request<Incoming>, Response=hyper::Response<Incoming>> + Send + 'static,
    /// #     S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    /// #     S::Future: Send,
    /// # {
    /// let http = Builder::new();
    /// let conn = http.serve_connection(some_io, some_service);
    ///
    /// if let Err(e) = conn.await {
    ///     eprintln!("server connection error: {}", e);
    /// }
    /// # }
    /// # fn main() {}
    /// ```
    pub fn serve_connection<I, S>(&self, io: I, service: S) -> Connection<I, S>
    where
        S: HttpService<IncomingBody>,
        S::Error: Into<Box<dyn StdError + Send + Sync>>,
        S::ResBody: 'static,
        <S::ResBody as Body>::Error: Into<Box<dyn StdError + Send + Sync>>,
        I: Read + Write + Unpin,
    {
        let mut conn = proto::Conn::new(io);
        conn.set_h1_parser_config(self.h1_parser_config.clone());
        conn.set_timer(self.timer.clone());
        if !self.h1_keep_alive {
            conn.disable_keep_alive();
        }
        if self.h1_half_close {
            conn.set_allow_half_close();
        }
        if self.h1_title_case_headers {
            conn.set_title_case_headers();
        }
        if self.h1_preserve_header_case {
            conn.set_preserve_header_case();
        }
        if let Some(max_headers) = self.h1_max_headers {
            conn.set_http1_max_headers(max_headers);
        }
        if let Some(max_header_size) = self.h1_max_header_size {
            conn.set_http1_max_header_size(max_header_size);
        }
        if let Some(dur) = self
            .timer
            .check(self.h1_header_read_timeout, "header_read_timeout")
        {
            conn.set_http1_header_read_timeout(dur);
        }
        // PARLEY PATCH: the idle timeout (`Builder::idle_timeout`).
        if let Some(dur) = self
            .timer
            .check(Dur::Configured(self.h1_idle_timeout), "idle_timeout")
        {
            conn.set_http1_idle_timeout(dur);
        }
        // PARLEY PATCH: see `Builder::yield_when_idle`.
        if self.h1_yield_when_idle {
            conn.set_http1_yield_when_idle();
        }
        if self.h1_detach_event_streams {
            conn.set_http1_detach_event_streams();
        }
        if let Some(writev) = self.h1_writev {
            if writev {
                conn.set_write_strategy_queue();
            } else {
                conn.set_write_strategy_flatten();
            }
        }
        conn.set_flush_pipeline(self.pipeline_flush);
        if let Some(max) = self.max_buf_size {
            conn.set_max_buf_size(max);
        }
        if !self.date_header {
            conn.disable_date_header();
        }
        let sd = proto::h1::dispatch::Server::new(service);
        let proto = proto::h1::Dispatcher::new(sd, conn);
        Connection { conn: proto }
    }
}

/// A future binding a connection with a Service with Upgrade support.
#[must_use = "futures do nothing unless polled"]
#[allow(missing_debug_implementations)]
pub struct UpgradeableConnection<T, S>
where
    S: HttpService<IncomingBody>,
{
    pub(super) inner: Option<Connection<T, S>>,
}

impl<I, B, S> UpgradeableConnection<I, S>
where
    S: HttpService<IncomingBody, ResBody = B>,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    I: Read + Write + Unpin,
    B: Body + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    /// Start a graceful shutdown process for this connection.
    ///
    /// This `Connection` should continue to be polled until shutdown
    /// can finish.
    pub fn graceful_shutdown(mut self: Pin<&mut Self>) {
        // Connection (`inner`) is `None` if it was upgraded (and `poll` is `Ready`).
        // In that case, we don't need to call `graceful_shutdown`.
        if let Some(conn) = self.inner.as_mut() {
            Pin::new(conn).graceful_shutdown();
        }
    }

    /// PARLEY PATCH: whether the connection completed because it was idle
    /// ([`Builder::yield_when_idle`]): see [`Connection::is_idle`].
    pub fn is_idle(&self) -> bool {
        self.inner.as_ref().is_some_and(Connection::is_idle)
    }

    /// Return the inner IO object, and additional information provided the connection
    /// has not yet been upgraded.
    pub fn into_parts(self) -> Option<Parts<I, S>> {
        self.inner.map(Connection::into_parts)
    }
}

impl<I, B, S> Future for UpgradeableConnection<I, S>
where
    S: HttpService<IncomingBody, ResBody = B>,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    I: Read + Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Output = crate::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(conn) = self.inner.as_mut() {
            match ready!(Pin::new(&mut conn.conn).poll(cx)) {
                // PARLEY PATCH: idle (`Builder::yield_when_idle`): `inner` is kept, for
                // `into_parts`.
                Ok(proto::Dispatched::Shutdown | proto::Dispatched::Idle) => Poll::Ready(Ok(())),
                Ok(proto::Dispatched::Upgrade(pending)) => {
                    let (io, buf, _) = self
                        .inner
                        .take()
                        .expect("upgradeable server connection missing after upgrade")
                        .conn
                        .into_inner();
                    pending.fulfill(Upgraded::new(io, buf));
                    Poll::Ready(Ok(()))
                }
                Err(e) => Poll::Ready(Err(e)),
            }
        } else {
            // inner is `None`, meaning the connection was upgraded, thus it's `Poll::Ready(Ok(()))`
            Poll::Ready(Ok(()))
        }
    }
}

// PARLEY PATCH: tests of `Builder::yield_when_idle`.
#[cfg(all(test, not(miri)))]
mod parley_yield_when_idle_tests {
    use super::*;
    use crate::common::io::Compat;
    use crate::rt::Sleep;
    use crate::service::service_fn;
    use std::convert::Infallible;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    #[derive(Clone)]
    struct TestTimer;

    struct TestSleep(Pin<Box<tokio::time::Sleep>>);

    impl Future for TestSleep {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0.as_mut().poll(cx)
        }
    }

    impl Sleep for TestSleep {}

    impl Timer for TestTimer {
        fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
            Box::pin(TestSleep(Box::pin(tokio::time::sleep(duration))))
        }

        fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
            Box::pin(TestSleep(Box::pin(tokio::time::sleep_until(
                deadline.into(),
            ))))
        }
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";

    /// The idle timeout, after which an idle connection yields.
    const IDLE: Duration = Duration::from_millis(200);

    fn builder(yield_when_idle: bool) -> Builder {
        let mut builder = Builder::new();
        builder
            .timer(TestTimer)
            .header_read_timeout(Duration::from_secs(5))
            .idle_timeout(IDLE)
            .yield_when_idle(yield_when_idle);
        builder
    }

    async fn hello(_: http::Request<IncomingBody>) -> Result<http::Response<String>, Infallible> {
        Ok(http::Response::new("hello".to_owned()))
    }

    /// Reads from `client` until `responses` responses (each ending with `hello`) came.
    async fn read_responses(client: &mut DuplexStream, responses: usize) {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while got.windows(5).filter(|w| w == b"hello").count() < responses {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn an_idle_connection_completes_and_a_new_one_serves_its_io() {
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(GET).await.unwrap();
        let mut conn = builder(true)
            .serve_connection(Compat::new(server), service_fn(hello))
            .with_upgrades();
        assert!(!conn.is_idle());
        let start = Instant::now();
        tokio::time::timeout(Duration::from_secs(1), &mut conn)
            .await
            .expect("completes once idle")
            .unwrap();
        assert!(start.elapsed() >= IDLE, "completed before the idle timeout");
        assert!(conn.is_idle());
        read_responses(&mut client, 1).await;
        let parts = conn.into_parts().expect("not upgraded");
        assert!(parts.read_buf.is_empty());

        // The next request, on the same IO: a new connection serves it. Two pipelined
        // requests are both answered before it completes again.
        client.write_all(GET).await.unwrap();
        client.write_all(GET).await.unwrap();
        let mut conn = builder(true)
            .serve_connection(parts.io, parts.service)
            .with_upgrades();
        tokio::time::timeout(Duration::from_secs(1), &mut conn)
            .await
            .expect("completes once idle")
            .unwrap();
        assert!(conn.is_idle());
        read_responses(&mut client, 2).await;

        // The client goes away: the connection ends, not idle.
        let parts = conn.into_parts().unwrap();
        drop(client);
        let mut conn = builder(true)
            .serve_connection(parts.io, parts.service)
            .with_upgrades();
        tokio::time::timeout(Duration::from_secs(1), &mut conn)
            .await
            .expect("ends at EOF")
            .unwrap();
        assert!(!conn.is_idle());
    }

    #[tokio::test]
    async fn requests_closer_than_the_idle_timeout_keep_it_serving() {
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(GET).await.unwrap();
        let mut conn = builder(true).serve_connection(Compat::new(server), service_fn(hello));
        // Requests every half idle timeout: it serves them all without completing.
        for n in 1..=4 {
            let waited = tokio::time::timeout(IDLE / 2, &mut conn).await;
            assert!(waited.is_err(), "completed: {waited:?}");
            read_responses(&mut client, 1).await;
            if n < 4 {
                client.write_all(GET).await.unwrap();
            }
        }
        tokio::time::timeout(Duration::from_secs(1), &mut conn)
            .await
            .expect("completes once idle")
            .unwrap();
        assert!(conn.is_idle());
    }

    #[tokio::test]
    async fn without_the_option_the_idle_timeout_closes() {
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(GET).await.unwrap();
        let mut conn = builder(false).serve_connection(Compat::new(server), service_fn(hello));
        tokio::time::timeout(Duration::from_secs(1), &mut conn)
            .await
            .expect("closed after the idle timeout")
            .unwrap();
        assert!(!conn.is_idle());
        read_responses(&mut client, 1).await;
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn a_connection_without_a_first_request_is_closed_not_yielded() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut conn = builder(true).serve_connection(Compat::new(server), service_fn(hello));
        tokio::time::timeout(Duration::from_secs(1), &mut conn)
            .await
            .expect("closed after the idle timeout")
            .unwrap();
        assert!(!conn.is_idle());
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    const LONG: &[u8] = b"GET /long HTTP/1.1\r\nhost: x\r\n\r\n";

    /// `hello`, and for `/long` asking for an idle timeout of four `IDLE`s next
    /// (`ext::NextIdleTimeout`).
    async fn hello_or_long(
        req: http::Request<IncomingBody>,
    ) -> Result<http::Response<String>, Infallible> {
        let mut response = http::Response::new("hello".to_owned());
        if req.uri().path() == "/long" {
            response
                .extensions_mut()
                .insert(crate::ext::NextIdleTimeout(IDLE * 4));
        }
        Ok(response)
    }

    #[tokio::test]
    async fn a_response_that_asks_for_a_longer_idle_timeout_keeps_the_connection() {
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(LONG).await.unwrap();
        let mut conn =
            builder(true).serve_connection(Compat::new(server), service_fn(hello_or_long));
        // Past the builder's idle timeout, it still serves (it did not yield).
        let waited = tokio::time::timeout(IDLE * 2, &mut conn).await;
        assert!(waited.is_err(), "completed: {waited:?}");
        read_responses(&mut client, 1).await;
        // The next response asks for nothing: the builder's idle timeout applies again.
        client.write_all(GET).await.unwrap();
        let start = Instant::now();
        tokio::time::timeout(Duration::from_secs(1), &mut conn)
            .await
            .expect("completes once idle")
            .unwrap();
        assert!(conn.is_idle());
        assert!(start.elapsed() < IDLE * 3, "waited {:?}", start.elapsed());
        read_responses(&mut client, 1).await;
    }

    #[tokio::test]
    async fn a_longer_idle_timeout_asked_for_closes_the_connection_when_it_elapses() {
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(LONG).await.unwrap();
        let mut conn =
            builder(true).serve_connection(Compat::new(server), service_fn(hello_or_long));
        let start = Instant::now();
        tokio::time::timeout(Duration::from_secs(2), &mut conn)
            .await
            .expect("closed after the idle timeout asked for")
            .unwrap();
        assert!(
            start.elapsed() >= IDLE * 4,
            "closed after {:?}",
            start.elapsed()
        );
        assert!(!conn.is_idle(), "yielded instead of closing");
        read_responses(&mut client, 1).await;
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn a_partly_read_head_is_not_idle() {
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(GET).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut conn = builder(true).serve_connection(Compat::new(server), service_fn(hello));
        let waited = tokio::time::timeout(IDLE * 2, &mut conn).await;
        assert!(
            waited.is_err(),
            "completed with a head half read: {waited:?}"
        );
        client.write_all(b"host: x\r\n\r\n").await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), &mut conn)
            .await
            .expect("completes once idle")
            .unwrap();
        assert!(conn.is_idle());
        read_responses(&mut client, 2).await;
    }
}

// PARLEY PATCH: tests of `Builder::detach_event_streams` and `ext::DetachBody`.
#[cfg(all(test, not(miri)))]
mod parley_detach_event_streams_tests {
    use super::*;
    use crate::common::io::Compat;
    use crate::service::service_fn;
    use crate::upgrade::OnUpgrade;
    use std::convert::Infallible;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    const EVENTS: &[u8] = b"GET /sse HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n";
    // Not handed over: `connection: close`, so that the server closes after its reply.
    const EVENTS_CLOSE: &[u8] =
        b"GET /sse HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\nconnection: close\r\n\r\n";
    const PLAIN: &[u8] = b"GET /sse HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

    /// The service: with an `OnUpgrade`, a detached head whose body its own task writes
    /// (one chunk, then the end); without, "plain" as a normal body.
    async fn events(
        mut req: http::Request<IncomingBody>,
    ) -> Result<http::Response<String>, Infallible> {
        let Some(upgrade) = req.extensions_mut().remove::<OnUpgrade>() else {
            return Ok(http::Response::new("plain".to_owned()));
        };
        tokio::spawn(async move {
            let upgraded = upgrade.await.expect("handed over");
            let mut io = crate::common::io::Compat::new(upgraded);
            io.write_all(b"5\r\nhello\r\n0\r\n\r\n").await.unwrap();
        });
        let mut res = http::Response::new(String::new());
        res.extensions_mut().insert(crate::ext::DetachBody);
        res.headers_mut().insert(
            http::header::TRANSFER_ENCODING,
            http::HeaderValue::from_static("chunked"),
        );
        // As a layer may add it for an empty body: dropped from a detached head.
        res.headers_mut().insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from_static("0"),
        );
        Ok(res)
    }

    async fn read_to_end(client: &mut DuplexStream) -> String {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut got))
            .await
            .expect("the server closes")
            .unwrap();
        String::from_utf8(got).unwrap()
    }

    async fn serve(detach: bool, request: &[u8]) -> String {
        let (mut client, server) = tokio::io::duplex(4096);
        // The client's write side stays open (hyper takes an EOF for a client gone).
        client.write_all(request).await.unwrap();
        let conn = Builder::new()
            .detach_event_streams(detach)
            .serve_connection(Compat::new(server), service_fn(events))
            .with_upgrades();
        tokio::spawn(conn);
        read_to_end(&mut client).await
    }

    #[tokio::test]
    async fn an_event_stream_is_handed_over_after_its_head() {
        let got = serve(true, EVENTS).await;
        let (head, body) = got.split_once("\r\n\r\n").expect("a head");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{got:?}");
        assert!(head.contains("transfer-encoding: chunked"), "{got:?}");
        assert!(!head.contains("content-length"), "{got:?}");
        // The body exactly as the service's task wrote it: nothing of hyper's own.
        assert_eq!(body, "5\r\nhello\r\n0\r\n\r\n");
    }

    #[tokio::test]
    async fn without_the_option_or_the_accept_nothing_is_handed_over() {
        for (detach, request) in [(false, EVENTS_CLOSE), (true, PLAIN)] {
            let got = serve(detach, request).await;
            assert!(got.ends_with("plain"), "{detach} {got:?}");
            assert!(got.contains("content-length: 5"), "{got:?}");
        }
    }

    #[tokio::test]
    async fn an_http_10_request_is_not_handed_over() {
        let got = serve(true, b"GET /sse HTTP/1.0\r\naccept: text/event-stream\r\n\r\n").await;
        assert!(got.ends_with("plain"), "{got:?}");
    }
}
