//! permessage-deflate (RFC 7692) payloads built once for many recipients.
//!
//! A broadcast push goes to every member of a room with that session's own `pos` in front
//! of a body shared by all of them (the codec's push). Compressing the whole frame
//! per recipient would cost one compression per delivery. Instead the body is compressed
//! once, and each recipient gets:
//!
//! ```text
//! [stored DEFLATE block: the per-session prefix] [the shared compressed body]
//! ```
//!
//! This is a valid permessage-deflate message for a connection without server context
//! takeover (parley always answers `server_no_context_takeover`), because:
//!
//! - a message's payload is then a self-contained run of DEFLATE blocks, started at a
//!   byte boundary, with the sync flush's trailing `00 00 ff ff` removed (RFC 7692
//!   section 7.2.1); the receiver appends those four bytes back before inflating;
//! - a stored (uncompressed, `BTYPE=00`) block that is not final is three header bits,
//!   padding to the byte boundary, `LEN`, `NLEN` and the bytes: it starts and ends on a
//!   byte boundary, so any DEFLATE data can follow it;
//! - the body is compressed by a compressor with no history (a fresh or reset stream), so
//!   none of its back-references reaches before its own first byte: the prefix in front
//!   changes nothing the body refers to. Its window is the default 32 KiB (15 bits), so it
//!   is only valid for a connection that did not ask for a smaller `server_max_window_bits`
//!   ([`shared_body_allowed`]); such a connection is compressed per message by the
//!   WebSocket library instead.
//!
//! The compressor's state (a few hundred KiB with zlib's defaults) lives once per thread,
//! reset before each body, never per connection.

use std::cell::RefCell;

use bytes::{BufMut, Bytes};
use flate2::{Compress, Compression, FlushCompress, Status};

/// What a sync flush ends with; RFC 7692 removes it from the payload.
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

thread_local! {
    /// One raw-DEFLATE compressor per thread (with the level it was built for), reset
    /// before every use: compressing a body never depends on what came before.
    static COMPRESSOR: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
}

/// `input` compressed as the tail of a permessage-deflate message: raw DEFLATE from a
/// compressor without history, ended with a sync flush whose `00 00 ff ff` is removed.
/// `level` is 0–9 (clamped).
pub fn compress_body(input: &[u8], level: u32) -> Bytes {
    let level = level.min(9);
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let compress = match &mut *cell {
            Some((l, c)) if *l == level => {
                c.reset();
                c
            }
            other => {
                &mut other
                    .insert((level, Compress::new(Compression::new(level), false)))
                    .1
            }
        };
        let mut out: Vec<u8> = Vec::with_capacity(input.len() / 2 + 64);
        let start_in = compress.total_in();
        loop {
            let consumed = (compress.total_in() - start_in) as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(256));
            }
            // Compressing into a Vec with spare room cannot fail; a corrupt state would
            // be a bug in the compressor, and then an empty result is sent uncompressed
            // by the caller's fallback (see `Push::deflated_frame`).
            match compress.compress_vec(&input[consumed..], &mut out, FlushCompress::Sync) {
                Ok(Status::Ok | Status::BufError) => {}
                Ok(Status::StreamEnd) | Err(_) => return Bytes::new(),
            }
            let done = (compress.total_in() - start_in) as usize == input.len();
            if done && out.ends_with(&SYNC_TAIL) && out.capacity() > out.len() {
                out.truncate(out.len() - SYNC_TAIL.len());
                return Bytes::from(out);
            }
        }
    })
}

/// Appends `prefix` as one non-final stored DEFLATE block (at most 65,535 bytes; a
/// session prefix is a few dozen).
pub fn put_stored_block(out: &mut impl BufMut, prefix: &[u8]) {
    debug_assert!(prefix.len() <= usize::from(u16::MAX));
    let len = prefix.len() as u16;
    // BFINAL=0, BTYPE=00, then padding to the byte boundary: one zero byte.
    out.put_u8(0x00);
    out.put_u16_le(len);
    out.put_u16_le(!len);
    out.put_slice(prefix);
}

