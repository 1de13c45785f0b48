//! One connect path for every transport: credential → user → new or resumed session,
//! with one set of errors and codes. WebSocket (`connect` frame), SSE (ticket or bearer
//! header), long-poll and `POST /session` all come through [`Core::connect`]; bearer
//! headers on other requests through [`Core::authenticate`].
//!
//! Owns: [`Core`] (what the session layer shares), credentials, the resume-or-create
//! decision. Not: how a transport reads the credential or writes the answer.

use std::{sync::Arc, time::Duration};

use super::{
    Attachment, Session, Sessions, TooManySessions,
    tickets::{Redeemed, TicketError, Tickets},
};
use crate::{
    auth::{AuthError, Authenticator},
    chat::{Chat, ChatError, RoomsSeen},
    compact::saturating_ms,
    config::Config,
    metrics::Metrics,
    proto::{self, ErrorCode},
};

/// Everything the session layer needs, shared by all connections.
pub struct Core {
    pub config: Arc<Config>,
    pub chat: Arc<Chat>,
    pub sessions: Arc<Sessions>,
    pub tickets: Tickets,
    pub auth: Authenticator,
    pub metrics: Arc<Metrics>,
    /// Attachments (the HTTP files API; chat only sees their index in the store).
    pub files: Arc<crate::files::Files>,
}

/// How the client proves who it is.
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    /// A JWT (from a `connect` frame or an `Authorization: Bearer` header).
    Token(&'a str),
    /// An SSE ticket; `reconnect` when the request carries `Last-Event-ID` (the
    /// browser's automatic EventSource reconnect).
    Ticket { ticket: &'a str, reconnect: bool },
}

/// A request to open or resume a session.
#[derive(Debug, Clone, Copy)]
pub struct ConnectRequest<'a> {
    pub credential: Credential<'a>,
    /// The session to resume, if any ("" = none).
    pub session_id: &'a str,
    /// The last position the client saw (resume point).
    pub last_pos: u64,
    /// Make the calling transport the session's deliverer (false for `POST /session`,
    /// which only runs commands).
    pub attach: bool,
    /// What the `connected` reply announces as the heartbeat interval.
    pub heartbeat: Duration,
    /// A listen-only session: commands other than ack and ping are refused.
    pub receive_only: bool,
}

/// Why a connect failed. `code()` is the wire code on every transport.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Auth(#[from] AuthError),
    #[error("{0}")]
    Ticket(#[from] TicketError),
    /// The session is gone, not the caller's, or cannot replay from the given position
    /// (a used ticket may only resume the session it opened).
    #[error("{0}: connect again and sync")]
    SessionGone(&'static str),
    #[error(transparent)]
    Chat(#[from] ChatError),
}

impl ConnectError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ConnectError::Auth(AuthError::Expired)
            | ConnectError::Ticket(TicketError::TokenExpired) => ErrorCode::TokenExpired,
            ConnectError::SessionGone(_) | ConnectError::Ticket(TicketError::SessionEnded) => {
                ErrorCode::SessionNotFound
            }
            ConnectError::Auth(_) | ConnectError::Ticket(_) => ErrorCode::Unauthorized,
            ConnectError::Chat(e) => e.code(),
        }
    }

    /// Whether the credential was refused (a WebSocket then closes with 4001).
    pub fn is_auth(&self) -> bool {
        match self {
            ConnectError::Ticket(TicketError::SessionEnded) => false,
            ConnectError::Auth(_) | ConnectError::Ticket(_) => true,
            _ => false,
        }
    }

    pub fn to_proto(&self) -> proto::Error {
        match self {
            ConnectError::Chat(e) => e.to_proto(),
            other => crate::chat::wire_error(other.code(), other.to_string()),
        }
    }
}

/// An opened (or resumed) session.
pub struct Opened {
    pub session: Arc<Session>,
    /// The caller's right to deliver, when it asked to attach.
    pub attachment: Option<Attachment>,
    pub connected: proto::Connected,
    /// What the joins that follow on the caller's connection may take from the connect's
    /// read of the rooms (a WebSocket keeps it; see [`RoomsSeen`]).
    pub seen: Option<Box<RoomsSeen>>,
}

