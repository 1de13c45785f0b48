//! `/ws`: the WebSocket transport (yawc: RFC 6455 with permessage-deflate support, and an
//! axum extractor).
//!
//! Encoding is chosen by subprotocol (`parley.v1.proto` binary, `parley.v1.json` text,
//! config default when none is offered). One task per connection reads frames into its
//! [`Outbox`] and writes what the outbox hands back: replies and error frames, pushes in
//! batches (feed many frames, one flush), pings when it says idle, and the final
//! `disconnect` + close. Every write has a deadline (`ws.write_timeout`); a client that
//! does not read is closed with 4008, and the close itself gets only [`CLOSE_TIMEOUT`]
//! (lingering included: after a close frame the socket is shut down and drained briefly,
//! so the close frame is not lost to a reset; after the reply to a client's close, only
//! when the client sent more after its close frame). Commands run beside the writer, one
//! at a time in order (the outbox holds the running one): a command that waits for the
//! store holds up neither pushes nor pings.

use std::{pin::Pin, sync::OnceLock, time::Duration};

use axum::{
    Extension,
    body::Body,
    extract::{FromRequestParts, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, future::Either};
use tokio::time::{Instant, timeout};
use tracing::Instrument;
use yawc::{
    CompressionLevel, DeflatePool, HttpWebSocket, IncomingUpgrade, Options, UpgradeFut,
    close::CloseCode,
    frame::{Frame, OpCode},
};

use super::{
    Ctx, OverTls,
    deadline::{self, WriteDeadline},
    origin_allowed,
};
use crate::compact::{saturating_ms, saturating_u32};
use crate::metrics::HotCounter;

use crate::{
    codec::{self, Encoding},
    deflate,
    metrics::{OpenConnection, TransportLabel},
    session::{CloseReason, Conn, Loss, Out, Outbox, OutboxConfig},
};

const LABEL: TransportLabel = TransportLabel { transport: "ws" };
/// How long the final `disconnect` + close frames may take to write, together with the
/// lingering close after them (see [`Writer::linger`]).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most bytes a closing connection reads (and drops) while it waits for the client to
/// close its side.
pub const LINGER_BYTES: usize = 256 * 1024;

/// Picks the encoding from the offered subprotocols: the first one parley knows.
/// `Ok(None)` when none was offered, `Err` when only unknown ones were.
fn negotiate(headers: &HeaderMap) -> Result<Option<Encoding>, ()> {
    pick_subprotocol(headers, Encoding::from_subprotocol)
}

/// The first offered WebSocket subprotocol that `known` accepts. `Ok(None)` when none
/// was offered, `Err` when only unknown ones were. (`/ws` and `/mqtt`.)
pub(super) fn pick_subprotocol<T>(
    headers: &HeaderMap,
    known: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, ()> {
    let mut offered = false;
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let Ok(value) = value.to_str() else { continue };
        for name in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            offered = true;
            if let Some(found) = known(name) {
                return Ok(Some(found));
            }
        }
    }
    if offered { Err(()) } else { Ok(None) }
}