/// The negotiated permessage-deflate parameters, read from the server's
/// `Sec-WebSocket-Extensions` response header (what both sides agreed to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Negotiated {
    /// `server_max_window_bits`, when the answer limits the server's window.
    pub server_max_window_bits: Option<u8>,
    /// Whether the client must reset its context after each message.
    pub client_no_context_takeover: bool,
    /// Whether the server resets its context after each message.
    pub server_no_context_takeover: bool,
}

impl Negotiated {
    /// Parses the response value; `None` when it does not accept permessage-deflate.
    pub fn from_response(value: &str) -> Option<Self> {
        let ext = value.split(',').map(str::trim).find(|e| {
            e.split(';')
                .next()
                .is_some_and(|n| n.trim() == "permessage-deflate")
        })?;
        let mut n = Negotiated::default();
        for param in ext.split(';').skip(1) {
            let mut kv = param.splitn(2, '=');
            let key = kv.next().unwrap_or("").trim();
            let value = kv.next().map(|v| v.trim().trim_matches('"'));
            match key {
                "server_no_context_takeover" => n.server_no_context_takeover = true,
                "client_no_context_takeover" => n.client_no_context_takeover = true,
                "server_max_window_bits" => {
                    n.server_max_window_bits = value.and_then(|v| v.parse().ok());
                }
                _ => {}
            }
        }
        Some(n)
    }
}

/// Whether a connection with these terms can take the shared compressed body: the server
/// keeps no context (each message stands alone) and its window was not limited below the
/// 15 bits the shared body is compressed with.
pub fn shared_body_allowed(n: &Negotiated) -> bool {
    n.server_no_context_takeover && n.server_max_window_bits.is_none_or(|b| b >= 15)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use flate2::{Decompress, FlushDecompress};

    /// Inflates a permessage-deflate payload the way a receiver does: append the sync
    /// tail, inflate raw DEFLATE with a fresh state.
    fn inflate(payload: &[u8]) -> Vec<u8> {
        let mut input = payload.to_vec();
        input.extend_from_slice(&SYNC_TAIL);
        let mut d = Decompress::new(false);
        let mut out = Vec::with_capacity(1 << 20);
        d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap();
        assert_eq!(d.total_in() as usize, input.len(), "all input consumed");
        out
    }

    #[test]
    fn stored_prefix_then_shared_body_inflates_to_prefix_plus_body() {
        let body = "the quick brown fox jumps over the lazy dog; ".repeat(50);
        let shared = compress_body(body.as_bytes(), 6);
        assert!(
            shared.len() < body.len() / 4,
            "compressed: {}",
            shared.len()
        );
        for prefix in [&b"\x10\x01"[..], b"{\"pos\":\"123456789\",", &[0u8; 300]] {
            let mut msg = BytesMut::new();
            put_stored_block(&mut msg, prefix);
            msg.put_slice(&shared);
            let mut expected = prefix.to_vec();
            expected.extend_from_slice(body.as_bytes());
            assert_eq!(inflate(&msg), expected);
        }
    }

    #[test]
    fn bodies_do_not_depend_on_earlier_ones() {
        let a = compress_body(b"hello hello hello hello", 6);
        let _ = compress_body(b"something else entirely, hello hello", 6);
        let b = compress_body(b"hello hello hello hello", 6);
        assert_eq!(a, b);
        assert_eq!(inflate(&compress_body(b"", 6)), b"");
    }

    #[test]
    fn negotiated_terms_are_read_from_the_response() {
        let n = Negotiated::from_response(
            "permessage-deflate; server_no_context_takeover; client_max_window_bits=10",
        )
        .unwrap();
        assert!(n.server_no_context_takeover && !n.client_no_context_takeover);
        assert!(shared_body_allowed(&n));
        let n = Negotiated::from_response(
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=10",
        )
        .unwrap();
        assert!(!shared_body_allowed(&n));
        assert_eq!(Negotiated::from_response("x-webkit-deflate-frame"), None);
    }
}
