//! `/wt`: WebTransport over HTTP/3 (h3-webtransport on the server's QUIC connection).
//!
//! A session is an extended CONNECT to `/wt` (`?enc=proto|json`, default `proto`;
//! `&datagrams=1` to opt into datagrams). The client then opens one bidirectional stream
//! and speaks parley frames on it, in both directions, each prefixed by its length as a
//! protobuf varint (the long-poll body's framing), JSON frames included. The frames,
//! the session, positions, acks, resume, limits and metrics (`transport="wt"`) are those
//! of `/ws`: the stream's frames go through the connection's [`Outbox`] like a
//! WebSocket's, and this module only frames and writes what it hands back.
//!
//! Datagrams: with `datagrams=1` (and `http3.datagrams` on), typing and presence pushes
//! go as HTTP datagrams (RFC 9297) — one frame each, without a position — instead of on
//! the stream; one that does not fit in a datagram goes on the stream. Everything with
//! a meaning for resume (messages, receipts, membership, …) stays on the stream, so the
//! stream's positions increase but skip the ones sent as datagrams. Datagrams from the
//! client are ignored.
//!
//! Keep-alive and dead peers are QUIC's: the server sends QUIC PINGs and a connection
//! that receives nothing for `http3.idle_timeout` is closed (the session waits for a
//! resume, as after any drop). No `connect` within `auth.connect_timeout` of the CONNECT
//! (no stream opened, or no frame on it) closes with 4002. The server closes a session
//! by writing the `disconnect` frame, finishing the stream and then closing the QUIC
//! connection (after the client closed it, or [`CLOSE_TIMEOUT`]).
//!
//! Other requests on the same connection (after the CONNECT) are served as plain HTTP/3
//! requests; further bidirectional streams of the session are refused.

use std::{sync::Arc, time::Duration};

use axum::http::{Request, StatusCode};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{FutureExt, future::Either};
use h3::quic::{BidiStream as _, RecvStream as _};
use h3_webtransport::server::{AcceptedBi, WebTransportSession};
use tokio::{
    io::AsyncWriteExt,
    sync::oneshot,
    time::{Instant, timeout},
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    Ctx, PeerIp, deadline,
    http3::{self, H3Connection, H3Stream},
    origin_allowed,
};
use crate::{
    codec::{self, Encoding},
    metrics::{HotCounter, OpenConnection, TransportLabel},
    proto::server_frame::Kind,
    session::{CloseReason, Conn, Loss, Out, Outbox, OutboxConfig},
};

const LABEL: TransportLabel = TransportLabel { transport: "wt" };
/// How long the final `disconnect` frame may take, together with waiting for the client
/// to close the connection after it.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

type Session = WebTransportSession<h3_quinn::Connection, Bytes>;
type WtStream = h3_webtransport::stream::BidiStream<h3_quinn::BidiStream<Bytes>, Bytes>;
type WtSend = h3_webtransport::stream::SendStream<h3_quinn::SendStream<Bytes>, Bytes>;
type WtRecv = h3_webtransport::stream::RecvStream<h3_quinn::RecvStream, Bytes>;

/// What the CONNECT's query asks for.
struct Params {
    encoding: Encoding,
    datagrams: bool,
}

impl Params {
    fn parse(query: Option<&str>) -> Result<Self, &'static str> {
        let mut p = Params {
            encoding: Encoding::Proto,
            datagrams: false,
        };
        for pair in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "enc" => {
                    p.encoding = match value {
                        "proto" => Encoding::Proto,
                        "json" => Encoding::Json,
                        _ => return Err("enc must be proto or json"),
                    }
                }
                "datagrams" => p.datagrams = matches!(value, "1" | "true"),
                _ => {}
            }
        }
        Ok(p)
    }
}

/// Serves a WebTransport CONNECT to `/wt`: the session takes the HTTP/3 connection over
/// and this returns when it ends (the QUIC connection closed).
///
/// Two stages, as MQTT's: opening the session (boxed, with the request, the stream and
/// the HTTP/3 connection it takes by value) is gone once the session runs; an `async fn`
/// would keep its arguments' room (kilobytes) in every idle session's task.
pub fn serve(
    request: Request<()>,
    stream: H3Stream,
    conn: H3Connection,
    quic: quinn::Connection,
    ctx: Ctx,
    service: http3::Service,
) -> impl Future<Output = ()> + Send {
    Box::pin(open(request, stream, conn, quic, ctx, service)).then(|opened| match opened {
        Some(mut r) => Either::Left(async move {
            r.connection.run(&r.gone).instrument(r.span).await;
            r.quic.close(http3::code(h3::error::Code::H3_NO_ERROR), b"");
        }),
        None => Either::Right(std::future::ready(())),
    })
}

