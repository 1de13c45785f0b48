//! MQTT 3.1.1 (and 3.1) and 5.0 for devices that speak MQTT: over WebSocket at `/mqtt`
//! (subprotocol `mqtt`), and over a plain stream from the `[mqtt] listen` listener (TCP,
//! or TLS over it; `server` accepts, this module serves). The packet codec is the
//! `mqtt-proto` crate; this module only frames and maps packets onto the session layer,
//! like `ws` does for parley frames:
//!
//! - CONNECT (password = a parley JWT; a username, if given, must equal its `sub`)
//!   becomes a `connect` command through the one connect path; CONNACK reports it.
//! - SUBSCRIBE `rooms/{room}` becomes a `join` (room rules apply) and starts delivery of
//!   that room's messages as PUBLISH; other filters (`dm/+`, `presence/{user}`,
//!   `rooms/+/typing`, `announcements`, `#`, …) match among the session's own pushes, so
//!   they read nothing the user could not. UNSUBSCRIBE only stops delivery (membership
//!   is the user's, shared with their other devices).
//! - PUBLISH to `rooms/{room}` or `dm/{user}` becomes a `send`; a QoS 1 PUBACK waits for
//!   the send's reply, which comes only once the message is durable. `rooms/{room}/typing`
//!   becomes a `typing`.
//! - Keep-alive: silence for 1.5 × the CONNECT keep-alive closes the connection.
//! - The end: without DISCONNECT the CONNECT's will (a message to `rooms/{room}`) is sent.
//!   A clean session ends with the connection, so presence goes offline at once; with
//!   `clean_session=false` the parley session waits out its grace period and the MQTT
//!   session state (subscriptions, un-PUBACKed QoS 1 PUBLISHes) is kept in [`Kept`] for
//!   the next CONNECT with the same client id, which resumes both.
//!
//! Anything a 3.1.1 server cannot refuse with a code (a bad topic, a refused send, QoS 2,
//! a malformed or oversize packet) closes the connection, as the specification asks.
//!
//! MQTT 5 (a CONNECT of protocol level 5) reads its packets with the codec's `v5` module
//! and maps them onto the 3.1.1 ones ([`In`]), so both share one path; what differs is
//! written where it is answered: reason codes in CONNACK, SUBACK, UNSUBACK and PUBACK (a
//! refused QoS 1 PUBLISH gets a PUBACK code, not a close), a DISCONNECT with its reason
//! before the server closes, the session expiry interval (how long [`Kept`] keeps the
//! session, at most the grace period), and user properties ↔ message metadata.
//! Over WebSocket packets may span messages, and one message may hold several.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Arc,
    task::Poll,
    time::Duration,
};

use crate::metrics::HotCounter;
use axum::{
    Extension,
    body::Body,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, SinkExt, future::Either};
use mqtt_proto::{
    Error as CodecError, Pid, Protocol, QoS, QosPid, TopicName,
    v3::{Connack, Connect, ConnectReturnCode, Packet, Publish, Subscribe, Unsubscribe},
    v5,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    time::{Instant, timeout},
};
use tracing::Instrument;
use yawc::{
    HttpWebSocket, IncomingUpgrade, UpgradeFut,
    close::CloseCode,
    frame::{Frame, OpCode},
};

use super::{
    Ctx,
    deadline::{self, WriteDeadline},
    ws::CLOSE_TIMEOUT,
};
use crate::{
    config::MqttPayload,
    metrics::{OpenConnection, TransportLabel},
    proto::{self, ClientFrame, ServerFrame, client_frame::Cmd, server_frame::Kind},
    session::{CloseReason, Conn, Core, Out, Outbox, OutboxConfig},
};

const LABEL: TransportLabel = TransportLabel { transport: "mqtt" };
/// The WebSocket subprotocols of MQTT (`mqttv3.1` is what old clients offer).
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];
/// The topic prefix of a chat room.
const ROOMS: &str = "rooms/";
/// The topic suffix of a room's typing events (after `rooms/{room}`).
const TYPING: &str = "/typing";
/// The topic prefix of direct messages with a user.
const DM: &str = "dm/";
/// The topic prefix of a user's presence.
const PRESENCE: &str = "presence/";
/// The topic of announcements to everyone (a room's: `rooms/{room}/announcements`).
const ANNOUNCEMENTS: &str = "announcements";
/// How long a connection's end waits for its will to be durable.
const WILL_TIMEOUT: Duration = Duration::from_secs(5);
/// The request id of the `connect` command.
const CONNECT_ID: u64 = 1;

/// Picks the subprotocol to echo: `Ok(None)` when none was offered, `Err` when only
/// others were.
fn negotiate(headers: &HeaderMap) -> Result<Option<&'static str>, ()> {
    super::ws::pick_subprotocol(headers, |name| {
        SUBPROTOCOLS
            .iter()
            .find(|p| p.eq_ignore_ascii_case(name))
            .copied()
    })
}

pub async fn handler(
    State(ctx): State<Ctx>,
    deadline: Option<Extension<WriteDeadline>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    upgrade: IncomingUpgrade,
) -> Response {
    let config = &ctx.core.config;
    if !config.mqtt.enabled {
        return StatusCode::NOT_FOUND.into_response();
    }
    if let Some(refused) = super::ws::refuse_upgrade(&ctx, &headers, &uri) {
        return refused;
    }
    let Ok(subprotocol) = negotiate(&headers) else {
        return (
            StatusCode::BAD_REQUEST,
            "unsupported subprotocol: offer mqtt",
        )
            .into_response();
    };
    // One WebSocket message may carry several packets: allow a few packets' worth; each
    // packet is held to `mqtt.max_packet_bytes` by the parser.
    let max = config.mqtt.max_packet_bytes;
    let message_limit = max.saturating_mul(2).max(max + 65536);
    let options = super::ws::options(&config.ws)
        .with_max_payload_read(message_limit)
        .with_max_read_buffer(message_limit);
    let (mut response, fut) =
        match super::ws::accept_upgrade(upgrade, options, deadline, &config.ws) {
            Ok(pair) => pair,
            Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        };
    if let Some(p) = subprotocol {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    let span = tracing::debug_span!("mqtt", user = tracing::field::Empty);
    // As `/ws`: a disabled span (the default `info` level) is not attached at all, since
    // `Instrumented` would keep its 40 bytes in every device's task, and those took the
    // task's cell into the next 128-byte step (1,024 -> 1,152 B).
    let tracker = ctx.tracker.clone();
    let task = connection(fut, ctx);
    if span.is_disabled() {
        tracker.spawn(task);
    } else {
        tracker.spawn(task.instrument(span));
    }
    response.map(Body::new)
}

fn connection(fut: UpgradeFut, ctx: Ctx) -> impl Future<Output = ()> + Send {
    fut.then(move |upgraded| match upgraded {
        Ok(socket) => Either::Left(serve(Socket::WebSocket(Box::new(socket)), ctx)),
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            Either::Right(std::future::ready(()))
        }
    })
}

/// Serves one MQTT connection on a plain stream (`[mqtt] listen`: TCP, or TLS over it)
/// until it ends. The caller spawns it on the server's task tracker (or awaits it in a
/// task of its own; [`spawn_stream`] spawns one).
pub fn serve_stream(io: impl Stream, ctx: Ctx) -> impl Future<Output = ()> + Send {
    let span = tracing::debug_span!("mqtt", user = tracing::field::Empty);
    serve(Socket::Stream(Box::new(io)), ctx).instrument(span)
}

/// Spawns [`serve_stream`]'s connection on the server's task tracker, as a task of its
/// own. As `handler`'s: with no span attached when it is disabled (the default `info`
/// level), since its 40 bytes took every device's task cell from 1,024 to 1,152 B.
pub fn spawn_stream(io: impl Stream, ctx: Ctx) {
    let span = tracing::debug_span!("mqtt", user = tracing::field::Empty);
    let tracker = ctx.tracker.clone();
    let task = serve(Socket::Stream(Box::new(io)), ctx);
    if span.is_disabled() {
        tracker.spawn(task);
    } else {
        tracker.spawn(task.instrument(span));
    }
}

/// The connection's life: CONNECT, then packets until it ends.
///
/// Two stages chained, not one `async fn`: the handshake's future (with `ctx`) is gone
/// once the connection runs, and the running stage holds the connection and its wire
/// once each (an `async fn` that took them by value would hold them beside the
/// future that uses them). Every byte of the running stage is paid by every idle
/// connection.
fn serve(socket: Socket, ctx: Ctx) -> impl Future<Output = ()> + Send {
    let metrics = ctx.core.metrics.clone();
    let counted = OpenConnection::open(&metrics, &LABEL);
    let wire = Wire {
        socket,
        buf: BytesMut::new(),
        max_packet: ctx.core.config.mqtt.max_packet_bytes,
        write_timeout: ctx.core.config.ws.write_timeout,
        frames_in: metrics.transport(&LABEL).frames_in.clone(),
        frames_out: metrics.transport(&LABEL).frames_out.clone(),
        v5: false,
    };
    let handshake = boxed(async move {
        let mut wire = wire;
        let connection = handshake(&mut wire, &ctx).await;
        connection.map(|c| Running {
            connection: c,
            wire,
            _counted: counted,
        })
    });
    handshake.then(|running| match running {
        Some(mut r) => Either::Left(async move { r.connection.run(&mut r.wire).await }),
        None => Either::Right(std::future::ready(())),
    })
}

/// A connection past its CONNECT: what its task holds until it ends.
struct Running {
    connection: Connection,
    wire: Wire,
    _counted: OpenConnection,
}

/// Why reading packets stopped.
#[derive(Debug)]
enum ReadError {
    /// The socket closed (a WebSocket close frame, or the end of the stream) or failed.
    Gone,
    /// A packet over `mqtt.max_packet_bytes`.
    TooLarge,
    /// Bytes that are not an MQTT packet (or a text message).
    Malformed(String),
}

/// A message's metadata: MQTT 5 user properties.
type Metadata = BTreeMap<String, String>;

/// A packet read: a 3.1.1 packet (MQTT 5 ones are mapped onto it), or what only MQTT 5
/// says.
enum In {
    Packet(Packet),
    /// A PUBLISH with its user properties (MQTT 5; none in 3.1.1).
    Publish(Publish, Metadata),
    /// An MQTT 5 CONNECT.
    Connect5(Box<v5::Connect>),
    /// An MQTT 5 DISCONNECT: its reason and a new session expiry interval, if any.
    Disconnect5 {
        reason: v5::DisconnectReasonCode,
        expiry: Option<u32>,
    },
    /// An MQTT 5 AUTH (parley has no enhanced authentication).
    Auth,
}

