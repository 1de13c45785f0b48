//! The plain WebSocket client (no permessage-deflate): the HTTP upgrade, then frames read
//! straight from one buffer per connection.
//!
//! Why not tungstenite: a fan-out run receives millions of small server frames per
//! second, and tokio-tungstenite 0.28 zero-fills its whole read buffer before every read
//! and allocates a `Bytes` per message; callgrind put the generator at ~9k instructions
//! per delivery, 38 % of it that `memset` (docs/BENCHMARKS.md, round four). Here a read
//! appends to the spare capacity of one `BytesMut` (never zeroed), frames are parsed in
//! place and handed out borrowed ([`RawWs::next_buffered`]), and every frame that one
//! read brought is handled before the connection waits again.
//!
//! Only what a client of parley's server needs is implemented, and everything else is
//! refused with an error naming it: server frames are unmasked (RFC 6455 §5.1), whole
//! (no fragmentation: parley sends every message as one frame), uncompressed (RSV bits
//! clear: deflate runs use yawc, `transport.rs`), at most [`MAX_FRAME`] bytes. Pings are
//! answered with a masked pong, a close is answered with a close. Client frames are
//! masked with a fresh key each.

use std::{
    io,
    os::fd::AsRawFd,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};

use crate::{tls::ClientStream, wire::Received};

/// The largest server frame accepted (as the tungstenite client was configured).
pub const MAX_FRAME: usize = 1 << 20;
/// The largest HTTP response head accepted during the upgrade.
const MAX_HEAD: usize = 16 * 1024;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xa;

/// A parsed server frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub opcode: u8,
    /// Bytes of header (2, 4 or 10: server frames carry no mask).
    pub header_len: usize,
    pub payload_len: usize,
}

impl Header {
    pub fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Parses the header of the server frame at the start of `buf`: `Ok(None)` when more
/// bytes are needed (with the total needed, when the header says), an error for a
/// frame this client does not accept.
pub fn parse_header(buf: &[u8]) -> anyhow::Result<Result<Header, Option<usize>>> {
    let [b0, b1, ..] = *buf else {
        return Ok(Err(None));
    };
    let fin = b0 & 0x80 != 0;
    let rsv = b0 & 0x70;
    let opcode = b0 & 0x0f;
    ensure!(
        rsv == 0,
        "server frame with RSV bits {rsv:#x}: compressed (permessage-deflate was not negotiated) or an unknown extension"
    );
    ensure!(b1 & 0x80 == 0, "masked server frame (RFC 6455 §5.1)");
    match opcode {
        OP_TEXT | OP_BINARY => ensure!(
            fin,
            "fragmented server message: not supported by the generator's reader"
        ),
        OP_CONTINUATION => {
            bail!(
                "continuation frame: fragmented messages are not supported by the generator's reader"
            )
        }
        OP_CLOSE | OP_PING | OP_PONG => ensure!(fin, "fragmented control frame"),
        other => bail!("unknown opcode {other:#x}"),
    }
    let (header_len, payload_len) = match b1 & 0x7f {
        126 => {
            let Some(len) = buf.get(2..4) else {
                return Ok(Err(None));
            };
            (4, u16::from_be_bytes([len[0], len[1]]) as usize)
        }
        127 => {
            let Some(len) = buf.get(2..10) else {
                return Ok(Err(None));
            };
            let len = u64::from_be_bytes(len.try_into().expect("8 bytes"));
            ensure!(len >> 63 == 0, "64-bit frame length with the top bit set");
            ensure!(
                len <= MAX_FRAME as u64,
                "server frame of {len} bytes (limit {MAX_FRAME})"
            );
            (10, len as usize)
        }
        n => (2, n as usize),
    };
    if opcode >= OP_CLOSE {
        ensure!(payload_len <= 125, "control frame of {payload_len} bytes");
    }
    ensure!(
        payload_len <= MAX_FRAME,
        "server frame of {payload_len} bytes (limit {MAX_FRAME})"
    );
    let h = Header {
        opcode,
        header_len,
        payload_len,
    };
    if buf.len() < h.frame_len() {
        return Ok(Err(Some(h.frame_len())));
    }
    Ok(Ok(h))
}

/// Appends one masked client frame (FIN set) to `out`.
pub fn encode_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

/// Server frames parsed in place from one buffer. Separate from the socket so that the
/// unit tests can feed it bytes split and joined any way.
#[derive(Debug)]
pub struct FrameReader {
    /// Received bytes; `buf[start..]` is not parsed yet.
    buf: Vec<u8>,
    start: usize,
    /// Bytes of the frame handed out last, dropped at the next call (its payload was
    /// lent out until then).
    consumed: usize,
    /// Where the payload of the frame handed out last starts.
    payload_at: usize,
    /// Whether the bytes buffered end in an incomplete frame (a read is needed).
    starved: bool,
    /// The whole frame the incomplete one needs, when its header said.
    need: usize,
}

/// One frame from [`FrameReader::next_frame`].
#[derive(Debug, PartialEq, Eq)]
pub struct RawFrame<'a> {
    pub opcode: u8,
    pub payload: &'a [u8],
}

