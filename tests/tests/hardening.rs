//! The four promises under attack (issue 11): each test here failed on the daemon before the
//! fix it names, against the real daemon on swtpm and SoftHSM.

use std::collections::HashMap;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tessera::{ProblemType, TokenOptions};
use tessera_e2e::bus::{BusPolicy, TestBus};
use tessera_e2e::daemon::Options;
use tessera_e2e::{agentcall, bin, helper_copy, sha256_file, shared_tempdir, Backend, Daemon};

const AUD: &str = "https://api.example.com";

fn agent_toml(selectors: &str, extra_policy: &str) -> String {
    format!(
        "[selectors]\n{selectors}\n[policy]\naudiences = [\"{AUD}\", \"https://*.internal.example.com\"]\nscopes = [\"read\"]\nmax_ttl = \"15m\"\n{extra_policy}\n"
    )
}

fn on_bus(backend: Backend, agents: Vec<(String, String)>) -> (TestBus, Daemon) {
    let bus = TestBus::start(BusPolicy::Shipped);
    let d = Daemon::start_with(
        backend,
        Options {
            bus: bus.address.clone(),
            agents,
            ..Default::default()
        },
    );
    (bus, d)
}

fn cli(bus: &TestBus, d: &Daemon, args: &[&str]) -> Output {
    Command::new(bin("tessera"))
        .arg("--bus")
        .arg(&bus.address)
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .output()
        .expect("run tessera")
}

