//! Fast end-to-end checks of the load generator against an in-process parley server on
//! an ephemeral loopback port: every scenario runs, small, and verifies.

use std::time::Duration;

use parley::{codec::Encoding, config::Config, server::Server};
use parley_bench::{
    TransportKind,
    probe::Probe,
    report,
    scenario::{self, Report, Run},
    target::Target,
};

const SECRET: &str = "bench-smoke-secret";

async fn server() -> Server {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.auth.jwt_secret = SECRET.into();
    config.store.path = ":memory:".into();
    config.limits = parley::config::LimitsConfig::off();
    Server::start(config).await.expect("server starts")
}

fn run_for(server: &Server, encoding: Encoding) -> Run {
    let url = format!("ws://{}/ws", server.local_addr());
    let target = Target::new(&url, TransportKind::Ws, encoding, SECRET).unwrap();
    let mut run = Run::new(target);
    // The server runs in this process.
    run.server = Some(Probe::me());
    run
}

/// Runs a fan-out and fails, with `what`, the verification and the report's table,
/// unless every delivery verified.
/// A short verified fan-out: SUBSCRIBERS listeners, PUBLISHERS senders of MESSAGES in all at
/// 200/s (at most 5 s), 100-byte bodies, an ack every 7 pushes, 5 s to drain.
fn small_fanout(subscribers: usize, publishers: usize, messages: u64) -> scenario::fanout::Params {
    scenario::fanout::Params {
        subscribers,
        publishers,
        rate: 200.0,
        duration: Duration::from_secs(5),
        messages: Some(messages),
        body_bytes: 100,
        drain_timeout: Duration::from_secs(5),
        ack_every: 7,
    }
}

async fn fanout_verified(
    run: &Run,
    params: &scenario::fanout::Params,
    what: &str,
) -> scenario::fanout::FanoutReport {
    let report = scenario::fanout::run(run, params).await.unwrap();
    assert!(
        report.ok(),
        "{what}: {:?}\n{}",
        report.outcome.verification,
        report.table().render()
    );
    report
}

/// `connections` idle sessions of `run`, each joined to `room`, held `hold_ms`: the run
/// verifies and opens them all (`what` names the case in a failure).
async fn idle_joined(
    run: &Run,
    connections: usize,
    hold_ms: u64,
    room: &str,
    what: &str,
) -> scenario::idle::IdleReport {
    let idle = scenario::idle::run(
        run,
        &scenario::idle::Params {
            connections,
            hold: Duration::from_millis(hold_ms),
            settle: Duration::ZERO,
            join: Some(room.into()),
        },
    )
    .await
    .unwrap();
    assert!(idle.ok(), "{what} {}", idle.table().render());
    assert_eq!(idle.connected, connections as u64, "{what}");
    idle
}

