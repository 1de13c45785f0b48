//! Decoding server frames on the generator side.
//!
//! Replies are rare and decoded fully ([`decode`]). Message pushes are the hot path (a
//! fan-out run receives hundreds of thousands per second on one core), so [`peek`] reads
//! only what the checks need — `pos`, `seq` and the body — without allocating: a walk over
//! the protobuf fields, or a borrowed serde view of the proto3 JSON. A unit test keeps
//! both in agreement with the full decode.
//!
//! Message bodies written by the generator start with the send time: nanoseconds since
//! the run's shared start `Instant`, then `:` and padding ([`body`], [`body_sent_at`]).

use std::borrow::Cow;

use bytes::Bytes;

use anyhow::Context;
use parley::{codec::Encoding, proto::ServerFrame};
use prost::Message as _;
use serde::{Deserialize, Deserializer, de};

/// What a client connection yields (`transport::Connection::recv`).
#[derive(Debug)]
pub enum Incoming {
    /// One encoded server frame (decode with this module).
    Frame(Bytes),
    /// The server closed the transport (with this close code, if it gave one).
    Closed(Option<u16>),
}

/// What a connection yields on the fast path (`transport::Connection::next_buffered`):
/// a frame lent from the connection's buffer, or the close.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<'a> {
    Frame(&'a [u8]),
    Closed(Option<u16>),
}

/// Decodes any server frame completely.
pub fn decode(encoding: Encoding, bytes: &[u8]) -> anyhow::Result<ServerFrame> {
    Ok(match encoding {
        Encoding::Proto => ServerFrame::decode(bytes).context("server protobuf frame")?,
        Encoding::Json => serde_json::from_slice(bytes).context("server JSON frame")?,
    })
}

/// The parts of a pushed chat message the generator checks. The body is not checked
/// for UTF-8 here (only its timestamp is read, [`body_sent_at`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagePush<'a> {
    pub pos: u64,
    pub seq: u64,
    pub body: Cow<'a, [u8]>,
}

/// A quick look at a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Peek<'a> {
    /// A chat message push.
    Message(MessagePush<'a>),
    /// Another push (membership, presence ...), with its session position.
    OtherPush { pos: u64 },
    /// A reply or anything the fast path does not understand: decode it fully.
    Other,
}

/// Looks at a frame without decoding all of it. Anything that is not a message push
/// (or that the fast path does not understand) is [`Peek::Other`].
pub fn peek(encoding: Encoding, bytes: &[u8]) -> Peek<'_> {
    match encoding {
        Encoding::Proto => peek_proto(bytes),
        Encoding::Json => peek_json(bytes),
    }
    .unwrap_or(Peek::Other)
}

// Field numbers from proto/parley/v1/frames.proto.
const SERVER_FRAME_POS: u64 = 2;
const SERVER_FRAME_MESSAGE: u64 = 30;
const MESSAGE_SEQ: u64 = 2;
const MESSAGE_BODY: u64 = 5;

/// A protobuf varint (at most ten bytes), advancing `buf`. Written here rather than
/// taken from prost: this walk runs once per delivery, and the one-byte case is most.
#[inline]
fn varint(buf: &mut &[u8]) -> Option<u64> {
    let (&first, rest) = buf.split_first()?;
    if first < 0x80 {
        *buf = rest;
        return Some(u64::from(first));
    }
    let mut value = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            *buf = &buf[i + 1..];
            return Some(value);
        }
    }
    None
}

const VARINT: u8 = 0;
const SIXTY_FOUR_BIT: u8 = 1;
const LENGTH_DELIMITED: u8 = 2;
const THIRTY_TWO_BIT: u8 = 5;

/// A field key: (field number, wire type).
#[inline]
fn key(buf: &mut &[u8]) -> Option<(u64, u8)> {
    let k = varint(buf)?;
    Some((k >> 3, (k & 7) as u8))
}

fn skip(wire_type: u8, buf: &mut &[u8]) -> Option<()> {
    let n = match wire_type {
        VARINT => {
            varint(buf)?;
            0
        }
        SIXTY_FOUR_BIT => 8,
        THIRTY_TWO_BIT => 4,
        LENGTH_DELIMITED => usize::try_from(varint(buf)?).ok()?,
        _ => return None,
    };
    *buf = buf.get(n..)?;
    Some(())
}

fn length_delimited<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = usize::try_from(varint(buf)?).ok()?;
    if buf.len() < n {
        return None;
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Some(head)
}

fn peek_proto(bytes: &[u8]) -> Option<Peek<'_>> {
    let mut buf = bytes;
    let mut pos = 0;
    let mut message = None;
    while !buf.is_empty() {
        let (tag, wt) = key(&mut buf)?;
        match (tag, wt) {
            (SERVER_FRAME_POS, VARINT) => pos = varint(&mut buf)?,
            (SERVER_FRAME_MESSAGE, LENGTH_DELIMITED) => message = Some(length_delimited(&mut buf)?),
            _ => skip(wt, &mut buf)?,
        }
    }
    let Some(mut m) = message else {
        return (pos > 0).then_some(Peek::OtherPush { pos });
    };
    let mut seq = 0;
    let mut body: &[u8] = b"";
    // parley writes fields in number order: once the body is read, the seq was too
    // (the unit test below keeps this in agreement with the full decode).
    while !m.is_empty() {
        let (tag, wt) = key(&mut m)?;
        match (tag, wt) {
            (MESSAGE_SEQ, VARINT) => seq = varint(&mut m)?,
            (MESSAGE_BODY, LENGTH_DELIMITED) => {
                body = length_delimited(&mut m)?;
                break;
            }
            _ => skip(wt, &mut m)?,
        }
    }
    Some(Peek::Message(MessagePush {
        pos,
        seq,
        body: Cow::Borrowed(body),
    }))
}

