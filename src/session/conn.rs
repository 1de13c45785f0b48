//! One transport connection's view of the session layer: turns decoded client commands
//! into replies, binds the connection to a session on `connect` (through the one connect
//! path, [`Core::connect`]), and says when to close. Every transport drives the same
//! `Conn` (wrapped in its [`super::Outbox`]), so there is one copy of the command logic.

use std::{sync::Arc, time::Duration};

use super::{
    Attachment, Death, Pushes, Session, Take,
    connect::{ConnectRequest, Core, Credential},
};
use crate::{
    auth::now_ms,
    chat::{ChatError, RoomsSeen, Seen, wire_error},
    compact::saturating_ms,
    proto::{self, ClientFrame, ErrorCode, ServerFrame, client_frame::Cmd, server_frame::Kind},
};

/// Why the server closes a transport. `code()` is the WebSocket close code and the
/// `Disconnect.code` sent just before closing (docs/PROTOCOL.md, "Close codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// 1001: the server is shutting down; reconnect (elsewhere) and resume.
    ShuttingDown,
    /// 1009: a frame larger than `ws.max_frame_bytes`.
    FrameTooLarge,
    /// 4001: missing, invalid or expired token. Do not reconnect with the same token.
    Unauthorized,
    /// 4002: no `connect` within the auth timeout.
    AuthTimeout,
    /// 4008: the outbound queue overflowed; reconnect and log-sync.
    SlowConsumer,
    /// 4009: nothing received within heartbeat interval + pong timeout.
    HeartbeatTimeout,
    /// 4010: the session was resumed on another connection.
    SessionMoved,
    /// 4011: the session ended on the server; reconnect and log-sync.
    SessionExpired,
    /// 1000: the client ended its session (`end`); nothing to resume.
    Ended,
}

impl CloseReason {
    pub fn code(self) -> u16 {
        match self {
            CloseReason::ShuttingDown => 1001,
            CloseReason::FrameTooLarge => 1009,
            CloseReason::Unauthorized => 4001,
            CloseReason::AuthTimeout => 4002,
            CloseReason::SlowConsumer => 4008,
            CloseReason::HeartbeatTimeout => 4009,
            CloseReason::SessionMoved => 4010,
            CloseReason::SessionExpired => 4011,
            CloseReason::Ended => 1000,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            CloseReason::ShuttingDown => "server shutting down",
            CloseReason::FrameTooLarge => "frame too large",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::AuthTimeout => "connect timeout",
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::HeartbeatTimeout => "heartbeat timeout",
            CloseReason::SessionMoved => "session resumed elsewhere",
            CloseReason::SessionExpired => "session expired",
            CloseReason::Ended => "session ended",
        }
    }

    pub fn reconnect(self) -> bool {
        !matches!(
            self,
            CloseReason::Unauthorized | CloseReason::SessionMoved | CloseReason::Ended
        )
    }

    /// The `disconnect` frame announcing this close.
    pub fn frame(self) -> ServerFrame {
        ServerFrame {
            id: 0,
            pos: 0,
            kind: Some(Kind::Disconnect(proto::Disconnect {
                code: self.code() as u32,
                reason: self.reason().to_string(),
                reconnect: self.reconnect(),
            })),
        }
    }

    fn from_death(d: Death) -> Self {
        match d {
            Death::SlowConsumer => CloseReason::SlowConsumer,
            Death::Expired => CloseReason::SessionExpired,
            Death::Ended => CloseReason::Ended,
        }
    }
}

/// What the transport does after a command.
pub enum Outcome {
    /// Send this frame.
    Reply(ServerFrame),
    /// Nothing to send (ack).
    Silent,
    /// Send this frame, then close for this reason.
    Close(ServerFrame, CloseReason),
    /// The reply will be ready later (a send waiting for its commit); the transport may
    /// read and handle the next frames meanwhile, and writes this when it resolves.
    Later(LaterReply),
}

/// A reply that resolves later.
pub type LaterReply = std::pin::Pin<Box<dyn std::future::Future<Output = ServerFrame> + Send>>;

struct Bound {
    session: Arc<Session>,
    /// None for a command-only binding (HTTP POST): it delivers nothing.
    attachment: Option<Attachment>,
    /// The rooms this connection's connect read, for the joins that follow it (a
    /// reconnecting client joins its rooms again): each taken by its join, all dropped
    /// at the first other command ([`RoomsSeen`]).
    seen: Option<Box<RoomsSeen>>,
}

