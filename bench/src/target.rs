//! Where the generator connects and how: a loopback address (nothing else is ever
//! accepted), the transport, the encoding, the client's buffer sizes and the key that
//! mints tokens; over TLS when given a [`TlsClient`] (`--tls`, `--tls-ca`, or a `wss://`
//! or `https://` URL).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use parley::{
    auth::Authenticator,
    codec::Encoding,
    config::{AuthConfig, DEV_JWT_SECRET},
};
use serde::Serialize;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::http::Uri;

use crate::tls::{ClientStream, TlsClient};

/// The transports a scenario can run over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// WebSocket (`/ws`): binary frames for protobuf, text frames for JSON.
    Ws,
    /// Server-Sent Events downstream (always JSON) + POST upstream.
    Sse,
    /// Long-poll downstream + POST upstream.
    Poll,
    /// WebTransport (`/wt`, HTTP/3): the server needs TLS (`PARLEY_TLS__*`).
    Wt,
}

impl TransportKind {
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Ws => "ws",
            TransportKind::Sse => "sse",
            TransportKind::Poll => "poll",
            TransportKind::Wt => "wt",
        }
    }
}

/// The default target: parley's default port on loopback.
pub const DEFAULT_URL: &str = "ws://127.0.0.1:8080/ws";

/// The secret the generator signs tokens with unless told otherwise: parley's built-in
/// development secret, which is also what a spawned server gets.
pub const DEFAULT_SECRET: &str = DEV_JWT_SECRET;

/// Per-connection client buffer sizes: small, so the generator itself stays cheap.
#[derive(Debug, Clone, Copy)]
pub struct ClientBuffers {
    /// Bytes one read may bring (the buffer grows for a larger frame).
    pub read: usize,
}

impl Default for ClientBuffers {
    fn default() -> Self {
        Self { read: 4096 }
    }
}

/// Everything a scenario needs to open authenticated connections.
#[derive(Clone)]
pub struct Target {
    /// A loopback socket address.
    pub addr: SocketAddr,
    /// `Host` for the HTTP upgrade (as given in the URL).
    pub host: String,
    /// Path of the transport's endpoint (`/ws`).
    pub path: String,
    pub transport: TransportKind,
    pub encoding: Encoding,
    pub buffers: ClientBuffers,
    /// Spread client source addresses over 127.0.0.1 ..= 127.0.0.N (0 or 1: let the
    /// kernel pick 127.0.0.1). Only for IPv4 targets.
    pub source_ips: u8,
    /// Give up on a connect + handshake + auth after this long.
    pub connect_timeout: Duration,
    /// Long-poll: the `wait` of each poll, seconds (the server caps it at
    /// `poll.max_hold`, 60 s by default).
    pub poll_wait_s: u64,
    /// Long-poll: the pause after each reply before the next poll (a client's round
    /// trip).
    pub poll_gap: Duration,
    /// WebSocket: offer permessage-deflate.
    pub deflate: bool,
    /// SSE and long-poll: HTTP/2 (cleartext prior knowledge, or ALPN `h2` over TLS),
    /// one connection per client.
    pub http2: bool,
    /// SSE and long-poll: every request carries the headers Chromium sends with a
    /// `fetch` (user agent, client hints, fetch metadata, referer, languages...), so the
    /// server's HTTP/2 header table holds what a browser's connection makes it hold.
    pub browser_headers: bool,
    /// TLS over every TCP connection (WebSocket, SSE, long-poll), trusting this client's
    /// certificates; `None`: cleartext. (Behind an `Arc`: every SSE and long-poll
    /// connection keeps a copy of its target.)
    pub tls: Option<Arc<TlsClient>>,
    auth: Arc<Authenticator>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("addr", &self.addr)
            .field("path", &self.path)
            .field("transport", &self.transport)
            .field("encoding", &self.encoding)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// A target for `url`, which must name a loopback host (127.0.0.0/8, ::1 or
    /// localhost); tokens are HS256-signed with `jwt_secret`.
    pub fn new(
        url: &str,
        transport: TransportKind,
        encoding: Encoding,
        jwt_secret: &str,
    ) -> anyhow::Result<Self> {
        let (addr, host, path) = parse_loopback_url(url)?;
        if url_wants_tls(url) {
            bail!("{url:?} asks for TLS: give the certificate to trust with --tls-ca FILE");
        }
        // SSE streams are JSON only; its commands use the same encoding.
        let encoding = match transport {
            TransportKind::Sse => Encoding::Json,
            _ => encoding,
        };
        let auth = Authenticator::new(&AuthConfig {
            jwt_secret: jwt_secret.to_string(),
            ..AuthConfig::default()
        })
        .context("building the token signer")?;
        Ok(Self {
            addr,
            host,
            path,
            transport,
            encoding,
            buffers: ClientBuffers::default(),
            source_ips: 0,
            connect_timeout: Duration::from_secs(10),
            poll_wait_s: 30,
            poll_gap: Duration::ZERO,
            deflate: false,
            http2: false,
            browser_headers: false,
            tls: None,
            auth: Arc::new(auth),
        })
    }

    /// A token for `user`, valid for a day (longer than any run).
    pub fn token(&self, user: &str) -> anyhow::Result<String> {
        Ok(self.auth.mint(user, Duration::from_secs(24 * 3600))?)
    }

