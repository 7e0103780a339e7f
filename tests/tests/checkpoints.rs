//! The anchored audit head: checkpoints signed by the host CA key (checked with jsonwebtoken,
//! not our code), `tessera audit verify --ca`, and a start-up that refuses a trail cut short or
//! rewritten since the last checkpoint unless an admin passes `--accept-audit-tamper`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tessera::TokenOptions;
use tessera_e2e::daemon::Options;
use tessera_e2e::{bin, rt, shared_tempdir, Backend, Daemon};

const AUD: &str = "https://api.example.com";

fn start(extra_config: &str) -> Daemon {
    Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![(
                "auditee".into(),
                format!(
                    "[selectors]\nuid = 0\n[policy]\naudiences = [\"{AUD}\"]\nrate = 1000000\n"
                ),
            )],
            extra_config: extra_config.into(),
            ..Default::default()
        },
    )
}

fn tokens(d: &Daemon, n: usize) {
    rt().block_on(async {
        let c = d.client();
        for _ in 0..n {
            c.token(&TokenOptions::new(AUD)).await.unwrap();
        }
    });
}

/// The host CA certificate, copied out as a relying verifier would keep it.
fn ca_copy(d: &Daemon) -> PathBuf {
    let to = d.scratch_dir().join("trusted-ca.pem");
    std::fs::copy(d.state_dir().join("ca/host-ca.pem"), &to).unwrap();
    to
}

/// The CA's public key as jsonwebtoken wants it, read with x509-parser.
fn ca_key(pem: &Path) -> DecodingKey {
    let text = std::fs::read(pem).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&text).unwrap();
    let cert = pem.parse_x509().unwrap();
    let point = cert.public_key().subject_public_key.data.to_vec();
    assert_eq!(point.len(), 65, "uncompressed P-256 point");
    DecodingKey::from_ec_components(&B64.encode(&point[1..33]), &B64.encode(&point[33..65]))
        .unwrap()
}

/// The checkpoint file's claims, verified by jsonwebtoken.
fn checkpoint_claims(d: &Daemon, key: &DecodingKey) -> Value {
    let jws = std::fs::read_to_string(d.audit_dir().join("checkpoint.jws")).expect("checkpoint");
    let jws = jws.trim();
    let header = decode_header(jws).unwrap();
    assert_eq!(header.alg, Algorithm::ES256);
    assert_eq!(header.typ.as_deref(), Some("tessera-checkpoint+jwt"));
    let mut v = Validation::new(Algorithm::ES256);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    decode::<Value>(jws, key, &v)
        .expect("jsonwebtoken verifies the checkpoint with the CA key")
        .claims
}