fn cli_ok(bus: &TestBus, d: &Daemon, args: &[&str]) -> String {
    let o = cli(bus, d, args);
    assert!(
        o.status.success(),
        "tessera {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn token(d: &Daemon, opts: &TokenOptions) -> Result<tessera::TokenResponse, tessera::Error> {
    tessera_e2e::rt().block_on(d.client().token(opts))
}

/// (Item 1) A revoked file-declared agent stays revoked through SIGHUP, `Reload`, a restart and
/// kill -9: no token, no new key. Changing the file enrols it anew.
fn revoked_file_agent_stays_revoked(backend: Backend) {
    let (bus, mut d) = on_bus(backend, vec![("bot".into(), agent_toml("uid = 0", ""))]);
    token(&d, &TokenOptions::new(AUD)).expect("token before revocation");
    let first_key = d.device_keys();
    assert_eq!(first_key.len(), 1);
    cli_ok(
        &bus,
        &d,
        &["agent", "revoke", "bot", "--reason", "key leaked"],
    );
    let refused = |d: &Daemon, when: &str| {
        let e = token(d, &TokenOptions::new(AUD)).expect_err(when);
        assert_eq!(e.problem(), Some(ProblemType::AgentRevoked), "{when}: {e}");
        assert!(
            !e.to_string().contains("key leaked"),
            "{when}: a refusal does not echo the admin's reason: {e}"
        );
        assert!(d.device_keys().is_empty(), "{when}: no key came back");
    };
    refused(&d, "after revoke");
    d.reload();
    refused(&d, "after SIGHUP");
    cli_ok(&bus, &d, &["agent", "reload"]);
    refused(&d, "after Reload()");
    d.restart();
    refused(&d, "after restart");
    d.kill9();
    d.spawn();
    d.wait_ready();
    refused(&d, "after kill -9 and start");
    assert!(
        d.audit_records()
            .iter()
            .any(|r| r["event"] == "agent.file_held" && r["agent"]["name"] == "bot"),
        "the held file is reported in the audit"
    );
    assert!(d
        .log_text()
        .contains("stays revoked until this file changes"));

    // The admin changes the file on purpose: a new agent with a new key.
    d.write_agent(
        "bot",
        &format!("{}# re-enabled after rotation\n", agent_toml("uid = 0", "")),
    );
    d.reload();
    token(&d, &TokenOptions::new(AUD)).expect("token after the file changed");
    let new_key = d.device_keys();
    assert_eq!(new_key.len(), 1);
    assert_ne!(new_key, first_key);
}

tessera_e2e::both_backends!(revoked_file_agent_stays_revoked);

/// (Item 2) No credential leaves after its agent's revoked record is durable: 16 clients ask while
/// the agent is revoked; every token handed out is in the audit before `agent.revoked`, was
/// issued no later than the revocation, and no token is handed out after `Revoke` returned.
fn no_token_leaves_after_revocation(backend: Backend) {
    nothing_leaves_after(
        backend,
        &["agent", "revoke", "busy", "--reason", "incident"],
        ProblemType::AgentRevoked,
        "agent.revoked",
    );
}

tessera_e2e::both_backends!(no_token_leaves_after_revocation);

/// The same for a suspension: it too is recorded under the issuance gate.
fn no_token_leaves_after_suspension(backend: Backend) {
    nothing_leaves_after(
        backend,
        &["agent", "suspend", "busy"],
        ProblemType::AgentSuspended,
        "agent.suspended",
    );
}

tessera_e2e::both_backends!(no_token_leaves_after_suspension);

/// 16 clients ask for tokens while an admin runs `tessera ARGS` to cut the agent off: every
/// token handed out is audited before `event`, and once the call returned all are `refused`.
fn nothing_leaves_after(backend: Backend, args: &[&str], refused: ProblemType, event: &str) {
    let (bus, d) = on_bus(
        backend,
        vec![("busy".into(), agent_toml("uid = 0", "rate = 1000000"))],
    );
    let revoked = Arc::new(AtomicBool::new(false));
    let socket = d.socket.clone();
    let clients = {
        let revoked = revoked.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut tasks = vec![];
                for _ in 0..16 {
                    let c = tessera::Client::with_socket(&socket);
                    let revoked = revoked.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut got = vec![];
                        loop {
                            match c.token(&TokenOptions::new(AUD)).await {
                                Ok(t) => got.push(t.token),
                                Err(e) => {
                                    assert!(
                                        matches!(
                                            e.problem(),
                                            Some(ProblemType::AgentRevoked)
                                                | Some(ProblemType::AgentSuspended)
                                                | Some(ProblemType::UnknownCaller)
                                        ),
                                        "{e}"
                                    );
                                    if revoked.load(Ordering::SeqCst) {
                                        return got;
                                    }
                                }
                            }
                            if got.len() > 5000 {
                                return got;
                            }
                        }
                    }));
                }
                let mut all = vec![];
                for t in tasks {
                    all.extend(t.await.unwrap());
                }
                all
            })
        })
    };
    // Let issuance get going, then revoke while it runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while d
        .audit_records()
        .iter()
        .filter(|r| r["event"] == "token.issued")
        .count()
        < 50
    {
        assert!(std::time::Instant::now() < deadline, "no tokens issued");
        std::thread::sleep(Duration::from_millis(10));
    }
    cli_ok(&bus, &d, args);
    let returned_at = tessera_e2e::now_unix();
    revoked.store(true, Ordering::SeqCst);
    // After the call returned, nothing more: one more request from here is refused.
    let e = token(&d, &TokenOptions::new(AUD)).expect_err("token after the call returned");
    assert_eq!(e.problem(), Some(refused));
    let tokens = clients.join().expect("clients");
    assert!(!tokens.is_empty());

    let records = d.audit_records();
    let revoked_seq = records
        .iter()
        .find(|r| r["event"] == event)
        .and_then(|r| r["seq"].as_u64())
        .unwrap_or_else(|| panic!("{event} recorded"));
    let issued: HashMap<String, u64> = records
        .iter()
        .filter(|r| r["event"] == "token.issued")
        .map(|r| {
            (
                r["details"]["jti"].as_str().unwrap().to_string(),
                r["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    for t in &tokens {
        let claims = tessera_e2e::jwt_claims(t);
        let jti = claims["jti"].as_str().unwrap();
        let seq = issued
            .get(jti)
            .unwrap_or_else(|| panic!("token {jti} handed out without an audit record"));
        assert!(
            *seq < revoked_seq,
            "token {jti} audited at {seq}, after {event} at {revoked_seq}"
        );
        assert!(claims["iat"].as_i64().unwrap() <= returned_at);
    }
}

/// (Item 4) The kill switch marks every agent revoked at once: every `agent.revoked` is in the
/// audit before the first key is destroyed, and one CRL covers them all.
fn kill_switch_revokes_all_before_destroying(backend: Backend) {
    let agents = (0..6)
        .map(|i| (format!("k{i}"), agent_toml("uid = 0", "")))
        .collect();
    let (bus, d) = on_bus(backend, agents);
    cli_ok(
        &bus,
        &d,
        &["agent", "revoke", "--all", "--reason", "incident", "--yes"],
    );
    let records = d.audit_records();
    let events: Vec<&str> = records
        .iter()
        .map(|r| r["event"].as_str().unwrap())
        .filter(|e| *e == "agent.revoked" || *e == "key.destroyed")
        .collect();
    assert_eq!(events.len(), 12, "{events:?}");
    assert!(
        events[..6].iter().all(|e| *e == "agent.revoked"),
        "every agent is revoked before any key is destroyed: {events:?}"
    );
    assert!(d.device_keys().is_empty());
    let e = token(
        &d,
        &TokenOptions {
            agent: Some("k3".into()),
            ..TokenOptions::new(AUD)
        },
    )
    .expect_err("revoked");
    assert_eq!(e.problem(), Some(ProblemType::AgentRevoked));
}

tessera_e2e::both_backends!(kill_switch_revokes_all_before_destroying);

/// The kill switch refuses from its call, not from the commit of its transaction (which takes
/// a while with thousands of agents): while that transaction waits on a registry another
/// process has locked, a token request is refused at once. Before, it waited at the issuance
/// gate and was served when the transaction failed. A kill switch whose transaction fails
/// revokes no one and leaves every agent served.
fn kill_switch_refuses_before_its_transaction_commits(backend: Backend) {
    let (bus, d) = on_bus(backend, vec![("k".into(), agent_toml("uid = 0", ""))]);
    let opts = TokenOptions {
        agent: Some("k".into()),
        ..TokenOptions::new(AUD)
    };
    token(&d, &opts).expect("token before the kill switch");
    let db = rusqlite::Connection::open(d.state_dir().join("registry.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let kill = std::thread::scope(|s| {
        let kill = s.spawn(|| {
            cli(
                &bus,
                &d,
                &["agent", "revoke", "--all", "--reason", "incident", "--yes"],
            )
        });
        // Until the kill switch gives up on the locked registry (5 s), a refusal must come.
        let refused = loop {
            match token(&d, &opts) {
                Err(e) => break Some(e),
                Ok(_) if kill.is_finished() => break None,
                Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let Some(e) = refused else {
            panic!(
                "served throughout a kill switch's transaction: {:?}",
                kill.join().unwrap()
            );
        };
        assert_eq!(e.problem(), Some(ProblemType::AgentRevoked), "{e}");
        // It gives up (SQLite's 5 s busy wait) while the registry is still locked.
        let kill = kill.join().unwrap();
        db.execute_batch("ROLLBACK").unwrap();
        kill
    });
    assert!(
        !kill.status.success(),
        "the kill switch cannot commit while the registry is locked"
    );
    assert!(
        !kill.stderr.is_empty(),
        "a failed kill switch says why: {kill:?}"
    );
    token(&d, &opts).expect("a kill switch that failed leaves the agent served");
    assert!(
        !d.audit_records()
            .iter()
            .any(|r| r["event"] == "agent.revoked"),
        "no one was revoked"
    );
    assert_eq!(d.device_keys().len(), 1, "no key was destroyed");
}

tessera_e2e::both_backends!(kill_switch_refuses_before_its_transaction_commits);

/// (Item 15) Lowering `tokens.max_ttl` applies to agents enrolled before; sub-second and fractional
/// TTLs are refused.
#[test]
fn lowered_global_max_ttl_applies_and_sub_second_ttls_are_refused() {
    let mut d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![("bot".into(), agent_toml("uid = 0", ""))],
            ..Default::default()
        },
    );
    let ttl = |t: &str| TokenOptions {
        ttl: Some(t.into()),
        ..TokenOptions::new(AUD)
    };
    token(&d, &ttl("10m")).expect("10m is within the agent's 15m");
    for bad in ["500ms", "1500ms", "0s"] {
        let e = token(&d, &ttl(bad)).expect_err(bad);
        assert_eq!(e.problem(), Some(ProblemType::TtlNotAllowed), "{bad}: {e}");
    }
    // The admin lowers the daemon's ceiling below the agent's own max_ttl.
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, format!("{cfg}\n[tokens]\nmax_ttl = \"5m\"\n")).unwrap();
    d.reload();
    let e = token(&d, &ttl("10m")).expect_err("10m is above the new ceiling");
    assert_eq!(e.problem(), Some(ProblemType::TtlNotAllowed), "{e}");
    let t = token(&d, &ttl("5m")).expect("5m");
    let c = tessera_e2e::jwt_claims(&t.token);
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 300);
    d.restart();
    token(&d, &ttl("10m")).expect_err("still refused after a restart");
}

