//! The HTTP API: the "short connection" path for work that needs no realtime channel.
//! JSON in the proto3 JSON mapping (the same shapes as the WebSocket frames), bearer auth:
//! a user's JWT, or the admin token for server-side publishing and announcements.
//!
//! | method and path | who | result |
//! |---|---|---|
//! | `GET /api/v1/rooms` | user | `RoomList` with unread counts |
//! | `GET /api/v1/rooms?public=true&after=&limit=` | user | `RoomList`: the room browser |
//! | `GET /api/v1/rooms/{room}/messages?before_seq=&after_seq=&limit=` | user | `HistoryPage` |
//! | `GET /api/v1/rooms/{room}/members` | user | `MemberList` |
//! | `POST /api/v1/rooms/{room}/messages` | user or admin | `Sent` |
//! | `POST /api/v1/announce` | admin | `Done` |
//! | `POST /api/v1/tickets` | user | `Ticket` (for the `/sse` URL) |
//!
//! A user's request is a command like any session's: it goes through
//! [`crate::session::conn::execute`], the same dispatch, checks, metrics and errors as a
//! frame on `/ws`, `/sse` or `/poll`. The admin's post and announcement are not user
//! commands and call chat directly.

use axum::{
    Json, Router,
    extract::{
        Path, Query, State,
        rejection::{JsonRejection, PathRejection, QueryRejection},
    },
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;

use super::{
    Ctx,
    bearer::{ApiError, Caller, bearer, caller, close_if_unread, method_not_allowed, user},
};
use crate::{
    auth::now_ms,
    chat::ChatError,
    proto::{self, ErrorCode, client_frame::Cmd, server_frame::Kind},
    session::conn::execute,
    store::NewMessage,
};

pub fn routes() -> Router<Ctx> {
    Router::new()
        .route("/api/v1/rooms", get(rooms).fallback(method_not_allowed))
        .route(
            "/api/v1/rooms/{room}/messages",
            get(history).post(post_message).fallback(method_not_allowed),
        )
        .route(
            "/api/v1/rooms/{room}/members",
            get(members).fallback(method_not_allowed),
        )
        .route(
            "/api/v1/announce",
            post(announce).fallback(method_not_allowed),
        )
        .route("/api/v1/tickets", post(ticket).fallback(method_not_allowed))
        .layer(axum::middleware::from_fn(close_if_unread))
}

async fn ticket(
    State(ctx): State<Ctx>,
    peer: Option<axum::Extension<super::PeerIp>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(axum::Extension(super::PeerIp(ip))) = peer
        && let Err(retry_after) = ctx.admission.tickets.check(&ip)
    {
        return Err(ChatError::RateLimited {
            what: "tickets from this address",
            retry_after,
        }
        .into());
    }
    // A user's token (not the admin's): the ticket is minted from it.
    user(&ctx, &headers)?;
    let token = bearer(&headers).unwrap_or_default();
    Ok(Json(ctx.core.issue_ticket(token)?).into_response())
}

/// `?public=true&after=&limit=`: the room browser (as `rooms` with `public`).
#[derive(Deserialize)]
struct RoomsQuery {
    #[serde(default)]
    public: bool,
    #[serde(default)]
    after: String,
    #[serde(default)]
    limit: u32,
}

async fn rooms(
    State(app): State<Ctx>,
    headers: HeaderMap,
    query: Result<Query<RoomsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let user = user(&app, &headers)?;
    let cmd = proto::Rooms {
        public: q.public,
        after: q.after,
        limit: q.limit,
    };
    let kind = execute(&app.core, &user, Cmd::Rooms(cmd)).await?;
    reply(kind)
}

/// A command's result as the JSON body of its reply (the proto3 JSON of the frame's
/// payload).
fn reply(kind: Kind) -> Result<Response, ApiError> {
    Ok(match kind {
        Kind::Rooms(rooms) => Json(rooms).into_response(),
        Kind::History(page) => Json(page).into_response(),
        Kind::Members(members) => Json(members).into_response(),
        Kind::Sent(sent) => Json(sent).into_response(),
        other => {
            tracing::error!(?other, "the HTTP API has no reply for this result");
            return Err(ApiError::new(ErrorCode::Internal, "unexpected result"));
        }
    })
}

#[derive(Deserialize)]
struct HistoryQuery {
    #[serde(default)]
    before_seq: u64,
    /// Present (even 0): page forward from it.
    after_seq: Option<u64>,
    #[serde(default)]
    limit: u32,
}

async fn history(
    State(app): State<Ctx>,
    headers: HeaderMap,
    room: Result<Path<String>, PathRejection>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let user = user(&app, &headers)?;
    let (Path(room), Query(q)) = (room?, query?);
    let req = proto::History {
        room,
        before_seq: q.before_seq,
        after_seq: q.after_seq,
        limit: q.limit,
    };
    reply(execute(&app.core, &user, Cmd::History(req)).await?)
}

async fn members(
    State(app): State<Ctx>,
    headers: HeaderMap,
    room: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let user = user(&app, &headers)?;
    let Path(room) = room?;
    reply(execute(&app.core, &user, Cmd::Members(proto::Members { room })).await?)
}

async fn post_message(
    State(app): State<Ctx>,
    headers: HeaderMap,
    room: Result<Path<String>, PathRejection>,
    body: Result<Json<proto::PostMessage>, JsonRejection>,
) -> Result<Response, ApiError> {
    let caller = caller(&app, &headers)?;
    let Path(room) = room?;
    let Json(post) = body?;
    match caller {
        Caller::User(user) => {
            if !post.sender.is_empty() {
                return Err(ApiError::new(
                    ErrorCode::Forbidden,
                    "only the admin sets sender",
                ));
            }
            let send = proto::Send {
                room,
                client_msg_id: post.client_msg_id,
                body: post.body,
                metadata: post.metadata,
                to_user: String::new(),
                attachments: post.attachments,
            };
            reply(execute(&app.core, &user, Cmd::Send(send)).await?)
        }
        Caller::Admin => {
            if !post.attachments.is_empty() {
                return Err(ApiError::new(
                    ErrorCode::InvalidArgument,
                    "only users attach files",
                ));
            }
            let sender = if post.sender.is_empty() {
                "system".to_string()
            } else {
                post.sender
            };
            let sent = app
                .core
                .chat
                .post_as_admin(NewMessage {
                    room,
                    sender,
                    client_msg_id: post.client_msg_id,
                    body: post.body,
                    metadata: post.metadata,
                    ts: now_ms(),
                    attachments: Vec::new(),
                })
                .await?;
            Ok(Json(sent).into_response())
        }
    }
}

async fn announce(
    State(app): State<Ctx>,
    headers: HeaderMap,
    body: Result<Json<proto::Announce>, JsonRejection>,
) -> Result<Response, ApiError> {
    if !matches!(caller(&app, &headers)?, Caller::Admin) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "announcements need the admin token",
        ));
    }
    let Json(a) = body?;
    let room = (!a.room.is_empty()).then_some(a.room);
    app.core.chat.announce(room, a.body).await?;
    Ok((StatusCode::ACCEPTED, Json(proto::Done {})).into_response())
}