/// The session side of one transport connection.
pub struct Conn {
    core: Arc<Core>,
    bound: Option<Bound>,
    /// The heartbeat interval a `connect` reply announces, in the whole milliseconds the
    /// reply carries (4 bytes in every connection, not a `Duration`'s 16).
    heartbeat_ms: u32,
}

fn error_frame(id: u64, code: ErrorCode, message: impl Into<String>) -> ServerFrame {
    ServerFrame {
        id,
        pos: 0,
        kind: Some(Kind::Error(wire_error(code, message))),
    }
}

impl Conn {
    /// An unbound connection (WebSocket): its first command must be `connect`, whose
    /// reply announces `heartbeat`.
    pub fn new(core: Arc<Core>, heartbeat: Duration) -> Self {
        Self {
            core,
            bound: None,
            heartbeat_ms: saturating_ms(heartbeat),
        }
    }

    /// A connection already bound to `session` (SSE, long-poll, HTTP commands), with the
    /// attachment it delivers through, if any.
    pub fn bound(core: Arc<Core>, session: Arc<Session>, attachment: Option<Attachment>) -> Self {
        Self {
            core,
            bound: Some(Bound {
                session,
                attachment,
                seen: None,
            }),
            heartbeat_ms: 0,
        }
    }

    pub fn session(&self) -> Option<&Arc<Session>> {
        self.bound.as_ref().map(|b| &b.session)
    }

    pub fn is_connected(&self) -> bool {
        self.bound.is_some()
    }

