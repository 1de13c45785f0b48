//! The top of the layers: wires the concrete pieces from the configuration and runs the
//! HTTP server — the axum router (`/ws`, `/sse`, `/poll`, `/session`, the API,
//! `/healthz`, `/readyz`, `/metrics`), the accept loop (TLS, HTTP/1.1, HTTP/2, a write
//! deadline on every socket, a deadline on every stage before a request), graceful
//! shutdown, and the session reaper. Nothing imports this module but the binary and
//! tests, which start the same server in-process on an ephemeral port.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use futures_util::future::Either;
use hyper::server::conn::{http1, http2};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::graceful::{GracefulShutdown, Watcher},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{AuthSetupError, Authenticator},
    broker::{Broker, BrokerError, local::LocalBroker, order::Log, redis::RedisBroker},
    chat::Chat,
    config::{BrokerBackend, Config, ConfigError, TlsConfig},
    delivery::Hub,
    files::{FileError, Files},
    metrics::Metrics,
    proto,
    session::{Core, Sessions},
    store::{self, Range, Store, StoreError, sqlite::SqliteStore},
    transport::{
        self, Ctx, OverTls, PeerIp,
        admission::{Admission, Refusal},
        app::App,
        deadline::{DeadlineIo, WriteDeadline},
        idle::{Counted, Streams},
        version::Sniffed,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("auth setup: {0}")]
    Auth(#[from] AuthSetupError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
    #[error("files: {0}")]
    Files(#[from] FileError),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Serve(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

/// The store as the broker's receive path reads it (gap fills and repairs).
struct StoreLog(Arc<dyn Store>);

#[async_trait::async_trait]
impl Log for StoreLog {
    async fn after(
        &self,
        room: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<Arc<proto::Message>>, bool), String> {
        let page = self
            .0
            .history(room, Range::After(after), limit)
            .await
            .map_err(|e| e.to_string())?;
        Ok((page.messages, page.more))
    }
}

/// Builds the core with the configured backends, opening the store `store.backend`
/// names (PostgreSQL connects and migrates here).
pub async fn open_core(config: Config) -> Result<Arc<Core>, ServerError> {
    config.validate()?;
    let store = store::open(&config.store).await?;
    assemble_core(config, store)
}

/// [`open_core`] without an async context: the SQLite store only.
pub fn build_core(config: Config) -> Result<Arc<Core>, ServerError> {
    config.validate()?;
    if config.store.backend != crate::config::StoreBackend::Sqlite {
        return Err(StoreError::Backend(
            "build_core opens only the SQLite store; use open_core (Server::start)".into(),
        )
        .into());
    }
    let store = Arc::new(SqliteStore::open(&config.store)?);
    assemble_core(config, store)
}

fn assemble_core(config: Config, store: Arc<dyn Store>) -> Result<Arc<Core>, ServerError> {
    let config = Arc::new(config);
    let hub = Arc::new(Hub::new());
    let files = Arc::new(Files::open(&config.files, store.clone())?);
    let metrics = Arc::new(Metrics::new());
    let broker: Arc<dyn Broker> = match config.broker.backend {
        BrokerBackend::Memory => Arc::new(LocalBroker::new(hub.clone())),
        BrokerBackend::Redis => Arc::new(RedisBroker::new(
            &config.broker,
            hub.clone(),
            Arc::new(StoreLog(store.clone())),
            metrics.broker.clone(),
        )?),
    };
    let chat = Arc::new(
        Chat::new(store, broker.clone(), hub, config.chat.clone()).with_limits(&config.limits),
    );
    // In a cluster, session ids and tickets name the instance that holds them.
    let id_prefix = broker.instance().map_or(String::new(), |i| format!("{i}."));
    let sessions = Arc::new(
        Sessions::new(config.session.clone(), chat.clone())
            .with_max_per_user(config.limits.max_sessions_per_user)
            .with_id_prefix(&id_prefix),
    );
    Ok(Arc::new(Core {
        auth: Authenticator::new(&config.auth)?,
        tickets: crate::session::tickets::Tickets::new(config.auth.ticket_ttl)
            .with_prefix(&id_prefix)
            .with_key(crate::session::tickets::ticket_key(&config.auth)),
        config,
        chat,
        sessions,
        metrics,
        files,
    }))
}

/// The routes, with the request body limit (a command or API body is one frame: the same
/// limit as a WebSocket frame; over it the handlers answer 413 with the error JSON,
/// FRAME_TOO_LARGE) and the body deadline (`server.body_read_timeout`), and `/poll`
/// before them ([`App`]). The server serves [`app`]: the same with CORS.
pub fn router(state: Ctx) -> App {
    let layers = (body_limit(&state), body_deadline(&state));
    let router = routes(&state)
        .layer(layers)
        .merge(upgrades())
        .with_state(state.clone());
    App::new(&state, router, false)
}

/// What the listeners serve: [`router`] with CORS. The layers in one `layer` call: each
/// call wraps every route once more, and each wrap is one more boxed future per request,
/// held as long as the request is, with room for a whole request in it
/// (docs/BENCHMARKS.md, "Round four: memory"). For the same reason the layered routes
/// are the router that the upgrades (plain method routes, not wrapped by a merge) are
/// merged into, not the other way round. `/poll` is not a route: [`App`] serves it
/// before the router, its future unboxed (a pending poll holds it as long as it waits;
/// "Round seven: a pending long-poll"). It needs no body limit or body deadline: the
/// poll reads no body.
pub fn app(state: Ctx) -> App {
    let layers = (
        transport::cors::layer(state.core.config.clone()),
        body_limit(&state),
        body_deadline(&state),
    );
    let router = routes(&state)
        .layer(layers)
        .merge(upgrades())
        .with_state(state.clone());
    App::new(&state, router, true)
}

fn body_limit(state: &Ctx) -> axum::extract::DefaultBodyLimit {
    axum::extract::DefaultBodyLimit::max(state.core.config.ws.max_frame_bytes)
}

fn body_deadline(state: &Ctx) -> transport::bearer::BodyDeadlineLayer {
    transport::bearer::BodyDeadlineLayer::new(state.core.config.server.body_read_timeout)
}

/// WebSocket upgrades (/ws, /mqtt), under no layer: CORS does not apply to a browser's
/// WebSocket (no preflight, no CORS response headers read), /ws checks the Origin itself
/// (`transport::origin_allowed`), and an upgrade has no body. The CORS layer cost every
/// handshake its work and three useless response headers (docs/BENCHMARKS.md, round
/// four: storms).
fn upgrades() -> Router<Ctx> {
    Router::new()
        .route(
            "/ws",
            get(transport::ws::handler).connect(transport::ws::handler),
        )
        .route(
            "/mqtt",
            get(transport::mqtt::handler).connect(transport::mqtt::handler),
        )
}

/// Every route but the upgrades and `/poll` ([`App`]).
fn routes(state: &Ctx) -> Router<Ctx> {
    // Requests for a session another instance holds go there (transport::forward).
    let to_owner = || transport::forward::ToOwnerLayer::new(state.clone());
    // Long-poll replies, HTTP commands and the API: compressed by Accept-Encoding. Never
    // /sse (a compressor would hold events back until its buffer fills) nor /ws.
    let mut compressible = Router::new()
        .route("/session", axum::routing::post(transport::http::connect))
        .route(
            "/session/{id}",
            axum::routing::post(transport::http::command).route_layer(to_owner()),
        )
        .merge(transport::api::routes());
    if state.core.config.server.http_compression {
        compressible = compressible.layer(tower_http::compression::CompressionLayer::new());
    }
    Router::new()
        .route("/sse", get(transport::sse::handler).route_layer(to_owner()))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(compressible)
        .merge(crate::web::routes(&state.core.config))
        .merge(transport::files::routes())
        .fallback(transport::bearer::not_found)
}

/// Runs `job` every `every` while the core lives (it holds only a weak reference).
fn spawn_every<F, Fut>(core: &Arc<Core>, every: std::time::Duration, job: F) -> JoinHandle<()>
where
    F: Fn(Arc<Core>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let core = Arc::downgrade(core);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let Some(core) = core.upgrade() else { return };
            job(core).await;
        }
    })
}