/// Decodes an MQTT 5 packet and maps it onto [`In`].
fn decode_v5(bytes: &[u8]) -> Result<In, ReadError> {
    let packet = match v5::Packet::decode(bytes) {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Err(ReadError::Malformed(
                "packet shorter than its length".into(),
            ));
        }
        Err(e) => return Err(ReadError::Malformed(e.to_string())),
    };
    Ok(match packet {
        v5::Packet::Connect(c) => In::Connect5(Box::new(c)),
        v5::Packet::Publish(p) => {
            let metadata = p
                .properties
                .user_properties
                .iter()
                .map(|u| (u.name.to_string(), u.value.to_string()))
                .collect();
            let publish = Publish {
                dup: p.dup,
                retain: p.retain,
                qos_pid: p.qos_pid,
                topic_name: p.topic_name,
                payload: p.payload,
            };
            In::Publish(publish, metadata)
        }
        v5::Packet::Puback(a) => In::Packet(Packet::Puback(a.pid)),
        v5::Packet::Pubrec(a) => In::Packet(Packet::Pubrec(a.pid)),
        v5::Packet::Pubrel(a) => In::Packet(Packet::Pubrel(a.pid)),
        v5::Packet::Pubcomp(a) => In::Packet(Packet::Pubcomp(a.pid)),
        v5::Packet::Subscribe(s) => In::Packet(Packet::Subscribe(Subscribe {
            pid: s.pid,
            topics: s
                .topics
                .into_iter()
                .map(|(filter, options)| (filter, options.max_qos))
                .collect(),
        })),
        v5::Packet::Unsubscribe(u) => In::Packet(Packet::Unsubscribe(Unsubscribe {
            pid: u.pid,
            topics: u.topics,
        })),
        v5::Packet::Pingreq => In::Packet(Packet::Pingreq),
        v5::Packet::Disconnect(d) => In::Disconnect5 {
            reason: d.reason_code,
            expiry: d.properties.session_expiry_interval,
        },
        v5::Packet::Auth(_) => In::Auth,
        // A server-to-client packet.
        _ => In::Packet(Packet::Pingresp),
    })
}

/// A byte stream a plain MQTT connection runs on (TCP, or TLS over it).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// What MQTT packets travel in.
enum Socket {
    /// `/mqtt`: binary WebSocket messages (a packet may span several, and one may hold
    /// several packets). Boxed like the stream: a connection of either kind holds only
    /// what it uses.
    WebSocket(Box<HttpWebSocket>),
    /// `[mqtt] listen`: the bare byte stream.
    Stream(Box<dyn Stream>),
}

/// Most bytes one read from a stream takes in (on the stack, so an idle connection holds
/// no read buffer).
const READ_CHUNK: usize = 4096;

/// The socket and the bytes of a packet not yet whole.
struct Wire {
    socket: Socket,
    buf: BytesMut,
    max_packet: usize,
    write_timeout: Duration,
    frames_in: HotCounter,
    frames_out: HotCounter,
    /// The connection speaks MQTT 5 (its CONNECT said so).
    v5: bool,
}

impl Wire {
    /// The next whole packet in the buffer, if any.
    fn parse(&mut self) -> Result<Option<In>, ReadError> {
        let Some((header_len, remaining)) = fixed_header(&self.buf)? else {
            return Ok(None);
        };
        let total = header_len + remaining;
        if total > self.max_packet {
            return Err(ReadError::TooLarge);
        }
        if self.buf.len() < total {
            return Ok(None);
        }
        let bytes = self.buf.split_to(total);
        if self.buf.is_empty() {
            // Give the buffer back: an idle connection holds none.
            self.buf = BytesMut::new();
        }
        self.frames_in.inc();
        if self.v5 {
            return decode_v5(&bytes).map(Some);
        }
        match Packet::decode(&bytes) {
            Ok(Some(Packet::Publish(p))) => Ok(Some(In::Publish(p, Metadata::new()))),
            Ok(Some(p)) => Ok(Some(In::Packet(p))),
            Ok(None) => Err(ReadError::Malformed(
                "packet shorter than its length".into(),
            )),
            // An MQTT 5 CONNECT (the handshake then reads on in MQTT 5).
            Err(CodecError::UnexpectedProtocol(Protocol::V500)) => decode_v5(&bytes).map(Some),
            Err(e) => Err(ReadError::Malformed(e.to_string())),
        }
    }

    /// Reads more bytes into the buffer. `Ok(false)`: only a WebSocket control frame came
    /// (a sign of life, no bytes). Cancel-safe: what is read is buffered in the same poll.
    async fn read(&mut self) -> Result<bool, ReadError> {
        match &mut self.socket {
            Socket::WebSocket(ws) => {
                let frame = ws.next_frame().await.map_err(|_| ReadError::Gone)?;
                self.take_frame(frame)
            }
            Socket::Stream(io) => {
                let buf = &mut self.buf;
                std::future::poll_fn(|cx| {
                    let mut chunk = [0u8; READ_CHUNK];
                    let mut read = ReadBuf::new(&mut chunk);
                    match std::pin::Pin::new(&mut **io).poll_read(cx, &mut read) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(Err(_)) => Poll::Ready(Err(ReadError::Gone)),
                        Poll::Ready(Ok(())) if read.filled().is_empty() => {
                            Poll::Ready(Err(ReadError::Gone))
                        }
                        Poll::Ready(Ok(())) => {
                            buf.extend_from_slice(read.filled());
                            Poll::Ready(Ok(true))
                        }
                    }
                })
                .await
            }
        }
    }

    /// Appends one WebSocket message. `Ok(false)`: a control frame only (a sign of life).
    fn take_frame(&mut self, frame: Frame) -> Result<bool, ReadError> {
        match frame.opcode() {
            OpCode::Binary | OpCode::Continuation => {
                let payload = frame.into_payload();
                if self.buf.is_empty() {
                    self.buf = BytesMut::from(payload);
                } else {
                    self.buf.extend_from_slice(&payload);
                }
                Ok(true)
            }
            OpCode::Text => Err(ReadError::Malformed(
                "MQTT travels in binary messages".into(),
            )),
            OpCode::Close => Err(ReadError::Gone),
            _ => Ok(false),
        }
    }

    /// Writes `bytes` (`packets` whole packets) under the write deadline: one binary
    /// WebSocket message, or straight onto the stream.
    async fn write(&mut self, bytes: Bytes, packets: u64) -> Result<(), CloseReason> {
        let written = match &mut self.socket {
            Socket::WebSocket(ws) => {
                let sent =
                    deadline::lazy_timeout(self.write_timeout, ws.send(Frame::binary(bytes)))
                        .await
                        .map(|r| r.map_err(|_| ()));
                ws.free_write_buffer();
                sent
            }
            Socket::Stream(io) => {
                let write = async {
                    io.write_all(&bytes).await?;
                    io.flush().await
                };
                deadline::lazy_timeout(self.write_timeout, write)
                    .await
                    .map(|r| r.map_err(|_| ()))
            }
        };
        match written {
            Some(Ok(())) => {
                self.frames_out.inc_by(packets);
                Ok(())
            }
            Some(Err(())) => Err(CloseReason::ShuttingDown),
            None => Err(CloseReason::SlowConsumer),
        }
    }

    async fn write_packet(&mut self, packet: &Packet) -> Result<(), CloseReason> {
        let mut out = BytesMut::new();
        encode(self.v5, packet, &Metadata::new(), &mut out);
        self.write(out.freeze(), 1).await
    }

    async fn write_v5(&mut self, packet: v5::Packet) -> Result<(), CloseReason> {
        let mut out = BytesMut::new();
        if let Ok(bytes) = packet.encode() {
            out.extend_from_slice(bytes.as_ref());
        }
        self.write(out.freeze(), 1).await
    }

    /// A WebSocket ping (a stream has none: MQTT's keep-alive is the client's).
    async fn ping(&mut self) -> Result<(), ()> {
        let Socket::WebSocket(ws) = &mut self.socket else {
            return Ok(());
        };
        match deadline::lazy_timeout(self.write_timeout, ws.send(Frame::ping(Bytes::new()))).await {
            Some(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    /// Closes the connection, briefly: a WebSocket with `code`; a stream is shut down
    /// (MQTT 3.1.1 has no close reason on the wire).
    async fn close(&mut self, code: u16, reason: &str) {
        let _ = timeout(CLOSE_TIMEOUT, async {
            match &mut self.socket {
                Socket::WebSocket(ws) => {
                    let _ = ws.send(Frame::close(CloseCode::from(code), reason)).await;
                }
                Socket::Stream(io) => {
                    let _ = io.shutdown().await;
                }
            }
        })
        .await;
    }
}

/// The fixed header's length and the remaining length, once both are whole.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, ReadError> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((2 + i, remaining)));
        }
    }
    Err(ReadError::Malformed("invalid remaining length".into()))
}

/// Encodes a packet for the connection's version: MQTT 5 gets a PUBLISH with
/// `metadata` as user properties, a PUBACK with reason 0 (success).
fn encode(v5: bool, packet: &Packet, metadata: &Metadata, out: &mut BytesMut) {
    // Encoding fails only for values parley never builds (a packet over 256 MiB).
    let bytes = if v5 {
        let packet = match packet {
            Packet::Publish(p) => {
                let mut publish =
                    v5::Publish::new(p.qos_pid, p.topic_name.clone(), p.payload.clone());
                publish.dup = p.dup;
                publish.properties.user_properties = metadata
                    .iter()
                    .map(|(name, value)| v5::UserProperty {
                        name: name.as_str().into(),
                        value: value.as_str().into(),
                    })
                    .collect();
                v5::Packet::Publish(publish)
            }
            Packet::Puback(pid) => v5::Packet::Puback(v5::Puback::new_success(*pid)),
            Packet::Pingresp => v5::Packet::Pingresp,
            // Nothing else is written through here (CONNACK, SUBACK, UNSUBACK and
            // DISCONNECT are built for MQTT 5 where they are written).
            _ => return,
        };
        packet.encode()
    } else {
        packet.encode()
    };
    if let Ok(bytes) = bytes {
        out.extend_from_slice(bytes.as_ref());
    }
}

/// The WebSocket close code after a DISCONNECT.
const NORMAL_CLOSE: u16 = 1000;
/// The MQTT close code for a WebSocket close after a protocol error.
const PROTOCOL_ERROR: u16 = 1002;
/// The close reason after bytes that are no MQTT packet.
const MALFORMED: &str = "malformed packet";