/// A session past its opening: what its task holds while it runs.
struct Running {
    connection: Connection,
    gone: CancellationToken,
    span: tracing::Span,
    quic: quinn::Connection,
}

/// Opens the session: `None` when it was refused or never opened its stream (answered
/// and closed here).
async fn open(
    request: Request<()>,
    stream: H3Stream,
    conn: H3Connection,
    quic: quinn::Connection,
    ctx: Ctx,
    service: http3::Service,
) -> Option<Running> {
    let refused = if !origin_allowed(&ctx.core.config.server, request.headers(), request.uri()) {
        Some(StatusCode::FORBIDDEN)
    } else if ctx.shutting_down() {
        Some(StatusCode::SERVICE_UNAVAILABLE)
    } else {
        None
    };
    let params = Params::parse(request.uri().query());
    let (refused, params) = match (refused, params) {
        (None, Ok(p)) => (None, Some(p)),
        (Some(status), _) => (Some(status), None),
        (None, Err(why)) => {
            tracing::debug!(why, "WebTransport CONNECT refused");
            (Some(StatusCode::BAD_REQUEST), None)
        }
    };
    let Some(params) = params else {
        http3::refuse(stream, refused.unwrap_or(StatusCode::BAD_REQUEST)).await;
        linger_close(&quic).await;
        return None;
    };
    let quarter_id = stream.send_id().into_inner() / 4;
    // The client's SETTINGS (which must enable WebTransport and datagrams) travel on
    // another stream than its CONNECT and may come later (a lost packet): wait for them,
    // bounded, rather than refuse a session that is only early.
    let mut conn = conn;
    let settings = timeout(
        ctx.core.config.server.preface_timeout,
        peer_settings(&mut conn),
    );
    if !matches!(settings.await, Ok(Ok(()))) {
        tracing::debug!("WebTransport CONNECT without the client's SETTINGS in time");
    }
    let session = match WebTransportSession::accept(request, stream, conn).await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::debug!(error = %e, "WebTransport session not established");
            return None;
        }
    };
    let peer = PeerIp(quic.remote_address().ip());
    let (first_tx, first_rx) = oneshot::channel();
    let gone = CancellationToken::new();
    ctx.tracker.spawn(drive(
        session,
        first_tx,
        gone.clone(),
        service,
        peer,
        ctx.clone(),
    ));
    let config = &ctx.core.config;
    let datagrams = (params.datagrams && config.http3.datagrams).then(|| Datagrams {
        quic: quic.clone(),
        header: quarter_stream_id(quarter_id),
    });
    let connect_deadline = Instant::now() + config.auth.connect_timeout;
    let stream = tokio::select! {
        s = first_rx => s.ok(),
        _ = tokio::time::sleep_until(connect_deadline) => None,
        _ = gone.cancelled() => None,
        _ = ctx.shutdown_shard().cancelled() => None,
    };
    let Some(stream) = stream else {
        tracing::debug!("WebTransport session opened no stream in time");
        quic.close(CloseReason::AuthTimeout.code().into(), b"connect timeout");
        return None;
    };
    let span = tracing::debug_span!("wt", enc = ?params.encoding, user = tracing::field::Empty);
    let connection = Connection::new(
        stream,
        ctx,
        params.encoding,
        datagrams,
        quic.clone(),
        connect_deadline,
    );
    Some(Running {
        connection,
        gone,
        span,
        quic,
    })
}

/// Reads the client's control stream until its SETTINGS enable WebTransport and HTTP
/// datagrams.
pub async fn peer_settings(conn: &mut H3Connection) -> Result<(), h3::error::ConnectionError> {
    use h3::ConnectionState as _;
    std::future::poll_fn(|cx| {
        loop {
            let settings = conn.inner.shared.settings();
            if settings.enable_webtransport() && settings.enable_datagram() {
                return std::task::Poll::Ready(Ok(()));
            }
            match conn.inner.poll_control(cx) {
                std::task::Poll::Ready(Ok(_frame)) => continue,
                std::task::Poll::Ready(Err(e)) => return std::task::Poll::Ready(Err(e)),
                std::task::Poll::Pending => return std::task::Poll::Pending,
            }
        }
    })
    .await
}

