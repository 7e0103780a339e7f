//! The daemon's layout keeps its arrows (DESIGN "Layout"): every `crate::` path in
//! `daemon/src` is checked against the allowed part-to-part imports, and the SDK never depends
//! on the daemon. A new import that breaks a never fails here with its file and line.
//!
//! bin -> runtime -> doors -> credentials -> agents, caller -> keystore, audit; small shared
//! helpers (durable, fault, duration, metrics) below everything. Nevers: keystore or audit importing
//! anything above them; caller importing agents; a door calling keystore or the registry
//! directly; anything below runtime importing runtime.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Layer of each part: a part may import parts of a lower layer only (plus itself).
fn layer(part: &str) -> Option<u8> {
    Some(match part {
        "durable" | "fault" | "duration" | "metrics" => 0,
        "keystore" | "audit" => 1,
        "caller" => 2,
        "agents" => 3,
        "credentials" => 4,
        "doors" => 5,
        "runtime" => 6,
        "bin" => 7,
        _ => return None,
    })
}

/// Imports a part may not make even though its layer would allow them.
fn forbidden(from: &str, path: &str) -> Option<&'static str> {
    if from == "doors" && (path.starts_with("keystore") || path.starts_with("agents::registry")) {
        return Some("a door calls the pipeline, never the key store or the registry");
    }
    None
}

fn daemon_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemon/src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The part a file belongs to: its first path component under `src/` (file stem for files).
fn part_of(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// Every `crate::a::b` (or `tesserad::a::b` in binaries) path with its line, `a::b` returned.
/// `use crate::{x, y}` groups are expanded to their first segment.
fn imports(text: &str, root: &str) -> Vec<(usize, String)> {
    let mut out = vec![];
    let pat = format!("{root}::");
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find(&pat) {
            // `foo_crate::` is not `crate::`.
            let before = rest[..i].chars().last();
            rest = &rest[i + pat.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    let item = item.trim();
                    if !item.is_empty() {
                        out.push((n + 1, item.to_string()));
                    }
                }
                continue;
            }
            let path: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            out.push((n + 1, path.trim_end_matches(':').to_string()));
        }
    }
    out
}

#[test]
fn daemon_imports_follow_the_arrows() {
    let src = daemon_src();
    let mut files = vec![];
    rust_files(&src, &mut files);
    files.sort();
    assert!(files.len() > 20, "daemon sources not found at {src:?}");
    let mut parts = BTreeSet::new();
    let mut bad = vec![];
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        if rel == Path::new("lib.rs") {
            continue;
        }
        let from = part_of(rel);
        let Some(from_layer) = layer(&from) else {
            bad.push(format!(
                "{}: part {from:?} is not in the layout (add it to DESIGN and to this test)",
                rel.display()
            ));
            continue;
        };
        parts.insert(from.clone());
        let text = std::fs::read_to_string(f).unwrap();
        let root = if from == "bin" { "tesserad" } else { "crate" };
        for (line, path) in imports(&text, root) {
            let to = path.split("::").next().unwrap_or("").to_string();
            if to == from || to.is_empty() || to == "self" {
                continue;
            }
            let Some(to_layer) = layer(&to) else {
                bad.push(format!("{}:{line}: unknown part {to:?}", rel.display()));
                continue;
            };
            if to_layer >= from_layer {
                bad.push(format!(
                    "{}:{line}: {from} imports {path} (arrows run bin -> runtime -> doors -> credentials -> agents -> caller -> keystore, audit)",
                    rel.display()
                ));
            }
            if let Some(why) = forbidden(&from, &path) {
                bad.push(format!(
                    "{}:{line}: {from} imports {path}: {why}",
                    rel.display()
                ));
            }
        }
    }
    assert!(bad.is_empty(), "layout violations:\n{}", bad.join("\n"));
    for p in [
        "runtime",
        "doors",
        "credentials",
        "agents",
        "caller",
        "keystore",
        "audit",
    ] {
        assert!(parts.contains(p), "part {p} missing from daemon/src");
    }
}

#[test]
fn the_checker_sees_a_broken_arrow() {
    // The parser itself: a keystore importing agents, a grouped import, a comment.
    let text = "use crate::agents::registry::Registry;\nuse crate::{audit, runtime::config};\n// crate::doors in a comment\nlet x = other_crate::y;";
    let found: Vec<String> = imports(text, "crate").into_iter().map(|x| x.1).collect();
    assert_eq!(
        found,
        vec!["agents::registry::Registry", "audit", "runtime::config"]
    );
    assert!(layer("agents").unwrap() >= layer("keystore").unwrap());
    assert!(forbidden("doors", "agents::registry::Registry").is_some());
    assert!(forbidden("doors", "keystore").is_some());
    assert!(forbidden("credentials", "keystore").is_none());
}

/// `cargo tree` of a package's normal dependencies, one crate per line.
fn normal_dependencies(package: &str) -> String {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            package,
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .output()
        .expect("cargo tree");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "cargo tree failed: {out:?}");
    assert!(text.contains(&format!("{package} v")), "{text}");
    text
}

#[test]
fn sdk_does_not_depend_on_the_daemon() {
    let text = normal_dependencies("tessera");
    assert!(
        !text.lines().any(|l| l.starts_with("tesserad ")),
        "the SDK depends on the daemon:\n{text}"
    );
}

/// The daemon depends on the SDK without its rustls and reqwest helpers (DESIGN, keyless TLS):
/// only the CLI crate (`cli/`, the tls-proxy) turns them on.
#[test]
fn the_daemon_links_no_tls_client_stack() {
    let text = normal_dependencies("tesserad");
    for krate in ["rustls ", "tokio-rustls ", "reqwest "] {
        assert!(
            !text.lines().any(|l| l.starts_with(krate)),
            "tesserad depends on {krate}:\n{text}"
        );
    }
}

/// The CLI (`cli/src`) reaches the daemon's code only through its parts, like `bin`.
#[test]
fn the_cli_imports_known_parts() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cli/src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    assert!(!files.is_empty(), "CLI sources not found at {src:?}");
    let mut bad = vec![];
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for (line, path) in imports(&text, "tesserad") {
            let to = path.split("::").next().unwrap_or("");
            if layer(to).is_none_or(|l| l >= layer("bin").unwrap_or(7)) {
                bad.push(format!("{}:{line}: tesserad::{path}", f.display()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "CLI imports outside the daemon's parts:\n{}",
        bad.join("\n")
    );
}
