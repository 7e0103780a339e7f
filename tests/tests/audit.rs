//! The audit trail: every token and refusal recorded, tampering detected by `tessera audit
//! verify`, no token without a record, and a verifiable chain after kill -9 under load.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tessera::{ProblemType, TokenOptions};
use tessera_e2e::daemon::Options;
use tessera_e2e::{audit_verify, bin, shared_tempdir, Backend, Daemon};

const AUD: &str = "https://api.example.com";

fn agent() -> (String, String) {
    (
        "auditee".into(),
        format!("[selectors]\nuid = 0\n[policy]\naudiences = [\"{AUD}\"]\nrate = 1000000\n"),
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(p: &Path, l: &[String]) {
    std::fs::write(p, l.join("\n") + "\n").unwrap();
}

#[test]
fn tampering_is_detected_and_named_by_seq() {
    let mut d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![agent()],
            ..Default::default()
        },
    );
    let jti = rt().block_on(async {
        let c = d.client();
        let mut last = String::new();
        for _ in 0..4 {
            last = c.token(&TokenOptions::new(AUD)).await.unwrap().token;
        }
        let _ = c.token(&TokenOptions::new("https://denied.example")).await;
        last
    });
    d.stop();
    let (code, out) = audit_verify(&d.audit_dir());
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("intact"), "{out}");

    // "Which process got token X?" in one command.
    let claims: Value = {
        use base64::Engine;
        let payload = jti.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    let out = Command::new(bin("tessera"))
        .args(["--json", "audit", "tail"])
        .arg(d.audit_dir())
        .args(["--jti", claims["jti"].as_str().unwrap()])
        .output()
        .unwrap();
    let rec: Value = serde_json::from_slice(&out.stdout).expect("one JSON record");
    // A jti may start with '-' (base64url): the CLI takes it as a value, not a flag.
    let out = Command::new(bin("tessera"))
        .args(["--json", "audit", "tail"])
        .arg(d.audit_dir())
        .args(["--jti", "-no-such-jti"])
        .output()
        .unwrap();
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
    assert_eq!(rec["caller"]["pid"], std::process::id());
    assert_eq!(rec["event"], "token.issued");

    let orig = lines(&d.audit_dir().join("audit.log"));
    assert!(orig.len() >= 8);
    let scratch = shared_tempdir();
    let file = scratch.path().join("audit.log");
    let check = |l: Vec<String>, want_seq: u64, what: &str| {
        write_lines(&file, &l);
        let (code, out) = audit_verify(scratch.path());
        assert_eq!(code, Some(5), "{what} not detected: {out}");
        assert!(
            out.contains(&format!("at seq {want_seq} ")),
            "{what}: {out}"
        );
    };
    // Edit one field of record 4.
    let mut l = orig.clone();
    l[3] = l[3].replacen("\"uid\":0", "\"uid\":1000", 1);
    assert_ne!(l[3], orig[3]);
    check(l, 4, "edited field");
    // Delete record 4.
    let mut l = orig.clone();
    l.remove(3);
    check(l, 4, "deleted line");
    // Swap records 4 and 5.
    let mut l = orig.clone();
    l.swap(3, 4);
    check(l, 4, "swapped lines");
    // Insert a forged record after 3 whose own hash is right: the chain breaks at the next one.
    let mut l = orig.clone();
    let mut forged: Value = serde_json::from_str(&orig[3]).unwrap();
    forged["details"]["jti"] = Value::String("forged".into());
    forged["hash"] = Value::String(tesserad::audit::record_hash(&forged));
    l.insert(3, tesserad::audit::canonical(&forged));
    check(l, 5, "inserted line");
    // Remove the first record.
    let mut l = orig.clone();
    l.remove(0);
    check(l, 1, "removed head");
}