/// The checks before any WebSocket upgrade (`/ws`, `/mqtt`): a browser from an origin
/// not allowed is 403, a server shutting down 503.
pub(super) fn refuse_upgrade(
    ctx: &Ctx,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
) -> Option<Response> {
    if !origin_allowed(&ctx.core.config.server, headers, uri) {
        return Some((StatusCode::FORBIDDEN, "origin not allowed").into_response());
    }
    if ctx.shutting_down() {
        return Some((StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response());
    }
    None
}

/// Accepts the upgrade with `options` (the caller answers an error with 400) and moves
/// the socket-level write deadline past the connection's own deadline and close.
pub(super) fn accept_upgrade(
    upgrade: IncomingUpgrade,
    options: Options,
    deadline: Option<Extension<WriteDeadline>>,
    ws: &crate::config::WsConfig,
) -> yawc::UpgradeResult {
    let pair = upgrade.upgrade(options)?;
    if let Some(Extension(d)) = deadline {
        // The socket-level backstop fires only after this task's own deadline and close.
        d.set(ws.write_timeout + CLOSE_TIMEOUT + Duration::from_secs(1));
    }
    Ok(pair)
}

/// The yawc options for parley's `/ws` (also used by the conformance echo endpoint).
pub fn options(ws: &crate::config::WsConfig) -> Options {
    // yawc enforces a hard ceiling above parley's limit (closing with 1009 itself); frames
    // between the two get parley's FRAME_TOO_LARGE error and disconnect frame first.
    let hard_limit = ws
        .max_frame_bytes
        .saturating_mul(2)
        .max(ws.max_frame_bytes + 65536);
    let options = Options::default()
        .with_max_payload_read(hard_limit)
        .with_max_read_buffer(hard_limit)
        .with_read_buffer_capacity(ws.read_buffer_bytes)
        .with_write_buffer_capacity(ws.write_buffer_bytes)
        // No read buffer while waiting for data, no write buffer once given back
        // (`Writer::write`): an idle connection holds neither (yawc patch,
        // vendor/README.md).
        .with_lazy_buffers()
        // Text messages must be UTF-8 (RFC 6455 section 8.1): others close with 1007.
        .with_utf8()
        .with_no_delay();
    if !ws.deflate {
        return options;
    }
    // permessage-deflate: the server never keeps context (so a broadcast can be compressed
    // once, see crate::deflate), deflate state is borrowed from one pool per process for
    // each message instead of living in each connection, and small messages skip it.
    let mut options = options
        .with_compression_level(CompressionLevel::new(ws.deflate_level.min(9)))
        .server_no_context_takeover()
        .with_client_max_window_bits(ws.deflate_client_max_window_bits)
        .with_compression_threshold(ws.deflate_min_bytes)
        .with_deflate_pool(deflate_pool().clone());
    if !ws.deflate_client_context_takeover {
        options = options.client_no_context_takeover();
    }
    options
}

/// The deflate state shared by every connection in this process (without context
/// takeover a connection needs it only while one message is compressed or inflated).
/// Sized for the messages handled at the same moment, about one per worker thread.
fn deflate_pool() -> &'static DeflatePool {
    static POOL: OnceLock<DeflatePool> = OnceLock::new();
    POOL.get_or_init(|| DeflatePool::new(64))
}

/// How pushes are written on one connection.
#[derive(Debug, Clone, Copy)]
enum PushCompression {
    /// No permessage-deflate (not offered, or turned off).
    None,
    /// Negotiated without server context takeover and with the full window: bodies are
    /// compressed once per push and shared ([`codec::Push::deflated_frame`]).
    /// `min_bytes` saturates at `u32::MAX` (4 B, not 8, in every connection).
    Shared { level: u32, min_bytes: u32 },
    /// Negotiated with a smaller server window: yawc compresses each frame itself.
    PerFrame,
}

impl PushCompression {
    /// From the `Sec-WebSocket-Extensions` header of the upgrade response.
    fn from_response(headers: &HeaderMap, ws: &crate::config::WsConfig) -> Self {
        let negotiated = headers
            .get(header::SEC_WEBSOCKET_EXTENSIONS)
            .and_then(|v| v.to_str().ok())
            .and_then(deflate::Negotiated::from_response);
        match negotiated {
            None => PushCompression::None,
            Some(n) if ws.deflate_compress_once && deflate::shared_body_allowed(&n) => {
                PushCompression::Shared {
                    level: ws.deflate_level,
                    min_bytes: saturating_u32(ws.deflate_min_bytes),
                }
            }
            Some(_) => PushCompression::PerFrame,
        }
    }
}

