//! `[mqtt]`: MQTT over WebSocket at `/mqtt`.

use serde::{Deserialize, Serialize};

use super::{ConfigError, MIB, count};

/// `/mqtt`: MQTT 3.1.1 over WebSocket (subprotocol `mqtt`) on the same listener as `/ws`
/// (docs/PROTOCOL.md, "MQTT").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Serve `/mqtt` (off: the route answers 404).
    pub enabled: bool,
    /// Largest MQTT packet a client may send, fixed header included (bytes); a larger one
    /// closes its connection. Also bounds the bytes buffered for one packet that spans
    /// several WebSocket messages.
    pub max_packet_bytes: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_packet_bytes: 64 * 1024,
        }
    }
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
