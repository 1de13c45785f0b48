//! A cluster on this machine for the tests: a private `redis-server` on a free port in a
//! temp dir, a shared store, and N parley instances as separate processes (the real
//! binary). Everything started here is killed when the [`Cluster`] drops, also when a
//! test panics.
#![allow(dead_code)]

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use parley::{auth::Authenticator, config::Config};

use crate::common::{Client, http_get, pg::TestDb, test_config};

/// A TCP port free on 127.0.0.1 now, for a server a test starts: taken at random below
/// Linux's ephemeral range (32768–60999), so that the client sockets of tests running
/// beside cannot take it before the server binds it (they get ephemeral ports), and never
/// handed out twice by one test process (a port the kernel gives for `:0` and takes back
/// when released can come again).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = rand::random_range(20_000..32_000);
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    child: Option<Child>,
    /// When set, signals go to the descendant of `child` with this name instead: a
    /// container's main process under `buildah run`, which does not pass signals on.
    inner: Option<&'static str>,
    /// Run once the process is gone (e.g. removing its container).
    cleanup: Option<Box<dyn FnOnce() + Send>>,
}

impl Proc {
    pub fn new(child: Child) -> Proc {
        Proc {
            child: Some(child),
            inner: None,
            cleanup: None,
        }
    }

    /// A process whose signals go to its descendant named `inner`, with `cleanup` run
    /// after it is gone.
    pub fn container(
        child: Child,
        inner: &'static str,
        cleanup: impl FnOnce() + Send + 'static,
    ) -> Proc {
        Proc {
            child: Some(child),
            inner: Some(inner),
            cleanup: Some(Box::new(cleanup)),
        }
    }

    /// No process (a placeholder while one is stopped elsewhere).
    pub fn none() -> Proc {
        Proc {
            child: None,
            inner: None,
            cleanup: None,
        }
    }

    /// The pid that signals go to (waiting up to 10 s for a container's process).
    pub fn pid(&self) -> Option<u32> {
        let child = self.child.as_ref()?;
        let Some(name) = self.inner else {
            return Some(child.id());
        };
        for _ in 0..1000 {
            if let Some(pid) = descendant_named(child.id(), name) {
                return Some(pid);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Sends `signal` (`TERM`, `KILL`, …) to the process.
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &pid.to_string()])
                .status();
        }
    }

    /// Waits for the process to end; its exit status (a container's is the engine's,
    /// which passes its main process's on).
    pub fn wait(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.take().map(|mut c| c.wait().unwrap());
        if let Some(cleanup) = self.cleanup.take() {
            cleanup();
        }
        status
    }

    /// Asks the process to stop (SIGTERM: parley's graceful shutdown) and waits for it.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.signal("TERM");
        self.wait()
    }

    pub fn kill(&mut self) {
        if self.child.is_some() {
            if self.inner.is_some() {
                self.signal("KILL");
            }
            if let Some(c) = self.child.as_mut() {
                let _ = c.kill();
            }
        }
        self.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The first process below `root` in the process tree whose name is `name`.
fn descendant_named(root: u32, name: &str) -> Option<u32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid …"; comm may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let ppid = stat[close + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((pid, ppid, comm));
        }
    }
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (pid, ppid, comm) in &parent_of {
            if *ppid == p {
                if comm == name {
                    return Some(*pid);
                }
                frontier.push(*pid);
            }
        }
    }
    None
}

/// How the cluster starts instance `i` from its config file and listen address: the
/// `parley` binary by default; tests/image.rs starts containers of the image.
pub type Launcher = std::sync::Arc<dyn Fn(usize, &Path, SocketAddr) -> Proc + Send + Sync>;

pub struct Instance {
    pub addr: SocketAddr,
    pub proc: Proc,
    config_path: PathBuf,
}

pub struct Cluster {
    pub dir: PathBuf,
    pub redis_port: u16,
    pub redis: Proc,
    pub instances: Vec<Instance>,
    pub config: Config,
    /// The shared PostgreSQL database (dropped after the instances are killed).
    pub db: Option<TestDb>,
    pub launcher: Launcher,
}

fn redis_server_binary() -> &'static str {
    if Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        panic!(
            "redis-server is not on PATH: install the Debian package `redis-server` (scripts/test does)"
        );
    }
    "redis-server"
}

impl Cluster {
    /// Redis and `n` instances, all ready.
    pub async fn start(name: &str, n: usize) -> Cluster {
        Self::start_with(name, n, |_| {}).await
    }