/// Reaps expired sessions and stale tickets once a second (or faster for short grace
/// periods).
fn spawn_maintenance(core: &Arc<Core>) -> JoinHandle<()> {
    let every = (core.config.session.grace_period / 4).clamp(
        std::time::Duration::from_millis(50),
        std::time::Duration::from_secs(1),
    );
    spawn_every(core, every, |core| async move {
        core.sessions.reap();
        core.tickets.prune(|id| core.sessions.get(id).is_some());
    })
}

/// Hands the C library's free heap memory back to the OS (`malloc_trim(0)`: glibc
/// returns free pages inside its heaps too, not only at their tops) once traffic or what
/// is held has fallen, checked every `server.memory_trim_interval`. After a burst of
/// deliveries glibc keeps what the burst freed: RSS 5 s after a 2,000 × 200/s fan-out
/// was ~1.4-2× the floor's, and one trim brought it from 40 to 25 MiB, under the floor's
/// (docs/BENCHMARKS.md, "Round four: memory"); connections that close and sessions whose
/// grace period ends free their memory later, with no traffic to notice ("Round six:
/// RSS after a burst"). Not while traffic flows: a trim walks every free chunk with its
/// arena locked, 116-140 ms for a heap with 500k free chunks (a C test of glibc 2.36's
/// `malloc_trim` on this machine), so a busy server's allocations would stall every
/// interval, and its heap is in use anyway ([`TrimWhenQuieter`]). Runs on a blocking
/// thread. With jemalloc or mimalloc (the default build has jemalloc) Rust's allocations
/// are theirs, and glibc's heap holds only what C libraries allocate: aws-lc's TLS keys
/// above all, which idle TLS connections give back (`tls.idle_keys_after`). None with
/// another C library, or with the interval 0.
fn spawn_memory_trim(core: &Arc<Core>) -> Option<JoinHandle<()>> {
    let every = core.config.server.memory_trim_interval;
    if every.is_zero() || !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return None;
    }
    let policy = Arc::new(std::sync::Mutex::new(TrimWhenQuieter::default()));
    Some(spawn_every(core, every, move |core| {
        let held = core.metrics.connections_total() + core.sessions.len() as u64;
        let keys_away = tokio_rustls::rustls::idle_keys::released()
            .saturating_sub(tokio_rustls::rustls::idle_keys::expanded_again());
        let trim = policy.lock().unwrap_or_else(|e| e.into_inner()).tick(
            core.metrics.frames_out_total(),
            held,
            keys_away,
        );
        async move {
            if let Some(why) = trim {
                let started = std::time::Instant::now();
                let _ = tokio::task::spawn_blocking(trim_heap).await;
                tracing::debug!(took = ?started.elapsed(), why, "heap trimmed");
            }
        }
    }))
}

/// The idle clock of TLS 1.3 traffic keys (`tls.idle_keys_after`, vendor/rustls change 5):
/// a TLS connection whose key in one direction went unused that long gives the expanded
/// key back when next quiet. rustls's clock is coarse and process-wide, one tick a
/// second from here; `None` without TLS or with the setting at 0. (Two servers in one
/// process tick it twice as fast; only tests do that.)
fn spawn_tls_idle_clock(core: &Arc<Core>) -> Option<JoinHandle<()>> {
    let tls = &core.config.tls;
    let after = tls.idle_keys_after_secs();
    if tls.cert_file.is_none() || after == 0 {
        return None;
    }
    tokio_rustls::rustls::idle_keys::release_after(after);
    Some(spawn_every(
        core,
        std::time::Duration::from_secs(1),
        |_| async { tokio_rustls::rustls::idle_keys::tick() },
    ))
}

/// When to trim the heap. Either once the frames sent in an interval fall to a quarter
/// of the busiest interval since the last trim, and that one was busy (≥ [`Self::BUSY`]
/// frames): a burst's end trims once; steady traffic, busy or quiet, never does; traffic
/// that falls slowly trims at each fourfold drop. Or once what the server holds (open
/// connections plus live sessions) falls by a quarter of its most since the last trim,
/// and by at least [`Self::FEW`]: connections that close together after a burst (their
/// tasks and buffers), then their sessions when the grace period ends. Steady churn,
/// where as many connect as leave, never trims. Or once idle TLS connections have given
/// back [`Self::FEW`] more keys than were away at the fewest since the last trim (each
/// 0.6 KB of aws-lc state in glibc's heap): a crowd going quiet trims once; heartbeats,
/// which expand a quiet connection's keys and give them back, never do.
#[derive(Debug, Default)]
struct TrimWhenQuieter {
    /// Frames sent up to the last tick.
    last: u64,
    /// The most frames of one interval since the last trim.
    peak: u64,
    /// The most connections plus sessions held at a tick since the last trim.
    held_peak: u64,
    /// The fewest TLS keys given back by idle connections (and not expanded again) at a
    /// tick since the last trim (`tls.idle_keys_after`).
    keys_away_low: u64,
}

impl TrimWhenQuieter {
    /// An interval with fewer frames than this was not a burst worth trimming after.
    const BUSY: u64 = 10_000;
    /// Fewer connections and sessions than this gone is not worth a trim (each holds a
    /// few KiB: ~1,000 are a few MiB).
    const FEW: u64 = 1_000;

    /// `total`: frames sent so far; `held`: connections open plus sessions live now;
    /// `keys_away`: TLS keys given back by idle connections and not expanded again now.
    /// Whether to trim now, and why.
    fn tick(&mut self, total: u64, held: u64, keys_away: u64) -> Option<&'static str> {
        let sent = total.saturating_sub(self.last);
        self.last = total;
        self.peak = self.peak.max(sent);
        self.held_peak = self.held_peak.max(held);
        self.keys_away_low = self.keys_away_low.min(keys_away);
        let why = if self.peak >= Self::BUSY && sent.saturating_mul(4) <= self.peak {
            "traffic fell"
        } else if self.held_peak - held >= Self::FEW
            && held.saturating_mul(4) <= self.held_peak.saturating_mul(3)
        {
            "connections or sessions went"
        } else if keys_away - self.keys_away_low >= Self::FEW {
            "idle TLS connections gave their keys back"
        } else {
            return None;
        };
        self.peak = sent;
        self.held_peak = held;
        self.keys_away_low = keys_away;
        Some(why)
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    unsafe extern "C" {
        /// glibc: release free memory from the heap (malloc.h).
        fn malloc_trim(pad: usize) -> std::os::raw::c_int;
    }
    // SAFETY: malloc_trim takes the arenas' own locks; any thread may call it.
    unsafe {
        malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

/// Tells co-members when users of a dead instance went offline (Redis broker; a no-op
/// with the in-process one).
fn spawn_presence_sweep(core: &Arc<Core>) -> JoinHandle<()> {
    spawn_every(
        core,
        core.config.broker.presence_heartbeat,
        |core| async move {
            core.chat.sweep_presence().await;
        },
    )
}

/// Deletes uploads that no message attached in time (`files.orphan_ttl`).
fn spawn_file_cleanup(core: &Arc<Core>) -> JoinHandle<()> {
    spawn_every(core, core.files.cleanup_interval(), |core| async move {
        match core.files.collect_orphans().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(files = n, "deleted unattached uploads"),
            Err(e) => tracing::warn!(error = %e, "file cleanup failed"),
        }
    })
}

async fn readyz(State(app): State<Ctx>) -> impl IntoResponse {
    if app.draining.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_string(),
        );
    }
    if let Err(e) = app.core.chat.store().health() {
        // The store's own periodic check (no I/O per request).
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unreachable: {e}\n"),
        );
    }
    match app.core.chat.broker().health() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("broker: {why}\n")),
    }
}