/// Closes the connection once the client has (it read what was sent), or after
/// [`CLOSE_TIMEOUT`].
async fn linger_close(quic: &quinn::Connection) {
    let _ = timeout(CLOSE_TIMEOUT, quic.closed()).await;
    quic.close(http3::code(h3::error::Code::H3_NO_ERROR), b"");
}

/// Drives the session's connection: hands the first bidirectional stream over, refuses
/// later ones, and serves plain HTTP/3 requests that come on the same connection.
/// Cancels `gone` when the connection has ended.
async fn drive(
    session: Arc<Session>,
    first: oneshot::Sender<WtStream>,
    gone: CancellationToken,
    service: http3::Service,
    peer: PeerIp,
    ctx: Ctx,
) {
    let mut first = Some(first);
    let write_timeout = ctx.core.config.server.write_timeout;
    loop {
        match session.accept_bi().await {
            Ok(Some(AcceptedBi::BidiStream(_, stream))) => match first.take() {
                Some(tx) => {
                    let _ = tx.send(stream);
                }
                // One stream per session: dropping a later one stops and resets it.
                None => tracing::debug!("WebTransport: a second stream refused"),
            },
            Ok(Some(AcceptedBi::Request(request, stream))) => {
                ctx.tracker.spawn(http3::serve_request(
                    service.clone(),
                    request,
                    stream,
                    peer,
                    write_timeout,
                ));
            }
            Ok(None) => break,
            Err(e) => {
                if !e.is_h3_no_error() {
                    tracing::debug!(error = %e, "WebTransport connection ended");
                }
                break;
            }
        }
    }
    gone.cancel();
}

/// The HTTP datagram header of a session: its quarter stream id (RFC 9297) as a QUIC
/// varint.
fn quarter_stream_id(id: u64) -> Bytes {
    let mut out = BytesMut::with_capacity(8);
    match id {
        0..=0x3f => out.put_u8(id as u8),
        0x40..=0x3fff => out.put_u16(0x4000 | id as u16),
        0x4000..=0x3fff_ffff => out.put_u32(0x8000_0000 | id as u32),
        _ => out.put_u64(0xc000_0000_0000_0000 | id),
    }
    out.freeze()
}

/// Sending pushes as datagrams (the client opted in).
struct Datagrams {
    quic: quinn::Connection,
    header: Bytes,
}

impl Datagrams {
    /// Sends `push` as a datagram if it is one that may go so and fits. `false`: it
    /// goes on the stream.
    fn try_send(&self, push: &codec::Push, encoding: Encoding) -> bool {
        if !matches!(push.kind(), Kind::Typing(_) | Kind::Presence(_)) {
            return false;
        }
        let body = push.body(encoding);
        let len = self.header.len() + body.len();
        if self.quic.max_datagram_size().is_none_or(|max| len > max) {
            return false;
        }
        let mut datagram = BytesMut::with_capacity(len);
        datagram.put_slice(&self.header);
        datagram.put_slice(body);
        self.quic.send_datagram(datagram.freeze()).is_ok()
    }
}

/// Why a write stopped.
enum WriteError {
    Broken,
    Stuck,
}

/// Frames and writes for one session.
struct Writer {
    send: WtSend,
    encoding: Encoding,
    datagrams: Option<Datagrams>,
    /// One batch's bytes; given back after each write (an idle session holds none).
    buf: BytesMut,
    frames_out: HotCounter,
    write_timeout: Duration,
}

/// Appends `len` as a protobuf varint.
fn put_len(out: &mut BytesMut, len: usize) {
    prost::encoding::encode_varint(len as u64, out);
}

impl Writer {
    fn put_frame(&mut self, frame: &[u8]) {
        put_len(&mut self.buf, frame.len());
        self.buf.put_slice(frame);
    }