impl FrameReader {
    pub fn with_capacity(n: usize) -> FrameReader {
        FrameReader::from_vec(Vec::with_capacity(n.max(256)), 0)
    }

    /// A reader over `buf[start..]` (bytes that came with the upgrade response).
    fn from_vec(buf: Vec<u8>, start: usize) -> FrameReader {
        FrameReader {
            starved: start == buf.len(),
            buf,
            start,
            consumed: 0,
            payload_at: 0,
            need: 0,
        }
    }

    /// Appends received bytes (what a read does; tests call it directly).
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.starved = false;
    }

    /// Whether a read is needed before [`FrameReader::next_frame`] can yield anything.
    pub fn starved(&self) -> bool {
        self.starved
    }

    /// Drops the frame handed out last; empties the buffer when nothing is left.
    fn release(&mut self) {
        self.start += std::mem::take(&mut self.consumed);
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// The next complete frame (`Ok(None)`: the buffered bytes end before it does).
    pub fn next_frame(&mut self) -> anyhow::Result<Option<RawFrame<'_>>> {
        self.release();
        match parse_header(&self.buf[self.start..])? {
            Ok(h) => {
                self.consumed = h.frame_len();
                self.payload_at = self.start + h.header_len;
                Ok(Some(RawFrame {
                    opcode: h.opcode,
                    payload: self.payload(),
                }))
            }
            Err(need) => {
                self.starved = true;
                self.need = need.unwrap_or(0);
                Ok(None)
            }
        }
    }

    /// The payload of the frame [`FrameReader::next_frame`] handed out last.
    pub fn payload(&self) -> &[u8] {
        &self.buf[self.payload_at..self.start + self.consumed]
    }

    /// Room for the next read: `read_size` spare bytes, or the rest of the frame being
    /// waited for. Moves an incomplete frame to the front rather than growing; no
    /// allocation once the buffer has its size.
    fn make_room(&mut self, read_size: usize) {
        self.release();
        let pending = self.buf.len() - self.start;
        let want = read_size.max(self.need.saturating_sub(pending));
        if self.buf.capacity() - self.buf.len() >= want.min(read_size / 2).max(1) {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start.., 0);
            self.buf.truncate(pending);
            self.start = 0;
        }
        if self.buf.capacity() - self.buf.len() < want {
            self.buf.reserve(want);
        }
    }
}

/// Per-frame mask keys: a splitmix64 sequence, seeded per connection.
#[derive(Debug)]
struct Masks(u64);

