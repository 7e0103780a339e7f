//! Sender-constrained tokens and DPoP proofs (RFC 9449), made by the daemon with the agent's
//! hardware key, checked by a relying party written with PyJWT (not our code).

use serde_json::{json, Value};
use tessera::{DpopOptions, ProblemType, TokenOptions};
use tessera_e2e::daemon::Options;
use tessera_e2e::{agentcall, exe_dir, helper_copy, python_check, rt, Backend, Daemon};

const AUD: &str = "https://api.example.com";

fn policy(extra: &str) -> String {
    format!(
        "[policy]\naudiences = [\"{AUD}\", \"https://*.internal.example.com:8443/v1\"]\nrate = 100000\n{extra}\n"
    )
}

/// Audit records of `event`.
fn events(d: &Daemon, event: &str) -> Vec<Value> {
    d.audit_records()
        .into_iter()
        .filter(|r| r["event"] == event)
        .collect()
}

fn dpop_bound_tokens_and_proofs_verify_with_pyjwt(backend: Backend) {
    let dir = exe_dir();
    let other = helper_copy(dir.path(), "other-agent", "b");
    let d = Daemon::start_with(
        backend,
        Options {
            agents: vec![
                (
                    "alpha".into(),
                    format!("[selectors]\nuid = 0\n{}", policy("")),
                ),
                (
                    "strict".into(),
                    format!(
                        "[selectors]\nuid = 65534\nexe = \"{}\"\n{}",
                        other.display(),
                        policy("require_binding = true")
                    ),
                ),
            ],
            ..Default::default()
        },
    );
    let c = d.client();
    let rt = rt();
    let bound = rt
        .block_on(c.token(&TokenOptions::new(AUD).bind_dpop()))
        .unwrap();
    assert_eq!(bound.token_type, "DPoP");
    let jwks = rt.block_on(c.jwks()).unwrap();
    let mut jtis = vec![];
    for (method, url, nonce) in [
        (
            "POST",
            "https://api.example.com/v1/orders",
            Some("srv-nonce_1"),
        ),
        ("GET", "https://API.example.com:443/", None),
        (
            "DELETE",
            "https://db.internal.example.com:8443/v1/rows/7",
            None,
        ),
    ] {
        let mut o = DpopOptions::new(method, url).access_token(&bound.token);
        if let Some(n) = nonce {
            o = o.nonce(n);
        }
        let p = rt.block_on(c.dpop_proof(&o)).unwrap();
        let (ok, out) = python_check(
            "check_dpop.py",
            &json!({"token": bound.token, "proof": p.proof, "jwks": jwks, "method": method,
                    "url": url, "audience": AUD, "nonce": nonce}),
        );
        assert!(ok, "PyJWT relying party refused it: {out}");
        // The relying party is strict: the same proof for another request is refused.
        let (ok, _) = python_check(
            "check_dpop.py",
            &json!({"token": bound.token, "proof": p.proof, "jwks": jwks, "method": method,
                    "url": "https://api.example.com/other", "audience": AUD, "nonce": nonce}),
        );
        assert!(!ok, "a proof for another target passed");
        // The proof key is the agent's hardware key: the token's kid is its thumbprint.
        assert_eq!(
            tessera_e2e::jwt_header(&bound.token)["kid"],
            out["token"]["cnf"]["jkt"]
        );
        assert_eq!(out["proof"]["jti"], p.jti);
        jtis.push(p.jti);
    }
    // A proof is not a token: our verifier and jsonwebtoken-based checks refuse it.
    let p = rt
        .block_on(c.dpop_proof(
            &DpopOptions::new("GET", "https://api.example.com/x").access_token(&bound.token),
        ))
        .unwrap();
    jtis.push(p.jti.clone());
    assert!(tessera::verify::verify(&p.proof, &jwks, &tessera::verify::Options::new(AUD)).is_err());

    let refused = |o: DpopOptions| {
        rt.block_on(c.dpop_proof(&o))
            .expect_err("refused")
            .problem()
    };
    // Targets outside the agent's audiences, or malformed.
    for (url, want) in [
        ("https://evil.example.com/x", ProblemType::TargetNotAllowed),
        (
            "https://db.internal.example.com:8443/v2",
            ProblemType::TargetNotAllowed,
        ),
        (
            "https://a.b.internal.example.com:8443/v1",
            ProblemType::TargetNotAllowed,
        ),
        (
            "https://api.example.com/x?q=1",
            ProblemType::MalformedRequest,
        ),
        ("https://api.example.com/x#f", ProblemType::MalformedRequest),
        ("http://api.example.com/x", ProblemType::MalformedRequest),
        (
            "https://user@api.example.com/x",
            ProblemType::MalformedRequest,
        ),
    ] {
        let o = DpopOptions::new("GET", url).access_token(&bound.token);
        assert_eq!(refused(o), Some(want), "{url}");
    }
    assert_eq!(
        refused(DpopOptions::new("get", AUD)),
        Some(ProblemType::MalformedRequest)
    );
    assert_eq!(
        refused(DpopOptions::new("GET", AUD).nonce("bad\"nonce")),
        Some(ProblemType::MalformedRequest)
    );
    // An unbound token, or a bare ath of a token this daemon issued, is not accepted.
    let bearer = rt.block_on(c.token(&TokenOptions::new(AUD))).unwrap();
    assert_eq!(bearer.token_type, "Bearer");
    assert_eq!(
        refused(DpopOptions::new("GET", AUD).access_token(&bearer.token)),
        Some(ProblemType::TokenNotAccepted)
    );
    let ath_of = |t: &str| {
        use base64::Engine;
        use sha2::Digest;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(t.as_bytes()))
    };
    let ath = ath_of(&bound.token);
    assert_eq!(
        refused(DpopOptions::new("GET", AUD).ath(&ath)),
        Some(ProblemType::TokenNotAccepted)
    );
    // Another issuer's token hash passes through as given.
    let foreign = ath_of("a token from another issuer");
    let p = rt
        .block_on(c.dpop_proof(&DpopOptions::new("GET", AUD).ath(&foreign)))
        .unwrap();
    jtis.push(p.jti.clone());
    assert_eq!(tessera_e2e::jwt_claims(&p.proof)["ath"], foreign.as_str());
    assert_eq!(
        refused(DpopOptions::new("GET", AUD).ath("q".repeat(43))),
        Some(ProblemType::MalformedRequest)
    );

    // Agent "strict" may not have bearer tokens, and cannot use alpha's token.
    let r = agentcall(&other, 65534, &d.socket, &["token", AUD]);
    assert_eq!(r["status"], 403, "{r}");
    assert_eq!(r["body"]["type"], "urn:tessera:problem:binding-required");
    let body = json!({"audience": AUD, "bind": "dpop"}).to_string();
    let r = agentcall(&other, 65534, &d.socket, &["post", "/v1/token", &body]);
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body"]["token_type"], "DPoP");
    let body =
        json!({"type": "dpop", "htm": "GET", "htu": AUD, "access_token": bound.token}).to_string();
    let r = agentcall(&other, 65534, &d.socket, &["post", "/v1/proof", &body]);
    assert_eq!(r["status"], 403, "{r}");
    assert_eq!(r["body"]["type"], "urn:tessera:problem:token-not-accepted");

    // Every proof handed out is in the audit, with its target and no query.
    let issued = events(&d, "proof.issued");
    let audited: Vec<&str> = issued
        .iter()
        .map(|r| r["details"]["jti"].as_str().unwrap())
        .collect();
    for j in &jtis {
        assert!(audited.contains(&j.as_str()), "proof {j} not audited");
    }
    assert_eq!(issued.len(), jtis.len());
    let first = &issued[0]["details"];
    assert_eq!(first["origin"], "https://api.example.com");
    assert_eq!(first["path"], "/v1/orders");
    assert_eq!(first["htm"], "POST");
    assert!(events(&d, "access.denied")
        .iter()
        .any(|r| r["details"]["problem"] == "target-not-allowed"));
    let bound_rec = events(&d, "token.issued")
        .into_iter()
        .find(|r| r["details"]["bind"] == "dpop")
        .expect("bound token audited");
    assert_eq!(
        bound_rec["details"]["cnf_jkt"],
        tessera_e2e::jwt_header(&bound.token)["kid"]
    );
}
tessera_e2e::both_backends!(dpop_bound_tokens_and_proofs_verify_with_pyjwt);

