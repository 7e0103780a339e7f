//! The fault matrix (device and disk failures): each gives a clear refusal or a clear start-up
//! error, never a panic, and recovery where recovery is possible, without a restart. The crash
//! points are in fault_points.rs; SIGTERM under load is in shutdown.rs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tessera::{ProblemType, TokenOptions};
use tessera_e2e::daemon::Options;
use tessera_e2e::{rt, Backend, Daemon};

const AUD: &str = "https://api.example.com";

fn agent() -> (String, String) {
    let uid = nix::unistd::getuid().as_raw();
    (
        "worker".into(),
        // No rate limit in the way: refusals here must come from the fault alone.
        format!(
            "[selectors]\nuid = {uid}\n[policy]\naudiences = [\"{AUD}\"]\nscopes = [\"read\"]\nrate = 1000000\n"
        ),
    )
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A mount that goes away with the test (lazily, so an open file cannot keep it).
struct Mount(PathBuf);

impl Mount {
    /// A tmpfs of `size` on `dir` (root only: CI runs the suite as root).
    fn tmpfs(dir: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir));
        Mount(dir.to_path_buf())
    }

    /// `dir` bound onto itself, read-only.
    fn read_only(dir: &Path) -> Mount {
        run(Command::new("mount").args(["--bind"]).arg(dir).arg(dir));
        let m = Mount(dir.to_path_buf());
        run(Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(dir));
        m
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn audit_verify(dir: &Path) {
    let (code, out) = tessera_e2e::audit_verify(dir);
    assert_eq!(code, Some(0), "audit verify: {out}");
}

/// Tokens the trail says were issued.
fn issued_in_trail(d: &Daemon) -> usize {
    d.audit_records()
        .iter()
        .filter(|r| r["event"] == "token.issued")
        .count()
}

/// A refusal of `kind`: 503 with Retry-After (the device or disk may come back).
fn assert_unavailable(e: &tessera::Error, kind: ProblemType) {
    assert_eq!(e.problem(), Some(kind), "{e}");
    let tessera::Error::Problem(p) = e else {
        panic!("not a problem: {e}")
    };
    assert_eq!(p.status, 503, "{e}");
    assert!(p.retry_after.is_some(), "503 without Retry-After: {e}");
}

/// Options with the one agent these tests use.
fn with_agent() -> Options {
    Options {
        agents: vec![agent()],
        ..Default::default()
    }
}

fn no_panic(d: &Daemon) {
    let log = d.log_text();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
}

/// Fill the filesystem of `dir` until a write fails with ENOSPC; the filler is returned.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 4096];
    loop {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    let _ = f.sync_all();
    filler
}

/// The audit trail's filesystem fills up: tokens are refused with `audit_unavailable` (503,
/// Retry-After), nothing torn is left in the trail, and issuance resumes by itself once space
/// is freed. The trail verifies and holds exactly the tokens delivered.
#[test]
fn a_full_audit_filesystem_refuses_then_recovers() {
    let mut d = Daemon::prepare(Backend::pkcs11(), with_agent());
    let _mount = Mount::tmpfs(&d.audit_dir(), "512k");
    d.spawn();
    d.wait_ready();
    let mut delivered = 0;
    rt().block_on(async {
        let c = d.client();
        c.token(&TokenOptions::new(AUD)).await.unwrap();
        delivered += 1;
        let filler = fill(&d.audit_dir());
        // The trail's last page may still have room for a few records: those tokens are
        // audited and delivered. Then every request is refused.
        let mut refused = 0;
        for _ in 0..40 {
            if refused == 5 {
                break;
            }
            let e = match c.token(&TokenOptions::new(AUD)).await {
                Ok(_) if refused == 0 => {
                    delivered += 1;
                    continue;
                }
                Ok(_) => panic!("a token between refusals while the filesystem is full"),
                Err(e) => e,
            };
            refused += 1;
            assert_unavailable(&e, ProblemType::AuditUnavailable);
        }
        assert_eq!(refused, 5, "tokens kept coming on a full filesystem");
        std::fs::remove_file(filler).unwrap();
        // Recovery without a restart: the next request after the space is back succeeds.
        let mut ok = false;
        for _ in 0..50 {
            if c.token(&TokenOptions::new(AUD)).await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "issuance did not resume:\n{}", d.log_text());
        delivered += 1;
    });
    d.stop();
    no_panic(&d);
    audit_verify(&d.audit_dir());
    assert_eq!(
        issued_in_trail(&d),
        delivered,
        "every delivered token, and only those"
    );
    // A restart finds no torn tail to repair.
    d.spawn();
    d.wait_ready();
    d.stop();
    assert!(
        !d.audit_records()
            .iter()
            .any(|r| r["event"] == "audit.tail_recovered"),
        "the full filesystem left a torn record"
    );
}

/// A state dir on a read-only mount: the daemon refuses to start with a message naming it,
/// exits non-zero (systemd restarts it), and starts normally once the mount is writable.
fn read_only_state_dir_at_start(backend: Backend) {
    let mut d = Daemon::start_with(backend, with_agent());
    d.stop();
    // The daemon's log cannot live in a read-only state dir.
    let logs = tempfile::tempdir().unwrap();
    d.log = logs.path().join("tesserad.log");
    let state = d.state_dir().to_path_buf();
    {
        let _ro = Mount::read_only(&state);
        d.spawn();
        let st = d.wait_exit(Duration::from_secs(30));
        assert!(!st.success(), "started on a read-only state dir");
        assert_eq!(st.code(), Some(1), "{st}: {}", d.log_text());
        let log = d.log_text();
        assert!(
            log.contains("is not writable") && log.contains(&state.display().to_string()),
            "the error does not name the state dir:\n{log}"
        );
    }
    no_panic(&d);
    d.spawn();
    d.wait_ready();
    rt().block_on(async {
        d.client().token(&TokenOptions::new(AUD)).await.unwrap();
    });
    d.stop();
    audit_verify(&d.audit_dir());
}

tessera_e2e::both_backends!(read_only_state_dir_at_start);

/// The TPM is gone when the daemon starts: a clear error naming the TPM and a non-zero exit,
/// quickly (systemd's restart policy retries), and nothing written that a later start trips on.
#[test]
fn a_missing_tpm_at_start_is_a_clear_error() {
    let mut d = Daemon::prepare(Backend::tpm(), with_agent());
    let Backend::Tpm(tpm) = &mut d.backend else {
        unreachable!()
    };
    let port = tpm.port;
    tpm.kill9();
    d.spawn();
    let st = d.wait_exit(Duration::from_secs(60));
    assert_eq!(st.code(), Some(1), "{st}");
    no_panic(&d);
    let log = d.log_text();
    assert!(
        log.contains("cannot open TPM at") && log.contains(&port.to_string()),
        "the error does not name the TPM and where it was looked for:\n{log}"
    );
    assert!(
        !d.audit_dir().join("audit.log").exists()
            || d.audit_records()
                .iter()
                .all(|r| r["event"] != "agent.enrolled"),
        "an agent was enrolled without a device"
    );
}

/// swtpm is killed -9 while agents ask for tokens, then comes back: meanwhile every answer is a
/// token or `backend_unavailable` (503, Retry-After), never anything else; once the TPM is back
/// the daemon reconnects by itself (no restart) and the same keys sign again. Every delivered
/// token is in a trail that verifies.
#[test]
fn a_tpm_killed_mid_request_and_restarted_is_reconnected() {
    let mut d = Daemon::start_with(Backend::tpm(), with_agent());
    let keys = d.device_keys();
    let delivered = std::sync::atomic::AtomicUsize::new(0);
    let unavailable = std::sync::atomic::AtomicUsize::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let socket = d.socket.clone();
    /// Stops the clients however the scope ends: a panic in the TPM juggling below must not
    /// leave them asking forever (the scope would wait for them).
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                rt().block_on(async {
                    let c = tessera::Client::with_socket(&socket);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        match c.token(&TokenOptions::new(AUD)).await {
                            Ok(_) => {
                                delivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(e) => {
                                assert_unavailable(&e, ProblemType::BackendUnavailable);
                                unavailable.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                })
            });
        }
        let _stop = StopOnDrop(&stop);
        let Backend::Tpm(tpm) = &mut d.backend else {
            unreachable!()
        };
        std::thread::sleep(Duration::from_millis(300));
        tpm.kill9();
        std::thread::sleep(Duration::from_millis(500));
        tpm.restart();
        std::thread::sleep(Duration::from_millis(300));
    });
    assert!(
        unavailable.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no request saw the TPM gone"
    );
    // Back without a restart: the same key signs, and the token verifies with the JWKS.
    rt().block_on(async {
        let c = d.client();
        let mut token = None;
        for _ in 0..50 {
            match c.token(&TokenOptions::new(AUD)).await {
                Ok(t) => {
                    token = Some(t);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let t =
            token.unwrap_or_else(|| panic!("no token after the TPM came back:\n{}", d.log_text()));
        delivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let jwks = c.jwks().await.unwrap();
        tessera::verify::verify(&t.token, &jwks, &tessera::verify::Options::new(AUD)).unwrap();
    });
    assert_eq!(d.device_keys(), keys, "the same keys, none lost or added");
    d.stop();
    no_panic(&d);
    audit_verify(&d.audit_dir());
    assert_eq!(
        issued_in_trail(&d),
        delivered.load(std::sync::atomic::Ordering::Relaxed),
        "every delivered token, and only those, is in the trail"
    );
}

/// The SoftHSM token directory becomes unreadable (an empty filesystem mounted over it, as a
/// lost mount or a broken disk would leave it), then comes back. Meanwhile tokens are refused
/// with `backend_unavailable` (503, Retry-After) and nothing is destroyed or revoked because of
/// it. SoftHSM reads its token directory at C_Initialize only, so the key is usable again after
/// a restart of the daemon (systemd: `systemctl restart tesserad`), the same key.
#[test]
fn an_unreadable_softhsm_token_dir_refuses_and_destroys_nothing() {
    let mut d = Daemon::start_with(Backend::pkcs11(), with_agent());
    let keys = d.device_keys();
    let Backend::Pkcs11(hsm) = &d.backend else {
        unreachable!()
    };
    let tokens = hsm.dir.path().join("tokens");
    let before = rt().block_on(async {
        let c = d.client();
        c.token(&TokenOptions::new(AUD)).await.unwrap();
        let _gone = Mount::tmpfs(&tokens, "1m");
        for _ in 0..3 {
            let e = c
                .token(&TokenOptions::new(AUD))
                .await
                .expect_err("a token while the token directory is gone");
            assert_unavailable(&e, ProblemType::BackendUnavailable);
        }
        c.whoami().await.unwrap()
    });
    assert_eq!(d.device_keys(), keys, "nothing destroyed");
    d.restart();
    rt().block_on(async {
        let c = d.client();
        c.token(&TokenOptions::new(AUD)).await.unwrap();
        let after = c.whoami().await.unwrap();
        assert_eq!(before.key_id, after.key_id, "the same key");
        assert_eq!(after.status, "active");
    });
    d.stop();
    no_panic(&d);
    assert!(
        !d.audit_records().iter().any(|r| r["event"]
            .as_str()
            .unwrap_or("")
            .starts_with("agent.revoked")),
        "an agent was revoked because its device was unreadable"
    );
    audit_verify(&d.audit_dir());
}

/// `chattr +i` (immutable, so even root cannot write) on the registry and its WAL files, or
/// lifts it.
fn registry_immutable(d: &Daemon, on: bool) {
    for name in ["registry.db", "registry.db-wal", "registry.db-shm"] {
        let path = d.state_dir().join(name);
        if path.exists() {
            run(Command::new("chattr")
                .arg(if on { "+i" } else { "-i" })
                .arg(&path));
        }
    }
}

/// The registry cannot be written: admin changes fail with a clear error (a D-Bus error, a CLI
/// message and a non-zero exit) and change nothing (no key created for a refused enrolment,
/// no key destroyed for a refused revocation); agents already enrolled keep working; once the
/// registry is writable the same commands succeed, without a restart.
#[test]
fn a_read_only_registry_refuses_admin_changes_and_recovers() {
    let bus = tessera_e2e::bus::TestBus::start(tessera_e2e::bus::BusPolicy::AllowAll);
    let mut d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            bus: bus.address.clone(),
            ..with_agent()
        },
    );
    let tessera = |args: &[&str]| d.cli_on_bus(&bus.address, args);
    let keys = d.device_keys();
    registry_immutable(&d, true);
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let enroll = [
            "agent",
            "enroll",
            "second",
            "--uid",
            "4242",
            "--audience",
            AUD,
        ];
        let o = tessera(&enroll);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "enrolled with a read-only registry");
        assert!(
            err.to_lowercase().contains("registry"),
            "unclear error: {err}"
        );
        let o = tessera(&["agent", "revoke", "worker", "--reason", "test"]);
        assert!(!o.status.success(), "revoked with a read-only registry");
        assert_eq!(d.device_keys(), keys, "a key created or destroyed anyway");
        // The agent already enrolled still gets tokens (reading needs no write).
        rt().block_on(async {
            d.client().token(&TokenOptions::new(AUD)).await.unwrap();
        });
    }));
    registry_immutable(&d, false);
    if let Err(p) = refused {
        std::panic::resume_unwind(p);
    }
    let o = tessera(&[
        "agent",
        "enroll",
        "second",
        "--uid",
        "4242",
        "--audience",
        AUD,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = tessera(&["agent", "revoke", "worker", "--reason", "test"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    rt().block_on(async {
        assert!(d.client().token(&TokenOptions::new(AUD)).await.is_err());
    });
    d.stop();
    no_panic(&d);
    audit_verify(&d.audit_dir());
}
