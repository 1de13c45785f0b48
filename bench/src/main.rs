//! `parley-bench`: the CLI around the scenarios in the library. Loopback targets only;
//! every run is bounded in time and count and stops by itself.
//!
//! Typical use (server pinned to core 0, generator to core 1):
//!
//! ```text
//! cargo build --release --bin parley && cargo build --release -p parley-bench
//! taskset -c 1 target/release/parley-bench --spawn-server target/release/parley \
//!     fanout --subscribers 1000 --rate 1000 --duration 10s
//! ```

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use parley::codec::Encoding;
use parley_bench::{
    TransportKind, net,
    probe::{self, Probe, SpawnOptions, SpawnedServer},
    report::{self, Table},
    scenario::{self, Report, Run, shards::Shards},
    stats,
    target::{self, Target},
    tls::TlsClient,
    ui::{Ui, si},
};

#[derive(Parser)]
#[command(
    name = "parley-bench",
    version,
    about = "Load generator for parley (loopback only): idle, fanout, chat and storm scenarios"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args)]
struct Global {
    /// The server's endpoint; only loopback hosts (127.0.0.0/8, ::1, localhost) are
    /// accepted. Ignored with --spawn-server.
    #[arg(long, global = true, default_value = target::DEFAULT_URL)]
    url: String,
    /// Transport to run over (sse, poll: listeners only; fan-out publishers stay on
    /// WebSocket; SSE is always JSON).
    #[arg(long, global = true, value_enum, default_value = "ws")]
    transport: TransportKind,
    /// Wire encoding: proto (binary frames) or json (text frames).
    #[arg(long, global = true, value_parser = parse_encoding, default_value = "proto")]
    encoding: Encoding,
    /// HS256 secret to mint tokens with (must match the server's auth.jwt_secret; a
    /// spawned server gets this one).
    #[arg(long, global = true, env = "PARLEY_BENCH_JWT_SECRET", default_value = target::DEFAULT_SECRET, hide_default_value = true)]
    jwt_secret: String,
    /// PID of the running server, to read its RSS, fds and CPU from /proc.
    #[arg(long, global = true, conflicts_with = "spawn_server")]
    server_pid: Option<u32>,
    /// Start this parley binary for each run (on a free loopback port, pinned with
    /// --server-cpu) and kill it afterwards.
    #[arg(long, global = true, value_name = "PATH")]
    spawn_server: Option<PathBuf>,
    /// CPUs to pin a spawned server to: one ("0"), a list or ranges ("0-3", "0,2,4-7");
    /// "none": do not pin.
    #[arg(long, global = true, default_value = "0", value_parser = parse_cpus)]
    server_cpu: CpuChoice,
    /// Generator threads, each a single-threaded runtime owning a shard of the
    /// connections (pinned one per CPU when this process may use that many). Default:
    /// one per CPU this process may use. 0: one work-stealing runtime for everything
    /// (the generator before issue 24).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Extra environment for a spawned server, KEY=VALUE (repeatable), e.g.
    /// PARLEY_WS__READ_BUFFER_BYTES=512.
    #[arg(long, global = true, value_parser = parse_kv)]
    server_env: Vec<(String, String)>,
    /// Write a spawned server's output here (default: discarded).
    #[arg(long, global = true)]
    server_log: Option<PathBuf>,
    /// Listeners (fanout subscribers, chat members that only read) connect to these
    /// endpoints in turn instead of --url (repeatable): a cluster run with publishers on
    /// one instance and subscribers spread over the others. Loopback only.
    #[arg(long, global = true, value_name = "URL")]
    listener_url: Vec<String>,
    /// Connection attempts in flight at once.
    #[arg(long, global = true, default_value_t = 128)]
    concurrency: usize,
    /// Spread client source addresses over 127.0.0.1..=127.0.0.N (default: one address
    /// per 20k connections).
    #[arg(long, global = true)]
    source_ips: Option<u8>,
    /// Client read buffer per connection, bytes.
    #[arg(long, global = true, default_value_t = 4096)]
    read_buffer: usize,
    /// Long-poll: the `wait` of each poll, seconds (the server holds at most
    /// poll.max_hold, 60 s by default).
    #[arg(long, global = true, default_value_t = 30)]
    poll_wait: u64,
    /// Long-poll: wait this long after each reply before the next poll (a client's
    /// round trip; `0`: at once).
    #[arg(long, global = true, default_value = "0s", value_parser = humantime::parse_duration)]
    poll_gap: Duration,
    /// Timeout for one connect + upgrade + auth.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Run the scenario this many times (a fresh spawned server each time) and report
    /// medians.
    #[arg(long, global = true, default_value_t = 1)]
    repeat: usize,
    /// WebSocket: offer permessage-deflate (yawc's client, as browsers offer it).
    #[arg(long, global = true)]
    deflate: bool,
    /// SSE and long-poll: one HTTP/2 connection per client (cleartext with prior
    /// knowledge; ALPN h2 with --tls) carries the stream or polls and the commands, as a
    /// browser's connection over HTTPS does; without it, HTTP/1.1 (SSE's commands then
    /// need a second connection).
    #[arg(long, global = true)]
    http2: bool,
    /// SSE and long-poll: send the request headers Chromium sends with the SDK's
    /// `fetch`es (user agent, client hints, fetch metadata, referer, languages; about
    /// 0.6 KB; bodies asked for uncompressed), as a browser does: over HTTP/2 the
    /// server's header table then holds what a browser's connection makes it hold.
    #[arg(long, global = true)]
    browser_headers: bool,
    /// TLS on every connection (ws, sse, poll; ALPN h2 with --http2, http/1.1 without),
    /// as browsers on an HTTPS page have. With --spawn-server and no --tls-ca, the server
    /// gets a fresh self-signed certificate for localhost and 127.0.0.1
    /// (PARLEY_TLS__CERT_FILE/KEY_FILE) and the generator trusts it; otherwise give
    /// --tls-ca. A wss:// or https:// --url implies it.
    #[arg(long, global = true)]
    tls: bool,
    /// Trust the certificates in this PEM file (a CA, or the server's own self-signed
    /// certificate) and nothing else; implies --tls. TLS verifies the URL's host, so use
    /// a name or address the certificate carries (e.g. https://localhost:PORT). A
    /// spawned server then needs its certificate and key through --server-env
    /// (PARLEY_TLS__CERT_FILE=..., PARLEY_TLS__KEY_FILE=...) and is reached as 127.0.0.1.
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Print the report as JSON on stdout (the table goes to stderr).
    #[arg(long, global = true)]
    json: bool,
    /// Write a chart of the (last) run as SVG.
    #[arg(long, global = true, value_name = "PATH.svg")]
    chart: Option<PathBuf>,
    /// No progress bars.
    #[arg(long, global = true)]
    no_progress: bool,
}

