//! Configuration: one typed tree with a default for every option.
//!
//! Layers, lowest first: built-in defaults, the TOML file (`config/parley.toml` unless
//! `--config` names another), `PARLEY_*` environment variables (`__` separates sections:
//! `PARLEY_AUTH__JWT_SECRET`), then command-line flags. `config/parley.toml` documents
//! every option; `tests/config.rs` checks that it parses to exactly these defaults and
//! that every key, with its default, is written there.
//!
//! One file per section (`[ws]` is `ws.rs`, ...): its struct, the doc comment of each key,
//! its `Default`, and its own `validate` (the ranges of its keys). This file holds the
//! tree, loading, and the checks that span sections. A new option is a field, a default
//! and a range in its section's file, plus its prose in `config/parley.toml`.

use std::{path::Path, time::Duration};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

mod auth;
mod broker;
mod chat;
mod files;
mod http3;
mod limits;
mod log;
mod mqtt;
mod poll;
mod server;
mod session;
mod sse;
mod store;
mod tls;
mod web;
mod ws;

pub use auth::{AuthConfig, DEV_JWT_SECRET, JwtAlgorithm, JwtKey};
pub use broker::{BrokerBackend, BrokerConfig, PubSubMode};
pub use chat::ChatConfig;
pub use files::{FileBackend, FilesConfig};
pub use http3::Http3Config;
pub use limits::LimitsConfig;
pub use log::{LogConfig, LogFormat};
pub use mqtt::{MqttConfig, MqttPayload};
pub use poll::PollConfig;
pub use server::ServerConfig;
pub use session::SessionConfig;
pub use sse::SseConfig;
pub use store::{StoreBackend, StoreConfig, Synchronous};
pub use tls::TlsConfig;
pub use web::WebConfig;
pub use ws::WsConfig;

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
    pub http3: Http3Config,
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

    /// Checks every duration, size and count against its allowed range, section by
    /// section, then the rules that span sections; the error names the key, the value
    /// and the range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let Config {
            server,
            log,
            auth,
            ws,
            session,
            chat,
            store,
            sse,
            poll,
            tls,
            web,
            limits,
            files,
            broker,
            mqtt,
            http3,
        } = self;
        server.validate()?;
        log.validate()?;
        auth.validate()?;
        ws.validate()?;
        session.validate()?;
        chat.validate()?;
        store.validate()?;
        sse.validate()?;
        poll.validate()?;
        tls.validate()?;
        web.validate()?;
        limits.validate()?;
        files.validate()?;
        broker.validate()?;
        mqtt.validate()?;
        http3.validate()?;
        // The plain MQTT listener cannot share the HTTP listener's port.
        if let Some(listen) = mqtt.listen
            && listen.port() != 0
            && listen.port() == server.listen.port()
            && (listen.ip() == server.listen.ip()
                || listen.ip().is_unspecified()
                || server.listen.ip().is_unspecified())
        {
            return Err(ConfigError::Invalid {
                key: "mqtt.listen",
                value: listen.to_string(),
                allowed: "an address other than server.listen".into(),
            });
        }
        // The largest signal is a message body: a byte budget smaller than that could
        // never let one through.
        if limits.signal_bytes_per_second > 0.0
            && limits.signal_bytes_burst < chat.max_body_bytes as f64
        {
            return Err(ConfigError::Invalid {
                key: "limits.signal_bytes_burst",
                value: limits.signal_bytes_burst.to_string(),
                allowed: format!(
                    "at least chat.max_body_bytes ({}), the largest signal, while \
                     limits.signal_bytes_per_second is on",
                    chat.max_body_bytes
                ),
            });
        }
        Ok(())
    }
}
