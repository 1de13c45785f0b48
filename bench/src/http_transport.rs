//! The HTTP transports: Server-Sent Events and long-poll downstream, commands as POSTs
//! (`docs/PROTOCOL.md`, "Server-Sent Events", "Long-poll", "Commands over HTTP").
//!
//! Both use hyper's HTTP/1.1 client connection (HTTP/2 with `--http2`) over a plain
//! tokio `TcpStream`, or TLS over it with `--tls` (one spawned connection task each), and
//! keep little per connection: no buffers until data arrives (rustls keeps its own).
//!
//! - **SSE**: on the stream's connection, `POST /api/v1/tickets` (bearer) and then
//!   `GET /sse?ticket=T` on the same keep-alive connection; the first event is the
//!   `connected` frame. The stream is always JSON. Commands (join, ack) go to
//!   `POST /session/{id}` on a second connection, opened when the first command is sent
//!   and kept (HTTP/1.1 carries one request at a time). With `--http2` (h2c, prior
//!   knowledge) they share the stream's connection, as a browser's over HTTPS.
//! - **Long-poll**: `POST /session` with a `connect` frame, commands on the same
//!   connection while no poll is pending, then `GET /poll?session_id=S&cursor=C&wait=W`
//!   in a loop. The cursor acknowledges, so `ack` commands are not sent. The pending poll
//!   lives in the connection (not in the `recv` future), so `recv` stays cancel-safe.
//!   Replies are JSON arrays, or length-delimited protobuf with the proto encoding.

use std::{collections::VecDeque, future::Future, pin::Pin, time::Duration};

use anyhow::{Context, anyhow, bail};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::{
    Method, Request, StatusCode,
    body::Incoming as Body,
    client::conn::{TrySendError, http1, http2},
    header,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parley::{
    codec::{self, Encoding},
    proto::{self, ClientFrame, client_frame::Cmd, server_frame::Kind},
};

use crate::{
    target::{Target, TransportKind},
    wire::{self, Incoming},
};

const PROTOBUF: &str = "application/x-protobuf";

/// A client connection's request sender: HTTP/1.1, or HTTP/2 (`Target::http2`), whose
/// sender is shared by the stream (or polls) and the commands.
enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    async fn send_request(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> hyper::Result<hyper::Response<Body>> {
        match self {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        }
    }

    async fn try_send_request(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<Body>, TrySendError<Request<Full<Bytes>>>> {
        match self {
            Sender::H1(s) => s.try_send_request(req).await,
            Sender::H2(s) => s.try_send_request(req).await,
        }
    }

    /// Another sender on the same connection: HTTP/2 only (HTTP/1.1 carries one request
    /// at a time).
    fn shared(&self) -> Option<Sender> {
        match self {
            Sender::H1(_) => None,
            Sender::H2(s) => Some(Sender::H2(s.clone())),
        }
    }
}

/// What a finished poll gives back: the connection, and the status, the next cursor and
/// the body.
type PollDone = (Sender, anyhow::Result<(StatusCode, Option<u64>, Bytes)>);

/// One SSE or long-poll session.
pub struct HttpConnection {
    kind: TransportKind,
    target: Target,
    index: usize,
    /// Encoding of commands, replies and pushes on this connection (SSE: always JSON).
    encoding: Encoding,
    token: String,
    session_id: String,
    next_id: u64,
    /// The stream's connection: SSE until the stream opens; poll between polls.
    main: Option<Sender>,
    /// SSE: the event stream.
    stream: Option<Body>,
    /// SSE: bytes of events not yet complete.
    buf: BytesMut,
    /// Frames received but not yet yielded.
    pending: VecDeque<Bytes>,
    /// Long-poll: the poll in flight.
    inflight: Option<Pin<Box<dyn Future<Output = PollDone> + Send>>>,
    /// Long-poll: the last position received.
    cursor: u64,
    /// Long-poll: a poll has been sent (the next waits `Target::poll_gap` first).
    polled: bool,
    /// Commands while `main` is busy (SSE always).
    commands: Option<Sender>,
}

/// `req` again: method, URI, version, headers and body (shared `Bytes`).
fn copy_request(req: &Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    let mut copy = Request::new(req.body().clone());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// Whether a request sent on a reused connection got no response because the
/// connection closed under it: closed before a response began, or reset.
fn lost_to_a_close(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(io.kind(), ConnectionReset | ConnectionAborted | BrokenPipe);
        }
        source = s.source();
    }
    false
}

/// A response's status and whole body.
async fn read_whole(resp: hyper::Response<Body>) -> anyhow::Result<(StatusCode, Bytes)> {
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("HTTP body")?
        .to_bytes();
    Ok((status, body))
}

/// Opens a TCP connection and an HTTP/1.1 client on it (HTTP/2 with `Target::http2`);
/// the connection task runs until both the sender and any response body are gone.
async fn dial(target: &Target, index: usize) -> std::io::Result<Sender> {
    let stream = TokioIo::new(target.connect(index).await?);
    if target.http2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(stream)
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        return Ok(Sender::H2(sender));
    }
    let (sender, conn) = http1::Builder::new()
        .handshake(stream)
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Sender::H1(sender))
}

