//! Configuration: one typed tree with a default for every option.
//!
//! Layers, lowest first: built-in defaults, the TOML file (`config/parley.toml` unless
//! `--config` names another), `PARLEY_*` environment variables (`__` separates sections:
//! `PARLEY_AUTH__JWT_SECRET`), then command-line flags. `config/parley.toml` documents
//! every option; `tests/config.rs` checks that it parses to exactly these defaults.

use std::{net::SocketAddr, path::Path, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

use crate::codec::Encoding;

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub auth: AuthConfig,
    pub ws: WsConfig,
    pub session: SessionConfig,
    pub chat: ChatConfig,
    pub store: StoreConfig,
    pub sse: SseConfig,
    pub poll: PollConfig,
    pub tls: TlsConfig,
    pub web: WebConfig,
    pub limits: LimitsConfig,
    pub files: FilesConfig,
    pub broker: BrokerConfig,
    pub mqtt: MqttConfig,
}

/// `/mqtt`: MQTT 3.1.1 over WebSocket (subprotocol `mqtt`) on the same listener as `/ws`
/// (docs/PROTOCOL.md, "MQTT").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Serve `/mqtt` (off: the route answers 404).
    pub enabled: bool,
    /// Also listen for plain MQTT (no WebSocket) on this address: TCP, or TLS when `[tls]`
    /// is configured. Unset (the default): no such listener. Independent of `enabled`.
    pub listen: Option<SocketAddr>,
    /// What the payload of a PUBLISH parley sends is: `body` (the message body, presence
    /// `online`/`offline`, the typing user, the announcement text) or `json` (the push's
    /// proto3 JSON object: a `Message`, `Presence`, `TypingEvent` or `Announcement`).
    pub payload: MqttPayload,
    /// Largest MQTT packet a client may send, fixed header included (bytes); a larger one
    /// closes its connection. Also bounds the bytes buffered for one packet that spans
    /// several WebSocket messages.
    pub max_packet_bytes: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: None,
            payload: MqttPayload::Body,
            max_packet_bytes: 64 * 1024,
        }
    }
}

/// The payload of what parley publishes over MQTT (`mqtt.payload`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MqttPayload {
    /// The raw body (UTF-8 bytes).
    Body,
    /// The push as its proto3 JSON object.
    Json,
}

/// Limits and rate limits against abuse. Every limit is per instance; 0 turns one off.
/// Rates are per second with a burst allowance (token buckets).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open TCP connections in total (WebSocket, SSE, long-poll, HTTP).
    pub max_connections: u64,
    /// Open TCP connections from one IP address.
    pub max_connections_per_ip: u64,
    /// New TCP connections per second from one IP address.
    pub connects_per_ip_per_second: f64,
    pub connects_per_ip_burst: f64,
    /// SSE tickets minted per second for one IP address.
    pub tickets_per_ip_per_second: f64,
    pub tickets_per_ip_burst: f64,
    /// Live sessions of one user (devices, tabs).
    pub max_sessions_per_user: u64,
    /// Rooms one user may be a member of (joins, room creation, invitations, new DMs).
    pub max_rooms_per_user: u64,
    /// Messages one user may send per second (WebSocket, HTTP commands and the API).
    pub sends_per_second: f64,
    pub sends_burst: f64,
    /// Joins (and room creations) one user may make per second.
    pub joins_per_second: f64,
    pub joins_burst: f64,
    /// `signal` commands one user may send per second.
    pub signals_per_second: f64,
    pub signals_burst: f64,
    /// Signal bytes (kind + payload) one user may be sent per second, by all senders
    /// together (a byte budget per recipient).
    pub signal_bytes_per_second: f64,
    pub signal_bytes_burst: f64,
    /// `history` and `sync` requests one user may make per second.
    pub reads_per_second: f64,
    pub reads_burst: f64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            max_connections_per_ip: 10_000,
            connects_per_ip_per_second: 100.0,
            connects_per_ip_burst: 200.0,
            tickets_per_ip_per_second: 10.0,
            tickets_per_ip_burst: 20.0,
            max_sessions_per_user: 32,
            max_rooms_per_user: 1000,
            sends_per_second: 20.0,
            sends_burst: 100.0,
            joins_per_second: 5.0,
            joins_burst: 50.0,
            signals_per_second: 10.0,
            signals_burst: 50.0,
            signal_bytes_per_second: 65536.0,
            signal_bytes_burst: 262144.0,
            reads_per_second: 20.0,
            reads_burst: 200.0,
        }
    }
}

