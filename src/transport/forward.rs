//! No sticky sessions: a request for a session that another instance holds is routed to
//! that instance.
//!
//! In a cluster every session id and SSE ticket starts with the id of the instance that
//! made it (`<instance>.<random>`), and every instance publishes its HTTP address with its
//! presence heartbeat. `POST /session/{id}`, `GET /poll?session_id=…`, and `GET /sse`
//! with a `session_id` or `ticket` (the browser's automatic reconnect repeats the ticket
//! URL with `Last-Event-ID`) are checked here first: when the id names another live
//! instance and this one does not hold the session, the request is forwarded there over
//! plain HTTP and its response — a long-poll answer, a command reply, or an SSE stream —
//! is relayed back as it comes. So the session stays where it is, with its positions and
//! its replay buffer, and nothing is lost or delivered twice however requests are spread.
//!
//! The owner's address comes from the broker, which keeps the last known addresses of
//! live instances, so relaying goes on while Redis is unreachable.
//!
//! When the owner is gone (crashed, or stopped after a rolling restart), the request is
//! served here: the session is unknown, the client gets `SESSION_NOT_FOUND` (or
//! `resumed: false`) and opens a new session and log-syncs its rooms by last seq, as
//! after any lost session. WebSocket resumes are not forwarded: a WebSocket that lands
//! elsewhere resumes from the log the same way.
//!
//! A load balancer therefore needs no affinity; instances need to reach each other's
//! advertised address (`broker.advertise`). Forwarded requests carry
//! `X-Parley-Forwarded` and are never forwarded again.
//!
//! Owns: finding the owner and relaying. Not: sessions (`session`), the address book
//! (`broker`).

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use axum::{
    body::{Body, Bytes},
    extract::Request,
    http::{HeaderValue, Uri},
    response::{IntoResponse, Response},
};
use futures_util::future::Either;

use super::Ctx;

/// Marks a request relayed by another instance.
pub const FORWARDED: &str = "x-parley-forwarded";

/// Headers that describe one hop, not the request: never relayed (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn hop_by_hop(name: &axum::http::HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// The session id or ticket a request refers to.
fn session_ref(uri: &Uri) -> Option<String> {
    if let Some(id) = uri.path().strip_prefix("/session/") {
        return Some(id.to_string());
    }
    let query = uri.query()?;
    let mut ticket = None;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("session_id", v)) if !v.is_empty() => return Some(v.to_string()),
            Some(("ticket", v)) if !v.is_empty() => ticket = Some(v.to_string()),
            _ => {}
        }
    }
    ticket
}

/// Whether `parts` is a `GET /poll` that waits (a hold time above 0), with idle HTTP/1
/// connections giving their state back (`server.keep_alive_release`).
fn long_poll(ctx: &Ctx, parts: &axum::http::request::Parts) -> bool {
    let config = &ctx.core.config;
    if parts.method != axum::http::Method::GET
        || parts.uri.path() != "/poll"
        || config.server.h1_release().is_none()
    {
        return false;
    }
    let wait = parts.uri.query().and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("wait="))
            .map(|v| v != "0")
    });
    wait.unwrap_or(!config.poll.default_hold.is_zero())
}

/// The instance named by a session id or ticket.
fn owner_of(id: &str) -> Option<&str> {
    id.split_once('.').map(|(owner, _)| owner)
}

/// The layer on the session routes (`route_layer(ToOwner::layer(ctx))`): forwards a
/// request to the owning instance, or runs it here.
#[derive(Clone)]
pub struct ToOwnerLayer(Ctx);

impl ToOwnerLayer {
    pub fn new(ctx: Ctx) -> Self {
        Self(ctx)
    }
}

impl<S> tower::Layer<S> for ToOwnerLayer {
    type Service = ToOwner<S>;
    fn layer(&self, inner: S) -> ToOwner<S> {
        ToOwner {
            ctx: self.0.clone(),
            inner,
        }
    }
}

/// See [`ToOwnerLayer`]. A hand-written service, not `axum::middleware::from_fn`: its
/// future lives as long as the request (a pending long-poll waits in it), and for a
/// session held here it is the inner route's future itself, with no box of its own
/// around it. (`from_fn` boxed a future holding the context, the request's slot and a
/// boxed `Next`, and boxed the inner call again: ~1.4 KB per pending long-poll,
/// docs/BENCHMARKS.md "Round four: memory".) Forwarding, rare and with a much larger
/// state, is boxed.
#[derive(Clone)]
pub struct ToOwner<S> {
    ctx: Ctx,
    inner: S,
}