#[test]
fn no_token_without_an_audit_record() {
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![agent()],
            ..Default::default()
        },
    );
    let log = d.audit_dir().join("audit.log");
    let chattr = |flag: &str| {
        let st = Command::new("chattr")
            .arg(flag)
            .arg(&log)
            .status()
            .expect("chattr (e2fsprogs)");
        assert!(
            st.success(),
            "chattr {flag} must work on the test filesystem"
        );
    };
    rt().block_on(async {
        let c = d.client();
        c.token(&TokenOptions::new(AUD)).await.unwrap();
        chattr("+i");
        let r = c.token(&TokenOptions::new(AUD)).await;
        chattr("-i");
        let e = r.expect_err("no token while the audit cannot be written");
        assert_eq!(e.problem(), Some(ProblemType::AuditUnavailable));
        match &e {
            tessera::Error::Problem(p) => {
                assert_eq!(p.status, 503);
                assert!(p.retry_after.is_some());
            }
            other => panic!("{other}"),
        }
        // Fixed: issuance resumes and the chain still verifies.
        c.token(&TokenOptions::new(AUD)).await.unwrap();
    });
    let (code, out) = audit_verify(&d.audit_dir());
    assert_eq!(code, Some(0), "{out}");
    let issued = d
        .audit_records()
        .iter()
        .filter(|r| r["event"] == "token.issued")
        .count();
    assert_eq!(issued, 2);
}

fn kill9_under_load_keeps_every_delivered_token_in_a_verifiable_log(backend: Backend) {
    let mut d = Daemon::start_with(
        backend,
        Options {
            agents: vec![agent()],
            ..Default::default()
        },
    );
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let ended: Arc<Mutex<Vec<String>>> = Arc::default();
    let runtime = rt();
    runtime.block_on(async {
        let mut tasks = vec![];
        for _ in 0..8 {
            let c = d.client();
            let got = got.clone();
            let ended = ended.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    match c.token(&TokenOptions::new(AUD)).await {
                        Ok(t) => got.lock().unwrap().push(t.token),
                        Err(e) => {
                            ended.lock().unwrap().push(e.to_string());
                            break;
                        }
                    }
                }
            }));
        }
        // Kill once issuance is well under way (not after a fixed time: a loaded machine may
        // take longer to deliver the first tokens).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while got.lock().unwrap().len() < 40 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        d.kill9();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let got = got.lock().unwrap().clone();
    assert!(
        got.len() > 10,
        "load ran: {} (clients ended with {:?}):\n{}",
        got.len(),
        ended.lock().unwrap(),
        d.log_text()
    );
    d.spawn();
    d.wait_ready();
    d.stop();
    let (code, out) = audit_verify(&d.audit_dir());
    assert_eq!(code, Some(0), "{out}");
    let audited: HashSet<String> = d
        .audit_records()
        .iter()
        .filter(|r| r["event"] == "token.issued")
        .map(|r| r["details"]["jti"].as_str().unwrap().to_string())
        .collect();
    use base64::Engine;
    for t in &got {
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(t.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        assert!(
            audited.contains(claims["jti"].as_str().unwrap()),
            "delivered token missing from audit"
        );
    }
}

tessera_e2e::both_backends!(kill9_under_load_keeps_every_delivered_token_in_a_verifiable_log);

#[test]
fn rotation_and_a_torn_tail_keep_one_verifiable_chain() {
    let mut d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![agent()],
            extra_config: "[audit]\nrotate_bytes = 2048\n".into(),
            ..Default::default()
        },
    );
    rt().block_on(async {
        for _ in 0..20 {
            d.client().token(&TokenOptions::new(AUD)).await.unwrap();
        }
    });
    d.kill9();
    let rotated = tesserad::audit::files_in_order(&d.audit_dir()).unwrap();
    assert!(rotated.len() > 2, "rotated into several files: {rotated:?}");
    // A crash mid-write leaves half a line at the end.
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(d.audit_dir().join("audit.log"))
        .unwrap();
    f.write_all(b"{\"seq\":999,\"event\":\"token.iss").unwrap();
    drop(f);
    d.spawn();
    d.wait_ready();
    rt().block_on(d.client().token(&TokenOptions::new(AUD)))
        .unwrap();
    d.stop();
    let (code, out) = audit_verify(&d.audit_dir());
    assert_eq!(code, Some(0), "{out}");
    let recs = d.audit_records();
    let recovered: Vec<&Value> = recs
        .iter()
        .filter(|r| r["event"] == "audit.tail_recovered")
        .collect();
    assert_eq!(recovered.len(), 1);
    let saved = recovered[0]["details"]["saved_to"].as_str().unwrap();
    assert_eq!(
        std::fs::read(saved).unwrap(),
        b"{\"seq\":999,\"event\":\"token.iss"
    );
    assert_eq!(
        recs.iter().filter(|r| r["event"] == "token.issued").count(),
        21
    );
}