    /// The same target over WebSocket (`/ws`): publishers of SSE and long-poll runs.
    pub fn over_websocket(&self) -> Target {
        let mut t = self.clone();
        t.transport = TransportKind::Ws;
        t.path = "/ws".to_string();
        t
    }

    /// The local address connection number `index` binds before connecting, if source
    /// addresses are spread.
    pub fn source_addr(&self, index: usize) -> Option<SocketAddr> {
        if self.source_ips <= 1 || !self.addr.is_ipv4() {
            return None;
        }
        let last = 1 + (index % self.source_ips as usize) as u8;
        Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
            0,
        ))
    }

    /// A target for `url` over TLS (`wss://`, `https://`, or also `ws://` and `http://`:
    /// `tls` decides), trusting `tls`'s certificates.
    pub fn new_tls(
        url: &str,
        transport: TransportKind,
        encoding: Encoding,
        jwt_secret: &str,
        tls: TlsClient,
    ) -> anyhow::Result<Self> {
        let plain = url
            .replacen("wss://", "ws://", 1)
            .replacen("https://", "http://", 1);
        let mut t = Target::new(&plain, transport, encoding, jwt_secret)?;
        t.tls = Some(Arc::new(tls));
        Ok(t)
    }

    /// The host part of `host` (`Host` without its port): the name TLS verifies.
    fn host_name(&self) -> &str {
        match self.host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => &self.host,
        }
    }

    /// Opens a connection to the target (TCP, then the TLS handshake when the target
    /// has TLS), from a spread source address if configured (connection `index` picks
    /// it).
    pub(crate) async fn connect(&self, index: usize) -> std::io::Result<ClientStream> {
        let tcp = self.connect_tcp(index).await?;
        match &self.tls {
            None => Ok(ClientStream::Tcp(tcp)),
            Some(tls) => Ok(ClientStream::Tls(Box::new(
                tls.connect(tcp, self.host_name(), self.http2).await?,
            ))),
        }
    }

    async fn connect_tcp(&self, index: usize) -> std::io::Result<tokio::net::TcpStream> {
        let socket = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(src) = self.source_addr(index) {
            crate::net::bind_address_no_port(&socket);
            socket.bind(src)?;
        }
        let stream = socket.connect(self.addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Whether `url`'s scheme is a TLS one (`wss://`, `https://`).
pub fn url_wants_tls(url: &str) -> bool {
    url.starts_with("wss://") || url.starts_with("https://")
}

/// Parses `ws://HOST:PORT/PATH` and refuses any host that is not loopback.
pub fn parse_loopback_url(url: &str) -> anyhow::Result<(SocketAddr, String, String)> {
    let uri: Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
    match uri.scheme_str() {
        Some("ws") | Some("http") | Some("https") => {}
        Some("wss") => {}
        Some(other) => bail!("unsupported scheme {other:?} in {url:?}: use ws:// (loopback)"),
        None => bail!("URL {url:?} has no scheme: use ws://127.0.0.1:PORT/ws"),
    }
    let host = uri
        .host()
        .with_context(|| format!("URL {url:?} has no host"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = if bare.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        bare.parse()
            .map_err(|_| anyhow::anyhow!("refusing host {host:?}: only loopback addresses (127.0.0.0/8, ::1, localhost) are benchmark targets"))?
    };
    if !ip.is_loopback() {
        bail!(
            "refusing host {host:?}: only loopback addresses (127.0.0.0/8, ::1, localhost) are benchmark targets"
        );
    }
    let port = uri.port_u16().unwrap_or(80);
    let path = match uri.path() {
        "" => "/ws".to_string(),
        p => p.to_string(),
    };
    let host_header = match uri.port_u16() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    Ok((SocketAddr::new(ip, port), host_header, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_loopback() {
        for ok in [
            "ws://127.0.0.1:8080/ws",
            "ws://127.9.8.7:1/ws",
            "ws://localhost:8080/ws",
            "ws://[::1]:8080/ws",
        ] {
            let (addr, _, path) = parse_loopback_url(ok).unwrap();
            assert!(addr.ip().is_loopback(), "{ok}");
            assert_eq!(path, "/ws");
        }
        for bad in [
            "ws://10.0.0.1:8080/ws",
            "ws://192.168.1.1/ws",
            "ws://example.com/ws",
            "ws://8.8.8.8/ws",
            "ws://[2001:db8::1]/ws",
            "wss://10.0.0.1/ws",
            "ftp://127.0.0.1/ws",
            "127.0.0.1:8080",
        ] {
            assert!(parse_loopback_url(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn spreads_source_addresses() {
        let mut t = Target::new(DEFAULT_URL, TransportKind::Ws, Encoding::Proto, "s").unwrap();
        assert_eq!(t.source_addr(5), None);
        t.source_ips = 4;
        let ips: Vec<_> = (0..5).map(|i| t.source_addr(i).unwrap().ip()).collect();
        assert_eq!(ips[0].to_string(), "127.0.0.1");
        assert_eq!(ips[3].to_string(), "127.0.0.4");
        assert_eq!(ips[4].to_string(), "127.0.0.1");
    }
}
