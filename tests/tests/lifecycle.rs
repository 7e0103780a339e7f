//! Start-up, declarative agents and crash safety of enrolment, on the real daemon.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tessera::{ProblemType, TokenOptions};
use tessera_e2e::daemon::Options;
use tessera_e2e::devices::write_config;
use tessera_e2e::{bin, shared_tempdir, Backend, Daemon};

const AUD: &str = "https://api.example.com";

fn agent(uid: u32, scopes: &str) -> String {
    format!("[selectors]\nuid = {uid}\n[policy]\naudiences = [\"{AUD}\"]\nscopes = [{scopes}]\n")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn start_failure(backend: &Backend, cfg: &std::path::Path) -> (Option<i32>, String) {
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
}

#[test]
fn bad_setup_exits_with_a_clear_error() {
    let hsm = Backend::pkcs11();
    let dir = shared_tempdir();
    let cfg = write_config(&hsm, dir.path(), "");
    let Backend::Pkcs11(h) = &hsm else {
        unreachable!()
    };
    std::fs::write(&h.pin_file, "99999999").unwrap();
    let (code, err) = start_failure(&hsm, &cfg);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("wrong PIN"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    std::fs::write(&h.pin_file, tessera_e2e::devices::USER_PIN).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("token_label = \"tessera\"", "token_label = \"missing\""),
    )
    .unwrap();
    let (code, err) = start_failure(&hsm, &cfg);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("token with label \"missing\" not found"),
        "{err}"
    );

    let tpm_cfg = dir.path().join("tpm.toml");
    std::fs::write(
        &tpm_cfg,
        format!(
            "state_dir = \"{}/s2\"\nsocket = \"{}/s2.sock\"\n[backend]\nkind = \"tpm\"\ntcti = \"swtpm:host=127.0.0.1,port=9\"\n[dbus]\nbus = \"none\"\n",
            dir.path().display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let (code, err) = start_failure(&hsm, &tpm_cfg);
    assert_eq!(code, Some(1));
    assert!(err.contains("device unavailable"), "{err}");

    // A state dir that cannot be created or written (a regular file is in the way).
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, "").unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            &format!("state_dir = \"{}\"", dir.path().display()),
            &format!("state_dir = \"{}/state\"", blocker.display()),
        ),
    )
    .unwrap();
    let (code, err) = start_failure(&hsm, &cfg);
    assert_eq!(code, Some(1));
    assert!(err.contains("state dir"), "{err}");

    // Unknown config key: named, exit 2; --check-config says the same.
    std::fs::write(&cfg, format!("{text}\nsokcet = 1\n")).unwrap();
    let (code, err) = start_failure(&hsm, &cfg);
    assert_eq!(code, Some(2));
    assert!(err.contains("sokcet"), "{err}");
    let out = Command::new(bin("tesserad"))
        .arg("--check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    std::fs::write(&cfg, &text).unwrap();
    let out = Command::new(bin("tesserad"))
        .arg("--check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success());
}

fn agents_dir_enrols_updates_revokes_and_reports_bad_files(backend: Backend) {
    let mut d = Daemon::start_with(
        backend,
        Options {
            agents: vec![("keep".into(), agent(0, "\"read\""))],
            ..Default::default()
        },
    );
    let c = d.client();
    let kid_before = rt().block_on(c.whoami()).unwrap().key_id;
    assert!(rt()
        .block_on(c.token(&TokenOptions::new(AUD).scope("write")))
        .is_err());

    // Changed file: same key, new policy. Bad file: reported by name and line, changes nothing.
    d.write_agent("keep", &agent(0, "\"read\", \"write\""));
    d.write_agent(
        "broken",
        "[selectors]\nuid = 0\n[policy]\naudiences = [\"x\"]\nbogus = 1\n",
    );
    d.reload();
    let who = rt().block_on(c.whoami()).unwrap();
    assert_eq!(who.key_id, kid_before, "update keeps the key");
    rt().block_on(c.token(&TokenOptions::new(AUD).scope("write")))
        .expect("updated policy applies");
    let log = d.log_text();
    assert!(
        log.contains("broken.toml:5"),
        "bad file named with its line: {log}"
    );
    assert!(log.contains("bogus"), "{log}");

    // Breaking an existing agent's file leaves the agent as it was.
    d.write_agent("keep", "[selectors]\nuid = 0\n[policy\n");
    d.reload();
    rt().block_on(c.token(&TokenOptions::new(AUD).scope("write")))
        .expect("agent unchanged by a bad file");

    // Removing the file revokes and destroys the key; the device holds no agent key after.
    std::fs::remove_file(d.agents_dir().join("keep.toml")).unwrap();
    std::fs::remove_file(d.agents_dir().join("broken.toml")).unwrap();
    d.reload();
    let err = rt().block_on(c.token(&TokenOptions::new(AUD))).unwrap_err();
    assert_eq!(err.problem(), Some(ProblemType::AgentRevoked));
    assert_eq!(
        rt().block_on(c.jwks()).unwrap()["keys"],
        serde_json::json!([])
    );
    d.stop();
    assert!(d.device_keys().is_empty(), "no key left in the device");
    // And it stays revoked across a restart; a new file with the name enrols a new key.
    d.write_agent("keep", &agent(0, "\"read\""));
    d.restart();
    let who2 = rt().block_on(c.whoami()).unwrap();
    assert_ne!(who2.key_id, kid_before, "re-enrolled with a new key");
}

tessera_e2e::both_backends!(agents_dir_enrols_updates_revokes_and_reports_bad_files);

/// Kill -9 at each enrolment crash point; after restart the agent is wholly there or not at
/// all and no orphan key is left in the device.
fn crash_during_enrolment_leaves_no_orphan(backend: Backend, point: &str) {
    let mut d = Daemon::start(backend);
    d.stop();
    d.write_agent("crashy", &agent(0, ""));
    d.crash_at(point);
    // What the crash left: a pending record, maybe a key.
    let keys_after_crash = d.device_keys();
    if point == "enroll-after-key" {
        assert_eq!(
            keys_after_crash.len(),
            1,
            "the key was made before the crash"
        );
    }
    d.spawn();
    d.wait_ready();
    // Repaired and re-enrolled from the file: exactly one key, the agent's, and it works.
    let who = rt().block_on(d.client().whoami()).unwrap();
    assert_eq!(who.name, "crashy");
    rt().block_on(d.client().token(&TokenOptions::new(AUD)))
        .unwrap();
    d.stop();
    let keys = d.device_keys();
    assert_eq!(keys.len(), 1, "exactly the live agent's key: {keys:?}");
    for k in &keys_after_crash {
        assert!(
            !keys.contains(k),
            "the interrupted enrolment's key {k} was destroyed"
        );
    }
    let rolled: Vec<Value> = d
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "agent.enroll_rolled_back")
        .collect();
    assert_eq!(rolled.len(), 1);
}

