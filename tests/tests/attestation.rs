//! Key attestation evidence: on an swtpm manufactured with EK certificates, the evidence
//! verifies with the SDK and its AK signature with `openssl dgst`; tampering of any kind is
//! caught. PKCS#11 answers with attributes and says they are not hardware evidence.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::Value;
use tessera::attestation::{self, AttestationError, Expectations};
use tessera::ProblemType;
use tessera_e2e::daemon::Options;
use tessera_e2e::{bin, rt, Backend, Daemon, Swtpm};

const AUD: &str = "https://api.example.com";

fn agent_toml(uid: u32) -> String {
    format!("[selectors]\nuid = {uid}\n[policy]\naudiences = [\"{AUD}\"]\n")
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `openssl dgst -sha256 -verify ak.pem -signature sig.der attest.bin`, as DESIGN promises.
fn openssl_verifies(dir: &Path, ev: &Value) -> Output {
    let ak = write(dir, "ak.pem", ev["ak_public"].as_str().unwrap().as_bytes());
    let sig = write(
        dir,
        "sig.der",
        &B64.decode(ev["signature"].as_str().unwrap()).unwrap(),
    );
    let attest = write(
        dir,
        "attest.bin",
        &B64.decode(ev["attest"].as_str().unwrap()).unwrap(),
    );
    Command::new("openssl")
        .args([
            "dgst",
            "-sha256",
            "-verify",
            s(&ak),
            "-signature",
            s(&sig),
            s(&attest),
        ])
        .output()
        .unwrap()
}

fn jwk_key_of(d: &Daemon, kid: &str) -> p256::ecdsa::VerifyingKey {
    let jwks = rt().block_on(d.client().jwks()).unwrap();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .expect("kid in JWKS")
        .clone();
    attestation::key_from_jwk(&jwk).unwrap()
}

fn verify(ev: &Value, expect: &Expectations) -> Result<attestation::Verified, AttestationError> {
    let parsed = attestation::parse(ev.to_string().as_bytes()).unwrap();
    attestation::verify(&parsed, expect)
}

#[test]
fn tpm_evidence_verifies_and_tampering_is_caught() {
    let d = Daemon::start_with(
        Backend::Tpm(Swtpm::start_with_ek_certs()),
        Options {
            agents: vec![
                ("bot".into(), agent_toml(0)),
                ("other".into(), agent_toml(4242)),
            ],
            ..Default::default()
        },
    );
    let dir = d.scratch_dir();
    let nonce: [u8; 32] = rand::random();
    let (ev, who) = rt().block_on(async {
        let c = d.client();
        (
            c.attestation(&nonce, None).await.unwrap(),
            c.whoami().await.unwrap(),
        )
    });
    assert_eq!(ev["format"], "tpm2-certify");
    assert_eq!(ev["nonce"], hex::encode(nonce));
    let kid = who.key_id.unwrap();
    let key = jwk_key_of(&d, &kid);
    // Provisioning: the relying party records this host's AK once (here, from this first
    // evidence; in a fleet, vouched for by an attestation CA) and pins it from then on.
    let ak = attestation::ak_from_pem(ev["ak_public"].as_str().unwrap()).unwrap();
    let expect = Expectations {
        nonce: nonce.to_vec(),
        key,
        ak,
    };

    // The SDK verifier accepts it and names the JWK's key.
    let ok = verify(&ev, &expect).expect("evidence verifies");
    // Later evidence (a fresh nonce) verifies against the AK pinned at provisioning.
    let nonce2: [u8; 32] = rand::random();
    let ev2 = rt()
        .block_on(d.client().attestation(&nonce2, None))
        .unwrap();
    verify(
        &ev2,
        &Expectations {
            nonce: nonce2.to_vec(),
            ..expect.clone()
        },
    )
    .expect("later evidence verifies against the pinned AK");
    assert_eq!(ok.key, key);
    let must = attestation::FIXED_TPM
        | attestation::FIXED_PARENT
        | attestation::SENSITIVE_DATA_ORIGIN
        | attestation::SIGN;
    assert_eq!(ok.object_attributes & must, must);

    // openssl verifies the AK signature over the raw attest bytes.
    let o = openssl_verifies(&dir, &ev);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "Verified OK");

    // tpm2-tools reads the same attest: TPM-generated, type certify (0x8017), our nonce as
    // extraData. (tpm2_print 5.x prints the header, then says it cannot print the certify
    // body; the header is what this checks.)
    let attest_bin = dir.join("attest.bin");
    let o = Command::new("tpm2_print")
        .args(["-t", "TPMS_ATTEST", s(&attest_bin)])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&o.stdout).to_lowercase();
    assert!(printed.contains("magic: ff544347"), "{o:?}");
    assert!(printed.contains("type: 8017"), "{o:?}");
    assert!(
        printed.contains(&format!("extradata: {}", hex::encode(nonce))),
        "{o:?}"
    );

    // EK certificates from NV: RSA 2048 and ECC P-384 on swtpm, readable by openssl.
    let eks = ev["ek_certificates"].as_array().unwrap();
    assert_eq!(eks.len(), 2, "{eks:?}");
    let texts: Vec<String> = eks
        .iter()
        .enumerate()
        .map(|(i, pem)| {
            let p = write(
                &dir,
                &format!("ek{i}.pem"),
                pem.as_str().unwrap().as_bytes(),
            );
            let o = Command::new("openssl")
                .args(["x509", "-in", s(&p), "-noout", "-text"])
                .output()
                .unwrap();
            assert!(o.status.success(), "{o:?}");
            String::from_utf8_lossy(&o.stdout).into_owned()
        })
        .collect();
    assert!(texts.iter().any(|t| t.contains("rsaEncryption")));
    assert!(texts
        .iter()
        .any(|t| t.contains("secp384r1") || t.contains("P-384")));

    // A changed nonce fails.
    let mut other_nonce = nonce;
    other_nonce[0] ^= 1;
    let e = verify(
        &ev,
        &Expectations {
            nonce: other_nonce.to_vec(),
            ..expect.clone()
        },
    )
    .unwrap_err();
    assert!(matches!(e, AttestationError::NonceMismatch), "{e}");
    // The nonce field rewritten to match: the signed attest still carries the old one.
    let mut forged = ev.clone();
    forged["nonce"] = Value::from(hex::encode(other_nonce));
    let e = verify(
        &forged,
        &Expectations {
            nonce: other_nonce.to_vec(),
            ..expect.clone()
        },
    )
    .unwrap_err();
    assert!(matches!(e, AttestationError::NonceMismatch), "{e}");

    // A flipped byte in attest fails (the SDK and openssl both).
    let mut attest = B64.decode(ev["attest"].as_str().unwrap()).unwrap();
    let last = attest.len() - 1;
    attest[last] ^= 0x01;
    let mut flipped = ev.clone();
    flipped["attest"] = Value::from(B64.encode(&attest));
    let e = verify(&flipped, &expect).unwrap_err();
    assert!(matches!(e, AttestationError::BadSignature), "{e}");
    let o = openssl_verifies(&dir, &flipped);
    assert!(!o.status.success(), "openssl must reject a flipped attest");

    // Another agent's key_public fails: the certified name is not its name.
    let other_ev = {
        // Evidence for "other", fetched as its uid through the agentcall helper.
        use std::os::unix::process::CommandExt;
        let o = Command::new(bin("agentcall"))
            .arg(&d.socket)
            .args([
                "get",
                &format!("/v1/attestation?nonce={}", hex::encode(nonce)),
            ])
            .uid(4242)
            .gid(4242)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["status"], 200, "{v}");
        v["body"].clone()
    };
    assert_eq!(other_ev["agent"], "other");
    let mut swapped = ev.clone();
    swapped["key_public"] = other_ev["key_public"].clone();
    let e = verify(&swapped, &expect).unwrap_err();
    assert!(matches!(e, AttestationError::NameMismatch), "{e}");
    // And other's own (valid) evidence is not evidence for bot's key.
    let e = verify(&other_ev, &expect).unwrap_err();
    assert!(matches!(e, AttestationError::KeyMismatch), "{e}");
    // The pinned AK: the same TPM's AK is accepted, another key is not.
    assert_eq!(ok.ak, ak);
    let e = verify(
        &ev,
        &Expectations {
            ak: key,
            ..expect.clone()
        },
    )
    .unwrap_err();
    assert!(matches!(e, AttestationError::UnexpectedAk), "{e}");
    // Forged evidence: an attest for bot's key signed by a key the forger made, carrying
    // that key as its AK. Without a pinned AK it would verify; with one it fails.
    let forger = p256::ecdsa::SigningKey::random(&mut rand::thread_rng());
    let attest_bytes = B64.decode(ev["attest"].as_str().unwrap()).unwrap();
    let forged_sig: p256::ecdsa::Signature =
        p256::ecdsa::signature::Signer::sign(&forger, &attest_bytes);
    let mut forged_ev = ev.clone();
    forged_ev["signature"] = Value::from(B64.encode(forged_sig.to_der().as_bytes()));
    forged_ev["ak_public"] = Value::from(
        p256::pkcs8::EncodePublicKey::to_public_key_pem(
            forger.verifying_key(),
            p256::pkcs8::LineEnding::LF,
        )
        .unwrap(),
    );
    let e = verify(&forged_ev, &expect).unwrap_err();
    assert!(matches!(e, AttestationError::UnexpectedAk), "{e}");

    // The CLI: attest, then verify-attestation against the agent's certificate.
    let ev_file = dir.join("ev.json");
    let o = d.cli(&["attest", "--nonce", &hex::encode(nonce)]);
    assert!(o.status.success(), "{o:?}");
    std::fs::write(&ev_file, &o.stdout).unwrap();
    let cert = dir.join("agent.pem");
    let o = d.cli(&["cert"]);
    assert!(o.status.success(), "{o:?}");
    std::fs::write(&cert, &o.stdout).unwrap();
    let ak_file = write(&dir, "ak.pem", ev["ak_public"].as_str().unwrap().as_bytes());
    let o = d.cli(&[
        "verify-attestation",
        s(&ev_file),
        "--nonce",
        &hex::encode(nonce),
        "--cert",
        s(&cert),
        "--ak",
        s(&ak_file),
    ]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains(&kid));
    let o = d.cli(&[
        "verify-attestation",
        s(&ev_file),
        "--nonce",
        &hex::encode(other_nonce),
        "--cert",
        s(&cert),
        "--ak",
        s(&ak_file),
    ]);
    assert_eq!(o.status.code(), Some(5), "{o:?}");
    let swapped_file = write(&dir, "swapped.json", swapped.to_string().as_bytes());
    let o = d.cli(&[
        "verify-attestation",
        s(&swapped_file),
        "--nonce",
        &hex::encode(nonce),
        "--cert",
        s(&cert),
        "--ak",
        s(&ak_file),
    ]);
    assert_eq!(o.status.code(), Some(5), "{o:?}");
    // Fail closed: without a pinned AK or without the agent's key the CLI refuses to say
    // anything is valid, and forged evidence is caught with them.
    for args in [vec!["--cert", s(&cert)], vec!["--ak", s(&ak_file)], vec![]] {
        let mut all = vec!["verify-attestation", s(&ev_file), "--nonce"];
        let n = hex::encode(nonce);
        all.push(&n);
        all.extend(args.iter().copied());
        let o = d.cli(&all);
        assert!(!o.status.success(), "{all:?}: {o:?}");
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("valid"),
            "{o:?}"
        );
    }
    let forged_file = write(&dir, "forged.json", forged_ev.to_string().as_bytes());
    let o = d.cli(&[
        "verify-attestation",
        s(&forged_file),
        "--nonce",
        &hex::encode(nonce),
        "--cert",
        s(&cert),
        "--ak",
        s(&ak_file),
    ]);
    assert_eq!(o.status.code(), Some(5), "forged evidence: {o:?}");

    // Each evidence request is audited.
    assert!(d
        .audit_records()
        .iter()
        .any(|r| r["event"] == "attestation.issued" && r["agent"]["name"] == "bot"));
}