type Forwarding = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<S> tower::Service<Request> for ToOwner<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<S::Future, Forwarding>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        match foreign_owner(&self.ctx, &req) {
            None => Either::Left(self.inner.call(req)),
            Some(owner) => {
                // The service polled ready goes with the request; a clone stays.
                let fresh = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, fresh);
                let ctx = self.ctx.clone();
                Either::Right(Box::pin(async move {
                    Ok(forward(ctx, owner, req, inner).await)
                }))
            }
        }
    }
}

/// Runs the request on `inner` (this instance).
async fn here<S>(mut inner: S, req: Request) -> Response
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    let Ok(()) = std::future::poll_fn(|cx| inner.poll_ready(cx)).await;
    let Ok(response) = inner.call(req).await;
    response
}

/// The other instance that holds the request's session, if it is not here.
fn foreign_owner(ctx: &Ctx, req: &Request) -> Option<String> {
    if req.headers().contains_key(FORWARDED) {
        return None;
    }
    let id = session_ref(req.uri())?;
    let broker = ctx.core.chat.broker();
    let (Some(owner), Some(me)) = (owner_of(&id), broker.instance()) else {
        return None;
    };
    if owner == me || ctx.core.sessions.get(&id).is_some() {
        return None;
    }
    Some(owner.to_string())
}

/// Relays the request to `owner`, or serves it here when the owner is gone.
async fn forward<S>(ctx: Ctx, owner: String, req: Request, inner: S) -> Response
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    let owner = owner.as_str();
    let Some(addr) = ctx.core.chat.broker().locate(owner).await else {
        // The owner is gone: the session went with it (the handler says so).
        return here(inner, req).await;
    };
    let (parts, body) = req.into_parts();
    let limit = ctx.core.config.ws.max_frame_bytes;
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            return (axum::http::StatusCode::PAYLOAD_TOO_LARGE, e.to_string()).into_response();
        }
    };
    match relay(&addr, &parts, body.clone()).await {
        Ok(mut response) => {
            // A relayed long-poll's reply keeps the client's connection as the owner's
            // own would have (`poll::keep_state`).
            if long_poll(&ctx, &parts) {
                super::poll::keep_state(&ctx.core.config.server, &mut response);
            }
            response
        }
        Err(e) => {
            tracing::debug!(owner, %addr, error = %e, "owner unreachable; serving here");
            here(inner, Request::from_parts(parts, Body::from(body))).await
        }
    }
}

async fn relay(
    addr: &str,
    parts: &axum::http::request::Parts,
    body: Bytes,
) -> Result<Response, Box<dyn std::error::Error + Send + Sync>> {
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::net::TcpStream::connect(addr),
    )
    .await??;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "forwarded connection ended");
        }
    });
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut req = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(path);
    for (k, v) in parts.headers.iter().filter(|(k, _)| !hop_by_hop(k)) {
        req = req.header(k, v);
    }
    req = req.header(FORWARDED, HeaderValue::from_static("1"));
    let mut response = sender.send_request(req.body(Body::from(body))?).await?;
    for name in HOP_BY_HOP {
        response.headers_mut().remove(name);
    }
    Ok(response.map(Body::new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_session_or_ticket_and_its_owner() {
        let cases = [
            ("/session/ab12.ffff", Some("ab12.ffff")),
            ("/poll?session_id=ab12.00&cursor=3", Some("ab12.00")),
            ("/sse?ticket=cd.99", Some("cd.99")),
            ("/sse?ticket=cd.99&session_id=ef.1&last_pos=2", Some("ef.1")),
            ("/sse", None),
            ("/poll?cursor=1", None),
        ];
        for (uri, want) in cases {
            let uri: Uri = uri.parse().unwrap();
            assert_eq!(session_ref(&uri).as_deref(), want, "{uri}");
        }
        assert_eq!(owner_of("ab12.ffff"), Some("ab12"));
        assert_eq!(owner_of("0123abcd"), None);
    }
}
