//! Harness for end-to-end tests: every test starts its own real devices and daemon.
//!
//! - [`Swtpm`]: a private swtpm on a free loopback port pair (retried when taken).
//! - [`SoftHsm`]: a private SoftHSM token directory (`SOFTHSM2_CONF` per process).
//! - [`Daemon`]: the real `tesserad` binary on that device, with its own state dir and socket.
//!
//! Everything started is stopped by pid when its guard drops.

pub mod bus;
pub mod daemon;
pub mod devices;
pub mod floors;
pub mod http;
pub mod tls;
pub mod workload;

pub use daemon::Daemon;
pub use devices::{Backend, SoftHsm, Swtpm};

use std::path::{Path, PathBuf};

/// Directory holding the workspace's built binaries (target/debug).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("TESSERA_BIN_DIR") {
        return PathBuf::from(d);
    }
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --all-targets` first",
        p.display()
    );
    p
}

/// A software P-256 leaf certificate made by `openssl` in `dir`: `<name>.key` and `<name>.pem`,
/// self-signed, CN and DNS SAN `localhost`, not a CA, with `extendedKeyUsage` `eku` if given.
pub fn openssl_leaf(dir: &Path, name: &str, eku: Option<&str>) {
    let mut args: Vec<String> = [
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-days",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "-keyout".into(),
        format!("{name}.key"),
        "-out".into(),
        format!("{name}.pem"),
    ]);
    if let Some(e) = eku {
        args.extend(["-addext".into(), format!("extendedKeyUsage={e}")]);
    }
    let o = std::process::Command::new("openssl")
        .args(&args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(o.status.success(), "openssl {args:?}: {o:?}");
}

/// A temp dir that other users can traverse (for tests that run clients as another uid).
pub fn shared_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::Builder::new()
        .prefix("tessera-test-")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// One `#[test]` per backend for a test function that takes a [`Backend`]:
/// `both_backends!(name)` makes `name::tpm` and `name::pkcs11`.
#[macro_export]
macro_rules! both_backends {
    ($name:ident) => {
        mod $name {
            #[test]
            fn tpm() {
                super::$name($crate::Backend::tpm());
            }

            #[test]
            fn pkcs11() {
                super::$name($crate::Backend::pkcs11());
            }
        }
    };
}

/// Run an agentcall helper as `uid` (gid = uid) and parse what it printed.
pub fn agentcall(exe: &Path, uid: u32, socket: &Path, what: &[&str]) -> serde_json::Value {
    use std::os::unix::process::CommandExt;
    // A helper copy written a moment ago can be briefly held open for writing by a child that
    // another test thread forked at that instant (it holds the fd until its exec): ETXTBSY,
    // gone once that child has exec'd.
    let mut tries = 0;
    let out = loop {
        let r = std::process::Command::new(exe)
            .arg(socket)
            .args(what)
            .uid(uid)
            .gid(uid)
            .output();
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => break r.expect("run agentcall"),
        }
    };
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("agentcall output: {:?}", out))
}

/// A copy of the agentcall helper in `dir` whose content (and so hash) differs by `salt`.
pub fn helper_copy(dir: &Path, name: &str, salt: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let mut bytes = std::fs::read(bin("agentcall")).expect("agentcall built");
    bytes.extend_from_slice(salt.as_bytes());
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write helper");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

/// Hex SHA-256 of a file.
pub fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(p).expect("read")))
}

/// The header of a compact JWT, unverified.
pub fn jwt_header(token: &str) -> serde_json::Value {
    jwt_part(token, 0)
}

/// The claims of a compact JWT, unverified (for checks that relate a token to the audit;
/// signatures are checked elsewhere with jsonwebtoken).
pub fn jwt_claims(token: &str) -> serde_json::Value {
    jwt_part(token, 1)
}

fn jwt_part(token: &str, i: usize) -> serde_json::Value {
    use base64::Engine;
    let part = token.split('.').nth(i).expect("JWT part");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("JSON")
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A directory for executables that `exe` selectors name: not under `/tmp` or `/var/tmp`
/// (the daemon refuses those at enrolment), reachable by other uids.
pub fn exe_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::Builder::new()
        .prefix("tessera-test-exe-")
        .tempdir_in("/var/lib")
        .expect("tempdir in /var/lib (tests run as root)");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// `tessera audit verify PATH`: its exit code and its output (stdout then stderr).
pub fn audit_verify(path: &Path) -> (Option<i32>, String) {
    let out = std::process::Command::new(bin("tessera"))
        .args(["audit", "verify"])
        .arg(path)
        .output()
        .expect("run tessera audit verify");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A small runtime for driving the async SDK client from a test.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Run a relying-party check written in Python (`tests/python/NAME`) with the pinned
/// libraries of `target/pyenv` (made by `scripts/setup`), feeding it `input` as JSON.
/// Returns its JSON answer and whether it exited 0.
pub fn python_check(name: &str, input: &serde_json::Value) -> (bool, serde_json::Value) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::env::var_os("TESSERA_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/pyenv/bin/python"));
    script_check(&python, &root.join("tests/python").join(name), input)
}

/// [`python_check`] for a Node.js script (`tests/node/NAME`), which imports the TypeScript SDK
/// from the repository.
pub fn node_check(name: &str, input: &serde_json::Value) -> (bool, serde_json::Value) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    script_check(
        std::path::Path::new("node"),
        &root.join("tests/node").join(name),
        input,
    )
}

/// Run `interpreter script`, feed it `input` as JSON, parse the JSON it prints.
fn script_check(
    interpreter: &std::path::Path,
    script: &std::path::Path,
    input: &serde_json::Value,
) -> (bool, serde_json::Value) {
    use std::io::Write;
    let name = script.display();
    let mut child = std::process::Command::new(interpreter)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{} (run scripts/setup): {e}", interpreter.display()));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("script output");
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v)
}
