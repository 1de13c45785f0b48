//! Durability with the real binary and the SQLite store (or PostgreSQL, with
//! `PARLEY_TEST_STORE=postgres`): every acknowledged message survives a graceful restart
//! and a `kill -9`, once, in order, and seqs never repeat.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::*;
use parley::{
    codec::Encoding,
    proto::{self, client_frame::Cmd, server_frame::Kind},
};

const SECRET: &str = "durability-secret";

/// A parley process; killed when dropped so a failing test leaves nothing running.
struct Proc {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on the SQLite file `db`, or on the PostgreSQL database `pg`.
fn start(db: &Path, pg: Option<&pg::TestDb>) -> Proc {
    let mut command = Command::new(env!("CARGO_BIN_EXE_parley"));
    for (k, v) in pg.iter().flat_map(|p| p.env()) {
        command.env(k, v);
    }
    let mut child = command
        .args([
            "--config",
            "/nonexistent.toml",
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("PARLEY_STORE__PATH", db)
        .env("PARLEY_AUTH__JWT_SECRET", SECRET)
        // Hundreds of acked sends as fast as the store takes them: no send limit.
        .env("PARLEY_LIMITS__SENDS_PER_SECOND", "0")
        .env("PARLEY_LIMITS__SENDS_BURST", "0")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("server logs its address").unwrap();
        if let Some(rest) = line.split("addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Proc { child, addr }
}

fn token(user: &str) -> String {
    let config = parley::config::AuthConfig {
        jwt_secret: SECRET.into(),
        ..Default::default()
    };
    parley::auth::Authenticator::new(&config)
        .unwrap()
        .mint(user, Duration::from_secs(600))
        .unwrap()
}

async fn client(p: &Proc, user: &str) -> Client {
    let mut c = Client::open(p.addr, Some(Encoding::Proto)).await;
    c.connect(&token(user)).await;
    c
}

async fn all_messages(c: &mut Client, room: &str) -> Vec<proto::Message> {
    let mut out = Vec::new();
    loop {
        let after = out.last().map_or(0, |m: &proto::Message| m.seq);
        let sync = Cmd::Sync(proto::Sync {
            rooms: [(room.to_string(), after)].into(),
            limit: 500,
        });
        let Kind::Sync(s) = c.request(sync).await else {
            panic!("sync failed")
        };
        let page = s.rooms.into_iter().next().unwrap();
        out.extend(page.messages);
        if !page.more {
            return out;
        }
    }
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("parley-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn acked_messages_survive_restart_and_kill_9() {
    let dir = tempdir("durability");
    let db = dir.join("data").join("parley.db");
    let pg = pg::selected().then(pg::TestDb::create_blocking);
    let pg = pg.as_ref();
    let mut acked = Vec::new();

    // 1. Concurrent senders; kill -9 right after the last ack.
    let server = start(&db, pg);
    let mut tasks = Vec::new();
    for s in 0..4 {
        let mut c = client(&server, &format!("u{s}")).await;
        c.join("r").await;
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..50 {
                let body = format!("u{s}-{i}");
                let sent = c.send_msg("r", &body, &body).await;
                mine.push((sent.seq, body));
            }
            mine
        }));
    }
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    let mut killed = server;
    killed.child.kill().unwrap(); // SIGKILL: no shutdown path runs
    killed.child.wait().unwrap();
    drop(killed);

    // 2. Everything acked is there, once, in seq order.
    acked.sort();
    let server = start(&db, pg);
    let mut c = client(&server, "u0").await;
    let log = all_messages(&mut c, "r").await;
    let got: Vec<(u64, String)> = log.iter().map(|m| (m.seq, m.body.clone())).collect();
    assert_eq!(got, acked, "every acked message, once, in order");
    assert_eq!(log.last().unwrap().seq, 200);
    // Seq continues; a resend of an acked message is still recognised after the crash.
    let again = c.send_msg("r", "u0-7", "u0-7").await;
    assert!(again.duplicate);
    let next = c.send_msg("r", "after-crash", "after-crash").await;
    assert_eq!(next.seq, 201, "seq neither repeats nor skips");

    // 3. Graceful restart (SIGTERM): same again, membership and read markers too.
    let term = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let mut server = server;
    let status = server.child.wait().unwrap();
    assert!(status.success());
    let server = start(&db, pg);
    let mut c = client(&server, "u0").await;
    let rooms = c.request(Cmd::Rooms(proto::Rooms::default())).await;
    let Kind::Rooms(rooms) = rooms else { panic!() };
    assert_eq!(rooms.rooms.len(), 1);
    assert_eq!(
        (rooms.rooms[0].last_seq, rooms.rooms[0].read_seq),
        (201, 201)
    );
    assert_eq!(all_messages(&mut c, "r").await.len(), 201);
    drop(server);
    std::fs::remove_dir_all(dir).unwrap();
}
