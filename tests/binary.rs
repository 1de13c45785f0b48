//! The `parley` binary itself: serve on embedded defaults, health check, token minting,
//! and a clean exit on SIGTERM.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

const BIN: &str = env!("CARGO_BIN_EXE_parley");

#[test]
fn serves_checks_health_and_stops_on_sigterm() {
    let (mut child, addr, logged) = serve_until_listening(
        &[
            "--config",
            "/nonexistent/parley.toml",
            "serve",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert!(
        logged.iter().any(|l| l.contains("development secret")),
        "warns about the built-in secret"
    );
    let ok = Command::new(BIN).args(["health", &addr]).status().unwrap();
    assert!(ok.success());

    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "clean exit: {status}");
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("did not stop within 10s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let down = Command::new(BIN).args(["health", &addr]).output().unwrap();
    assert!(!down.status.success(), "health fails once stopped");
}

/// With `[tls]` the server speaks only TLS: `parley health`, given the same
/// configuration, probes over TLS (the container's HEALTHCHECK then works with TLS on);
/// a plain-HTTP probe of the same port fails.
#[test]
fn health_speaks_tls_when_tls_is_configured() {
    let key = rcgen::generate_simple_self_signed(vec!["parley.example".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!("parley-health-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, pem) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, key.cert.pem()).unwrap();
    std::fs::write(&pem, key.signing_key.serialize_pem()).unwrap();
    let tls = [
        ("PARLEY_TLS__CERT_FILE", cert.to_str().unwrap()),
        ("PARLEY_TLS__KEY_FILE", pem.to_str().unwrap()),
    ];
    let args = ["--config", "/nonexistent/parley.toml"];
    let (mut child, addr, _) = serve_until_listening(
        &[args[0], args[1], "serve", "--listen", "127.0.0.1:0"],
        &tls,
    );
    let over_tls = Command::new(BIN)
        .args([args[0], args[1], "health", &addr])
        .envs(tls)
        .output()
        .unwrap();
    let plain = Command::new(BIN)
        .args([args[0], args[1], "health", &addr])
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        over_tls.status.success(),
        "{}",
        String::from_utf8_lossy(&over_tls.stderr)
    );
    assert!(!plain.status.success(), "a plain probe of a TLS port fails");
}

#[test]
fn token_mints_a_verifiable_token() {
    let out = Command::new(BIN)
        .args([
            "--config",
            "/nonexistent/parley.toml",
            "token",
            "alice",
            "--ttl",
            "2h",
        ])
        .env("PARLEY_AUTH__JWT_SECRET", "s3cret")
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    let mut config = parley::config::AuthConfig {
        jwt_secret: "s3cret".into(),
        ..Default::default()
    };
    let auth = parley::auth::Authenticator::new(&config).unwrap();
    assert_eq!(auth.verify(token.trim()).unwrap(), "alice");
    config.jwt_secret = "other".into();
    let other = parley::auth::Authenticator::new(&config).unwrap();
    assert!(other.verify(token.trim()).is_err());
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for the child to exit after SIGTERM; returns its status.
fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("did not stop within 15s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The JSON array of a Dockerfile exec-form instruction (`CMD ["a", "b"]`).
fn exec_form(line: &str) -> Vec<String> {
    let start = line.find('[').expect("exec form");
    serde_json::from_str(&line[start..]).unwrap()
}

#[test]
fn the_container_image_starts_with_its_own_env_and_passes_its_healthcheck() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dockerfile = std::fs::read_to_string(format!("{root}/Dockerfile")).unwrap();
    // The runtime stage only (after the last FROM), with continuation lines joined.
    let runtime = dockerfile
        .rsplit("\nFROM ")
        .next()
        .unwrap()
        .replace("\\\n", " ");
    let (mut env, mut entrypoint, mut cmd, mut health, mut copies, mut workdir) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        String::new(),
    );
    for line in runtime.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("ENV ") {
            for pair in rest.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("ENV key=value");
                env.push((k.to_string(), v.to_string()));
            }
        } else if line.starts_with("ENTRYPOINT ") {
            entrypoint = exec_form(line);
        } else if line.starts_with("CMD ") {
            cmd = exec_form(line);
        } else if line.starts_with("HEALTHCHECK ") {
            health = exec_form(line.split(" CMD ").nth(1).unwrap());
        } else if let Some(rest) = line.strip_prefix("COPY ")
            && !rest.starts_with("--from")
        {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            copies.push((parts[1].to_string(), format!("{root}/{}", parts[0])));
        } else if let Some(rest) = line.strip_prefix("WORKDIR ") {
            workdir = rest.to_string();
        }
    }
    assert!(!env.is_empty() && !cmd.is_empty() && !health.is_empty());
    assert_eq!(entrypoint, ["parley"]);
    assert_eq!(health[0], "parley");
    assert!(
        env.iter().any(|(k, _)| k == "PARLEY_CONFIG"),
        "the image sets PARLEY_CONFIG"
    );

    // Paths of the image mapped to this machine: files the image COPYs come from the
    // repo; its working directory (the data volume) is a temp dir. The port is a free
    // one. Nothing else changes.
    let data = std::env::temp_dir().join(format!("parley-image-{}", std::process::id()));
    std::fs::create_dir_all(&data).unwrap();
    let port = free_port();
    let map = |v: &str| {
        let mut v = v.to_string();
        for (dest, src) in &copies {
            v = v.replace(dest.as_str(), src);
        }
        v.replace(&workdir, data.to_str().unwrap())
            .replace(":8080", &format!(":{port}"))
    };
    let image_command = || {
        let mut command = Command::new(BIN);
        command
            .args(entrypoint[1..].iter().chain(&cmd))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .current_dir(&data)
            // What Kubernetes injects for a Service named "parley", and what wrapper
            // scripts set: none of it is configuration.
            .env("PARLEY_PORT", "tcp://10.0.0.1:8080")
            .env("PARLEY_PORT_8080_TCP_ADDR", "10.0.0.1")
            .env("PARLEY_SERVICE_HOST", "10.0.0.1")
            .env("PARLEY_SERVICE_PORT", "8080")
            .env("PARLEY_BIN", "/usr/local/bin/parley")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &env {
            command.env(k, map(v));
        }
        command
    };
    // Without a secret the image listens on every interface with the public development
    // secret: it refuses to start, with one line saying what to set.
    let refused = image_command().output().unwrap();
    assert!(!refused.status.success(), "started with the dev secret");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("refusing") && err.contains("PARLEY_AUTH__JWT_SECRET"),
        "{err}"
    );
    // With one, as every deployment sets it, it serves.
    let mut child = image_command()
        .env("PARLEY_AUTH__JWT_SECRET", "a-real-secret")
        .spawn()
        .unwrap();
    let health_args: Vec<String> = health[1..].iter().map(|a| map(a)).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the image's command exited: {status}\n{err}");
        }
        // The health check runs with the image's environment too.
        let mut check = Command::new(BIN);
        check
            .args(&health_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in &env {
            check.env(k, map(v));
        }
        let ok = check.status().unwrap();
        if ok.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "HEALTHCHECK never passed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = terminate(&mut child);
    assert!(status.success(), "clean exit: {status}");
    // The image's settings took effect: JSON logs, the database in the data volume.
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    let first = out.lines().next().expect("a log line");
    assert!(
        serde_json::from_str::<serde_json::Value>(first).is_ok(),
        "JSON logs: {first}"
    );
    assert!(data.join("parley.db").exists(), "store in the volume");
    std::fs::remove_dir_all(&data).unwrap();
}

/// Runs `parley serve` (no config file, an ephemeral port) with extra environment until
/// it exits; only for settings that stop it.
fn serve_with_env(env: &[(&str, &str)]) -> std::process::Output {
    Command::new(BIN)
        .args(["--config", "/nonexistent/parley.toml", "serve"])
        .args(["--listen", "127.0.0.1:0"])
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn a_bad_setting_stops_the_server_with_one_line_naming_it() {
    for (var, value, key) in [
        (
            "PARLEY_WS__HEARTBEAT_INTERVAL",
            "0s",
            "ws.heartbeat_interval",
        ),
        (
            "PARLEY_SESSION__MAX_QUEUE_BYTES",
            "12",
            "session.max_queue_bytes",
        ),
        ("PARLEY_POLL__DEFAULT_HOLD", "2m", "poll.default_hold"),
    ] {
        let out = serve_with_env(&[
            (var, value),
            ("PARLEY_STORE__PATH", ":memory:"),
            ("RUST_BACKTRACE", "1"),
        ]);
        assert!(!out.status.success(), "{var}={value} must not start");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {err}");
        assert!(lines[0].contains(key), "names the key: {err}");
        assert!(lines[0].contains("out of range"), "{err}");
        assert!(
            !err.contains("panicked") && !err.contains("backtrace"),
            "{err}"
        );
    }
    // An unknown option of the PARLEY_SECTION__KEY form is warned about, and the
    // server still starts (it is stopped here by the bad value next to it).
    let out = serve_with_env(&[
        ("PARLEY_WS__HEARTBEET", "5s"),
        ("PARLEY_WS__HEARTBEAT_INTERVAL", "0s"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: ignoring PARLEY_WS__HEARTBEET"),
        "{err}"
    );
}

/// Starts `parley serve` with the given arguments and environment, waits for its listen
/// address in the log, and returns the child and that address.
/// Starts `parley` with `args` and `env`; returns it once it logs its listen address, with
/// that address and every log line up to it.
fn serve_until_listening(
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::Child, String, Vec<String>) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("PARLEY_STORE__PATH", ":memory:")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut logged = Vec::new();
    loop {
        let line = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "no listen address; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        };
        if let Some(rest) = line.split("addr=").nth(1) {
            let addr = rest.split_whitespace().next().unwrap().to_string();
            logged.push(line);
            return (child, addr, logged);
        }
        logged.push(line);
    }
}

#[test]
fn the_public_dev_secret_is_refused_off_loopback_unless_dev_mode_is_asked_for() {
    // Every address other machines may reach, with the built-in secret: refused at once,
    // with one line saying what to do.
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let out = Command::new(BIN)
            .args(["--config", "/nonexistent/parley.toml", "serve"])
            .args(["--listen", listen])
            .env("PARLEY_STORE__PATH", ":memory:")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{listen}: started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        for hint in ["PARLEY_AUTH__JWT_SECRET", "parley init", "--dev"] {
            assert!(err.contains(hint), "{listen}: names {hint}: {err}");
        }
    }
    // An extra key with the dev secret is the same hole.
    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/parley.toml", "serve"])
        .args(["--listen", "0.0.0.0:0"])
        .env("PARLEY_STORE__PATH", ":memory:")
        .env("PARLEY_AUTH__JWT_SECRET", "real")
        .env(
            "PARLEY_AUTH__EXTRA_KEYS",
            "[{kid=\"old\",secret=\"parley-dev-secret-change-me\"}]",
        )
        .output()
        .unwrap();
    assert!(!out.status.success(), "extra dev key accepted");

    // Loopback keeps the one-command start; --dev opts in explicitly elsewhere.
    for (args, env) in [
        (
            &[
                "--config",
                "/nonexistent/parley.toml",
                "serve",
                "--listen",
                "127.0.0.1:0",
            ][..],
            &[][..],
        ),
        (
            &[
                "--config",
                "/nonexistent/parley.toml",
                "serve",
                "--dev",
                "--listen",
                "0.0.0.0:0",
            ][..],
            &[][..],
        ),
        (
            &[
                "--config",
                "/nonexistent/parley.toml",
                "serve",
                "--listen",
                "0.0.0.0:0",
            ][..],
            &[("PARLEY_AUTH__JWT_SECRET", "a-real-secret")][..],
        ),
    ] {
        let (mut child, addr, _) = serve_until_listening(args, env);
        let port = addr.rsplit(':').next().unwrap();
        let ok = Command::new(BIN)
            .args(["health", &format!("127.0.0.1:{port}")])
            .status()
            .unwrap();
        assert!(ok.success(), "{args:?}");
        assert!(terminate(&mut child).success());
    }
}

#[test]
fn init_writes_fresh_private_secrets_that_the_server_starts_with() {
    let dir = std::env::temp_dir().join(format!("parley-init-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("parley.toml");
    let init = |extra: &[&str]| {
        Command::new(BIN)
            .arg("init")
            .args(["--output", file.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    assert!(init(&[]).status.success());
    let first = std::fs::read_to_string(&file).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
    }
    // Never overwritten by accident.
    let again = init(&[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), first);
    assert!(init(&["--force"]).status.success());
    let second = std::fs::read_to_string(&file).unwrap();
    let config: toml::Value = toml::from_str(&second).unwrap();
    let secret = |section: &str, key: &str| config[section][key].as_str().unwrap().to_string();
    let (jwt, admin, url) = (
        secret("auth", "jwt_secret"),
        secret("auth", "admin_token"),
        secret("files", "url_secret"),
    );
    for s in [&jwt, &admin, &url] {
        assert_eq!(s.len(), 64, "32 random bytes in hex");
        assert!(!first.contains(s.as_str()), "fresh each time");
    }
    assert!(jwt != admin && admin != url);

    // The server takes it as it is, on every interface.
    let (mut child, addr, _) = serve_until_listening(
        &[
            "--config",
            file.to_str().unwrap(),
            "serve",
            "--listen",
            "0.0.0.0:0",
        ],
        &[],
    );
    // `health` with no address probes the configured port on loopback.
    let port = addr.rsplit(':').next().unwrap();
    let ok = Command::new(BIN)
        .args(["--config", file.to_str().unwrap(), "health"])
        .env("PARLEY_SERVER__LISTEN", format!("0.0.0.0:{port}"))
        .status()
        .unwrap();
    assert!(ok.success());
    // Tokens minted with the file's secret are the ones it accepts.
    let out = Command::new(BIN)
        .args(["--config", file.to_str().unwrap(), "token", "alice"])
        .output()
        .unwrap();
    let token = String::from_utf8(out.stdout).unwrap();
    let auth = parley::auth::Authenticator::new(&parley::config::AuthConfig {
        jwt_secret: jwt.clone(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(auth.verify(token.trim()).unwrap(), "alice");
    assert!(terminate(&mut child).success());

    // --env: the same three secrets as PARLEY_SECTION__KEY lines, on standard output.
    let out = Command::new(BIN).args(["init", "--env"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let keys: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split('=').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "PARLEY_AUTH__JWT_SECRET",
            "PARLEY_AUTH__ADMIN_TOKEN",
            "PARLEY_FILES__URL_SECRET"
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