/// (Item 16) `*` in an audience's host matches DNS label characters only.
#[test]
fn hostile_audiences_do_not_match_a_host_glob() {
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![("bot".into(), agent_toml("uid = 0", ""))],
            ..Default::default()
        },
    );
    token(&d, &TokenOptions::new("https://db.internal.example.com")).expect("a real host");
    // A host label the glob allows, but an audience too long to put in a token.
    let long = format!("https://{}.internal.example.com", "a".repeat(2000));
    let e = token(&d, &TokenOptions::new(&long)).expect_err("too long");
    assert_eq!(e.problem(), Some(ProblemType::MalformedRequest), "{e}");
    for bad in [
        "https://evil.test#.internal.example.com",
        "https://evil.test?.internal.example.com",
        "https://evil.test/.internal.example.com",
        "https://user@db.internal.example.com",
        "https://.internal.example.com",
        "https://a.b.internal.example.com",
    ] {
        let e = token(&d, &TokenOptions::new(bad)).expect_err(bad);
        assert_eq!(
            e.problem(),
            Some(ProblemType::AudienceNotAllowed),
            "{bad}: {e}"
        );
    }
}

/// A cgroup under the unified hierarchy, made with its missing parents and removed (only
/// what was made) on drop.
struct Cgroup {
    path: std::path::PathBuf,
    made: Vec<std::path::PathBuf>,
}

impl Cgroup {
    fn new(rel: &str) -> Cgroup {
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.join("cgroup.procs").exists())
            .expect("a cgroup v2 hierarchy");
        let mut path = root;
        let mut made = vec![];
        for c in rel.split('/').filter(|c| !c.is_empty()) {
            path.push(c);
            if !path.exists() {
                std::fs::create_dir(&path).expect("mkdir cgroup (needs root)");
                made.push(path.clone());
            }
        }
        Cgroup { path, made }
    }

    /// Run `exe ARGS` as `uid` inside this cgroup (moved there before it drops root).
    fn run_as(&self, uid: u32, exe: &std::path::Path, args: &[&std::ffi::OsStr]) -> Value {
        use std::os::unix::process::CommandExt;
        let procs = std::ffi::CString::new(
            self.path
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        let mut cmd = Command::new(exe);
        cmd.args(args);
        // SAFETY: between fork and exec only async-signal-safe calls (open, write, close,
        // setgid, setuid) on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                if libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().expect("run in cgroup");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("output: {out:?}"))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for p in self.made.iter().rev() {
            let _ = std::fs::remove_dir(p);
        }
    }
}