impl Core {
    /// The user behind a bearer token.
    pub fn authenticate(&self, token: &str) -> Result<String, ConnectError> {
        self.auth.verify(token).map_err(|e| {
            let e = ConnectError::from(e);
            self.metrics.error(e.code());
            e
        })
    }

    /// A single-use ticket for the holder of `token` (`POST /api/v1/tickets`); it lives
    /// `auth.ticket_ttl` before its first use and never past the token's `exp`.
    pub fn issue_ticket(&self, token: &str) -> Result<proto::Ticket, ConnectError> {
        let claims = self.auth.verify_claims(token).map_err(|e| {
            let e = ConnectError::from(e);
            self.metrics.error(e.code());
            e
        })?;
        Ok(proto::Ticket {
            ticket: self.tickets.issue(&claims.sub, claims.exp),
            expires_in_ms: self.tickets.ttl().as_millis() as u32,
        })
    }

    /// Opens or resumes a session (see the module comment). Failures are counted in the
    /// metrics.
    pub async fn connect(&self, req: ConnectRequest<'_>) -> Result<Opened, ConnectError> {
        let result = self.connect_inner(req).await;
        if let Err(e) = &result {
            self.metrics.error(e.code());
            if matches!(e, ConnectError::Chat(ChatError::Store(_))) {
                tracing::error!(error = %e, "connect failed");
            }
        }
        result
    }

    async fn connect_inner(&self, req: ConnectRequest<'_>) -> Result<Opened, ConnectError> {
        let (user, bound_to, new_id) = match req.credential {
            Credential::Token(token) => (self.auth.verify(token)?, None, None),
            Credential::Ticket { ticket, reconnect } => {
                let redeemed = self
                    .tickets
                    .redeem(ticket, reconnect)
                    .map_err(|e| match e {
                        // Forgotten once it opened its session: used while that lives.
                        TicketError::NotHeld(session)
                            if self.sessions.get_raw(session).is_some() =>
                        {
                            TicketError::Used
                        }
                        TicketError::NotHeld(_) => TicketError::Unknown,
                        e => e,
                    })?;
                match redeemed {
                    Redeemed::Fresh { user, session } => (user, None, Some(session)),
                    Redeemed::Resume { user, session_id } => (user, Some(session_id), None),
                    Redeemed::Opened { session } => {
                        // The ticket is not held: the session it opened, if it lives.
                        let session = self
                            .sessions
                            .get_raw(session)
                            .ok_or(ConnectError::Ticket(TicketError::SessionEnded))?;
                        (
                            session.user_id().to_string(),
                            Some(session.id().to_string()),
                            None,
                        )
                    }
                }
            }
        };
        let opened = if let Some(session_id) = bound_to {
            // A used ticket never opens a new session: only its own, resumed exactly.
            let (last_pos, attach, heartbeat) = (req.last_pos, req.attach, req.heartbeat);
            self.resume_exactly(user, &session_id, last_pos, attach, heartbeat)
                .await?
        } else {
            let opened = self
                .open_session(
                    user,
                    req.session_id,
                    new_id,
                    req.last_pos,
                    req.heartbeat,
                    req.attach,
                )
                .await?;
            if let (Credential::Ticket { ticket, .. }, Some(raw)) = (req.credential, new_id) {
                let opened_it = self.sessions.is_raw(&opened.session, raw);
                self.tickets.bind(ticket, opened.session.id(), opened_it);
            }
            opened
        };
        if req.receive_only {
            opened.session.set_receive_only();
        }
        Ok(opened)
    }

    async fn resume_exactly(
        &self,
        user: String,
        session_id: &str,
        last_pos: u64,
        attach: bool,
        heartbeat: Duration,
    ) -> Result<Opened, ConnectError> {
        let session = self
            .sessions
            .get(session_id)
            .filter(|s| s.user_id() == user)
            .ok_or(ConnectError::SessionGone("session ended"))?;
        // Everything that can fail or wait comes before the resume: a store error, or a
        // caller that goes away meanwhile (an SSE request dropped mid-connect), leaves the
        // session as it was — detached, so it still expires. Nothing is awaited after.
        let (rooms, seen) = self.chat.rooms_seen(&user).await?;
        let gone = ConnectError::SessionGone("cannot resume from this position");
        let attachment = if attach {
            Some(session.resume(last_pos).ok_or(gone)?)
        } else if session.resume_from(last_pos) {
            None
        } else {
            return Err(gone);
        };
        Ok(Opened {
            connected: connected(&session, user, true, heartbeat, rooms),
            session,
            attachment,
            seen,
        })
    }

