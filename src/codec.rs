//! The two encodings of the wire protocol, and frames encoded once for many recipients.
//!
//! Protobuf frames are WebSocket binary messages; proto3-JSON frames are text messages.
//! A [`Push`] (a server frame that goes to many sessions) is encoded at most once per
//! encoding, however many sessions receive it: the per-session position is spliced in
//! front of the shared bytes (protobuf fields may appear in any order and a JSON object is
//! `{"pos":"N",` + the rest), which costs one small copy per recipient instead of a full
//! encode.

use std::sync::OnceLock;

use bytes::{BufMut, Bytes};
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::{
    deflate,
    proto::{ClientFrame, ServerFrame, server_frame::Kind},
};

/// How frames are encoded on one transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Protobuf binary (`parley.v1.proto`).
    Proto,
    /// The proto3 JSON mapping (`parley.v1.json`).
    Json,
}

impl Encoding {
    /// The WebSocket subprotocol name that selects this encoding.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Proto => "parley.v1.proto",
            Encoding::Json => "parley.v1.json",
        }
    }

    pub fn from_subprotocol(name: &str) -> Option<Self> {
        match name {
            "parley.v1.proto" => Some(Encoding::Proto),
            "parley.v1.json" => Some(Encoding::Json),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a protobuf ClientFrame: {0}")]
    Proto(#[from] prost::DecodeError),
    #[error("not a JSON ClientFrame: {0}")]
    Json(#[from] serde_json::Error),
}

pub fn decode_client(encoding: Encoding, bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
    Ok(match encoding {
        Encoding::Proto => ClientFrame::decode(bytes)?,
        Encoding::Json => serde_json::from_slice(bytes)?,
    })
}

pub fn encode_server(encoding: Encoding, frame: &ServerFrame) -> Bytes {
    match encoding {
        Encoding::Proto => Bytes::from(frame.encode_to_vec()),
        // Serializing generated types to a Vec cannot fail (no maps with non-string keys,
        // no custom serializers that error).
        Encoding::Json => Bytes::from(serde_json::to_vec(frame).unwrap_or_default()),
    }
}

pub fn encode_client(encoding: Encoding, frame: &ClientFrame) -> Bytes {
    match encoding {
        Encoding::Proto => Bytes::from(frame.encode_to_vec()),
        Encoding::Json => Bytes::from(serde_json::to_vec(frame).unwrap_or_default()),
    }
}

/// A server push shared by every session that receives it, encoded lazily and at most
/// once per encoding.
#[derive(Debug)]
pub struct Push {
    kind: Kind,
    /// Bytes this push is charged in a session queue (computed once, not per recipient).
    cost: usize,
    proto: OnceLock<Bytes>,
    json: OnceLock<Bytes>,
    /// The part of each body after the position, compressed ([`Push::deflated_frame`]).
    proto_deflated: OnceLock<Bytes>,
    json_deflated: OnceLock<Bytes>,
}

impl Push {
    pub fn new(kind: Kind) -> Self {
        // The protobuf size is a cheap, encoding-independent estimate; 64 covers the queue
        // entry and the position.
        let cost = kind.encoded_len() + 64;
        Self {
            kind,
            cost,
            proto: OnceLock::new(),
            json: OnceLock::new(),
            proto_deflated: OnceLock::new(),
            json_deflated: OnceLock::new(),
        }
    }

    /// What this push carries.
    pub fn kind(&self) -> &Kind {
        &self.kind
    }

    /// The frame without id and pos, in `encoding`.
    pub fn body(&self, encoding: Encoding) -> &Bytes {
        let cell = match encoding {
            Encoding::Proto => &self.proto,
            Encoding::Json => &self.json,
        };
        cell.get_or_init(|| {
            let frame = ServerFrame {
                id: 0,
                pos: 0,
                kind: Some(self.kind.clone()),
            };
            encode_server(encoding, &frame)
        })
    }

    /// Approximate bytes this push holds in a session queue (for the byte bounds).
    pub fn cost(&self) -> usize {
        self.cost
    }

    /// One session's frame in two parts, written one after the other: its position
    /// (`prefix`, on the stack) and the part of the body every recipient shares.
    /// Together they are exactly [`Push::frame`]'s bytes, with no allocation and no
    /// reference count touched.
    pub fn frame_parts(&self, encoding: Encoding, pos: u64) -> (FramePrefix, &[u8]) {
        let body = self.body(encoding);
        let prefix = FramePrefix::build(|out| put_prefix(out, encoding, body, pos));
        (prefix, shared_part(encoding, body))
    }

    /// Appends the complete frame for one session to `out` (`pos` spliced in front of
    /// the shared body).
    pub fn write_frame(&self, encoding: Encoding, pos: u64, out: &mut impl BufMut) {
        let body = self.body(encoding);
        put_prefix(out, encoding, body, pos);
        out.put_slice(shared_part(encoding, body));
    }

    /// The complete frame for one session: `pos` spliced in front of the shared body.
    pub fn frame(&self, encoding: Encoding, pos: u64) -> Bytes {
        let (prefix, shared) = self.frame_parts(encoding, pos);
        // Exactly the length: the frozen buffer is then a plain boxed slice (one
        // allocation; a `Vec` with spare room would get a shared header too).
        let mut out = Vec::with_capacity(prefix.len() + shared.len());
        out.extend_from_slice(prefix.as_slice());
        out.extend_from_slice(shared);
        Bytes::from(out)
    }

    /// The shared part of the body (what follows the position), compressed once per
    /// encoding with `level` (the first caller's level is kept: one server, one level).
    pub fn deflated_body(&self, encoding: Encoding, level: u32) -> &Bytes {
        let cell = match encoding {
            Encoding::Proto => &self.proto_deflated,
            Encoding::Json => &self.json_deflated,
        };
        cell.get_or_init(|| {
            deflate::compress_body(shared_part(encoding, self.body(encoding)), level)
        })
    }

    /// The frame for one session as a permessage-deflate payload (no context takeover),
    /// in two parts like [`Push::frame_parts`]: the `pos` prefix in a stored block, then
    /// the body compressed once for everyone. Together they inflate to exactly
    /// [`Push::frame`]'s bytes.
    pub fn deflated_frame_parts(
        &self,
        encoding: Encoding,
        pos: u64,
        level: u32,
    ) -> (FramePrefix, &[u8]) {
        let body = self.body(encoding);
        let shared = self.deflated_body(encoding, level);
        let plain = FramePrefix::build(|out| put_prefix(out, encoding, body, pos));
        let prefix = FramePrefix::build(|out| deflate::put_stored_block(out, plain.as_slice()));
        (prefix, shared)
    }

    /// [`Push::deflated_frame_parts`] in one buffer.
    pub fn deflated_frame(&self, encoding: Encoding, pos: u64, level: u32) -> Bytes {
        let (prefix, shared) = self.deflated_frame_parts(encoding, pos, level);
        let mut out = Vec::with_capacity(prefix.len() + shared.len());
        out.extend_from_slice(prefix.as_slice());
        out.extend_from_slice(shared);
        Bytes::from(out)
    }
}

/// The per-session first bytes of a push frame (its position), built on the stack: at
/// most 11 bytes in protobuf, 31 in JSON, 5 more as a deflate stored block.
#[derive(Clone, Copy)]
pub struct FramePrefix {
    len: u8,
    bytes: [u8; FramePrefix::MAX],
}

impl FramePrefix {
    /// Room for the longest prefix (a JSON position of 20 digits in a stored block).
    pub const MAX: usize = 40;

    fn build(write: impl FnOnce(&mut &mut [u8])) -> Self {
        let mut bytes = [0u8; Self::MAX];
        let mut rest = &mut bytes[..];
        write(&mut rest);
        let len = (Self::MAX - rest.len()) as u8;
        Self { len, bytes }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The per-session start of a push frame: the position field (protobuf: field 2 first,
/// fields may come in any order; JSON: `{"pos":"N"` and a comma when more follows).
fn put_prefix(out: &mut impl BufMut, encoding: Encoding, body: &[u8], pos: u64) {
    match encoding {
        Encoding::Proto => {
            // Field 2 (pos), wire type 0 (varint).
            prost::encoding::encode_key(2, prost::encoding::WireType::Varint, out);
            prost::encoding::encode_varint(pos, out);
        }
        Encoding::Json => {
            out.put_slice(b"{\"pos\":\"");
            out.put_slice(itoa::Buffer::new().format(pos).as_bytes());
            out.put_slice(b"\"");
            // body is `{...}` with at least the oneof field inside.
            if body.len() > 2 {
                out.put_u8(b',');
            }
        }
    }
}

/// The part of an encoded body shared by every recipient, after the prefix: all of it
/// in protobuf, everything after the opening `{` in JSON.
fn shared_part(encoding: Encoding, body: &[u8]) -> &[u8] {
    match encoding {
        Encoding::Proto => body,
        Encoding::Json => body.get(1..).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Disconnect, Message};

    fn message() -> Kind {
        Kind::Message(Message {
            room: "lobby".into(),
            seq: 7,
            sender: "ann".into(),
            client_msg_id: "c1".into(),
            body: "hi \"there\"".into(),
            metadata: [("k".to_string(), "v".to_string())].into(),
            ts: 1_700_000_000_000,
            ..Default::default()
        })
    }

    #[test]
    fn spliced_frames_decode_to_the_same_frame_in_both_encodings() {
        for kind in [message(), Kind::Disconnect(Disconnect::default())] {
            let push = Push::new(kind.clone());
            let expected = ServerFrame {
                id: 0,
                pos: 300,
                kind: Some(kind),
            };
            let proto = push.frame(Encoding::Proto, 300);
            assert_eq!(ServerFrame::decode(proto).unwrap(), expected);
            let json = push.frame(Encoding::Json, 300);
            let parsed: ServerFrame = serde_json::from_slice(&json).unwrap();
            assert_eq!(parsed, expected);
        }
    }

    #[test]
    fn deflated_frames_inflate_to_the_spliced_frame_and_share_the_compressed_body() {
        use flate2::{Decompress, FlushDecompress};
        let inflate = |payload: &[u8]| {
            let mut input = payload.to_vec();
            input.extend_from_slice(&[0, 0, 0xff, 0xff]);
            let mut out = Vec::with_capacity(1 << 16);
            Decompress::new(false)
                .decompress_vec(&input, &mut out, FlushDecompress::Sync)
                .unwrap();
            out
        };
        for kind in [message(), Kind::Disconnect(Disconnect::default())] {
            let push = Push::new(kind);
            for encoding in [Encoding::Proto, Encoding::Json] {
                let shared = push.deflated_body(encoding, 6).clone();
                for pos in [1, 300, u64::MAX] {
                    let payload = push.deflated_frame(encoding, pos, 6);
                    assert!(payload.ends_with(&shared));
                    assert_eq!(inflate(&payload), push.frame(encoding, pos));
                }
                assert_eq!(push.deflated_body(encoding, 6).as_ptr(), shared.as_ptr());
            }
        }
    }

    #[test]
    fn body_is_encoded_once() {
        let push = Push::new(message());
        let a = push.body(Encoding::Json).as_ptr();
        let b = push.body(Encoding::Json).as_ptr();
        assert_eq!(a, b);
    }
}