/// (Item 6) A `unit` selector names a system service: the same unit name inside a user's own
/// manager (what `systemd-run --user --unit=...` makes) is not it.
#[test]
fn unit_selectors_match_only_the_system_manager() {
    let bins = shared_tempdir();
    let helper = helper_copy(bins.path(), "bot", "");
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![(
                "victim".into(),
                agent_toml("uid = 65534\nunit = \"tessera-test-victim.service\"", ""),
            )],
            ..Default::default()
        },
    );
    let sock = d.socket.clone().into_os_string();
    let whoami = [sock.as_os_str(), std::ffi::OsStr::new("whoami")];
    let user = Cgroup::new(
        "user.slice/user-1000.slice/user@1000.service/app.slice/tessera-test-victim.service",
    );
    let spoof = user.run_as(65534, &helper, &whoami);
    assert_eq!(
        spoof["status"], 403,
        "a user unit is not the system unit: {spoof}"
    );
    let system = Cgroup::new("system.slice/tessera-test-victim.service");
    let real = system.run_as(65534, &helper, &whoami);
    assert_eq!(real["status"], 200, "{real}");
    assert_eq!(real["body"]["name"], "victim");
    // A cgroup a delegated service makes below itself does not rename it.
    let nested = Cgroup::new("system.slice/tessera-test-other.service/tessera-test-victim.service");
    let inner = nested.run_as(65534, &helper, &whoami);
    assert_eq!(inner["status"], 403, "{inner}");
    // A unit of a user's own manager cannot be selected at all.
    d.write_agent(
        "user-unit",
        &agent_toml(
            "uid = 65534\nunit = \"user@1000:tessera-test-victim.service\"",
            "",
        ),
    );
    // Nor an executable in a temporary directory (DESIGN: refused at enrolment).
    d.write_agent(
        "tmp-exe",
        &agent_toml("uid = 65534\nexe = \"/tmp/bot\"", ""),
    );
    d.write_agent(
        "dotdot-exe",
        &agent_toml("uid = 65534\nexe = \"/usr/../tmp/bot\"", ""),
    );
    d.reload();
    assert!(
        d.log_text()
            .contains("user-manager units cannot be selected"),
        "{}",
        d.log_text()
    );
    let log = d.log_text();
    assert!(log.contains("is under /tmp or /var/tmp"), "{log}");
    assert!(log.contains("must not contain '..'"), "{log}");
}

/// (Item 7) The caller is the process that sends: one that connected as root and then dropped to
/// another uid is refused, not taken for root.
#[test]
fn a_process_that_changed_uid_after_connecting_is_refused() {
    let bins = shared_tempdir();
    let helper = helper_copy(bins.path(), "dropper", "");
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![("root-bot".into(), agent_toml("uid = 0", ""))],
            ..Default::default()
        },
    );
    let ok = agentcall(&helper, 0, &d.socket, &["whoami"]);
    assert_eq!(ok["status"], 200, "{ok}");
    let out = Command::new(&helper)
        .arg(&d.socket)
        .args(["drop-then-whoami", "65534"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
    assert_eq!(v["status"], 403, "{v}");
    assert_eq!(
        v["body"]["type"], "urn:tessera:problem:unknown-caller",
        "{v}"
    );
}

/// (Item 8) The executable hash follows the file's content even when its owner restores the
/// modification time after rewriting it.
#[test]
fn exe_hash_follows_content_with_mtime_restored() {
    let bins = shared_tempdir();
    let good = helper_copy(bins.path(), "good", "salt-1");
    let evil = helper_copy(bins.path(), "evil", "salt-2");
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![(
                "pinned".into(),
                agent_toml(
                    &format!("uid = 0\nexe_sha256 = \"{}\"", sha256_file(&good)),
                    "",
                ),
            )],
            ..Default::default()
        },
    );
    let ok = agentcall(&good, 0, &d.socket, &["whoami"]);
    assert_eq!(ok["status"], 200, "{ok}");
    // Same inode, same size, other content, mtime put back.
    let mtime = std::fs::metadata(&good).unwrap().modified().unwrap();
    std::fs::write(&good, std::fs::read(&evil).unwrap()).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&good)
        .unwrap()
        .set_times(std::fs::FileTimes::new().set_modified(mtime))
        .unwrap();
    assert_eq!(std::fs::metadata(&good).unwrap().modified().unwrap(), mtime);
    let swapped = agentcall(&good, 0, &d.socket, &["whoami"]);
    assert_eq!(swapped["status"], 403, "rewritten executable: {swapped}");
}

/// (Item 23) The SDK percent-encodes query values: a value cannot add a parameter, and a
/// TTL with a space arrives whole.
#[test]
fn sdk_query_values_are_encoded() {
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![("bot".into(), agent_toml("uid = 0", ""))],
            ..Default::default()
        },
    );
    let rt = tessera_e2e::rt();
    let c = d.client();
    let smuggled = rt
        .block_on(c.certificate(&tessera::CertificateOptions {
            agent: Some("bot&ttl=999h".into()),
            ..Default::default()
        }))
        .expect_err("no agent has that name");
    assert_eq!(
        smuggled.problem(),
        Some(ProblemType::UnknownCaller),
        "the value stayed one value: {smuggled}"
    );
    let pem = rt
        .block_on(c.certificate(&tessera::CertificateOptions {
            ttl: Some("1m 30s".into()),
            agent: Some("bot".into()),
            ..Default::default()
        }))
        .expect("a TTL with a space");
    let dir = d.scratch_dir();
    let f = dir.join("c.pem");
    std::fs::write(&f, &pem).unwrap();
    let o = Command::new("openssl")
        .args(["x509", "-noout", "-startdate", "-enddate", "-in"])
        .arg(&f)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let when = |k: &str| {
        let v = text
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .to_string();
        let o = Command::new("date")
            .args(["-u", "+%s", "-d", &v])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse::<i64>()
            .unwrap()
    };
    assert_eq!(when("notAfter=") - when("notBefore="), 90, "{text}");
}