    /// The server's metrics (the core's).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.core.metrics
    }

    /// The server's configuration (the core's).
    pub fn config(&self) -> &crate::config::Config {
        &self.core.config
    }

    pub fn attachment(&self) -> Option<&Attachment> {
        self.bound.as_ref().and_then(|b| b.attachment.as_ref())
    }

    /// Up to `max` pushes to write, or why the transport must close.
    pub fn take(&self, max: usize) -> Result<Pushes, CloseReason> {
        let Some((b, attachment)) = self
            .bound
            .as_ref()
            .and_then(|b| Some((b, b.attachment.as_ref()?)))
        else {
            return Ok(Pushes::new());
        };
        match b.session.take(attachment, max) {
            Take::Pushes(p) => Ok(p),
            Take::Revoked => Err(CloseReason::SessionMoved),
            Take::Dead(d) => {
                self.core.sessions.remove(&b.session);
                Err(CloseReason::from_death(d))
            }
        }
    }

    /// The transport is gone: the session waits for a resume for the grace period.
    pub fn detach(&mut self) {
        if let Some(Bound {
            session,
            attachment: Some(a),
            ..
        }) = self.bound.take()
        {
            session.detach(&a);
        }
    }

    /// The client closed on purpose: end the session now (no resume will come).
    pub fn end(&mut self) {
        if let Some(Bound {
            session,
            attachment: Some(a),
            ..
        }) = self.bound.take()
        {
            if session.take(&a, 0).is_current() {
                self.core.sessions.end(&session);
            }
        }
    }

    /// An error frame not tied to a command (id 0), counted in the metrics.
    pub fn error(&self, code: ErrorCode, message: impl Into<String>) -> ServerFrame {
        self.core.metrics.error(code);
        error_frame(0, code, message)
    }

    /// Reports a frame that could not be decoded.
    pub fn bad_frame(&self, why: impl std::fmt::Display) -> ServerFrame {
        self.error(ErrorCode::BadFrame, why.to_string())
    }

    /// Runs one command to its outcome (HTTP commands, which have nothing to write
    /// meanwhile). A WebSocket runs it beside its writer: [`Conn::start`], then
    /// [`Conn::finish`] with what the future returned.
    pub async fn handle(&mut self, frame: ClientFrame) -> Outcome {
        match self.start(frame) {
            Start::Done(outcome) => outcome,
            Start::Running(run) => {
                let finished = run.await;
                self.finish(finished)
            }
        }
    }

    /// Starts one command: its outcome at once when it needs no store or broker, else a
    /// future that owns what it needs (it borrows nothing from the connection, so the
    /// transport can go on writing pushes and pings while it runs). Its result goes to
    /// [`Conn::finish`] before the next command starts: commands of one connection run
    /// one at a time, in the order they came.
    pub fn start(&mut self, frame: ClientFrame) -> Start {
        let id = frame.id;
        let Some(cmd) = frame.cmd else {
            self.core.metrics.error(ErrorCode::UnknownCommand);
            return Start::Done(Outcome::Reply(error_frame(
                id,
                ErrorCode::UnknownCommand,
                "unknown command",
            )));
        };
        let (session, cmd) = match (&self.bound, cmd) {
            (None, Cmd::Connect(c)) => {
                let core = self.core.clone();
                let heartbeat = Duration::from_millis(self.heartbeat_ms.into());
                return Start::Running(Box::pin(async move {
                    let request = ConnectRequest {
                        credential: Credential::Token(&c.token),
                        session_id: &c.session_id,
                        last_pos: c.last_pos,
                        attach: true,
                        heartbeat,
                        receive_only: false,
                    };
                    Finished::Connected(id, core.connect(request).await)
                }));
            }
            (Some(_), Cmd::Connect(_)) => {
                return Start::Done(Outcome::Reply(self.err(
                    id,
                    ErrorCode::AlreadyConnected,
                    "already connected",
                )));
            }
            (None, Cmd::Ping(_)) => return Start::Done(Outcome::Reply(pong(id))),
            (None, _) => {
                return Start::Done(Outcome::Reply(self.err(
                    id,
                    ErrorCode::NotConnected,
                    "send connect first",
                )));
            }
            (Some(b), cmd) => (b.session.clone(), cmd),
        };
        if session.is_receive_only() && !matches!(cmd, Cmd::Ack(_) | Cmd::Ping(_) | Cmd::End(_)) {
            return Start::Done(Outcome::Reply(self.err(
                id,
                ErrorCode::Forbidden,
                "receive-only session",
            )));
        }
        match cmd {
            Cmd::Ping(_) => return Start::Done(Outcome::Reply(pong(id))),
            Cmd::Ack(a) => {
                session.ack(a.pos);
                return Start::Done(Outcome::Silent);
            }
            Cmd::End(_) => {
                // Any binding may end its session (a command-only HTTP POST included):
                // the transports that deliver it see it dead and close with `Ended`.
                self.core.sessions.end_by_client(&session);
                let done = ServerFrame {
                    id,
                    pos: 0,
                    kind: Some(Kind::Done(proto::Done {})),
                };
                return Start::Done(Outcome::Close(done, CloseReason::Ended));
            }
            _ => {}
        }
        let seen = match &cmd {
            Cmd::Join(j) => self.take_seen(&j.room),
            _ => {
                self.drop_seen();
                None
            }
        };
        let core = self.core.clone();
        Start::Running(Box::pin(async move {
            Finished::Done(run_command(core, session, id, cmd, seen).await)
        }))
    }

    /// What the connect read of `room`, if it did and it was not taken yet.
    fn take_seen(&mut self, room: &str) -> Option<Seen> {
        let bound = self.bound.as_mut()?;
        let rooms = bound.seen.as_mut()?;
        let seen = rooms.take(room);
        if rooms.is_empty() {
            bound.seen = None;
        }
        seen
    }

    fn drop_seen(&mut self) {
        if let Some(bound) = &mut self.bound {
            bound.seen = None;
        }
    }

    /// Takes the result of a command started with [`Conn::start`]; a `connect` binds the
    /// connection here.
    pub fn finish(&mut self, finished: Finished) -> Outcome {
        match finished {
            Finished::Done(outcome) => outcome,
            Finished::Connected(id, Ok(opened)) => {
                if self.bound.is_some() {
                    // Cannot happen (commands run one at a time); never leak a session.
                    if let Some(a) = &opened.attachment {
                        opened.session.detach(a);
                    }
                    return Outcome::Reply(self.err(
                        id,
                        ErrorCode::AlreadyConnected,
                        "already connected",
                    ));
                }
                self.bound = Some(Bound {
                    session: opened.session,
                    attachment: opened.attachment,
                    seen: opened.seen,
                });
                Outcome::Reply(ServerFrame {
                    id,
                    pos: 0,
                    kind: Some(Kind::Connected(opened.connected)),
                })
            }
            Finished::Connected(id, Err(e)) => {
                let reply = ServerFrame {
                    id,
                    pos: 0,
                    kind: Some(Kind::Error(e.to_proto())),
                };
                if e.is_auth() {
                    Outcome::Close(reply, CloseReason::Unauthorized)
                } else {
                    Outcome::Reply(reply)
                }
            }
        }
    }

    fn err(&self, id: u64, code: ErrorCode, message: &str) -> ServerFrame {
        self.core.metrics.error(code);
        error_frame(id, code, message)
    }
}

/// How a command started: done at once, or running.
pub enum Start {
    Done(Outcome),
    Running(Running),
}