fn verify_cli(dir: &Path, ca: Option<&Path>) -> (Option<i32>, String) {
    let mut cmd = Command::new(bin("tessera"));
    cmd.args(["audit", "verify"]).arg(dir);
    if let Some(ca) = ca {
        cmd.arg("--ca").arg(ca);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn log_lines(d: &Daemon) -> Vec<Value> {
    d.audit_records()
}

fn write_log(dir: &Path, recs: &[Value]) {
    let text: String = recs
        .iter()
        .map(|r| tesserad::audit::canonical(r) + "\n")
        .collect();
    std::fs::write(dir.join("audit.log"), text).unwrap();
}

/// What a careful forger does: change record `at` and re-hash the chain from there.
fn rewrite_from(recs: &[Value], at: usize) -> Vec<Value> {
    let mut out = recs.to_vec();
    out[at]["details"]["forged"] = Value::Bool(true);
    for i in at..out.len() {
        if i > 0 {
            out[i]["prev"] = out[i - 1]["hash"].clone();
        }
        out[i]["hash"] = Value::String(tesserad::audit::record_hash(&out[i]));
    }
    out
}

/// Copy a stopped daemon's trail (and checkpoint) into a scratch dir.
fn copy_trail(d: &Daemon) -> tempfile::TempDir {
    let to = shared_tempdir();
    for e in std::fs::read_dir(d.audit_dir()).unwrap().flatten() {
        std::fs::copy(e.path(), to.path().join(e.file_name())).unwrap();
    }
    to
}

/// A start that must be refused: non-zero exit, the log says why and names the flag.
fn refused_start(d: &mut Daemon, why: &str) {
    d.spawn();
    let st = d.wait_exit(Duration::from_secs(30));
    assert!(!st.success(), "started over a tampered trail");
    let log = d.log_text();
    assert!(log.contains(why), "{log}");
    assert!(log.contains("--accept-audit-tamper"), "{log}");
}

#[test]
fn checkpoints_are_signed_by_the_host_ca_every_n_records_and_at_stop() {
    let mut d = start("[audit]\ncheckpoint_every = 5\n");
    let ca = ca_copy(&d);
    let key = ca_key(&ca);
    let at_start = checkpoint_claims(&d, &key);
    let start_seq = at_start["seq"].as_u64().unwrap();
    assert!(
        start_seq >= 2,
        "start signs over daemon.started: {at_start}"
    );
    tokens(&d, 12);
    // The periodic task signs after every 5 records (no restart, no stop).
    let deadline = Instant::now() + Duration::from_secs(20);
    let claims = loop {
        let c = checkpoint_claims(&d, &key);
        if c["seq"].as_u64().unwrap() >= start_seq + 10 {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint after 10 records: {c}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let recs = log_lines(&d);
    let seq = claims["seq"].as_u64().unwrap();
    let rec = recs.iter().find(|r| r["seq"] == seq).unwrap();
    assert_eq!(
        claims["hash"], rec["hash"],
        "the checkpoint signs that record's hash"
    );
    assert!(claims["iat"].as_i64().unwrap() >= tessera_e2e::now_unix() - 60);

    assert!(d.stop().success());
    let recs = log_lines(&d);
    let last = recs.last().unwrap();
    assert_eq!(last["event"], "daemon.stopped");
    let claims = checkpoint_claims(&d, &key);
    assert_eq!(
        claims["seq"], last["seq"],
        "the final checkpoint covers daemon.stopped"
    );
    assert_eq!(claims["hash"], last["hash"]);

    let (code, out) = verify_cli(&d.audit_dir(), Some(&ca));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("anchored through seq {}", last["seq"]))
            && out.contains("0 record(s) after it unanchored"),
        "{out}"
    );
    let (code, out) = verify_cli(&d.audit_dir(), None);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("not anchored"), "{out}");

    // Removing the last records passes the chain check but not the checkpoint.
    let cut = copy_trail(&d);
    write_log(cut.path(), &recs[..recs.len() - 2]);
    assert_eq!(
        verify_cli(cut.path(), None).0,
        Some(0),
        "the chain alone holds"
    );
    let (code, out) = verify_cli(cut.path(), Some(&ca));
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains("records were removed"), "{out}");

    // Rewriting from record 3 on, hashes and all: caught by the signed hash.
    let forged = copy_trail(&d);
    write_log(forged.path(), &rewrite_from(&recs, 2));
    assert_eq!(
        verify_cli(forged.path(), None).0,
        Some(0),
        "the chain alone holds"
    );
    let (code, out) = verify_cli(forged.path(), Some(&ca));
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains("rewritten"), "{out}");

    // A checkpoint signed by another key anchors nothing.
    let other = shared_tempdir();
    let other_ca = other.path().join("other.pem");
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-subj", "/CN=other", "-days", "1", "-keyout"])
        .arg(other.path().join("other.key"))
        .arg("-out")
        .arg(&other_ca)
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    let (code, out) = verify_cli(&d.audit_dir(), Some(&other_ca));
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains("signature does not verify"), "{out}");
}

