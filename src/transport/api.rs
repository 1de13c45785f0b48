//! The HTTP API: the "short connection" path for work that needs no realtime channel.
//! JSON in the proto3 JSON mapping (the same shapes as the WebSocket frames), bearer auth:
//! a user's JWT, or the admin token for server-side publishing and announcements.
//!
//! | method and path | who | result |
//! |---|---|---|
//! | `GET /api/v1/rooms` | user | `RoomList` with unread counts |
//! | `GET /api/v1/rooms/{room}/messages?before_seq=&after_seq=&limit=` | user | `HistoryPage` |
//! | `GET /api/v1/rooms/{room}/members` | user | `MemberList` |
//! | `POST /api/v1/rooms/{room}/messages` | user or admin | `Sent` |
//! | `POST /api/v1/announce` | admin | `Done` |
//! | `POST /api/v1/tickets` | user | `Ticket` (for the `/sse` URL) |

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
    proto::{self, ErrorCode},
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

async fn rooms(State(app): State<Ctx>, headers: HeaderMap) -> Result<Response, ApiError> {
    let user = user(&app, &headers)?;
    let rooms = app.core.chat.rooms_of(&user).await?;
    Ok(Json(proto::RoomList { rooms }).into_response())
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
    Ok(Json(app.core.chat.history(&user, req).await?).into_response())
}

async fn members(
    State(app): State<Ctx>,
    headers: HeaderMap,
    room: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let user = user(&app, &headers)?;
    let Path(room) = room?;
    Ok(Json(app.core.chat.members(&user, &room).await?).into_response())
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
    let chat = &app.core.chat;
    let sent = match caller {
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
            chat.send(&user, send).await?
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
            chat.post_as_admin(NewMessage {
                room,
                sender,
                client_msg_id: post.client_msg_id,
                body: post.body,
                metadata: post.metadata,
                ts: now_ms(),
                attachments: Vec::new(),
            })
            .await?
        }
    };
    Ok(Json(sent).into_response())
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