impl Masks {
    fn new() -> Masks {
        static SEED: AtomicU64 = AtomicU64::new(0);
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Masks(time ^ SEED.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed))
    }

    fn next(&mut self) -> [u8; 4] {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) as u32).to_le_bytes()
    }
}

/// One plain WebSocket client connection.
#[derive(Debug)]
pub struct RawWs {
    stream: ClientStream,
    reader: FrameReader,
    read_size: usize,
    /// Control replies (pongs, the close answer) not yet written.
    out: Vec<u8>,
    masks: Masks,
    /// The server's close (its code), or EOF (`Some(None)`).
    closed: Option<Option<u16>>,
    /// Whether our close frame went out.
    close_sent: bool,
}

impl RawWs {
    /// The HTTP upgrade on `stream`, offering `subprotocol`; fails unless the server
    /// switches protocols with the right accept key and that subprotocol.
    pub async fn handshake(
        mut stream: ClientStream,
        host: &str,
        path: &str,
        subprotocol: &str,
        read_size: usize,
    ) -> anyhow::Result<RawWs> {
        let key = generate_key();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\
             Sec-WebSocket-Protocol: {subprotocol}\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .context("sending the upgrade request")?;
        let mut buf = Vec::with_capacity(read_size.max(1024));
        let head_len = loop {
            if stream
                .read_buf(&mut buf)
                .await
                .context("reading the upgrade response")?
                == 0
            {
                bail!("connection closed during the upgrade");
            }
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            match response
                .parse(&buf)
                .context("parsing the upgrade response")?
            {
                httparse::Status::Partial => {
                    ensure!(
                        buf.len() < MAX_HEAD,
                        "upgrade response head over {MAX_HEAD} bytes"
                    );
                    if buf.capacity() == buf.len() {
                        buf.reserve(buf.len());
                    }
                }
                httparse::Status::Complete(n) => {
                    check_upgrade(&response, &key, subprotocol)?;
                    break n;
                }
            }
        };
        Ok(RawWs {
            stream,
            // Frames that came with the response head stay buffered.
            reader: FrameReader::from_vec(buf, head_len),
            read_size: read_size.max(256),
            out: Vec::new(),
            masks: Masks::new(),
            closed: None,
            close_sent: false,
        })
    }

    /// Whether [`RawWs::next_buffered`] may yield without a read first.
    pub fn has_buffered(&self) -> bool {
        self.closed.is_some() || !self.reader.starved()
    }