/// Reads the CONNECT (within `auth.connect_timeout`), authenticates it and opens the
/// session. `None`: refused or gone (the CONNACK and close are written).
async fn handshake(wire: &mut Wire, ctx: &Ctx) -> Option<Connection> {
    let core = &ctx.core;
    let deadline = Instant::now() + core.config.auth.connect_timeout;
    let first = loop {
        match wire.parse() {
            Ok(Some(p)) => break p,
            Ok(None) => {}
            Err(e) => {
                refuse_read(wire, e).await;
                return None;
            }
        }
        let read = tokio::select! {
            r = wire.read() => r,
            _ = tokio::time::sleep_until(deadline) => {
                wire.close(CloseReason::AuthTimeout.code(), "no CONNECT in time").await;
                return None;
            }
            _ = ctx.shutdown_shard().cancelled() => {
                wire.close(1001, "server shutting down").await;
                return None;
            }
        };
        if let Err(e) = read {
            refuse_read(wire, e).await;
            return None;
        }
    };
    let hello = match first {
        In::Packet(Packet::Connect(c)) => Hello::v3(c, core.config.session.grace_period),
        In::Connect5(c) => {
            wire.v5 = true;
            Hello::v5(*c, core.config.session.grace_period)
        }
        _ => {
            wire.close(PROTOCOL_ERROR, "the first packet must be CONNECT")
                .await;
            return None;
        }
    };
    let Hello {
        keep_alive,
        username,
        password,
        will: last_will,
        resume,
        keep_for,
        expiry_asked,
        max_packet,
        receive_max,
        will_retain,
        mut client_id,
    } = hello;
    // A Receive Maximum of 0 is a protocol error (MQTT 5.0 section 3.1.2.11.3).
    if receive_max == Some(0) {
        refuse_v5(wire, v5::ConnectReasonCode::ProtocolError).await;
        return None;
    }
    let token = password.as_deref().map(std::str::from_utf8);
    let user = match token {
        None => Err(ConnectReturnCode::NotAuthorized),
        Some(Err(_)) => Err(ConnectReturnCode::BadUserNameOrPassword),
        Some(Ok(token)) => match core.authenticate(token) {
            Err(_) => Err(ConnectReturnCode::BadUserNameOrPassword),
            Ok(user) if username.as_deref().is_some_and(|u| *u != *user) => {
                Err(ConnectReturnCode::BadUserNameOrPassword)
            }
            Ok(user) => Ok(user.to_string()),
        },
    };
    let user = match user {
        Ok(user) => user,
        Err(code) => {
            refuse(wire, code).await;
            return None;
        }
    };
    // MQTT 5: a CONNECT without a client id gets one (MQTT-3.1.3-6), named in CONNACK.
    let assigned = (wire.v5 && client_id.is_empty()).then(|| {
        client_id = format!("parley-{:016x}", rand::random::<u64>());
        client_id.clone()
    });
    // A session kept for this user and client id (`clean_session=false`, or an MQTT 5
    // session expiry interval): resumed below when the session layer still has it. A
    // clean session (start) discards any.
    let key: Key = Arc::new((user, client_id));
    if keep_for.is_some() && key.1.is_empty() {
        // MQTT-3.1.3-8: a kept session needs a client id.
        refuse(wire, ConnectReturnCode::IdentifierRejected).await;
        return None;
    }
    // A connection with the same client id is closed first (it may keep its session).
    let (kicked, claim) = Box::pin(Kept::claim(&ctx.mqtt, key)).await;
    let kept = ctx.mqtt.take(&claim.key);
    let kept = kept.filter(|_| resume);
    // The will: a message to a room, sent when the connection ends without DISCONNECT.
    // One the server could never send is refused here (3.1.1 has no code for it; MQTT 5
    // gets CONNACK 0x90 or 0x99).
    // MQTT 5 says Retain Available 0 in the CONNACK, so a will asking to be retained is
    // refused (MQTT-3.2.2-13), as a retained PUBLISH is (DISCONNECT 0x9A).
    if will_retain {
        refuse_v5(wire, v5::ConnectReasonCode::RetainNotSupported).await;
        return None;
    }
    let will = match last_will {
        None => None,
        Some((topic, payload, metadata)) => {
            let room = topic_room(&topic);
            let body = String::from_utf8(payload.to_vec()).ok();
            match (room, body) {
                (Some(room), Some(body)) => Some(Will {
                    room: room.to_string(),
                    body,
                    metadata,
                }),
                (room, _) if wire.v5 => {
                    let code = if room.is_none() {
                        v5::ConnectReasonCode::TopicNameInvalid
                    } else {
                        v5::ConnectReasonCode::PayloadFormatInvalid
                    };
                    refuse_v5(wire, code).await;
                    return None;
                }
                _ => {
                    wire.close(PROTOCOL_ERROR, "a will goes to rooms/{room}, in UTF-8")
                        .await;
                    return None;
                }
            }
        }
    };
    let token = token.and_then(Result::ok).unwrap_or_default();
    let ws = &core.config.ws;
    // Keep-alive 0 turns MQTT's off: WebSocket pings then find a dead peer, as on /ws;
    // on a stream, TCP keep-alive does (set by the listener).
    let stream = matches!(wire.socket, Socket::Stream(_));
    let silence = match keep_alive {
        0 if stream => None,
        0 => Some(ws.heartbeat_interval + ws.pong_timeout),
        k => Some(Duration::from_millis(u64::from(k) * 1500)),
    };
    let idle = silence.map(|silence| {
        ws.heartbeat_interval
            .min(silence / 3)
            .max(Duration::from_millis(10))
    });
    let mut outbox = Outbox::new(
        Conn::new(core.clone(), ws.heartbeat_interval),
        OutboxConfig {
            idle,
            silence_limit: silence,
            connect_deadline: None,
            coalesce: ws.coalesce,
            max_in_flight: ws.max_commands_in_flight,
        },
        ctx.connection_shutdown(),
    );
    let request = ClientFrame {
        id: CONNECT_ID,
        cmd: Some(Cmd::Connect(proto::Connect {
            token: token.to_string(),
            session_id: kept
                .as_ref()
                .map(|k| k.session_id.clone())
                .unwrap_or_default(),
            last_pos: kept.as_ref().map_or(0, |k| k.last_pos),
        })),
    };
    Box::pin(outbox.receive(Ok(request))).await;
    let mut resumed = false;
    let code = match outbox.ready() {
        Some(Out::Frame(ServerFrame {
            kind: Some(Kind::Connected(c)),
            ..
        })) => {
            resumed = c.resumed;
            None
        }
        Some(Out::Frame(ServerFrame {
            kind: Some(Kind::Error(e)),
            ..
        })) if e.code == proto::ErrorCode::Unauthorized as i32
            || e.code == proto::ErrorCode::TokenExpired as i32 =>
        {
            Some(ConnectReturnCode::BadUserNameOrPassword)
        }
        // Too many sessions, a store failure: try later.
        _ => Some(ConnectReturnCode::ServerUnavailable),
    };
    if let Some(code) = code {
        refuse(wire, code).await;
        return None;
    }
    let session = outbox.session()?.clone();
    tracing::Span::current().record("user", session.user_id());
    // The kept state only with the session it belongs to (else it expired).
    let kept = kept.filter(|_| resumed).unwrap_or_default();
    let written = if wire.v5 {
        let mut connack = v5::Connack::new(resumed, v5::ConnectReasonCode::Success);
        let p = &mut connack.properties;
        // What the server grants and lacks (MQTT 5.0 section 3.2.2.3).
        p.session_expiry_interval = keep_for
            .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
            .filter(|granted| Some(*granted) != expiry_asked);
        p.max_qos = Some(QoS::Level1);
        p.max_packet_size = u32::try_from(core.config.mqtt.max_packet_bytes).ok();
        p.assigned_client_id = assigned.map(Into::into);
        p.subscription_id_available = Some(false);
        p.shared_subscription_available = Some(false);
        p.retain_available = Some(false);
        wire.write_v5(v5::Packet::Connack(connack)).await
    } else {
        let connack = Packet::Connack(Connack::new(resumed, ConnectReturnCode::Accepted));
        wire.write_packet(&connack).await
    };
    if written.is_err() {
        return None;
    }
    Some(Connection {
        outbox,
        core: core.clone(),
        shutdown: ctx.connection_shutdown(),
        will: will.map(Box::new),
        session_tag: session.id().to_string(),
        keep: keep_for,
        kicked,
        claim,
        subscriptions: kept.subscriptions,
        waiting: None,
        recent: kept.recent,
        unacked: kept.unacked,
        last_pos: kept.last_pos,
        next_request: CONNECT_ID + 1,
        next_pid: kept.next_pid,
        published: kept.published,
        keep_alive: keep_alive > 0,
        v5: wire.v5,
        max_out: max_packet.and_then(|m| usize::try_from(m).ok()),
        // 65,535 (the default) is every packet id: nothing to hold back.
        flow: receive_max
            .filter(|&max| max < u16::MAX)
            .map(|max| Box::new(Flow::new(max))),
    })
}

/// What a CONNECT of either version asks for.
struct Hello {
    keep_alive: u16,
    username: Option<String>,
    password: Option<Bytes>,
    /// The will's topic, payload and (MQTT 5) user properties.
    will: Option<(TopicName, Bytes, Metadata)>,
    /// Resume a kept session (3.1.1 `clean_session=false`, MQTT 5 `clean_start=false`).
    resume: bool,
    /// How long to keep the session after the connection (`None`: it ends with it):
    /// 3.1.1 `clean_session=false` keeps it for `session.grace_period`, MQTT 5 for its
    /// session expiry interval, at most that.
    keep_for: Option<Duration>,
    /// MQTT 5: the session expiry interval asked for, in seconds.
    expiry_asked: Option<u32>,
    /// MQTT 5: the largest packet the client takes.
    max_packet: Option<u32>,
    /// MQTT 5: the client's Receive Maximum (most QoS 1 PUBLISHes it takes unacknowledged).
    receive_max: Option<u16>,
    /// MQTT 5: the will asks to be retained (refused: parley keeps no retained messages).
    will_retain: bool,
    client_id: String,
}

impl Hello {
    fn v3(c: Connect, grace: Duration) -> Self {
        Hello {
            keep_alive: c.keep_alive,
            username: c.username.map(|u| u.to_string()),
            password: c.password,
            will: c
                .last_will
                .map(|w| (w.topic_name, w.message, Metadata::new())),
            resume: !c.clean_session,
            keep_for: (!c.clean_session).then_some(grace),
            expiry_asked: None,
            max_packet: None,
            receive_max: None,
            will_retain: false,
            client_id: c.client_id.to_string(),
        }
    }

    fn v5(c: v5::Connect, grace: Duration) -> Self {
        // The will delay interval is ignored: a will is sent when the connection ends.
        let will_retain = c.last_will.as_ref().is_some_and(|w| w.retain);
        let will = c.last_will.map(|w| {
            let metadata = w
                .properties
                .user_properties
                .iter()
                .map(|u| (u.name.to_string(), u.value.to_string()))
                .collect();
            (w.topic_name, w.payload, metadata)
        });
        let expiry = c.properties.session_expiry_interval.unwrap_or(0);
        Hello {
            keep_alive: c.keep_alive,
            username: c.username.map(|u| u.to_string()),
            password: c.password,
            will,
            resume: !c.clean_start,
            keep_for: (expiry > 0).then(|| grace.min(Duration::from_secs(u64::from(expiry)))),
            expiry_asked: c.properties.session_expiry_interval,
            max_packet: c.properties.max_packet_size,
            receive_max: c.properties.receive_max,
            will_retain,
            client_id: c.client_id.to_string(),
        }
    }
}