    /// Frames one outbox item (not `Close`) into the buffer; the frames it holds.
    fn frame(&mut self, out: Out) -> u64 {
        match out {
            Out::Frame(frame) => {
                let bytes = codec::encode_server(self.encoding, &frame);
                self.put_frame(&bytes);
                1
            }
            Out::Pushes(pushes) => {
                let n = pushes.len() as u64;
                for (pos, push) in pushes {
                    if let Some(d) = &self.datagrams
                        && d.try_send(&push, self.encoding)
                    {
                        continue;
                    }
                    let (prefix, shared) = push.frame_parts(self.encoding, pos);
                    put_len(&mut self.buf, prefix.len() + shared.len());
                    self.buf.put_slice(prefix.as_slice());
                    self.buf.put_slice(shared);
                }
                n
            }
            Out::Idle | Out::Close(_) => 0,
        }
    }

    /// Writes what the buffer holds under the write deadline.
    async fn flush(&mut self) -> Result<(), WriteError> {
        let write = async {
            self.send.write_all(&self.buf).await?;
            self.send.flush().await
        };
        let result = deadline::lazy_timeout(self.write_timeout, write).await;
        self.buf = BytesMut::new();
        match result {
            Some(Ok(())) => Ok(()),
            Some(Err(_)) => Err(WriteError::Broken),
            None => Err(WriteError::Stuck),
        }
    }

    /// The `disconnect` frame, then the end of the stream; bounded by [`CLOSE_TIMEOUT`].
    async fn close(&mut self, why: CloseReason) {
        tracing::debug!(code = why.code(), reason = why.reason(), "closing");
        self.buf.clear();
        let bytes = codec::encode_server(self.encoding, &why.frame());
        self.put_frame(&bytes);
        let buf = std::mem::take(&mut self.buf);
        let _ = timeout(CLOSE_TIMEOUT, async {
            self.send.write_all(&buf).await?;
            self.send.shutdown().await
        })
        .await;
    }

    /// Frames one outbox item into the buffer, before anything is awaited: an [`Out`]
    /// (176 B) kept in a future's state would be kept in every idle session's.
    fn step(&mut self, out: Out) -> Step {
        match out {
            Out::Close(why) => Step::Close(why),
            out => Step::Write(self.frame(out)),
        }
    }

    /// Writes what [`Self::step`] framed; on a stuck write, closes as a slow consumer.
    /// `false`: stop. While a write is blocked the session may be lost (its queue
    /// overflowed, or another connection resumed it): the write then gets
    /// [`CLOSE_TIMEOUT`] more, as on `/ws`.
    async fn deliver(&mut self, step: Step, loss: Loss<'_>) -> bool {
        let frames = match step {
            Step::Close(why) => {
                self.close(why).await;
                return false;
            }
            Step::Write(frames) => frames,
        };
        if self.buf.is_empty() {
            self.frames_out.inc_by(frames);
            return true;
        }
        let result = {
            let write = self.flush();
            tokio::pin!(write);
            tokio::select! {
                biased;
                r = &mut write => r,
                _ = loss.lost() => match timeout(CLOSE_TIMEOUT, &mut write).await {
                    Ok(r) => r,
                    Err(_) => return false,
                },
            }
        };
        match result {
            Ok(()) => {
                self.frames_out.inc_by(frames);
                true
            }
            Err(WriteError::Broken) => false,
            Err(WriteError::Stuck) => {
                self.close(CloseReason::SlowConsumer).await;
                false
            }
        }
    }
}

/// One outbox item, framed: what is left to do for it.
enum Step {
    /// The `disconnect` frame and the end of the stream.
    Close(CloseReason),
    /// Write the buffer, which holds this many frames (none for an empty item).
    Write(u64),
}

/// Reads length-prefixed frames from the stream.
struct Reader {
    recv: WtRecv,
    /// Bytes read and not yet a whole frame; given back when empty.
    buf: BytesMut,
}

/// What the reader got.
enum Read {
    Frame(Bytes),
    /// A frame longer than the limit announced itself (its bytes are not read).
    TooLarge,
    /// The client finished the stream.
    End,
    /// The stream failed (reset, or the connection closed).
    Broken,
}