async fn metrics(State(app): State<Ctx>) -> impl IntoResponse {
    let body = app.core.metrics.render(app.core.sessions.len());
    (
        [(
            header::CONTENT_TYPE,
            // prometheus-client renders OpenMetrics text (`# EOF`, `_total` samples).
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    /// The plain MQTT listener's address (`[mqtt] listen`).
    mqtt_addr: Option<SocketAddr>,
    /// The QUIC (HTTP/3, WebTransport) listener's address.
    http3_addr: Option<SocketAddr>,
    state: Ctx,
    task: JoinHandle<Result<(), ServerError>>,
}

/// Loads the configured certificate and key into a TLS acceptor offering `alpn` (h2 and
/// http/1.1 for HTTP; none for MQTT); `None` when TLS is not configured.
fn tls_acceptor(config: &TlsConfig, alpn: &[&[u8]]) -> Result<Option<TlsAcceptor>, ServerError> {
    Ok(rustls_config(config, alpn, false)?.map(|tls| TlsAcceptor::from(Arc::new(tls))))
}

/// The cryptography of every TLS endpoint parley has (its listeners, QUIC, its own TLS
/// client in `parley health`, the load generator's and the tests' clients): aws-lc-rs,
/// rustls's default provider, whose key exchange groups include the post-quantum hybrid
/// X25519MLKEM768 that browsers offer first (the server follows the client's order;
/// clients without it get X25519, P-256 or P-384). It replaced ring, which rustls 0.23.48
/// deprecates for the lack of it (docs/BENCHMARKS.md, "ring or aws-lc-rs").
pub fn crypto_provider() -> Arc<tokio_rustls::rustls::crypto::CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider())
}

/// The rustls configuration of the configured certificate and key, offering `alpn`
/// (TLS 1.3 only with `tls13_only`, as QUIC requires); `None` when TLS is not configured.
fn rustls_config(
    config: &TlsConfig,
    alpn: &[&[u8]],
    tls13_only: bool,
) -> Result<Option<tokio_rustls::rustls::ServerConfig>, ServerError> {
    use tokio_rustls::rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        version::TLS13,
    };
    let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) else {
        if config.cert_file.is_some() || config.key_file.is_some() {
            return Err(ServerError::Tls(
                "set both tls.cert_file and tls.key_file".into(),
            ));
        }
        return Ok(None);
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ServerError::Tls(format!("{cert}: {e}")))?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| ServerError::Tls(format!("{key}: {e}")))?;
    let builder = ServerConfig::builder_with_provider(crypto_provider());
    let builder = if tls13_only {
        builder.with_protocol_versions(&[&TLS13])
    } else {
        builder.with_safe_default_protocol_versions()
    };
    let mut tls = builder
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Some(tls))
}

/// The QUIC endpoint's configuration (`[http3]`): TLS 1.3 with ALPN `h3` and no 0-RTT
/// (early data could be replayed), and the bounds on what one connection (or a stranger
/// sending Initial packets) can make the server hold: streams, flow-control windows,
/// datagram buffers, packets buffered per connection attempt. Public for the bare
/// WebTransport floor (`parley-floor`), which serves on the very same configuration.
pub fn quic_config(config: &Config) -> Result<Option<quinn::ServerConfig>, ServerError> {
    let h3 = &config.http3;
    if !h3.enabled {
        return Ok(None);
    }
    let Some(tls) = rustls_config(&config.tls, &[b"h3"], true)? else {
        return Ok(None);
    };
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(h3.idle_timeout)
        .map_err(|e| ServerError::Tls(format!("http3.idle_timeout: {e}")))?;
    // One frame (or request body chunk) fits a stream's window; a connection's window is
    // a few of them. The defaults (1.25 MB per stream, unbounded per connection) would
    // let each client park megabytes in the server.
    let stream_window = (config.ws.max_frame_bytes as u64 + 16 * 1024).max(64 * 1024);
    transport
        .max_idle_timeout(Some(idle))
        // QUIC PINGs keep a live client's connection (and /wt session) from idling out,
        // and find a dead one within the idle timeout: /wt's heartbeat.
        .keep_alive_interval(Some(config.ws.heartbeat_interval.min(h3.idle_timeout / 2)))
        .max_concurrent_bidi_streams(h3.max_streams.into())
        // HTTP/3's control and QPACK streams (and a little room for grease).
        .max_concurrent_uni_streams(8u32.into())
        .stream_receive_window(quinn::VarInt::from_u64(stream_window).unwrap_or(quinn::VarInt::MAX))
        .receive_window(quinn::VarInt::from_u64(4 * stream_window).unwrap_or(quinn::VarInt::MAX))
        .send_window(1024 * 1024)
        .datagram_receive_buffer_size(Some(16 * 1024))
        .datagram_send_buffer_size(64 * 1024);
    server
        .transport_config(Arc::new(transport))
        .incoming_buffer_size(64 * 1024)
        .incoming_buffer_size_total(8 * 1024 * 1024);
    Ok(Some(server))
}

/// The QUIC listener's UDP socket buffers (each way). One socket carries every QUIC
/// connection, and the kernel's default (~208 KiB) overflows whenever the server is
/// descheduled for a moment under load: every datagram dropped there is a QUIC loss,
/// retransmitted and answered by a smaller congestion window. The kernel caps it at
/// `net.core.rmem_max` / `net.core.wmem_max`.
const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Binds the QUIC endpoint on `at`, with [`UDP_BUFFER_BYTES`] socket buffers.
pub fn quic_endpoint(
    config: quinn::ServerConfig,
    at: SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(at)?;
    let sock = socket2::SockRef::from(&socket);
    if let Err(e) = sock.set_recv_buffer_size(UDP_BUFFER_BYTES) {
        tracing::warn!(error = %e, "could not size the QUIC socket's receive buffer");
    }
    if let Err(e) = sock.set_send_buffer_size(UDP_BUFFER_BYTES) {
        tracing::warn!(error = %e, "could not size the QUIC socket's send buffer");
    }
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// The `Alt-Svc` value advertising HTTP/3 on `port`, if it is advertised.
fn alt_svc(config: &Config, port: u16) -> Option<axum::http::HeaderValue> {
    let max_age = config.http3.alt_svc_max_age.as_secs();
    if max_age == 0 {
        return None;
    }
    axum::http::HeaderValue::try_from(format!("h3=\":{port}\"; ma={max_age}")).ok()
}

/// The QUIC listener's accept loop: address validation (a Retry while many handshakes
/// are in progress), admission and its limits as on TCP (a refused connection attempt
/// gets CONNECTION_REFUSED), the handshake under `server.tls_handshake_timeout`, then
/// the HTTP/3 connection on the server's task tracker (so a drain waits for it). Stops
/// accepting on shutdown.
async fn accept_quic(endpoint: quinn::Endpoint, app: App, ctx: Ctx) {
    use std::sync::atomic::{AtomicU32, Ordering};
    /// Counts a handshake in progress until dropped.
    struct Handshaking(Arc<AtomicU32>);
    impl Drop for Handshaking {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let handshaking = Arc::new(AtomicU32::new(0));
    let retry_above = ctx.core.config.http3.retry_above_handshakes;
    let handshake_timeout = ctx.core.config.server.tls_handshake_timeout;
    loop {
        let incoming = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let peer = incoming.remote_address();
        if !incoming.remote_address_validated()
            && handshaking.load(Ordering::Relaxed) >= retry_above
        {
            // Stateless: the client must echo the token before anything is kept for it.
            let _ = incoming.retry();
            continue;
        }
        let slot = match ctx.admission.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                tracing::debug!(%peer, ?refusal, "QUIC connection refused by admission");
                incoming.refuse();
                continue;
            }
        };
        let connecting = match incoming.accept() {
            Ok(connecting) => connecting,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "QUIC connection attempt failed");
                continue;
            }
        };
        handshaking.fetch_add(1, Ordering::Relaxed);
        let counted = Handshaking(handshaking.clone());
        let (app, ctx2) = (app.clone(), ctx.clone());
        ctx.tracker.spawn(async move {
            let connected = tokio::time::timeout(handshake_timeout, connecting).await;
            drop(counted);
            match connected {
                Ok(Ok(quic)) => {
                    transport::http3::serve(quic, app, ctx2, PeerIp(peer.ip())).await;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "QUIC handshake failed"),
                Err(_) => tracing::debug!("QUIC handshake not finished in time"),
            }
            drop(slot);
        });
    }
}

/// Answers a refused connection with its error (plain HTTP only: a TLS client would not
/// understand it, and just sees the connection closed) and closes it.
fn refuse(mut tcp: tokio::net::TcpStream, refusal: Refusal, tls: bool) {
    tracing::debug!(?refusal, "connection refused");
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        if !tls {
            let write = async {
                tcp.write_all(&refusal.response()).await?;
                tcp.shutdown().await
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), write).await;
        }
    });
}

