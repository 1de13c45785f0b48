//! `[mqtt]`: MQTT over WebSocket at `/mqtt`, and the optional plain MQTT listener.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{ConfigError, MIB, count};

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

impl MqttConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        count(
            "mqtt.max_packet_bytes",
            self.max_packet_bytes as u64,
            128,
            64 * MIB,
        )
    }
}