/// A u64 in proto3 JSON: a string ("42") or, leniently, a number.
fn u64_any<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct V;
    impl de::Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a u64 as a string or number")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            v.parse().map_err(E::custom)
        }
    }
    d.deserialize_any(V)
}

#[derive(Deserialize)]
struct JsonFrame<'a> {
    #[serde(default, deserialize_with = "u64_any")]
    pos: u64,
    #[serde(borrow, default)]
    message: Option<JsonMessage<'a>>,
}

#[derive(Deserialize)]
struct JsonMessage<'a> {
    #[serde(default, deserialize_with = "u64_any")]
    seq: u64,
    #[serde(borrow, default)]
    body: Cow<'a, str>,
}

fn peek_json(bytes: &[u8]) -> Option<Peek<'_>> {
    let f: JsonFrame<'_> = serde_json::from_slice(bytes).ok()?;
    let Some(m) = f.message else {
        return (f.pos > 0).then_some(Peek::OtherPush { pos: f.pos });
    };
    Some(Peek::Message(MessagePush {
        pos: f.pos,
        seq: m.seq,
        body: match m.body {
            Cow::Borrowed(b) => Cow::Borrowed(b.as_bytes()),
            Cow::Owned(b) => Cow::Owned(b.into_bytes()),
        },
    }))
}

/// A message body of `len` bytes (at least the timestamp) carrying its send time.
pub fn body(sent_at_nanos: u64, len: usize) -> String {
    let mut s = format!("{sent_at_nanos}:");
    if s.len() < len {
        s.extend(std::iter::repeat_n('x', len - s.len()));
    }
    s
}

/// The send time a [`body`] carries: its decimal digits up to the first `:` (at most
/// 19, so the sum cannot overflow: nanoseconds since the run started need far fewer).
pub fn body_sent_at(body: &[u8]) -> Option<u64> {
    let mut n: u64 = 0;
    for (i, &b) in body.iter().enumerate().take(20) {
        let digit = b.wrapping_sub(b'0');
        if digit < 10 {
            n = n * 10 + u64::from(digit);
        } else {
            return (b == b':' && i > 0).then_some(n);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley::{
        codec::Push,
        proto::{Message, Sent, server_frame::Kind},
    };

    fn message(seq: u64, body: &str) -> Kind {
        Kind::Message(Message {
            room: "lobby".into(),
            seq,
            sender: "ann".into(),
            client_msg_id: "c-1".into(),
            body: body.into(),
            metadata: [("k".to_string(), "v".to_string())].into(),
            // ts and any newer fields: defaults.
            ..Default::default()
        })
    }

    #[test]
    fn peek_agrees_with_the_full_decode() {
        for encoding in [Encoding::Proto, Encoding::Json] {
            for (pos, seq) in [(1, 1), (300, 70_000), (u64::MAX, u64::MAX - 1)] {
                let b = body(123_456_789, 100);
                let push = Push::new(message(seq, &b));
                let bytes = push.frame(encoding, pos);
                let full = decode(encoding, &bytes).unwrap();
                assert_eq!(full.pos, pos);
                let Peek::Message(m) = peek(encoding, &bytes) else {
                    panic!("{encoding:?}: not seen as a message");
                };
                assert_eq!((m.pos, m.seq), (pos, seq), "{encoding:?}");
                assert_eq!(m.body, b.as_bytes());
                assert_eq!(body_sent_at(&m.body), Some(123_456_789));
                assert_eq!(m.body.len(), 100);
            }
        }
    }

    #[test]
    fn varints_agree_with_prost() {
        for v in [
            0,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut bytes = Vec::new();
            prost::encoding::encode_varint(v, &mut bytes);
            bytes.push(0xaa);
            let mut buf = &bytes[..];
            assert_eq!(varint(&mut buf), Some(v));
            assert_eq!(buf, [0xaa]);
        }
        // Truncated, and eleven continuation bytes.
        assert_eq!(varint(&mut &[0x80u8, 0x80][..]), None);
        assert_eq!(varint(&mut &[0xffu8; 11][..]), None);
    }

    #[test]
    fn send_times_are_read_back() {
        for at in [0, 7, 123_456_789, 9_999_999_999_999_999_999] {
            assert_eq!(body_sent_at(body(at, 100).as_bytes()), Some(at));
            assert_eq!(body_sent_at(body(at, 0).as_bytes()), Some(at));
        }
        for bad in ["", ":", "12", "12x:", "x12:", "10000000000000000000:"] {
            assert_eq!(body_sent_at(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn replies_are_not_messages() {
        for encoding in [Encoding::Proto, Encoding::Json] {
            let reply = ServerFrame {
                id: 9,
                pos: 0,
                kind: Some(Kind::Sent(Sent {
                    room: "r".into(),
                    seq: 3,
                    ..Default::default()
                })),
            };
            let bytes = parley::codec::encode_server(encoding, &reply);
            assert_eq!(peek(encoding, &bytes), Peek::Other);
            assert_eq!(decode(encoding, &bytes).unwrap(), reply);
        }
        assert_eq!(peek(Encoding::Proto, b"\xff\xff"), Peek::Other);
        // Other pushes are recognised by their position alone.
        for encoding in [Encoding::Proto, Encoding::Json] {
            let push = Push::new(Kind::Pong(parley::proto::Pong { ts: 5 }));
            let bytes = push.frame(encoding, 77);
            assert_eq!(peek(encoding, &bytes), Peek::OtherPush { pos: 77 });
        }
        assert_eq!(peek(Encoding::Json, b"{nope"), Peek::Other);
    }
}