/// The deadlines of the stages before a request exists (`server.*_timeout`), and the
/// HTTP/2 keep-alive. Shared by every connection's task (an `Arc`, not 112 bytes in each
/// idle connection's future: a tokio task is allocated in steps of 128 bytes, and with
/// `server.keep_alive_idle` hyper's HTTP/1 state grew into the next step).
struct Stages {
    tls_handshake: Duration,
    preface: Duration,
    header_read: Duration,
    h1_idle: Duration,
    /// `server.keep_alive_release`, when shorter than `h1_idle` (else never).
    h1_release: Option<Duration>,
    h2_idle: Duration,
    h2_ping_interval: Duration,
    h2_ping_timeout: Duration,
    h2_response_header_table: u32,
    /// `server.h2_request_header_table_size`: `None` at the protocol's 4,096 (no
    /// SETTINGS entry sent).
    h2_request_header_table: Option<u32>,
    /// Counts the HTTP/1 connections that gave their state back ([`wait_idle`]).
    h1_releases: prometheus_client::metrics::counter::Counter,
}

impl Stages {
    fn new(s: &crate::config::ServerConfig, metrics: &crate::metrics::Metrics) -> Self {
        Self {
            tls_handshake: s.tls_handshake_timeout,
            preface: s.preface_timeout,
            header_read: s.header_read_timeout,
            // Never longer than a head may take: waiting for one is what it bounded.
            h1_idle: s.h1_idle(),
            h1_release: s.h1_release(),
            h2_idle: s.h2_idle_timeout,
            h2_ping_interval: s.h2_keep_alive_interval,
            h2_ping_timeout: s.h2_keep_alive_timeout,
            h2_response_header_table: s.h2_response_header_table_size,
            h2_request_header_table: (s.h2_request_header_table_size != 4096)
                .then_some(s.h2_request_header_table_size),
            h1_releases: metrics.http1_idle_releases.clone(),
        }
    }
}

/// Serves one accepted connection: HTTP/1.1 or HTTP/2 (by its first bytes: the h2c
/// preface, or after TLS whatever ALPN said), with upgrades (WebSocket) and extended
/// CONNECT (RFC 8441, WebSocket over HTTP/2). On shutdown the connection is asked to
/// finish gracefully (`watcher` tells the server when it has). Every stage before a
/// request has a deadline (`stages`): the first bytes, an HTTP/1 request head, an
/// HTTP/2 connection without an open request.
///
/// Two stages in one task, one after the other (`then`): the wait for the first bytes,
/// which holds the socket and what the connection will need, then the HTTP/1 connection
/// ([`serve_h1_again`]). The task's future is as large as the larger of the two, not
/// their sum: as one `async fn`, the socket and the other arguments kept their room
/// beside hyper's connection for its whole life (an `async fn`'s arguments are held
/// apart from what its body moves them into), and the task of a connection with a
/// request in progress (a pending long-poll) took tokio's 1,152 B step, 1,280 B to the
/// allocator, instead of 1,024 B (docs/BENCHMARKS.md, round twenty).
fn serve_connection<I>(
    io: I,
    app: App,
    watcher: Watcher,
    shutdown: CancellationToken,
    deadline: WriteDeadline,
    (peer, tls): (PeerIp, bool),
    stages: Arc<Stages>,
) -> impl Future<Output = ()> + Send
where
    I: ConnIo,
{
    // The first stage borrows the token and the stages and hands them on; what only the
    // second needs waits in its closure.
    let sniffed = async move {
        let read = tokio::select! {
            read = tokio::time::timeout(stages.preface, Sniffed::read(io)) => read,
            _ = shutdown.cancelled() => return None,
        };
        match read {
            Ok(Ok((h2, io))) => Some((h2, io, shutdown, stages)),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "connection ended before a request");
                None
            }
            Err(_) => {
                tracing::debug!(timeout = ?stages.preface, "no request in time: closing");
                None
            }
        }
    };
    futures_util::FutureExt::then(sniffed, move |sniffed| {
        let Some((h2, io, shutdown, stages)) = sniffed else {
            return Either::Right(std::future::ready(()));
        };
        let app = ConnInfo {
            app,
            deadline,
            peer,
            tls,
        };
        // The task's future is as large as its largest state and every idle connection
        // holds it, so an HTTP/2 connection (several times HTTP/1's size) runs in a task
        // of its own, sized for it: boxed in this one, it held this task's room for
        // HTTP/1 (~1.3 KB) beside its box for as long as it lived.
        //
        // The HTTP/2 connection itself (hyper's and h2's state, ~1.2 KB) is built here
        // and boxed apart from the task that drives it: built inside the task, its socket
        // and service took room twice more (the task's captured values and `serve_h2`'s
        // arguments, ~300 bytes), and a task's cell grows in steps of 128 bytes.
        if h2 {
            let streams = Streams::new();
            let conn = Box::pin(h2_connection(io, app, streams.clone(), &stages));
            tokio::spawn(serve_h2(conn, streams, watcher, shutdown, stages));
            return Either::Right(std::future::ready(()));
        }
        let conn = h1_connection(io, TowerToHyperService::new(app), &stages, Duration::ZERO);
        Either::Left(serve_h1_again(conn, watcher, shutdown, stages))
    })
}

/// The service a connection serves: the app with the connection's write deadline (SSE
/// and WebSocket set their own), its peer address (per-IP limits) and, over TLS,
/// [`OverTls`] in each request's extensions. A type of its own, not a closure, so that
/// the size tests can name the connection types that hold it.
#[derive(Clone)]
struct ConnInfo {
    app: App,
    deadline: WriteDeadline,
    peer: PeerIp,
    tls: bool,
}

impl<B> tower::Service<axum::extract::Request<B>> for ConnInfo
where
    App: tower::Service<axum::extract::Request<B>>,
{
    type Response = <App as tower::Service<axum::extract::Request<B>>>::Response;
    type Error = <App as tower::Service<axum::extract::Request<B>>>::Error;
    type Future = <App as tower::Service<axum::extract::Request<B>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.app.poll_ready(cx)
    }

    fn call(&mut self, mut req: axum::extract::Request<B>) -> Self::Future {
        let extensions = req.extensions_mut();
        extensions.insert(self.deadline.clone());
        extensions.insert(self.peer);
        if self.tls {
            extensions.insert(OverTls);
        }
        self.app.call(req)
    }
}

/// The socket a connection is served on (TCP, or TLS over it), named once for the
/// functions and futures that pass it on, as [`H1App`] names the service.
trait ConnIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}

impl<I> ConnIo for I where I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}

/// The service an HTTP/1 connection serves (the router behind the connection's layers),
/// named once for the functions that pass it between hyper connections and the idle wait.
trait H1App:
    tower::Service<
        axum::extract::Request<hyper::body::Incoming>,
        Response = axum::response::Response,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> H1App for S where
    S: tower::Service<
            axum::extract::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// An HTTP/1 connection's socket and service while it waits idle for its next request.
type H1Idle<I, S> = (Sniffed<I>, TowerToHyperService<S>);

/// hyper's HTTP/1 connection as [`h1_connection`] makes it.
type H1Connection<I, S> = http1::UpgradeableConnection<TokioIo<Sniffed<I>>, TowerToHyperService<S>>;

/// hyper's HTTP/1 connection (with upgrades: WebSocket) on `io`: its request heads
/// within `server.header_read_timeout` (the first counted from when the socket began to
/// wait, `waited` ago). Idle between requests for `server.keep_alive_idle` it is closed;
/// idle for `server.keep_alive_release` it completes instead
/// (vendor/hyper change 7, `yield_when_idle`) and its socket waits out the rest of
/// `keep_alive_idle` alone: see [`idle_parts`].
fn h1_connection<I, S>(
    io: Sniffed<I>,
    service: TowerToHyperService<S>,
    stages: &Stages,
    waited: Duration,
) -> H1Connection<I, S>
where
    I: ConnIo,
    S: H1App,
{
    let release = stages.h1_release;
    http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(stages.header_read.saturating_sub(waited))
        // vendor/hyper's idle timeout (vendor/README.md, hyper change 5): an idle
        // keep-alive connection held ~1.8 KB (its task, socket registration and header
        // timer) for the whole header read timeout. With a release, it yields then.
        .idle_timeout(release.unwrap_or(stages.h1_idle))
        .yield_when_idle(release.is_some())
        // vendor/hyper change 9: an SSE stream's body is written by its own task on the
        // socket hyper hands over after the head (`transport::sse`).
        .detach_event_streams(true)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
}