#[derive(Subcommand)]
enum Scenario {
    /// N authenticated connections held open: server bytes per connection, connect rate.
    Idle {
        #[arg(long, short = 'n', default_value_t = 1000)]
        connections: usize,
        /// How long to hold them once open.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        hold: Duration,
        /// Pause before each memory reading.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        settle: Duration,
        /// Each connection also joins this room once authenticated (one big room: the
        /// cost of a membership on top of a connection).
        #[arg(long, value_name = "ROOM")]
        join: Option<String>,
    },
    /// One room, N subscribers, publishers at R msgs/s: deliveries/s, latency, and a
    /// check that nothing was lost, duplicated or reordered.
    Fanout {
        #[arg(long, short = 'n', default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Messages per second, all publishers together.
        #[arg(long, short = 'r', default_value_t = 100.0)]
        rate: f64,
        #[arg(long, short = 'd', default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Stop after this many messages in total.
        #[arg(long)]
        messages: Option<u64>,
        /// Message body size, bytes.
        #[arg(long, default_value_t = 100)]
        body_bytes: usize,
        /// After publishing, how long to wait for every delivery.
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        drain_timeout: Duration,
        /// Acknowledge the session position every this many pushes (0: never; the
        /// server then keeps every push in its replay buffer up to its byte bound).
        #[arg(long, default_value_t = 100)]
        ack_every: u64,
    },
    /// N users in rooms of K, each sending every T: the realistic mix.
    Chat {
        #[arg(long, short = 'n', default_value_t = 1000)]
        users: usize,
        #[arg(long, short = 'k', default_value_t = 10)]
        room_size: usize,
        /// Each user sends a message this often.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        every: Duration,
        #[arg(long, short = 'd', default_value = "20s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value_t = 100)]
        body_bytes: usize,
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        drain_timeout: Duration,
        /// Acknowledge the session position every this many pushes (0: never).
        #[arg(long, default_value_t = 100)]
        ack_every: u64,
    },
    /// Connect/auth/disconnect churn: handshakes/s, errors, server fds and memory.
    Storm {
        /// Concurrent workers.
        #[arg(long, short = 'c', default_value_t = 64)]
        workers: usize,
        #[arg(long, short = 'd', default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Pause before the last server reading.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        settle: Duration,
        /// Each handshake also joins a room before it disconnects (connect + auth +
        /// join per cycle).
        #[arg(long)]
        join: bool,
    },
}