/// (Item 24) `trust_domain` follows the SPIFFE rules and validities have upper bounds.
#[test]
fn config_refuses_bad_trust_domains_and_validities() {
    let dir = shared_tempdir();
    for (what, extra) in [
        ("upper case", "trust_domain = \"Example.org\"\n"),
        ("a port", "trust_domain = \"example.org:8443\"\n"),
        (
            "a 1000-year CA",
            "[certificates]\nca_validity = \"1000years\"\n",
        ),
        (
            "a 1-year CRL",
            "[certificates]\ncrl_validity = \"365days\"\n",
        ),
    ] {
        let f = dir.path().join("t.toml");
        let body = if extra.starts_with('[') {
            format!("[backend]\nkind = \"tpm\"\n{extra}")
        } else {
            format!("{extra}[backend]\nkind = \"tpm\"\n")
        };
        std::fs::write(&f, body).unwrap();
        let o = Command::new(bin("tesserad"))
            .arg("--check-config")
            .arg(&f)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{what}: {o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("t.toml"),
            "{what}: {o:?}"
        );
    }
}

fn gdbus_as(bus: &TestBus, uid: u32, args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    Command::new("gdbus")
        .args(args)
        .args(["--system", "--dest", "org.tessera.Tessera1"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .uid(uid)
        .gid(uid)
        .output()
        .expect("gdbus")
}

/// DESIGN, callers and selectors: the bus names the process that connected to it, not the
/// sender, so over D-Bus only `uid`/`gid` agents are served; an agent with other selectors
/// gets `UseSocket` naming the socket, audited. (Before, a bus caller that was the enrolled
/// `exe` got that agent's token.)
#[test]
fn dbus_serves_only_uid_gid_agents() {
    let gdbus = std::fs::canonicalize("/usr/bin/gdbus").unwrap();
    let (bus, d) = on_bus(
        Backend::pkcs11(),
        vec![
            ("ids".into(), agent_toml("uid = 0", "")),
            (
                "pinned".into(),
                agent_toml(&format!("uid = 65534\nexe = \"{}\"", gdbus.display()), ""),
            ),
        ],
    );
    let get_token = |uid: u32| {
        gdbus_as(
            &bus,
            uid,
            &[
                "call",
                "--object-path",
                "/org/tessera/Tessera1",
                "--method",
                "org.tessera.Tessera1.Credentials.GetToken",
                AUD,
                "[]",
                "0",
            ],
        )
    };
    let ok = get_token(0);
    assert!(ok.status.success(), "a uid-only agent over D-Bus: {ok:?}");
    let refused = get_token(65534);
    assert!(!refused.status.success(), "{refused:?}");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("org.tessera.Tessera1.Error.UseSocket"),
        "{err}"
    );
    assert!(
        err.contains(d.socket.to_str().unwrap()),
        "names the socket: {err}"
    );
    assert!(
        events(&d, "access.denied")
            .iter()
            .any(|r| r["details"]["problem"] == "use-socket"),
        "the refusal is audited"
    );
}

/// (Item 17) Agent properties are for admins, checked by the daemon itself (an open bus),
/// and the shipped policy does not let others introspect agent object paths.
#[test]
fn agent_properties_and_paths_are_for_admins() {
    let agent_path = "/org/tessera/Tessera1/agent/bot";
    let get = [
        "call",
        "--object-path",
        agent_path,
        "--method",
        "org.freedesktop.DBus.Properties.Get",
        "org.tessera.Tessera1.Agent",
        "Selectors",
    ];
    {
        let bus = TestBus::start(BusPolicy::AllowAll);
        let _d = Daemon::start_with(
            Backend::pkcs11(),
            Options {
                bus: bus.address.clone(),
                agents: vec![("bot".into(), agent_toml("uid = 0", ""))],
                ..Default::default()
            },
        );
        let root = gdbus_as(&bus, 0, &get);
        assert!(root.status.success(), "{root:?}");
        let other = gdbus_as(&bus, 65534, &get);
        assert!(!other.status.success(), "{other:?}");
        assert!(
            String::from_utf8_lossy(&other.stderr).contains("AccessDenied"),
            "{other:?}"
        );
    }
    let bus = TestBus::start(BusPolicy::Shipped);
    let _d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            bus: bus.address.clone(),
            agents: vec![("bot".into(), agent_toml("uid = 0", ""))],
            ..Default::default()
        },
    );
    let introspect =
        |uid: u32, path: &str| gdbus_as(&bus, uid, &["introspect", "--object-path", path]);
    assert!(introspect(0, agent_path).status.success());
    assert!(introspect(65534, "/org/tessera/Tessera1").status.success());
    for path in [agent_path, "/org/tessera/Tessera1/agent"] {
        let o = introspect(65534, path);
        assert!(!o.status.success(), "{path}: {o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("AccessDenied"),
            "refused by the bus policy: {o:?}"
        );
    }
}