/// The socket and service of an HTTP/1 connection that completed because it waited idle
/// for `server.keep_alive_release` with nothing held for the next request (`None`: it
/// ended); hyper's state (buffers, timers, the connection itself) is dropped.
///
/// An idle keep-alive connection so holds nothing but its socket (over TLS, its TLS
/// stream) and a small task ([`wait_idle`]) that waits for its next bytes (then a new
/// task serves it with a new hyper connection, [`serve_h1_again`]), for the rest of
/// `server.keep_alive_idle`, or for shutdown (then it is closed, as hyper would have).
/// An SSE client's command connection waits so between its acks (docs/BENCHMARKS.md,
/// "Round nine: SSE's joined session"); a connection whose requests come closer
/// together than the release (back-to-back long-polls) stays in hyper throughout. A
/// task of its own rather than a loop in the connection's: a task is as large as its
/// future's largest state, and the idle wait is most of a command connection's life.
fn idle_parts<I, S>(conn: H1Connection<I, S>) -> Option<H1Idle<I, S>>
where
    I: ConnIo,
    S: H1App,
{
    if !conn.is_idle() {
        return None;
    }
    let parts = conn
        .into_parts()
        .expect("an idle connection is not upgraded");
    debug_assert!(parts.read_buf.is_empty());
    Some((parts.io.into_inner(), parts.service))
}

/// The task of an idle HTTP/1 connection ([`idle_parts`]): waits for its next bytes,
/// then serves it in a new task ([`serve_h1_again`]); closes it once it has
/// been idle for `server.keep_alive_idle` in all, or on shutdown. A request that has
/// arrived is served even when the idle time is up by the time this task runs (as hyper
/// reads before it closes): closing the socket with it unread would reset the connection
/// under the client that sent it. Boxed as a `dyn Future` (the two tasks spawn each
/// other, and the compiler cannot tell such a pair of futures is `Send` otherwise): the
/// task holds a pointer, the box the wait.
fn wait_idle<I, S>(
    (mut io, service): H1Idle<I, S>,
    watcher: Watcher,
    shutdown: CancellationToken,
    stages: Arc<Stages>,
) -> Pin<Box<dyn Future<Output = ()> + Send>>
where
    I: ConnIo,
    S: H1App,
{
    Box::pin(async move {
        // hyper's connection waited `keep_alive_release` before it yielded.
        let released = stages.h1_release.unwrap_or_default();
        stages.h1_releases.inc();
        let since = tokio::time::Instant::now();
        // The wait is a read (`Sniffed::poll_more`): its bytes are kept for the next
        // hyper connection, which reads them first, so no system call is added. Over TLS
        // a record with no request in it (a key update) is taken by rustls and the wait
        // goes on.
        let waiting = &mut io;
        let request = tokio::select! {
            // Bytes first: when the task runs late, a request that has arrived wins over
            // the idle time's end.
            biased;
            read = std::future::poll_fn(|cx| waiting.poll_more(cx)) => match read {
                Ok(n) => n > 0,
                Err(e) => {
                    tracing::debug!(error = %e, "idle HTTP/1 connection failed");
                    return;
                }
            },
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(stages.h1_idle.saturating_sub(released)) => false,
        };
        if !request {
            // Closed as hyper closes it, with a shutdown of the write side: over TLS a
            // close_notify first (a stuck write is cut by the write deadline).
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut io).await;
            tracing::trace!("idle HTTP/1 connection closed");
            return;
        }
        let conn = h1_connection(io, service, &stages, released + since.elapsed());
        tokio::spawn(serve_h1_again(conn, watcher, shutdown, stages));
    })
}

/// Serves an HTTP/1 connection's requests: its first ones ([`serve_connection`]'s second
/// stage), or the next ones after it waited idle ([`wait_idle`]). Once `shutdown` is
/// cancelled the connection is asked to finish what it is doing and close; one that
/// completes idle ([`idle_parts`]) waits for its next request in a task of its own.
fn serve_h1_again<I, S>(
    conn: H1Connection<I, S>,
    watcher: Watcher,
    shutdown: CancellationToken,
    stages: Arc<Stages>,
) -> ServeH1<I, S>
where
    I: ConnIo,
    S: H1App,
{
    ServeH1 {
        conn: Some(conn),
        cancelled: shutdown.clone().cancelled_owned(),
        graceful: false,
        after: Some((watcher, shutdown, stages)),
    }
}

pin_project_lite::pin_project! {
    /// [`serve_h1_again`]'s future, written out rather than an `async` block: it holds
    /// hyper's connection, the shutdown signal's wait and what an idle wait needs, each
    /// once. As an `async` block around a `select!` the connection's task held the
    /// connection, references to it and to the token, and the select's own state beside
    /// them: over TLS the connection's task future ([`serve_connection`]) was 840 B, a
    /// 1,024 B task cell, and is 768 B, an 896 B one (cleartext 920 → 848 B, the same
    /// cell). Every HTTP/1 connection with a request in progress, such as a pending
    /// long-poll, holds it (docs/BENCHMARKS.md, round twenty-two).
    #[must_use = "futures do nothing unless polled"]
    struct ServeH1<I, S>
    where
        I: ConnIo,
        S: H1App,
    {
        // `None` once it ended.
        conn: Option<H1Connection<I, S>>,
        #[pin]
        cancelled: tokio_util::sync::WaitForCancellationFutureOwned,
        // The connection was asked to shut down gracefully.
        graceful: bool,
        // For the idle wait after the connection ([`wait_idle`]).
        after: Option<(Watcher, CancellationToken, Arc<Stages>)>,
    }
}

impl<I, S> Future for ServeH1<I, S>
where
    I: ConnIo,
    S: H1App,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let this = self.project();
        let Some(conn) = this.conn.as_mut() else {
            return std::task::Poll::Ready(());
        };
        if !*this.graceful && this.cancelled.poll(cx).is_ready() {
            *this.graceful = true;
            Pin::new(&mut *conn).graceful_shutdown();
        }
        let ended = std::task::ready!(Pin::new(&mut *conn).poll(cx));
        let conn = this.conn.take().expect("checked above");
        let (watcher, shutdown, stages) = this.after.take().expect("taken once, with conn");
        match ended.map(|()| idle_parts(conn)) {
            Ok(Some(idle)) => {
                tokio::spawn(wait_idle(idle, watcher, shutdown, stages));
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "connection ended with an error"),
        }
        std::task::Poll::Ready(())
    }
}

/// hyper's HTTP/2 connection on a socket `I`, serving `S` (counted).
type H2Connection<I, S> = http2::Connection<TokioIo<I>, Counted<S>, TokioExecutor>;

/// An HTTP/2 connection on `io`: keep-alive PINGs (a peer that does not answer is cut),
/// its requests counted in `streams`.
fn h2_connection<I, S>(io: I, app: S, streams: Streams, stages: &Stages) -> H2Connection<I, S>
where
    I: ConnIo,
    S: H1App,
{
    // `Counted` is a hyper service itself: through `TowerToHyperService`, each request's
    // task (hyper spawns one per HTTP/2 stream) held a `Oneshot` with room for the
    // service and the request (~300 bytes) for as long as its response streamed.
    let service = Counted::new(app, streams);
    http2::Builder::new(TokioExecutor::new())
        .enable_connect_protocol()
        .timer(TokioTimer::new())
        .keep_alive_interval(stages.h2_ping_interval)
        .keep_alive_timeout(stages.h2_ping_timeout)
        // vendor/README.md, h2 change 8: the response headers' HPACK table.
        .max_send_header_table_size(stages.h2_response_header_table)
        // The request headers' table (SETTINGS_HEADER_TABLE_SIZE), bounded once the
        // client acknowledges it (vendor/README.md, h2 change 23).
        .header_table_size(stages.h2_request_header_table)
        .serve_connection(TokioIo::new(io), service)
}

