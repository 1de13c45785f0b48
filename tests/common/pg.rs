//! PostgreSQL for the tests: a fresh database per server on the server that
//! `PARLEY_TEST_PG_URL` names (`scripts/test` starts a private cluster and sets it), and
//! the switch that runs the whole suite on the PostgreSQL store
//! (`PARLEY_TEST_STORE=postgres`).

use std::time::Duration;

/// Whether this run puts every test server on PostgreSQL (`PARLEY_TEST_STORE=postgres`).
pub fn selected() -> bool {
    std::env::var("PARLEY_TEST_STORE").is_ok_and(|v| v == "postgres")
}

/// The URL of a database on the test server that may create others
/// (`postgres://user@host:port/db`).
pub fn admin_url() -> String {
    std::env::var("PARLEY_TEST_PG_URL").unwrap_or_else(|_| {
        panic!(
            "PARLEY_TEST_PG_URL is not set: run the tests through scripts/test, which starts a \
             private PostgreSQL (Debian package 'postgresql'), or point it at a server where \
             this user may CREATE DATABASE, e.g. postgres://postgres@127.0.0.1:5432/postgres"
        )
    })
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let rest = base
        .split_once("://")
        .map(|(_, r)| r)
        .expect("PARLEY_TEST_PG_URL is a postgres:// URL");
    let host_part = rest.split_once('/').map_or(rest, |(h, _)| h);
    let scheme = &base[..base.len() - rest.len()];
    format!("{scheme}{host_part}/{db}{query}")
}

async fn admin() -> tokio_postgres::Client {
    let url = admin_url();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to PARLEY_TEST_PG_URL: {e}"));
    tokio::spawn(conn);
    client
}

/// A database of its own, dropped (with whatever is still connected) when dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> Self {
        let name = format!("parley_t_{:016x}", rand::random::<u64>());
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e:?}"));
        let url = with_database(&admin_url(), &name);
        Self { name, url }
    }

    /// [`TestDb::create`] outside a runtime (or inside one, from a plain thread).
    pub fn create_blocking() -> Self {
        std::thread::spawn(|| runtime().block_on(Self::create()))
            .join()
            .unwrap()
    }

    /// The environment that puts a spawned `parley` binary on this database.
    pub fn env(&self) -> [(&'static str, String); 2] {
        [
            ("PARLEY_STORE__BACKEND", "postgres".to_string()),
            ("PARLEY_STORE__POSTGRES_URL", self.url.clone()),
        ]
    }

    /// Puts a config on this database.
    pub fn apply(&self, config: &mut parley::config::Config) {
        config.store.backend = parley::config::StoreBackend::Postgres;
        config.store.postgres_url = self.url.clone();
        // Tests start many servers at once: keep each one's share of connections small.
        config.store.postgres_pool_size = 4;
        config.store.postgres_writers = 1;
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Its own thread and runtime: Drop may run inside or outside a runtime.
        let dropped = std::thread::spawn(move || {
            runtime().block_on(async {
                let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                tokio::time::timeout(Duration::from_secs(10), admin().await.batch_execute(&sql))
                    .await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(Ok(())))) {
            eprintln!("warning: could not drop test database {}", self.name);
        }
    }
}