#[derive(Clone, Debug)]
struct CpuChoice(Vec<usize>);

/// "none", "3", "0-3", "0,2,4-7".
fn parse_cpus(s: &str) -> Result<CpuChoice, String> {
    if s == "none" {
        return Ok(CpuChoice(Vec::new()));
    }
    let bad = || format!("{s:?} is not a CPU list (\"0\", \"0-3\", \"0,2,4-7\") or \"none\"");
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if a > b || b >= 1024 {
            return Err(bad());
        }
        cpus.extend(a..=b);
    }
    Ok(CpuChoice(cpus))
}

fn parse_encoding(s: &str) -> Result<Encoding, String> {
    match s {
        "proto" | "protobuf" => Ok(Encoding::Proto),
        "json" => Ok(Encoding::Json),
        _ => Err(format!("unknown encoding {s:?} (proto or json)")),
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

impl Scenario {
    /// Most connections open at once (for the fd limit and source addresses).
    fn connections(&self) -> usize {
        match self {
            Scenario::Idle { connections, .. } => *connections,
            Scenario::Fanout {
                subscribers,
                publishers,
                ..
            } => subscribers + publishers,
            Scenario::Chat { users, .. } => *users,
            Scenario::Storm { workers, .. } => *workers,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cpus = probe::allowed_cpus();
    let threads = cli.global.threads.unwrap_or(cpus.len().max(1));
    // With shards the connections live on the shard threads; this runtime only
    // coordinates (sampling, draining, verification).
    let (rt, shards) = if threads == 0 {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        (rt, None)
    } else {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let shards = Shards::start(threads, &cpus).context("starting generator threads")?;
        (rt, Some(Arc::new(shards)))
    };
    let ok = rt.block_on(async {
        tokio::select! {
            r = run(cli, shards.clone()) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    })?;
    // Do not wait for connection tasks still closing.
    rt.shutdown_timeout(Duration::from_millis(500));
    drop(shards);
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

async fn run(cli: Cli, shards: Option<Arc<Shards>>) -> anyhow::Result<bool> {
    let g = &cli.global;
    let conns = cli.scenario.connections();
    // Each connection is one fd here and one in the server (which inherits this limit
    // when spawned); storms also hold sockets while they close.
    let want = (conns as u64 + 1024).max(4096) * 2;
    let (soft, _) = net::raise_nofile(want);
    if soft < conns as u64 + 256 {
        eprintln!(
            "warning: the fd limit is {soft}; {conns} connections need more (ulimit -n, or run as root)"
        );
    }
    if g.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let ui = Ui {
        enabled: !g.no_progress,
    };

    let tls_wanted = g.tls || g.tls_ca.is_some() || target::url_wants_tls(&g.url);
    if tls_wanted && g.transport == TransportKind::Wt {
        bail!("--transport wt is always TLS (QUIC); drop --tls/--tls-ca and the wss:// URL");
    }
    // A spawned server without a given CA gets a self-signed certificate that lives
    // (its temporary directory) until this function returns.
    let self_signed = match (tls_wanted, &g.tls_ca, &g.spawn_server) {
        (true, None, Some(_)) => Some(parley_bench::tls::SelfSigned::generate("spawn")?),
        (true, None, None) => {
            bail!("--tls needs --tls-ca FILE (the certificate to trust) unless --spawn-server")
        }
        _ => None,
    };
    let tls = match (&g.tls_ca, &self_signed) {
        (Some(ca), _) => Some(TlsClient::from_pem_file(ca)?),
        (None, Some(s)) => Some(TlsClient::from_pem_file(&s.cert_file)?),
        (None, None) => None,
    };
    let new_target = |url: &str| match &tls {
        Some(tls) => Target::new_tls(url, g.transport, g.encoding, &g.jwt_secret, tls.clone()),
        None => Target::new(url, g.transport, g.encoding, &g.jwt_secret),
    };
    let mut target = new_target(&g.url)?;
    target.buffers.read = g.read_buffer;
    target.connect_timeout = g.connect_timeout;
    target.poll_wait_s = g.poll_wait;
    target.poll_gap = g.poll_gap;
    target.deflate = g.deflate;
    target.http2 = g.http2;
    target.browser_headers = g.browser_headers;
    target.source_ips = g.source_ips.unwrap_or_else(|| net::source_ips_for(conns));
    let spawn = g.spawn_server.as_ref().map(|path| {
        let mut env = g.server_env.clone();
        if let Some(s) = &self_signed {
            env.push(("PARLEY_TLS__CERT_FILE".into(), path_env(&s.cert_file)));
            env.push(("PARLEY_TLS__KEY_FILE".into(), path_env(&s.key_file)));
        }
        SpawnOptions {
            binary: path.clone(),
            jwt_secret: g.jwt_secret.clone(),
            cpus: g.server_cpu.0.clone(),
            env,
            log: g.server_log.clone(),
        }
    });
    if let Some(tls) = &tls {
        eprintln!("over TLS, trusting {}", tls.ca_file.display());
    }
    let server_pid = match g.server_pid {
        Some(pid) => Some(Probe::new(pid)?),
        None => None,
    };
    if spawn.is_none() && server_pid.is_none() {
        eprintln!(
            "note: no --server-pid or --spawn-server: server memory and CPU are not measured"
        );
    }
    eprintln!(
        "parley-bench on {} (generator CPUs {:?}, {})",
        probe::machine(),
        probe::allowed_cpus(),
        match &shards {
            Some(s) => format!("{} shard threads", s.len()),
            None => "one work-stealing runtime".to_string(),
        }
    );

    let loadavg_at_start = probe::loadavg();
    let mut reports: Vec<Box<dyn ReportJson>> = Vec::new();
    for i in 0..g.repeat {
        let server = match &spawn {
            Some(opts) => {
                let s = SpawnedServer::spawn(opts).context("spawning the server")?;
                eprintln!(
                    "spawned parley pid {} on {} (cpus {:?})",
                    s.pid(),
                    s.addr(),
                    opts.cpus
                );
                Some(s)
            }
            None => None,
        };
        let mut run = Run::new(target.clone());
        if let Some(s) = &server {
            run.target.addr = s.addr();
            // The spawned server's certificate names localhost.
            run.target.host = match &self_signed {
                Some(_) => format!("localhost:{}", s.addr().port()),
                None => s.addr().to_string(),
            };
            run.server = Some(s.probe());
        } else {
            run.server = server_pid;
        }
        run.ui = ui;
        run.connect_concurrency = g.concurrency;
        run.shards = shards.clone();
        for url in &g.listener_url {
            let mut t = new_target(url)?;
            t.buffers = run.target.buffers;
            t.connect_timeout = run.target.connect_timeout;
            t.poll_wait_s = run.target.poll_wait_s;
            t.poll_gap = run.target.poll_gap;
            t.source_ips = run.target.source_ips;
            run.listener_targets.push(t);
        }
        eprintln!(
            "run {}/{}, load average {}",
            i + 1,
            g.repeat,
            probe::loadavg()
        );
        let report: Box<dyn ReportJson> = match &cli.scenario {
            Scenario::Idle {
                connections,
                hold,
                settle,
                join,
            } => {
                let p = scenario::idle::Params {
                    connections: *connections,
                    hold: *hold,
                    settle: *settle,
                    join: join.clone(),
                };
                Box::new(scenario::idle::run(&run, &p).await?)
            }
            Scenario::Fanout {
                subscribers,
                publishers,
                rate,
                duration,
                messages,
                body_bytes,
                drain_timeout,
                ack_every,
            } => {
                let p = scenario::fanout::Params {
                    subscribers: *subscribers,
                    publishers: *publishers,
                    rate: *rate,
                    duration: *duration,
                    messages: *messages,
                    body_bytes: *body_bytes,
                    drain_timeout: *drain_timeout,
                    ack_every: *ack_every,
                };
                Box::new(scenario::fanout::run(&run, &p).await?)
            }
            Scenario::Chat {
                users,
                room_size,
                every,
                duration,
                body_bytes,
                drain_timeout,
                ack_every,
            } => {
                let p = scenario::chat::Params {
                    users: *users,
                    room_size: *room_size,
                    every: *every,
                    duration: *duration,
                    body_bytes: *body_bytes,
                    drain_timeout: *drain_timeout,
                    ack_every: *ack_every,
                };
                Box::new(scenario::chat::run(&run, &p).await?)
            }
            Scenario::Storm {
                workers,
                duration,
                settle,
                join,
            } => {
                let p = scenario::storm::Params {
                    workers: *workers,
                    duration: *duration,
                    settle: *settle,
                    join: *join,
                };
                Box::new(scenario::storm::run(&run, &p).await?)
            }
        };
        drop(server);
        eprintln!("{}", report.table().render());
        if !report.ok() {
            eprintln!("RUN FAILED VERIFICATION (see the table above)");
        }
        reports.push(report);
    }

    let ok = reports.iter().all(|r| r.ok());
    let medians = medians(&reports);
    if g.repeat > 1 {
        let mut t = Table::new(format!("medians of {} runs", reports.len()));
        for (k, v) in &medians {
            t.row(*k, format!("{} (runs: {})", fmt(*v), runs_of(&reports, k)));
        }
        eprintln!("{}", t.render());
    }
    if let (Some(path), Some(last)) = (&g.chart, reports.last()) {
        report::write_svg(path, &last.title(), &last.panels())?;
        eprintln!("chart written to {}", path.display());
    }
    if g.json {
        let runs: Vec<serde_json::Value> = reports.iter().map(|r| r.json()).collect();
        let medians: serde_json::Map<String, serde_json::Value> = medians
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
            .collect();
        let out = serde_json::json!({
            "machine": probe::machine(),
            "loadavg_at_start": loadavg_at_start,
            "loadavg_at_end": probe::loadavg(),
            "ok": ok,
            "medians": medians,
            "runs": runs,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(ok)
}

/// A report that can also serialize itself as a JSON value (object safe).
trait ReportJson {
    fn json(&self) -> serde_json::Value;
    fn table(&self) -> Table;
    fn panels(&self) -> Vec<report::Panel>;
    fn ok(&self) -> bool;
    fn title(&self) -> String;
    fn headline(&self) -> Vec<(&'static str, f64)>;
}

impl<R: Report> ReportJson for R {
    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
    fn table(&self) -> Table {
        Report::table(self)
    }
    fn panels(&self) -> Vec<report::Panel> {
        Report::panels(self)
    }
    fn ok(&self) -> bool {
        Report::ok(self)
    }
    fn title(&self) -> String {
        Report::title(self)
    }
    fn headline(&self) -> Vec<(&'static str, f64)> {
        Report::headline(self)
    }
}

fn medians(reports: &[Box<dyn ReportJson>]) -> Vec<(&'static str, f64)> {
    let Some(first) = reports.first() else {
        return Vec::new();
    };
    first
        .headline()
        .iter()
        .map(|(k, _)| {
            let mut vals: Vec<f64> = reports
                .iter()
                .filter_map(|r| r.headline().iter().find(|(kk, _)| kk == k).map(|x| x.1))
                .collect();
            (*k, stats::median(&mut vals))
        })
        .collect()
}

fn runs_of(reports: &[Box<dyn ReportJson>], key: &str) -> String {
    reports
        .iter()
        .filter_map(|r| {
            r.headline()
                .iter()
                .find(|(k, _)| *k == key)
                .map(|x| fmt(x.1))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v.abs() < 100.0 {
        format!("{v:.2}")
    } else {
        si(v)
    }
}

fn path_env(path: &std::path::Path) -> String {
    path.to_string_lossy().into_owned()
}
