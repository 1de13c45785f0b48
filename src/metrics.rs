//! Prometheus metrics (`GET /metrics`): connections by transport, frames in/out by
//! transport, errors by code, sessions and messages.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::proto::ErrorCode;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub connections: Family<TransportLabel, Gauge>,
    pub frames_in: Family<TransportLabel, Counter>,
    pub frames_out: Family<TransportLabel, Counter>,
    pub errors: Family<CodeLabel, Counter>,
    pub messages: Counter<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("parley");
        let connections = Family::<TransportLabel, Gauge>::default();
        let frames_in = Family::<TransportLabel, Counter>::default();
        let frames_out = Family::<TransportLabel, Counter>::default();
        let errors = Family::<CodeLabel, Counter>::default();
        let messages = Counter::default();
        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        registry.register("frames_in", "Client frames received", frames_in.clone());
        registry.register("frames_out", "Server frames sent", frames_out.clone());
        registry.register("errors", "Error replies sent, by code", errors.clone());
        registry.register("messages", "Chat messages accepted", messages.clone());
        Self {
            registry,
            connections,
            frames_in,
            frames_out,
            errors,
            messages,
        }
    }

    pub fn error(&self, code: ErrorCode) {
        self.errors
            .get_or_create(&CodeLabel {
                code: code.as_str_name(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self, sessions: usize) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        // Sessions are counted live rather than tracked, so they cannot drift.
        let body = out.trim_end_matches("# EOF\n");
        format!(
            "{body}# HELP parley_sessions Live sessions (attached or in grace period).\n# TYPE parley_sessions gauge\nparley_sessions {sessions}\n# EOF\n"
        )
    }
}
