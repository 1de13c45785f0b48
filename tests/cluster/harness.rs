//! A cluster on this machine for the tests: a private `redis-server` on a free port in a
//! temp dir, a shared store, and N parley instances as separate processes (the real
//! binary). Everything started here is killed when the [`Cluster`] drops, also when a
//! test panics.
#![allow(dead_code)]

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use parley::{auth::Authenticator, config::Config};

use crate::common::{Client, http_get, pg::TestDb, test_config};

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc(Option<Child>);

impl Proc {
    /// No process (a placeholder while one is stopped elsewhere).
    pub fn none() -> Proc {
        Proc(None)
    }

    /// Asks the process to stop (SIGTERM: parley's graceful shutdown) and waits for it.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

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
            redis: Proc(None),
            dir,
            redis_port,
            instances: Vec::new(),
            config,
            db,
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
        self.redis = Proc(Some(child));
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
            proc: Proc(None),
            config_path,
        };
        instance.proc = spawn_parley(&instance.config_path);
        self.instances.push(instance);
        self.wait_ready(i).await;
        i
    }

    /// Restarts a killed instance on the same address.
    pub async fn restart_instance(&mut self, i: usize) {
        self.instances[i].proc.kill();
        self.instances[i].proc = spawn_parley(&self.instances[i].config_path);
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
fn log() -> Stdio {
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
    Proc(Some(child))
}