    /// The next data frame or close already received, without waiting (`Ok(None)`:
    /// call [`RawWs::fill`]). Pings and the server's close are answered (the reply is
    /// written at the next `fill` or `send`).
    pub fn next_buffered(&mut self) -> anyhow::Result<Option<Received<'_>>> {
        if let Some(code) = self.closed {
            return Ok(Some(Received::Closed(code)));
        }
        loop {
            // The payload is taken again below rather than kept: the borrow checker does
            // not let a loop return a borrow from one of its iterations.
            let opcode = match self.reader.next_frame()? {
                None => return Ok(None),
                Some(f) => f.opcode,
            };
            match opcode {
                OP_TEXT | OP_BINARY => break,
                OP_PING => {
                    let mask = self.masks.next();
                    encode_client_frame(&mut self.out, OP_PONG, self.reader.payload(), mask);
                }
                OP_PONG => {}
                OP_CLOSE => {
                    let payload = self.reader.payload();
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    if !self.close_sent {
                        let echo = code.map(u16::to_be_bytes);
                        let mask = self.masks.next();
                        encode_client_frame(
                            &mut self.out,
                            OP_CLOSE,
                            echo.as_ref().map_or(&[], |c| &c[..]),
                            mask,
                        );
                        self.close_sent = true;
                    }
                    self.closed = Some(code);
                    return Ok(Some(Received::Closed(code)));
                }
                _ => unreachable!("parse_header refuses other opcodes"),
            }
        }
        Ok(Some(Received::Frame(self.reader.payload())))
    }

    /// Writes pending control replies, then reads once (waiting until readable).
    /// Cancel-safe: what was written or read before a cancel is accounted for.
    pub async fn fill(&mut self) -> anyhow::Result<()> {
        self.flush_control().await?;
        if self.closed.is_some() {
            return Ok(());
        }
        self.reader.make_room(self.read_size);
        let tcp = match &mut self.stream {
            ClientStream::Tcp(tcp) => tcp,
            ClientStream::Tls(tls) => {
                // Over TLS, rustls decrypts into the same buffer's spare capacity.
                let n = tls
                    .read_buf(&mut self.reader.buf)
                    .await
                    .context("reading")?;
                if n == 0 {
                    self.closed = Some(None);
                } else {
                    self.reader.starved = false;
                }
                return Ok(());
            }
        };
        let fd = tcp.as_raw_fd();
        loop {
            // The stream's own reader slot (one waker, no waiter list to join and leave
            // on every wake-up as `readable()` does).
            std::future::poll_fn(|cx| tcp.poll_read_ready(cx))
                .await
                .context("reading")?;
            let buf = &mut self.reader.buf;
            let mut got = None;
            let r = tcp.try_io(Interest::READABLE, || {
                let spare = buf.spare_capacity_mut();
                let room = spare.len();
                // SAFETY: recv writes at most `room` bytes into the spare capacity, which
                // `set_len` then marks initialized (only the bytes written).
                let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), room, 0) };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                let n = n as usize;
                unsafe { buf.set_len(buf.len() + n) };
                got = Some(n);
                if n > 0 && n < room {
                    // A short read drained the socket: report WouldBlock so tokio clears
                    // the readiness now instead of after one more (empty) recv. An edge
                    // that came after this recv is kept (tokio compares ticks).
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match (got, r) {
                (Some(0), _) => {
                    self.closed = Some(None);
                    return Ok(());
                }
                (Some(_), _) => {
                    self.reader.starved = false;
                    return Ok(());
                }
                (None, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                (None, Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                (None, Err(e)) => return Err(anyhow::Error::new(e).context("reading")),
                (None, Ok(_)) => unreachable!("the closure sets `got` before Ok"),
            }
        }
    }

    async fn flush_control(&mut self) -> anyhow::Result<()> {
        while !self.out.is_empty() {
            let n = self.stream.write(&self.out).await.context("writing")?;
            if n == 0 {
                bail!("connection closed while writing");
            }
            self.out.drain(..n);
        }
        // TLS may hold records back until flushed (a no-op on TCP).
        self.stream.flush().await.context("writing")?;
        Ok(())
    }

    /// Sends one data frame (text or binary).
    pub async fn send(&mut self, text: bool, payload: &[u8]) -> anyhow::Result<()> {
        let mask = self.masks.next();
        encode_client_frame(
            &mut self.out,
            if text { OP_TEXT } else { OP_BINARY },
            payload,
            mask,
        );
        self.flush_control().await.context("sending")
    }

    /// Closes politely: our close (1000), then the server's close or EOF, within 2 s.
    pub async fn close(mut self) {
        let polite = async {
            if !self.close_sent {
                let mask = self.masks.next();
                encode_client_frame(&mut self.out, OP_CLOSE, &1000u16.to_be_bytes(), mask);
                self.close_sent = true;
            }
            self.flush_control().await?;
            while self.closed.is_none() {
                while let Some(r) = self.next_buffered()? {
                    if let Received::Closed(_) = r {
                        return anyhow::Ok(());
                    }
                }
                self.fill().await?;
            }
            anyhow::Ok(())
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), polite).await;
    }
}