/// Serves an HTTP/2 connection (from [`h2_connection`], whose requests `streams`
/// counts) in its own task: a GOAWAY once no request has been open for
/// `server.h2_idle_timeout`, or on shutdown; `watcher` is dropped when it ends.
fn serve_h2<I, S>(
    conn: Pin<Box<H2Connection<I, S>>>,
    streams: Streams,
    watcher: Watcher,
    shutdown: CancellationToken,
    stages: Arc<Stages>,
) -> ServeH2<I, S>
where
    I: ConnIo,
    S: H1App,
{
    ServeH2 {
        sleep: tokio::time::sleep_until(streams.due(stages.h2_idle)),
        conn,
        streams,
        stages,
        phase: H2Phase::Serving,
        cancelled: shutdown.cancelled_owned(),
        _watcher: watcher,
    }
}

/// Where an HTTP/2 connection's task ([`ServeH2`]) is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum H2Phase {
    /// Serving requests, until the connection ends, the server shuts down or no
    /// request has been open for `server.h2_idle_timeout`.
    Serving,
    /// A GOAWAY was sent for idleness. A client that answers its PING sees the
    /// connection closed at once; one that does not would keep it forever: it is
    /// dropped when, after each keep-alive timeout, still no request is open (a
    /// WebSocket tunnel runs until it ends).
    GoneAway,
    /// Until the connection ends: after a shutdown's GOAWAY, or a tunnel after an idle
    /// one.
    Draining,
}

pin_project_lite::pin_project! {
    /// [`serve_h2`]'s future, written out rather than an `async` block around
    /// `select!`s: it holds the connection's box, one timer (the idle wait's, then the
    /// keep-alive timeout's after a GOAWAY) and the shutdown signal's wait, each once.
    /// The `async` version held references to them and the selects' states beside them,
    /// and the task took tokio's 512 B cell; this one fits 384 B (docs/BENCHMARKS.md,
    /// round twenty-three). Every HTTP/2 connection holds it for its whole life.
    #[must_use = "futures do nothing unless polled"]
    struct ServeH2<I, S>
    where
        I: ConnIo,
        S: H1App,
    {
        conn: Pin<Box<H2Connection<I, S>>>,
        streams: Streams,
        stages: Arc<Stages>,
        phase: H2Phase,
        #[pin]
        cancelled: tokio_util::sync::WaitForCancellationFutureOwned,
        #[pin]
        sleep: tokio::time::Sleep,
        // Tells the server's graceful shutdown that the connection ended, when dropped.
        _watcher: Watcher,
    }
}

impl<I, S> Future for ServeH2<I, S>
where
    I: ConnIo,
    S: H1App,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let mut this = self.project();
        loop {
            if let std::task::Poll::Ready(ended) = this.conn.as_mut().poll(cx) {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return std::task::Poll::Ready(());
            }
            match *this.phase {
                H2Phase::Serving => {
                    if this.cancelled.as_mut().poll(cx).is_ready() {
                        this.conn.as_mut().graceful_shutdown();
                        *this.phase = H2Phase::Draining;
                        continue;
                    }
                    let idle = this.stages.h2_idle;
                    std::task::ready!(this.streams.poll_idle_for(idle, this.sleep.as_mut(), cx));
                    tracing::debug!(?idle, "HTTP/2 connection without requests: GOAWAY");
                    this.conn.as_mut().graceful_shutdown();
                    *this.phase = H2Phase::GoneAway;
                    let timeout = this.stages.h2_ping_timeout;
                    this.sleep
                        .as_mut()
                        .reset(tokio::time::Instant::now() + timeout);
                }
                H2Phase::GoneAway => {
                    std::task::ready!(this.sleep.as_mut().poll(cx));
                    if this.streams.tunnelled() {
                        *this.phase = H2Phase::Draining;
                    } else if this.streams.quiet() {
                        tracing::debug!("HTTP/2 peer did not close after GOAWAY: dropping it");
                        return std::task::Poll::Ready(());
                    } else {
                        let timeout = this.stages.h2_ping_timeout;
                        this.sleep
                            .as_mut()
                            .reset(tokio::time::Instant::now() + timeout);
                    }
                }
                H2Phase::Draining => return std::task::Poll::Pending,
            }
        }
    }
}

/// Sets TCP_NODELAY on a listening socket, for the sockets it accepts: Linux copies a
/// listener's TCP options into each socket it accepts, so they need no `setsockopt` of
/// their own (one system call fewer per connection). `true` when they inherit it;
/// elsewhere, or if the listener refused, each accepted socket is set
/// ([`accepted_nodelay`]).
fn listener_nodelay(listener: &TcpListener) -> bool {
    cfg!(target_os = "linux")
        && socket2::SockRef::from(listener)
            .set_tcp_nodelay(true)
            .is_ok()
}

/// TCP_NODELAY on an accepted socket, unless it has it from its listener
/// ([`listener_nodelay`]). Every TCP connection the server accepts has it: replies and
/// pushes are written whole, and Nagle's algorithm would hold a small one back until
/// the last was acknowledged.
fn accepted_nodelay(tcp: &tokio::net::TcpStream, inherited: bool) {
    if !inherited {
        let _ = tcp.set_nodelay(true);
    }
}

/// The plain MQTT listener's accept loop (`[mqtt] listen`): admission and its limits as
/// on the HTTP listener (a refused connection is just closed), TLS when configured, TCP
/// keep-alive probes, then the MQTT connection on the server's task tracker (so a drain
/// waits for it). Stops accepting on shutdown.
async fn accept_mqtt(listener: TcpListener, tls: Option<TlsAcceptor>, ctx: Ctx) {
    let nodelay = listener_nodelay(&listener);
    let config = &ctx.core.config;
    let write_timeout = config.server.write_timeout;
    let handshake_timeout = config.server.tls_handshake_timeout;
    let probe = config.ws.heartbeat_interval;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(probe)
        .with_interval(probe)
        .with_retries(3);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = ctx.admission.admit(peer.ip()) else {
            tracing::debug!(%peer, "MQTT connection refused by admission");
            continue;
        };
        accepted_nodelay(&tcp, nodelay);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        let io = DeadlineIo::new(tcp, WriteDeadline::new(write_timeout)).with_slot(slot);
        match &tls {
            None => transport::mqtt::spawn_stream(io, ctx.clone()),
            Some(acceptor) => {
                let handshake = acceptor.accept(io);
                let ctx2 = ctx.clone();
                ctx.tracker.spawn(async move {
                    match tokio::time::timeout(handshake_timeout, handshake).await {
                        Ok(Ok(stream)) => transport::mqtt::serve_stream(stream, ctx2).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "MQTT TLS handshake failed"),
                        Err(_) => tracing::debug!("MQTT TLS handshake not finished in time"),
                    }
                });
            }
        }
    }
}

impl Server {
    /// Binds `config.server.listen` and starts serving in the background.
    pub async fn start(config: Config) -> Result<Server, ServerError> {
        Self::start_inner(config, None).await
    }

    /// [`Server::start`] on a store the caller opened (one of its own, or one it keeps a
    /// handle on); `store.backend` then opens nothing.
    pub async fn start_with_store(
        config: Config,
        store: Arc<dyn Store>,
    ) -> Result<Server, ServerError> {
        Self::start_inner(config, Some(store)).await
    }