fn content_type(encoding: Encoding) -> &'static str {
    match encoding {
        Encoding::Proto => PROTOBUF,
        Encoding::Json => "application/json",
    }
}

/// Percent-encodes a query value (tickets and session ids are URL-safe already; this is
/// for safety).
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl HttpConnection {
    pub(crate) async fn open(target: &Target, index: usize) -> std::io::Result<HttpConnection> {
        let main = dial(target, index).await?;
        // Over HTTP/2 the commands share the stream's connection.
        let commands = main.shared();
        Ok(HttpConnection {
            kind: target.transport,
            target: target.clone(),
            index,
            encoding: match target.transport {
                TransportKind::Sse => Encoding::Json,
                _ => target.encoding,
            },
            token: String::new(),
            session_id: String::new(),
            next_id: 1,
            main: Some(main),
            stream: None,
            buf: BytesMut::new(),
            pending: VecDeque::new(),
            inflight: None,
            cursor: 0,
            polled: false,
            commands,
        })
    }

    pub(crate) fn encoding(&self) -> Encoding {
        self.encoding
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &'static str)>,
        accept: Option<&'static str>,
    ) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut b = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(header::HOST, &self.target.host);
        if !self.token.is_empty() {
            b = b.header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        }
        if self.target.browser_headers {
            b = browser_headers(b, &method, path, &self.target.host);
        }
        if let Some(a) = accept {
            b = b.header(header::ACCEPT, a);
        } else if self.target.browser_headers {
            b = b.header(header::ACCEPT, "*/*");
        }
        let body = match body {
            Some((bytes, ct)) => {
                b = b.header(header::CONTENT_TYPE, ct);
                bytes
            }
            None => Bytes::new(),
        };
        Ok(b.body(Full::new(body))?)
    }

    /// Sends a request on `sender` and reads the whole response.
    async fn call(
        sender: &mut Sender,
        req: Request<Full<Bytes>>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        sender.ready().await.context("HTTP connection")?;
        let resp = sender.send_request(req).await.context("HTTP request")?;
        read_whole(resp).await
    }

    /// A request on the command connection, opened when needed. The server closes an
    /// idle keep-alive connection (`server.keep_alive_idle`), as browsers expect: a
    /// closed connection is replaced, and a request it did not take (the server closed
    /// it as the request left) is sent again on a new one, as browsers do. So is a
    /// request that a reused connection lost with no response at all (the server's idle
    /// close crossed it on the wire: a reset, or a close before any response byte):
    /// browsers retry those too, and parley's commands are safe to repeat (acks move a
    /// position forward; sends carry their client id).
    async fn call_on_commands(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut req = req;
        for attempt in 0..2 {
            let reusable = match self.commands.take() {
                Some(mut c) if !c.is_closed() => c.ready().await.is_ok().then_some(c),
                _ => None,
            };
            let reused = reusable.is_some();
            let open = match reusable {
                Some(c) => c,
                None => dial(&self.target, self.index)
                    .await
                    .context("opening the command connection")?,
            };
            let sender = self.commands.insert(open);
            // A copy to send again, should a reused connection lose it (bodies are
            // `Bytes`: no copy of the data).
            let again = (reused && attempt == 0).then(|| copy_request(&req));
            match sender.try_send_request(req).await {
                Ok(resp) => return read_whole(resp).await,
                Err(mut e) => match (e.take_message(), again) {
                    (Some(unsent), _) => {
                        self.commands = None;
                        req = unsent;
                    }
                    (None, Some(copy)) if lost_to_a_close(e.error()) => {
                        self.commands = None;
                        req = copy;
                    }
                    (None, _) => return Err(anyhow!(e.into_error())).context("HTTP request"),
                },
            }
        }
        bail!("the command connection closed twice before taking a request")
    }

    /// `connect` with a token: opens the session (and, for SSE, the stream).
    pub(crate) async fn authenticate(&mut self, token: &str) -> anyhow::Result<proto::Connected> {
        self.token = token.to_string();
        match self.kind {
            TransportKind::Sse => self.open_sse().await,
            _ => self.open_poll_session().await,
        }
    }

    async fn open_sse(&mut self) -> anyhow::Result<proto::Connected> {
        let mut main = self.main.take().context("connection already used")?;
        let req = self.request(Method::POST, "/api/v1/tickets", None, None)?;
        let (status, body) = Self::call(&mut main, req).await?;
        if status != StatusCode::OK {
            bail!(
                "POST /api/v1/tickets: {status} {}",
                String::from_utf8_lossy(&body)
            );
        }
        #[derive(serde::Deserialize)]
        struct Ticket {
            ticket: String,
        }
        let ticket: Ticket = serde_json::from_slice(&body).context("ticket reply")?;
        let path = format!("/sse?ticket={}", query_escape(&ticket.ticket));
        let req = self.request(Method::GET, &path, None, Some("text/event-stream"))?;
        main.ready().await.context("HTTP connection")?;
        let resp = main.send_request(req).await.context("GET /sse")?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            bail!("GET /sse: {status} {}", String::from_utf8_lossy(&body));
        }
        self.stream = Some(resp.into_body());
        // Kept while the stream runs (commands go to a second connection).
        self.main = Some(main);
        let first = match self.recv_sse().await? {
            Incoming::Frame(b) => b,
            Incoming::Closed(_) => bail!("SSE stream ended before connected"),
        };
        match wire::decode(Encoding::Json, &first)?.kind {
            Some(Kind::Connected(c)) => {
                self.session_id = c.session_id.clone();
                Ok(c)
            }
            Some(Kind::Error(e)) => bail!("connect refused: {} ({})", e.message, e.code),
            other => bail!("unexpected first SSE event: {other:?}"),
        }
    }

    async fn open_poll_session(&mut self) -> anyhow::Result<proto::Connected> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = ClientFrame {
            id,
            cmd: Some(Cmd::Connect(proto::Connect::default())),
        };
        let body = codec::encode_client(self.encoding, &frame);
        let req = self.request(
            Method::POST,
            "/session",
            Some((body, content_type(self.encoding))),
            None,
        )?;
        let main = self.main.as_mut().context("connection busy")?;
        let (status, body) = Self::call(main, req).await?;
        if status != StatusCode::OK {
            bail!("POST /session: {status} {}", String::from_utf8_lossy(&body));
        }
        match wire::decode(self.encoding, &body)?.kind {
            Some(Kind::Connected(c)) => {
                self.session_id = c.session_id.clone();
                Ok(c)
            }
            Some(Kind::Error(e)) => bail!("connect refused: {} ({})", e.message, e.code),
            other => bail!("unexpected reply to connect: {other:?}"),
        }
    }

    /// Runs one command on the session: `Ok(None)` for `204` (acks), else the reply frame
    /// as received (in this connection's encoding).
    async fn command(&mut self, id: u64, cmd: Cmd) -> anyhow::Result<Option<Bytes>> {
        let body = codec::encode_client(self.encoding, &ClientFrame { id, cmd: Some(cmd) });
        let path = format!("/session/{}", query_escape(&self.session_id));
        let req = self.request(
            Method::POST,
            &path,
            Some((body, content_type(self.encoding))),
            None,
        )?;
        // Poll: the stream's connection when no poll is pending; else (and for SSE) the
        // command connection.
        let (status, body) = match (&mut self.main, self.kind) {
            (Some(main), TransportKind::Poll) => Self::call(main, req).await?,
            _ => self.call_on_commands(req).await?,
        };
        match status {
            StatusCode::NO_CONTENT => Ok(None),
            StatusCode::OK => Ok(Some(body)),
            s => bail!("POST {path}: {s} {}", String::from_utf8_lossy(&body)),
        }
    }

    /// Sends a command; its reply (if any) is yielded by `recv` like a frame on the
    /// stream. Long-poll acks are not sent: the next poll's cursor acknowledges.
    pub(crate) async fn send(&mut self, cmd: Cmd) -> anyhow::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        if self.kind == TransportKind::Poll && matches!(cmd, Cmd::Ack(_)) {
            return Ok(id);
        }
        if let Some(reply) = self.command(id, cmd).await? {
            self.pending.push_back(reply);
        }
        Ok(id)
    }

    /// Sends a command and returns its reply.
    pub(crate) async fn call_command(&mut self, cmd: Cmd) -> anyhow::Result<Kind> {
        let id = self.next_id;
        self.next_id += 1;
        let reply = self
            .command(id, cmd)
            .await?
            .context("no reply (204) where one was expected")?;
        wire::decode(self.encoding, &reply)?
            .kind
            .context("reply without a kind")
    }

    pub(crate) async fn recv(&mut self) -> anyhow::Result<Incoming> {
        if let Some(b) = self.pending.pop_front() {
            return Ok(Incoming::Frame(b));
        }
        match self.kind {
            TransportKind::Sse => self.recv_sse().await,
            _ => self.recv_poll().await,
        }
    }

    /// The next SSE event with data. Cancel-safe: partial events stay in `buf`.
    async fn recv_sse(&mut self) -> anyhow::Result<Incoming> {
        loop {
            if let Some(data) = next_event(&mut self.buf) {
                return Ok(Incoming::Frame(data));
            }
            let Some(stream) = self.stream.as_mut() else {
                return Ok(Incoming::Closed(None));
            };
            match stream.frame().await {
                None => {
                    self.stream = None;
                    return Ok(Incoming::Closed(None));
                }
                Some(Err(e)) => {
                    self.stream = None;
                    return Err(anyhow::Error::new(e).context("reading the SSE stream"));
                }
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// The next frame from the poll loop: polls until a non-empty reply arrives.
    async fn recv_poll(&mut self) -> anyhow::Result<Incoming> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Ok(Incoming::Frame(b));
            }
            if self.inflight.is_none() {
                let Some(mut sender) = self.main.take() else {
                    return Ok(Incoming::Closed(None));
                };
                let path = format!(
                    "/poll?session_id={}&cursor={}&wait={}",
                    query_escape(&self.session_id),
                    self.cursor,
                    self.target.poll_wait_s
                );
                let accept = match self.encoding {
                    Encoding::Proto => PROTOBUF,
                    Encoding::Json => "application/json",
                };
                let req = self.request(Method::GET, &path, None, Some(accept))?;
                // The client's round trip (`--poll-gap`) before each poll but the first.
                let gap = if self.polled {
                    self.target.poll_gap
                } else {
                    Duration::ZERO
                };
                self.polled = true;
                self.inflight = Some(Box::pin(async move {
                    if !gap.is_zero() {
                        tokio::time::sleep(gap).await;
                    }
                    let r = async {
                        sender.ready().await.context("HTTP connection")?;
                        let resp = sender.send_request(req).await.context("GET /poll")?;
                        let status = resp.status();
                        let cursor = resp
                            .headers()
                            .get("x-parley-cursor")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok());
                        let body = resp.into_body().collect().await?.to_bytes();
                        anyhow::Ok((status, cursor, body))
                    }
                    .await;
                    (sender, r)
                }));
            }
            let fut = self.inflight.as_mut().expect("set above");
            let (sender, r) = fut.await;
            self.inflight = None;
            let (status, cursor, body) = r?;
            self.main = Some(sender);
            match status {
                StatusCode::OK => {}
                StatusCode::GONE => return Ok(Incoming::Closed(Some(410))),
                s => bail!("GET /poll: {s} {}", String::from_utf8_lossy(&body)),
            }
            match self.encoding {
                Encoding::Json => split_json_array(&body, &mut self.pending)?,
                Encoding::Proto => split_delimited(body, &mut self.pending)?,
            }
            if let Some(c) = cursor {
                self.cursor = c;
            }
        }
    }

    /// Ends the session's transport: drops the stream and the connections (the server
    /// detaches the session).
    pub(crate) async fn close(self) {
        drop(self);
    }
}

