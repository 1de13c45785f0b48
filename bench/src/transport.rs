//! One client connection to parley, whatever the transport.
//!
//! Scenarios talk to a [`Connection`]: send a `ClientFrame`, receive encoded server
//! frames, close. Each transport is one variant: WebSocket here, SSE and long-poll (an
//! event-stream reader or a poll loop, plus POSTs for commands) in
//! [`crate::http_transport`].

use std::collections::VecDeque;

use crate::{
    http_transport::HttpConnection,
    target::{Target, TransportKind},
    tls::ClientStream,
    wire::{self, Incoming, Received},
    ws_transport::RawWs,
    wt_transport::WtConnection,
};
use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use futures_util::SinkExt;
use parley::{
    codec::{self, Encoding},
    proto::{self, ClientFrame, client_frame::Cmd, server_frame::Kind},
};
use serde::Serialize;

/// The client WebSocket: the generator's own reader ([`crate::ws_transport`], an
/// implementation independent of the server's), or yawc when permessage-deflate is
/// offered (`--deflate`). The yawc socket is boxed so plain runs keep their size.
#[allow(clippy::large_enum_variant)]
enum WsSocket {
    Plain(RawWs),
    Deflate(Box<yawc::WebSocket<ClientStream>>),
}

/// Which step of opening a connection failed (storm counts them apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Tcp,
    Handshake,
    Auth,
    /// The room join after connecting (`storm --join`).
    Join,
    Timeout,
}

/// Why opening a connection failed, and at which step.
#[derive(Debug)]
pub struct OpenError {
    pub step: Step,
    pub source: anyhow::Error,
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {:#}", self.step, self.source)
    }
}

impl std::error::Error for OpenError {}

/// An open client connection.
pub struct Connection {
    link: Link,
    /// The fast path's one-frame slot for transports without a frame buffer of their
    /// own ([`Connection::readable`]).
    slot: Option<Incoming>,
    /// The frame lent out last from `slot`.
    current: Bytes,
}

enum Link {
    Ws(WsConnection),
    /// SSE or long-poll.
    Http(HttpConnection),
    /// WebTransport.
    Wt(WtConnection),
}

impl From<Link> for Connection {
    fn from(link: Link) -> Self {
        Connection {
            link,
            slot: None,
            current: Bytes::new(),
        }
    }
}

pub struct WsConnection {
    ws: WsSocket,
    encoding: Encoding,
    next_id: u64,
    /// Frames that arrived while waiting for a reply; `recv` yields them first.
    pending: VecDeque<Bytes>,
}

impl Connection {
    /// Opens a transport connection (not yet authenticated). `index` picks the source
    /// address when they are spread.
    pub async fn open(target: &Target, index: usize) -> Result<Connection, OpenError> {
        let fut = async {
            match target.transport {
                TransportKind::Ws => WsConnection::open(target, index).await.map(Link::Ws),
                TransportKind::Wt => WtConnection::open(target, index)
                    .await
                    .map(Link::Wt)
                    .map_err(|source| OpenError {
                        step: Step::Handshake,
                        source,
                    }),
                TransportKind::Sse | TransportKind::Poll => HttpConnection::open(target, index)
                    .await
                    .map(Link::Http)
                    .map_err(|e| OpenError {
                        step: Step::Tcp,
                        source: anyhow::Error::new(e)
                            .context(format!("TCP connect to {}", target.addr)),
                    }),
            }
        };
        match tokio::time::timeout(target.connect_timeout, fut).await {
            Ok(r) => r.map(Connection::from),
            Err(_) => Err(OpenError {
                step: Step::Timeout,
                source: anyhow!("open timed out after {:?}", target.connect_timeout),
            }),
        }
    }

    /// Opens and authenticates as `user`: the usual start of every scenario.
    pub async fn open_authenticated(
        target: &Target,
        index: usize,
        user: &str,
        token: &str,
    ) -> Result<(Connection, proto::Connected), OpenError> {
        let fut = async {
            let mut c = Connection::open(target, index).await?;
            let connected = c.authenticate(token).await.map_err(|source| OpenError {
                step: Step::Auth,
                source: source.context(format!("authenticating {user}")),
            })?;
            Ok((c, connected))
        };
        match tokio::time::timeout(target.connect_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(OpenError {
                step: Step::Timeout,
                source: anyhow!(
                    "connect + auth timed out after {:?}",
                    target.connect_timeout
                ),
            }),
        }
    }

    pub fn encoding(&self) -> Encoding {
        match &self.link {
            Link::Ws(c) => c.encoding,
            Link::Http(c) => c.encoding(),
            Link::Wt(c) => c.encoding,
        }
    }

    /// Sends one command; returns the request id it was given.
    pub async fn send(&mut self, cmd: Cmd) -> anyhow::Result<u64> {
        match &mut self.link {
            Link::Ws(c) => c.send(cmd).await,
            Link::Http(c) => c.send(cmd).await,
            Link::Wt(c) => c.send(cmd).await,
        }
    }