/// Sessions kept for `clean_session=false` clients between connections, by (user, client
/// id): what MQTT calls the session state (subscriptions, QoS 1 messages not yet
/// PUBACKed) and where its parley session's stream stands. An entry lives as long as the
/// parley session could be resumed (`session.grace_period`); expired ones are dropped
/// whenever another is kept.
///
/// It also knows the live connection of each (user, client id), so a new CONNECT with the
/// same client id takes over from it (MQTT-3.1.4-2): the old one is closed and, if it
/// kept its session, hands it over. A device whose old TCP connection is half-open
/// (a NAT forgot it) so resumes at once instead of waiting for its keep-alive.
#[derive(Default)]
pub struct Kept(std::sync::Mutex<KeptInner>);

/// [`Kept`]'s state, under its lock (never held across an await).
#[derive(Default)]
pub struct KeptInner {
    kept: HashMap<Key, KeptSession>,
    live: HashMap<Key, Live>,
    next_id: u64,
}

/// A client's (user, client id): shared by [`Kept`]'s maps and the connection's claim.
type Key = Arc<(String, String)>;

/// The live connection of a client id: send on (or drop) `kick` to close it; `ended`
/// resolves once it has finished (and kept its session, if it does). One-shot channels,
/// not cancellation tokens: half the allocation, and the connection waits on its end of
/// `kick` in place (a token's wait is a future of its own in every idle connection).
struct Live {
    id: u64,
    kick: tokio::sync::oneshot::Sender<()>,
    ended: tokio::sync::oneshot::Receiver<()>,
}

/// How long a CONNECT waits for the connection it takes over to hand its session over.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(2);

impl Kept {
    fn lock(&self) -> std::sync::MutexGuard<'_, KeptInner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, key: &(String, String)) -> Option<KeptSession> {
        self.lock()
            .kept
            .remove(key)
            .filter(|k| k.expires.is_some_and(|e| e > Instant::now()))
    }

    fn keep(&self, key: Key, session: KeptSession) {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.kept.retain(|_, k| k.expires.is_some_and(|e| e > now));
        inner.kept.insert(key, session);
    }

    /// Registers a new live connection for `key`, closing the one before it (if any) and
    /// waiting, briefly, until it has ended. The receiver resolves when a later
    /// connection takes over.
    async fn claim(this: &Arc<Self>, key: Key) -> (tokio::sync::oneshot::Receiver<()>, Claim) {
        let (kick, kicked) = tokio::sync::oneshot::channel();
        let (ended_tx, ended) = tokio::sync::oneshot::channel();
        let (id, previous) = {
            let mut inner = this.lock();
            inner.next_id += 1;
            let id = inner.next_id;
            (id, inner.live.insert(key.clone(), Live { id, kick, ended }))
        };
        let claim = Claim {
            kept: this.clone(),
            key,
            id,
            _ended: ended_tx,
        };
        if let Some(previous) = previous {
            let _ = previous.kick.send(());
            let _ = timeout(TAKEOVER_TIMEOUT, previous.ended).await;
        }
        (kicked, claim)
    }

    /// The connection `id` for `key` has ended.
    fn release(&self, key: &(String, String), id: u64) {
        let mut inner = self.lock();
        if inner.live.get(key).is_some_and(|l| l.id == id) {
            inner.live.remove(key);
        }
    }
}

/// A connection's claim on its client id: released when dropped (after the session was
/// kept), on every path out of the handshake and the connection; dropping `_ended` then
/// tells a connection waiting to take over.
struct Claim {
    kept: Arc<Kept>,
    key: Key,
    id: u64,
    _ended: tokio::sync::oneshot::Sender<()>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.kept.release(&self.key, self.id);
    }
}

/// One kept MQTT session (see [`Kept`]).
#[derive(Default)]
struct KeptSession {
    session_id: String,
    /// The last session position written to the device.
    last_pos: u64,
    expires: Option<Instant>,
    subscriptions: Subscriptions,
    unacked: VecDeque<Unacked>,
    recent: VecDeque<Recent>,
    next_pid: u16,
    published: u64,
}

/// A QoS 1 PUBLISH written to the device and not yet PUBACKed: sent again, with DUP,
/// when a kept session resumes.
struct Unacked {
    pid: u16,
    publish: Publish,
    /// MQTT 5: its user properties.
    metadata: Metadata,
}

/// The most unacknowledged QoS 1 PUBLISHes a connection keeps for redelivery (older ones
/// are forgotten: they were delivered once).
const MAX_UNACKED: usize = 256;

/// Answers a CONNECT with a refusal, then closes.
async fn refuse(wire: &mut Wire, code: ConnectReturnCode) {
    if wire.v5 {
        let code = match code {
            ConnectReturnCode::UnacceptableProtocolVersion => {
                v5::ConnectReasonCode::UnsupportedProtocolVersion
            }
            ConnectReturnCode::IdentifierRejected => {
                v5::ConnectReasonCode::ClientIdentifierNotValid
            }
            ConnectReturnCode::BadUserNameOrPassword => {
                v5::ConnectReasonCode::BadUserNameOrPassword
            }
            ConnectReturnCode::NotAuthorized => v5::ConnectReasonCode::NotAuthorized,
            _ => v5::ConnectReasonCode::ServerUnavailable,
        };
        return refuse_v5(wire, code).await;
    }
    tracing::debug!(?code, "CONNECT refused");
    let _ = wire
        .write_packet(&Packet::Connack(Connack::new(false, code)))
        .await;
    let (close, reason) = match code {
        ConnectReturnCode::ServerUnavailable => (1013, "try again later"),
        _ => (CloseReason::Unauthorized.code(), "unauthorized"),
    };
    wire.close(close, reason).await;
}

/// Answers an MQTT 5 CONNECT with a refusal, then closes.
async fn refuse_v5(wire: &mut Wire, code: v5::ConnectReasonCode) {
    tracing::debug!(?code, "CONNECT refused");
    let connack = v5::Connack::new(false, code);
    let _ = wire.write_v5(v5::Packet::Connack(connack)).await;
    let (close, reason) = match code {
        v5::ConnectReasonCode::ServerUnavailable => (1013, "try again later"),
        v5::ConnectReasonCode::BadUserNameOrPassword | v5::ConnectReasonCode::NotAuthorized => {
            (CloseReason::Unauthorized.code(), "unauthorized")
        }
        _ => (PROTOCOL_ERROR, "CONNECT refused"),
    };
    wire.close(close, reason).await;
}

/// Closes after bytes that cannot be read on.
async fn refuse_read(wire: &mut Wire, e: ReadError) {
    match e {
        ReadError::Gone => {}
        ReadError::TooLarge => {
            // An MQTT 5 CONNECT too large: CONNACK 0x95 first (3.1.1 has no code).
            if v5_connect(&wire.buf) {
                wire.v5 = true;
                let connack = v5::Connack::new(false, v5::ConnectReasonCode::PacketTooLarge);
                let _ = wire.write_v5(v5::Packet::Connack(connack)).await;
            }
            wire.close(1009, "packet too large").await
        }
        ReadError::Malformed(why) => {
            tracing::debug!(why, "malformed packet");
            wire.close(PROTOCOL_ERROR, "malformed packet").await
        }
    }
}

/// Whether `buf` starts with an MQTT 5 CONNECT: packet type 1, protocol name `MQTT`,
/// level 5 (read before the packet is whole).
fn v5_connect(buf: &[u8]) -> bool {
    let Ok(Some((header_len, _))) = fixed_header(buf) else {
        return false;
    };
    buf.first() == Some(&0x10)
        && buf.get(header_len..header_len + 7) == Some(&[0, 4, b'M', b'Q', b'T', b'T', 5][..])
}

/// Sends a will through the chat layer (the outbox may be closing already) as `user`,
/// and waits, briefly, until it is durable.
async fn publish_will(core: Arc<Core>, user: String, client_msg_id: String, will: Will) {
    let send = proto::Send {
        room: will.room,
        client_msg_id,
        body: will.body,
        metadata: will.metadata,
        ..Default::default()
    };
    match timeout(WILL_TIMEOUT, core.chat.send(&user, send)).await {
        Ok(Ok(sent)) => tracing::debug!(seq = sent.seq, "will published"),
        Ok(Err(e)) => tracing::debug!(error = %e, "will refused"),
        Err(_) => tracing::debug!("will not durable in time"),
    }
}

/// What a command's reply completes.
enum Pending {
    /// A PUBLISH's `send`: PUBACK this packet id once it is durable (QoS 1).
    Publish(Option<u16>),
    /// A PUBLISH to `rooms/{room}/typing`: PUBACK this packet id (QoS 1) whatever the
    /// reply (a typing event over its rate is dropped, not an error worth a close).
    Typing(Option<u16>),
    /// One topic of a SUBSCRIBE: entry `index` of SUBACK `pid`, for `room` at `qos`.
    Subscribe {
        pid: u16,
        index: usize,
        room: String,
        qos: QoS,
    },
}

/// How many QoS 1 packet ids a connection remembers for retries (see `on_publish`).
const RECENT: usize = 64;

/// A recent QoS 1 PUBLISH.
struct Recent {
    pid: u16,
    /// Its `client_msg_id` number.
    n: u64,
    /// Its PUBACK is still to come.
    in_flight: bool,
}

/// What a connection waits for (see `Connection::waiting`).
#[derive(Default)]
struct Waiting {
    /// Commands waiting for their replies, by request id.
    pending: HashMap<u64, Pending>,
    /// SUBACKs waiting for joins, by packet id.
    suback: HashMap<u16, SubackState>,
}

/// A SUBACK waiting for its joins.
struct SubackState {
    /// The MQTT 5 reason codes (3.1.1 writes each failure as 0x80).
    codes: Vec<Option<u8>>,
}

/// A connection's topic filters with their granted QoS. A list, not a map: a device has
/// one or a few, every delivery looks at all of them, and a map's table for one entry
/// costs an idle device ~150 B more.
#[derive(Default)]
struct Subscriptions(Vec<(Box<str>, QoS)>);

impl Subscriptions {
    fn insert(&mut self, filter: &str, qos: QoS) {
        match self.0.iter_mut().find(|(f, _)| **f == *filter) {
            Some((_, granted)) => *granted = qos,
            None => {
                self.0.reserve_exact(1);
                self.0.push((filter.into(), qos));
            }
        }
    }

    /// Whether `filter` was subscribed.
    fn remove(&mut self, filter: &str) -> bool {
        let Some(i) = self.0.iter().position(|(f, _)| **f == *filter) else {
            return false;
        };
        self.0.swap_remove(i);
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        true
    }