pub async fn handler(State(ctx): State<Ctx>, request: axum::extract::Request) -> Response {
    // The request's parts are read where they are: the `HeaderMap` and `Uri` extractors
    // would clone them (allocations on every upgrade). The body goes as it did when the
    // last extractor took only the parts.
    let (mut parts, body) = request.into_parts();
    drop(body);
    let deadline = parts
        .extensions
        .get::<WriteDeadline>()
        .cloned()
        .map(Extension);
    let upgrade = match IncomingUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let (headers, uri) = (&parts.headers, &parts.uri);
    if let Some(refused) = refuse_upgrade(&ctx, headers, uri) {
        return refused;
    }
    let (encoding, echo) = match negotiate(headers) {
        Ok(Some(e)) => (e, true),
        Ok(None) => (ctx.core.config.ws.default_encoding, false),
        Err(()) => {
            return (
                StatusCode::BAD_REQUEST,
                "unsupported subprotocol: offer parley.v1.proto or parley.v1.json",
            )
                .into_response();
        }
    };
    // Plain TCP under HTTP/1.1: dropping the socket ends the connection as its shutdown
    // would (see `Writer::close_replied`).
    let plain_tcp = parts.version == axum::http::Version::HTTP_11
        && parts.extensions.get::<OverTls>().is_none();
    let ws = &ctx.core.config.ws;
    let (mut response, fut) = match accept_upgrade(upgrade, options(ws), deadline, ws) {
        Ok(pair) => pair,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let compression = PushCompression::from_response(response.headers(), &ctx.core.config.ws);
    if echo {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(encoding.subprotocol()),
        );
    }
    // A debug span: an enabled span is entered and left on every poll of the
    // connection's task (a registry lookup and the filter's scope stack, measured at 3 %
    // of the server's time at 1M deliveries/s); at the default `info` level it is off.
    let span = tracing::debug_span!("ws", enc = ?encoding, user = tracing::field::Empty);
    // A disabled span is not attached at all: `Instrumented` would keep its 40 bytes in
    // every connection's task, and tokio allocates a task in steps of 128 bytes (its
    // cell is cache-line aligned), so those 40 bytes cost a whole step (1,792 -> 1,664).
    let tracker = ctx.tracker.clone();
    let task = connection(fut, ctx, encoding, compression, plain_tcp);
    if span.is_disabled() {
        tracker.spawn(task);
    } else {
        tracker.spawn(task.instrument(span));
    }
    response.map(Body::new)
}

/// The connection's task: waits for the upgrade to complete, then drives the socket.
/// Not an `async` block: that would hold what it captured (the upgrade future, `ctx`)
/// beside the running connection for the task's whole life; `then` holds one or the
/// other.
fn connection(
    fut: UpgradeFut,
    ctx: Ctx,
    encoding: Encoding,
    compression: PushCompression,
    plain_tcp: bool,
) -> impl Future<Output = ()> + Send {
    fut.then(move |upgraded| match upgraded {
        Ok(socket) => {
            let mut connection = Connection::new(socket, ctx, encoding, compression, plain_tcp);
            // Used in place: an `async fn` taking the connection by value would hold it
            // twice (its argument, and the local the argument is moved into).
            Either::Left(async move { connection.run().await })
        }
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            Either::Right(std::future::ready(()))
        }
    })
}

/// Why writing stopped.
enum WriteError {
    /// The socket failed: the peer is gone.
    Broken,
    /// The write made no progress within `ws.write_timeout`.
    Stuck,
}

/// Frames and writes for one connection, counting frames.
struct Writer {
    socket: HttpWebSocket,
    encoding: Encoding,
    compression: PushCompression,
    /// This transport's counter, looked up once (not a labelled-family lookup per write).
    frames_out: HotCounter,
    /// `ws.write_timeout` in milliseconds, saturating (4 B, not a `Duration`'s 16, in
    /// every connection).
    write_timeout_ms: u32,
    /// No pushes were written since the last heartbeat ping (or since the start).
    quiet: bool,
    /// The socket is plain TCP under HTTP/1.1 (no TLS, no HTTP/2 stream): closing it
    /// needs no shutdown first ([`Writer::close_replied`]).
    plain_tcp: bool,
}

impl Writer {
    fn data_frame(&self, bytes: Bytes) -> Frame {
        match self.encoding {
            Encoding::Proto => Frame::binary(bytes),
            Encoding::Json => Frame::text(bytes),
        }
    }

    /// Starts sending one session's frame of a shared push (after `poll_ready`):
    /// compressed once for all its recipients where the connection allows, else plain.
    /// The session's position (on the stack) and the body every recipient shares are
    /// copied straight into yawc's write buffer: nothing is allocated per recipient.
    /// When yawc must compress the frame itself (a smaller negotiated window), it goes
    /// as a `Frame`.
    fn start_push(&mut self, push: &codec::Push, pos: u64) -> Result<(), yawc::WebSocketError> {
        let opcode = match self.encoding {
            Encoding::Proto => OpCode::Binary,
            Encoding::Json => OpCode::Text,
        };
        let sent = match self.compression {
            PushCompression::Shared { level, min_bytes }
                if push.body(self.encoding).len() >= min_bytes as usize =>
            {
                let (prefix, shared) = push.deflated_frame_parts(self.encoding, pos, level);
                self.socket
                    .start_send_parts(opcode, true, prefix.as_slice(), shared)
            }
            _ => {
                let (prefix, shared) = push.frame_parts(self.encoding, pos);
                self.socket
                    .start_send_parts(opcode, false, prefix.as_slice(), shared)
            }
        };
        if sent {
            return Ok(());
        }
        let frame = self.data_frame(push.frame(self.encoding, pos));
        self.socket.start_send_unpin(frame)
    }