#[test]
fn tpm_crash_after_enrol_record() {
    crash_during_enrolment_leaves_no_orphan(Backend::tpm(), "enroll-after-record");
}
#[test]
fn tpm_crash_after_enrol_key() {
    crash_during_enrolment_leaves_no_orphan(Backend::tpm(), "enroll-after-key");
}
#[test]
fn pkcs11_crash_after_enrol_record() {
    crash_during_enrolment_leaves_no_orphan(Backend::pkcs11(), "enroll-after-record");
}
#[test]
fn pkcs11_crash_after_enrol_key() {
    crash_during_enrolment_leaves_no_orphan(Backend::pkcs11(), "enroll-after-key");
}

/// The registry carries its schema version (`PRAGMA user_version`); state written by a newer
/// tesserad is refused with a clear message and left byte for byte as it was, and the same
/// state at the version this daemon knows starts as before.
#[test]
fn a_newer_registry_is_refused_and_left_unchanged() {
    use sha2::{Digest, Sha256};
    // This tree's schema version (daemon/src/agents/registry/schema.rs SCHEMA_VERSION).
    const CURRENT: i64 = 1;
    let mut d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![("bot".into(), agent(0, "\"read\""))],
            ..Default::default()
        },
    );
    let before = rt().block_on(d.client().whoami_agent(Some("bot"))).unwrap();
    d.stop();
    let db = d.state_dir().join("registry.db");
    let version = |db: &std::path::Path| -> i64 {
        let c = rusqlite::Connection::open(db).unwrap();
        c.pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap()
    };
    assert_eq!(version(&db), CURRENT);
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.pragma_update(None, "user_version", CURRENT + 1).unwrap();
        // Everything in the main file, so "unchanged" is one file's bytes.
        c.pragma_update(None, "wal_checkpoint", "TRUNCATE").unwrap();
    }
    let digest = |p: &std::path::Path| hex::encode(Sha256::digest(std::fs::read(p).unwrap()));
    let bytes = digest(&db);
    d.spawn();
    let status = d.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{}", d.log_text());
    let log = d.log_text();
    assert!(
        log.contains("written by a newer tesserad")
            && log.contains(&format!("schema version {}", CURRENT + 1)),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(digest(&db), bytes, "the newer registry was changed");
    assert_eq!(version(&db), CURRENT + 1);
    // Back at this daemon's version: it starts and the agent (same key) is there.
    rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_update(None, "user_version", CURRENT)
        .unwrap();
    d.spawn();
    d.wait_ready();
    let after = rt().block_on(d.client().whoami_agent(Some("bot"))).unwrap();
    assert_eq!(after.key_id, before.key_id);
}