    pub async fn start_with(name: &str, n: usize, edit: impl Fn(&mut Config)) -> Cluster {
        let launcher: Launcher = std::sync::Arc::new(|_, config: &Path, _| spawn_parley(config));
        Self::start_launched(name, n, edit, launcher).await
    }

    /// Redis, the shared store and `n` instances started by `launcher`, all ready.
    pub async fn start_launched(
        name: &str,
        n: usize,
        edit: impl Fn(&mut Config),
        launcher: Launcher,
    ) -> Cluster {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("cluster-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let redis_port = free_port();
        let mut config = test_config();
        // The shared log: a fresh PostgreSQL database when there is a test server
        // (scripts/test starts one); else one SQLite file that every instance opens
        // (a real shared log on one machine: seq is assigned inside each write
        // transaction, under SQLite's file lock).
        let db = if std::env::var_os("PARLEY_TEST_PG_URL").is_some() {
            let db = TestDb::create().await;
            db.apply(&mut config);
            Some(db)
        } else {
            eprintln!("cluster tests: PARLEY_TEST_PG_URL unset, instances share one SQLite file");
            config.store.path = dir.join("parley.db").to_string_lossy().into_owned();
            config.store.synchronous = parley::config::Synchronous::Normal;
            None
        };
        config.files.dir = dir.join("files").to_string_lossy().into_owned();
        config.broker.backend = parley::config::BrokerBackend::Redis;
        config.broker.redis_url = format!("redis://127.0.0.1:{redis_port}/");
        config.broker.presence_heartbeat = Duration::from_millis(250);
        config.broker.presence_ttl = Duration::from_secs(2);
        config.broker.gap_hold = Duration::from_millis(100);
        edit(&mut config);
        let mut cluster = Cluster {
            redis: Proc::none(),
            dir,
            redis_port,
            instances: Vec::new(),
            config,
            db,
            launcher,
        };
        cluster.start_redis().await;
        for _ in 0..n {
            cluster.add_instance().await;
        }
        cluster
    }

    pub async fn start_redis(&mut self) {
        let child = Command::new(redis_server_binary())
            .args([
                "--port",
                &self.redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &self.dir.to_string_lossy(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.redis = Proc::new(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.redis_port).parse().unwrap();
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("redis-server did not listen on {addr}");
    }

    pub fn stop_redis(&mut self) {
        self.redis.kill();
    }

    /// Starts one more instance (a separate `parley` process) and waits until ready.
    pub async fn add_instance(&mut self) -> usize {
        let i = self.instances.len();
        let port = free_port();
        let mut config = self.config.clone();
        config.server.listen = format!("127.0.0.1:{port}").parse().unwrap();
        let config_path = self.dir.join(format!("parley-{i}.toml"));
        std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        let mut instance = Instance {
            addr: config.server.listen,
            proc: Proc::none(),
            config_path,
        };
        instance.proc = (self.launcher)(i, &instance.config_path, instance.addr);
        self.instances.push(instance);
        self.wait_ready(i).await;
        i
    }

    /// Restarts a killed instance on the same address.
    pub async fn restart_instance(&mut self, i: usize) {
        self.instances[i].proc.kill();
        self.instances[i].proc =
            (self.launcher)(i, &self.instances[i].config_path, self.instances[i].addr);
        self.wait_ready(i).await;
    }

    pub async fn wait_ready(&self, i: usize) {
        let addr = self.instances[i].addr;
        for _ in 0..1000 {
            if tokio::net::TcpStream::connect(addr).await.is_ok()
                && http_get(addr, "/readyz").await.0 == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("instance {i} at {addr} did not become ready");
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        self.instances[i].addr
    }

    pub fn token(&self, user: &str) -> String {
        Authenticator::new(&self.config.auth)
            .unwrap()
            .mint(user, Duration::from_secs(3600))
            .unwrap()
    }

    /// A WebSocket client of `user` connected to instance `i`.
    pub async fn client(&self, i: usize, user: &str) -> Client {
        let mut c = Client::open(self.addr(i), Some(parley::codec::Encoding::Proto)).await;
        let connected = c.connect(&self.token(user)).await;
        assert_eq!(connected.user_id, user);
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in &mut self.instances {
            i.proc.kill();
        }
        self.redis.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The instances' logs show with `PARLEY_TEST_LOG=1`.
pub fn log() -> Stdio {
    if std::env::var_os("PARLEY_TEST_LOG").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

fn spawn_parley(config: &std::path::Path) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_parley"))
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env("RUST_LOG", "warn")
        .stdout(log())
        .stderr(log())
        .spawn()
        .expect("parley starts");
    Proc::new(child)
}
