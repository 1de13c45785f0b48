//! The container image itself, built from the Dockerfile by a real engine
//! (`scripts/image`) and run by it (`buildah from` + `buildah run`): the image's own
//! ENTRYPOINT, CMD, ENV, USER and HEALTHCHECK, a read-only root filesystem with only the
//! data volume writable, chat over WebSocket and long-poll, the SIGTERM drain, data that
//! survives a restart, and the three-instance topology of docker-compose.yml.
//!
//! These tests need a built image: they are `#[ignore]`d in a plain `cargo test`, and
//! scripts/test runs them (`--ignored`) after `scripts/image` with `PARLEY_TEST_IMAGE`
//! naming the image. Containers run on the host network (the one thing a test changes
//! is the port, `PARLEY_SERVER__LISTEN=127.0.0.1:<free port>`, so instances can share a
//! machine); everything started here is stopped and removed, also when a test fails.

mod common;
#[path = "cluster/harness.rs"]
mod harness;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use common::{Client, WAIT, http_get, open_http_session, session_command};
use harness::{Cluster, Launcher, Proc, free_port};
use parley::{
    auth::Authenticator,
    codec::Encoding,
    config::AuthConfig,
    proto::{self, client_frame::Cmd, server_frame::Kind},
};
use serde_json::json;

const SECRET: &str = "image-test-secret-not-the-dev-one";

fn image() -> String {
    std::env::var("PARLEY_TEST_IMAGE")
        .expect("PARLEY_TEST_IMAGE names the image to test (scripts/test builds parley:dev)")
}

/// buildah on the storage scripts/image built into.
fn buildah() -> Command {
    let mut c = Command::new("buildah");
    let storage = std::env::var("PARLEY_STORAGE_DRIVER").unwrap_or_else(|_| "vfs".into());
    c.args(["--storage-driver", &storage]);
    c
}