    /// The user's own session `id` (commands over HTTP), or `SessionGone`.
    pub fn session_of(&self, user: &str, id: &str) -> Result<Arc<Session>, ConnectError> {
        self.sessions
            .get(id)
            .filter(|s| s.user_id() == user)
            .ok_or(ConnectError::SessionGone("no such session"))
    }

    /// A long-poll continues the user's session `id` from `cursor`: the cursor
    /// acknowledges everything up to it, what follows is (re)delivered, and the caller
    /// becomes the session's deliverer (ending an older pending poll). A cursor the
    /// session cannot continue from ends it: the client starts over and syncs.
    pub fn continue_from(
        &self,
        user: &str,
        id: &str,
        cursor: u64,
    ) -> Result<(Arc<Session>, Attachment), ConnectError> {
        let session = self.session_of(user, id)?;
        match session.resume(cursor) {
            Some(attachment) => Ok((session, attachment)),
            None => {
                self.sessions.end(&session);
                Err(ConnectError::SessionGone(
                    "cannot continue from this cursor",
                ))
            }
        }
    }

    /// Resumes the user's session `session_id` from `last_pos` when it exists and can
    /// replay exactly, or else opens a new one (registered for live delivery). With
    /// `attach`, the caller's transport becomes the session's deliverer in the same step.
    async fn open_session(
        &self,
        user: String,
        session_id: &str,
        new_id: Option<[u8; 16]>,
        last_pos: u64,
        heartbeat: Duration,
        attach: bool,
    ) -> Result<Opened, ChatError> {
        let sessions = &self.sessions;
        let resumable = (!session_id.is_empty())
            .then(|| sessions.get(session_id))
            .flatten()
            .filter(|s| s.user_id() == user);
        if let Some(s) = resumable {
            // The rooms first, the resume last (as in `resume_exactly`): nothing awaited
            // between attaching and handing the attachment to the caller.
            let (rooms, seen) = self.chat.rooms_seen(&user).await?;
            let resumed = if attach {
                s.resume(last_pos).map(Some)
            } else {
                s.resume_from(last_pos).then_some(None)
            };
            match resumed {
                Some(attachment) => {
                    return Ok(Opened {
                        connected: connected(&s, user, true, heartbeat, rooms),
                        session: s,
                        attachment,
                        seen,
                    });
                }
                // Its pushes can no longer be replayed exactly: end it; log sync covers
                // the messages.
                None => sessions.end(&s),
            }
        }
        let created = match new_id {
            Some(raw) => sessions.create_with(&user, raw),
            None => sessions.create(&user),
        };
        let s = created.map_err(|TooManySessions(max)| {
            ChatError::LimitExceeded(format!(
                "{user} has {max} sessions already (limits.max_sessions_per_user): close one"
            ))
        })?;
        // Registering for delivery reads the user's rooms anyway: reuse them.
        let (rooms, seen) = match self.chat.attach(s.clone()).await {
            Ok(read) => read,
            Err(e) => {
                sessions.remove(&s);
                return Err(e);
            }
        };
        let attachment = if attach { s.attach() } else { None };
        Ok(Opened {
            connected: connected(&s, user, false, heartbeat, rooms),
            session: s,
            attachment,
            seen,
        })
    }
}

/// The `connected` reply. `user` is the session's user id as the credential gave it, moved
/// into the reply (not a second copy of the session's).
fn connected(
    session: &Session,
    user: String,
    resumed: bool,
    heartbeat: Duration,
    rooms: Vec<proto::RoomState>,
) -> proto::Connected {
    proto::Connected {
        session_id: session.id().to_string(),
        user_id: {
            debug_assert_eq!(user, session.user_id());
            user
        },
        resumed,
        heartbeat_ms: saturating_ms(heartbeat),
        rooms,
    }
}