impl Reader {
    /// The next whole frame. Cancel-safe: what was read stays in the buffer.
    async fn next(&mut self, max: usize) -> Read {
        loop {
            let mut view = &self.buf[..];
            if !view.is_empty() {
                match prost::encoding::decode_varint(&mut view) {
                    Ok(len) if len > max as u64 => return Read::TooLarge,
                    Ok(len) => {
                        let head = self.buf.len() - view.len();
                        if view.len() as u64 >= len {
                            self.buf.advance(head);
                            let frame = self.buf.split_to(len as usize).freeze();
                            if self.buf.is_empty() {
                                self.buf = BytesMut::new();
                            }
                            return Read::Frame(frame);
                        }
                        self.buf
                            .reserve((head + len as usize).saturating_sub(self.buf.len()));
                    }
                    // Not a whole varint yet (or an invalid one: over 10 bytes).
                    Err(_) if self.buf.len() >= 10 => return Read::TooLarge,
                    Err(_) => {}
                }
            }
            // Wait for QUIC's next chunk without a buffer of our own: an idle session
            // holds none (reserving a read buffer before waiting kept 16 KiB per idle
            // session). The chunk is copied in once it has arrived.
            match std::future::poll_fn(|cx| self.recv.poll_data(cx)).await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) => return Read::End,
                Err(_) => return Read::Broken,
            }
        }
    }
}

/// Writes `first` (framed) and everything else the outbox has ready now, each item
/// framed before its write is awaited. `false`: stop.
async fn deliver_ready(w: &mut Writer, outbox: &mut Outbox, first: Option<Step>) -> bool {
    let mut next = first.or_else(|| outbox.ready().map(|out| w.step(out)));
    while let Some(step) = next {
        if !w.deliver(step, outbox.loss()).await {
            return false;
        }
        next = outbox.ready().map(|out| w.step(out));
    }
    true
}

/// One WebTransport session's connection.
struct Connection {
    w: Writer,
    r: Reader,
    outbox: Outbox,
    quic: quinn::Connection,
    frames_in: HotCounter,
    max_frame_bytes: usize,
    named: bool,
    _counted: OpenConnection,
}

impl Connection {
    fn new(
        stream: WtStream,
        ctx: Ctx,
        encoding: Encoding,
        datagrams: Option<Datagrams>,
        quic: quinn::Connection,
        connect_deadline: Instant,
    ) -> Self {
        let series = ctx.core.metrics.transport(&LABEL);
        let config = &ctx.core.config.ws;
        let (send, recv) = stream.split();
        let outbox = Outbox::new(
            Conn::new(ctx.core.clone(), config.heartbeat_interval),
            OutboxConfig {
                // QUIC's PINGs and idle timeout are the heartbeat (http3.idle_timeout).
                idle: None,
                silence_limit: None,
                connect_deadline: Some(connect_deadline),
                coalesce: config.coalesce,
                max_in_flight: config.max_commands_in_flight,
            },
            ctx.connection_shutdown(),
        );
        Connection {
            w: Writer {
                send,
                encoding,
                datagrams,
                buf: BytesMut::new(),
                frames_out: series.frames_out.clone(),
                write_timeout: config.write_timeout,
            },
            r: Reader {
                recv,
                buf: BytesMut::new(),
            },
            outbox,
            quic,
            frames_in: series.frames_in.clone(),
            max_frame_bytes: config.max_frame_bytes,
            named: false,
            _counted: OpenConnection::open(&ctx.core.metrics, &LABEL),
        }
    }

    async fn run(&mut self, gone: &CancellationToken) {
        let encoding = self.w.encoding;
        let mut reading = true;
        loop {
            tokio::select! {
                biased;
                read = self.r.next(self.max_frame_bytes), if reading && self.outbox.accepting() => {
                    match read {
                        Read::Frame(frame) => {
                            self.frames_in.inc();
                            self.outbox.submit(codec::decode_client(encoding, &frame));
                        }
                        Read::TooLarge => {
                            self.frames_in.inc();
                            reading = false;
                            self.outbox.too_large(self.max_frame_bytes);
                        }
                        Read::End => {
                            // The client finished its side on purpose: a goodbye.
                            self.outbox.client_closed();
                            let _ = timeout(CLOSE_TIMEOUT, self.w.send.shutdown()).await;
                            linger_close(&self.quic).await;
                            break;
                        }
                        Read::Broken => break,
                    }
                    if !self.named && let Some(session) = self.outbox.session() {
                        tracing::Span::current().record("user", session.user_id());
                        self.named = true;
                    }
                    if !deliver_ready(&mut self.w, &mut self.outbox, None).await {
                        linger_close(&self.quic).await;
                        break;
                    }
                }
                // Framed in the branch: the select's output holds a `Step`, not an `Out`.
                step = self.outbox.next().map(|out| self.w.step(out)) => {
                    if !deliver_ready(&mut self.w, &mut self.outbox, Some(step)).await {
                        linger_close(&self.quic).await;
                        break;
                    }
                }
                _ = gone.cancelled() => break,
            }
        }
        self.outbox.settle().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters() {
        let p = Params::parse(Some("enc=json&datagrams=1")).unwrap();
        assert!(matches!(p.encoding, Encoding::Json) && p.datagrams);
        let p = Params::parse(None).unwrap();
        assert!(matches!(p.encoding, Encoding::Proto) && !p.datagrams);
        assert!(Params::parse(Some("enc=xml")).is_err());
    }

    #[test]
    fn quarter_stream_ids_are_quic_varints() {
        assert_eq!(&quarter_stream_id(0)[..], &[0]);
        assert_eq!(&quarter_stream_id(63)[..], &[63]);
        assert_eq!(&quarter_stream_id(64)[..], &[0x40, 0x40]);
        assert_eq!(&quarter_stream_id(16384)[..], &[0x80, 0, 0x40, 0]);
    }
}

#[cfg(test)]
mod size {
    use super::*;

