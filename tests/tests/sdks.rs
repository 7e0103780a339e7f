//! The Python and TypeScript SDKs' own suites, each against a real `tesserad --dev` (SoftHSM
//! token) that the suite starts from this build, and the MCP example between them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a suite; fails with its whole output unless it ran tests, all passed and none was
/// skipped (a skip would hide a missing piece).
fn run_suite(mut cmd: Command, what: &str, must: &[&str], must_not: &[&str]) {
    let out = cmd
        .env("TESSERA_TEST_TESSERAD", tessera_e2e::bin("tesserad"))
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start (run scripts/setup): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    for m in must {
        assert!(text.contains(m), "{what}: no {m:?} in its output:\n{text}");
    }
    for m in must_not {
        assert!(!text.contains(m), "{what}: {m:?} in its output:\n{text}");
    }
    println!("{text}");
}

#[test]
fn python_sdk_suite() {
    let python = std::env::var_os("TESSERA_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/pyenv/bin/python"));
    let mut cmd = Command::new(python);
    cmd.current_dir(root().join("agent-sdk/python")).args([
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfEs",
        "tests",
    ]);
    run_suite(
        cmd,
        "pytest agent-sdk/python/tests",
        &[" passed"],
        &[" skipped", " failed", " error"],
    );
}

#[test]
fn typescript_sdk_suite() {
    let mut cmd = Command::new("npm");
    cmd.current_dir(root().join("agent-sdk/typescript"))
        .args(["test", "--silent"]);
    run_suite(
        cmd,
        "npm test (agent-sdk/typescript)",
        &["# pass", "# fail 0", "# skipped 0"],
        &[],
    );
}
