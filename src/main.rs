//! The `parley` binary: `parley serve` (default) and `parley token`.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use parley::{
    auth::Authenticator,
    config::{Config, DEV_JWT_SECRET, JwtAlgorithm, LogFormat},
    server::Server,
};
use tracing_subscriber::EnvFilter;

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
    },
    /// Exit 0 if the server at ADDR answers /healthz (for container health checks).
    Health {
        /// host:port of a running parley.
        #[arg(default_value = "127.0.0.1:8080")]
        addr: String,
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
    let mut config = Config::load(&cli.config)?;
    match cli.command.unwrap_or(Command::Serve {
        listen: None,
        log_format: None,
    }) {
        Command::Health { addr } => health(&addr),
        Command::Token { user, ttl } => {
            let auth = Authenticator::new(&config.auth)?;
            let ttl: Duration = ttl.into();
            println!("{}", auth.mint(&user, ttl)?);
            Ok(())
        }
        Command::Serve { listen, log_format } => {
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
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

/// A minimal HTTP/1.1 GET /healthz, so the container image needs no curl.
fn health(addr: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(3);
    let target = std::net::ToSocketAddrs::to_socket_addrs(addr)?
        .next()
        .context("address resolves to nothing")?;
    let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if response.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        anyhow::bail!(
            "unhealthy: {}",
            response.lines().next().unwrap_or("no response")
        )
    }
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
    if config.auth.algorithm == JwtAlgorithm::HS256 && config.auth.jwt_secret == DEV_JWT_SECRET {
        tracing::warn!(
            "auth.jwt_secret is the built-in development secret: set PARLEY_AUTH__JWT_SECRET before exposing parley"
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
