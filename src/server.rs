//! Wires the concrete pieces from the configuration and runs the HTTP server: the axum
//! router (`/ws`, `/healthz`, `/readyz`, `/metrics`), graceful shutdown, and the session
//! reaper. Tests start the same server in-process on an ephemeral port.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::{AuthSetupError, Authenticator},
    broker::local::LocalBroker,
    chat::{Chat, hub::Hub},
    config::Config,
    metrics::Metrics,
    session::{Core, Sessions},
    store::{StoreError, sqlite::SqliteStore},
    transport,
};

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub core: Arc<Core>,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// Connection tasks that outlive their HTTP request (upgraded WebSockets).
    pub tracker: TaskTracker,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("auth setup: {0}")]
    Auth(#[from] AuthSetupError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Serve(std::io::Error),
}

/// Builds the core with the configured backends.
pub fn build_core(config: Config) -> Result<Arc<Core>, ServerError> {
    let config = Arc::new(config);
    let hub = Arc::new(Hub::new());
    let store = Arc::new(SqliteStore::open(&config.store)?);
    let broker = Arc::new(LocalBroker::new(hub.clone()));
    let chat = Arc::new(Chat::new(store, broker, hub, config.chat.clone()));
    let sessions = Arc::new(Sessions::new(config.session.clone(), chat.clone()));
    Ok(Arc::new(Core {
        auth: Authenticator::new(&config.auth)?,
        config,
        chat,
        sessions,
        metrics: Arc::new(Metrics::new()),
    }))
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/ws", get(transport::ws::handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::api::routes())
        .with_state(state)
}

async fn readyz(State(app): State<AppState>) -> impl IntoResponse {
    if app.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    let body = app.core.metrics.render(app.core.sessions.len());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    state: AppState,
    task: JoinHandle<Result<(), ServerError>>,
}

impl Server {
    /// Binds `config.server.listen` and starts serving in the background.
    pub async fn start(config: Config) -> Result<Server, ServerError> {
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        let core = build_core(config)?;
        let state = AppState {
            core,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        };
        let reaper = state.core.sessions.spawn_reaper();
        let app = router(state.clone());
        let s = state.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(s.shutdown.clone().cancelled_owned())
                .await;
            // Upgraded connections were told to reconnect; give them the drain time.
            s.tracker.close();
            let drain = s.core.config.server.shutdown_timeout;
            if tokio::time::timeout(drain, s.tracker.wait()).await.is_err() {
                tracing::warn!(open = s.tracker.len(), "drain timeout; closing the rest");
            }
            reaper.abort();
            served.map_err(ServerError::Serve)
        });
        tracing::info!(%addr, "listening");
        Ok(Server { addr, state, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Starts a graceful shutdown: stop accepting, tell clients to reconnect, drain.
    pub fn shutdown(&self) {
        self.state.shutdown.cancel();
    }

    /// Waits until the server has stopped (after [`Server::shutdown`]).
    pub async fn wait(self) -> Result<(), ServerError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(ServerError::Serve(std::io::Error::other(e))),
        }
    }
}
