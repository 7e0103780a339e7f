//! RSA-2048 agent keys (`key = "rsa2048"`, issue 17): made in the device, sign-only, RS256
//! tokens checked by PyJWT against the JWKS; everything only P-256 keys do is refused with
//! `key-type-unsupported`; the key kind is fixed at enrolment; revocation destroys the key.

use std::process::Command;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use tessera::{CertificateOptions, DpopOptions, ProblemType, TokenOptions};
use tessera_e2e::daemon::Options;
use tessera_e2e::{both_backends, jwt_header, python_check, rt, Backend, Daemon};

const AUD: &str = "https://api.example.com";

fn agent_toml(key: &str) -> String {
    format!(
        "[selectors]\nuid = {}\n[policy]\naudiences = [\"{AUD}\"]\nkey = \"{key}\"\n",
        nix::unistd::getuid()
    )
}

fn refused(r: Result<impl std::fmt::Debug, tessera::Error>, what: &str) {
    match r {
        Err(e) => assert_eq!(
            e.problem(),
            Some(ProblemType::KeyTypeUnsupported),
            "{what}: {e}"
        ),
        Ok(v) => panic!("{what} was given to an RSA agent: {v:?}"),
    }
}

fn rsa_agents(backend: Backend) {
    let mut d = Daemon::start_with(
        backend,
        Options {
            agents: vec![("rsa-bot".into(), agent_toml("rsa2048"))],
            ..Default::default()
        },
    );
    // The device key's id (whoami's `key_id` is the JWK thumbprint).
    let device_keys = d.device_keys();
    assert_eq!(device_keys.len(), 1, "{device_keys:?}");
    let key_id = device_keys[0].clone();
    let (kid, token, jwks, sub) = rt().block_on(async {
        let c = d.client();
        let who = c.whoami().await.unwrap();
        let t = c.token(&TokenOptions::new(AUD)).await.unwrap();
        let jwks = c.jwks().await.unwrap();
        // Everything the key cannot do is refused by name, not failed in the device.
        refused(
            c.dpop_proof(&DpopOptions::new("GET", format!("{AUD}/x")))
                .await,
            "a DPoP proof",
        );
        refused(c.wit(None).await, "a WIT");
        refused(
            c.certificate(&CertificateOptions::default()).await,
            "a certificate",
        );
        refused(
            c.token(&TokenOptions::new(AUD).bind_dpop()).await,
            "a bound token",
        );
        let (status, _, body) = c
            .request(
                tessera::Method::POST,
                "/v1/tls/sign",
                Some(
                    br#"{"scheme":"ecdsa_secp256r1_sha256","role":"client","content":"AA=="}"#
                        .to_vec(),
                ),
            )
            .await
            .unwrap();
        let p: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (status, p["type"].as_str()),
            (403, Some("urn:tessera:problem:key-type-unsupported")),
            "{p}"
        );
        // Attestation covers RSA keys too.
        let ev = c.attestation(&[7u8; 16], None).await.expect("attestation");
        let want = if matches!(d.backend, Backend::Tpm(_)) {
            "tpm2-certify"
        } else {
            "pkcs11-attributes"
        };
        assert_eq!(ev["format"], want, "{ev}");
        if let Some(kp) = ev["key_public"].as_str() {
            use base64::engine::general_purpose::STANDARD;
            let blob = std::fs::read(d.state_dir().join(format!("tpm/keys/{key_id}.pub"))).unwrap();
            assert_eq!(
                STANDARD.decode(kp).unwrap(),
                blob[2..],
                "the certified key is the agent's"
            );
        }
        // Our own verifier picks RS256 from the JWK.
        let claims = tessera::verify::verify(&t.token, &jwks, &tessera::verify::Options::new(AUD))
            .expect("the SDK verifies the RS256 token");
        assert_eq!(claims.sub, who.id);
        let kid = jwt_header(&t.token)["kid"].as_str().unwrap().to_string();
        assert_eq!(who.key_id.as_deref(), Some(kid.as_str()));
        (kid, t.token, jwks, who.id)
    });
    let h = jwt_header(&token);
    assert_eq!(
        (h["alg"].as_str(), h["typ"].as_str()),
        (Some("RS256"), Some("JWT"))
    );
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("the kid is in the JWKS");
    assert_eq!(
        (
            jwk["kty"].as_str(),
            jwk["alg"].as_str(),
            jwk["e"].as_str(),
            jwk["use"].as_str()
        ),
        (Some("RSA"), Some("RS256"), Some("AQAB"), Some("sig"))
    );
    assert_eq!(B64.decode(jwk["n"].as_str().unwrap()).unwrap().len(), 256);
    // PyJWT, from the JWKS alone.
    let (ok, v) = python_check(
        "check_rs256.py",
        &json!({"token": token, "jwks": jwks, "aud": AUD}),
    );
    assert!(ok, "{v}");
    assert_eq!(v["claims"]["sub"], sub.as_str());
    assert_eq!(v["key_type"], "RSAPublicKey");
    assert_eq!(v["sdk_sub"], sub.as_str(), "the Python SDK verifies it");
    // The TypeScript SDK's verify() (jose).
    let (ok, v) = tessera_e2e::node_check(
        "verify_rs256.mjs",
        &json!({"token": token, "jwks": jwks, "aud": AUD}),
    );
    assert!(ok, "{v}");
    assert_eq!(v["sub"], sub.as_str(), "the TypeScript SDK verifies it");

    // What the device says about the key.
    match &d.backend {
        Backend::Tpm(_) => {
            let blob = d.state_dir().join(format!("tpm/keys/{key_id}.pub"));
            let out = Command::new("tpm2_print")
                .args(["-t", "TPM2B_PUBLIC"])
                .arg(&blob)
                .output()
                .expect("tpm2_print");
            let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
            assert!(out.status.success(), "{text}");
            let attrs = text
                .lines()
                .skip_while(|l| !l.starts_with("attributes:"))
                .nth(1)
                .unwrap_or_default()
                .to_string();
            for a in ["fixedtpm", "fixedparent", "sensitivedataorigin", "sign"] {
                assert!(
                    attrs.split('|').any(|x| x.trim().ends_with(a)),
                    "{a}: {attrs}"
                );
            }
            assert!(
                !attrs.contains("decrypt") && !attrs.contains("restricted"),
                "{attrs}"
            );
            assert!(text.contains("rsa") && text.contains("rsassa"), "{text}");
            assert!(text.contains("2048"), "{text}");
        }
        Backend::Pkcs11(hsm) => {
            let out = hsm.pkcs11_tool(&["-O", "--type", "privkey"]);
            let listing = String::from_utf8_lossy(&out.stdout).to_string();
            let block = listing
                .split("Private Key Object")
                .find(|b| b.contains(&format!("tessera:{key_id}")))
                .unwrap_or_else(|| panic!("{listing}"));
            assert!(block.contains("RSA"), "{block}");
            assert!(block.contains("sensitive"), "{block}");
            assert!(block.contains("never extractable"), "{block}");
            assert!(block.contains("sign"), "{block}");
            assert!(!block.contains("decrypt"), "{block}");
        }
    }

    // The key kind is fixed at enrolment: a file saying otherwise is reported, not applied.
    d.write_agent("rsa-bot", &agent_toml("p256"));
    d.reload();
    assert!(
        d.log_text().contains("fixed at enrolment"),
        "{}",
        d.log_text()
    );
    let t = rt()
        .block_on(d.client().token(&TokenOptions::new(AUD)))
        .unwrap();
    assert_eq!(jwt_header(&t.token)["kid"], kid.as_str(), "same key");
    assert_eq!(jwt_header(&t.token)["alg"], "RS256");

    // A restart finds the RSA key again (reconciliation lists both key kinds).
    d.restart();
    let t = rt()
        .block_on(d.client().token(&TokenOptions::new(AUD)))
        .unwrap();
    assert_eq!(
        jwt_header(&t.token)["kid"],
        kid.as_str(),
        "same key after a restart"
    );

    // Revocation destroys the device key.
    assert!(d.device_keys().contains(&key_id));
    std::fs::remove_file(d.agents_dir().join("rsa-bot.toml")).unwrap();
    d.reload();
    assert!(!d.device_keys().contains(&key_id), "{:?}", d.device_keys());
}

both_backends!(rsa_agents);

/// Policies an RSA key cannot serve are refused at enrolment (`tessera agent check`).
#[test]
fn rsa_policies_that_need_p256_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (extra, why) in [
        ("require_binding = true", "require_binding"),
        ("tls_server = true", "tls_server"),
        ("proof_key = \"session\"", "proof_key"),
        ("x509_svid = \"software\"", "x509_svid"),
        ("key = \"ed25519\"", "\"p256\" or \"rsa2048\""),
    ] {
        let f = dir.path().join("bot.toml");
        let key = if extra.starts_with("key") {
            ""
        } else {
            "key = \"rsa2048\"\n"
        };
        std::fs::write(
            &f,
            format!("[selectors]\nuid = 1000\n[policy]\naudiences = [\"{AUD}\"]\n{key}{extra}\n"),
        )
        .unwrap();
        let out = Command::new(tessera_e2e::bin("tessera"))
            .args(["agent", "check"])
            .arg(&f)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra} accepted");
        assert!(text.contains(why), "{extra}: {text}");
    }
}
