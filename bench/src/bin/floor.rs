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
                        return;
                    }
                    continue;
                }
                let Ok(f) = codec::decode_client(encoding, frame.payload()) else { continue };
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
                        Kind::Joined(proto::Joined { room: j.room, last_seq: room.seq })
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
                        Kind::Sent(proto::Sent { room: s.room, seq: room.seq, ..Default::default() })
                    }
                    Some(Cmd::Ping(_)) => Kind::Pong(proto::Pong { ts: 0 }),
                    _ => continue,
                };
                let bytes = codec::encode_server(encoding, &reply(f.id, kind));
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listen: SocketAddr = std::env::var("PARLEY_SERVER__LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:8090".into())
        .parse()?;
    let rooms: Rooms = Arc::default();
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
