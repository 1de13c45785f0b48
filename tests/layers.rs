//! The layering rule of DESIGN.md, checked on the source: a module imports only modules
//! of a lower layer (or itself). Both crates: parley (`src/`) and its load generator
//! (`bench/src/`), so neither grows an import circle. `cargo test --test layers` runs
//! it; a violation names the file, the line and the two layers.

use std::{collections::BTreeMap, path::Path};

/// Layers, lowest first. Within the foundations the order is their dependency order.
const LAYERS: [&str; 17] = [
    // Saturating narrow copies of figures: imports nothing of parley's.
    "compact",
    "proto",
    "deflate",
    "codec",
    "metrics",
    "ratelimit",
    "config",
    "auth",
    "delivery",
    "store",
    "broker",
    "files",
    "chat",
    "session",
    "transport",
    "server",
    "",
];

fn rank(module: &str) -> Option<usize> {
    // store and broker share a layer: neither may import the other.
    let rank = match module {
        "broker" => LAYERS.iter().position(|m| *m == "store"),
        // The browser SDK and demo page are served beside the transports.
        "web" => LAYERS.iter().position(|m| *m == "transport"),
        other => LAYERS.iter().position(|m| *m == other),
    };
    rank.filter(|_| !module.is_empty())
}

/// The top-level modules named by `crate::` paths in one line of code (also inside a
/// `use crate::{a::…, b, …}` group, which may span lines: `text` is the whole file).
fn crate_refs(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let code: String = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("//") {
                ""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let bytes = code.as_bytes();
    let mut i = 0;
    while let Some(off) = code[i..].find("crate::") {
        let start = i + off;
        let line = code[..start].matches('\n').count() + 1;
        let mut j = start + "crate::".len();
        if bytes.get(j) == Some(&b'{') {
            // A group: the names at depth 1.
            let mut depth = 0;
            let mut name = String::new();
            let mut expect_name = true;
            while j < bytes.len() {
                let c = bytes[j] as char;
                match c {
                    '{' => {
                        depth += 1;
                        if depth > 1 {
                            expect_name = false;
                        }
                    }
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => expect_name = true,
                    c if depth == 1 && expect_name && (c.is_alphanumeric() || c == '_') => {
                        name.push(c)
                    }
                    _ => {
                        if !name.is_empty() {
                            out.push((line, std::mem::take(&mut name)));
                            expect_name = false;
                        }
                    }
                }
                j += 1;
            }
        } else {
            let name: String = code[j..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push((line, name));
            j += 1;
        }
        i = j.max(start + 1);
    }
    out
}

fn module_of(path: &Path, src: &Path) -> String {
    let rel = path.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The import violations in the crate whose sources are `src`: every top-level module
/// must have a rank, and may name only modules of a lower rank (or itself). `entry`:
/// the crate roots and binaries, which sit above everything and are not checked.
fn violations(src: &Path, rank: fn(&str) -> Option<usize>, entry: &[&str]) -> Vec<String> {
    let mut all = Vec::new();
    files(src, &mut all);
    let mut violations = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for path in all {
        let module = module_of(&path, src);
        if entry.contains(&module.as_str()) {
            continue;
        }
        let from = rank(&module).unwrap_or_else(|| {
            panic!(
                "{}: module {module:?} has no layer in tests/layers.rs",
                path.display()
            )
        });
        let text = std::fs::read_to_string(&path).unwrap();
        for (line, target) in crate_refs(&text) {
            *seen.entry(module.clone()).or_default() += 1;
            if target == module {
                continue;
            }
            let to = rank(&target).unwrap_or_else(|| {
                panic!("{}:{line}: crate::{target} has no layer", path.display())
            });
            if to >= from {
                violations.push(format!(
                    "{}:{line}: {module} (layer {from}) imports {target} (layer {to})",
                    path.strip_prefix(src).unwrap().display()
                ));
            }
        }
    }
    assert!(
        seen.len() >= 4,
        "the checker found too few imports in {} to be working: {seen:?}",
        src.display()
    );
    violations
}

#[test]
fn imports_only_point_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let violations = violations(&src, rank, &["lib", "main"]);
    assert!(
        violations.is_empty(),
        "imports pointing up or sideways:\n{}",
        violations.join("\n")
    );
}

/// The load generator's layers (`bench/src`), lowest first: foundations that import
/// nothing of the crate, then where to connect, then the connections (the HTTP ones
/// and WebTransport below the one that dispatches over every transport), then the scenarios that drive
/// them.
const BENCH_LAYERS: [&str; 13] = [
    "ui",
    "stats",
    "net",
    "wire",
    "probe",
    "report",
    "tls",
    "target",
    "ws_transport",
    "http_transport",
    "wt_transport",
    "transport",
    "scenario",
];

fn bench_rank(module: &str) -> Option<usize> {
    BENCH_LAYERS.iter().position(|m| *m == module)
}

#[test]
fn the_load_generator_imports_only_point_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/src");
    // lib.rs re-exports, main.rs and bin/ are the command lines over the library.
    let violations = violations(&src, bench_rank, &["lib", "main", "bin"]);
    assert!(
        violations.is_empty(),
        "bench/: imports pointing up or sideways:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_grouped_and_plain_imports() {
    let text = "use crate::{\n    auth::now_ms,\n    chat::{Chat, ChatError},\n    proto,\n};\nfn f() { crate::server::start(); }\n// crate::transport in a comment\n";
    let names: Vec<String> = crate_refs(text).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["auth", "chat", "proto", "server"]);
    assert!(rank("session") > rank("chat"));
    assert_eq!(rank("broker"), rank("store"));
}
