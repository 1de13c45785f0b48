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
    #[error("too many {0} events; slow down")]
    RateLimited(&'static str),
    #[error("user {0:?} has no connected session")]
    UserOffline(String),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("broker: {0}")]
    Broker(#[from] crate::broker::BrokerError),
}

impl ChatError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ChatError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            ChatError::NotMember(_) => ErrorCode::NotMember,
            ChatError::Forbidden(_) => ErrorCode::Forbidden,
            ChatError::NotFound(_) => ErrorCode::NotFound,
            ChatError::RoomExists(_) => ErrorCode::RoomExists,
            ChatError::RateLimited(_) => ErrorCode::RateLimited,
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
        proto::Error {
            code: self.code() as i32,
            message,
        }
    }
}

/// Builds the wire error for a code and message.
pub fn wire_error(code: ErrorCode, message: impl Into<String>) -> proto::Error {
    proto::Error {
        code: code as i32,
        message: message.into(),
    }
}