#[test]
fn bad_nonces_are_refused_with_problems() {
    let d = Daemon::start_with(
        Backend::tpm(),
        Options {
            agents: vec![("bot".into(), agent_toml(0))],
            ..Default::default()
        },
    );
    rt().block_on(async {
        let c = d.client();
        for q in [
            "/v1/attestation",
            "/v1/attestation?nonce=xyz",
            "/v1/attestation?nonce=0011",
            &format!("/v1/attestation?nonce={}", "ab".repeat(65)),
        ] {
            let (status, _, body) = c.request(tessera::Method::GET, q, None).await.unwrap();
            assert_eq!(status, 400, "{q}");
            let p: tessera::Problem = serde_json::from_slice(&body).unwrap();
            assert_eq!(p.kind(), ProblemType::MalformedRequest, "{q}");
        }
        // The daemon is fine afterwards and a TPM without EK certificates gives none.
        let ev = c.attestation(&[7u8; 16], None).await.unwrap();
        assert_eq!(ev["ek_certificates"].as_array().unwrap().len(), 0);
    });
}

#[test]
fn pkcs11_evidence_is_labelled_not_hardware() {
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![("bot".into(), agent_toml(0))],
            ..Default::default()
        },
    );
    let nonce = [9u8; 16];
    let ev = rt().block_on(d.client().attestation(&nonce, None)).unwrap();
    assert_eq!(ev["format"], "pkcs11-attributes");
    assert_eq!(ev["hardware_evidence"], false);
    assert_eq!(ev["attributes"]["CKA_SENSITIVE"], true);
    assert_eq!(ev["attributes"]["CKA_EXTRACTABLE"], false);
    assert_eq!(ev["attributes"]["CKA_NEVER_EXTRACTABLE"], true);
    let any_key = *p256::ecdsa::SigningKey::random(&mut rand::thread_rng()).verifying_key();
    let e = verify(
        &ev,
        &Expectations {
            nonce: nonce.to_vec(),
            key: any_key,
            ak: any_key,
        },
    )
    .unwrap_err();
    assert!(matches!(e, AttestationError::NotHardwareEvidence(_)), "{e}");
    // The CLI refuses to call it verified.
    let dir = d.scratch_dir();
    let f = write(&dir, "ev.json", ev.to_string().as_bytes());
    let ak_file = write(&dir, "ak.pem", any_key_pem(&any_key).as_bytes());
    let o = d.cli(&["cert"]);
    assert!(o.status.success(), "{o:?}");
    let cert = write(&dir, "agent.pem", &o.stdout);
    let o = d.cli(&[
        "verify-attestation",
        s(&f),
        "--nonce",
        &hex::encode(nonce),
        "--cert",
        s(&cert),
        "--ak",
        s(&ak_file),
    ]);
    assert_eq!(o.status.code(), Some(5), "{o:?}");
}

fn any_key_pem(k: &p256::ecdsa::VerifyingKey) -> String {
    p256::pkcs8::EncodePublicKey::to_public_key_pem(k, p256::pkcs8::LineEnding::LF).unwrap()
}
