//! A stop is orderly however much the daemon holds: with 300 agents and 16 clients asking,
//! SIGTERM or SIGINT during the load and after it ends in exit 0, `daemon.stopped` is the last
//! audit record, the trail verifies, and the next start finds every key. (Issue 21: SoftHSM's
//! module was torn down on the key store thread while `main` was already exiting.)

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use tessera::TokenOptions;
use tessera_e2e::{bin, Backend, Daemon};

const AUD: &str = "https://api.example.com";
const AGENTS: usize = 300;
const CLIENTS: usize = 16;

fn agent_name(i: usize) -> String {
    format!("a{i:03}")
}

fn declare_agents(d: &Daemon) {
    let uid = nix::unistd::getuid().as_raw();
    for i in 0..AGENTS {
        d.write_agent(
            &agent_name(i),
            &format!(
                "[selectors]\nuid = {uid}\n[policy]\naudiences = [\"{AUD}\"]\nrate = 100000\n"
            ),
        );
    }
}

/// 16 clients asking for tokens for agents spread over all 300 until `stop` is set, a
/// request fails (the daemon went away), or each has `limit` tokens.
struct Load {
    /// `jti` of every token a client received.
    jtis: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    issued: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

fn start_load(d: &Daemon, limit: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicUsize::new(0));
    let jtis = Arc::new(std::sync::Mutex::new(Vec::new()));
    let socket = d.socket.clone();
    let (s, n, delivered) = (stop.clone(), issued.clone(), jtis.clone());
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut tasks = vec![];
            for c in 0..CLIENTS {
                let client = tessera::Client::with_socket(&socket);
                let (s, n, delivered) = (s.clone(), n.clone(), delivered.clone());
                tasks.push(tokio::spawn(async move {
                    for j in 0..limit {
                        if s.load(Ordering::Relaxed) {
                            return;
                        }
                        let mut opts = TokenOptions::new(AUD);
                        opts.agent = Some(agent_name((c * 37 + j * 7) % AGENTS));
                        let Ok(t) = client.token(&opts).await else {
                            return;
                        };
                        let jti = tessera_e2e::jwt_claims(&t.token)["jti"]
                            .as_str()
                            .expect("jti")
                            .to_string();
                        delivered.lock().unwrap().push(jti);
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        });
    });
    Load {
        jtis,
        stop,
        issued,
        thread,
    }
}

/// Every token a client received (up to the signal) is in the trail: answered means audited.
fn check_delivered_audited(d: &Daemon, jtis: &[String], what: &str) {
    let audited: std::collections::HashSet<String> = d
        .audit_records()
        .iter()
        .filter(|r| r["event"] == "token.issued")
        .filter_map(|r| r["details"]["jti"].as_str().map(str::to_string))
        .collect();
    let missing: Vec<&String> = jtis.iter().filter(|j| !audited.contains(*j)).collect();
    assert!(
        missing.is_empty(),
        "{what}: {} delivered tokens not in the trail: {missing:?}",
        missing.len()
    );
}

impl Load {
    fn wait_for(&self, tokens: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.issued.load(Ordering::Relaxed) < tokens {
            assert!(
                std::time::Instant::now() < deadline,
                "load did not reach {tokens} tokens"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stop the clients (if still asking) and wait for them; the jti of every token delivered.
    fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("load thread");
        std::mem::take(&mut *self.jtis.lock().unwrap())
    }

    /// Wait until every client is done; the number of tokens issued.
    fn join(self) -> usize {
        self.thread.join().expect("load thread");
        self.issued.load(Ordering::Relaxed)
    }
}

/// The checks after every stop: exit 0, `daemon.stopped` last, the chain verifies.
fn check_stopped(d: &mut Daemon, sig: Signal, what: &str) {
    d.signal(sig);
    let st = d.wait_exit(Duration::from_secs(60));
    assert_eq!(
        st.code(),
        Some(0),
        "{what}: exit status {st} after {sig}:\n{}",
        tail(&d.log_text())
    );
    let records = d.audit_records();
    let last: &Value = records.last().expect("audit records");
    assert_eq!(
        last["event"], "daemon.stopped",
        "{what}: last record {last}"
    );
    let out = std::process::Command::new(bin("tessera"))
        .args(["audit", "verify"])
        .arg(d.audit_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: audit verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Every key the registry knows is on the device, and the JWKS publishes one per agent.
fn device_keys(d: &Daemon) -> Vec<String> {
    let mut keys = d.device_keys();
    keys.sort();
    keys
}

fn check_every_key(d: &Daemon, keys: &[String], what: &str) {
    assert_eq!(device_keys(d), keys, "{what}: device keys changed");
    let jwks = tessera_e2e::rt().block_on(d.client().jwks()).unwrap();
    assert_eq!(
        jwks["keys"].as_array().map(Vec::len),
        Some(AGENTS),
        "{what}: JWKS"
    );
}

fn stop_under_load_is_orderly(backend: Backend) {
    let mut d = Daemon::start(backend);
    declare_agents(&d);
    d.reload();
    let keys = device_keys(&d);
    assert_eq!(keys.len(), AGENTS, "every declared agent has a key");
    check_every_key(&d, &keys, "after enrolment");

    for round in 0..20 {
        // During the load: the signal arrives while 16 clients are asking.
        let load = start_load(&d, usize::MAX);
        load.wait_for(50);
        let sig = if round % 5 == 4 {
            Signal::SIGINT
        } else {
            Signal::SIGTERM
        };
        let what = format!("round {round}, during load");
        check_stopped(&mut d, sig, &what);
        check_delivered_audited(&d, &load.finish(), &what);

        d.spawn();
        d.wait_ready();
        check_every_key(&d, &keys, &format!("round {round}, restart after load"));

        // After the load: every client finished, then the signal.
        let load = start_load(&d, 10);
        let issued = load.join();
        assert_eq!(issued, CLIENTS * 10, "round {round}: every token issued");
        check_stopped(&mut d, sig, &format!("round {round}, after load"));

        d.spawn();
        d.wait_ready();
        check_every_key(&d, &keys, &format!("round {round}, restart"));
    }
}

tessera_e2e::both_backends!(stop_under_load_is_orderly);