    /// The next server frame or the close. Cancel-safe: dropping the future loses
    /// nothing (the frame stays buffered in the transport).
    pub async fn recv(&mut self) -> anyhow::Result<Incoming> {
        if let Some(incoming) = self.slot.take() {
            return Ok(incoming);
        }
        match &mut self.link {
            Link::Ws(c) => c.recv().await,
            Link::Http(c) => c.recv().await,
            Link::Wt(c) => c.recv().await,
        }
    }

    /// The fast path, part one: waits until [`Connection::next_buffered`] has something
    /// to yield (a frame, the close) or may have after one read. Cancel-safe.
    pub async fn readable(&mut self) -> anyhow::Result<()> {
        if let Some(ws) = self.raw_ws() {
            if !ws.has_buffered() {
                ws.fill().await?;
            }
            return Ok(());
        }
        if self.slot.is_none() {
            let incoming = self.recv().await?;
            self.slot = Some(incoming);
        }
        Ok(())
    }

    /// The fast path, part two: the next frame that has already arrived, lent from the
    /// connection's buffer (`Ok(None)`: wait with [`Connection::readable`]). A plain
    /// WebSocket yields every frame one read brought, without copying them; the other
    /// transports one frame per `readable`.
    pub fn next_buffered(&mut self) -> anyhow::Result<Option<Received<'_>>> {
        if self.raw_ws().is_some() {
            let Link::Ws(WsConnection {
                ws: WsSocket::Plain(ws),
                ..
            }) = &mut self.link
            else {
                unreachable!("raw_ws said so");
            };
            return ws.next_buffered();
        }
        Ok(match self.slot.take() {
            None => None,
            Some(Incoming::Closed(code)) => Some(Received::Closed(code)),
            Some(Incoming::Frame(b)) => {
                self.current = b;
                Some(Received::Frame(&self.current))
            }
        })
    }

    /// The plain WebSocket, when the fast path may read it directly (nothing stashed
    /// by `request` or held in the slot).
    fn raw_ws(&mut self) -> Option<&mut RawWs> {
        match &mut self.link {
            Link::Ws(WsConnection {
                ws: WsSocket::Plain(ws),
                pending,
                ..
            }) if pending.is_empty() && self.slot.is_none() => Some(ws),
            _ => None,
        }
    }

    /// Sends a command and waits for its reply; frames that arrive first are kept for
    /// `recv`.
    pub async fn request(&mut self, cmd: Cmd) -> anyhow::Result<Kind> {
        if let Link::Http(c) = &mut self.link {
            // Over HTTP the reply is the POST's response, never on the stream.
            return c.call_command(cmd).await;
        }
        let id = self.send(cmd).await?;
        let encoding = self.encoding();
        loop {
            let bytes = match self.recv_raw().await? {
                Incoming::Frame(b) => b,
                Incoming::Closed(code) => bail!("closed ({code:?}) while waiting for a reply"),
            };
            let frame = wire::decode(encoding, &bytes)?;
            if frame.id == id && frame.pos == 0 {
                return frame.kind.context("reply without a kind");
            }
            self.stash(bytes);
        }
    }

    async fn recv_raw(&mut self) -> anyhow::Result<Incoming> {
        match &mut self.link {
            Link::Ws(c) => c.recv_socket().await,
            Link::Http(c) => c.recv().await,
            Link::Wt(c) => c.recv_stream().await,
        }
    }

    fn stash(&mut self, bytes: Bytes) {
        match &mut self.link {
            Link::Ws(c) => c.pending.push_back(bytes),
            Link::Wt(c) => c.pending.push_back(bytes),
            Link::Http(_) => unreachable!("HTTP replies never come on the stream"),
        }
    }

    /// `connect` with a token; fails unless the server answers `connected`.
    pub async fn authenticate(&mut self, token: &str) -> anyhow::Result<proto::Connected> {
        if let Link::Http(c) = &mut self.link {
            return c.authenticate(token).await;
        }
        let reply = self
            .request(Cmd::Connect(proto::Connect {
                token: token.to_string(),
                ..Default::default()
            }))
            .await?;
        match reply {
            Kind::Connected(c) => Ok(c),
            Kind::Error(e) => bail!("connect refused: {} ({})", e.message, e.code),
            other => bail!("unexpected reply to connect: {other:?}"),
        }
    }

    /// Joins `room`; returns the room's last seq at the time of joining.
    pub async fn join(&mut self, room: &str) -> anyhow::Result<u64> {
        let reply = self
            .request(Cmd::Join(proto::Join {
                room: room.to_string(),
            }))
            .await?;
        match reply {
            Kind::Joined(j) => Ok(j.last_seq),
            Kind::Error(e) => bail!("join {room} refused: {} ({})", e.message, e.code),
            other => bail!("unexpected reply to join: {other:?}"),
        }
    }

    /// Closes politely (close frame, then wait briefly for the server's close).
    pub async fn close(self) {
        match self.link {
            Link::Ws(c) => c.close().await,
            Link::Http(c) => c.close().await,
            Link::Wt(c) => c.close().await,
        }
    }
}

