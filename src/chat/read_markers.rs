//! Read state: moving a read marker and telling the room (a receipt with the unread
//! count).

use std::sync::Arc;

use super::{Chat, ChatError};
use crate::{
    codec::Push,
    proto::{self, server_frame::Kind},
};

impl Chat {
    /// Moves the user's read marker; all members' sessions (the user's own included, for
    /// badge sync) get a receipt — in a large room only the user's own — when it moved.
    /// A read that does not move the marker (repeated, or behind it) publishes nothing.
    pub async fn read(&self, user: &str, req: proto::Read) -> Result<proto::Done, ChatError> {
        self.check_room(&req.room)?;
        let Some(marker) = self.store.set_read(&req.room, user, req.seq).await? else {
            return Err(ChatError::NotMember(req.room));
        };
        if !marker.moved {
            return Ok(proto::Done {});
        }
        let push = Arc::new(Push::new(Kind::Receipt(proto::Receipt {
            room: req.room.clone(),
            user: user.into(),
            seq: marker.seq,
            unread: marker.unread,
        })));
        let to = self.audience(&req.room, user, self.members_of(&req.room).await?);
        self.publish(to, push).await;
        Ok(proto::Done {})
    }
}
