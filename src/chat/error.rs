//! Errors a client can cause or see, each with a stable wire code.

use crate::proto::{self, ErrorCode};

/// A failed command. `code()` is the stable contract; the message is for humans.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("not a member of room {0:?}")]
    NotMember(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("room {0:?} does not exist")]
    NotFound(String),
    #[error("room {0:?} already exists")]
    RoomExists(String),
    #[error("too many {what}; retry in {} ms", retry_after.as_millis())]
    RateLimited {
        what: &'static str,
        retry_after: std::time::Duration,
    },
    #[error("{0}")]
    LimitExceeded(String),
    #[error("user {0:?} has no connected session")]
    UserOffline(String),
    #[error("store: {0}")]
    Store(crate::store::StoreError),
    #[error("broker: {0}")]
    Broker(#[from] crate::broker::BrokerError),
}

impl From<crate::store::StoreError> for ChatError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            // The store enforces limits.max_rooms_per_user atomically (see `Store::join`).
            e @ crate::store::StoreError::TooManyRooms { .. } => {
                ChatError::LimitExceeded(e.to_string())
            }
            e => ChatError::Store(e),
        }
    }
}

impl ChatError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ChatError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            ChatError::NotMember(_) => ErrorCode::NotMember,
            ChatError::Forbidden(_) => ErrorCode::Forbidden,
            ChatError::NotFound(_) => ErrorCode::NotFound,
            ChatError::RoomExists(_) => ErrorCode::RoomExists,
            ChatError::RateLimited { .. } => ErrorCode::RateLimited,
            ChatError::LimitExceeded(_) => ErrorCode::LimitExceeded,
            ChatError::UserOffline(_) => ErrorCode::UserOffline,
            ChatError::Store(_) | ChatError::Broker(_) => ErrorCode::Internal,
        }
    }

    pub fn to_proto(&self) -> proto::Error {
        let message = match self {
            // Internal details stay in the server log.
            ChatError::Store(_) | ChatError::Broker(_) => "internal error".to_string(),
            other => other.to_string(),
        };
        let retry_after_ms = match self {
            ChatError::RateLimited { retry_after, .. } => retry_ms(*retry_after),
            _ => 0,
        };
        proto::Error {
            code: self.code() as i32,
            message,
            retry_after_ms,
        }
    }
}

/// Builds the wire error for a code and message.
/// A retry hint in whole milliseconds, at least 1 (0 means "no hint" on the wire).
pub fn retry_ms(d: std::time::Duration) -> u32 {
    d.as_millis().clamp(1, u32::MAX as u128) as u32
}

pub fn wire_error(code: ErrorCode, message: impl Into<String>) -> proto::Error {
    proto::Error {
        code: code as i32,
        message: message.into(),
        retry_after_ms: 0,
    }
}