fn output(c: &mut Command) -> String {
    let out = c.output().expect("buildah runs");
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// What the image says about how to run it.
#[derive(Debug)]
struct ImageConfig {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
    user: String,
    healthcheck: Vec<String>,
    volumes: Vec<String>,
}

fn inspect(image: &str) -> ImageConfig {
    let text = output(buildah().args(["inspect", "--type", "image", image]));
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    // The Docker-format config (HEALTHCHECK lives only there).
    let v = &all["Docker"]["config"];
    let list = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    ImageConfig {
        entrypoint: list(&v["Entrypoint"]),
        cmd: list(&v["Cmd"]),
        env: list(&v["Env"]),
        user: v["User"].as_str().unwrap_or_default().to_string(),
        healthcheck: list(&v["Healthcheck"]["Test"]),
        volumes: v["Volumes"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default(),
    }
}

/// A container of the image (`buildah from`), removed when dropped.
struct Container {
    name: String,
    rootfs: PathBuf,
}

impl Container {
    fn new(image: &str) -> Container {
        let name = output(buildah().args(["from", "--pull-never", image]));
        // buildah 1.28 mounts an anonymous volume for the image's VOLUME as well as the
        // bind mount given for the same path, in random order: drop the anonymous one
        // (from this container's config only; the image's VOLUME is checked by inspect).
        output(buildah().args(["config", "--volume", "/var/lib/parley-", &name]));
        let rootfs = PathBuf::from(output(buildah().args(["mount", &name])));
        Container { name, rootfs }
    }

    /// `buildah run` of `args` in the container as the image configures it (its ENV,
    /// USER, WORKDIR), plus `env`, on the host network, with `data` as the data volume
    /// and the rest of the root filesystem read-only: see [`read_only_dirs`].
    fn run(&self, args: &[String], env: &[(&str, String)], data: &Path) -> Command {
        self.run_with(args, env, data, &[])
    }

    /// [`Container::run`] with more read-only files mounted (`(host path, container path)`).
    fn run_with(
        &self,
        args: &[String],
        env: &[(&str, String)],
        data: &Path,
        files: &[(&Path, &str)],
    ) -> Command {
        let mut c = buildah();
        c.args(["run", "--isolation", "chroot", "--network", "host"]);
        for dir in read_only_dirs(&self.rootfs) {
            c.arg("--volume").arg(format!(
                "{}:/{}:ro",
                self.rootfs.join(&dir).to_string_lossy(),
                dir
            ));
        }
        c.arg("--volume")
            .arg(format!("{}:/var/lib/parley:rw", data.to_string_lossy()));
        for (host, path) in files {
            c.arg("--volume")
                .arg(format!("{}:{path}:ro", host.to_string_lossy()));
        }
        for (k, v) in env {
            c.args(["--env", &format!("{k}={v}")]);
        }
        c.arg(&self.name).arg("--").args(args);
        c
    }

    /// The image's ENTRYPOINT + CMD, started in the background.
    fn start(&self, config: &ImageConfig, env: &[(&str, String)], data: &Path) -> Proc {
        let child = self
            .run(&entrypoint_and_cmd(config), env, data)
            .stdout(harness::log())
            .stderr(harness::log())
            .spawn()
            .unwrap();
        Proc::container(child, "parley", || {})
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = buildah()
            .args(["rm", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The directories mounted read-only over themselves: every top-level directory of the
/// root filesystem but /proc, /sys, /dev (the engine's) and /run (where the engine
/// writes `.containerenv`; docker's `--read-only` leaves it a tmpfs). The data volume is
/// mounted on top, writable. [`listing`] shows that nothing was written to /run or /.
fn read_only_dirs(rootfs: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(rootfs).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type().unwrap().is_dir();
        if is_dir && !["proc", "sys", "dev", "run"].contains(&name.as_str()) {
            out.push(name);
        }
    }
    out
}

/// The entries of / and /run (the places no read-only mount covers) in a root
/// filesystem: directories by name (the engine itself touches /run's modification time),
/// other files with their size and modification time.
fn listing(rootfs: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for dir in ["run", ""] {
        for entry in std::fs::read_dir(rootfs.join(dir)).unwrap().flatten() {
            // DirEntry::metadata does not follow links.
            let meta = entry.metadata().unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            out.push(if meta.is_dir() {
                format!("{dir}/{name}/")
            } else {
                format!(
                    "{dir}/{name} {} {}",
                    meta.len(),
                    std::os::unix::fs::MetadataExt::mtime(&meta)
                )
            });
        }
    }
    out.sort();
    out
}

fn entrypoint_and_cmd(config: &ImageConfig) -> Vec<String> {
    config
        .entrypoint
        .iter()
        .chain(&config.cmd)
        .cloned()
        .collect()
}

/// A fresh data volume, owned by the image's user as a named volume would be.
fn data_volume(dir: &Path, user: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let uid: u32 = user.split(':').next().unwrap().parse().unwrap();
    std::os::unix::fs::chown(dir, Some(uid), Some(uid)).unwrap();
    dir.to_path_buf()
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("image-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn token(user: &str) -> String {
    Authenticator::new(&AuthConfig {
        jwt_secret: SECRET.into(),
        ..Default::default()
    })
    .unwrap()
    .mint(user, Duration::from_secs(3600))
    .unwrap()
}

async fn ws_client(addr: SocketAddr, user: &str) -> Client {
    let mut c = Client::open(addr, Some(Encoding::Proto)).await;
    assert_eq!(c.connect(&token(user)).await.user_id, user);
    c
}

/// Runs the image's HEALTHCHECK command in the container until it passes (30 s).
fn wait_healthy(container: &Container, config: &ImageConfig, env: &[(&str, String)], data: &Path) {
    assert_eq!(config.healthcheck[0], "CMD", "exec-form HEALTHCHECK");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = container
            .run(&config.healthcheck[1..], env, data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if ok.success() {
            return;
        }
        assert!(Instant::now() < deadline, "HEALTHCHECK never passed");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The seqs of `room` that a `sync` after `after` returns.
async fn synced_seqs(c: &mut Client, room: &str, after: u64) -> Vec<u64> {
    match c
        .request(Cmd::Sync(proto::Sync {
            rooms: [(room.to_string(), after)].into(),
            limit: 0,
        }))
        .await
    {
        Kind::Sync(s) => s.rooms[0].messages.iter().map(|m| m.seq).collect(),
        other => panic!("expected sync, got {other:?}"),
    }
}

async fn bodies(c: &mut Client, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(c.next_message().await.body);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a built image: scripts/test runs it with PARLEY_TEST_IMAGE"]
async fn the_image_runs_as_built_drains_on_sigterm_and_keeps_its_data() {
    let image = image();
    let config = inspect(&image);
    // What the image declares: an unprivileged user, the binary as entrypoint, a health
    // check that needs no curl, the data volume.
    assert_eq!(config.user, "10001:10001", "{config:?}");
    assert_eq!(config.entrypoint, ["parley"]);
    assert_eq!(config.cmd, ["serve"]);
    assert_eq!(config.healthcheck, ["CMD", "parley", "health"]);
    assert_eq!(config.volumes, ["/var/lib/parley"]);
    assert!(
        config
            .env
            .contains(&"PARLEY_SERVER__LISTEN=0.0.0.0:8080".to_string())
    );

    let first = Container::new(&image);
    // Small: a stripped binary on Debian slim.
    let binary = std::fs::read(first.rootfs.join("usr/local/bin/parley")).unwrap();
    assert!(
        !binary.windows(7).any(|w| w == b".symtab"),
        "the binary is stripped"
    );
    let size = dir_size(&first.rootfs);
    eprintln!(
        "image root filesystem: {:.1} MB, binary {:.1} MB",
        size as f64 / 1e6,
        binary.len() as f64 / 1e6
    );
    assert!(binary.len() < 40_000_000, "binary {} bytes", binary.len());
    assert!(size < 150_000_000, "image {size} bytes");
    // The MPL-2.0 crate's source ships with the binary.
    assert!(
        first
            .rootfs
            .join("usr/share/doc/parley/yawc-source/LICENSE")
            .exists()
    );
    // So do the licence and notice files of every crate compiled in (scripts/notices),
    // those of the C libraries that crates build among them.
    let third_party = first.rootfs.join("usr/share/doc/parley/third-party");
    let index = std::fs::read_to_string(third_party.join("INDEX")).unwrap();
    assert!(index.lines().count() > 100, "{index}");
    for (krate, file) in [
        ("tikv-jemalloc-sys-", "jemalloc/COPYING"),
        ("aws-lc-sys-", "aws-lc/LICENSE"),
        ("h2-", "LICENSE"),
    ] {
        let dir = std::fs::read_dir(&third_party)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(krate))
            .unwrap_or_else(|| panic!("no {krate}* in {}", third_party.display()));
        assert!(dir.join(file).exists(), "{}/{file}", dir.display());
    }

    let dir = scratch("single");
    let data = data_volume(&dir.join("data"), &config.user);

    // As shipped, without a secret: it listens on every interface with the public dev
    // secret, so it refuses to start, in one line that says what to set.
    let refused = first
        .run(&entrypoint_and_cmd(&config), &[], &data)
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "the image started with the dev secret"
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("refusing") && err.contains("PARLEY_AUTH__JWT_SECRET"),
        "{err}"
    );

    // With a secret, as every deployment runs it.
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let env = [
        ("PARLEY_AUTH__JWT_SECRET", SECRET.to_string()),
        ("PARLEY_SERVER__LISTEN", addr.to_string()),
    ];
    let before = listing(&first.rootfs);
    let mut proc = first.start(&config, &env, &data);
    wait_healthy(&first, &config, &env, &data);
    assert_eq!(http_get(addr, "/readyz").await.0, 200);
    assert!(
        data.join("parley.db").exists(),
        "the store is in the volume"
    );

    // Chat over WebSocket.
    let mut ann = ws_client(addr, "ann").await;
    let mut bob = ws_client(addr, "bob").await;
    ann.join("r").await;
    bob.join("r").await;
    for k in 0..3 {
        ann.send_msg("r", &format!("a{k}"), &format!("ws {k}"))
            .await;
    }
    assert_eq!(bodies(&mut bob, 3).await, ["ws 0", "ws 1", "ws 2"]);

    // And over long-poll: carol joins, sends, and polls what ann sends.
    let carol = format!("Bearer {}", token("carol"));
    let session = open_http_session(addr, &carol).await;
    let (status, v) = session_command(
        addr,
        &carol,
        &session,
        &json!({"id":"1","join":{"room":"r"}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = session_command(
        addr,
        &carol,
        &session,
        &json!({"id":"2","send":{"room":"r","clientMsgId":"c0","body":"from poll"}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(bodies(&mut bob, 1).await, ["from poll"]);
    ann.send_msg("r", "a3", "to poll").await;
    let mut polled = Vec::new();
    let mut cursor = 0;
    let deadline = Instant::now() + WAIT;
    while !polled.contains(&"to poll".to_string()) {
        assert!(Instant::now() < deadline, "poll never got it: {polled:?}");
        let r = common::http(
            addr,
            "GET",
            &format!("/poll?session_id={session}&cursor={cursor}&wait=2"),
            &[("authorization", &carol)],
            "",
        )
        .await;
        assert_eq!(r.status, 200);
        let frames: Vec<proto::ServerFrame> = serde_json::from_slice(&r.body).unwrap();
        for f in frames {
            cursor = f.pos;
            if let Some(Kind::Message(m)) = f.kind {
                polled.push(m.body);
            }
        }
    }
    assert_eq!(bodies(&mut bob, 1).await, ["to poll"]);

    // SIGTERM, as `docker stop` sends it: /readyz turns 503 while it still serves, then
    // clients are told to reconnect, and it exits 0 within its drain time.
    let stopped_at = Instant::now();
    proc.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    while http_get(addr, "/readyz").await.0 != 503 {
        assert!(Instant::now() < deadline, "readyz never answered 503");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let d = tokio::time::timeout(
        Duration::from_secs(15),
        bob.next_of(|k| match k {
            Kind::Disconnect(d) => Some(d),
            _ => None,
        }),
    )
    .await
    .expect("a disconnect frame");
    assert!(d.reconnect, "{d:?}");
    let status = tokio::task::spawn_blocking(move || proc.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
    // server.drain_delay (2 s) + server.shutdown_timeout (10 s), with room to spare.
    assert!(stopped_at.elapsed() < Duration::from_secs(15));
    // Nothing was written outside the volume, also where no read-only mount stopped it.
    assert_eq!(listing(&first.rootfs), before);
    drop((ann, bob, first));

    // A new container on the same volume has every acked message.
    let second = Container::new(&image);
    let mut proc = second.start(&config, &env, &data);
    wait_healthy(&second, &config, &env, &data);
    let mut bob = ws_client(addr, "bob").await;
    assert_eq!(synced_seqs(&mut bob, "r", 0).await, [1, 2, 3, 4, 5]);
    let status = tokio::task::spawn_blocking(move || proc.terminate())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
    // Only the volume was written to: the database is there, owned by the image's user.
    let db = std::fs::metadata(data.join("parley.db")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&db), 10001);
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            total += dir_size(&entry.path());
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a built image: scripts/test runs it with PARLEY_TEST_IMAGE"]
async fn three_containers_share_redis_and_postgres_and_a_killed_one_loses_nothing() {
    assert!(
        std::env::var_os("PARLEY_TEST_PG_URL").is_some(),
        "the compose topology needs PostgreSQL: PARLEY_TEST_PG_URL (scripts/test starts one)"
    );
    let image = image();
    let config = Arc::new(inspect(&image));
    let dir = scratch("cluster");
    // docker-compose.yml's topology: three parley containers on one PostgreSQL and one
    // Redis (here processes on this machine), each container with its own data volume
    // and the cluster's settings in a config file mounted over the image's.
    let launcher: Launcher = {
        let (image, config, dir) = (image.clone(), config.clone(), dir.clone());
        Arc::new(move |i: usize, file: &Path, addr: SocketAddr| {
            let container = Container::new(&image);
            let data = data_volume(&dir.join(format!("data-{i}-{}", free_port())), &config.user);
            // The config file goes in read-only, as a ConfigMap would.
            let child = container
                .run_with(
                    &entrypoint_and_cmd(&config),
                    &[("PARLEY_SERVER__LISTEN", addr.to_string())],
                    &data,
                    &[(file, "/etc/parley/parley.toml")],
                )
                .stdout(harness::log())
                .stderr(harness::log())
                .spawn()
                .unwrap();
            // The container is removed once its process is gone.
            Proc::container(child, "parley", move || drop(container))
        })
    };
    let mut cluster =
        Cluster::start_launched("image", 3, |c| c.auth.jwt_secret = SECRET.into(), launcher).await;

    // A message crosses instances.
    let mut ann = ws_client(cluster.addr(0), "ann").await;
    let mut bob = ws_client(cluster.addr(1), "bob").await;
    ann.join("r").await;
    bob.join("r").await;
    for k in 0..5 {
        ann.send_msg("r", &format!("a{k}"), &format!("m{k}")).await;
    }
    assert_eq!(bodies(&mut bob, 5).await, ["m0", "m1", "m2", "m3", "m4"]);

    // bob's container is killed (SIGKILL); ann goes on, every send acked.
    cluster.instances[1].proc.kill();
    drop(bob);
    for k in 5..10 {
        ann.send_msg("r", &format!("a{k}"), &format!("m{k}")).await;
    }
    // bob continues on the third container: his session died with its container, so he
    // log-syncs and gets exactly what he missed; live delivery goes on there.
    let mut bob = ws_client(cluster.addr(2), "bob").await;
    assert_eq!(synced_seqs(&mut bob, "r", 5).await, [6, 7, 8, 9, 10]);
    ann.send_msg("r", "a10", "m10").await;
    assert_eq!(bodies(&mut bob, 1).await, ["m10"]);
    bob.nothing_pushed(Duration::from_millis(300)).await;
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