    async fn start_inner(
        config: Config,
        store: Option<Arc<dyn Store>>,
    ) -> Result<Server, ServerError> {
        config.validate()?;
        let addr = config.server.listen;
        let tls = tls_acceptor(&config.tls, &[b"h2", b"http/1.1"])?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        let mqtt_listener = match config.mqtt.listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind { addr, source })?;
                let local = listener
                    .local_addr()
                    .map_err(|source| ServerError::Bind { addr, source })?;
                Some((listener, local, tls_acceptor(&config.tls, &[])?))
            }
            None => None,
        };
        // QUIC beside TLS: by default the same address and port number, over UDP.
        let quic = match quic_config(&config)? {
            Some(quic) => {
                let at = config.http3.listen.unwrap_or(addr);
                let endpoint = quic_endpoint(quic, at)
                    .map_err(|source| ServerError::Bind { addr: at, source })?;
                let local = endpoint
                    .local_addr()
                    .map_err(|source| ServerError::Bind { addr: at, source })?;
                Some((endpoint, local, alt_svc(&config, local.port())))
            }
            None => None,
        };
        let config_limits = config.limits.clone();
        let tls_configured = config.tls.cert_file.is_some();
        let advertise = if !config.broker.advertise.is_empty() {
            config.broker.advertise.clone()
        } else if addr.ip().is_unspecified() {
            format!("127.0.0.1:{}", addr.port())
        } else {
            addr.to_string()
        };
        let core = match store {
            Some(store) => assemble_core(config, store)?,
            None => open_core(config).await?,
        };
        core.chat.broker().advertise(advertise);
        let state = Ctx::new(core, Admission::new(&config_limits), Arc::default());
        let maintenance = spawn_maintenance(&state.core);
        let file_cleanup = spawn_file_cleanup(&state.core);
        let presence_sweep = spawn_presence_sweep(&state.core);
        let memory_trim = spawn_memory_trim(&state.core);
        let tls_idle_clock = spawn_tls_idle_clock(&state.core);
        let quic_alt_svc = quic.as_ref().and_then(|(_, _, alt)| alt.clone());
        let mqtt_addr = mqtt_listener.map(|(listener, addr, tls)| {
            tokio::spawn(accept_mqtt(listener, tls, state.clone()));
            tracing::info!(%addr, tls = tls_configured, "listening for MQTT");
            addr
        });
        let app = app(state.clone());
        let (http3_addr, endpoint) = match quic {
            Some((endpoint, local, _)) => {
                tokio::spawn(accept_quic(endpoint.clone(), app.clone(), state.clone()));
                tracing::info!(addr = %local, "listening for HTTP/3 (QUIC)");
                (Some(local), Some(endpoint))
            }
            None => (None, None),
        };
        // TCP responses advertise HTTP/3 (RFC 7838), so browsers try it next time.
        let app = match quic_alt_svc {
            Some(value) => app.with_alt_svc(value),
            None => app,
        };
        let s = state.clone();
        let write_timeout = state.core.config.server.write_timeout;
        let stages = Arc::new(Stages::new(&state.core.config.server, &state.core.metrics));
        // The drain sequence: not ready first (load balancers stop sending new clients)
        // while still serving, for `server.drain_delay`; then stop accepting and tell
        // every client to reconnect; then wait for connections to finish.
        let (draining, shutdown) = (state.draining.clone(), state.shutdown.clone());
        let delay = state.core.config.server.drain_delay;
        tokio::spawn(async move {
            tokio::select! {
                _ = draining.cancelled() => {}
                _ = shutdown.cancelled() => return,
            }
            tracing::info!(?delay, "draining: /readyz answers 503");
            tokio::time::sleep(delay).await;
            shutdown.cancel();
        });
        let nodelay = listener_nodelay(&listener);
        let task = tokio::spawn(async move {
            let graceful = GracefulShutdown::new();
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = s.shutdown.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(e) => {
                            // Out of fds and the like: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                accepted_nodelay(&tcp, nodelay);
                let slot = match s.admission.admit(peer.ip()) {
                    Ok(slot) => slot,
                    Err(refusal) => {
                        refuse(tcp, refusal, tls.is_some());
                        continue;
                    }
                };
                let (app, watcher, tls) = (app.clone(), graceful.watcher(), tls.clone());
                let shutdown = s.connection_shutdown();
                let deadline = WriteDeadline::new(write_timeout);
                let io = DeadlineIo::new(tcp, deadline.clone()).with_slot(slot);
                let peer = PeerIp(peer.ip());
                let stages = stages.clone();

                // Every idle connection holds its task's future, which is as large as its
                // largest state: a plain connection's task is `serve_connection` alone,
                // not sized for the TLS path (its handshake, a connection over the TLS
                // stream) as well.
                match tls {
                    None => {
                        tokio::spawn(serve_connection(
                            io,
                            app,
                            watcher,
                            shutdown,
                            deadline,
                            (peer, false),
                            stages,
                        ));
                    }
                    Some(acceptor) => {
                        // rustls's connection state (~1.2 KB) is boxed, here and while
                        // the handshake runs: inline, it took room in this task's future
                        // more than once (the handshake's state, then the stream in
                        // `serve_connection` and in `serve_h2`'s argument and
                        // connection), for as long as the connection lives.
                        // The connection is then served by a task of its own, sized for
                        // `serve_connection` alone, as a plain one: awaited in this one,
                        // it held this task's captured values beside its own copies of
                        // them and the handshake's timer (~640 B more for every pending
                        // long-poll over TLS, docs/BENCHMARKS.md round nineteen).
                        tokio::spawn(async move {
                            let handshake = Box::pin(acceptor.accept(io));
                            match tokio::time::timeout(stages.tls_handshake, handshake).await {
                                Ok(Ok(stream)) => {
                                    tokio::spawn(serve_connection(
                                        Box::new(stream),
                                        app,
                                        watcher,
                                        shutdown,
                                        deadline,
                                        (peer, true),
                                        stages,
                                    ));
                                }
                                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                                Err(_) => tracing::debug!(
                                    timeout = ?stages.tls_handshake,
                                    "TLS handshake not finished in time: closing"
                                ),
                            }
                        });
                    }
                }
            }
            drop(listener);
            // In-flight requests finish (SSE streams and polls end themselves on the
            // shutdown signal); upgraded WebSockets were told to reconnect.
            let drain = s.core.config.server.shutdown_timeout;
            let drained = tokio::time::timeout(drain, async {
                graceful.shutdown().await;
                s.tracker.close();
                s.tracker.wait().await;
            })
            .await;
            if drained.is_err() {
                tracing::warn!(open = s.tracker.len(), "drain timeout; closing the rest");
            }
            // What was published during the drain still reaches the other instances.
            let flush = s.core.chat.broker().flush();
            if tokio::time::timeout(std::time::Duration::from_secs(2), flush)
                .await
                .is_err()
            {
                tracing::warn!("broker flush timed out: other instances repair from the log");
            }
            if let Some(endpoint) = endpoint {
                endpoint.close(0u32.into(), b"shutting down");
            }
            maintenance.abort();
            file_cleanup.abort();
            presence_sweep.abort();
            if let Some(trim) = &memory_trim {
                trim.abort();
            }
            if let Some(clock) = &tls_idle_clock {
                clock.abort();
            }
            Ok(())
        });
        tracing::info!(%addr, tls = state.core.config.tls.cert_file.is_some(), "listening");
        Ok(Server {
            addr,
            mqtt_addr,
            http3_addr,
            state,
            task,
        })
    }
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The plain MQTT listener's address, when `[mqtt] listen` is set.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.mqtt_addr
    }

    /// The QUIC listener's address (HTTP/3 and `/wt`), when TLS is configured and
    /// `http3.enabled`.
    pub fn http3_addr(&self) -> Option<SocketAddr> {
        self.http3_addr
    }

    pub fn state(&self) -> &Ctx {
        &self.state
    }

    /// Starts a graceful shutdown: `/readyz` answers 503 at once; after
    /// `server.drain_delay` the server stops accepting, tells clients to reconnect and
    /// drains.
    pub fn shutdown(&self) {
        self.state.draining.cancel();
    }

    /// Waits until the server has stopped (after [`Server::shutdown`]).
    pub async fn wait(self) -> Result<(), ServerError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(ServerError::Serve(std::io::Error::other(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TrimWhenQuieter;

    /// Frames per interval in, trims out (nothing held).
    fn trims(per_interval: &[u64]) -> Vec<bool> {
        let held: Vec<u64> = per_interval.iter().map(|_| 0).collect();
        trims_held(per_interval, &held)
            .iter()
            .map(|t| t.is_some())
            .collect()
    }

    /// Frames per interval and connections plus sessions held at each tick in, trims out.
    fn trims_held(per_interval: &[u64], held: &[u64]) -> Vec<Option<&'static str>> {
        let mut p = TrimWhenQuieter::default();
        let mut total = 0;
        per_interval
            .iter()
            .zip(held)
            .map(|(n, &h)| {
                total += n;
                p.tick(total, h, 0)
            })
            .collect()
    }

    /// Idle TLS connections giving their keys back (`tls.idle_keys_after`) free aws-lc's
    /// key state in glibc's heap: trimmed once a thousand more are away than at the
    /// fewest since the last trim; heartbeats that expand and give back as many never.
    #[test]
    fn the_heap_is_trimmed_when_idle_tls_connections_give_their_keys_back() {
        let mut p = TrimWhenQuieter::default();
        let away = [
            0, 10_000, 10_000, 10_200, 9_800, 10_100, 4_000, 4_500, 5_100, 5_100,
        ];
        let trims: Vec<bool> = away.iter().map(|&k| p.tick(0, 0, k).is_some()).collect();
        assert_eq!(
            trims,
            [
                false, true, false, false, false, false, false, false, true, false
            ]
        );
    }

    #[test]
    fn the_heap_is_trimmed_when_connections_and_sessions_go_but_not_for_churn() {
        const T: Option<&str> = Some("traffic fell");
        const H: Option<&str> = Some("connections or sessions went");
        // A burst to 2,000 connections with as many sessions: trimmed when the burst
        // ends, again when the connections close, again when their grace period ends.
        assert_eq!(
            trims_held(
                &[0, 400_000, 400_000, 100, 0, 0, 0, 0],
                &[4_000, 4_000, 4_000, 4_000, 2_000, 2_000, 2_000, 0]
            ),
            [None, None, None, T, H, None, None, H]
        );
        // Churn: as many come as go, no traffic: never.
        assert!(
            trims_held(&[0; 6], &[5_000, 4_900, 5_100, 5_000, 4_800, 5_000])
                .iter()
                .all(Option::is_none)
        );
        // A small server emptying: fewer than FEW gone is not worth a trim.
        assert!(
            trims_held(&[0; 3], &[900, 100, 0])
                .iter()
                .all(Option::is_none)
        );
        // A slow decline trims at each quarter gone (and at least FEW).
        assert_eq!(
            trims_held(&[0; 6], &[20_000, 17_000, 15_000, 12_000, 11_000, 9_000]),
            [None, None, H, None, H, None]
        );
    }

    #[test]
    fn the_heap_is_trimmed_once_after_a_burst_and_never_while_traffic_is_steady() {
        // A burst, then quiet: one trim, when it ends.
        assert_eq!(
            trims(&[0, 400_000, 400_000, 20, 0, 0, 30]),
            [false, false, false, true, false, false, false]
        );
        // Steady busy traffic, and steady light traffic: never.
        assert!(trims(&[500_000; 10]).iter().all(|t| !t));
        assert!(trims(&[9_000, 0, 9_000, 0, 9_000]).iter().all(|t| !t));
        // Falling by half each interval: a trim at each fourfold drop.
        assert_eq!(
            trims(&[160_000, 80_000, 40_000, 20_000, 10_000, 5_000]),
            [false, false, true, false, true, false]
        );
        // A second burst after the first trim: trimmed again when it ends.
        assert_eq!(
            trims(&[100_000, 0, 100_000, 100_000, 1_000]),
            [false, true, false, false, true]
        );
    }
}

#[cfg(test)]
mod nodelay_tests {
    use super::{TcpListener, accepted_nodelay, listener_nodelay};

    /// Every accepted socket has TCP_NODELAY: inherited from its listener on Linux (no
    /// `setsockopt` per connection), set on it elsewhere.
    #[tokio::test]
    async fn accepted_sockets_have_tcp_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let inherited = listener_nodelay(&listener);
        assert_eq!(inherited, cfg!(target_os = "linux"));
        let addr = listener.local_addr().unwrap();
        for _ in 0..3 {
            let client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (tcp, _) = listener.accept().await.unwrap();
            if inherited {
                // Before `accepted_nodelay`: the listener's option alone.
                assert!(tcp.nodelay().unwrap());
            }
            accepted_nodelay(&tcp, inherited);
            assert!(tcp.nodelay().unwrap());
            drop(client);
        }
    }
}
/// A TLS connection's stream is one allocation (`Box::new(stream)` in the accept loop):
/// tokio-rustls's `TlsStream`, rustls's `ServerConnection` and parley's deadline wrapper.
/// At most 512 B it takes jemalloc's 512 B size class: 800 B took the 896 B one (before
/// vendor/rustls change 6 boxed the early-data state), 744 B the 768 B one (before change
/// 7 made `ServerConnection` 528 B), 632 B the 640 B one (before change 9 made it 400 B).
#[cfg(test)]
mod tls_stream_size {
    #[test]
    fn the_tls_stream_fits_a_512_byte_size_class() {
        type Deadline = crate::transport::deadline::DeadlineIo<tokio::net::TcpStream>;
        let size = std::mem::size_of::<tokio_rustls::server::TlsStream<Deadline>>();
        let connection = std::mem::size_of::<tokio_rustls::rustls::ServerConnection>();
        eprintln!("TlsStream {size} B (ServerConnection {connection} B)");
        assert!(size <= 512, "{size}");
    }
}

