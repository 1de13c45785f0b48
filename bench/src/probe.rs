//! The server process as the generator sees it: its memory, open files and CPU time read
//! from `/proc/<pid>`, and — when asked — a parley server spawned, pinned to a core and
//! killed again by the generator itself.

/// The `[limits]` options a spawned server gets set to 0 (off).
const LIMITS_OFF: [&str; 12] = [
    "PARLEY_LIMITS__MAX_CONNECTIONS",
    "PARLEY_LIMITS__MAX_CONNECTIONS_PER_IP",
    "PARLEY_LIMITS__CONNECTS_PER_IP_PER_SECOND",
    "PARLEY_LIMITS__CONNECTS_PER_IP_BURST",
    "PARLEY_LIMITS__TICKETS_PER_IP_PER_SECOND",
    "PARLEY_LIMITS__TICKETS_PER_IP_BURST",
    "PARLEY_LIMITS__MAX_SESSIONS_PER_USER",
    "PARLEY_LIMITS__MAX_ROOMS_PER_USER",
    "PARLEY_LIMITS__SENDS_PER_SECOND",
    "PARLEY_LIMITS__SENDS_BURST",
    "PARLEY_LIMITS__JOINS_PER_SECOND",
    "PARLEY_LIMITS__JOINS_BURST",
];

use std::{
    fs,
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::Serialize;

/// Reads a process's resource use from `/proc`.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pid: u32,
}

/// Resource use of a process at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    /// Resident set size, bytes (`VmRSS`).
    pub rss: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Threads.
    pub threads: u64,
}

impl Probe {
    pub fn new(pid: u32) -> anyhow::Result<Probe> {
        let p = Probe { pid };
        p.usage()
            .with_context(|| format!("reading /proc/{pid} (is the server running?)"))?;
        Ok(p)
    }

    /// This process.
    pub fn me() -> Probe {
        Probe {
            pid: std::process::id(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn usage(&self) -> anyhow::Result<Usage> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let fds = fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        Ok(Usage {
            rss: field("VmRSS:") * 1024,
            fds,
            threads: field("Threads:"),
        })
    }

    /// User + system CPU time used so far.
    pub fn cpu_time(&self) -> Duration {
        let Ok(stat) = fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return Duration::ZERO;
        };
        // Fields after "(comm)": state is 0, utime 11, stime 12.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return Duration::ZERO;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_nanos((ticks(11) + ticks(12)) * 1_000_000_000 / hz)
    }
}

/// CPU use of a process between two readings, as a percentage of one core.
pub struct CpuMeter {
    probe: Probe,
    last: (Duration, Instant),
}

impl CpuMeter {
    pub fn new(probe: Probe) -> Self {
        Self {
            last: (probe.cpu_time(), Instant::now()),
            probe,
        }
    }

    /// Percent of one core since the previous call (or since `new`).
    pub fn percent(&mut self) -> f64 {
        let now = (self.probe.cpu_time(), Instant::now());
        let used = now.0.saturating_sub(self.last.0).as_secs_f64();
        let wall = now.1.duration_since(self.last.1).as_secs_f64();
        self.last = now;
        if wall > 0.0 { 100.0 * used / wall } else { 0.0 }
    }
}

/// How to start a parley server for a run.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// The `parley` binary.
    pub binary: PathBuf,
    pub jwt_secret: String,
    /// Pin the server to these CPUs (empty: no pinning).
    pub cpus: Vec<usize>,
    /// Extra `KEY=VALUE` environment (e.g. `PARLEY_WS__READ_BUFFER_BYTES=512`).
    pub env: Vec<(String, String)>,
    /// Where the server's output goes (`None`: discarded).
    pub log: Option<PathBuf>,
}

/// A parley server started by the generator; killed when dropped.
///
/// It runs in a fresh working directory of its own (so its default SQLite file
/// `data/parley.db` starts empty and no `config/parley.toml` of the caller applies:
/// built-in defaults plus `PARLEY_*` variables); the directory is removed afterwards.
pub struct SpawnedServer {
    child: Child,
    addr: SocketAddr,
    workdir: PathBuf,
}

impl SpawnedServer {
    /// Starts the server on a free loopback port and waits until it accepts connections.
    pub fn spawn(opts: &SpawnOptions) -> anyhow::Result<SpawnedServer> {
        if !opts.binary.is_file() {
            bail!(
                "no parley binary at {} (build it: cargo build --release --bin parley)",
                opts.binary.display()
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let workdir =
            std::env::temp_dir().join(format!("parley-bench-server-{}-{port}", std::process::id()));
        fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
        let binary = fs::canonicalize(&opts.binary)?;
        let mut cmd = Command::new(&binary);
        cmd.current_dir(&workdir)
            .arg("serve")
            .env("PARLEY_SERVER__LISTEN", addr.to_string())
            .env("PARLEY_AUTH__JWT_SECRET", &opts.jwt_secret)
            // A load generator is one address that connects, joins and sends far faster
            // than people: lift the per-IP and per-user limits of the server it spawns.
            .envs(LIMITS_OFF.iter().map(|k| (*k, "0")))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        match &opts.log {
            Some(path) => {
                let f = fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?;
                cmd.stdout(f.try_clone()?).stderr(f);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let cpus = opts.cpus.clone();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // The server dies with the generator, even one killed without a chance
                // to drop this handle (a load script's timeout, SIGKILL).
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if cpus.is_empty() {
                    Ok(())
                } else {
                    pin_current(&cpus)
                }
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", opts.binary.display()))?;
        let mut server = SpawnedServer {
            child,
            addr,
            workdir,
        };
        server.wait_ready(Duration::from_secs(15))?;
        Ok(server)
    }

    fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the server exited during startup ({status}); see its log");
            }
            if std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the server did not listen on {} within {within:?}",
                    self.addr
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn probe(&self) -> Probe {
        Probe { pid: self.pid() }
    }

    /// Stops the server: SIGTERM (graceful), SIGKILL if it is still there after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
        let _ = fs::remove_dir_all(&self.workdir);
    }
}

/// Pins the calling thread to one CPU (a generator shard thread).
pub fn pin_thread(cpu: usize) -> std::io::Result<()> {
    pin_current(&[cpu])
}

/// Pins the calling thread (and what it execs) to these CPUs.
fn pin_current(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET/sched_setaffinity get valid pointers.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills a zeroed cpu_set_t of the size we pass.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// The parley binary next to this one (`target/release/parley` beside
/// `target/release/parley-bench`), if there is one.
pub fn sibling_parley() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let p = me.parent()?.join("parley");
    p.is_file().then_some(p)
}

/// A short description of the machine for reports: CPU model, cores, kernel.
pub fn machine() -> String {
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{model}, {cores} CPU(s) available to the generator, Linux {kernel}")
}

/// The 1, 5 and 15 minute load averages (other work on the machine skews results).
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