    /// Writes one outbox item (not `Close`) under the write deadline.
    async fn write(&mut self, out: Out) -> Result<(), WriteError> {
        let mut frames = 0u64;
        // After a reply or a ping the connection most likely waits: give the write
        // buffer back (an idle connection holds none). After pushes only when they are
        // the first since the last heartbeat ping (every `ws.heartbeat_interval`): a
        // member of a quiet room holds no buffer between its rare pushes, while a
        // connection in a busy room frees and allocates it once per heartbeat (and after
        // each command it sends: `Connection::run`), not on every wake-up.
        let then_idle = match out {
            Out::Pushes(_) => std::mem::take(&mut self.quiet),
            Out::Idle => {
                self.quiet = true;
                true
            }
            _ => true,
        };
        let write_timeout = Duration::from_millis(self.write_timeout_ms.into());
        let write = async {
            match out {
                Out::Frame(frame) => {
                    frames = 1;
                    let f = self.data_frame(codec::encode_server(self.encoding, &frame));
                    self.socket.send(f).await
                }
                Out::Pushes(pushes) => {
                    frames = pushes.len() as u64;
                    for (pos, push) in pushes {
                        std::future::poll_fn(|cx| self.socket.poll_ready_unpin(cx)).await?;
                        self.start_push(&push, pos)?;
                    }
                    self.socket.flush().await
                }
                Out::Idle => self.socket.send(Frame::ping(Bytes::new())).await,
                Out::Close(_) => Ok(()),
            }
        };
        match deadline::lazy_timeout(write_timeout, write).await {
            Some(Ok(())) => {
                self.frames_out.inc_by(frames);
                if then_idle {
                    self.socket.free_write_buffer();
                }
                Ok(())
            }
            Some(Err(_)) => Err(WriteError::Broken),
            None => Err(WriteError::Stuck),
        }
    }

    /// Announces the close with a `disconnect` frame, then closes with the same code and
    /// lingers; all bounded by [`CLOSE_TIMEOUT`] (a client that does not read will not
    /// read these).
    async fn close(&mut self, why: CloseReason) {
        tracing::debug!(code = why.code(), reason = why.reason(), "closing");
        let frame = self.data_frame(codec::encode_server(self.encoding, &why.frame()));
        let _ = timeout(CLOSE_TIMEOUT, async {
            self.socket.send(frame).await?;
            self.socket
                .send(Frame::close(CloseCode::from(why.code()), why.reason()))
                .await?;
            self.socket.linger(LINGER_BYTES).await
        })
        .await;
    }

    /// Lets out what yawc queued itself (a close reply, or the close frame of a protocol
    /// error: 1002, 1007, 1009), then lingers: the write side is shut down and what the
    /// client still sends is read and dropped until it closes too, so the close frame is
    /// not lost to a reset (the kernel resets a socket closed with unread bytes). At most
    /// [`CLOSE_TIMEOUT`] and [`LINGER_BYTES`].
    async fn linger(&mut self) {
        let _ = timeout(CLOSE_TIMEOUT, self.socket.linger(LINGER_BYTES)).await;
    }

    /// The end of a close the client started: lets out the close reply yawc queued;
    /// then, when nothing past the client's close frame was read, the connection is
    /// closed at once (RFC 6455 §7.1.1: after both close frames the server closes
    /// first; §5.5.1: the client sends nothing after its close frame, so nothing unread
    /// can turn the close into a reset). The write side is shut down first except on
    /// plain TCP, where closing the socket sends the same FIN (over TLS the shutdown
    /// sends `close_notify`, on an HTTP/2 stream END_STREAM). Bytes read past the close
    /// frame: lingers as [`Writer::linger`]. At most [`CLOSE_TIMEOUT`].
    async fn close_replied(&mut self) {
        let shut_down = !self.plain_tcp;
        let replied = self.socket.close_replied(LINGER_BYTES, shut_down);
        let _ = timeout(CLOSE_TIMEOUT, replied).await;
    }

