//! What crosses Redis: one envelope per publish.
//!
//! ```text
//! u8  version (1)
//! u64 origin instance id      — a receiver skips its own publishes
//! i64 sent at, Unix ms        — receive lag metric
//! u64 room seq (0: none)      — the receiver's ordering key for room messages
//! u8  target tag, then its strings (u16 length + UTF-8 each)
//! ..  the push: a protobuf ServerFrame (id and pos unset), encoded once per publish
//! ```
//!
//! A membership notice (version 2) tells the instances where a user has sessions that
//! the user joined or left a room elsewhere, so they route the room to those sessions:
//!
//! ```text
//! u8  version (2)
//! u64 origin instance id
//! u8  1 joined / 0 left
//! u64 the room's last seq at the change
//! str user, str room
//! ```
//!
//! Integers are big-endian. Owns: the envelope format. Not: channels (`redis`).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;

use crate::{
    codec::{Encoding, Push},
    delivery::Target,
    proto::{ServerFrame, server_frame::Kind},
};

const VERSION: u8 = 1;
const MEMBER: u8 = 2;

/// What arrives on a channel.
#[derive(Debug)]
pub enum Incoming {
    Push(Envelope),
    Member(MemberNotice),
}

/// A user joined or left a room (see the module comment).
#[derive(Debug, PartialEq, Eq)]
pub struct MemberNotice {
    pub origin: u64,
    pub joined: bool,
    pub last_seq: u64,
    pub user: String,
    pub room: String,
}

pub fn encode_member(n: &MemberNotice) -> Bytes {
    let mut out = BytesMut::with_capacity(32 + n.user.len() + n.room.len());
    out.put_u8(MEMBER);
    out.put_u64(n.origin);
    out.put_u8(n.joined as u8);
    out.put_u64(n.last_seq);
    put_str(&mut out, &n.user);
    put_str(&mut out, &n.room);
    out.freeze()
}

pub fn decode(buf: &[u8]) -> Result<Incoming, WireError> {
    match buf.first() {
        Some(&MEMBER) => {
            let mut buf = &buf[1..];
            if buf.remaining() < 8 + 1 + 8 {
                return Err(WireError::Truncated);
            }
            let origin = buf.get_u64();
            let joined = buf.get_u8() == 1;
            let last_seq = buf.get_u64();
            Ok(Incoming::Member(MemberNotice {
                origin,
                joined,
                last_seq,
                user: get_str(&mut buf)?,
                room: get_str(&mut buf)?,
            }))
        }
        _ => decode_push(buf).map(Incoming::Push),
    }
}

/// A decoded envelope.
#[derive(Debug)]
pub struct Envelope {
    pub origin: u64,
    pub sent_ms: i64,
    pub seq: u64,
    pub target: Target,
    pub kind: Kind,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("envelope truncated")]
    Truncated,
    #[error("unknown envelope version or target {0}")]
    Unknown(u8),
    #[error("bad string in envelope")]
    Utf8,
    #[error("bad push in envelope: {0}")]
    Push(#[from] prost::DecodeError),
    #[error("envelope without a push")]
    Empty,
}