    /// The highest QoS of the filters that match `topic` (MQTT-3.3.5-1), if any does.
    fn qos(&self, topic: &str) -> Option<QoS> {
        self.0
            .iter()
            .filter(|(filter, _)| matches(filter, topic))
            .map(|(_, qos)| *qos)
            .max()
    }
}

/// The CONNECT's will message, for `rooms/{room}`.
struct Will {
    room: String,
    body: String,
    /// MQTT 5: the will's user properties.
    metadata: Metadata,
}

/// An authenticated connection: its session's outbox and the MQTT state around it.
struct Connection {
    outbox: Outbox,
    core: Arc<Core>,
    /// The server's shutdown signal.
    shutdown: tokio_util::sync::CancellationToken,
    /// Sent when the connection ends without DISCONNECT. Boxed, as `keep`: most
    /// connections have neither, and every byte here is paid by every idle one.
    will: Option<Box<Will>>,
    /// The session id, in the `client_msg_id` of what this connection publishes.
    session_tag: String,
    /// How long to keep the MQTT session when the connection ends (`clean_session=false`,
    /// an MQTT 5 session expiry interval), in `claim`'s registry.
    keep: Option<Duration>,
    /// Resolves when a new connection with the same client id takes over.
    kicked: tokio::sync::oneshot::Receiver<()>,
    /// This connection's claim on its client id (its user is the session's, the will's
    /// sender), released when the connection is dropped, after the session is kept.
    claim: Claim,
    /// QoS 1 PUBLISHes written and not yet PUBACKed (kept only with `keep`).
    unacked: VecDeque<Unacked>,
    /// The last session position written to the device.
    last_pos: u64,
    /// Rooms whose messages this connection delivers, with the granted QoS.
    subscriptions: Subscriptions,
    /// Commands and SUBACKs waiting for replies; `None` when there are none (a device
    /// that only listens keeps neither table, nor room for them).
    waiting: Option<Box<Waiting>>,
    /// The latest QoS 1 PUBLISHes by packet id (at most [`RECENT`]): the `client_msg_id`
    /// number each was sent with, and whether its PUBACK is still to come.
    recent: VecDeque<Recent>,
    next_request: u64,
    next_pid: u16,
    /// Messages published on this connection: the `client_msg_id` counter.
    published: u64,
    /// Whether the CONNECT asked for MQTT keep-alive (else WebSocket pongs count).
    keep_alive: bool,
    /// The connection speaks MQTT 5.
    v5: bool,
    /// MQTT 5: the client's Maximum Packet Size.
    max_out: Option<usize>,
    /// MQTT 5: the client's Receive Maximum, when it is below 65,535, and what waits for
    /// it. Boxed: most devices set none, and every byte here is paid by every idle one.
    flow: Option<Box<Flow>>,
}

/// MQTT 5 flow control (section 4.9): at most `max` QoS 1 PUBLISHes written and not yet
/// PUBACKed; what comes while that many are out waits here, in order (a QoS 0 one too,
/// behind a QoS 1 one: a topic keeps its order), and leaves as PUBACKs come back.
/// Held pushes are not acknowledged to the session, so a kept session resumes with them.
struct Flow {
    max: u16,
    /// Packet ids written and not yet PUBACKed.
    in_flight: Vec<u16>,
    /// What waits for a PUBACK, in order.
    held: VecDeque<Held>,
    /// The `Push::cost` of the held pushes: over `session.max_queue_bytes` the device is
    /// a slow consumer (as a session whose queue overflows).
    held_bytes: usize,
}

/// A PUBLISH waiting for the client's Receive Maximum.
enum Held {
    /// A push at its session position.
    Push(u64, Arc<crate::codec::Push>),
    /// A kept session's unacknowledged PUBLISH (by packet id in `unacked`), to be sent
    /// again with DUP.
    Again(u16),
}

impl Flow {
    fn new(max: u16) -> Self {
        Flow {
            max,
            in_flight: Vec::new(),
            held: VecDeque::new(),
            held_bytes: 0,
        }
    }

    /// Whether another QoS 1 PUBLISH may be written now.
    fn open(&self) -> bool {
        self.in_flight.len() < usize::from(self.max)
    }

    fn hold(&mut self, held: Held) {
        if let Held::Push(_, push) = &held {
            self.held_bytes += push.cost();
        }
        self.held.push_back(held);
    }

    fn unhold(&mut self) -> Option<Held> {
        let held = self.held.pop_front()?;
        if let Held::Push(_, push) = &held {
            self.held_bytes -= push.cost();
        }
        if self.held.is_empty() {
            // Give the queue back: a device that keeps up holds none.
            self.held = VecDeque::new();
        }
        Some(held)
    }

    /// A PUBACK for `pid`.
    fn acked(&mut self, pid: u16) {
        if let Some(i) = self.in_flight.iter().position(|&p| p == pid) {
            self.in_flight.swap_remove(i);
        }
        if self.in_flight.is_empty() {
            self.in_flight = Vec::new();
        }
    }
}

/// What became of one push written through [`Connection::encode_push`].
enum Encoded {
    /// Encoded into the batch.
    Written,
    /// Not for this connection (no matching subscription, over the client's Maximum
    /// Packet Size, not a topic a device reads).
    Skipped,
    /// A QoS 1 PUBLISH while the client's Receive Maximum is reached: hold it.
    Held,
}

/// `fut` on the heap (see `ws::boxed`: a `Box::pin(fut).await` written in place still
/// reserves room for `fut` in the enclosing future).
fn boxed<F: Future>(fut: F) -> std::pin::Pin<Box<F>> {
    Box::pin(fut)
}

/// How one packet or outbox item went.
type Step = Result<(), Stop>;

/// Why the connection stops.
enum Stop {
    /// Close the WebSocket with this code.
    Close(u16, &'static str),
    /// The socket is gone or stuck: drop it.
    Gone,
}

impl Connection {
    async fn run(&mut self, wire: &mut Wire) {
        // A resumed session first sends again what the device never acknowledged (with a
        // Receive Maximum, as many as it allows; the rest as PUBACKs come).
        if let Some(flow) = self.flow.as_mut() {
            for u in &self.unacked {
                flow.hold(Held::Again(u.pid));
            }
            if boxed(self.release(wire)).await.is_err() {
                return;
            }
        }
        let mut again = BytesMut::new();
        for u in self.unacked.iter().filter(|_| self.flow.is_none()) {
            let mut publish = u.publish.clone();
            publish.dup = true;
            encode(self.v5, &Packet::Publish(publish), &u.metadata, &mut again);
        }
        // Every await here but `serve`'s is boxed: this future lives as long as the
        // connection, and an inline cold await (the resend, the will, the close) would
        // make every idle connection's task as large as the largest of them.
        if !again.is_empty()
            && boxed(wire.write(again.freeze(), self.unacked.len() as u64))
                .await
                .is_err()
        {
            return;
        }
        // Packets that came in the CONNECT's WebSocket message (a client may send
        // CONNECT and SUBSCRIBE together) are handled before waiting for more.
        let first = boxed(self.on_bytes(wire)).await;
        let stop = if let Err(stop) = first {
            stop
        } else {
            self.serve(wire).await
        };
        if let Stop::Close(code, reason) = stop {
            // MQTT 5 says why before the server closes (not after the client's
            // DISCONNECT, MQTT-3.14.0-1).
            if self.v5 && code != NORMAL_CLOSE {
                let mut disconnect = v5::Disconnect::new(disconnect_reason(code, reason));
                disconnect.properties.reason_string = Some(reason.into());
                let _ = boxed(wire.write_v5(v5::Packet::Disconnect(disconnect))).await;
            }
            boxed(wire.close(code, reason)).await;
        }
        // Without DISCONNECT (dropped, timed out, closed for an error): the will, as a
        // message from the user, before the session ends. Not when the server itself is
        // draining: a deploy is not every device's last word.
        if let Some(will) = self.will.take().filter(|_| !self.shutdown.is_cancelled()) {
            let (core, user) = (self.core.clone(), self.claim.key.0.clone());
            let client_msg_id = format!("mqtt-{}-will", self.session_tag);
            boxed(publish_will(core, user, client_msg_id, *will)).await;
        }
        boxed(self.outbox.settle()).await;
        match self.keep.take() {
            // `clean_session=false`: the session waits out its grace period (dropping
            // the outbox detaches it), its MQTT state kept beside it.
            Some(keep_for) if !self.shutdown.is_cancelled() => {
                let Some(session) = self.outbox.session() else {
                    return;
                };
                self.claim.kept.keep(
                    self.claim.key.clone(),
                    KeptSession {
                        session_id: session.id().to_string(),
                        last_pos: self.last_pos,
                        expires: Some(Instant::now() + keep_for),
                        subscriptions: std::mem::take(&mut self.subscriptions),
                        unacked: std::mem::take(&mut self.unacked),
                        recent: std::mem::take(&mut self.recent),
                        next_pid: self.next_pid,
                        published: self.published,
                    },
                );
            }
            // A clean session ends with the connection: presence goes offline now.
            _ => self.outbox.client_closed(),
        }
    }

    /// Reads packets and writes what the outbox hands out, until the connection stops.
    /// An idle connection waits in the `select!`: what a read or a delivery does is
    /// boxed, so it takes memory only while it runs.
    async fn serve(&mut self, wire: &mut Wire) -> Stop {
        loop {
            // The wait ends before the handler starts: the handler's future (boxed) is
            // not stored beside the wait's futures and what it returned.
            let handler = tokio::select! {
                biased;
                read = wire.read(), if self.outbox.accepting() => {
                    Either::Left(boxed(self.on_read(wire, read)))
                }
                out = self.outbox.next() => Either::Right(boxed(self.deliver(wire, out))),
                _ = &mut self.kicked => {
                    return Stop::Close(CloseReason::SessionMoved.code(), "taken over by a new connection");
                }
            };
            if let Err(stop) = handler.await {
                return stop;
            }
        }
    }

    /// One read: the packets it completes, then what is ready to write.
    async fn on_read(&mut self, wire: &mut Wire, read: Result<bool, ReadError>) -> Step {
        match read {
            Ok(false) => {
                // A pong: a sign of life only where MQTT's keep-alive is off (MQTT wants
                // packets, MQTT-3.1.2-24).
                if !self.keep_alive {
                    self.outbox.seen();
                }
                return Ok(());
            }
            Ok(true) => self.outbox.seen(),
            Err(ReadError::Gone) => {
                // A close without DISCONNECT: an abnormal end; the session waits out its
                // grace period.
                return Err(Stop::Gone);
            }
            Err(e) => return Err(read_stop(e)),
        }
        self.on_bytes(wire).await
    }