    /// Writes one item; on a stuck write, closes as a slow consumer. `false`: stop.
    /// While the write is blocked the session may be lost (its queue overflowed, or
    /// another connection resumed it): then the write in flight gets [`CLOSE_TIMEOUT`]
    /// to finish — after which the outbox says why it closes — or else the connection
    /// is dropped at once (an interrupted frame leaves nothing that could carry a close
    /// frame, and a client that does not read would not see one).
    async fn deliver(&mut self, out: Out, loss: Loss<'_>) -> bool {
        if let Out::Close(why) = out {
            self.close(why).await;
            return false;
        }
        let result = {
            let write = self.write(out);
            tokio::pin!(write);
            tokio::select! {
                // Biased: `lost` is only looked at when the write does not finish at once.
                biased;
                r = &mut write => r,
                _ = loss.lost() => match timeout(CLOSE_TIMEOUT, &mut write).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::debug!("session lost while a write was blocked: dropping");
                        return false;
                    }
                },
            }
        };
        match result {
            Ok(()) => true,
            Err(WriteError::Broken) => false,
            Err(WriteError::Stuck) => {
                self.close(CloseReason::SlowConsumer).await;
                false
            }
        }
    }
}

/// Writes `first` (if any) and then everything else the outbox has ready now, before
/// the connection waits again: several batches go out per wake-up. `false`: stop.
async fn deliver_ready(w: &mut Writer, outbox: &mut Outbox, first: Option<Out>) -> bool {
    let mut next = first.or_else(|| outbox.ready());
    while let Some(out) = next {
        if !w.deliver(out, outbox.loss()).await {
            return false;
        }
        next = outbox.ready();
    }
    true
}

/// `fut` on the heap, for an `async fn` to await without holding room for it: with
/// `Box::pin(fut).await` written in the `async fn` itself, the compiler still reserves
/// space for the unboxed `fut` in that function's future (a temporary of the statement
/// that awaits), so every idle connection would pay for the largest of them.
fn boxed<F: Future>(fut: F) -> Pin<Box<F>> {
    Box::pin(fut)
}

/// What handling one frame read still has to await (on the heap).
type Handling<'a> = Pin<Box<dyn Future<Output = bool> + Send + 'a>>;

/// One connection: what its task holds while it runs. Every byte here is paid by every
/// idle connection.
struct Connection {
    w: Writer,
    outbox: Outbox,
    frames_in: HotCounter,
    /// `ws.max_frame_bytes`, saturating at `u32::MAX` (no frame is that large).
    max_frame_bytes: u32,
    /// Whether the connection's span has its user yet.
    named: bool,
    _counted: OpenConnection,
}

impl Connection {
    fn new(
        socket: HttpWebSocket,
        ctx: Ctx,
        encoding: Encoding,
        compression: PushCompression,
        plain_tcp: bool,
    ) -> Self {
        // Only what the loop needs is kept (not `ctx`).
        let series = ctx.core.metrics.transport(&LABEL);
        let config = &ctx.core.config.ws;
        let outbox = Outbox::new(
            Conn::new(ctx.core.clone(), config.heartbeat_interval),
            OutboxConfig {
                idle: Some(config.heartbeat_interval),
                silence_limit: Some(config.heartbeat_interval + config.pong_timeout),
                connect_deadline: Some(Instant::now() + ctx.core.config.auth.connect_timeout),
                coalesce: config.coalesce,
                max_in_flight: config.max_commands_in_flight,
            },
            ctx.connection_shutdown(),
        );
        Connection {
            w: Writer {
                socket,
                encoding,
                compression,
                frames_out: series.frames_out.clone(),
                write_timeout_ms: saturating_ms(config.write_timeout),
                quiet: true,
                plain_tcp,
            },
            outbox,
            frames_in: series.frames_in.clone(),
            max_frame_bytes: saturating_u32(config.max_frame_bytes),
            named: false,
            _counted: OpenConnection::open(&ctx.core.metrics, &LABEL),
        }
    }

