//! `parley-floor`: the bare broadcast floor that parley's fan-out is measured against.
//!
//! It speaks just enough of parley's protocol for `parley-bench` to drive it — `connect`
//! (any token), `join`, `send`, `ping` — on the very same stack (axum + yawc with parley's
//! `/ws` options, parley's codec with its encode-once `Push`), and nothing else: no
//! authentication, sessions, resume, durable log, ordering stripes or limits. A send gets
//! the room's next seq and is queued, under the room's lock, into every member's
//! unbounded channel; each connection's task writes what its channel holds with `feed`
//! and one `flush`. What parley costs beyond this is the price of its guarantees.
//!
//! `parley-floor serve`, listening on `PARLEY_SERVER__LISTEN` (as `--spawn-server`
//! starts parley), so `parley-bench --spawn-server target/release/parley-floor …` runs any
//! fan-out scenario against it.
//!
//! With a certificate (`PARLEY_TLS__CERT_FILE` and `PARLEY_TLS__KEY_FILE`, as parley) it
//! also serves WebTransport at `/wt` on the same port over UDP ([`wt`]): parley's QUIC
//! endpoint and HTTP/3 settings (`parley::server::quic_config`, `quic_endpoint`,
//! `transport::http3::builder`), quinn + h3 + h3-webtransport, and one task per
//! connection that answers the same few commands — the floor `/wt`'s memory per idle
//! session is measured against.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::Body,
    http::{HeaderMap, HeaderValue, header},
    response::Response,
    routing::get,
};
use bytes::Bytes;
use futures_util::SinkExt;
use parley::{
    codec::{self, Encoding, Push},
    config::WsConfig,
    proto::{self, ServerFrame, client_frame::Cmd, server_frame::Kind},
};
use tokio::sync::mpsc;
use yawc::{
    HttpWebSocket, IncomingUpgrade,
    frame::{Frame, OpCode},
};

#[derive(Default)]
struct Room {
    seq: u64,
    members: Vec<mpsc::UnboundedSender<Arc<Push>>>,
}

type Rooms = Arc<Mutex<HashMap<String, Room>>>;

/// `FLOOR_CLOSE_REPLY=1`: answer a client's close frame (see `run`).
static CLOSE_REPLY: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::env::var("FLOOR_CLOSE_REPLY").is_ok_and(|v| v == "1"));

fn encoding_of(headers: &HeaderMap) -> Option<Encoding> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| Encoding::from_subprotocol(p.trim()))
}

async fn ws(rooms: Rooms, headers: HeaderMap, upgrade: IncomingUpgrade) -> Response {
    let offered = encoding_of(&headers);
    let encoding = offered.unwrap_or(Encoding::Json);
    let options = parley::transport::ws::options(&WsConfig::default());
    let Ok((mut response, fut)) = upgrade.upgrade(options) else {
        return Response::builder().status(400).body(Body::empty()).unwrap();
    };
    if let Some(e) = offered {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(e.subprotocol()),
        );
    }
    tokio::spawn(async move {
        if let Ok(socket) = fut.await {
            run(socket, rooms, encoding).await;
        }
    });
    response.map(Body::new)
}

fn data(encoding: Encoding, bytes: Bytes) -> Frame {
    match encoding {
        Encoding::Proto => Frame::binary(bytes),
        Encoding::Json => Frame::text(bytes),
    }
}

fn reply(id: u64, kind: Kind) -> ServerFrame {
    ServerFrame {
        id,
        pos: 0,
        kind: Some(kind),
    }
}

