//! HTTP/3 (RFC 9114): serves the requests of one QUIC connection with the same axum
//! router as HTTP/1.1 and HTTP/2, and hands a WebTransport session at `/wt` to [`wt`].
//!
//! hyperium's `h3` decodes requests into `http::Request<()>` plus a stream; this module
//! is the glue: the stream's DATA frames become the request body (a streaming
//! `http_body::Body`, so uploads stay streamed and bounded by the router's body limit
//! and QUIC flow control), and the router's response body is written back frame by
//! frame (so SSE and a pending long-poll are long-lived responses, as over TCP). Every
//! write has the server's write deadline; a request's head must arrive within
//! `server.header_read_timeout`; a connection with no request open for
//! `server.h2_idle_timeout` is closed, as an idle HTTP/2 connection is.
//!
//! Owns: one QUIC connection's HTTP/3 requests. Not: the UDP endpoint, address
//! validation and admission (`server`), the WebTransport session ([`wt`]).
//!
//! [`wt`]: super::wt

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::{
    body::Body,
    http::{HeaderName, Method, Request, Response, header},
};
use bytes::{Buf, Bytes};
use futures_util::{FutureExt, future::Either};
use h3::{ext::Protocol, server::RequestStream};
use http_body::Frame;
use tokio::time::timeout;

use super::{
    Ctx, PeerIp,
    app::App,
    idle::{Counted, Streams},
};

/// An HTTP/3 server connection over quinn.
pub type H3Connection = h3::server::Connection<h3_quinn::Connection, Bytes>;
/// A request stream (both directions).
pub type H3Stream = RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;
type RecvHalf = RequestStream<h3_quinn::RecvStream, Bytes>;
type SendHalf = RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;

/// Largest request head (QPACK-decoded field section) a client may send.
pub const MAX_FIELD_SECTION: u64 = 64 * 1024;

/// The app as one HTTP/3 connection serves it: its requests counted as open.
pub type Service = Counted<App>;

/// Headers that name HTTP/1 connection state; HTTP/3 forbids them (RFC 9114 4.2).
const CONNECTION_SPECIFIC: [HeaderName; 4] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
];

/// Serves one QUIC connection (its handshake done) until it closes, goes idle, or the
/// server shuts down and its last request ends. `app` is the router with its state.
///
/// Two stages: the requests (boxed), then, if a WebTransport session took the connection
/// over, that session; the requests' future (the HTTP/3 connection, its accept loop) is
/// gone by then, not kept beside the session in every idle session's task.
pub fn serve(
    quic: quinn::Connection,
    app: App,
    ctx: Ctx,
    peer: PeerIp,
) -> impl Future<Output = ()> + Send {
    Box::pin(requests(quic, app, ctx, peer)).then(|session| match session {
        Some(session) => Either::Left(session),
        None => Either::Right(std::future::ready(())),
    })
}

/// A WebTransport session that took the connection over.
type Session = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves the connection's requests until it ends (`None`), or until a WebTransport
/// CONNECT to `/wt` takes it over (its session, to run next).
async fn requests(quic: quinn::Connection, app: App, ctx: Ctx, peer: PeerIp) -> Option<Session> {
    let config = &ctx.core.config;
    let builder = builder();
    let handshake = builder.build(h3_quinn::Connection::new(quic.clone()));
    let mut conn: H3Connection = match timeout(config.server.preface_timeout, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "HTTP/3 connection failed to start");
            return None;
        }
        Err(_) => {
            tracing::debug!("HTTP/3 control streams not opened in time");
            quic.close(code(h3::error::Code::H3_SETTINGS_ERROR), b"");
            return None;
        }
    };
    let streams = Streams::new();
    let service = Counted::new(app, streams.clone());
    let (idle, header_read) = (
        config.server.h2_idle_timeout,
        config.server.header_read_timeout,
    );
    let mut draining = false;
    loop {
        let resolver = tokio::select! {
            accepted = conn.accept() => match accepted {
                Ok(Some(resolver)) => resolver,
                // A GOAWAY both ways and every request done.
                Ok(None) => break,
                Err(e) => {
                    if !e.is_h3_no_error() {
                        tracing::debug!(error = %e, "HTTP/3 connection ended with an error");
                    }
                    break;
                }
            },
            _ = ctx.shutdown_shard().cancelled(), if !draining => {
                // GOAWAY: no new requests; those open finish (SSE streams and polls end
                // themselves on shutdown), then `accept` returns `None`.
                draining = true;
                let _ = conn.shutdown(0).await;
                continue;
            }
            _ = streams.idle_for(idle) => {
                tracing::debug!(?idle, "HTTP/3 connection without requests: closing");
                let _ = conn.shutdown(0).await;
                break;
            }
        };
        // The head is read here, not in the request's task: a WebTransport CONNECT takes
        // the connection itself. One slow head holds up only this connection's next
        // requests, and only for `header_read`.
        let (request, stream) = match timeout(header_read, resolver.resolve_request()).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "HTTP/3 request head unreadable");
                continue;
            }
            Err(_) => {
                tracing::debug!("HTTP/3 request head not complete in time");
                continue;
            }
        };
        if is_webtransport(&request) {
            if request.uri().path() == "/wt" {
                let session = super::wt::serve(request, stream, conn, quic, ctx, service);
                return Some(Box::pin(session));
            }
            tokio::spawn(refuse(stream, axum::http::StatusCode::NOT_FOUND));
            continue;
        }
        ctx.tracker.spawn(serve_request(
            service.clone(),
            request,
            stream,
            peer,
            write_timeout(&ctx),
        ));
    }
    // Every request is done (or none was open for `idle`): nothing in flight is cut.
    quic.close(code(h3::error::Code::H3_NO_ERROR), b"");
    None
}