    /// Takes one frame read (or the read's error) and returns what must be awaited to
    /// handle it (`None`: nothing; the handling's `false`: stop), so that the wait is
    /// over before it runs.
    fn read(&mut self, frame: yawc::Result<Frame>) -> Option<Handling<'_>> {
        let frame = match frame {
            Ok(f) => f,
            Err(_) => {
                // yawc queued the close frame of a protocol error (1002, 1007, 1009 past
                // the hard limit); let it out.
                return Some(Box::pin(async {
                    self.w.linger().await;
                    false
                }));
            }
        };
        match frame.opcode() {
            OpCode::Text | OpCode::Binary => {}
            OpCode::Close => {
                // A deliberate goodbye: no resume will follow. yawc queued the close
                // reply; let it out and close.
                self.outbox.client_closed();
                return Some(Box::pin(async {
                    self.w.close_replied().await;
                    false
                }));
            }
            _ => {
                self.outbox.seen();
                return None;
            }
        }
        self.frames_in.inc();
        if frame.payload().len() > self.max_frame_bytes as usize {
            self.outbox.too_large(self.max_frame_bytes as usize);
        } else {
            // The command runs beside this loop (pushes and pings go on while it waits
            // for the store); its reply comes out of the outbox in order. Its state
            // lives on the heap while it runs.
            self.outbox
                .submit(codec::decode_client(self.w.encoding, frame.payload()));
        }
        drop(frame);
        if !self.named
            && let Some(session) = self.outbox.session()
        {
            tracing::Span::current().record("user", session.user_id());
            self.named = true;
        }
        // Write what is ready now (the reply, pushes it released) before reading on.
        // After any command the write buffer goes back (a no-op unless it is allocated
        // and written out). Most often the command is an ack: the client has read its
        // pushes, so what they left is freed now, not at the next heartbeat. Clients ack
        // at most about once a second (web/src/parley.ts), so a member of a busy room
        // frees and allocates it about once a second.
        Some(Box::pin(async {
            let go_on = deliver_ready(&mut self.w, &mut self.outbox, None).await;
            self.w.socket.free_write_buffer();
            go_on
        }))
    }

    /// Drives the connection until it closes.
    async fn run(&mut self) {
        loop {
            // The wait ends before what it brought is handled: an idle connection's
            // future holds the wait (the read and the outbox's `Next`), a busy one the
            // handling (a boxed future), never both side by side.
            let step = tokio::select! {
                // Reads first, as long as the outbox takes them (it stops taking them
                // while too many replies are pending: backpressure on a pipelining
                // client).
                biased;
                frame = self.w.socket.next_frame(), if self.outbox.accepting() => {
                    self.read(frame)
                }
                out = self.outbox.next() => {
                    let delivery: Handling<'_> =
                        Box::pin(deliver_ready(&mut self.w, &mut self.outbox, Some(out)));
                    Some(delivery)
                }
            };
            // One boxed future or none (16 B held across the await, not an `Either` of
            // 24).
            let go_on = match step {
                Some(handling) => handling.await,
                None => true,
            };
            if !go_on {
                break;
            }
        }
        // A command still running is let finish (never cut off halfway; a `connect`
        // binds its session). The connection drops after this: the outbox detaches the
        // session (or it was ended), on every path.
        boxed(self.outbox.settle()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<F, A, B, C, D, E, Fut>(_: &F) -> usize
    where
        F: FnOnce(A, B, C, D, E) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every idle connection pays for its task's future (it was ~3.9 KB, most of it the
    /// socket and the outbox held twice, and the deflate state inline in yawc's socket).
    /// A debug build lays it out as a release build does, near enough. 1,280 B with the
    /// outbox's wait as an `async fn` (now `Next`, 80 B), 1,056 B once the `select!`
    /// ended before what it brought is handled, 1,024 B until yawc's `WebSocket` (held
    /// here inline) lost its fragment and close state and boxed its queue of owed frames
    /// (512 -> 344 B), 856 B until round eighteen: with the task tracker's 8 B and
    /// tokio's 104 B around it, a 1,024 B task cell instead of 1,152 B (cells come in
    /// steps of 128 B). 784 B now (the metrics counters thin pointers, the timeout, frame
    /// limit and deflate threshold in 4 B each, one boxed future held across the await):
    /// an 896 B cell. At 785 B it would take the 1,024 B step again.
    #[test]
    fn the_connection_task_stays_small() {
        let task = future_size(&connection);
        eprintln!(
            "task {task} B: Connection {} B",
            std::mem::size_of::<Connection>()
        );
        assert!(task <= 784, "the connection task's future is {task} bytes");
    }
}