/// (Item 9) Slow bodies cannot hold every slot: 600 connections from one uid that announce a
/// body and never send it, and another agent still gets its token (within the deadline).
#[test]
fn slow_bodies_from_one_uid_do_not_starve_others() {
    use std::io::BufRead;
    let bins = shared_tempdir();
    let holder = helper_copy(bins.path(), "holder", "");
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            extra_config: "[limits]\nrequest_deadline = \"3s\"\n".into(),
            agents: vec![("bot".into(), agent_toml("uid = 0", ""))],
            ..Default::default()
        },
    );
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new(&holder)
            .arg(&d.socket)
            .args(["hold", "600", "6"])
            .uid(65534)
            .gid(65534)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let holding: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("{line}"));
    assert_eq!(holding["event"], "holding", "{holding}");
    assert!(
        holding["opened"].as_u64().unwrap() >= 500,
        "the slow connections were made: {holding}"
    );
    // Every slot the slow uid could take is taken now; another agent is still served.
    let rt = tessera_e2e::rt();
    let got = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(3),
            d.client().token(&TokenOptions::new(AUD)),
        )
        .await
    });
    let t = got
        .expect("served within the request deadline")
        .expect("a token");
    assert!(!t.token.is_empty());
    line.clear();
    out.read_line(&mut line).unwrap();
    let done: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("{line}"));
    child.wait().unwrap();
    // Over the cap closed at once, the rest at the deadline: none is still held.
    assert_eq!(done["closed"], done["opened"], "{done}");
}

/// (Item 21) The daemon refuses a state dir or socket dir that is not its own or that others
/// may write to (where another user could swap the socket or a key blob).
#[test]
fn state_and_socket_dirs_must_be_the_daemons_own() {
    use std::os::unix::fs::PermissionsExt;
    let backend = Backend::pkcs11();
    let run = |cfg: &std::path::Path| {
        let out = Command::new(bin("tesserad"))
            .arg("--config")
            .arg(cfg)
            .envs(backend.envs())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A state dir that belongs to somebody else.
    let dir = shared_tempdir();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    nix::unistd::chown(&state, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let cfg = tessera_e2e::devices::write_config(&backend, &state, "");
    let cfg_copy = dir.path().join("a.toml");
    std::fs::copy(&cfg, &cfg_copy).unwrap();
    let (code, err) = run(&cfg_copy);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("belongs to uid 65534"), "{err}");

    // A socket in a directory everyone may write to.
    let dir = shared_tempdir();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let cfg = tessera_e2e::devices::write_config(&backend, &state, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("socket = \"{}/agent.sock\"", state.display()),
        &format!("socket = \"{}/agent.sock\"", open.display()),
    );
    std::fs::write(&cfg, text).unwrap();
    let (code, err) = run(&cfg);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("writable by group or others"), "{err}");
    assert!(!open.join("agent.sock").exists());

    // A socket dir the daemon makes itself is 0755 and the socket 0666.
    let dir = shared_tempdir();
    let state = dir.path().join("state");
    let run_dir = dir.path().join("run/tessera");
    std::fs::create_dir(&state).unwrap();
    let cfg = tessera_e2e::devices::write_config(&backend, &state, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("socket = \"{}/agent.sock\"", state.display()),
        &format!("socket = \"{}/agent.sock\"", run_dir.display()),
    );
    std::fs::write(&cfg, text).unwrap();
    // Stopped even if an assertion below fails (a left-over daemon would hold the output).
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Stop(
        Command::new(bin("tesserad"))
            .arg("--config")
            .arg(&cfg)
            .envs(backend.envs())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let sock = run_dir.join("agent.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(std::time::Instant::now() < deadline, "daemon not up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&run_dir), 0o755);
    assert_eq!(mode(&sock), 0o666);
    // Any local user can reach it.
    let bins = shared_tempdir();
    let helper = helper_copy(bins.path(), "anyone", "");
    let health = agentcall(&helper, 65534, &sock, &["get", "/v1/health"]);
    assert_eq!(health["status"], 200, "{health}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.0.wait().unwrap().success());
}

/// The CRL number of a PEM CRL, read by openssl.
fn crl_number(d: &Daemon, pem: &str) -> u64 {
    let f = d
        .scratch_dir()
        .join(format!("crl-{}.pem", rand::random::<u32>()));
    std::fs::write(&f, pem).unwrap();
    let o = Command::new("openssl")
        .args(["crl", "-noout", "-crlnumber", "-in"])
        .arg(&f)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let hex = text
        .trim()
        .trim_start_matches("crlNumber=")
        .trim_start_matches("0x");
    u64::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("crl number in {text:?}"))
}