fn check_upgrade(
    response: &httparse::Response<'_, '_>,
    key: &str,
    subprotocol: &str,
) -> anyhow::Result<()> {
    ensure!(
        response.code == Some(101),
        "upgrade answered {:?} {:?}",
        response.code,
        response.reason
    );
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    ensure!(
        header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "upgrade response without `Upgrade: websocket`"
    );
    let accept = derive_accept_key(key.as_bytes());
    ensure!(
        header("sec-websocket-accept") == Some(accept.as_str()),
        "wrong Sec-WebSocket-Accept"
    );
    let got = header("sec-websocket-protocol");
    ensure!(
        got == Some(subprotocol),
        "server did not accept subprotocol {subprotocol} (got {got:?})"
    );
    ensure!(
        header("sec-websocket-extensions").is_none(),
        "server negotiated an extension that was not offered"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unmasked server frame.
    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(n as u8),
            n @ 126..=0xffff => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// Every frame `reader` yields now, as (opcode, payload).
    fn drain(r: &mut FrameReader) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(f) = r.next_frame().unwrap() {
            out.push((f.opcode, f.payload.to_vec()));
        }
        out
    }

    fn payload(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn lengths_of_7_16_and_64_bits() {
        for n in [0, 1, 125, 126, 1000, 0xffff, 0x10000, 300_000] {
            let p = payload(n, 7);
            let f = server_frame(OP_BINARY, &p);
            let h = parse_header(&f).unwrap().unwrap();
            assert_eq!(h.payload_len, n);
            assert_eq!(
                h.header_len,
                match n {
                    0..=125 => 2,
                    126..=0xffff => 4,
                    _ => 10,
                }
            );
            let mut r = FrameReader::with_capacity(64);
            r.extend(&f);
            assert_eq!(drain(&mut r), [(OP_BINARY, p)]);
            assert!(r.starved());
        }
    }

    /// Three frames of each length class, cut at every possible point (and fed one
    /// byte at a time): the same frames come out, in order, whole.
    #[test]
    fn frames_split_across_reads_come_out_whole() {
        let frames = [
            (OP_BINARY, payload(100, 1)),
            (OP_TEXT, payload(300, 2)),
            (OP_BINARY, payload(70_000, 3)),
            (OP_BINARY, payload(0, 4)),
        ];
        let wire: Vec<u8> = frames
            .iter()
            .flat_map(|(op, p)| server_frame(*op, p))
            .collect();
        for cut in (0..wire.len())
            .step_by(97)
            .chain([1, 2, 3, 101, 102, 103, 104, 105])
        {
            let mut r = FrameReader::with_capacity(256);
            r.extend(&wire[..cut]);
            let mut got = drain(&mut r);
            r.extend(&wire[cut..]);
            got.extend(drain(&mut r));
            assert_eq!(got, frames, "cut at {cut}");
        }
        let mut r = FrameReader::with_capacity(256);
        let mut got = Vec::new();
        for b in &wire {
            r.extend(std::slice::from_ref(b));
            got.extend(drain(&mut r));
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn several_frames_in_one_read() {
        let frames: Vec<(u8, Vec<u8>)> = (0..50)
            .map(|i| (OP_BINARY, payload(i * 7, i as u8)))
            .collect();
        let wire: Vec<u8> = frames
            .iter()
            .flat_map(|(op, p)| server_frame(*op, p))
            .collect();
        let mut r = FrameReader::with_capacity(64);
        r.extend(&wire);
        assert_eq!(drain(&mut r), frames);
    }

    #[test]
    fn refused_frames() {
        let err = |bytes: &[u8]| parse_header(bytes).unwrap_err().to_string();
        // Compressed (RSV1) without deflate negotiated.
        assert!(err(&[0xc2, 0x01, 0x00]).contains("compressed"));
        // A fragmented message: first part, then a continuation.
        assert!(err(&[0x02, 0x01, 0x00]).contains("fragmented"));
        assert!(err(&[0x80, 0x01, 0x00]).contains("continuation"));
        // Masked server frame.
        assert!(err(&[0x82, 0x81, 1, 2, 3, 4, 0]).contains("masked"));
        // Oversized, control too long, unknown opcode.
        let mut big = vec![0x82, 127];
        big.extend_from_slice(&((MAX_FRAME as u64) + 1).to_be_bytes());
        assert!(err(&big).contains("limit"));
        assert!(err(&[0x89, 126, 0, 200]).contains("control frame"));
        assert!(err(&[0x83, 0]).contains("opcode"));
    }

    #[test]
    fn client_frames_are_masked_and_unmask_back() {
        for n in [0, 5, 125, 126, 0xffff, 0x10000] {
            let p = payload(n, 9);
            let mask = [0xde, 0xad, 0xbe, 0xef];
            let mut out = Vec::new();
            encode_client_frame(&mut out, OP_BINARY, &p, mask);
            assert_eq!(out[0], 0x82);
            assert_eq!(out[1] & 0x80, 0x80, "mask bit");
            let (len, at) = match out[1] & 0x7f {
                126 => (u16::from_be_bytes([out[2], out[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(out[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            assert_eq!(len, n);
            assert_eq!(out[at..at + 4], mask);
            let unmasked: Vec<u8> = out[at + 4..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(unmasked, p);
        }
    }

    /// Against a TCP peer that plays the server: frames arrive split, joined, with a
    /// ping in the middle (answered with a masked pong carrying the same payload), then
    /// a close (answered, and reported with its code).
    #[tokio::test]
    async fn a_ping_in_the_middle_is_answered_and_data_keeps_flowing() {
        use tokio::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            // The upgrade: read the request head, answer 101.
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut b).await.unwrap();
                head.push(b[0]);
            }
            let head = String::from_utf8(head).unwrap();
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap();
            let mut wire = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: parley.v1.proto\r\n\r\n",
                derive_accept_key(key.as_bytes())
            )
            .into_bytes();
            // The first frame comes in the same segment as the response head.
            wire.extend(server_frame(OP_BINARY, b"one"));
            let mut rest = server_frame(OP_BINARY, &payload(200, 1));
            rest.extend(server_frame(OP_PING, b"are you there"));
            rest.extend(server_frame(OP_BINARY, &payload(70_000, 2)));
            rest.extend(server_frame(OP_CLOSE, &4001u16.to_be_bytes()));
            s.write_all(&wire).await.unwrap();
            for chunk in rest.chunks(1000) {
                s.write_all(chunk).await.unwrap();
                s.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            // What the client wrote back: the pong, then the close answer.
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.unwrap();
            back
        });
        let stream = ClientStream::Tcp(tokio::net::TcpStream::connect(addr).await.unwrap());
        let mut ws = RawWs::handshake(stream, "localhost", "/ws", "parley.v1.proto", 512)
            .await
            .unwrap();
        let mut frames = Vec::new();
        let code = loop {
            match ws.next_buffered().unwrap() {
                Some(Received::Frame(f)) => frames.push(f.to_vec()),
                Some(Received::Closed(code)) => break code,
                None => ws.fill().await.unwrap(),
            }
        };
        assert_eq!(code, Some(4001));
        assert_eq!(
            frames,
            [b"one".to_vec(), payload(200, 1), payload(70_000, 2)]
        );
        ws.close().await;
        let back = server.await.unwrap();
        // Pong: FIN + 0xA, masked, 13 bytes of payload.
        assert_eq!(back[0], 0x80 | OP_PONG);
        assert_eq!(back[1], 0x80 | 13);
        let mask = &back[2..6];
        let pong: Vec<u8> = back[6..19]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(pong, b"are you there");
        // Then the close echoing 4001.
        assert_eq!(back[19], 0x80 | OP_CLOSE);
        assert_eq!(back[20], 0x80 | 2);
        let mask = &back[21..25];
        let code: Vec<u8> = back[25..27]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(code, 4001u16.to_be_bytes());
        assert_eq!(back.len(), 27, "nothing after the close");
    }
}