/// The HTTP/3 connection's settings (also the bare WebTransport floor's,
/// `parley-floor`): WebTransport on, one session per connection.
pub fn builder() -> h3::server::Builder {
    let mut builder = h3::server::builder();
    builder
        .max_field_section_size(MAX_FIELD_SECTION)
        .enable_extended_connect(true)
        .enable_webtransport(true)
        .max_webtransport_sessions(1)
        // WebTransport needs HTTP datagrams (RFC 9297) whether or not `/wt` sends any.
        .enable_datagram(true)
        .send_grease(true);
    builder
}

/// An HTTP/3 error code as a QUIC application close code.
pub(super) fn code(c: h3::error::Code) -> quinn::VarInt {
    quinn::VarInt::from_u64(c.value()).unwrap_or(quinn::VarInt::MAX)
}

fn write_timeout(ctx: &Ctx) -> Duration {
    ctx.core.config.server.write_timeout
}

/// An extended CONNECT for a WebTransport session (`:protocol = webtransport`).
fn is_webtransport(request: &Request<()>) -> bool {
    request.method() == Method::CONNECT
        && request.extensions().get::<Protocol>() == Some(&Protocol::WEB_TRANSPORT)
}

/// Answers a request with `status` and no body.
pub(super) async fn refuse(mut stream: H3Stream, status: axum::http::StatusCode) {
    let response = Response::builder()
        .status(status)
        .body(())
        .unwrap_or_default();
    let _ = timeout(Duration::from_secs(1), async {
        stream.send_response(response).await?;
        stream.finish().await
    })
    .await;
}

/// Runs one request through the router and writes its response: the head, then the
/// body frame by frame (each write under `write_timeout`; a stuck or reset stream ends
/// the response, and with it the handler's body: an SSE stream detaches its session).
pub(super) async fn serve_request(
    service: Service,
    request: Request<()>,
    stream: H3Stream,
    peer: PeerIp,
    write_timeout: Duration,
) {
    let (mut send, recv) = stream.split();
    let (mut parts, ()) = request.into_parts();
    parts.extensions.insert(peer);
    let request = Request::from_parts(parts, Body::new(RequestBody { recv, done: false }));
    let response = match tower::ServiceExt::oneshot(service, request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (mut parts, body) = response.into_parts();
    for name in &CONNECTION_SPECIFIC {
        parts.headers.remove(name);
    }
    if !matches!(
        timeout(
            write_timeout,
            send.send_response(Response::from_parts(parts, ()))
        )
        .await,
        Ok(Ok(()))
    ) {
        return;
    }
    if write_body(&mut send, body, write_timeout).await {
        let _ = timeout(write_timeout, send.finish()).await;
    }
}

/// Writes a response body; `false` when the stream failed or stalled.
async fn write_body(send: &mut SendHalf, body: Body, write_timeout: Duration) -> bool {
    let mut body = std::pin::pin!(body);
    loop {
        let frame = std::future::poll_fn(|cx| http_body::Body::poll_frame(body.as_mut(), cx));
        let frame = match frame.await {
            None => return true,
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "response body failed");
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return false;
            }
        };
        let written = match frame.into_data() {
            Ok(data) if data.is_empty() => continue,
            Ok(data) => timeout(write_timeout, send.send_data(data)).await,
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => timeout(write_timeout, send.send_trailers(trailers)).await,
                Err(_) => continue,
            },
        };
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "HTTP/3 response write failed");
                return false;
            }
            Err(_) => {
                tracing::debug!("HTTP/3 response write stalled: resetting the stream");
                send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
                return false;
            }
        }
    }
}

/// A request body read from the stream's DATA frames as they arrive.
struct RequestBody {
    recv: RecvHalf,
    done: bool,
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = h3::error::StreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match ready!(self.recv.poll_recv_data(cx)) {
            Ok(Some(mut data)) => {
                let bytes = data.copy_to_bytes(data.remaining());
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Ok(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Err(e) => {
                self.done = true;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