/// (Item 12) Any local user may fetch the CRL, but cannot make the host CA sign in a loop:
/// after a change, 32 concurrent fetches get one new CRL, signed once.
#[test]
fn concurrent_crl_fetches_sign_once() {
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![("bot".into(), agent_toml("uid = 0", ""))],
            ..Default::default()
        },
    );
    let rt = tessera_e2e::rt();
    let before = crl_number(&d, &rt.block_on(d.client().crl()).unwrap());
    // A change the CRL depends on: an agent enrolled (and revoked) moves the generation.
    d.write_agent("other", &agent_toml("uid = 4242", ""));
    d.reload();
    let pems: Vec<String> = rt.block_on(async {
        let mut tasks = vec![];
        for _ in 0..32 {
            let c = d.client();
            tasks.push(tokio::spawn(async move { c.crl().await.unwrap() }));
        }
        let mut out = vec![];
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let numbers: std::collections::BTreeSet<u64> = pems.iter().map(|p| crl_number(&d, p)).collect();
    assert_eq!(
        numbers.len(),
        1,
        "every fetch saw the same CRL: {numbers:?}"
    );
    let after = *numbers.iter().next().unwrap();
    assert_eq!(after, before + 1, "signed exactly once after the change");
    // Nothing changed since: more fetches sign nothing.
    let again = crl_number(&d, &rt.block_on(d.client().crl()).unwrap());
    assert_eq!(again, after);
}

/// (Item 11) Refusals cannot fill the disk: per uid only `refusal_audit_per_uid` a minute
/// are recorded one by one, the rest counted in one record; client text is capped; old audit
/// files go by `keep_files` while the chain still verifies.
#[test]
fn refusals_and_retention_bound_the_audit() {
    let mut d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            extra_config: "[limits]\nrefusal_audit_per_uid = 20\n[audit]\nrotate_bytes = 20000\nkeep_files = 2\ncheckpoint_every = 20\n".into(),
            agents: vec![("bot".into(), agent_toml("uid = 0", "rate = 1000000"))],
            ..Default::default()
        },
    );
    // Under the daemon's 1024-byte audience limit, far over the audit's 256-byte text cap.
    let huge = format!("https://{}.example.com", "a".repeat(980));
    let rt = tessera_e2e::rt();
    rt.block_on(async {
        let c = d.client();
        for i in 0..300 {
            let aud = if i == 0 {
                huge.clone()
            } else {
                format!("https://nope-{i}.example")
            };
            let e = c
                .token(&TokenOptions::new(&aud))
                .await
                .expect_err("not allowed");
            assert_eq!(e.problem(), Some(ProblemType::AudienceNotAllowed));
        }
    });
    // The stop records what was counted.
    d.stop();
    let denied = events(&d, "access.denied");
    assert!(
        !denied.is_empty() && denied.len() <= 25,
        "refusals recorded one by one: {}",
        denied.len()
    );
    // The ~1000-byte audience is kept as its first 256 bytes with its length and hash.
    let big = denied
        .iter()
        .find(|r| r["details"]["request"]["audience"]["len"].is_u64())
        .expect("the long audience's refusal is recorded");
    let aud = &big["details"]["request"]["audience"];
    assert_eq!(aud["len"], huge.len());
    assert!(aud["prefix"].as_str().unwrap().len() <= 256, "{aud}");
    assert_eq!(aud["sha256"].as_str().unwrap().len(), 64);
    let collapsed: u64 = events(&d, "access.denied.collapsed")
        .iter()
        .map(|r| r["details"]["count"].as_u64().unwrap())
        .sum();
    assert_eq!(
        collapsed as usize + denied.len(),
        300,
        "every refusal is in the audit, one by one or counted"
    );
    // Tokens keep being issued and audited one by one, and rotate the files; the oldest go.
    d.spawn();
    d.wait_ready();
    rt.block_on(async {
        let c = d.client();
        for _ in 0..300 {
            c.token(&TokenOptions::new(AUD)).await.expect("token");
        }
    });
    assert!(
        !events(&d, "audit.pruned").is_empty(),
        "old files were pruned"
    );
    let rotated = std::fs::read_dir(d.audit_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("audit-"))
        .count();
    assert!(rotated <= 2, "keep_files: {rotated}");
    let o = Command::new(bin("tessera"))
        .args(["audit", "verify"])
        .arg(d.audit_dir())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
}