impl WsConnection {
    async fn open(target: &Target, index: usize) -> Result<WsConnection, OpenError> {
        let stream = target.connect(index).await.map_err(|e| OpenError {
            step: Step::Tcp,
            source: anyhow::Error::new(e).context(format!("TCP connect to {}", target.addr)),
        })?;
        if target.deflate {
            return WsConnection::open_deflate(target, stream).await;
        }
        let ws = RawWs::handshake(
            stream,
            &target.host,
            &target.path,
            target.encoding.subprotocol(),
            target.buffers.read,
        )
        .await
        .map_err(|source| OpenError {
            step: Step::Handshake,
            source,
        })?;
        Ok(WsConnection {
            ws: WsSocket::Plain(ws),
            encoding: target.encoding,
            next_id: 1,
            pending: VecDeque::new(),
        })
    }

    /// Opens with permessage-deflate offered (yawc's client, as a browser offers it:
    /// `client_max_window_bits`); a server that declines gets an uncompressed connection. Inflate state is
    /// shared between the generator's connections (the server keeps no context).
    async fn open_deflate(
        target: &Target,
        stream: ClientStream,
    ) -> Result<WsConnection, OpenError> {
        static POOL: std::sync::OnceLock<yawc::DeflatePool> = std::sync::OnceLock::new();
        let handshake = async {
            let url: url::Url = format!("ws://{}{}", target.host, target.path).parse()?;
            let options = yawc::Options::default()
                .with_max_payload_read(1 << 20)
                .with_max_read_buffer(1 << 20)
                .with_read_buffer_capacity(target.buffers.read)
                .with_compression_level(yawc::CompressionLevel::fast())
                .with_client_max_window_bits(15)
                .with_compression_threshold(128)
                .with_deflate_pool(POOL.get_or_init(|| yawc::DeflatePool::new(64)).clone())
                .with_no_delay();
            let request = yawc::HttpRequest::builder()
                .header("Sec-WebSocket-Protocol", target.encoding.subprotocol());
            let ws = yawc::WebSocket::handshake_with_request(url, stream, options, request).await?;
            anyhow::Ok(ws)
        };
        let ws = handshake.await.map_err(|source| OpenError {
            step: Step::Handshake,
            source,
        })?;
        Ok(WsConnection {
            ws: WsSocket::Deflate(Box::new(ws)),
            encoding: target.encoding,
            next_id: 1,
            pending: VecDeque::new(),
        })
    }

    async fn send(&mut self, cmd: Cmd) -> anyhow::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = codec::encode_client(self.encoding, &ClientFrame { id, cmd: Some(cmd) });
        match &mut self.ws {
            WsSocket::Plain(ws) => ws.send(self.encoding == Encoding::Json, &bytes).await?,
            WsSocket::Deflate(ws) => {
                let frame = match self.encoding {
                    Encoding::Proto => yawc::Frame::binary(bytes),
                    Encoding::Json => yawc::Frame::text(bytes),
                };
                ws.send(frame).await.context("sending")?;
            }
        }
        Ok(id)
    }

    async fn recv(&mut self) -> anyhow::Result<Incoming> {
        if let Some(b) = self.pending.pop_front() {
            return Ok(Incoming::Frame(b));
        }
        self.recv_socket().await
    }

    async fn recv_socket(&mut self) -> anyhow::Result<Incoming> {
        let ws = match &mut self.ws {
            WsSocket::Plain(ws) => loop {
                match ws.next_buffered()? {
                    Some(Received::Frame(b)) => {
                        return Ok(Incoming::Frame(Bytes::copy_from_slice(b)));
                    }
                    Some(Received::Closed(code)) => return Ok(Incoming::Closed(code)),
                    None => ws.fill().await?,
                }
            },
            WsSocket::Deflate(ws) => ws,
        };
        loop {
            let frame = match ws.next_frame().await {
                Ok(f) => f,
                Err(yawc::WebSocketError::ConnectionClosed) => {
                    return Ok(Incoming::Closed(None));
                }
                Err(e) => return Err(anyhow::Error::new(e).context("reading")),
            };
            match frame.opcode() {
                yawc::OpCode::Binary | yawc::OpCode::Text => {
                    return Ok(Incoming::Frame(frame.into_payload()));
                }
                yawc::OpCode::Close => {
                    return Ok(Incoming::Closed(frame.close_code().map(u16::from)));
                }
                // yawc answers pings itself.
                _ => continue,
            }
        }
    }

    async fn close(self) {
        match self.ws {
            WsSocket::Plain(ws) => ws.close().await,
            WsSocket::Deflate(mut ws) => {
                let polite = async {
                    let close = yawc::Frame::close(yawc::close::CloseCode::Normal, "");
                    let _ = ws.send(close).await;
                    while ws.next_frame().await.is_ok() {}
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), polite).await;
            }
        }
    }
}
