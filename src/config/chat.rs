//! `[chat]`: sizes of what clients send and read.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, HOUR, KIB, MIB, count, duration};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// Largest message body, in bytes (UTF-8).
    pub max_body_bytes: usize,
    /// Longest room name, in bytes. Names are 1..=N of `[A-Za-z0-9_.:@-]`.
    pub max_room_name_bytes: usize,
    /// Longest `client_msg_id`, in bytes.
    pub max_client_msg_id_bytes: usize,
    /// Most metadata entries on one message.
    pub max_metadata_entries: usize,
    /// History page size when the request gives none.
    pub history_default_limit: u32,
    /// Largest history page and per-room sync batch.
    pub history_max_limit: u32,
    /// Rooms with more members than this do not broadcast membership changes, typing,
    /// read receipts or presence (each would cost one push per member); joiners and
    /// readers still get their own events.
    pub large_room_members: u64,
    /// A user's typing events in one room are accepted at most this often.
    #[serde(with = "humantime_serde")]
    pub typing_interval: Duration,
    /// Most bytes of messages (protobuf size) in one `history` or `sync` reply; past it
    /// the reply is cut and says `more`.
    pub max_reply_bytes: usize,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * 1024,
            max_room_name_bytes: 128,
            max_client_msg_id_bytes: 128,
            max_metadata_entries: 16,
            history_default_limit: 50,
            history_max_limit: 500,
            large_room_members: 500,
            typing_interval: Duration::from_millis(1000),
            max_reply_bytes: 1024 * 1024,
        }
    }
}

impl ChatConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        count(
            "chat.max_body_bytes",
            self.max_body_bytes as u64,
            1,
            16 * MIB,
        )?;
        count(
            "chat.max_room_name_bytes",
            self.max_room_name_bytes as u64,
            1,
            1024,
        )?;
        count(
            "chat.max_client_msg_id_bytes",
            self.max_client_msg_id_bytes as u64,
            1,
            1024,
        )?;
        count(
            "chat.max_metadata_entries",
            self.max_metadata_entries as u64,
            0,
            1024,
        )?;
        count("chat.history_max_limit", self.history_max_limit, 1, 10_000)?;
        count(
            "chat.history_default_limit",
            self.history_default_limit,
            1,
            u64::from(self.history_max_limit),
        )?;
        count(
            "chat.large_room_members",
            self.large_room_members,
            1,
            u64::MAX,
        )?;
        duration(
            "chat.typing_interval",
            self.typing_interval,
            Duration::ZERO,
            HOUR,
        )?;
        count(
            "chat.max_reply_bytes",
            self.max_reply_bytes as u64,
            KIB,
            64 * MIB,
        )
    }
}
