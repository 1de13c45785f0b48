//! The `parley` binary: `parley serve` (default), `parley init`, `parley health` and
//! `parley token`.

use std::{io::Write, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use parley::{
    auth::Authenticator,
    config::{Config, LogFormat},
    server::Server,
};
use tokio_rustls::rustls;
use tracing_subscriber::EnvFilter;

// jemalloc by default (Cargo.toml's features; src/lib.rs `allocator`).
parley::build_allocator!();

#[derive(Parser)]
#[command(
    name = "parley",
    version,
    about = "A chat backend: WebSocket, SSE and long-poll over one session layer"
)]
struct Cli {
    /// Configuration file (TOML). Missing is fine: defaults and PARLEY_* variables apply.
    #[arg(
        long,
        short,
        global = true,
        env = "PARLEY_CONFIG",
        default_value = "config/parley.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve {
        /// Listen address, e.g. 127.0.0.1:8080 (overrides server.listen).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Log format: text or json (overrides log.format).
        #[arg(long)]
        log_format: Option<String>,
        /// Development mode: serve on any address even with the public development JWT
        /// secret (anyone can mint tokens for it). Never in production.
        #[arg(long)]
        dev: bool,
    },
    /// Write a configuration with fresh random secrets (JWT, signed URLs, admin token).
    Init {
        /// Where to write it; `-` for standard output.
        #[arg(long, short, default_value = "parley.toml")]
        output: PathBuf,
        /// Write `PARLEY_SECTION__KEY=value` lines instead (for `docker run --env-file`,
        /// docker compose's `.env`, or a Kubernetes Secret); to standard output unless
        /// --output names a file.
        #[arg(long)]
        env: bool,
        /// Replace the file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Exit 0 if the server answers /healthz (for container health checks).
    Health {
        /// host:port of a running parley. Default: the configured listen port on
        /// loopback (server.listen, so PARLEY_SERVER__LISTEN is followed).
        addr: Option<String>,
    },
    /// Mint a token for development (signed with the configured key).
    Token {
        /// The user id (the token's `sub`).
        user: String,
        /// Lifetime, e.g. 1h, 30m, 7d.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
    },
}

/// Errors are printed as one line (the cause chain joined by ": "), never with a
/// backtrace: they are the operator's to fix, not a crash.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("parley: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve {
        listen: None,
        log_format: None,
        dev: false,
    });
    // `init` reads no configuration: it is what makes one.
    if let Command::Init { output, env, force } = command {
        return init(&output, env, force);
    }
    let mut config = Config::load(&cli.config)?;
    match command {
        Command::Init { .. } => unreachable!("handled above"),
        Command::Health { addr } => {
            let addr = addr.unwrap_or_else(|| loopback_of(config.server.listen).to_string());
            health(&addr, config.tls.cert_file.is_some())
        }
        Command::Token { user, ttl } => {
            let auth = Authenticator::new(&config.auth)?;
            let ttl: Duration = ttl.into();
            println!("{}", auth.mint(&user, ttl)?);
            Ok(())
        }
        Command::Serve {
            listen,
            log_format,
            dev,
        } => {
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            refuse_public_dev_secret(&config, dev)?;
            if let Some(f) = log_format {
                config.log.format = match f.as_str() {
                    "json" => LogFormat::Json,
                    "text" => LogFormat::Text,
                    other => anyhow::bail!("unknown log format {other:?} (text or json)"),
                };
            }
            init_logging(&config);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(serve(config))
        }
    }
}

/// Serving the public development secret on an address other machines can reach lets
/// anyone who read the README mint a token for any user: refused, unless `--dev`.
fn refuse_public_dev_secret(config: &Config, dev: bool) -> anyhow::Result<()> {
    let listen = config.server.listen;
    if config.auth.accepts_dev_secret() && !listen.ip().is_loopback() && !dev {
        anyhow::bail!(
            "refusing to serve on {listen} with the public development JWT secret: set \
             PARLEY_AUTH__JWT_SECRET (or run `parley init` for a config with fresh secrets), \
             listen on 127.0.0.1, or pass --dev to accept the risk"
        );
    }
    Ok(())
}

/// The loopback address of a listen address's port (what `parley health` probes).
fn loopback_of(listen: SocketAddr) -> SocketAddr {
    match listen {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    }
}

