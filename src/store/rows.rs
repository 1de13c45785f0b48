//! What every backend shares when it reads rows back: the column lists, the mapping from
//! a row to a domain type, and history paging. A backend implements [`Columns`] for its
//! row type (typed reads that fail with an error, never a panic) and keeps only its SQL;
//! the shape of a [`Message`], a [`RoomState`] or a [`Page`] is decided here, once.
//!
//! The column lists name the tables' aliases (`m` messages, `r` rooms): queries select
//! `FROM messages m` and `FROM members m JOIN rooms r` on every backend.

use std::sync::Arc;

use super::{FileRecord, NewMessage, Page, Range, ReadMarker, RoomMeta};
use crate::proto::{Message, RoomState};

/// One result row, read by column position.
pub(crate) trait Columns {
    type Error;
    fn text(&self, i: usize) -> Result<String, Self::Error>;
    fn int(&self, i: usize) -> Result<i64, Self::Error>;
    fn flag(&self, i: usize) -> Result<bool, Self::Error>;
    /// The error for column `i` holding `value`, which does not fit the field it maps to.
    fn out_of_range(&self, i: usize, value: i64) -> Self::Error;

    /// A seq, count or size: never negative.
    fn count(&self, i: usize) -> Result<u64, Self::Error> {
        let v = self.int(i)?;
        u64::try_from(v).map_err(|_| self.out_of_range(i, v))
    }

    /// An image side.
    fn side(&self, i: usize) -> Result<u32, Self::Error> {
        let v = self.int(i)?;
        u32::try_from(v).map_err(|_| self.out_of_range(i, v))
    }
}

/// The columns [`message`] reads, from `messages m`.
pub(crate) const MESSAGE_COLUMNS: &str =
    "m.room, m.seq, m.sender, m.client_msg_id, m.body, m.metadata, m.ts, m.attachments";

pub(crate) fn message<R: Columns>(r: &R) -> Result<Message, R::Error> {
    Ok(Message {
        room: r.text(0)?,
        seq: r.count(1)?,
        sender: r.text(2)?,
        client_msg_id: r.text(3)?,
        body: r.text(4)?,
        metadata: decode_extra(&r.text(5)?),
        ts: r.int(6)?,
        attachments: decode_extra(&r.text(7)?),
    })
}

/// The columns [`room_meta`] reads, from `rooms`.
pub(crate) const ROOM_COLUMNS: &str = "private, last_seq, members";

/// A room's [`ROOM_COLUMNS`] and then whether a user is a member (`EXISTS (...)`).
pub(crate) fn room_for<R: Columns>(r: &R) -> Result<(RoomMeta, bool), R::Error> {
    Ok((room_meta(r)?, r.flag(3)?))
}

pub(crate) fn room_meta<R: Columns>(r: &R) -> Result<RoomMeta, R::Error> {
    Ok(RoomMeta {
        private: r.flag(0)?,
        last_seq: r.count(1)?,
        members: r.count(2)?,
    })
}

/// The columns [`room_state`] reads, from `members m JOIN rooms r`.
pub(crate) const ROOM_STATE_COLUMNS: &str = "r.name, r.last_seq, m.read_seq, r.private, r.members";

/// A room as `user` sees it in the room list.
pub(crate) fn room_state<R: Columns>(r: &R, user: &str) -> Result<RoomState, R::Error> {
    let room = r.text(0)?;
    let last_seq = r.count(1)?;
    let read_seq = r.count(2)?;
    Ok(RoomState {
        dm_peer: super::dm_peer(&room, user).unwrap_or_default(),
        room,
        last_seq,
        read_seq,
        unread: last_seq.saturating_sub(read_seq),
        private: r.flag(3)?,
        members: r.count(4)?,
    })
}

/// The columns [`public_room`] reads, from `rooms r`.
pub(crate) const PUBLIC_ROOM_COLUMNS: &str = "r.name, r.last_seq, r.members";