#[test]
fn records_after_the_last_checkpoint_are_reported_unanchored() {
    let mut d = start("");
    let ca = ca_copy(&d);
    tokens(&d, 3);
    // Killed: no final checkpoint, the three tokens are chained but unanchored.
    d.kill9();
    let (code, out) = verify_cli(&d.audit_dir(), Some(&ca));
    assert_eq!(code, Some(0), "{out}");
    let events: Vec<String> = log_lines(&d)
        .iter()
        .map(|r| format!("{} {}", r["seq"], r["event"]))
        .collect();
    assert!(
        out.contains("3 record(s) after it unanchored"),
        "{out} {events:?}"
    );
    // A crash is not tampering: the next start carries on.
    d.spawn();
    d.wait_ready();
    assert!(d.stop().success());
    let (code, out) = verify_cli(&d.audit_dir(), Some(&ca));
    assert_eq!(code, Some(0), "{out}");
    assert!(!log_lines(&d)
        .iter()
        .any(|r| r["event"] == "audit.tamper_accepted"));
}

#[test]
fn start_refuses_a_trail_cut_short_or_rewritten_unless_accepted() {
    let mut d = start("");
    let ca = ca_copy(&d);
    tokens(&d, 4);
    assert!(d.stop().success());
    let recs = log_lines(&d);

    // Cut short: the last two records (a token and daemon.stopped) removed.
    write_log(&d.audit_dir(), &recs[..recs.len() - 2]);
    refused_start(&mut d, "records were removed");

    // Rewritten from the third record on, every hash recomputed.
    write_log(&d.audit_dir(), &rewrite_from(&recs, 2));
    refused_start(&mut d, "the trail was rewritten");

    // The admin accepts it: the daemon starts, says so in the trail, and anchors anew.
    d.args = vec!["--accept-audit-tamper".into()];
    d.spawn();
    d.wait_ready();
    tokens(&d, 1);
    assert!(d.stop().success());
    let after = log_lines(&d);
    let accepted: Vec<&Value> = after
        .iter()
        .filter(|r| r["event"] == "audit.tamper_accepted")
        .collect();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    let last = recs.last().unwrap();
    assert_eq!(accepted[0]["details"]["checkpoint"]["seq"], last["seq"]);
    assert!(accepted[0]["details"]["reason"]
        .as_str()
        .unwrap()
        .contains("rewritten"));
    // Nothing was moved or dropped: the forged records are still there for an investigator.
    assert!(after.iter().any(|r| r["details"]["forged"] == true));
    let (code, out) = verify_cli(&d.audit_dir(), Some(&ca));
    assert_eq!(code, Some(0), "{out}");

    // Without the flag again, a normal stop and start is fine.
    d.args.clear();
    d.restart();
    assert!(d.stop().success());
}

#[test]
fn an_edited_last_record_is_tampering_not_a_torn_tail() {
    let mut d = start("");
    tokens(&d, 2);
    // Killed after the tokens: the last record is not covered by any checkpoint, so only its
    // own hash can tell.
    d.kill9();
    let mut recs = log_lines(&d);
    let last = recs.len() - 1;
    assert_eq!(recs[last]["event"], "token.issued");
    recs[last]["caller"]["uid"] = Value::from(4242);
    write_log(&d.audit_dir(), &recs);
    refused_start(&mut d, "does not match its hash");
    // Still there, untouched.
    assert_eq!(log_lines(&d)[last]["caller"]["uid"], 4242);

    d.args = vec!["--accept-audit-tamper".into()];
    d.spawn();
    d.wait_ready();
    assert!(d.stop().success());
    let after = log_lines(&d);
    let accepted = after
        .iter()
        .find(|r| r["event"] == "audit.tamper_accepted")
        .expect("recorded");
    assert_eq!(accepted["details"]["seq"], recs[last]["seq"]);
    // The damage stays visible to verify.
    let (code, out) = verify_cli(&d.audit_dir(), None);
    assert_eq!(code, Some(5), "{out}");
    assert!(
        out.contains(&format!("at seq {} ", recs[last]["seq"])),
        "{out}"
    );
}