impl LimitsConfig {
    /// No limits at all (tests that are not about them, load generators).
    pub fn off() -> Self {
        Self {
            max_connections: 0,
            max_connections_per_ip: 0,
            connects_per_ip_per_second: 0.0,
            connects_per_ip_burst: 0.0,
            tickets_per_ip_per_second: 0.0,
            tickets_per_ip_burst: 0.0,
            max_sessions_per_user: 0,
            max_rooms_per_user: 0,
            sends_per_second: 0.0,
            sends_burst: 0.0,
            joins_per_second: 0.0,
            joins_burst: 0.0,
            signals_per_second: 0.0,
            signals_burst: 0.0,
            signal_bytes_per_second: 0.0,
            signal_bytes_burst: 0.0,
            reads_per_second: 0.0,
            reads_burst: 0.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// On SIGTERM/SIGINT: how long connections get to drain before the process exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// On SIGTERM/SIGINT: how long `/readyz` answers 503 while parley still serves, so
    /// load balancers stop sending new clients before it stops accepting.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// A socket write that makes no progress for this long fails and the connection is
    /// closed (HTTP responses and long-poll replies; SSE streams use
    /// `sse.write_timeout`, WebSockets `ws.write_timeout`).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Deadlines before a request exists, so silent or trickling sockets cannot hold
    /// connection slots: a TLS handshake must finish within `tls_handshake_timeout`;
    /// then the client must send enough to tell HTTP/1 from HTTP/2 (its first bytes, or
    /// the whole HTTP/2 connection preface) within `preface_timeout`.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub preface_timeout: Duration,
    /// HTTP/1: a request head must arrive in full within this (also how long a
    /// keep-alive connection may wait for its next request).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// HTTP/2: a connection with no request open for this long is closed (GOAWAY).
    #[serde(with = "humantime_serde")]
    pub h2_idle_timeout: Duration,
    /// HTTP/2: a PING is sent after this long without a frame from the client; no answer
    /// within `h2_keep_alive_timeout` closes the connection.
    #[serde(with = "humantime_serde")]
    pub h2_keep_alive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub h2_keep_alive_timeout: Duration,
    /// Browser origins (e.g. `https://app.example.com`) allowed to use the API, SSE,
    /// long-poll and /ws from another origin (CORS, and the WebSocket origin check).
    /// Same-origin requests and clients that send no `Origin` are always allowed. `*`
    /// allows any origin.
    pub allowed_origins: Vec<String>,
    /// Compress long-poll replies and HTTP API responses (gzip, brotli or zstd, by the
    /// request's `Accept-Encoding`). Never SSE streams or WebSockets.
    pub http_compression: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            // Loopback: safe with the development secret. Containers and real
            // deployments set an address reachable from elsewhere, and a secret.
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shutdown_timeout: Duration::from_secs(10),
            drain_delay: Duration::from_secs(2),
            write_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            preface_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            h2_idle_timeout: Duration::from_secs(30),
            h2_keep_alive_interval: Duration::from_secs(20),
            h2_keep_alive_timeout: Duration::from_secs(20),
            allowed_origins: Vec::new(),
            http_compression: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SseConfig {
    /// Comment lines sent on an idle stream so proxies do not cut it.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// The `retry:` hint: how long the browser waits before reconnecting.
    #[serde(with = "humantime_serde")]
    pub retry: Duration,
    /// A stream write that makes no progress for this long closes the stream (the client
    /// stopped reading); the session waits for a resume as after any drop.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
}

impl Default for SseConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(15),
            retry: Duration::from_secs(2),
            write_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PollConfig {
    /// How long a poll waits for frames when the request does not say (`wait`).
    #[serde(with = "humantime_serde")]
    pub default_hold: Duration,
    /// The longest hold a request may ask for.
    #[serde(with = "humantime_serde")]
    pub max_hold: Duration,
}

impl Default for PollConfig {
    fn default() -> Self {
        Self {
            default_hold: Duration::from_secs(30),
            max_hold: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain. With `key_file`, parley serves HTTPS/WSS (HTTP/2 by ALPN)
    /// instead of plain HTTP.
    pub cert_file: Option<String>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<String>,
}

/// The browser SDK and demo page (`src/web.rs`). The SDK (`/sdk/parley.js`) is always
/// served.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// Serve the demo chat page at `/`.
    pub demo: bool,
    /// Development mode: `POST /api/v1/dev/token` mints a token for any user name. Never
    /// in production.
    pub dev_tokens: bool,
    /// Lifetime of a development token.
    #[serde(with = "humantime_serde")]
    pub dev_token_ttl: Duration,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            demo: true,
            dev_tokens: false,
            dev_token_ttl: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (readable) or `json` (one object per line).
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `parley=debug,info`. `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
    ES256,
}

/// The development secret `cargo run` starts with; parley warns loudly while it is in use.
pub const DEV_JWT_SECRET: &str = "parley-dev-secret-change-me";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// JWT signature algorithm.
    pub algorithm: JwtAlgorithm,
    /// HS256 shared secret.
    pub jwt_secret: String,
    /// RS256/ES256: PEM file with the public key that verifies tokens.
    pub public_key_file: Option<String>,
    /// RS256/ES256: PEM file with the private key, only needed by `parley token`.
    pub private_key_file: Option<String>,
    /// Clock skew tolerated when checking `exp`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// A new connection must send `connect` within this time or is closed.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Lifetime of an SSE ticket (`POST /api/v1/tickets`) before its first use.
    #[serde(with = "humantime_serde")]
    pub ticket_ttl: Duration,
    /// Signs SSE tickets, so every instance can tell a ticket the cluster issued (whose
    /// session is gone: 410) from one never issued (401). Empty: derived from
    /// `jwt_secret` with HS256, random per process otherwise. The same on every instance.
    pub ticket_secret: String,
    /// Bearer token for the admin HTTP API (announcements, server-side publish). Empty
    /// disables those endpoints.
    pub admin_token: String,
    /// Key id (`kid`) of the key above: tokens whose header names this `kid` verify with
    /// it, and `parley token` writes it. Empty: the default key, which verifies tokens
    /// without a `kid` or with one no key has.
    pub key_id: String,
    /// Further keys that verify tokens, each picked by the token header's `kid`: keeps
    /// tokens signed with an old (or a not yet used) key valid during a key rotation.
    pub extra_keys: Vec<JwtKey>,
    /// Required `aud` claim (the token's `aud`, a string or a list, must contain it).
    /// Empty: `aud` is not checked.
    pub audience: String,
    /// Required `iss` claim. Empty: `iss` is not checked.
    pub issuer: String,
}

/// A verification key besides the main one (`auth.extra_keys`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JwtKey {
    /// The `kid` that tokens signed with this key carry in their header; empty makes it
    /// the default key (tokens without a `kid`, or with an unknown one). Unique across
    /// `auth.key_id` and all extra keys.
    pub kid: String,
    /// The key's algorithm; a token's `alg` must match it.
    pub algorithm: JwtAlgorithm,
    /// HS256 shared secret.
    pub secret: String,
    /// RS256/ES256: PEM file with the public key.
    pub public_key_file: Option<String>,
}

impl Default for JwtKey {
    fn default() -> Self {
        Self {
            kid: String::new(),
            algorithm: JwtAlgorithm::HS256,
            secret: String::new(),
            public_key_file: None,
        }
    }
}

impl AuthConfig {
    /// Whether a token signed with the public development secret would verify: the main
    /// key or any extra key is HS256 with [`DEV_JWT_SECRET`].
    pub fn accepts_dev_secret(&self) -> bool {
        (self.algorithm == JwtAlgorithm::HS256 && self.jwt_secret == DEV_JWT_SECRET)
            || self
                .extra_keys
                .iter()
                .any(|k| k.algorithm == JwtAlgorithm::HS256 && k.secret == DEV_JWT_SECRET)
    }

    /// Key ids are unique (a token's `kid` picks at most one key) and every extra key
    /// has the material its algorithm needs.
    fn validate_keys(&self) -> Result<(), ConfigError> {
        let mut seen = vec![self.key_id.as_str()];
        for k in &self.extra_keys {
            if seen.contains(&k.kid.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "auth.extra_keys",
                    value: format!("kid {:?}", k.kid),
                    allowed: "key ids unique across auth.key_id and auth.extra_keys".into(),
                });
            }
            seen.push(&k.kid);
            let ok = match k.algorithm {
                JwtAlgorithm::HS256 => !k.secret.is_empty() && k.public_key_file.is_none(),
                JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                    k.public_key_file.is_some() && k.secret.is_empty()
                }
            };
            if !ok {
                return Err(ConfigError::Invalid {
                    key: "auth.extra_keys",
                    value: format!("kid {:?} ({:?})", k.kid, k.algorithm),
                    allowed: "HS256 with a secret, or RS256/ES256 with a public_key_file".into(),
                });
            }
        }
        Ok(())
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            algorithm: JwtAlgorithm::HS256,
            jwt_secret: DEV_JWT_SECRET.into(),
            public_key_file: None,
            private_key_file: None,
            leeway: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            ticket_ttl: Duration::from_secs(30),
            ticket_secret: String::new(),
            admin_token: String::new(),
            key_id: String::new(),
            extra_keys: Vec::new(),
            audience: String::new(),
            issuer: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WsConfig {
    /// Encoding when the client offers no `Sec-WebSocket-Protocol`.
    pub default_encoding: Encoding,
    /// Server ping interval.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Close a connection that has sent nothing (no frame, no pong) for
    /// `heartbeat_interval + pong_timeout`.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// Largest inbound frame (bytes); larger ones close the connection with 1009.
    pub max_frame_bytes: usize,
    /// Socket read buffer of a connection while bytes are pending (grows for large
    /// frames, shrinks back; an idle connection holds none).
    pub read_buffer_bytes: usize,
    /// Socket write buffer of a connection while it writes (given back after a reply
    /// or a ping: an idle connection holds none).
    pub write_buffer_bytes: usize,
    /// A write (batch of frames + flush) that takes longer closes the connection as slow.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// After a push wakes an idle connection, wait this long before writing, so pushes
    /// arriving together go out in one write. 0 writes at once.
    #[serde(with = "humantime_serde")]
    pub coalesce: Duration,
    /// Most commands one connection may have in flight: read and waiting their turn,
    /// running (one at a time, beside the writer, so pushes and pings go on while a
    /// command waits for the store), or sends waiting for their commit. Past it the
    /// connection reads nothing more until a reply is out. Each waiting command holds at
    /// most one frame (`max_frame_bytes`).
    pub max_commands_in_flight: usize,
    /// Negotiate permessage-deflate (RFC 7692) with clients that offer it.
    pub deflate: bool,
    /// zlib compression level, 1 (fast) to 9 (small).
    pub deflate_level: u32,
    /// Messages (and broadcast bodies) shorter than this many bytes are sent uncompressed.
    pub deflate_min_bytes: usize,
    /// The `client_max_window_bits` asked of clients that offer it (9-15): the window a
    /// client may compress with, and the window parley inflates with when clients keep
    /// context (the inflate state shared without context takeover uses 15 bits).
    pub deflate_client_max_window_bits: u8,
    /// Let clients keep their compression context between messages (better ratio for
    /// what clients send, but inflate state kept per connection). Off: parley answers
    /// `client_no_context_takeover` and shares inflate state between connections.
    pub deflate_client_context_takeover: bool,
    /// Compress a broadcast once for all its recipients (on), or each push per connection
    /// like most WebSocket servers do (off: only for comparison, e.g. benchmarks).
    pub deflate_compress_once: bool,
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            default_encoding: Encoding::Json,
            heartbeat_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(20),
            max_frame_bytes: 64 * 1024,
            read_buffer_bytes: 1024,
            write_buffer_bytes: 1024,
            write_timeout: Duration::from_secs(10),
            coalesce: Duration::ZERO,
            max_commands_in_flight: 64,
            deflate: true,
            deflate_level: 6,
            deflate_min_bytes: 128,
            deflate_client_max_window_bits: 10,
            deflate_client_context_takeover: false,
            deflate_compress_once: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// How long a session outlives its dropped transport, waiting to be resumed.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    /// Bytes of pushes not yet written to the transport; more disconnects the session as a
    /// slow consumer (close 4008). The client reconnects and log-syncs.
    pub max_queue_bytes: usize,
    /// Bytes of written but unacknowledged pushes kept for replay on resume. The oldest
    /// are dropped past this; a resume from before them falls back to log sync.
    pub replay_buffer_bytes: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(60),
            max_queue_bytes: 1024 * 1024,
            replay_buffer_bytes: 256 * 1024,
        }
    }
}

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

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync at every commit: an acknowledged message survives power loss.
    Full,
    /// fsync at checkpoints only: survives a process crash (`kill -9`), not power loss.
    Normal,
}

impl Synchronous {
    pub fn as_str(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

/// Which fan-out between instances (see `broker`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BrokerBackend {
    /// One instance: in-process delivery.
    Memory,
    /// Many instances: Redis pub/sub, presence in Redis.
    Redis,
}

/// Fan-out between instances, cross-instance ordering and presence.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    pub backend: BrokerBackend,
    /// `redis://host:port/db` (RESP3 is selected by parley).
    pub redis_url: String,
    /// `host:port` where the other instances reach this one over HTTP (requests for its
    /// sessions are routed here). Empty: the bound listen address (127.0.0.1 when it
    /// listens on all interfaces, which suits one machine only).
    pub advertise: String,
    /// Prefix of every Redis channel and key, so several deployments can share a Redis.
    pub redis_prefix: String,
    /// How long a receiver holds a seq gap in a room before it fills it from the store.
    #[serde(with = "humantime_serde")]
    pub gap_hold: Duration,
    /// How often an instance refreshes its heartbeat in Redis.
    #[serde(with = "humantime_serde")]
    pub presence_heartbeat: Duration,
    /// An instance whose heartbeat is older than this is dead: its users go offline.
    #[serde(with = "humantime_serde")]
    pub presence_ttl: Duration,
    /// How long a user's last-seen time is kept in Redis after they went offline.
    #[serde(with = "humantime_serde")]
    pub last_seen_ttl: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            backend: BrokerBackend::Memory,
            redis_url: "redis://127.0.0.1:6379/".into(),
            advertise: String::new(),
            redis_prefix: "parley".into(),
            gap_hold: Duration::from_millis(200),
            presence_heartbeat: Duration::from_secs(2),
            presence_ttl: Duration::from_secs(10),
            last_seen_ttl: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Which durable log: `sqlite` (embedded, one instance) or `postgres` (shared by many
    /// instances).
    pub backend: StoreBackend,
    /// SQLite database file (its directory is created), or `:memory:` for a throwaway
    /// in-memory database.
    pub path: String,
    /// SQLite `synchronous` mode in WAL: `full` or `normal`.
    pub synchronous: Synchronous,
    /// Most writes folded into one group commit.
    pub max_batch: usize,
    /// Read-only connections for history, sync and room lists.
    pub read_connections: usize,
    /// `postgres`: the server, as a URL (`postgres://user:pass@host:5432/db`) or a
    /// libpq key/value string. Usually from `PARLEY_STORE__POSTGRES_URL`.
    pub postgres_url: String,
    /// `postgres`: most connections: one per append writer, the rest for reads and other
    /// writes (the health ping has one more of its own).
    pub postgres_pool_size: usize,
    /// `postgres`: append writers; rooms hash onto them, each commits its own batches on
    /// a connection of its own.
    pub postgres_writers: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// An SQLite file (or `:memory:`): the single-instance default.
    Sqlite,
    /// A PostgreSQL database that several instances share.
    Postgres,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: "data/parley.db".into(),
            synchronous: Synchronous::Full,
            backend: StoreBackend::Sqlite,
            max_batch: 512,
            read_connections: 4,
            postgres_url: String::new(),
            postgres_pool_size: 16,
            postgres_writers: 4,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FileBackend {
    /// A directory on the local filesystem (`files.dir`).
    Local,
    /// An S3-compatible bucket (`files.s3_*`), shared by every instance.
    S3,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FilesConfig {
    /// Where uploaded bytes live: `local` or `s3`.
    pub backend: FileBackend,
    /// `local`: the directory (created on start).
    pub dir: String,
    /// Largest upload, in bytes; enforced while the upload streams in.
    pub max_file_bytes: u64,
    /// Most bytes of files one user may keep.
    pub user_quota_bytes: u64,
    /// Uploads one user may start per minute (per instance).
    pub uploads_per_minute: u32,
    /// Uploads that no message attached are deleted after this long.
    #[serde(with = "humantime_serde")]
    pub orphan_ttl: Duration,
    /// Lifetime of a signed download URL.
    #[serde(with = "humantime_serde")]
    pub url_ttl: Duration,
    /// HMAC key for signed URLs. Empty: a random key per process (URLs then work only on
    /// the instance that signed them, and not across restarts).
    pub url_secret: String,
    /// Images up to this size get a BlurHash placeholder (decoding holds them in memory).
    pub blurhash_max_bytes: u64,
    /// Images whose header shows more pixels than this are not decoded (no BlurHash);
    /// a decode holds ~4 bytes a pixel, two decodes run at a time. 0: never decode.
    pub max_image_pixels: u64,
    /// `s3`: bucket name.
    pub s3_bucket: String,
    /// `s3`: endpoint URL for S3-compatible services (empty: AWS).
    pub s3_endpoint: String,
    /// `s3`: region.
    pub s3_region: String,
    /// `s3`: credentials (empty: from the `AWS_*` environment variables).
    pub s3_access_key_id: String,
    pub s3_secret_access_key: String,
    /// `s3`: allow a plain `http://` endpoint.
    pub s3_allow_http: bool,
    /// `s3`: multipart upload part size in bytes (S3 needs at least 5 MiB); also the most
    /// memory one upload buffers.
    pub part_bytes: u64,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            backend: FileBackend::Local,
            dir: "data/files".into(),
            max_file_bytes: 100 * 1024 * 1024,
            user_quota_bytes: 1024 * 1024 * 1024,
            uploads_per_minute: 30,
            orphan_ttl: Duration::from_secs(3600),
            url_ttl: Duration::from_secs(300),
            url_secret: String::new(),
            blurhash_max_bytes: 10 * 1024 * 1024,
            max_image_pixels: 4096 * 4096,
            s3_bucket: String::new(),
            s3_endpoint: String::new(),
            s3_region: "us-east-1".into(),
            s3_access_key_id: String::new(),
            s3_secret_access_key: String::new(),
            s3_allow_http: false,
            part_bytes: 5 * 1024 * 1024,
        }
    }
}

/// Errors from loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Figment(#[from] Box<figment::Error>),
    #[error("configuration: {key} = {value} is out of range: {allowed}")]
    Invalid {
        key: &'static str,
        value: String,
        allowed: String,
    },
}

/// Checks that a duration lies in `min..=max`.
fn duration(
    key: &'static str,
    v: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    if v < min || v > max {
        return Err(ConfigError::Invalid {
            key,
            value: format!("{:?}", humantime::format_duration(v).to_string()),
            allowed: format!(
                "{} to {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        });
    }
    Ok(())
}

/// Checks that a count or size lies in `min..=max`.
fn count<T: Into<u64> + Copy>(
    key: &'static str,
    v: T,
    min: u64,
    max: u64,
) -> Result<(), ConfigError> {
    let v: u64 = v.into();
    if v < min || v > max {
        return Err(ConfigError::Invalid {
            key,
            value: v.to_string(),
            allowed: format!("{min} to {max}"),
        });
    }
    Ok(())
}

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86400);
const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * 1024 * 1024;

/// The `PARLEY_SECTION__KEY` variables among `vars` (names with `prefix`), split into the
/// known configuration keys (`section.key`) and the unknown names of that form. Other
/// `PARLEY_*` names (`PARLEY_CONFIG`, or what Kubernetes injects for a service named
/// `parley`, like `PARLEY_PORT`) are not configuration and are ignored.
pub fn env_keys(
    prefix: &str,
    vars: impl IntoIterator<Item = String>,
) -> (Vec<String>, Vec<String>) {
    let known = known_keys();
    let (mut good, mut unknown) = (Vec::new(), Vec::new());
    for name in vars {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let Some((section, key)) = rest.split_once("__") else {
            continue;
        };
        let path = format!(
            "{}.{}",
            section.to_ascii_lowercase(),
            key.to_ascii_lowercase()
        );
        if known.contains(&path) {
            good.push(path);
        } else {
            unknown.push(name);
        }
    }
    (good, unknown)
}

/// Every `section.key` the configuration has.
fn known_keys() -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    if let Ok(serde_json::Value::Object(sections)) = serde_json::to_value(Config::default()) {
        for (section, v) in sections {
            if let serde_json::Value::Object(keys) = v {
                for key in keys.keys() {
                    out.insert(format!("{section}.{key}"));
                }
            }
        }
    }
    out
}

impl Config {
    /// Defaults, then `file` (if it exists), then `PARLEY_SECTION__KEY` environment
    /// variables; validated. Unknown variables of that form are warned about on stderr.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env_prefix(file, "PARLEY_")
    }

    /// [`Config::load`] with another environment prefix (tests use their own).
    pub fn load_with_env_prefix(file: &Path, prefix: &str) -> Result<Config, ConfigError> {
        let (known, unknown) = env_keys(prefix, std::env::vars().map(|(k, _)| k));
        for name in unknown {
            eprintln!(
                "warning: ignoring {name}: not a configuration option (see config/parley.toml)"
            );
        }
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(file))
            .merge(Env::prefixed(prefix).split("__").filter(move |k| {
                known
                    .iter()
                    .any(|path| k.as_str().eq_ignore_ascii_case(path))
            }))
            .extract()
            .map_err(|e| ConfigError::Figment(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every duration, size and count against its allowed range; the error names
    /// the key, the value and the range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let b = &self.broker;
        duration("broker.gap_hold", b.gap_hold, Duration::ZERO, 10 * SEC)?;
        duration(
            "broker.presence_heartbeat",
            b.presence_heartbeat,
            100 * MS,
            HOUR,
        )?;
        duration(
            "broker.presence_ttl",
            b.presence_ttl,
            2 * b.presence_heartbeat,
            2 * HOUR,
        )?;
        duration("broker.last_seen_ttl", b.last_seen_ttl, SEC, 3650 * DAY)?;
        let s = &self.server;
        duration(
            "server.shutdown_timeout",
            s.shutdown_timeout,
            Duration::ZERO,
            HOUR,
        )?;
        duration("server.write_timeout", s.write_timeout, 100 * MS, HOUR)?;
        for (key, v) in [
            ("server.tls_handshake_timeout", s.tls_handshake_timeout),
            ("server.preface_timeout", s.preface_timeout),
            ("server.header_read_timeout", s.header_read_timeout),
            ("server.h2_idle_timeout", s.h2_idle_timeout),
            ("server.h2_keep_alive_interval", s.h2_keep_alive_interval),
            ("server.h2_keep_alive_timeout", s.h2_keep_alive_timeout),
        ] {
            duration(key, v, 10 * MS, HOUR)?;
        }
        duration(
            "server.drain_delay",
            s.drain_delay,
            Duration::ZERO,
            10 * 60 * SEC,
        )?;
        let a = &self.auth;
        duration("auth.leeway", a.leeway, Duration::ZERO, HOUR)?;
        duration("auth.connect_timeout", a.connect_timeout, 10 * MS, HOUR)?;
        duration("auth.ticket_ttl", a.ticket_ttl, 10 * MS, HOUR)?;
        a.validate_keys()?;
        let w = &self.ws;
        duration("ws.heartbeat_interval", w.heartbeat_interval, 10 * MS, HOUR)?;
        duration("ws.pong_timeout", w.pong_timeout, 10 * MS, HOUR)?;
        count(
            "ws.max_frame_bytes",
            w.max_frame_bytes as u64,
            KIB,
            64 * MIB,
        )?;
        count(
            "ws.read_buffer_bytes",
            w.read_buffer_bytes as u64,
            128,
            16 * MIB,
        )?;
        count(
            "ws.write_buffer_bytes",
            w.write_buffer_bytes as u64,
            128,
            16 * MIB,
        )?;
        duration("ws.write_timeout", w.write_timeout, 100 * MS, HOUR)?;
        duration("ws.coalesce", w.coalesce, Duration::ZERO, SEC)?;
        count(
            "ws.max_commands_in_flight",
            w.max_commands_in_flight as u64,
            1,
            1024,
        )?;
        count("ws.deflate_level", u64::from(w.deflate_level), 1, 9)?;
        count(
            "ws.deflate_min_bytes",
            w.deflate_min_bytes as u64,
            0,
            64 * MIB,
        )?;
        count(
            "ws.deflate_client_max_window_bits",
            u64::from(w.deflate_client_max_window_bits),
            9,
            15,
        )?;
        count(
            "mqtt.max_packet_bytes",
            self.mqtt.max_packet_bytes as u64,
            128,
            64 * MIB,
        )?;
        if let Some(listen) = self.mqtt.listen
            && listen.port() != 0
            && listen.port() == self.server.listen.port()
            && (listen.ip() == self.server.listen.ip()
                || listen.ip().is_unspecified()
                || self.server.listen.ip().is_unspecified())
        {
            return Err(ConfigError::Invalid {
                key: "mqtt.listen",
                value: listen.to_string(),
                allowed: "an address other than server.listen".into(),
            });
        }
        let se = &self.session;
        duration("session.grace_period", se.grace_period, 10 * MS, DAY)?;
        count(
            "session.max_queue_bytes",
            se.max_queue_bytes as u64,
            KIB,
            GIB,
        )?;
        count(
            "session.replay_buffer_bytes",
            se.replay_buffer_bytes as u64,
            0,
            GIB,
        )?;
        let c = &self.chat;
        count("chat.max_body_bytes", c.max_body_bytes as u64, 1, 16 * MIB)?;
        count(
            "chat.max_room_name_bytes",
            c.max_room_name_bytes as u64,
            1,
            1024,
        )?;
        count(
            "chat.max_client_msg_id_bytes",
            c.max_client_msg_id_bytes as u64,
            1,
            1024,
        )?;
        count(
            "chat.max_metadata_entries",
            c.max_metadata_entries as u64,
            0,
            1024,
        )?;
        count("chat.history_max_limit", c.history_max_limit, 1, 10_000)?;
        count(
            "chat.history_default_limit",
            c.history_default_limit,
            1,
            u64::from(c.history_max_limit),
        )?;
        count("chat.large_room_members", c.large_room_members, 1, u64::MAX)?;
        duration(
            "chat.typing_interval",
            c.typing_interval,
            Duration::ZERO,
            HOUR,
        )?;
        count(
            "chat.max_reply_bytes",
            c.max_reply_bytes as u64,
            KIB,
            64 * MIB,
        )?;
        let l = &self.limits;
        if l.signal_bytes_per_second > 0.0 && l.signal_bytes_burst < c.max_body_bytes as f64 {
            return Err(ConfigError::Invalid {
                key: "limits.signal_bytes_burst",
                value: l.signal_bytes_burst.to_string(),
                allowed: format!(
                    "at least chat.max_body_bytes ({}), the largest signal, while \
                     limits.signal_bytes_per_second is on",
                    c.max_body_bytes
                ),
            });
        }
        let st = &self.store;
        count("store.max_batch", st.max_batch as u64, 1, 100_000)?;
        count("store.read_connections", st.read_connections as u64, 1, 256)?;
        count(
            "store.postgres_pool_size",
            st.postgres_pool_size as u64,
            2,
            1024,
        )?;
        count("store.postgres_writers", st.postgres_writers as u64, 1, 64)?;
        if st.postgres_writers >= st.postgres_pool_size {
            return Err(ConfigError::Invalid {
                key: "store.postgres_writers",
                value: st.postgres_writers.to_string(),
                allowed: format!(
                    "fewer than store.postgres_pool_size ({}), so reads still get connections",
                    st.postgres_pool_size
                ),
            });
        }
        if st.backend == StoreBackend::Postgres {
            if st.postgres_url.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "store.postgres_url",
                    value: "\"\"".into(),
                    allowed: "a PostgreSQL URL (postgres://user@host:5432/db) when \
                              store.backend = \"postgres\"; set PARLEY_STORE__POSTGRES_URL"
                        .into(),
                });
            }
            if let Err(e) = st.postgres_url.parse::<tokio_postgres::Config>() {
                return Err(ConfigError::Invalid {
                    key: "store.postgres_url",
                    // Never echo the URL: it may hold a password.
                    value: "(not shown)".into(),
                    allowed: format!("a valid PostgreSQL URL or key/value string ({e})"),
                });
            }
        }
        let sse = &self.sse;
        duration(
            "sse.heartbeat_interval",
            sse.heartbeat_interval,
            10 * MS,
            HOUR,
        )?;
        duration("sse.retry", sse.retry, Duration::ZERO, HOUR)?;
        duration("sse.write_timeout", sse.write_timeout, 100 * MS, HOUR)?;
        let p = &self.poll;
        duration("poll.max_hold", p.max_hold, Duration::ZERO, 10 * 60 * SEC)?;
        duration(
            "poll.default_hold",
            p.default_hold,
            Duration::ZERO,
            p.max_hold,
        )?;
        let l = &self.limits;
        for (key, rate, burst) in [
            (
                "limits.connects_per_ip",
                l.connects_per_ip_per_second,
                l.connects_per_ip_burst,
            ),
            (
                "limits.tickets_per_ip",
                l.tickets_per_ip_per_second,
                l.tickets_per_ip_burst,
            ),
            ("limits.sends", l.sends_per_second, l.sends_burst),
            ("limits.joins", l.joins_per_second, l.joins_burst),
        ] {
            // A rate needs a burst of at least one token (0 and 0: off).
            let valid = rate.is_finite() && burst.is_finite() && rate >= 0.0 && burst >= 0.0;
            if !valid || (rate > 0.0 && burst < 1.0) {
                return Err(ConfigError::Invalid {
                    key,
                    value: format!("{rate}/s, burst {burst}"),
                    allowed: "a rate >= 0 per second and, when it is > 0, a burst >= 1".into(),
                });
            }
        }
        let f = &self.files;
        count("files.max_file_bytes", f.max_file_bytes, 1, 1024 * GIB)?;
        count(
            "files.user_quota_bytes",
            f.user_quota_bytes,
            1,
            1024 * 1024 * GIB,
        )?;
        count(
            "files.uploads_per_minute",
            f.uploads_per_minute,
            1,
            1_000_000,
        )?;
        duration("files.orphan_ttl", f.orphan_ttl, 10 * MS, 365 * DAY)?;
        duration("files.url_ttl", f.url_ttl, SEC, DAY)?;
        count(
            "files.blurhash_max_bytes",
            f.blurhash_max_bytes,
            0,
            256 * MIB,
        )?;
        // The decoder's own caps (8192 px a side, 128 MiB) stop bigger images anyway.
        count("files.max_image_pixels", f.max_image_pixels, 0, 8192 * 8192)?;
        count("files.part_bytes", f.part_bytes, 5 * MIB, 5 * GIB)?;
        if f.backend == FileBackend::S3 && f.s3_bucket.is_empty() {
            return Err(ConfigError::Invalid {
                key: "files.s3_bucket",
                value: "\"\"".into(),
                allowed: "a bucket name when files.backend = \"s3\"".into(),
            });
        }
        Ok(())
    }
}
