//! The agent API as an agent reaches it: a real `tesserad` (in this process, on an embedded
//! SoftHSM token, as `tesserad --dev` runs) answers fuzzed requests on its Unix socket. The
//! first byte picks the route; the rest is `query \n body`. Every answer must be a complete
//! HTTP response, never a 500, and every refusal a problem JSON whose status is the
//! response's. A panic anywhere in the daemon aborts the process (libFuzzer's panic hook).

#![no_main]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tesserad::runtime::dev::{self, DevBackend};

const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/token"),
    ("POST", "/v1/proof"),
    ("POST", "/v1/tls/sign"),
    ("GET", "/v1/certificate"),
    ("GET", "/v1/whoami"),
    ("GET", "/v1/wit"),
    ("GET", "/v1/attestation"),
    ("GET", "/v1/bundle"),
    ("GET", "/v1/jwks"),
    ("GET", "/v1/crl"),
    ("GET", "/v1/health"),
    ("PUT", "/v1/token"),
    ("GET", "/v1/nothing"),
];

static SOCKET: OnceLock<PathBuf> = OnceLock::new();

/// Two agents for this process's uid: a plain one and one with every binding option on, so
/// that `agent` selection, DPoP/mTLS binding, session keys and the server role are reachable.
fn agent_files(uid: u32) -> [(&'static str, String); 2] {
    [
        (
            "plain",
            format!(
                "[selectors]\nuid = {uid}\n[policy]\naudiences = [\"https://api.example/*\", \"https://*.svc.example\"]\nscopes = [\"read\", \"write\"]\nmax_ttl = \"15m\"\nrate = 1000000\n"
            ),
        ),
        (
            "bound",
            format!(
                "[selectors]\nuid = {uid}\n[policy]\naudiences = [\"https://api.example/*\"]\nscopes = [\"read\"]\nrequire_binding = true\nproof_key = \"session\"\ntls_server = true\nrate = 1000000\n"
            ),
        ),
    ]
}

fn socket() -> &'static PathBuf {
    SOCKET.get_or_init(|| {
        let state = common::work_dir("api").join("state");
        // SOFTHSM2_CONF is set here, before the daemon's runtime starts any thread.
        let env = dev::prepare(DevBackend::Pkcs11, &state, Some("none"))
            .expect("cannot prepare the embedded SoftHSM token");
        let uid = std::os::unix::fs::MetadataExt::uid(
            &std::fs::metadata("/proc/self").expect("/proc/self"),
        );
        for (name, text) in agent_files(uid) {
            std::fs::write(env.config.agents_dir.join(format!("{name}.toml")), text)
                .expect("cannot write an agent file");
        }
        let cfg = env.config.clone();
        let path = cfg.socket.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            let _env = env;
            if let Err(e) = rt.block_on(tesserad::runtime::run(cfg, None, Default::default())) {
                panic!("tesserad stopped: {e:#}");
            }
        });
        let start = Instant::now();
        while UnixStream::connect(&path).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "tesserad did not answer"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        path
    })
}

/// Query bytes as a valid request-target: bytes HTTP does not allow there are
/// percent-encoded, so the daemon's decoder sees every byte value.
fn query_text(q: &[u8]) -> String {
    let mut s = String::new();
    for &b in q {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

fn ask(method: &str, path: &str, query: &[u8], body: &[u8]) -> Vec<u8> {
    let target = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", query_text(query))
    };
    let mut s = UnixStream::connect(socket()).expect("tesserad's socket is gone");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // The daemon may answer (413, 404, 405) before it has read a body, and close: a write
    // that meets a closed connection is fine, the answer is still there to read.
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    if let Err(e) = s.write_all(&request) {
        assert!(
            matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
            "cannot send: {e}"
        );
    }
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        assert!(
            e.kind() == ErrorKind::ConnectionReset && !out.is_empty(),
            "no answer from tesserad: {e}"
        );
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let (method, path) = ROUTES[pick as usize % ROUTES.len()];
    let (query, mut body) = common::split(rest, b'\n');
    if method == "GET" {
        body = &[];
    }
    let answer = ask(method, path, query, body);
    let text = String::from_utf8_lossy(&answer);
    let (head, payload) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not a complete HTTP response: {text:?}"));
    let status: u16 = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    assert!(
        (200..500).contains(&status) || status == 503,
        "{method} {path}: status {status}: {payload}"
    );
    if status >= 400 {
        // Chunked bodies: the problem JSON is the one line that starts with '{'.
        let json = payload
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("{status} without a problem body: {payload:?}"));
        let p: serde_json::Value = serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("{status}: problem body is not JSON ({e}): {json}"));
        assert!(p["type"].is_string() && p["title"].is_string(), "{p}");
        assert_eq!(p["status"].as_u64(), Some(status as u64), "{p}");
    }
});