/// The task of an HTTP/1 connection with a request in progress (a pending long-poll, a
/// slow handler) is [`serve_connection`]'s future with tokio's 104 B around it, in cells
/// of 128 B: at most 920 B it is a 1,024 B cell, one byte more the 1,152 B step, which
/// the allocator serves from its 1,280 B class. A debug build lays it out as a release
/// build does, near enough. It was 1,176 B in cleartext and 1,016 B over TLS (a boxed
/// stream) as an `async fn` holding its arguments beside hyper's connection, and hyper's
/// connection held an unused 96 B header map (vendor/hyper change 11).
#[cfg(test)]
mod connection_task_size {
    use super::*;

    fn future_size<A, B, C, D, E, G, H, F>(_: fn(A, B, C, D, E, G, H) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A tokio task is its future and 104 B, in cells of 128 B: at most 920 B of future
    /// is a 1,024 B cell, at most 792 B an 896 B one (jemalloc's classes of the same
    /// sizes). Over TLS the connection's task fits the smaller one (round twenty-two),
    /// in cleartext (the socket inline, not boxed) the larger.
    #[test]
    fn an_http1_connection_task_fits_its_cell() {
        type Plain = crate::transport::deadline::DeadlineIo<tokio::net::TcpStream>;
        type Tls = Box<tokio_rustls::server::TlsStream<Plain>>;
        let plain = future_size(serve_connection::<Plain>);
        let tls = future_size(serve_connection::<Tls>);
        eprintln!("serve_connection: {plain} B in cleartext, {tls} B over TLS");
        assert!(
            plain <= 920,
            "a cleartext connection's task future is {plain} B"
        );
        assert!(tls <= 792, "a TLS connection's task future is {tls} B");
    }
}

/// An HTTP/2 connection is two allocations for its whole life: hyper's connection
/// (boxed, [`h2_connection`]) and the task that drives it ([`ServeH2`]). jemalloc's
/// size classes step by 128 B from 512 to 1,024 B; a tokio task is its future and
/// 104 B in cells of 128 B, so at most 280 B of future is a 384 B cell. Round
/// twenty-three: the connection 1,048 → 1,016 B in cleartext (vendor/hyper change 12),
/// the task 512 → 384 B. Round twenty-nine: the connection 1,016 → 840 B in cleartext,
/// the 896 B class, and 936 → 760 B over TLS, the 768 B class (vendor/h2 changes 27 to
/// 29).
#[cfg(test)]
mod http2_connection_size {
    use super::*;

    fn future_size<A, B, C, D, E, F>(_: fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn an_http2_connection_and_its_task_fit_their_classes() {
        type Plain = Sniffed<crate::transport::deadline::DeadlineIo<tokio::net::TcpStream>>;
        type Tls = Sniffed<Box<tokio_rustls::server::TlsStream<DeadlineIo<tokio::net::TcpStream>>>>;
        let plain = std::mem::size_of::<H2Connection<Plain, ConnInfo>>();
        let tls = std::mem::size_of::<H2Connection<Tls, ConnInfo>>();
        let task = future_size(serve_h2::<Plain, ConnInfo>);
        eprintln!(
            "HTTP/2 connection {plain} B in cleartext, {tls} B over TLS; its task's future {task} B"
        );
        assert!(plain <= 896, "a cleartext HTTP/2 connection is {plain} B");
        assert!(tls <= 768, "an HTTP/2 connection over TLS is {tls} B");
        assert!(
            task <= 280,
            "an HTTP/2 connection's task future is {task} B"
        );
    }
}