    /// Handles every whole packet buffered, then writes what is ready.
    async fn on_bytes(&mut self, wire: &mut Wire) -> Step {
        loop {
            match wire.parse() {
                Ok(Some(packet)) => self.on_packet(wire, packet).await?,
                Ok(None) => break,
                Err(e) => return Err(read_stop(e)),
            }
        }
        while let Some(out) = self.outbox.ready() {
            self.deliver(wire, out).await?;
        }
        Ok(())
    }

    fn request(&mut self, cmd: Cmd, pending: Pending) -> ClientFrame {
        let id = self.next_request;
        self.next_request += 1;
        self.waiting
            .get_or_insert_default()
            .pending
            .insert(id, pending);
        ClientFrame { id, cmd: Some(cmd) }
    }

    async fn on_packet(&mut self, wire: &mut Wire, packet: In) -> Step {
        let packet = match packet {
            In::Packet(p) => p,
            In::Publish(p, metadata) => return self.on_publish(wire, p, metadata).await,
            In::Connect5(_) => return Err(Stop::Close(PROTOCOL_ERROR, "second CONNECT")),
            In::Auth => return Err(Stop::Close(PROTOCOL_ERROR, "AUTH is not supported")),
            In::Disconnect5 { reason, expiry } => {
                // 0x04: a goodbye that still wants the will sent.
                if reason != v5::DisconnectReasonCode::DisconnectWithWillMessage {
                    self.will = None;
                }
                // The session expiry interval may change here, not from 0 (MQTT-3.14.2-2).
                match (expiry, &mut self.keep) {
                    (Some(0), keep) => *keep = None,
                    (Some(secs), Some(keep)) => {
                        let grace = self.core.config.session.grace_period;
                        *keep = grace.min(Duration::from_secs(u64::from(secs)));
                    }
                    (Some(_), None) => {
                        return Err(Stop::Close(PROTOCOL_ERROR, "session expiry was 0"));
                    }
                    (None, _) => {}
                }
                if self.keep.is_none() {
                    self.outbox.client_closed();
                }
                return Err(Stop::Close(NORMAL_CLOSE, "disconnect"));
            }
        };
        match packet {
            Packet::Pingreq => wire
                .write_packet(&Packet::Pingresp)
                .await
                .map_err(|_| Stop::Gone),
            Packet::Publish(p) => self.on_publish(wire, p, Metadata::new()).await,
            Packet::Subscribe(s) => {
                let pid = s.pid.value();
                let mut codes = vec![None; s.topics.len()];
                let mut joins = Vec::new();
                for (index, (filter, qos)) in s.topics.iter().enumerate() {
                    if let Some(room) = room_of(filter) {
                        joins.push((index, room.to_string(), *qos));
                    } else if readable(filter) {
                        // Over pushes the session gets anyway: nothing to check.
                        let granted = (*qos).min(QoS::Level1);
                        self.subscriptions.insert(filter, granted);
                        codes[index] = Some(granted as u8);
                    } else {
                        codes[index] = Some(TOPIC_FILTER_INVALID);
                    }
                }
                self.waiting
                    .get_or_insert_default()
                    .suback
                    .insert(pid, SubackState { codes });
                for (index, room, qos) in joins {
                    let cmd = Cmd::Join(proto::Join { room: room.clone() });
                    let frame = self.request(
                        cmd,
                        Pending::Subscribe {
                            pid,
                            index,
                            room,
                            qos,
                        },
                    );
                    Box::pin(self.outbox.receive(Ok(frame))).await;
                }
                self.complete_suback(wire, pid).await
            }
            Packet::Unsubscribe(Unsubscribe { pid, topics }) => {
                let mut codes = Vec::with_capacity(topics.len());
                for filter in &topics {
                    codes.push(match self.subscriptions.remove(filter) {
                        true => v5::UnsubscribeReasonCode::Success,
                        false => v5::UnsubscribeReasonCode::NoSubscriptionExisted,
                    });
                }
                let written = if self.v5 {
                    let unsuback = v5::Unsuback::new(pid, codes);
                    wire.write_v5(v5::Packet::Unsuback(unsuback)).await
                } else {
                    wire.write_packet(&Packet::Unsuback(pid)).await
                };
                written.map_err(|_| Stop::Gone)
            }
            // What parley publishes is released from the session on write (see
            // `deliver`); a kept session also forgets it for redelivery now.
            Packet::Puback(pid) => {
                let pid = pid.value();
                if let Some(i) = self.unacked.iter().position(|u| u.pid == pid) {
                    self.unacked.remove(i);
                }
                // MQTT 5 flow control: room for what was held back.
                if let Some(flow) = self.flow.as_mut() {
                    flow.acked(pid);
                    if !flow.held.is_empty() {
                        return self.release(wire).await;
                    }
                }
                Ok(())
            }
            Packet::Disconnect => {
                // A deliberate goodbye, without the will: a clean session ends now, a
                // kept one waits for the device (see `run`).
                self.will = None;
                if self.keep.is_none() {
                    self.outbox.client_closed();
                }
                Err(Stop::Close(NORMAL_CLOSE, "disconnect"))
            }
            Packet::Pubrec(_) | Packet::Pubrel(_) | Packet::Pubcomp(_) => {
                Err(Stop::Close(PROTOCOL_ERROR, QOS2))
            }
            Packet::Connect(_) => Err(Stop::Close(PROTOCOL_ERROR, "second CONNECT")),
            _ => Err(Stop::Close(PROTOCOL_ERROR, "a server-to-client packet")),
        }
    }

    async fn on_publish(&mut self, wire: &mut Wire, p: Publish, metadata: Metadata) -> Step {
        // 3.1.1 has no negative PUBACK: what cannot be sent closes the connection
        // (MQTT-3.3.5-2). MQTT 5 answers a QoS 1 PUBLISH with a PUBACK reason code
        // instead and drops a QoS 0 one. Retain is ignored in 3.1.1 and refused in
        // MQTT 5 (parley keeps history instead).
        let pid = match p.qos_pid {
            QosPid::Level0 => None,
            QosPid::Level1(pid) => Some(pid.value()),
            QosPid::Level2(_) => return Err(Stop::Close(PROTOCOL_ERROR, QOS2)),
        };
        // MQTT 5 was told Retain Available 0: a retained PUBLISH is a protocol error
        // (DISCONNECT 0x9A). 3.1.1 has no such code; there the flag is ignored.
        if self.v5 && p.retain {
            return Err(Stop::Close(PROTOCOL_ERROR, RETAIN));
        }
        let Some(target) = publish_target(&p.topic_name) else {
            if self.v5 {
                return self
                    .puback_v5(wire, pid, v5::PubackReasonCode::TopicNameInvalid)
                    .await;
            }
            return Err(Stop::Close(
                PROTOCOL_ERROR,
                "publish to rooms/{room}, rooms/{room}/typing or dm/{user}",
            ));
        };
        let (room, to_user) = match target {
            Target::Typing(room) => {
                // Ephemeral: no body, no idempotence to keep; acknowledged either way.
                let cmd = Cmd::Typing(proto::Typing {
                    room: room.to_string(),
                });
                let frame = self.request(cmd, Pending::Typing(pid));
                Box::pin(self.outbox.receive(Ok(frame))).await;
                return Ok(());
            }
            Target::Room(room) => (room.to_string(), String::new()),
            Target::Direct(user) => (String::new(), user.to_string()),
        };
        let Ok(body) = String::from_utf8(p.payload.to_vec()) else {
            if self.v5 {
                return self
                    .puback_v5(wire, pid, v5::PubackReasonCode::PayloadFormatInvalid)
                    .await;
            }
            return Err(Stop::Close(PROTOCOL_ERROR, "payload must be UTF-8"));
        };
        // A packet id names one message until the client reuses it without DUP: a DUP
        // (a retry, perhaps crossing our PUBACK on the wire) gets the same
        // `client_msg_id`, so the chat layer answers with the first seq and stores nothing
        // new. While the first is still in flight, its PUBACK answers both.
        let retry = pid.and_then(|pid| {
            p.dup
                .then(|| self.recent.iter_mut().find(|r| r.pid == pid))
                .flatten()
        });
        let n = match retry {
            Some(r) if r.in_flight => return Ok(()),
            Some(r) => {
                r.in_flight = true;
                r.n
            }
            None => {
                self.published += 1;
                if let Some(pid) = pid {
                    self.recent.retain(|r| r.pid != pid);
                    if self.recent.len() == RECENT {
                        self.recent.pop_front();
                    }
                    self.recent.push_back(Recent {
                        pid,
                        n: self.published,
                        in_flight: true,
                    });
                }
                self.published
            }
        };
        let client_msg_id = format!("mqtt-{}-{n}", self.session_tag);
        let cmd = Cmd::Send(proto::Send {
            room,
            to_user,
            client_msg_id,
            body,
            metadata,
            ..Default::default()
        });
        let frame = self.request(cmd, Pending::Publish(pid));
        Box::pin(self.outbox.receive(Ok(frame))).await;
        Ok(())
    }

    /// MQTT 5: a PUBACK with `code` for a QoS 1 PUBLISH (a QoS 0 one gets nothing).
    async fn puback_v5(
        &mut self,
        wire: &mut Wire,
        pid: Option<u16>,
        code: v5::PubackReasonCode,
    ) -> Step {
        let Some(pid) = pid.and_then(|p| Pid::try_from(p).ok()) else {
            return Ok(());
        };
        let puback = v5::Puback::new(pid, code);
        wire.write_v5(v5::Packet::Puback(puback))
            .await
            .map_err(|_| Stop::Gone)
    }

    /// Writes SUBACK `pid` once every topic has its code.
    async fn complete_suback(&mut self, wire: &mut Wire, pid: u16) -> Step {
        let Some(waiting) = self.waiting.as_mut() else {
            return Ok(());
        };
        let Some(state) = waiting.suback.get(&pid) else {
            return Ok(());
        };
        if state.codes.iter().any(Option::is_none) {
            return Ok(());
        }
        let state = waiting.suback.remove(&pid).expect("looked up");
        self.tidy();
        let codes: Vec<_> = state.codes.into_iter().flatten().collect();
        wire.write(suback(self.v5, pid, &codes), 1)
            .await
            .map_err(|_| Stop::Gone)
    }

    async fn deliver(&mut self, wire: &mut Wire, out: Out) -> Step {
        match out {
            Out::Frame(frame) => self.on_reply(wire, frame).await,
            Out::Pushes(pushes) => {
                let mut bytes = BytesMut::new();
                let mut packets = 0;
                let mut done = None;
                for (pos, push) in pushes {
                    // Behind a held PUBLISH everything waits (a topic keeps its order).
                    if let Some(flow) = self.flow.as_mut().filter(|f| !f.held.is_empty()) {
                        flow.hold(Held::Push(pos, push));
                        continue;
                    }
                    match self.encode_push(&push, &mut bytes) {
                        Encoded::Written => packets += 1,
                        Encoded::Skipped => {}
                        Encoded::Held => {
                            if let Some(flow) = self.flow.as_mut() {
                                flow.hold(Held::Push(pos, push));
                            }
                            continue;
                        }
                    }
                    done = Some(pos);
                }
                self.written(wire, bytes, packets, done).await?;
                if let Some(flow) = &self.flow
                    && flow.held_bytes > self.core.config.session.max_queue_bytes
                {
                    let why = CloseReason::SlowConsumer;
                    return Err(Stop::Close(why.code(), why.reason()));
                }
                Ok(())
            }
            Out::Idle => wire.ping().await.map_err(|()| Stop::Gone),
            Out::Close(why) => Err(Stop::Close(why.code(), why.reason())),
        }
    }