/// A command running beside the transport's writer; owns everything it uses.
pub type Running = std::pin::Pin<Box<dyn std::future::Future<Output = Finished> + Send>>;

/// What a running command ended with, for [`Conn::finish`].
pub enum Finished {
    Done(Outcome),
    Connected(
        u64,
        Result<super::connect::Opened, super::connect::ConnectError>,
    ),
}

/// One command of a connected session (not connect, ping, ack or end).
/// A join brings what the connect read of its room, if it did (`seen`).
async fn run_command(
    core: Arc<Core>,
    session: Arc<Session>,
    id: u64,
    cmd: Cmd,
    seen: Option<Seen>,
) -> Outcome {
    let user = session.user_id();
    let result = match cmd {
        Cmd::Send(s) => match core.chat.submit_send(user, s).await {
            Ok(pending) => {
                // Ordered already; the reply waits for the commit, off the reader.
                let core = core.clone();
                return Outcome::Later(Box::pin(async move {
                    let kind = match pending.await {
                        Ok(sent) => {
                            core.metrics.messages.inc();
                            Kind::Sent(sent)
                        }
                        Err(e) => Kind::Error(failed(&core, e).to_proto()),
                    };
                    ServerFrame {
                        id,
                        pos: 0,
                        kind: Some(kind),
                    }
                }));
            }
            Err(e) => Err(failed(&core, e)),
        },
        Cmd::Join(j) if seen.is_some() => core
            .chat
            .join_seen(user, &j.room, seen)
            .await
            .map(Kind::Joined)
            .map_err(|e| failed(&core, e)),
        cmd => execute(&core, user, cmd).await,
    };
    Outcome::Reply(ServerFrame {
        id,
        pos: 0,
        kind: Some(result.unwrap_or_else(|e| Kind::Error(e.to_proto()))),
    })
}

/// A user's command, whatever carried it: a session's frame (`run_command`) or an HTTP
/// API request (`transport/api.rs`). One dispatch to chat, one place where messages and
/// errors are counted and store or broker failures logged. A `Send` here resolves once
/// the message is durable (a session pipelines its sends instead: `run_command`).
/// Connect, ping, ack and end belong to a session's own handling, not here.
pub async fn execute(core: &Core, user: &str, cmd: Cmd) -> Result<Kind, ChatError> {
    let chat = &core.chat;
    let result = match cmd {
        Cmd::Connect(_) | Cmd::Ping(_) | Cmd::Ack(_) | Cmd::End(_) => {
            Err(ChatError::InvalidArgument(
                "connect, ping, ack and end are a session's, not commands".into(),
            ))
        }
        Cmd::Join(j) => chat.join(user, &j.room).await.map(Kind::Joined),
        Cmd::Leave(l) => chat.leave(user, &l.room).await.map(Kind::Left),
        Cmd::Send(s) => chat.send(user, s).await.map(|sent| {
            core.metrics.messages.inc();
            Kind::Sent(sent)
        }),
        Cmd::History(h) => chat.history(user, h).await.map(Kind::History),
        Cmd::Sync(s) => chat.sync(user, s).await.map(Kind::Sync),
        Cmd::CreateRoom(c) => chat.create_room(user, c).await.map(Kind::Room),
        Cmd::Invite(i) => chat.invite(user, i).await.map(Kind::Done),
        Cmd::Members(m) => chat.members(user, &m.room).await.map(Kind::Members),
        Cmd::Rooms(r) if r.public => chat.public_rooms(user, &r).await.map(Kind::Rooms),
        Cmd::Rooms(_) => chat
            .rooms_of(user)
            .await
            .map(|rooms| Kind::Rooms(proto::RoomList { rooms, more: false })),
        Cmd::Read(r) => chat.read(user, r).await.map(Kind::Done),
        Cmd::Typing(t) => chat.typing(user, t).await.map(Kind::Done),
        Cmd::Presence(p) => chat.presence(p).await.map(Kind::PresenceList),
        Cmd::Signal(s) => chat.signal(user, s).await.map(Kind::Done),
    };
    result.map_err(|e| failed(core, e))
}

/// Counts (and, for a store or broker failure, logs) a command's error.
fn failed(core: &Core, e: ChatError) -> ChatError {
    if matches!(e, ChatError::Store(_) | ChatError::Broker(_)) {
        tracing::error!(error = %e, "command failed");
    }
    core.metrics.error(e.code());
    e
}

fn pong(id: u64) -> ServerFrame {
    ServerFrame {
        id,
        pos: 0,
        kind: Some(Kind::Pong(proto::Pong { ts: now_ms() })),
    }
}
