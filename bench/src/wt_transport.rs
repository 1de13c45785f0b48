//! WebTransport (`/wt`): parley's frames on one bidirectional QUIC stream, each prefixed
//! by its length as a protobuf varint (docs/PROTOCOL.md, "WebTransport"). The client is
//! `wtransport`, an implementation independent of the server's (quinn + h3).
//!
//! The server must have TLS configured (a self-signed certificate is fine: the generator
//! only ever talks to loopback and does not check certificates). Connections share a few
//! client QUIC endpoints (UDP sockets) instead of one socket each.

use std::{cell::RefCell, collections::VecDeque, sync::Arc};

use anyhow::{Context, anyhow};
use bytes::{Buf, Bytes, BytesMut};
use parley::{
    codec::{self, Encoding},
    proto::{ClientFrame, client_frame::Cmd},
};
use tokio::io::AsyncReadExt;
use wtransport::{ClientConfig, Endpoint, endpoint::endpoint_side::Client};

use crate::{target::Target, wire::Incoming};

/// Client UDP sockets shared by a thread's connections (round-robin by connection index).
const ENDPOINTS: usize = 4;

thread_local! {
    /// This thread's endpoints. An endpoint's driver task runs on the runtime that made
    /// it and ends with that runtime, so endpoints are not shared across threads (each
    /// of the generator's shard threads, and each test, runs a runtime of its own; a
    /// process-wide set made on one test's runtime stopped when that test ended, and
    /// the next test's connections failed with "endpoint stopping").
    static ENDPOINTS_HERE: RefCell<Option<Arc<[Endpoint<Client>]>>> = const { RefCell::new(None) };
}

fn endpoints() -> anyhow::Result<Arc<[Endpoint<Client>]>> {
    if let Some(e) = ENDPOINTS_HERE.with_borrow(|e| e.clone()) {
        return Ok(e);
    }
    let mut made = Vec::with_capacity(ENDPOINTS);
    for _ in 0..ENDPOINTS {
        // Large socket buffers, as the server's: one socket carries many connections.
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
        let size: libc::c_int = 4 * 1024 * 1024;
        for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
            // SAFETY: setsockopt on a valid fd with a pointer to a c_int and its size.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    option,
                    &size as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        let config = ClientConfig::builder()
            .with_bind_socket(socket)
            .with_no_cert_validation()
            .build();
        made.push(Endpoint::client(config)?);
    }
    let made: Arc<[Endpoint<Client>]> = made.into();
    ENDPOINTS_HERE.set(Some(made.clone()));
    Ok(made)
}

pub struct WtConnection {
    conn: wtransport::Connection,
    send: wtransport::SendStream,
    recv: wtransport::RecvStream,
    buf: BytesMut,
    pub(crate) encoding: Encoding,
    next_id: u64,
    /// Frames that arrived while waiting for a reply; `recv` yields them first.
    pub(crate) pending: VecDeque<Bytes>,
}

impl WtConnection {
    /// Opens a session and its stream (the caller counts a failure as a handshake
    /// failure).
    pub async fn open(target: &Target, index: usize) -> anyhow::Result<WtConnection> {
        let endpoints = endpoints()?;
        let endpoint = &endpoints[index % endpoints.len()];
        let enc = match target.encoding {
            Encoding::Proto => "proto",
            Encoding::Json => "json",
        };
        let url = format!("https://{}/wt?enc={enc}", target.addr);
        let conn = endpoint
            .connect(url)
            .await
            .context("WebTransport session")?;
        let (send, recv) = conn
            .open_bi()
            .await
            .context("opening the stream")?
            .await
            .context("opening the stream")?;
        Ok(WtConnection {
            conn,
            send,
            recv,
            buf: BytesMut::new(),
            encoding: target.encoding,
            next_id: 1,
            pending: VecDeque::new(),
        })
    }

    pub async fn send(&mut self, cmd: Cmd) -> anyhow::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = codec::encode_client(self.encoding, &ClientFrame { id, cmd: Some(cmd) });
        let mut out = Vec::with_capacity(bytes.len() + 4);
        prost::encoding::encode_varint(bytes.len() as u64, &mut out);
        out.extend_from_slice(&bytes);
        self.send.write_all(&out).await.context("sending")?;
        Ok(id)
    }

    pub async fn recv(&mut self) -> anyhow::Result<Incoming> {
        if let Some(b) = self.pending.pop_front() {
            return Ok(Incoming::Frame(b));
        }
        self.recv_stream().await
    }

    /// The next frame off the stream. Cancel-safe: bytes read stay in the buffer.
    pub async fn recv_stream(&mut self) -> anyhow::Result<Incoming> {
        loop {
            let mut view = &self.buf[..];
            if let Ok(len) = prost::encoding::decode_varint(&mut view) {
                let head = self.buf.len() - view.len();
                if view.len() as u64 >= len {
                    self.buf.advance(head);
                    return Ok(Incoming::Frame(self.buf.split_to(len as usize).freeze()));
                }
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(16 * 1024);
            }
            match self.recv.read_buf(&mut self.buf).await {
                Ok(0) => return Ok(Incoming::Closed(None)),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => {
                    return Ok(Incoming::Closed(None));
                }
                Err(e) => return Err(anyhow!(e).context("reading")),
            }
        }
    }

    /// Finishes the stream (a goodbye: the session ends) and waits briefly for the server
    /// to close the connection.
    pub async fn close(mut self) {
        let polite = async {
            let _ = self.send.finish().await;
            self.conn.closed().await;
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), polite).await;
    }
}