#[test]
fn records_removed_from_the_start_behind_a_forged_pruned_record_are_caught() {
    let mut d = start("");
    let ca = ca_copy(&d);
    tokens(&d, 4);
    assert!(d.stop().success());
    let recs = log_lines(&d);
    // Drop the first three records and explain it with a forged retention record at the end,
    // hashed like a real one.
    let mut forged: Vec<Value> = recs[3..].to_vec();
    let mut pruned = recs.last().unwrap().clone();
    pruned["seq"] = Value::from(recs.last().unwrap()["seq"].as_u64().unwrap() + 1);
    pruned["event"] = Value::from("audit.pruned");
    pruned["caller"] = Value::Null;
    pruned["agent"] = Value::Null;
    pruned["details"] = serde_json::json!({
        "files": ["audit-00000000000000000001.log"],
        "through_seq": 3,
        "last_hash": recs[2]["hash"],
    });
    pruned["prev"] = recs.last().unwrap()["hash"].clone();
    pruned["hash"] = Value::String(tesserad::audit::record_hash(&pruned));
    forged.push(pruned);
    let copy = copy_trail(&d);
    write_log(copy.path(), &forged);
    assert_eq!(
        verify_cli(copy.path(), None).0,
        Some(0),
        "the chain alone holds"
    );
    let (code, out) = verify_cli(copy.path(), Some(&ca));
    assert_eq!(code, Some(5), "{out}");
    assert!(out.contains("records removed"), "{out}");
    // And the daemon does not start over it (and so never re-anchors it).
    write_log(&d.audit_dir(), &forged);
    refused_start(&mut d, "records were removed");
}

#[test]
fn a_refused_start_changes_nothing() {
    let mut d = start("");
    tokens(&d, 2);
    assert!(d.stop().success());
    let mut recs = log_lines(&d);
    recs.pop();
    // Records removed after the checkpoint, and a torn half line after them.
    write_log(&d.audit_dir(), &recs);
    let log = d.audit_dir().join("audit.log");
    let mut bytes = std::fs::read(&log).unwrap();
    bytes.extend_from_slice(b"{\"seq\":99,\"ev");
    std::fs::write(&log, &bytes).unwrap();
    refused_start(&mut d, "records were removed");
    assert_eq!(std::fs::read(&log).unwrap(), bytes, "the trail is as found");
    assert!(
        !std::fs::read_dir(d.audit_dir())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("torn-")),
        "no torn tail set aside by a refused start"
    );
}

#[test]
fn retention_keeps_the_anchor_and_the_trail_verifies_through_restarts() {
    // Retention never removes the file holding the newest checkpoint's record: with
    // checkpoints every 5 records it can follow closely.
    let mut d = start("[audit]\nrotate_bytes = 4096\nkeep_files = 1\ncheckpoint_every = 5\n");
    let ca = ca_copy(&d);
    for round in 0..3 {
        for _ in 0..8 {
            tokens(&d, 5);
            // Let the signer keep up, as it does between bursts.
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(d.stop().success(), "round {round}");
        let files = tesserad::audit::files_in_order(&d.audit_dir()).unwrap();
        assert!(
            !files[0].ends_with("audit-00000000000000000001.log"),
            "retention ran: {files:?}"
        );
        let recs = log_lines(&d);
        assert!(recs.iter().any(|r| r["event"] == "audit.pruned"));
        let (code, out) = verify_cli(&d.audit_dir(), Some(&ca));
        assert_eq!(code, Some(0), "round {round}: {out}");
        assert!(out.contains("0 record(s) after it unanchored"), "{out}");
        // Pruned files are not tampering: the next start carries on.
        d.spawn();
        d.wait_ready();
    }
    assert!(d.stop().success());
    assert!(!log_lines(&d)
        .iter()
        .any(|r| r["event"] == "audit.tamper_accepted"));
}
