//! `config/parley.toml` documents every option with its default: it must parse to exactly
//! `Config::default()`, and name every option the code has, each with prose and its
//! default (options that default to unset as a commented-out example), and no other.

use std::collections::{BTreeMap, BTreeSet};

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
    assert_eq!(
        in_file, in_code,
        "every set option is in config/parley.toml"
    );
}

/// One `key = value` line of the documented file, set or commented out (`# key = ...`).
struct Documented {
    line: usize,
    value: String,
    commented: bool,
}

/// A `key = value` line, set or commented out: (key, value, commented).
fn key_line(l: &str) -> Option<(String, String, bool)> {
    let (body, commented) = match l.strip_prefix("# ") {
        Some(rest) => (rest, true),
        None => (l, false),
    };
    let (k, v) = body.split_once(" = ")?;
    let ok = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    // A comment that only starts like one (`# backend = "postgres": the server...`) is
    // prose: a commented-out key's value is a TOML value.
    let value_ok = !commented || toml::from_str::<toml::Table>(&format!("k = {v}")).is_ok();
    (ok && value_ok).then(|| (k.to_string(), v.to_string(), commented))
}

/// The `key = value` lines of a file laid out like `config/parley.toml`, by
/// `section.key`, and the keys whose line (or run of adjacent key lines) has no prose
/// comment above it.
fn documented(text: &str) -> (BTreeMap<String, Documented>, Vec<String>) {
    let lines: Vec<&str> = text.lines().collect();
    let (mut out, mut bare) = (BTreeMap::new(), Vec::new());
    let mut section = String::new();
    for (i, l) in lines.iter().enumerate() {
        if let Some(s) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let Some((key, value, commented)) = key_line(l) else {
            continue;
        };
        let path = format!("{section}.{key}");
        // Prose: the first line above this run of key lines is a comment.
        let above = lines[..i]
            .iter()
            .rev()
            .find(|l| key_line(l).is_none())
            .copied()
            .unwrap_or("");
        if !above.starts_with('#') {
            bare.push(path.clone());
        }
        let line = i + 1;
        let prev = out.insert(
            path.clone(),
            Documented {
                line,
                value,
                commented,
            },
        );
        assert!(prev.is_none(), "line {line}: {path} is written twice");
    }
    (out, bare)
}

/// The value of `key` in `section` when a file sets only that (as JSON: every type of
/// the tree maps onto it), or the parse error.
fn value_of(section: &str, key: &str, value: &str) -> Result<serde_json::Value, String> {
    let c: Config =
        toml::from_str(&format!("[{section}]\n{key} = {value}\n")).map_err(|e| e.to_string())?;
    Ok(serde_json::to_value(c).unwrap()[section][key].clone())
}

/// Every key of the structs is in `config/parley.toml` with prose above it; every set
/// value there equals the struct default (compared as values, so "60s" and "1m" would
/// both do); a key is commented out only where it defaults to unset, and its example then
/// parses; no key there is unknown to the structs.
#[test]
fn every_key_is_documented_with_its_default() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/parley.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let (file, bare) = documented(&text);
    assert!(
        file.len() > 100,
        "the line reader found too few keys: {}",
        file.len()
    );
    let defaults = serde_json::to_value(Config::default()).unwrap();
    let mut problems = Vec::new();
    let mut in_code = BTreeSet::new();
    for (section, keys) in defaults.as_object().unwrap() {
        for (key, default) in keys.as_object().unwrap() {
            let path = format!("{section}.{key}");
            in_code.insert(path.clone());
            let Some(doc) = file.get(&path) else {
                problems.push(format!("{path}: not in config/parley.toml"));
                continue;
            };
            let line = doc.line;
            match value_of(section, key, &doc.value) {
                Err(e) => problems.push(format!("line {line}: {path} does not parse: {e}")),
                Ok(_) if doc.commented && !default.is_null() => problems.push(format!(
                    "line {line}: {path} is commented out but has a default ({default})"
                )),
                Ok(v) if !doc.commented && v != *default => problems.push(format!(
                    "line {line}: {path} = {} but the default is {default}",
                    doc.value
                )),
                Ok(_) => {}
            }
        }
    }
    for (path, doc) in &file {
        if !in_code.contains(path) {
            problems.push(format!("line {}: {path} is not an option", doc.line));
        }
    }
    for path in bare {
        problems.push(format!("{path}: no comment above it says what it does"));
    }
    assert!(
        problems.is_empty(),
        "config/parley.toml:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_file_checker_sees_a_wrong_default_a_missing_key_and_a_stray_one() {
    let (file, bare) = documented(
        "[ws]\n# Ping interval.\nheartbeat_interval = \"26s\"\n# max_frame_bytes = 1\nnope = 1\n",
    );
    let default =
        serde_json::to_value(Config::default()).unwrap()["ws"]["heartbeat_interval"].clone();
    let doc = &file["ws.heartbeat_interval"];
    assert!(!doc.commented);
    assert_ne!(
        value_of("ws", "heartbeat_interval", &doc.value).unwrap(),
        default
    );
    assert_eq!(
        value_of("ws", "heartbeat_interval", "\"25s\"").unwrap(),
        default
    );
    assert_eq!(
        value_of("ws", "heartbeat_interval", "\"25000ms\"").unwrap(),
        default
    );
    assert!(value_of("ws", "heartbeat_interval", "25").is_err());
    assert!(file["ws.max_frame_bytes"].commented);
    assert!(!file.contains_key("ws.pong_timeout"));
    assert!(file.contains_key("ws.nope"));
    assert!(
        bare.is_empty(),
        "a run of keys under one comment is documented"
    );
    let (file, _) = documented("[store]\n# backend = \"postgres\": the server, e.g. x\n");
    assert!(file.is_empty(), "prose that starts like a key is prose");
    let (_, bare) = documented("[ws]\n\npong_timeout = \"20s\"\n");
    assert_eq!(bare, ["ws.pong_timeout"]);
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

#[test]
fn a_redis_cluster_needs_sharded_pubsub_and_takes_a_list_of_seed_nodes() {
    use parley::config::{BrokerBackend, PubSubMode};
    let mut c = Config::default();
    c.broker.backend = BrokerBackend::Redis;
    c.broker.redis_url = "redis://:hunter2@10.0.0.1:7000,redis://:hunter2@10.0.0.2:7000".into();
    let err = c.validate().unwrap_err().to_string();
    assert!(
        err.contains("broker.redis_url"),
        "one URL without cluster: {err}"
    );
    assert!(
        !err.contains("hunter2"),
        "the password stays out of errors: {err}"
    );
    c.broker.cluster = true;
    let err = c.validate().unwrap_err().to_string();
    assert!(
        err.contains("broker.pubsub") && err.contains("broadcast to every node"),
        "a classic PUBLISH in a cluster is refused: {err}"
    );
    c.broker.pubsub = PubSubMode::Sharded;
    c.validate().expect("a cluster with sharded pub/sub");
    c.broker.redis_prefix = "{parley}".into();
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("broker.redis_prefix"), "{err}");
}

#[test]
fn without_a_cluster_the_redis_url_is_taken_whole() {
    use parley::config::BrokerBackend;
    let mut c = Config::default();
    c.broker.backend = BrokerBackend::Redis;
    c.broker.redis_url = "redis://:pass,word@10.0.0.1:6379/".into();
    c.validate().expect("a comma in a password is no list");
}