    /// Writes a batch of `packets` PUBLISHes, then tells the session that every push up
    /// to `done` is dealt with (written, or not for this connection).
    async fn written(
        &mut self,
        wire: &mut Wire,
        bytes: BytesMut,
        packets: u64,
        done: Option<u64>,
    ) -> Step {
        if packets > 0 {
            wire.write(bytes.freeze(), packets)
                .await
                .map_err(|why| match why {
                    CloseReason::SlowConsumer => Stop::Close(why.code(), why.reason()),
                    _ => Stop::Gone,
                })?;
        }
        if let Some(last) = done {
            // Written (or not for this connection): the session may forget them.
            if let Some(s) = self.outbox.session() {
                s.ack(last);
            }
            self.last_pos = self.last_pos.max(last);
        }
        Ok(())
    }

    /// Writes what the client's Receive Maximum held back, as far as it now allows.
    async fn release(&mut self, wire: &mut Wire) -> Step {
        let mut bytes = BytesMut::new();
        let mut packets = 0;
        let mut done = None;
        while let Some(held) = self.flow.as_mut().and_then(|f| f.unhold()) {
            let encoded = match &held {
                Held::Push(_, push) => self.encode_push(push, &mut bytes),
                Held::Again(pid) => self.encode_again(*pid, &mut bytes),
            };
            match encoded {
                Encoded::Written => packets += 1,
                Encoded::Skipped => {}
                Encoded::Held => {
                    if let Some(flow) = self.flow.as_mut() {
                        if let Held::Push(_, push) = &held {
                            flow.held_bytes += push.cost();
                        }
                        flow.held.push_front(held);
                    }
                    break;
                }
            }
            if let Held::Push(pos, _) = held {
                done = Some(pos);
            }
        }
        self.written(wire, bytes, packets, done).await
    }

    /// Encodes a kept session's unacknowledged PUBLISH `pid` again, with DUP.
    fn encode_again(&mut self, pid: u16, out: &mut BytesMut) -> Encoded {
        let Some(u) = self.unacked.iter().find(|u| u.pid == pid) else {
            // PUBACKed meanwhile.
            return Encoded::Skipped;
        };
        if let Some(flow) = self.flow.as_mut() {
            if !flow.open() {
                return Encoded::Held;
            }
            flow.in_flight.push(pid);
        }
        let mut publish = u.publish.clone();
        publish.dup = true;
        encode(self.v5, &Packet::Publish(publish), &u.metadata, out);
        Encoded::Written
    }

    /// Encodes one push as a PUBLISH for this connection's subscriptions, if any match.
    fn encode_push(&mut self, push: &crate::codec::Push, bytes: &mut BytesMut) -> Encoded {
        let Some((topic, payload, metadata)) = self.topic_of(push.kind()) else {
            return Encoded::Skipped;
        };
        let Some(qos) = self.subscriptions.qos(&topic) else {
            return Encoded::Skipped;
        };
        let Ok(topic) = TopicName::try_from(topic.as_str()) else {
            return Encoded::Skipped;
        };
        // MQTT 5 flow control: no more QoS 1 PUBLISHes out than the client allows.
        if qos != QoS::Level0 && self.flow.as_ref().is_some_and(|f| !f.open()) {
            return Encoded::Held;
        }
        let qos_pid = match qos {
            QoS::Level0 => QosPid::Level0,
            _ => QosPid::Level1(self.pid()),
        };
        let publish = Publish::new(qos_pid, topic, payload);
        let metadata = metadata.cloned().unwrap_or_default();
        let start = bytes.len();
        encode(self.v5, &Packet::Publish(publish.clone()), &metadata, bytes);
        // MQTT 5: a PUBLISH over the client's Maximum Packet Size is not sent
        // (MQTT-3.1.2-25); the client never receives it.
        if self.max_out.is_some_and(|max| bytes.len() - start > max) {
            bytes.truncate(start);
            return Encoded::Skipped;
        }
        if let QosPid::Level1(pid) = qos_pid {
            if let Some(flow) = self.flow.as_mut() {
                flow.in_flight.push(pid.value());
            }
            if self.keep.is_some() {
                if self.unacked.len() == MAX_UNACKED {
                    self.unacked.pop_front();
                }
                self.unacked.push_back(Unacked {
                    pid: pid.value(),
                    publish,
                    metadata,
                });
            }
        }
        Encoded::Written
    }

    /// Gives the tables of what is waited for back once nothing is.
    fn tidy(&mut self) {
        if self
            .waiting
            .as_ref()
            .is_some_and(|w| w.pending.is_empty() && w.suback.is_empty())
        {
            self.waiting = None;
        }
    }

    async fn on_reply(&mut self, wire: &mut Wire, frame: ServerFrame) -> Step {
        let Some(pending) = self
            .waiting
            .as_mut()
            .and_then(|w| w.pending.remove(&frame.id))
        else {
            return Ok(());
        };
        self.tidy();
        let error = match &frame.kind {
            Some(Kind::Error(e)) => Some(e.code),
            None => Some(proto::ErrorCode::Unspecified as i32),
            _ => None,
        };
        let ok = error.is_none();
        match pending {
            Pending::Publish(None) | Pending::Typing(None) => Ok(()),
            Pending::Typing(Some(pid)) => {
                let Ok(pid) = Pid::try_from(pid) else {
                    return Ok(());
                };
                wire.write_packet(&Packet::Puback(pid))
                    .await
                    .map_err(|_| Stop::Gone)
            }
            Pending::Publish(Some(pid)) => {
                if let Some(r) = self.recent.iter_mut().find(|r| r.pid == pid) {
                    r.in_flight = false;
                }
                if let Some(code) = error {
                    if self.v5 {
                        return self.puback_v5(wire, Some(pid), puback_reason(code)).await;
                    }
                    return Err(Stop::Close(PROTOCOL_ERROR, "publish refused"));
                }
                let Ok(pid) = Pid::try_from(pid) else {
                    return Ok(());
                };
                wire.write_packet(&Packet::Puback(pid))
                    .await
                    .map_err(|_| Stop::Gone)
            }
            Pending::Subscribe {
                pid,
                index,
                room,
                qos,
            } => {
                let code = if ok {
                    let granted = qos.min(QoS::Level1);
                    self.subscriptions
                        .insert(&format!("{ROOMS}{room}"), granted);
                    granted as u8
                } else {
                    NOT_AUTHORIZED
                };
                if let Some(state) = self.waiting.as_mut().and_then(|w| w.suback.get_mut(&pid))
                    && let Some(slot) = state.codes.get_mut(index)
                {
                    *slot = Some(code);
                }
                self.complete_suback(wire, pid).await
            }
        }
    }

    /// The topic, payload and metadata (a message's) of a push a device may subscribe to
    /// (see the topic table in docs/PROTOCOL.md); `None` for the others (receipts,
    /// signals, membership).
    fn topic_of<'k>(&self, kind: &'k Kind) -> Option<(String, Bytes, Option<&'k Metadata>)> {
        let json = self.core.config.mqtt.payload == MqttPayload::Json;
        let payload = |body: &str, value: &dyn erased::Json| {
            if json {
                Bytes::from(value.to_json())
            } else {
                Bytes::copy_from_slice(body.as_bytes())
            }
        };
        Some(match kind {
            Kind::Message(m) => {
                let topic = match m.room.strip_prefix("dm:") {
                    Some(pair) => {
                        let (a, b) = pair.split_once(':')?;
                        let peer = if a == self.claim.key.0 { b } else { a };
                        format!("{DM}{peer}")
                    }
                    None => format!("{ROOMS}{}", m.room),
                };
                (topic, payload(&m.body, m), Some(&m.metadata))
            }
            Kind::Typing(t) => (
                format!("{ROOMS}{}{TYPING}", t.room),
                payload(&t.user, t),
                None,
            ),
            Kind::Presence(p) => {
                let status = if p.online { "online" } else { "offline" };
                (format!("{PRESENCE}{}", p.user), payload(status, p), None)
            }
            Kind::Announcement(a) if a.room.is_empty() => {
                (ANNOUNCEMENTS.to_string(), payload(&a.body, a), None)
            }
            Kind::Announcement(a) => (
                format!("{ROOMS}{}/{ANNOUNCEMENTS}", a.room),
                payload(&a.body, a),
                None,
            ),
            _ => return None,
        })
    }

    /// The next packet id for a QoS 1 PUBLISH (1..=65535, wrapping).
    fn pid(&mut self) -> Pid {
        self.next_pid = self.next_pid.checked_add(1).unwrap_or(1);
        Pid::try_from(self.next_pid).unwrap_or_default()
    }
}

/// A SUBACK, encoded here: mqtt-proto 0.4.0 writes a 3.1.1 failure as 0x03 (the enum's
/// position) where MQTT 3.1.1 says 0x80. `codes` are MQTT 5 reason codes (granted QoS,
/// or a failure of 0x80 and above, written as 0x80 in 3.1.1); MQTT 5 adds an empty
/// property length.
fn suback(v5: bool, pid: u16, codes: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(8 + codes.len());
    out.extend_from_slice(&[0x90]);
    let mut remaining = 2 + usize::from(v5) + codes.len();
    loop {
        let mut byte = (remaining % 128) as u8;
        remaining /= 128;
        if remaining > 0 {
            byte |= 0x80;
        }
        out.extend_from_slice(&[byte]);
        if remaining == 0 {
            break;
        }
    }
    out.extend_from_slice(&pid.to_be_bytes());
    if v5 {
        out.extend_from_slice(&[0]);
    }
    for &code in codes {
        out.extend_from_slice(&[if v5 { code } else { code.min(0x80) }]);
    }
    out.freeze()
}

/// SUBACK: the topic filter is one parley does not publish on.
const TOPIC_FILTER_INVALID: u8 = 0x8F;
/// SUBACK: the room's rules refused the join.
const NOT_AUTHORIZED: u8 = 0x87;
/// Why a PUBREC, PUBREL or PUBCOMP (or a QoS 2 PUBLISH) closes the connection.
const QOS2: &str = "QoS 2 is not supported";
/// Why a retained MQTT 5 PUBLISH closes the connection.
const RETAIN: &str = "retained messages are not supported (history is in the room log)";

