//! A WebSocket echo endpoint for the Autobahn conformance cases (run by `kosoku`).
//!
//! It upgrades with exactly the options `/ws` uses ([`parley::transport::ws::options`]:
//! buffers, limits, UTF-8 validation, permessage-deflate with parley's negotiation) from
//! the default `[ws]` configuration, with one change: `max_frame_bytes` is raised to the
//! largest allowed value, because the Autobahn cases echo messages of up to 16 MiB and a
//! chat server's 64 KiB limit would (correctly) close those. It echoes every text and
//! binary message; yawc answers pings and closes.
//!
//! ```text
//! cargo run --release --example autobahn_echo -- 127.0.0.1:9001
//! target/ws-venv/bin/kosoku -p 4 -i '1.*' -i '2.*' ... 127.0.0.1:9001
//! ```
//!
//! `tests/deflate.rs` runs a fast subset of the cases against the same code.

use std::net::SocketAddr;

use axum::{Router, response::IntoResponse, routing::get};
use futures_util::SinkExt;
use parley::config::WsConfig;
use yawc::{
    IncomingUpgrade,
    frame::{Frame, OpCode},
};

/// The `[ws]` configuration the echo endpoint uses: parley's defaults, with the
/// largest frame limit the configuration allows.
pub fn echo_config() -> WsConfig {
    WsConfig {
        max_frame_bytes: 64 * 1024 * 1024,
        ..WsConfig::default()
    }
}

async fn echo(upgrade: IncomingUpgrade) -> axum::response::Response {
    let (response, fut) = match upgrade.upgrade(parley::transport::ws::options(&echo_config())) {
        Ok(pair) => pair,
        Err(e) => return (axum::http::StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    tokio::spawn(async move {
        let Ok(mut ws) = fut.await else { return };
        loop {
            let Ok(frame) = ws.next_frame().await else {
                // A protocol error: yawc queued its close frame; let it out.
                let _ = std::future::poll_fn(|cx| ws.poll_ready_unpin(cx)).await;
                let _ = ws.flush().await;
                return;
            };
            let reply = match frame.opcode() {
                OpCode::Text => Frame::text(frame.into_payload()),
                OpCode::Binary => Frame::binary(frame.into_payload()),
                OpCode::Close => {
                    let _ = std::future::poll_fn(|cx| ws.poll_ready_unpin(cx)).await;
                    let _ = ws.flush().await;
                    return;
                }
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                return;
            }
        }
    });
    response.map(axum::body::Body::new)
}

/// Serves the echo endpoint on every path until the listener fails.
pub async fn serve(listener: tokio::net::TcpListener) {
    let app = Router::new().fallback(get(echo));
    let _ = axum::serve(listener, app).await;
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".into())
        .parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("autobahn echo on ws://{}", listener.local_addr()?);
    serve(listener).await;
    Ok(())
}