/// The CLI: a bound token and a proof for it, the token read from a file.
#[test]
fn cli_makes_a_bound_token_and_a_proof() {
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![(
                "alpha".into(),
                format!("[selectors]\nuid = 0\n{}", policy("")),
            )],
            ..Default::default()
        },
    );
    let o = d.cli(&["token", "--audience", AUD, "--bind", "dpop", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let t: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(t["token_type"], "DPoP");
    let token = t["token"].as_str().unwrap();
    let o = d.cli_stdin(
        &[
            "proof",
            "dpop",
            "--method",
            "PUT",
            "--url",
            "https://api.example.com/a/b",
            "--token",
            "-",
        ],
        token.as_bytes(),
    );
    assert!(o.status.success(), "{o:?}");
    let proof = String::from_utf8(o.stdout).unwrap();
    let jwks = rt().block_on(d.client().jwks()).unwrap();
    let (ok, out) = python_check(
        "check_dpop.py",
        &json!({"token": token, "proof": proof.trim(), "jwks": jwks, "method": "PUT",
                "url": "https://api.example.com/a/b", "audience": AUD}),
    );
    assert!(ok, "{out}");
    let o = d.cli(&[
        "proof",
        "dpop",
        "--method",
        "GET",
        "--url",
        "https://elsewhere.example/",
    ]);
    assert_eq!(o.status.code(), Some(3), "refused: {o:?}");
}