/// The room seq of a push, when it is a chat message.
pub fn message_seq(push: &Push, target: &Target) -> u64 {
    match (target, push.kind()) {
        (Target::Room(_), Kind::Message(m)) => m.seq,
        _ => 0,
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    // Room names and user ids are far below 64 KiB (config bounds them).
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.put_u16(s.len() as u16);
    out.put_slice(s);
}

fn get_str(buf: &mut &[u8]) -> Result<String, WireError> {
    if buf.remaining() < 2 {
        return Err(WireError::Truncated);
    }
    let n = buf.get_u16() as usize;
    if buf.remaining() < n {
        return Err(WireError::Truncated);
    }
    let s = std::str::from_utf8(&buf[..n]).map_err(|_| WireError::Utf8)?;
    let s = s.to_string();
    buf.advance(n);
    Ok(s)
}

pub fn encode(origin: u64, sent_ms: i64, target: &Target, push: &Push) -> Bytes {
    let body = push.body(Encoding::Proto);
    let mut out = BytesMut::with_capacity(body.len() + 64);
    out.put_u8(VERSION);
    out.put_u64(origin);
    out.put_i64(sent_ms);
    out.put_u64(message_seq(push, target));
    match target {
        Target::Room(room) => {
            out.put_u8(0);
            put_str(&mut out, room);
        }
        Target::RoomExcept { room, user } => {
            out.put_u8(1);
            put_str(&mut out, room);
            put_str(&mut out, user);
        }
        Target::CoMembers { rooms, user } => {
            out.put_u8(2);
            put_str(&mut out, user);
            out.put_u16(rooms.len().min(u16::MAX as usize) as u16);
            for r in rooms.iter().take(u16::MAX as usize) {
                put_str(&mut out, r);
            }
        }
        Target::User(user) => {
            out.put_u8(3);
            put_str(&mut out, user);
        }
        Target::All => out.put_u8(4),
    }
    out.put_slice(body);
    out.freeze()
}

fn decode_push(mut buf: &[u8]) -> Result<Envelope, WireError> {
    if buf.remaining() < 1 + 8 + 8 + 8 + 1 {
        return Err(WireError::Truncated);
    }
    let version = buf.get_u8();
    if version != VERSION {
        return Err(WireError::Unknown(version));
    }
    let origin = buf.get_u64();
    let sent_ms = buf.get_i64();
    let seq = buf.get_u64();
    let target = match buf.get_u8() {
        0 => Target::Room(get_str(&mut buf)?),
        1 => Target::RoomExcept {
            room: get_str(&mut buf)?,
            user: get_str(&mut buf)?,
        },
        2 => {
            let user = get_str(&mut buf)?;
            if buf.remaining() < 2 {
                return Err(WireError::Truncated);
            }
            let n = buf.get_u16() as usize;
            let mut rooms = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                rooms.push(get_str(&mut buf)?);
            }
            Target::CoMembers { rooms, user }
        }
        3 => Target::User(get_str(&mut buf)?),
        4 => Target::All,
        t => return Err(WireError::Unknown(t)),
    };
    let frame = ServerFrame::decode(buf)?;
    Ok(Envelope {
        origin,
        sent_ms,
        seq,
        target,
        kind: frame.kind.ok_or(WireError::Empty)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    #[test]
    fn every_target_round_trips() {
        let push = Push::new(Kind::Message(proto::Message {
            room: "lobby".into(),
            seq: 42,
            body: "hi".into(),
            ..Default::default()
        }));
        for target in [
            Target::Room("lobby".into()),
            Target::RoomExcept {
                room: "lobby".into(),
                user: "ann".into(),
            },
            Target::CoMembers {
                rooms: vec!["a".into(), "b".into()],
                user: "ann".into(),
            },
            Target::User("bob".into()),
            Target::All,
        ] {
            let bytes = encode(7, 1000, &target, &push);
            let Incoming::Push(env) = decode(&bytes).unwrap() else {
                panic!("not a push")
            };
            assert_eq!(env.origin, 7);
            assert_eq!(env.sent_ms, 1000);
            assert_eq!(env.target, target);
            let want = if matches!(target, Target::Room(_)) {
                42
            } else {
                0
            };
            assert_eq!(env.seq, want);
            let Kind::Message(m) = env.kind else {
                panic!("not a message")
            };
            assert_eq!((m.seq, m.body.as_str()), (42, "hi"));
        }
    }

    #[test]
    fn member_notices_round_trip() {
        let n = MemberNotice {
            origin: 9,
            joined: true,
            last_seq: 12,
            user: "cat".into(),
            room: "dm:ann:cat".into(),
        };
        let Incoming::Member(back) = decode(&encode_member(&n)).unwrap() else {
            panic!("not a member notice")
        };
        assert_eq!(back, n);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &b""[..],
            b"\x01",
            b"\x02aaaaaaaaaaaaaaaaaaa",
            &[1; 30],
            &[2; 30],
        ] {
            assert!(decode(bytes).is_err());
        }
    }
}
