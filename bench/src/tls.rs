//! TLS to parley's own listener (`--tls`, `--tls-ca`): what a browser on an HTTPS page
//! always has in front of `/ws`, `/sse` and `/poll`.
//!
//! - [`TlsClient`]: a rustls client (parley's provider, as the server) that trusts the
//!   certificates of one PEM file and nothing else, offering ALPN `http/1.1`, or `h2` for
//!   HTTP/2 runs, and its key exchange groups in a browser's order, as a browser does.
//! - [`ClientStream`]: what a connection reads and writes: the TCP stream, or TLS over
//!   it. The plain WebSocket reader keeps its direct `recv` on the TCP stream; over TLS it
//!   reads through rustls.
//! - [`SelfSigned`]: a fresh certificate and key for a spawned server (for `localhost`
//!   and 127.0.0.1), in a temporary directory removed on drop.
//!
//! It owns no connection policy: [`crate::target::Target`] decides whether to use it.

use std::{
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{
        CipherSuite, ClientConfig, NamedGroup, RootCertStore,
        crypto::CryptoProvider,
        pki_types::{CertificateDer, ServerName, pem::PemObject},
    },
};

/// `provider` with its key exchange groups and TLS 1.3 cipher suites in the order
/// browsers offer them (Chrome, Firefox and Safari: the X25519MLKEM768 hybrid where the
/// provider has it, then X25519, P-256, P-384; AES-128-GCM before AES-256-GCM), so that
/// the server picks what it picks for a browser: rustls's server follows the client's
/// order. Left as they are, ring's provider (rustls 0.23.48) offers P-384 first, whose
/// key exchange costs the server ~9× X25519's (callgrind), and rustls AES-256-GCM.
fn browser_order(provider: &CryptoProvider) -> CryptoProvider {
    const GROUPS: [NamedGroup; 4] = [
        NamedGroup::X25519MLKEM768,
        NamedGroup::X25519,
        NamedGroup::secp256r1,
        NamedGroup::secp384r1,
    ];
    const SUITES: [CipherSuite; 3] = [
        CipherSuite::TLS13_AES_128_GCM_SHA256,
        CipherSuite::TLS13_AES_256_GCM_SHA384,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    fn rank<T: PartialEq>(order: &[T], x: T) -> usize {
        order.iter().position(|o| *o == x).unwrap_or(order.len())
    }
    let mut provider = provider.clone();
    provider.kx_groups.sort_by_key(|g| rank(&GROUPS, g.name()));
    provider
        .cipher_suites
        .sort_by_key(|s| rank(&SUITES, s.suite()));
    provider
}

/// A TLS client that trusts one PEM file's certificates (a CA, or the server's own
/// self-signed certificate).
#[derive(Clone)]
pub struct TlsClient {
    /// ALPN `http/1.1` (WebSocket, SSE and long-poll over HTTP/1.1).
    h1: TlsConnector,
    /// ALPN `h2` (SSE and long-poll with `--http2`).
    h2: TlsConnector,
    /// The PEM file, for the report.
    pub ca_file: PathBuf,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// A client trusting every certificate in the PEM file `ca_file`.
    pub fn from_pem_file(ca_file: &Path) -> anyhow::Result<TlsClient> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_file)
            .with_context(|| format!("reading {}", ca_file.display()))?
        {
            let cert = cert.with_context(|| format!("a certificate in {}", ca_file.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("trusting a certificate of {}", ca_file.display()))?;
        }
        anyhow::ensure!(
            !roots.is_empty(),
            "{} holds no certificate",
            ca_file.display()
        );
        let roots = Arc::new(roots);
        let provider = Arc::new(browser_order(&parley::server::crypto_provider()));
        let connector = |alpn: &[u8]| -> anyhow::Result<TlsConnector> {
            let mut config = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok(TlsConnector::from(Arc::new(config)))
        };
        Ok(TlsClient {
            h1: connector(b"http/1.1")?,
            h2: connector(b"h2")?,
            ca_file: ca_file.to_path_buf(),
        })
    }

    /// The TLS handshake on `tcp` for `host` (the URL's host, without a port), offering
    /// `h2` when `http2`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        host: &str,
        http2: bool,
    ) -> io::Result<TlsStream<TcpStream>> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(bare.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let connector = if http2 { &self.h2 } else { &self.h1 };
        let tls = connector.connect(name, tcp).await?;
        let want: &[u8] = if http2 { b"h2" } else { b"http/1.1" };
        if tls.get_ref().1.alpn_protocol() != Some(want) {
            return Err(io::Error::other(format!(
                "the server did not choose ALPN {}",
                String::from_utf8_lossy(want)
            )));
        }
        Ok(tls)
    }
}

/// One connection's byte stream: TCP, or TLS over TCP.
#[derive(Debug)]
pub enum ClientStream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl ClientStream {
    /// The TCP stream, when there is no TLS over it (the plain WebSocket's direct reads).
    pub fn as_tcp(&self) -> Option<&TcpStream> {
        match self {
            ClientStream::Tcp(s) => Some(s),
            ClientStream::Tls(_) => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Tcp(s) => s.is_write_vectored(),
            ClientStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1 and its key, as PEM files in
/// a fresh temporary directory (removed when this drops).
#[derive(Debug)]
pub struct SelfSigned {
    dir: PathBuf,
    /// The certificate (also what the client trusts).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl SelfSigned {
    /// Generates one; `name` tells temporary directories apart.
    pub fn generate(name: &str) -> anyhow::Result<SelfSigned> {
        let key = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .context("generating a self-signed certificate")?;
        let dir =
            std::env::temp_dir().join(format!("parley-bench-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let cert_file = dir.join("cert.pem");
        let key_file = dir.join("key.pem");
        std::fs::write(&cert_file, key.cert.pem())?;
        std::fs::write(&key_file, key.signing_key.serialize_pem())?;
        Ok(SelfSigned {
            dir,
            cert_file,
            key_file,
        })
    }
}

impl Drop for SelfSigned {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_exchange_groups_come_in_a_browsers_order() {
        let provider = parley::server::crypto_provider();
        let names: Vec<NamedGroup> = browser_order(&provider)
            .kx_groups
            .iter()
            .map(|g| g.name())
            .collect();
        assert_eq!(names.len(), provider.kx_groups.len(), "{names:?}");
        let x25519 = names.iter().position(|n| *n == NamedGroup::X25519);
        let p384 = names.iter().position(|n| *n == NamedGroup::secp384r1);
        assert!(x25519 < p384, "{names:?}");
        assert_ne!(names[0], NamedGroup::secp384r1, "{names:?}");
        let first = browser_order(&provider).cipher_suites[0].suite();
        assert_eq!(first, CipherSuite::TLS13_AES_128_GCM_SHA256);
    }
}