/// Takes the next complete event off `buf` and returns its data, skipping events without
/// data (`: ping` comments, `retry:`).
fn next_event(buf: &mut BytesMut) -> Option<Bytes> {
    loop {
        let end = buf.windows(2).position(|w| w == b"\n\n")?;
        let event = buf.split_to(end + 2).freeze();
        let mut data: Option<Bytes> = None;
        let mut rest = event.slice(..end);
        while !rest.is_empty() {
            let nl = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            let line = rest.slice(..nl);
            rest.advance((nl + 1).min(rest.len()));
            if let Some(v) = line.strip_prefix(b"data:") {
                let start = line.len() - v.len() + usize::from(v.first() == Some(&b' '));
                let value = line.slice(start..);
                data = Some(match data {
                    None => value,
                    Some(d) => {
                        let mut joined = BytesMut::from(&d[..]);
                        joined.extend_from_slice(b"\n");
                        joined.extend_from_slice(&value);
                        joined.freeze()
                    }
                });
            }
        }
        if let Some(d) = data {
            return Some(d);
        }
    }
}

/// Splits a JSON array of objects (`[{…},{…}]`) into the objects' bytes, without parsing
/// them.
fn split_json_array(body: &Bytes, out: &mut VecDeque<Bytes>) -> anyhow::Result<()> {
    let mut depth = 0usize;
    let mut in_str = false;
    let mut escaped = false;
    let mut start = None;
    for (i, &b) in body.iter().enumerate() {
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' => {
                if depth == 0 {
                    start = Some(i);
                }
                depth += 1;
            }
            b'}' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| anyhow!("unbalanced JSON in poll reply"))?;
                if depth == 0 {
                    let s = start.take().context("unbalanced JSON in poll reply")?;
                    out.push_back(body.slice(s..=i));
                }
            }
            _ => {}
        }
    }
    if depth != 0 || in_str {
        bail!("truncated JSON poll reply");
    }
    Ok(())
}

