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
    let mut child = Command::new(BIN)
        .args([
            "--config",
            "/nonexistent/parley.toml",
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("PARLEY_STORE__PATH", ":memory:")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut addr = None;
    let mut saw_dev_secret_warning = false;
    while addr.is_none() {
        let line = rx.recv_timeout(Duration::from_secs(10)).expect("log line");
        saw_dev_secret_warning |= line.contains("development secret");
        if let Some(rest) = line.split("addr=").nth(1) {
            addr = Some(rest.split_whitespace().next().unwrap().to_string());
        }
    }
    assert!(saw_dev_secret_warning, "warns about the built-in secret");
    let addr = addr.unwrap();
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