/// (Item 5) Every request counts only from the process that connected, and only while it
/// has not exec'd since: connecting as one program and speaking as (or through) an enrolled
/// one is refused, and `exe` selectors compare the file, not the path.
#[test]
fn a_connection_cannot_be_lent_to_or_through_an_enrolled_program() {
    let bins = tessera_e2e::exe_dir();
    let enrolled = helper_copy(bins.path(), "enrolled", "salt-e");
    let attacker = helper_copy(bins.path(), "attacker", "salt-a");
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![(
                "pinned".into(),
                agent_toml(&format!("uid = 0\nexe = \"{}\"", enrolled.display()), ""),
            )],
            ..Default::default()
        },
    );
    let ok = agentcall(&enrolled, 0, &d.socket, &["whoami"]);
    assert_eq!(ok["status"], 200, "the enrolled program itself: {ok}");
    // A link to the enrolled file is the same file; a copy is not.
    let link = bins.path().join("link");
    std::fs::hard_link(&enrolled, &link).unwrap();
    assert_eq!(agentcall(&link, 0, &d.socket, &["whoami"])["status"], 200);
    let copy = helper_copy(bins.path(), "copy", "salt-e");
    assert_eq!(sha256_file(&copy), sha256_file(&enrolled));
    assert_eq!(agentcall(&copy, 0, &d.socket, &["whoami"])["status"], 403);

    let run = |mode: &str| -> Value {
        let out = Command::new(&attacker)
            .arg(&d.socket)
            .args([mode, enrolled.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .next()
            .unwrap_or_else(|| panic!("{mode}: {out:?}"));
        serde_json::from_str(line).unwrap()
    };
    // The connector becomes the enrolled program; its child speaks on the connection.
    let forked = run("fork-then-exec");
    assert_ne!(
        forked["status"], 200,
        "a child's bytes are not the connector's: {forked}"
    );
    // The connector execs the enrolled program, which speaks on the inherited connection.
    let execd = run("exec-self");
    assert_eq!(execd["status"], 403, "exec'd since it connected: {execd}");
    // And the attempt is in the audit.
    assert!(
        events(&d, "access.denied")
            .iter()
            .any(|r| r["details"]["reason"]
                .as_str()
                .is_some_and(|t| t.contains("executed another program"))),
        "the exec trick is audited"
    );
}

/// (Item 10) An executable is read only for an agent that pins it by hash, and never past
/// `max_exe_bytes`: callers that need no hash are served without their executable being read.
#[test]
fn executables_are_hashed_lazily_and_within_bounds() {
    let bins = tessera_e2e::exe_dir();
    let plain = helper_copy(bins.path(), "plain", "p");
    let pinned = helper_copy(bins.path(), "pinned", "q");
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            extra_config: "[limits]\nmax_exe_bytes = 1048576\n".into(),
            agents: vec![
                (
                    "plain".into(),
                    agent_toml(&format!("uid = 0\nexe = \"{}\"", plain.display()), ""),
                ),
                (
                    "pinned".into(),
                    agent_toml(
                        &format!("uid = 0\nexe_sha256 = \"{}\"", sha256_file(&pinned)),
                        "",
                    ),
                ),
            ],
            ..Default::default()
        },
    );
    assert!(std::fs::metadata(&pinned).unwrap().len() > 1048576);
    let ok = agentcall(&plain, 0, &d.socket, &["token", AUD]);
    assert_eq!(ok["status"], 200, "{ok}");
    let issued = events(&d, "token.issued");
    assert_eq!(issued.len(), 1);
    assert!(
        issued[0]["caller"]["exe_sha256"].is_null(),
        "the plain agent's executable was not hashed: {}",
        issued[0]
    );
    // Over the size limit the file is not read, so the hash-pinned agent cannot match.
    let big = agentcall(&pinned, 0, &d.socket, &["whoami"]);
    assert_eq!(big["status"], 403, "{big}");
}

/// Undoes `chattr +i` on drop, so a failing test leaves no immutable directory behind.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(p: &std::path::Path) -> Immutable {
        let o = Command::new("chattr").arg("+i").arg(p).output().unwrap();
        assert!(o.status.success(), "chattr +i: {o:?}");
        Immutable(p.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).output();
    }
}

/// (Item 3) A key whose destruction failed at revocation is destroyed in the background as
/// soon as it can be, without a restart; the admin is told, and the audit says so.
#[test]
fn failed_key_destruction_is_retried_until_the_key_is_gone() {
    let (bus, d) = on_bus(
        Backend::tpm(),
        vec![("bot".into(), agent_toml("uid = 0", ""))],
    );
    assert_eq!(d.device_keys().len(), 1);
    let keys = d.state_dir().join("tpm/keys");
    let lock = Immutable::set(&keys);
    let o = cli(
        &bus,
        &d,
        &["agent", "revoke", "bot", "--reason", "rotation"],
    );
    assert!(!o.status.success(), "the admin sees the failure: {o:?}");
    // The revocation itself stands.
    let e = token(&d, &TokenOptions::new(AUD)).expect_err("revoked");
    assert_eq!(e.problem(), Some(ProblemType::AgentRevoked));
    assert_eq!(d.device_keys().len(), 1, "the key could not go yet");
    assert!(!events(&d, "key.destroy_failed").is_empty());
    // `agent show` tells the admin the key is still to go.
    let o = cli(&bus, &d, &["--json", "agent", "show", "bot"]);
    assert!(o.status.success(), "{o:?}");
    let shown: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown["KeyState"], "destroy-pending", "{shown}");
    assert_eq!(shown["Status"], "revoked", "{shown}");
    drop(lock);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    // The key goes, then its record: wait for both.
    while !d.device_keys().is_empty() || events(&d, "key.destroyed").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "key still there without a restart:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let destroyed = events(&d, "key.destroyed");
    assert_eq!(destroyed.len(), 1, "{destroyed:?}");
    assert_eq!(destroyed[0]["details"]["retried"], true);
    // Once the key is gone the revoked agent's object goes too.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cli(&bus, &d, &["agent", "show", "bot"]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "revoked agent still shown"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Records of `event` in the daemon's audit.
fn events(d: &Daemon, event: &str) -> Vec<Value> {
    d.audit_records()
        .into_iter()
        .filter(|r| r["event"] == event)
        .collect()
}