    fn of4<F, A, B, C, D, Fut>(_: &F) -> usize
    where
        F: FnOnce(A, B, C, D) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    fn of6<F, A, B, C, D, E, G, Fut>(_: &F) -> usize
    where
        F: FnOnce(A, B, C, D, E, G) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every idle WebTransport session pays for its QUIC connection's task: the session
    /// running (its connection and the wait it is in), not the session's opening nor the
    /// HTTP/3 request loop before it (the two were 12 and 14.5 KB in the debug build).
    /// The boxed session is one allocation: up to 1,536 B it takes jemalloc's 1,536 B
    /// class. It was 2,328 B (the 2,560 B class) while the run loop's states held outbox
    /// items (`Out`, 176 B) as the select's output, as `deliver_ready`'s argument and
    /// local and as `Writer::deliver`'s argument; items are now framed before any
    /// `.await` ([`Step`]).
    #[test]
    fn the_session_task_stays_small() {
        let (connection, session) = (of4(&http3::serve), of6(&serve));
        eprintln!("connection task {connection} B + boxed session {session} B");
        assert!(
            connection <= 64,
            "http3::serve's future is {connection} bytes"
        );
        assert!(
            session <= 1536,
            "a running /wt session's future is {session} bytes"
        );
    }

    /// Every idle session holds its `WebTransportSession` in an `Arc` (two counts,
    /// 16 B, beside it): up to 1,792 B that is jemalloc's 1,792 B class. Unpatched,
    /// with the CONNECT stream inline, it was 2,216 B (the 2,560 B class); the patched
    /// h3-webtransport boxes the stream (432 B, the 448 B class; vendor/README.md).
    #[test]
    fn the_session_stays_within_its_class() {
        let arc = 2 * std::mem::size_of::<usize>() + std::mem::size_of::<Session>();
        eprintln!("the session's Arc allocation: {arc} B");
        assert!(arc <= 1792, "the session's Arc allocation is {arc} bytes");
    }

    /// Every idle session's connection also runs [`drive`], waiting for the client's
    /// next stream in h3-webtransport's `accept_bi`. That future's state was sized for
    /// resolving a stream's first frame and an HTTP/3 request (~2.2 KB with h3-quinn);
    /// the patched h3-webtransport boxes that part (vendor/README.md), and the wait
    /// holds 56 B. Spawned on the task tracker, in tokio's task cell (104 B more, in
    /// steps of 128 B: see `mqtt`'s `the_websocket_task_stays_within_its_step`): a
    /// 2,944 B cell unpatched, 384 B patched (this build's figures).
    #[test]
    fn the_stream_wait_stays_small() {
        fn spawned<F, A, B, C, D, E, G, Fut>(_: &F) -> usize
        where
            F: FnOnce(A, B, C, D, E, G) -> Fut,
        {
            std::mem::size_of::<tokio_util::task::task_tracker::TrackedFuture<Fut>>()
        }
        let future = spawned(&drive);
        let cell = (future + 104).next_multiple_of(128);
        eprintln!("drive's spawned future {future} B (task cell {cell} B)");
        assert!(
            cell <= 384,
            "drive's future is {future} bytes: a {cell} B task cell"
        );
    }
}
