//! Admission of TCP connections: at most `limits.max_connections` open in total and
//! `limits.max_connections_per_ip` from one address, and at most
//! `limits.connects_per_ip_per_second` new ones from one address. A refused connection
//! gets a short HTTP response with the error JSON (503 `LIMIT_EXCEEDED` or 429
//! `RATE_LIMITED` with `Retry-After`) and is closed; nothing else is disturbed. The
//! per-IP ticket rate lives here too, since it is keyed the same way.
//!
//! An admitted connection holds a [`Slot`] for as long as its socket lives (upgraded
//! WebSockets included: the slot travels with the socket), and gives it back on drop.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    config::LimitsConfig,
    ratelimit::{Rate, RateLimiter},
};

pub struct Admission {
    max_total: u64,
    max_per_ip: u64,
    open: Mutex<Open>,
    connects: RateLimiter<IpAddr>,
    /// `POST /api/v1/tickets` per IP.
    pub tickets: RateLimiter<IpAddr>,
}

#[derive(Default)]
struct Open {
    total: u64,
    per_ip: HashMap<IpAddr, u64>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A connection limit (total or per IP) is reached.
    Full(&'static str),
    /// Too many new connections from this address; retry after the duration.
    TooFast(Duration),
}

impl Refusal {
    /// The plain HTTP/1.1 response a refused connection gets.
    pub fn response(&self) -> Vec<u8> {
        let (status, code, message, retry) = match self {
            Refusal::Full(what) => (
                "503 Service Unavailable",
                "ERROR_CODE_LIMIT_EXCEEDED",
                format!("too many open connections {what}"),
                None,
            ),
            Refusal::TooFast(wait) => (
                "429 Too Many Requests",
                "ERROR_CODE_RATE_LIMITED",
                "too many new connections from this address".to_string(),
                Some(crate::chat::retry_ms(*wait)),
            ),
        };
        let body = match retry {
            Some(ms) => format!(r#"{{"code":"{code}","message":"{message}","retryAfterMs":{ms}}}"#),
            None => format!(r#"{{"code":"{code}","message":"{message}"}}"#),
        };
        let retry_after = retry
            .map(|ms| format!("Retry-After: {}\r\n", ms.div_ceil(1000)))
            .unwrap_or_default();
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{retry_after}Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// An admitted connection's place; dropping it frees the place.
pub struct Slot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.admission.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.per_ip.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    pub fn new(limits: &LimitsConfig) -> Self {
        Self {
            max_total: limits.max_connections,
            max_per_ip: limits.max_connections_per_ip,
            open: Mutex::default(),
            connects: RateLimiter::new(Rate::new(
                limits.connects_per_ip_per_second,
                limits.connects_per_ip_burst,
            )),
            tickets: RateLimiter::new(Rate::new(
                limits.tickets_per_ip_per_second,
                limits.tickets_per_ip_burst,
            )),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        self.connects.check(&ip).map_err(Refusal::TooFast)?;
        let mut open = self.lock();
        if self.max_total > 0 && open.total >= self.max_total {
            return Err(Refusal::Full("on this server"));
        }
        let from_ip = open.per_ip.get(&ip).copied().unwrap_or(0);
        if self.max_per_ip > 0 && from_ip >= self.max_per_ip {
            return Err(Refusal::Full("from this address"));
        }
        open.total += 1;
        *open.per_ip.entry(ip).or_default() += 1;
        Ok(Slot {
            admission: self.clone(),
            ip,
        })
    }
}