/// A 500 ms connect storm of `workers`, with or without a room join per cycle: it
/// verifies and completes at least one handshake.
async fn storm_for(run: &Run, workers: usize, join: bool) -> scenario::storm::StormReport {
    let storm = scenario::storm::run(
        run,
        &scenario::storm::Params {
            workers,
            duration: Duration::from_millis(500),
            settle: Duration::ZERO,
            join,
        },
    )
    .await
    .unwrap();
    assert!(storm.ok(), "{}", storm.table().render());
    assert!(storm.handshakes > 0);
    storm
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_everything_exactly_once_in_both_encodings() {
    let server = server().await;
    for encoding in [Encoding::Proto, Encoding::Json] {
        let params = scenario::fanout::Params {
            rate: 1000.0,
            ack_every: 10,
            ..small_fanout(20, 2, 50)
        };
        let what = format!("{encoding:?}");
        let report = fanout_verified(&run_for(&server, encoding), &params, &what).await;
        let o = &report.outcome;
        assert_eq!(o.published, 50, "{encoding:?}");
        assert_eq!(o.expected_deliveries, 20 * 50, "{encoding:?}");
        assert_eq!(o.delivered, 20 * 50, "{encoding:?}");
        assert_eq!(o.latency.count, 20 * 50, "{encoding:?}");
        assert!(o.latency.p50_ms > 0.0 && o.latency.max_ms < 5_000.0);

        // The chart renders from a real report.
        let dir = std::env::temp_dir().join(format!("parley-bench-smoke-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("fanout-{encoding:?}.svg"));
        report::write_svg(&path, &report.title(), &report.panels()).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("<svg"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
    server.shutdown();
}

/// With permessage-deflate offered (yawc's client, not the generator's own frame
/// reader): bodies long enough to be compressed, every delivery verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_with_deflate_verifies() {
    let server = server().await;
    let mut run = run_for(&server, Encoding::Proto);
    run.target.deflate = true;
    let params = scenario::fanout::Params {
        rate: 1000.0,
        body_bytes: 600,
        ack_every: 5,
        ..small_fanout(10, 1, 40)
    };
    let report = fanout_verified(&run, &params, "deflate").await;
    let o = &report.outcome;
    assert_eq!(o.delivered, 10 * 40);
    server.shutdown();
}

/// The same fan-out with the members on three shard threads (each its own runtime),
/// the coordinator on the test's runtime: every delivery counted and verified, every
/// latency recorded, in its shard's counters; then idle and storm on the shards too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenarios_verify_on_shard_threads() {
    let server = server().await;
    let mut run = run_for(&server, Encoding::Proto);
    run.shards = Some(std::sync::Arc::new(
        scenario::shards::Shards::start(3, &[]).unwrap(),
    ));
    let params = scenario::fanout::Params {
        rate: 1000.0,
        ..small_fanout(31, 2, 60)
    };
    let report = fanout_verified(&run, &params, "shards").await;
    let o = &report.outcome;
    assert_eq!(o.published, 60);
    assert_eq!(o.delivered, 31 * 60);
    assert_eq!(o.latency.count, 31 * 60);
    idle_joined(&run, 10, 200, "smoke-shards", "").await;
    let storm = storm_for(&run, 6, true).await;
    assert_eq!(storm.handshake_latency.count, storm.handshakes);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_rooms_verify() {
    let server = server().await;
    let params = scenario::chat::Params {
        users: 12,
        room_size: 4,
        every: Duration::from_millis(100),
        duration: Duration::from_millis(800),
        body_bytes: 64,
        drain_timeout: Duration::from_secs(5),
        ack_every: 3,
    };
    let report = scenario::chat::run(&run_for(&server, Encoding::Proto), &params)
        .await
        .unwrap();
    let o = &report.outcome;
    assert!(report.ok(), "{:?}", o.verification);
    assert_eq!(o.rooms, 3);
    assert!(o.published > 0);
    // Every message reaches all 4 members of its room (the sender included).
    assert_eq!(o.delivered, o.published * 4);
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_storm_run() {
    let server = server().await;
    let run = run_for(&server, Encoding::Json);
    // Each also joins one room (a join refused or unanswered fails the run).
    let idle = idle_joined(&run, 25, 300, "smoke-idle", "").await;
    // The probe really read the server's memory (this process: tests run the server
    // in-process, beside other tests, so the per-connection delta itself is noise here;
    // the release runs in BENCHMARKS.md measure it on a spawned server).
    let before = idle.server_before.as_ref().expect("server RSS before");
    let connected = idle
        .server_connected
        .as_ref()
        .expect("server RSS connected");
    assert!(before.rss > 1 << 20, "RSS {} bytes", before.rss);
    assert!(connected.rss > 1 << 20, "RSS {} bytes", connected.rss);
    let per_conn = idle
        .server_bytes_per_connection
        .expect("per-connection figure");
    assert!(per_conn.is_finite());

    storm_for(&run, 4, false).await;
    // With the room join in every cycle.
    storm_for(&run, 4, true).await;
    server.shutdown();
}

#[test]
fn refuses_non_loopback_targets() {
    let t = |url: &str, tr| Target::new(url, tr, Encoding::Proto, SECRET);
    assert!(t("ws://10.1.2.3:8080/ws", TransportKind::Ws).is_err());
    assert!(t("ws://example.org/ws", TransportKind::Ws).is_err());
    assert!(t("ws://10.1.2.3:8080/ws", TransportKind::Sse).is_err());
    assert!(t("ws://127.0.0.1:8080/ws", TransportKind::Ws).is_ok());
    // SSE streams are JSON only.
    let sse = t("ws://127.0.0.1:8080/ws", TransportKind::Sse).unwrap();
    assert_eq!(sse.encoding, Encoding::Json);
}

fn http_run(server: &Server, transport: TransportKind, encoding: Encoding) -> Run {
    let url = format!("ws://{}/ws", server.local_addr());
    let mut target = Target::new(&url, transport, encoding, SECRET).unwrap();
    // Short holds, so the poll loop is exercised (empty replies, re-polls).
    target.poll_wait_s = 1;
    let mut run = Run::new(target);
    run.server = Some(Probe::me());
    run
}

/// SSE and long-poll listeners (publishers on WebSocket): everything delivered exactly
/// once, in order, in every encoding the transport has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_over_sse_and_long_poll_verifies() {
    let server = server().await;
    for (transport, encoding) in [
        (TransportKind::Sse, Encoding::Json),
        (TransportKind::Poll, Encoding::Json),
        (TransportKind::Poll, Encoding::Proto),
    ] {
        let params = small_fanout(12, 2, 40);
        let what = format!("{transport:?}/{encoding:?}");
        let run = http_run(&server, transport, encoding);
        let report = fanout_verified(&run, &params, &what).await;
        let o = &report.outcome;
        assert_eq!(report.transport, transport.name());
        assert_eq!(o.published, 40, "{transport:?}/{encoding:?}");
        assert_eq!(o.delivered, 12 * 40, "{transport:?}/{encoding:?}");
        assert_eq!(o.latency.count, 12 * 40, "{transport:?}/{encoding:?}");
    }
    server.shutdown();
}

/// Idle SSE streams and pending polls stay open through the hold (the poll loop re-polls
/// after each empty reply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_over_sse_and_long_poll() {
    let server = server().await;
    for transport in [TransportKind::Sse, TransportKind::Poll] {
        // Joined: the join is a POST, and the `joined` pushes the members get
        // are acknowledged with POSTs while the stream or poll stays open.
        let idle = idle_joined(
            &http_run(&server, transport, Encoding::Json),
            15,
            1500,
            "smoke-http",
            &format!("{transport:?}"),
        )
        .await;
        assert_eq!(idle.transport, transport.name());
    }
    server.shutdown();
}

/// `--http2`: SSE and long-poll over one HTTP/2 connection per client (h2c, prior
/// knowledge), the stream or polls and the commands on it together. Every push is
/// delivered once and in order, the idle sessions stay open, and an SSE client holds one
/// connection, not the two it needs over HTTP/1.1 (the server's and the client's sockets
/// are in this process: two descriptors per connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_and_long_poll_over_http2() {
    let server = server().await;
    let over = |transport, encoding, http2: bool| {
        let mut run = http_run(&server, transport, encoding);
        run.target.http2 = http2;
        run
    };
    for (transport, encoding) in [
        (TransportKind::Sse, Encoding::Json),
        (TransportKind::Poll, Encoding::Proto),
    ] {
        let params = small_fanout(8, 1, 30);
        let what = format!("{transport:?}/{encoding:?} over HTTP/2");
        let report = fanout_verified(&over(transport, encoding, true), &params, &what).await;
        assert_eq!(report.outcome.delivered, 8 * 30, "{what}");
        // With Chromium's request headers (--browser-headers): the server takes them
        // (a POST's origin, the languages, the fetch metadata) and the table they fill.
        let mut run = over(transport, encoding, true);
        run.target.browser_headers = true;
        let what = format!("{what}, browser headers");
        let report = fanout_verified(&run, &small_fanout(4, 1, 10), &what).await;
        assert_eq!(report.outcome.delivered, 4 * 10, "{what}");
    }
    // The most connections to the server's port at once while n SSE sessions are held,
    // over HTTP/1.1 and over HTTP/2 (read from /proc/net/tcp: only this test uses this
    // server, whatever else runs in the process).
    let port = server.local_addr().port();
    let n = 12;
    let mut most = Vec::new();
    for http2 in [false, true] {
        // Each phase counts from none: the generator's connections close as their tasks
        // notice the run ended, which on a loaded machine (CI) took long enough for the
        // HTTP/1.1 phase's 12 command connections to be counted in the HTTP/2 phase
        // ([24, 24]); the fan-out's above are waited for too.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while established_to(port) > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "before http2 {http2}: {} connections still open after 10 s",
                established_to(port)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let run = over(TransportKind::Sse, Encoding::Json, http2);
        let what = format!("idle SSE, http2 {http2}");
        let idle = tokio::spawn(async move { idle_joined(&run, n, 2500, "smoke-h2", &what).await });
        let mut seen = 0;
        while !idle.is_finished() {
            seen = seen.max(established_to(port));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        idle.await.unwrap();
        most.push(seen);
    }
    assert_eq!(
        most,
        [2 * n, n],
        "HTTP/1.1: a stream and a command connection each; HTTP/2: one"
    );
    server.shutdown();
}

/// Established TCP connections whose local port is `port` (the server's side of each).
/// Each is counted once by its address pair: the kernel writes the table a page per
/// read, and a socket that moves in the table between two reads is listed twice (seen
/// in CI while the generator opened connections: [26, 12], then [24, 15] and [28, 12]
/// with the client's 52 dials in every run).
fn established_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let suffix = format!(":{port:04X}");
    let mut seen = std::collections::HashSet::new();
    for line in table.lines().skip(1) {
        let mut fields = line.split_whitespace();
        let (Some(local), Some(remote), Some(state)) =
            (fields.nth(1), fields.next(), fields.next())
        else {
            continue;
        };
        if state == "01" && local.ends_with(&suffix) {
            seen.insert((local, remote));
        }
    }
    seen.len()
}

/// A server with TLS (a fresh self-signed certificate in a temporary directory), so it
/// also serves HTTP/3 and `/wt`; the directory goes when the guard drops.
async fn tls_server() -> (Server, TempCerts) {
    let (dir, cert, private) = temp_certs("server");
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.auth.jwt_secret = SECRET.into();
    config.store.path = ":memory:".into();
    config.limits = parley::config::LimitsConfig::off();
    config.tls.cert_file = Some(cert.to_str().unwrap().into());
    config.tls.key_file = Some(private.to_str().unwrap().into());
    let server = Server::start(config).await.expect("TLS server starts");
    (server, TempCerts(dir))
}

/// A fresh self-signed certificate and key in a temporary directory (removed with the
/// returned guard's drop, here the caller's `TempCerts`): the directory, cert, key.
fn temp_certs(name: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let key =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir =
        std::env::temp_dir().join(format!("parley-bench-smoke-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, private) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, key.cert.pem()).unwrap();
    std::fs::write(&private, key.signing_key.serialize_pem()).unwrap();
    (dir, cert, private)
}

struct TempCerts(std::path::PathBuf);

impl Drop for TempCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `--transport wt`: WebTransport listeners and publishers, every delivery exactly once
/// and in order in both encodings; then idle joined sessions stay open through a hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_and_idle_over_webtransport_verify() {
    let (server, _certs) = tls_server().await;
    let quic = server.http3_addr().expect("HTTP/3 listens with TLS");
    let run = |encoding| {
        let target = Target::new(
            &format!("ws://{quic}/ws"),
            TransportKind::Wt,
            encoding,
            SECRET,
        )
        .unwrap();
        let mut run = Run::new(target);
        run.server = Some(Probe::me());
        run
    };
    for encoding in [Encoding::Json, Encoding::Proto] {
        let params = small_fanout(12, 2, 40);
        let what = format!("{encoding:?}");
        let report = fanout_verified(&run(encoding), &params, &what).await;
        let o = &report.outcome;
        assert_eq!(report.transport, "wt");
        assert_eq!(o.published, 40, "{encoding:?}");
        assert_eq!(o.delivered, 12 * 40, "{encoding:?}");
        assert_eq!(o.latency.count, 12 * 40, "{encoding:?}");
    }
    let idle = idle_joined(&run(Encoding::Proto), 15, 1500, "smoke-wt", "").await;
    assert_eq!(idle.transport, "wt");
    server.shutdown();
}

/// `parley-floor` with a certificate serves `/wt` (the floor `/wt`'s memory is measured
/// against, docs/BENCHMARKS.md round eight): a fan-out over it verifies (every delivery
/// once, in order) and idle joined sessions stay open through a hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_floor_serves_webtransport() {
    let (dir, cert, key) = temp_certs("floor");
    let _certs = TempCerts(dir);
    let mut floor = parley_bench::probe::SpawnedServer::spawn(&parley_bench::probe::SpawnOptions {
        binary: env!("CARGO_BIN_EXE_parley-floor").into(),
        jwt_secret: SECRET.into(),
        cpus: Vec::new(),
        env: vec![
            (
                "PARLEY_TLS__CERT_FILE".into(),
                cert.to_str().unwrap().into(),
            ),
            ("PARLEY_TLS__KEY_FILE".into(), key.to_str().unwrap().into()),
        ],
        log: None,
    })
    .expect("the floor starts");
    let target = Target::new(
        &format!("ws://{}/ws", floor.addr()),
        TransportKind::Wt,
        Encoding::Proto,
        SECRET,
    )
    .unwrap();
    let mut run = Run::new(target);
    run.server = Some(floor.probe());
    let params = scenario::fanout::Params {
        ack_every: 0,
        ..small_fanout(6, 1, 20)
    };
    let report = fanout_verified(&run, &params, "the floor's /wt").await;
    let o = &report.outcome;
    assert_eq!(report.transport, "wt");
    assert_eq!(o.delivered, 6 * 20);
    let idle = idle_joined(&run, 10, 1000, "floor-wt", "the floor").await;
    assert_eq!(idle.transport, "wt");
    floor.stop(Duration::from_secs(2));
}

/// `--tls` / `--tls-ca`: WebSocket (plain and with permessage-deflate), SSE and long-poll
/// (HTTP/1.1, and HTTP/2 chosen by ALPN) over TLS to the server's own TLS listener,
/// trusting only its certificate file. Every push is delivered once and in order and
/// idle joined sessions stay open. The listener speaks nothing but TLS, so a target that
/// ignored its TLS client would fail: the same run over cleartext is shown to fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_transport_over_tls_verifies() {
    let (server, certs) = tls_server().await;
    let tls = parley_bench::tls::TlsClient::from_pem_file(&certs.0.join("cert.pem")).unwrap();
    let port = server.local_addr().port();
    let over = |transport, encoding, http2: bool, deflate: bool| {
        let mut target = Target::new_tls(
            &format!("wss://localhost:{port}/ws"),
            transport,
            encoding,
            SECRET,
            tls.clone(),
        )
        .unwrap();
        target.poll_wait_s = 1;
        target.http2 = http2;
        target.deflate = deflate;
        let mut run = Run::new(target);
        run.server = Some(Probe::me());
        run
    };
    for (transport, encoding, http2, deflate) in [
        (TransportKind::Ws, Encoding::Proto, false, false),
        (TransportKind::Ws, Encoding::Json, false, true),
        (TransportKind::Sse, Encoding::Json, false, false),
        (TransportKind::Sse, Encoding::Json, true, false),
        (TransportKind::Poll, Encoding::Proto, false, false),
        (TransportKind::Poll, Encoding::Json, true, false),
    ] {
        let what = format!("{transport:?}/{encoding:?} over TLS, http2 {http2} deflate {deflate}");
        let run = over(transport, encoding, http2, deflate);
        let params = scenario::fanout::Params {
            body_bytes: 300,
            ..small_fanout(6, 1, 20)
        };
        let report = fanout_verified(&run, &params, &what).await;
        assert_eq!(report.outcome.delivered, 6 * 20, "{what}");
        let idle = idle_joined(&run, 6, 1200, "smoke-tls", &what).await;
        assert_eq!(idle.transport, transport.name(), "{what}");
    }
    // The same idle run in cleartext opens nothing on the TLS listener.
    let url = format!("ws://{}/ws", server.local_addr());
    let mut target = Target::new(&url, TransportKind::Ws, Encoding::Proto, SECRET).unwrap();
    target.connect_timeout = Duration::from_secs(2);
    let mut plain = Run::new(target);
    plain.server = Some(Probe::me());
    let refused = scenario::idle::run(
        &plain,
        &scenario::idle::Params {
            connections: 2,
            hold: Duration::from_millis(100),
            settle: Duration::ZERO,
            join: None,
        },
    )
    .await;
    assert!(
        refused.is_err() || refused.as_ref().is_ok_and(|r| !r.ok() && r.connected == 0),
        "cleartext must not open sessions on the TLS port"
    );
    // A TLS URL without a certificate to trust is refused up front.
    assert!(
        Target::new(
            &format!("wss://localhost:{port}/ws"),
            TransportKind::Ws,
            Encoding::Proto,
            SECRET
        )
        .is_err()
    );
    server.shutdown();
}
