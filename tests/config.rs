//! `config/parley.toml` documents every option with its default: it must parse to exactly
//! `Config::default()` and name every option the code has.

use std::collections::BTreeSet;

use parley::config::Config;

fn keys(value: &toml::Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let toml::Value::Table(t) = value {
        for (k, v) in t {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if v.is_table() {
                keys(v, &path, out);
            } else {
                out.insert(path);
            }
        }
    }
}

/// Options that default to "unset" and so appear commented out in the file.
const OPTIONAL: [&str; 5] = [
    "auth.public_key_file",
    "auth.private_key_file",
    "tls.cert_file",
    "tls.key_file",
    "mqtt.listen",
];

#[test]
fn shipped_config_is_exactly_the_defaults() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/parley.toml");
    let parsed = Config::load(path.as_ref()).expect("config/parley.toml parses");
    assert_eq!(parsed, Config::default());

    let text = std::fs::read_to_string(path).unwrap();
    let mut in_file = BTreeSet::new();
    keys(
        &toml::Value::Table(toml::from_str(&text).unwrap()),
        "",
        &mut in_file,
    );
    let mut in_code = BTreeSet::new();
    keys(
        &toml::Value::try_from(Config::default()).unwrap(),
        "",
        &mut in_code,
    );
    assert_eq!(in_file, in_code, "every option is in config/parley.toml");
    for key in OPTIONAL {
        assert!(
            text.contains(&format!("# {}", key.split('.').nth(1).unwrap())),
            "{key} documented"
        );
    }
}

#[test]
fn environment_overrides_the_file() {
    // SAFETY: only this test reads variables with this prefix, and nothing else in the
    // process mutates the environment concurrently.
    unsafe {
        std::env::set_var("PARLEYTEST_WS__HEARTBEAT_INTERVAL", "3s");
        std::env::set_var("PARLEYTEST_SESSION__MAX_QUEUE_BYTES", "1234");
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/parley.toml");
    let c = Config::load_with_env_prefix(path.as_ref(), "PARLEYTEST_").unwrap();
    assert_eq!(c.ws.heartbeat_interval, std::time::Duration::from_secs(3));
    assert_eq!(c.session.max_queue_bytes, 1234);
}

#[test]
fn unknown_options_are_rejected() {
    let dir = std::env::temp_dir().join(format!("parley-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[ws]\nheartbeat = \"5s\"\n").unwrap();
    let err = Config::load(&file).unwrap_err().to_string();
    assert!(err.contains("heartbeat"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn every_default_is_valid_and_bad_values_name_their_key_and_range() {
    Config::default().validate().expect("defaults are valid");
    let mut c = Config::default();
    c.ws.heartbeat_interval = std::time::Duration::ZERO;
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("ws.heartbeat_interval"), "{err}");
    assert!(err.contains("0s") && err.contains("10ms to 1h"), "{err}");
    let mut c = Config::default();
    c.store.read_connections = 0;
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("store.read_connections = 0"), "{err}");
    let mut c = Config::default();
    c.poll.default_hold = std::time::Duration::from_secs(120);
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("poll.default_hold")
    );
    // The MQTT listener cannot share the HTTP listener's port.
    let mut c = Config::default();
    c.mqtt.listen = Some("0.0.0.0:8080".parse().unwrap());
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("mqtt.listen"), "{err}");
    c.mqtt.listen = Some("127.0.0.1:1883".parse().unwrap());
    c.validate().expect("another port is fine");
}

#[test]
fn only_section_key_variables_are_configuration() {
    let vars = [
        "PARLEY_CONFIG",
        "PARLEY_PORT",
        "PARLEY_SERVICE_HOST",
        "PARLEY_PORT_8080_TCP_ADDR",
        "PARLEY_BIN",
        "PARLEY_WS__HEARTBEAT_INTERVAL",
        "PARLEY_AUTH__JWT_SECRET",
        "PARLEY_WS__NO_SUCH_OPTION",
        "PARLEY_NOPE__LISTEN",
        "HOME",
    ]
    .map(String::from);
    let (known, unknown) = parley::config::env_keys("PARLEY_", vars);
    assert_eq!(known, ["ws.heartbeat_interval", "auth.jwt_secret"]);
    assert_eq!(
        unknown,
        ["PARLEY_WS__NO_SUCH_OPTION", "PARLEY_NOPE__LISTEN"]
    );
}

#[test]
fn rotation_keys_audience_and_issuer_come_from_the_environment() {
    // SAFETY: only this test reads variables with this prefix, and nothing else in the
    // process mutates the environment concurrently.
    unsafe {
        std::env::set_var("PARLEYKEYS_AUTH__KEY_ID", "k2");
        std::env::set_var(
            "PARLEYKEYS_AUTH__EXTRA_KEYS",
            r#"[{kid="k1",secret="old-secret"}]"#,
        );
        std::env::set_var("PARLEYKEYS_AUTH__AUDIENCE", "parley");
        std::env::set_var("PARLEYKEYS_AUTH__ISSUER", "https://id.example.com");
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/parley.toml");
    let c = Config::load_with_env_prefix(path.as_ref(), "PARLEYKEYS_").unwrap();
    assert_eq!(c.auth.key_id, "k2");
    assert_eq!(c.auth.extra_keys.len(), 1);
    assert_eq!(c.auth.extra_keys[0].kid, "k1");
    assert_eq!(c.auth.extra_keys[0].secret, "old-secret");
    assert_eq!(c.auth.audience, "parley");
    assert_eq!(c.auth.issuer, "https://id.example.com");
}

#[test]
fn the_postgres_store_needs_a_valid_url_and_never_echoes_it() {
    use parley::config::StoreBackend;
    let mut c = Config::default();
    c.store.backend = StoreBackend::Postgres;
    let err = c.validate().unwrap_err().to_string();
    assert!(
        err.contains("store.postgres_url") && err.contains("PARLEY_STORE__POSTGRES_URL"),
        "{err}"
    );
    c.store.postgres_url = "postgres://parley:hunter2@db:notaport/parley".into();
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("store.postgres_url"), "{err}");
    assert!(
        !err.contains("hunter2"),
        "the password stays out of errors: {err}"
    );
    c.store.postgres_url = "postgres://parley:hunter2@db:5432/parley".into();
    c.validate().expect("a valid URL");
    c.store.postgres_writers = c.store.postgres_pool_size;
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("store.postgres_writers"), "{err}");
}
