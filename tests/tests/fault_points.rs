//! Kill -9 at every fault point the daemon has, taken from its one list
//! (`tesserad::fault::POINTS`, itself checked against the source), then start again and check
//! the invariants: every agent key in the device is named by a live record (no orphan), exactly
//! one host CA key, a durably revoked agent stays revoked and its key is gone, the audit trail
//! verifies and holds every credential handed out before the crash. A point without a scenario
//! here fails the test, so a new one cannot be forgotten.

use std::collections::BTreeSet;
use std::process::Command;

use tessera::{ProblemType, TokenOptions};
use tessera_e2e::daemon::Options;
use tessera_e2e::{bin, rt, Backend, Daemon};

const AUD: &str = "https://api.example.com";

fn agent_toml() -> String {
    format!("[selectors]\nuid = 0\n[policy]\naudiences = [\"{AUD}\"]\n")
}

/// (key id, status) of every registry record.
fn records(d: &Daemon) -> Vec<(String, String, String)> {
    let c = rusqlite::Connection::open(d.state_dir().join("registry.db")).unwrap();
    let mut q = c
        .prepare("SELECT name, key_id, status FROM agents ORDER BY rowid")
        .unwrap();
    q.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

fn crash_at(backend: Backend, point: &str) {
    let mut d = Daemon::prepare(backend, Options::default());
    let mut delivered = vec![];
    let token_jti = |d: &Daemon, agent: &str| -> String {
        let t = rt()
            .block_on(d.client().token(&TokenOptions::new(AUD).agent(agent)))
            .expect("a token before the crash");
        tessera_e2e::jwt_claims(&t.token)["jti"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // Reach the point: each scenario ends with the daemon started with the fault armed.
    match point {
        // The host CA is made at the first start.
        "hostca-after-name" | "hostca-after-key" => {
            d.write_agent("steady", &agent_toml());
        }
        // Enrolment and revocation from agents_dir, at a start after a clean one.
        "enroll-after-record" | "enroll-after-key" | "revoke-after-record" => {
            d.write_agent("steady", &agent_toml());
            d.write_agent("doomed", &agent_toml());
            d.spawn();
            d.wait_ready();
            delivered.push(token_jti(&d, "steady"));
            delivered.push(token_jti(&d, "doomed"));
            d.stop();
            if point == "revoke-after-record" {
                std::fs::remove_file(d.agents_dir().join("doomed.toml")).unwrap();
            } else {
                d.write_agent("newcomer", &agent_toml());
            }
        }
        other => panic!("fault point {other} has no crash scenario in this test: add one"),
    }
    d.crash_at(point);
    let revoked_before: BTreeSet<String> = records(&d)
        .into_iter()
        .filter(|(_, _, s)| s == "revoked")
        .map(|(_, k, _)| k)
        .collect();

    // Start again: repaired, and working.
    d.spawn_with_env(&[("TESSERA_FAULT", "none")]);
    d.wait_ready();
    delivered.push(token_jti(&d, "steady"));
    if point == "revoke-after-record" {
        let e = rt()
            .block_on(d.client().token(&TokenOptions::new(AUD).agent("doomed")))
            .expect_err("a revoked agent");
        assert!(
            matches!(
                e.problem(),
                Some(ProblemType::AgentRevoked) | Some(ProblemType::UnknownCaller)
            ),
            "{point}: {e}"
        );
    }
    d.stop();

    // No orphan: the device's agent keys are exactly the live records' keys.
    let recs = records(&d);
    let live: BTreeSet<String> = recs
        .iter()
        .filter(|(_, _, s)| s != "revoked")
        .map(|(_, k, _)| k.clone())
        .collect();
    let device: BTreeSet<String> = d.device_keys().into_iter().collect();
    assert_eq!(
        device, live,
        "{point}: device keys vs live records {recs:?}"
    );
    assert_eq!(d.device_host_ca_keys().len(), 1, "{point}: one host CA key");
    // What was durably revoked stays revoked.
    for k in &revoked_before {
        assert!(
            recs.iter().any(|(_, key, s)| key == k && s == "revoked"),
            "{point}: {k} came back"
        );
    }
    if point == "revoke-after-record" {
        assert!(
            recs.iter().any(|(n, _, s)| n == "doomed" && s == "revoked"),
            "{point}: {recs:?}"
        );
    }
    // The trail verifies and holds every credential handed out.
    let out = Command::new(bin("tessera"))
        .args(["audit", "verify"])
        .arg(d.audit_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{point}: audit verify: {out:?}");
    let issued: BTreeSet<String> = d
        .audit_records()
        .iter()
        .filter(|r| r["event"] == "token.issued")
        .filter_map(|r| r["details"]["jti"].as_str().map(str::to_string))
        .collect();
    for jti in &delivered {
        assert!(
            issued.contains(jti),
            "{point}: token {jti} not in the trail"
        );
    }
}

/// A fresh device per point: each crash starts from a clean state.
fn every_fault_point(device: fn() -> Backend) {
    for point in tesserad::fault::POINTS {
        crash_at(device(), point);
    }
}

#[test]
fn every_fault_point_tpm() {
    every_fault_point(Backend::tpm);
}

#[test]
fn every_fault_point_pkcs11() {
    every_fault_point(Backend::pkcs11);
}