/// A public room as the room browser lists it, to anyone: no read marker.
pub(crate) fn public_room<R: Columns>(r: &R) -> Result<RoomState, R::Error> {
    Ok(RoomState {
        room: r.text(0)?,
        last_seq: r.count(1)?,
        members: r.count(2)?,
        ..Default::default()
    })
}

/// A read marker from (the member's `read_seq`, the room's `last_seq`, whether the call
/// moved it).
pub(crate) fn read_marker<R: Columns>(r: &R) -> Result<ReadMarker, R::Error> {
    let seq = r.count(0)?;
    Ok(ReadMarker {
        seq,
        unread: r.count(1)?.saturating_sub(seq),
        moved: r.flag(2)?,
    })
}

/// The columns [`file`] reads (and an insert writes, in this order), from `files`.
pub(crate) const FILE_COLUMNS: &str =
    "id, owner, name, content_type, size, sha256, width, height, blurhash, created_at";

pub(crate) fn file<R: Columns>(r: &R) -> Result<FileRecord, R::Error> {
    Ok(FileRecord {
        id: r.text(0)?,
        owner: r.text(1)?,
        name: r.text(2)?,
        content_type: r.text(3)?,
        size: r.count(4)?,
        sha256: r.text(5)?,
        width: r.side(6)?,
        height: r.side(7)?,
        blurhash: r.text(8)?,
        created_at: r.int(9)?,
    })
}

/// A history read as a backend runs it: `fetch` rows (one past the limit, to learn whether
/// there are more) past `bound`, newest first when reading backwards. The backend picks
/// its SQL by `backwards` and hands the rows to [`History::page`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct History {
    /// Reading [`Range::Before`]: `seq < bound ORDER BY seq DESC`; else `seq > bound
    /// ORDER BY seq`.
    pub backwards: bool,
    pub bound: i64,
    pub fetch: i64,
    limit: usize,
}

impl History {
    pub fn new(range: Range, limit: usize) -> Self {
        // Past any seq a room can have: an empty page (or the whole log), never a wrap.
        let clamp = |seq: u64| seq.min(i64::MAX as u64) as i64;
        let (backwards, bound) = match range {
            Range::After(after) => (false, clamp(after)),
            Range::Before(before) => (true, clamp(before)),
        };
        Self {
            backwards,
            bound,
            fetch: (limit as i64).saturating_add(1),
            limit,
        }
    }

    /// The page from the rows the query returned, oldest first.
    pub fn page(self, mut rows: Vec<Message>) -> Page {
        let more = rows.len() > self.limit;
        rows.truncate(self.limit);
        if self.backwards {
            rows.reverse();
        }
        Page {
            messages: rows.into_iter().map(Arc::new).collect(),
            more,
        }
    }
}

impl NewMessage {
    /// The message as appended with `seq`.
    pub(crate) fn into_message(self, seq: u64) -> Message {
        Message {
            room: self.room,
            seq,
            sender: self.sender,
            client_msg_id: self.client_msg_id,
            body: self.body,
            metadata: self.metadata,
            ts: self.ts,
            attachments: self.attachments,
        }
    }

    /// How every backend keeps a message's metadata and attachments: JSON text, empty
    /// when there are none.
    pub(crate) fn extras(&self) -> (String, String) {
        fn json<T: serde::Serialize>(empty: bool, value: &T) -> String {
            if empty {
                String::new()
            } else {
                serde_json::to_string(value).unwrap_or_default()
            }
        }
        (
            json(self.metadata.is_empty(), &self.metadata),
            json(self.attachments.is_empty(), &self.attachments),
        )
    }
}

/// Reads back what [`NewMessage::extras`] wrote (empty text is the empty value).
fn decode_extra<T: serde::de::DeserializeOwned + Default>(text: &str) -> T {
    if text.is_empty() {
        T::default()
    } else {
        serde_json::from_str(text).unwrap_or_default()
    }
}