/// Splits length-delimited protobuf frames (varint length, then the frame).
fn split_delimited(mut body: Bytes, out: &mut VecDeque<Bytes>) -> anyhow::Result<()> {
    while body.has_remaining() {
        let len = prost::encoding::decode_varint(&mut body).context("frame length")? as usize;
        if body.len() < len {
            bail!("truncated protobuf poll reply");
        }
        out.push_back(body.split_to(len));
    }
    Ok(())
}

/// The headers Chromium 156 (Linux) sends with the SDK's `fetch`es beside the
/// authorization, accept and content type (captured from a real Chromium over HTTP/2):
/// client hints, fetch metadata, referer, encodings, languages and priority; a POST adds
/// its origin, a long-poll (`cache: "no-store"`) its no-cache pair. (h2's encoder here
/// indexes them all but `authorization` and `content-length`, which Chromium indexes
/// too.)
fn browser_headers(
    mut b: hyper::http::request::Builder,
    method: &Method,
    path: &str,
    host: &str,
) -> hyper::http::request::Builder {
    const UA: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
                      Chrome/156.0.0.0 Safari/537.36";
    if path.starts_with("/poll") {
        b = b
            .header(header::PRAGMA, "no-cache")
            .header(header::CACHE_CONTROL, "no-cache");
    }
    b = b
        .header("sec-ch-ua-platform", "\"Linux\"")
        .header(header::USER_AGENT, UA)
        .header(
            "sec-ch-ua",
            "\"Not:A-Brand\";v=\"8\", \"Chromium\";v=\"156\"",
        )
        .header("sec-ch-ua-mobile", "?0");
    if method == Method::POST {
        b = b.header(header::ORIGIN, format!("https://{host}"));
    }
    b.header("sec-fetch-site", "same-origin")
        .header("sec-fetch-mode", "cors")
        .header("sec-fetch-dest", "empty")
        .header(header::REFERER, format!("https://{host}/"))
        // Chromium offers "gzip, deflate, br, zstd"; this client reads bodies as sent,
        // so it asks for them uncompressed (an entry 15 bytes shorter).
        .header(header::ACCEPT_ENCODING, "identity")
        .header(header::ACCEPT_LANGUAGE, "en-US,en;q=0.9")
        .header("priority", "u=1, i")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sse_events() {
        let mut buf = BytesMut::from(
            &b"retry: 2000\ndata: {\"connected\":{}}\n\n: ping\n\nid: 1\ndata: {\"pos\":\"1\"}\n\nid: 2\ndata: {\"po"[..],
        );
        assert_eq!(next_event(&mut buf).unwrap(), &b"{\"connected\":{}}"[..]);
        assert_eq!(next_event(&mut buf).unwrap(), &b"{\"pos\":\"1\"}"[..]);
        assert!(next_event(&mut buf).is_none());
        buf.extend_from_slice(b"s\":\"2\"}\n\n");
        assert_eq!(next_event(&mut buf).unwrap(), &b"{\"pos\":\"2\"}"[..]);
        assert!(buf.is_empty());
    }

    #[test]
    fn splits_poll_replies() {
        let mut out = VecDeque::new();
        let body = Bytes::from_static(br#"[{"pos":"1","m":{"b":"a}{\"x"}},{"pos":"2"}]"#);
        split_json_array(&body, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], &br#"{"pos":"1","m":{"b":"a}{\"x"}}"#[..]);
        assert_eq!(out[1], &br#"{"pos":"2"}"#[..]);
        out.clear();
        split_json_array(&Bytes::from_static(b"[]"), &mut out).unwrap();
        assert!(out.is_empty());

        let mut body = BytesMut::new();
        for f in [&b"abc"[..], b"", b"hello"] {
            prost::encoding::encode_varint(f.len() as u64, &mut body);
            body.extend_from_slice(f);
        }
        split_delimited(body.freeze(), &mut out).unwrap();
        assert_eq!(out, [&b"abc"[..], b"", b"hello"]);
    }

    /// Reads one request (head and `content-length` body) from `sock`; false at EOF.
    async fn read_request(sock: &mut tokio::net::TcpStream) -> bool {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            if sock.read(&mut byte).await.unwrap_or(0) == 0 {
                return false;
            }
            got.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
        let mut body = vec![0u8; len];
        sock.read_exact(&mut body).await.is_ok()
    }

    /// The server's idle close crossing an ack on the wire: the reused command
    /// connection takes the request and closes with no response. The command is sent
    /// again on a new connection, as a browser does, rather than failing the session.
    #[tokio::test]
    async fn a_command_lost_to_an_idle_close_is_sent_again() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (_main, _) = listener.accept().await.unwrap();
            // The command connection: one request answered, the next one dropped.
            let (mut first, _) = listener.accept().await.unwrap();
            assert!(read_request(&mut first).await);
            first
                .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap();
            assert!(read_request(&mut first).await);
            drop(first);
            // The new one answers.
            let (mut second, _) = listener.accept().await.unwrap();
            let mut answered = 0;
            while read_request(&mut second).await {
                second
                    .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                    .await
                    .unwrap();
                answered += 1;
            }
            answered
        });
        let target = Target::new(&url, TransportKind::Sse, Encoding::Json, "s").unwrap();
        let mut c = HttpConnection::open(&target, 0).await.unwrap();
        for _ in 0..2 {
            let req = c
                .request(
                    Method::POST,
                    "/session/s",
                    Some((Bytes::from_static(b"{}"), "application/json")),
                    None,
                )
                .unwrap();
            let (status, _) = c.call_on_commands(req).await.unwrap();
            assert_eq!(status, StatusCode::NO_CONTENT);
        }
        drop(c);
        assert_eq!(server.await.unwrap(), 1, "the lost request, sent again");
    }
}