/// 32 random bytes as hex: a secret for HMAC-SHA256 (JWT HS256, signed URLs) or a bearer
/// token.
fn fresh_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `parley init`: a configuration with fresh secrets, as TOML (mode 0600) or env lines.
fn init(output: &std::path::Path, env: bool, force: bool) -> anyhow::Result<()> {
    let (jwt, admin, url) = (fresh_secret(), fresh_secret(), fresh_secret());
    let text = if env {
        format!(
            "# parley secrets from `parley init --env`. Keep private.\n\
             PARLEY_AUTH__JWT_SECRET={jwt}\n\
             PARLEY_AUTH__ADMIN_TOKEN={admin}\n\
             PARLEY_FILES__URL_SECRET={url}\n"
        )
    } else {
        format!(
            "# parley configuration from `parley init`, with fresh random secrets. Keep it\n\
             # private: whoever holds auth.jwt_secret can act as any user, auth.admin_token\n\
             # opens the admin API, files.url_secret signs download links.\n\
             # Every other option keeps its default; the documented list of options, with\n\
             # their defaults, is config/parley.toml in the source (/etc/parley/parley.toml\n\
             # in the container image). Environment variables override this file.\n\
             \n\
             [server]\n\
             listen = \"0.0.0.0:8080\"\n\
             \n\
             [auth]\n\
             jwt_secret = \"{jwt}\"\n\
             admin_token = \"{admin}\"\n\
             \n\
             [files]\n\
             url_secret = \"{url}\"\n"
        )
    };
    let to_stdout = output.as_os_str() == "-" || (env && output.as_os_str() == "parley.toml");
    if to_stdout {
        std::io::stdout().write_all(text.as_bytes())?;
        return Ok(());
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(output).with_context(|| {
        if output.exists() && !force {
            format!("{} exists (--force replaces it)", output.display())
        } else {
            format!("writing {}", output.display())
        }
    })?;
    file.write_all(text.as_bytes())?;
    eprintln!(
        "parley: wrote {} with fresh secrets; start with: parley --config {} serve",
        output.display(),
        output.display()
    );
    Ok(())
}

/// A minimal HTTP/1.1 GET /healthz, so the container image needs no curl. With `[tls]`
/// configured the server speaks only TLS, so the probe does too; it does not verify the
/// certificate (it asks "is this server up", and the certificate names the public host,
/// not the loopback address probed).
fn health(addr: &str, tls: bool) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(3);
    let target = std::net::ToSocketAddrs::to_socket_addrs(addr)?
        .next()
        .context("address resolves to nothing")?;
    let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let mut response = Vec::new();
    if tls {
        let mut conn = unverified_tls_client()?;
        let mut tls = rustls::Stream::new(&mut conn, &mut stream);
        tls.write_all(request)?;
        // A server may close without close_notify after `Connection: close`; what was
        // read up to then is the answer.
        if let Err(e) = tls.read_to_end(&mut response)
            && (e.kind() != std::io::ErrorKind::UnexpectedEof || response.is_empty())
        {
            return Err(e.into());
        }
    } else {
        stream.write_all(request)?;
        stream.read_to_end(&mut response)?;
    }
    let response = String::from_utf8_lossy(&response);
    if response.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        anyhow::bail!(
            "unhealthy: {}",
            response.lines().next().unwrap_or("no response")
        )
    }
}

/// A TLS client for `parley health` that accepts any certificate (see `health`).
fn unverified_tls_client() -> anyhow::Result<rustls::ClientConnection> {
    use rustls::{
        DigitallySignedStruct, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        pki_types::{CertificateDer, ServerName, UnixTime},
    };
    #[derive(Debug)]
    struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = parley::server::crypto_provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    let name = ServerName::try_from("localhost")?;
    Ok(rustls::ClientConnection::new(Arc::new(config), name)?)
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(config.log.filter.clone()));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    if config.auth.accepts_dev_secret() {
        tracing::warn!(
            "auth.jwt_secret is the public development secret: anyone can mint tokens; set PARLEY_AUTH__JWT_SECRET (or run `parley init`) before exposing parley"
        );
    }
    let server = Server::start(config).await.context("starting the server")?;
    shutdown_signal().await;
    tracing::info!("shutdown signal: draining connections");
    server.shutdown();
    server.wait().await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