/// MQTT 5: the PUBACK reason code of a refused send.
fn puback_reason(code: i32) -> v5::PubackReasonCode {
    use proto::ErrorCode as E;
    match proto::ErrorCode::try_from(code).unwrap_or(E::Unspecified) {
        E::NotMember | E::Forbidden | E::Unauthorized | E::TokenExpired => {
            v5::PubackReasonCode::NotAuthorized
        }
        E::RateLimited | E::LimitExceeded | E::QuotaExceeded => v5::PubackReasonCode::QuotaExceeded,
        E::NotFound => v5::PubackReasonCode::TopicNameInvalid,
        E::InvalidArgument | E::FrameTooLarge => v5::PubackReasonCode::PayloadFormatInvalid,
        _ => v5::PubackReasonCode::UnspecifiedError,
    }
}

/// MQTT 5: the DISCONNECT reason code of a close (`code`, `reason`: the WebSocket's).
fn disconnect_reason(code: u16, reason: &str) -> v5::DisconnectReasonCode {
    use v5::DisconnectReasonCode as D;
    match code {
        PROTOCOL_ERROR if reason == QOS2 => D::QoSNotSupported,
        PROTOCOL_ERROR if reason == RETAIN => D::RetainNotSupported,
        PROTOCOL_ERROR if reason == MALFORMED => D::MalformedPacket,
        PROTOCOL_ERROR => D::ProtocolError,
        1009 => D::PacketTooLarge,
        1001 => D::ServerShuttingDown,
        c if c == CloseReason::SessionMoved.code() => D::SessionTakenOver,
        c if c == CloseReason::HeartbeatTimeout.code() => D::KeepAliveTimeout,
        c if c == CloseReason::SlowConsumer.code() => D::QuotaExceeded,
        c if c == CloseReason::Unauthorized.code() => D::NotAuthorized,
        _ => D::UnspecifiedError,
    }
}

fn read_stop(e: ReadError) -> Stop {
    if let ReadError::Malformed(why) = &e {
        tracing::debug!(why, "malformed packet");
    }
    match e {
        ReadError::Gone => Stop::Gone,
        ReadError::TooLarge => Stop::Close(1009, "packet too large"),
        ReadError::Malformed(_) => Stop::Close(PROTOCOL_ERROR, MALFORMED),
    }
}

/// The room of a topic `rooms/{room}` (no wildcards).
fn topic_room(topic: &str) -> Option<&str> {
    topic
        .strip_prefix(ROOMS)
        .filter(|r| !r.is_empty() && !r.contains(['+', '#', '/']))
}

/// What a device's PUBLISH topic names.
#[derive(Debug, PartialEq)]
enum Target<'a> {
    /// `rooms/{room}`: a message to the room.
    Room(&'a str),
    /// `rooms/{room}/typing`: a typing event.
    Typing(&'a str),
    /// `dm/{user}`: a direct message.
    Direct(&'a str),
}

fn publish_target(topic: &str) -> Option<Target<'_>> {
    let plain = |s: &str| !s.is_empty() && !s.contains(['+', '#', '/']);
    if let Some(room) = topic_room(topic) {
        return Some(Target::Room(room));
    }
    if let Some(room) = topic
        .strip_prefix(ROOMS)
        .and_then(|t| t.strip_suffix(TYPING))
        .filter(|r| plain(r))
    {
        return Some(Target::Typing(room));
    }
    topic
        .strip_prefix(DM)
        .filter(|u| plain(u))
        .map(Target::Direct)
}

/// Whether a subscription filter covers only topics parley publishes: its first level
/// names one of them (or is a wildcard). Every push it can match is one the session
/// receives anyway, so a wildcard reads nothing the user may not read.
fn readable(filter: &str) -> bool {
    let first = filter.split('/').next().unwrap_or_default();
    ["rooms", "dm", "presence", "announcements", "+", "#"].contains(&first)
}

/// MQTT topic matching: `+` is one level, a final `#` is the rest (or nothing).
fn matches(filter: &str, topic: &str) -> bool {
    let (mut f, mut t) = (filter.split('/'), topic.split('/'));
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A push object as its proto3 JSON (the `json` payload).
mod erased {
    pub trait Json {
        fn to_json(&self) -> Vec<u8>;
    }

    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).unwrap_or_default()
        }
    }
}

/// The room of a subscription filter: exactly `rooms/{room}`, no wildcards.
fn room_of(filter: &str) -> Option<&str> {
    topic_room(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<F, A, B, Fut>(_: &F) -> usize
    where
        F: FnOnce(A, B) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every idle MQTT connection pays for its task's future: the running stage (the
    /// connection, its wire and the `select!` it waits in), not the handshake's, and
    /// nothing a packet or a delivery does while it runs. Over TCP (`spawn_stream`) it
    /// is the whole task, with the task tracker's 8 B: up to 912 B it fits a 1,024 B
    /// tokio task cell (see `the_websocket_task_stays_within_its_step`), beyond that it
    /// takes the next 128 B step.
    #[test]
    fn the_connection_task_stays_small() {
        let task = future_size(&serve);
        let connection = std::mem::size_of::<Connection>();
        let wire = std::mem::size_of::<Wire>();
        eprintln!("task {task} B: Connection {connection} B, Wire {wire} B");
        assert!(
            task <= 912,
            "the MQTT connection task's future is {task} bytes"
        );
    }

    /// `/mqtt`'s task: the future `handler` spawns (the upgrade, then `serve`, on the
    /// task tracker; no span at the default level) in tokio's task cell, which adds
    /// 104 B on x86_64 (a 32 B header; scheduler, id and the stage's tag, 24 B; a 48 B
    /// trailer) and is allocated in steps of 128 B (`repr(align(128))`); and yawc's
    /// `WebSocket`, boxed beside it. Every idle device over WebSocket holds both. The
    /// future was 952 B (a 1,152 B cell) with the span attached, and yawc's `WebSocket`
    /// 512 B before its fragment and close state and its queue of owed frames were
    /// boxed or dropped.
    #[test]
    fn the_websocket_task_stays_within_its_step() {
        fn spawned<F, A, B, Fut>(_: &F) -> usize
        where
            F: FnOnce(A, B) -> Fut,
        {
            std::mem::size_of::<tokio_util::task::task_tracker::TrackedFuture<Fut>>()
        }
        let future = spawned(&connection);
        let cell = (future + 104).next_multiple_of(128);
        let socket = std::mem::size_of::<HttpWebSocket>();
        eprintln!("spawned future {future} B (task cell {cell} B), WebSocket {socket} B");
        assert!(
            cell <= 1024,
            "the /mqtt task's future is {future} bytes: a {cell} B task cell"
        );
        assert!(socket <= 352, "yawc's WebSocket is {socket} bytes");
    }

    #[test]
    fn fixed_header_lengths() {
        assert!(matches!(fixed_header(&[0x30]), Ok(None)));
        assert!(matches!(fixed_header(&[0x30, 0x05]), Ok(Some((2, 5)))));
        assert!(matches!(fixed_header(&[0x30, 0x80]), Ok(None)));
        assert!(matches!(
            fixed_header(&[0x30, 0xff, 0x7f]),
            Ok(Some((3, 16383)))
        ));
        assert!(matches!(
            fixed_header(&[0x30, 0xff, 0xff, 0xff, 0xff]),
            Err(ReadError::Malformed(_))
        ));
    }

    #[test]
    fn suback_codes_are_the_specification_s() {
        let bytes = suback(false, 0x0102, &[0, 1, NOT_AUTHORIZED, TOPIC_FILTER_INVALID]);
        assert_eq!(&bytes[..], [0x90, 6, 1, 2, 0, 1, 0x80, 0x80]);
        let many = vec![NOT_AUTHORIZED; 200];
        let bytes = suback(false, 1, &many);
        assert_eq!(&bytes[..3], [0x90, 0xca, 0x01]);
        assert_eq!(bytes.len(), 3 + 202);
        // MQTT 5: the reason codes as they are, after an empty property length; the
        // codec reads it back.
        let bytes = suback(true, 7, &[1, NOT_AUTHORIZED, TOPIC_FILTER_INVALID]);
        assert_eq!(&bytes[..], [0x90, 6, 0, 7, 0, 1, 0x87, 0x8f]);
        let Ok(Some(v5::Packet::Suback(s))) = v5::Packet::decode(&bytes) else {
            panic!("not a SUBACK");
        };
        assert_eq!(
            s.topics,
            [
                v5::SubscribeReasonCode::GrantedQoS1,
                v5::SubscribeReasonCode::NotAuthorized,
                v5::SubscribeReasonCode::TopicFilterInvalid
            ]
        );
    }

    #[test]
    fn an_mqtt5_connect_is_known_by_its_first_bytes() {
        let connect = v5::Packet::Connect(v5::Connect::new("d".into(), 30));
        let bytes = connect.encode().unwrap();
        assert!(v5_connect(&bytes.as_ref()[..9]));
        assert!(!v5_connect(&bytes.as_ref()[..8]), "level not read yet");
        let v3 = Packet::Connect(Connect::new("d".into(), 30))
            .encode()
            .unwrap();
        assert!(!v5_connect(v3.as_ref()));
    }

    #[test]
    fn topics() {
        assert_eq!(topic_room("rooms/lobby"), Some("lobby"));
        assert_eq!(topic_room("rooms/"), None);
        assert_eq!(topic_room("rooms/#"), None);
        assert_eq!(topic_room("rooms/+"), None);
        assert_eq!(topic_room("dm/bob"), None);
        assert_eq!(topic_room("rooms/lobby/typing"), None);
        assert_eq!(publish_target("rooms/lobby"), Some(Target::Room("lobby")));
        assert_eq!(
            publish_target("rooms/lobby/typing"),
            Some(Target::Typing("lobby"))
        );
        assert_eq!(publish_target("dm/bob"), Some(Target::Direct("bob")));
        assert_eq!(publish_target("dm/+"), None);
        assert_eq!(publish_target("presence/bob"), None);
        assert_eq!(publish_target("rooms/a/b/typing"), None);
    }

    #[test]
    fn filters_match_like_mqtt() {
        assert!(matches("rooms/lobby", "rooms/lobby"));
        assert!(!matches("rooms/lobby", "rooms/lobby/typing"));
        assert!(matches("rooms/+", "rooms/lobby"));
        assert!(!matches("rooms/+", "rooms/lobby/typing"));
        assert!(matches("rooms/+/typing", "rooms/lobby/typing"));
        assert!(matches("rooms/#", "rooms/lobby/typing"));
        assert!(matches("#", "presence/bob"));
        assert!(matches("+/bob", "dm/bob"));
        assert!(!matches("dm/+", "presence/bob"));
        assert!(readable("rooms/#") && readable("#") && readable("+/bob"));
        assert!(!readable("$SYS/#") && !readable("elsewhere"));
    }
}