async fn run(mut socket: HttpWebSocket, rooms: Rooms, encoding: Encoding) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Arc<Push>>();
    let mut pos = 0u64;
    loop {
        tokio::select! {
            frame = socket.next_frame() => {
                let Ok(frame) = frame else { return };
                if !matches!(frame.opcode(), OpCode::Text | OpCode::Binary) {
                    if frame.opcode() == OpCode::Close {
                        // RFC 6455 §5.5.1 asks for a close reply, which parley sends
                        // (and the floor by default does not): `FLOOR_CLOSE_REPLY=1`
                        // lets out the reply yawc queued, as parley does, to measure
                        // what that one write costs a connect storm.
                        if *CLOSE_REPLY {
                            let _ = socket.close_replied(1024, false).await;
                        }
                        return;
                    }
                    continue;
                }
                let Ok(f) = codec::decode_client(encoding, frame.payload()) else { continue };
                let Some(r) = answer(&rooms, &tx, f) else { continue };
                let bytes = codec::encode_server(encoding, &r);
                if socket.send(data(encoding, bytes)).await.is_err() {
                    return;
                }
            }
            Some(push) = rx.recv() => {
                // Take what is queued, write it with one flush.
                let mut next = Some(push);
                while let Some(p) = next {
                    pos += 1;
                    // parley's own way to write a push: its position and the shared
                    // body copied straight into the write buffer.
                    let (prefix, shared) = p.frame_parts(encoding, pos);
                    let opcode = match encoding {
                        Encoding::Proto => OpCode::Binary,
                        Encoding::Json => OpCode::Text,
                    };
                    let ready = std::future::poll_fn(|cx| socket.poll_ready_unpin(cx)).await;
                    if ready.is_err()
                        || !socket.start_send_parts(opcode, false, prefix.as_slice(), shared)
                    {
                        return;
                    }
                    next = rx.try_recv().ok();
                }
                if socket.flush().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Answers one client frame: the reply, or `None` for a frame the floor ignores. `tx` is
/// the connection's push channel (joined to the room on `join`).
fn answer(
    rooms: &Rooms,
    tx: &mpsc::UnboundedSender<Arc<Push>>,
    f: proto::ClientFrame,
) -> Option<ServerFrame> {
    let kind = match f.cmd {
        Some(Cmd::Connect(_)) => Kind::Connected(proto::Connected {
            session_id: "floor".into(),
            heartbeat_ms: 25_000,
            ..Default::default()
        }),
        Some(Cmd::Join(j)) => {
            let mut rooms = rooms.lock().unwrap();
            let room = rooms.entry(j.room.clone()).or_default();
            room.members.push(tx.clone());
            Kind::Joined(proto::Joined {
                room: j.room,
                last_seq: room.seq,
            })
        }
        Some(Cmd::Send(s)) => {
            let mut rooms = rooms.lock().unwrap();
            let room = rooms.entry(s.room.clone()).or_default();
            room.seq += 1;
            let push = Arc::new(Push::new(Kind::Message(proto::Message {
                room: s.room.clone(),
                seq: room.seq,
                client_msg_id: s.client_msg_id,
                body: s.body,
                ..Default::default()
            })));
            room.members.retain(|m| m.send(push.clone()).is_ok());
            Kind::Sent(proto::Sent {
                room: s.room,
                seq: room.seq,
                ..Default::default()
            })
        }
        Some(Cmd::Ping(_)) => Kind::Pong(proto::Pong { ts: 0 }),
        _ => return None,
    };
    Some(reply(f.id, kind))
}

/// WebTransport (`/wt`) on parley's QUIC and HTTP/3 configuration: the frames of `/wt`
/// (each prefixed by its length as a varint) on the session's one bidirectional stream.
mod wt {
    use std::sync::Arc;

    use bytes::{Buf, BufMut, BytesMut};
    use h3::quic::{BidiStream as _, RecvStream as _};
    use h3_webtransport::server::{AcceptedBi, WebTransportSession};
    use parley::{
        codec::{self, Encoding, Push},
        transport::{http3, wt::peer_settings},
    };
    use tokio::{io::AsyncWriteExt, sync::mpsc};

    use super::{Rooms, answer};

    /// Accepts QUIC connections until the endpoint closes; one task each.
    pub async fn serve(endpoint: quinn::Endpoint, rooms: Rooms) {
        while let Some(incoming) = endpoint.accept().await {
            let rooms = rooms.clone();
            tokio::spawn(async move {
                if let Ok(connecting) = incoming.accept()
                    && let Ok(quic) = connecting.await
                {
                    session(quic, rooms).await;
                }
            });
        }
    }

    type Session = WebTransportSession<h3_quinn::Connection, bytes::Bytes>;
    type Stream =
        h3_webtransport::stream::BidiStream<h3_quinn::BidiStream<bytes::Bytes>, bytes::Bytes>;

    /// One QUIC connection: HTTP/3 until a WebTransport CONNECT, then its session. The
    /// opening is boxed and gone once the session runs (as parley's `http3::serve`): an
    /// idle session's task holds only the running loop.
    async fn session(quic: quinn::Connection, rooms: Rooms) {
        if let Some((session, stream, encoding)) = Box::pin(open(quic)).await {
            run(session, stream, encoding, rooms).await;
        }
    }

    /// The HTTP/3 connection, the CONNECT and the session's first stream.
    async fn open(quic: quinn::Connection) -> Option<(Session, Stream, Encoding)> {
        let mut conn = http3::builder()
            .build(h3_quinn::Connection::new(quic.clone()))
            .await
            .ok()?;
        let (request, stream) = loop {
            let resolver = conn.accept().await.ok()??;
            let Ok((request, stream)) = resolver.resolve_request().await else {
                continue;
            };
            if request.method() == axum::http::Method::CONNECT && request.uri().path() == "/wt" {
                break (request, stream);
            }
        };
        let encoding = match request.uri().query() {
            Some(q) if q.contains("enc=json") => Encoding::Json,
            _ => Encoding::Proto,
        };
        let _ = peer_settings(&mut conn).await;
        let session = WebTransportSession::accept(request, stream, conn)
            .await
            .ok()?;
        // The session's first bidirectional stream carries the frames.
        loop {
            match session.accept_bi().await {
                Ok(Some(AcceptedBi::BidiStream(_, stream))) => {
                    return Some((session, stream, encoding));
                }
                Ok(Some(AcceptedBi::Request(..))) => continue,
                _ => return None,
            }
        }
    }

    /// The running session: frames in, replies and pushes out. Nothing more is accepted
    /// on the connection (parley's `wt::drive` serves further requests and refuses
    /// further streams): QUIC's stream limit bounds what a client opens, and the
    /// stream's end or failure is the session's. `session` is held, not polled.
    async fn run(_session: Session, stream: Stream, encoding: Encoding, rooms: Rooms) {
        let (mut send, mut recv) = stream.split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Arc<Push>>();
        let mut buf = BytesMut::new();
        let mut out = BytesMut::new();
        let mut pos = 0u64;
        loop {
            tokio::select! {
                chunk = std::future::poll_fn(|cx| recv.poll_data(cx)) => {
                    // QUIC's own chunk, copied in: no read buffer of ours while idle.
                    let Ok(Some(chunk)) = chunk else { return };
                    buf.extend_from_slice(&chunk);
                    loop {
                        let mut view = &buf[..];
                        let Ok(len) = prost::encoding::decode_varint(&mut view) else { break };
                        if (view.len() as u64) < len {
                            break;
                        }
                        let head = buf.len() - view.len();
                        buf.advance(head);
                        let frame = buf.split_to(len as usize);
                        let Ok(f) = codec::decode_client(encoding, &frame) else { continue };
                        if let Some(r) = answer(&rooms, &tx, f) {
                            let bytes = codec::encode_server(encoding, &r);
                            prost::encoding::encode_varint(bytes.len() as u64, &mut out);
                            out.put_slice(&bytes);
                        }
                    }
                    if buf.is_empty() {
                        buf = BytesMut::new();
                    }
                }
                Some(push) = rx.recv() => {
                    // Take what is queued, write it at once.
                    let mut next = Some(push);
                    while let Some(p) = next {
                        pos += 1;
                        let (prefix, shared) = p.frame_parts(encoding, pos);
                        prost::encoding::encode_varint((prefix.len() + shared.len()) as u64, &mut out);
                        out.put_slice(prefix.as_slice());
                        out.put_slice(shared);
                        next = rx.try_recv().ok();
                    }
                }
            }
            if !out.is_empty() {
                if send.write_all(&out).await.is_err() {
                    return;
                }
                out = BytesMut::new();
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listen: SocketAddr = std::env::var("PARLEY_SERVER__LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:8090".into())
        .parse()?;
    let rooms: Rooms = Arc::default();
    // WebTransport when a certificate is configured (parley's configuration: defaults
    // and `PARLEY_*` variables), on the same port over UDP.
    let config = parley::config::Config::load(std::path::Path::new("parley.toml"))?;
    if let Some(quic) = parley::server::quic_config(&config)? {
        let endpoint = parley::server::quic_endpoint(quic, listen)?;
        tokio::spawn(wt::serve(endpoint, rooms.clone()));
    }
    let app = Router::new().route(
        "/ws",
        get(move |headers: HeaderMap, upgrade: IncomingUpgrade| {
            ws(rooms.clone(), headers, upgrade)
        }),
    );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
