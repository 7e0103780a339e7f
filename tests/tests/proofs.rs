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
    // `tessera verify` is a bearer check: a bound token fails it (exit 5) unless the caller
    // says it checks the proof itself.
    let o = d.cli_stdin(&["verify", "-", "--audience", AUD], token.as_bytes());
    assert_eq!(o.status.code(), Some(5), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("bound"),
        "{o:?}"
    );
    let o = d.cli_stdin(
        &["verify", "-", "--audience", AUD, "--bound-ok"],
        token.as_bytes(),
    );
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("accept only with its proof"));
    // WIT and WPT through the CLI.
    let o = d.cli(&["wit"]);
    assert!(o.status.success(), "{o:?}");
    let wit = String::from_utf8(o.stdout).unwrap();
    let o = d.cli_stdin(
        &[
            "proof",
            "wpt",
            "--aud",
            "https://api.example.com/w",
            "--wit",
            "-",
        ],
        wit.trim().as_bytes(),
    );
    assert!(o.status.success(), "{o:?}");
    let wpt = String::from_utf8(o.stdout).unwrap();
    let bundle = rt().block_on(d.client().spiffe_bundle()).unwrap();
    let (ok, out) = python_check(
        "check_wimse.py",
        &json!({"wit": wit.trim(), "wpt": wpt.trim(), "bundle": bundle,
                "aud": "https://api.example.com/w"}),
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

fn wit_and_wpt_verify_with_pyjwt(backend: Backend) {
    let dir = exe_dir();
    let other = helper_copy(dir.path(), "other-agent", "w");
    let d = Daemon::start_with(
        backend,
        Options {
            agents: vec![
                (
                    "alpha".into(),
                    format!("[selectors]\nuid = 0\n{}", policy("wit_ttl = \"10m\"")),
                ),
                (
                    "beta".into(),
                    format!(
                        "[selectors]\nuid = 65534\nexe = \"{}\"\n{}",
                        other.display(),
                        policy("")
                    ),
                ),
            ],
            ..Default::default()
        },
    );
    let c = d.client();
    let rt = rt();
    let wit = rt.block_on(c.wit(None)).unwrap();
    let bundle = rt.block_on(c.spiffe_bundle()).unwrap();
    let jwks = rt.block_on(c.jwks()).unwrap();
    let token = rt.block_on(c.token(&TokenOptions::new(AUD))).unwrap().token;
    let aud = "https://api.example.com/v1/jobs";
    let wpt = rt
        .block_on(c.wpt(&tessera::WptOptions::new(aud, &wit.wit).access_token(&token)))
        .unwrap();
    let (ok, out) = python_check(
        "check_wimse.py",
        &json!({"wit": wit.wit, "wpt": wpt.proof, "bundle": bundle, "aud": aud, "token": token}),
    );
    assert!(ok, "PyJWT relying party refused it: {out}");
    let (strict, _) = python_check(
        "check_wimse.py",
        &json!({"wit": wit.wit, "wpt": wpt.proof, "bundle": bundle,
                "aud": "https://api.example.com/v1/other", "token": token}),
    );
    assert!(!strict, "a WPT for another audience passed");
    assert!(out["wit"]["sub"]
        .as_str()
        .unwrap()
        .ends_with("/agent/alpha"));
    let lifetime = out["wit"]["exp"].as_i64().unwrap() - out["wit"]["iat"].as_i64().unwrap();
    assert_eq!(lifetime, 600, "policy wit_ttl");
    // The WIT binds the agent's hardware key (the key of its tokens).
    let kid = tessera_e2e::jwt_header(&token)["kid"].clone();
    let agent_jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .unwrap();
    assert_eq!(out["wit"]["cnf"]["jwk"]["x"], agent_jwk["x"]);
    // The WIT key is published apart: in the SPIFFE bundle as wit-svid, never in /v1/jwks.
    let wit_kid = &out["wit_header"]["kid"];
    assert!(!jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| &k["kid"] == wit_kid));
    let uses: Vec<&str> = bundle["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["use"].as_str().unwrap())
        .collect();
    assert!(
        uses.contains(&"jwt-svid") && uses.contains(&"wit-svid") && uses.contains(&"x509-svid")
    );
    // ... and the x509-svid entry is the CA certificate openssl sees in /v1/bundle.
    let x509 = bundle["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["use"] == "x509-svid")
        .unwrap();
    assert!(x509.get("kid").is_none());
    let pem = rt.block_on(c.bundle()).unwrap();
    let der_b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert_eq!(x509["x5c"][0], der_b64);
    // A WIT is not a token: our verifier refuses it against the bundle's keys.
    assert!(
        tessera::verify::verify(&wit.wit, &bundle, &tessera::verify::Options::new(AUD)).is_err()
    );

    let refused = |o: tessera::WptOptions| rt.block_on(c.wpt(&o)).expect_err("refused").problem();
    assert_eq!(
        refused(tessera::WptOptions::new("https://evil.example/x", &wit.wit)),
        Some(ProblemType::TargetNotAllowed)
    );
    assert_eq!(
        refused(tessera::WptOptions::new(aud, &token)),
        Some(ProblemType::TokenNotAccepted),
        "a token is not a WIT"
    );
    assert_eq!(
        refused(tessera::WptOptions::new(aud, &wit.wit).ttl(std::time::Duration::from_secs(600))),
        Some(ProblemType::TtlNotAllowed)
    );
    // beta cannot use alpha's WIT.
    let body = json!({"type": "wpt", "aud": aud, "wit": wit.wit}).to_string();
    let r = agentcall(&other, 65534, &d.socket, &["post", "/v1/proof", &body]);
    assert_eq!(r["status"], 403, "{r}");
    assert_eq!(r["body"]["type"], "urn:tessera:problem:token-not-accepted");
    // Audited.
    assert_eq!(events(&d, "wit.issued").len(), 1);
    let wpts: Vec<Value> = events(&d, "proof.issued")
        .into_iter()
        .filter(|r| r["details"]["type"] == "wpt")
        .collect();
    assert_eq!(wpts.len(), 1);
    assert_eq!(wpts[0]["details"]["jti"], wpt.jti);
    assert_eq!(wpts[0]["details"]["path"], "/v1/jobs");
}
tessera_e2e::both_backends!(wit_and_wpt_verify_with_pyjwt);

/// RFC 9421 signatures verified by the PyPI package http-message-signatures, the key looked
/// up by `keyid` in the daemon's JWKS; and the CLI's `proof sign-http` with a body digest.
fn http_signatures_verify_with_http_message_signatures(backend: Backend) {
    let d = Daemon::start_with(
        backend,
        Options {
            agents: vec![(
                "alpha".into(),
                format!("[selectors]\nuid = 0\n{}", policy("")),
            )],
            ..Default::default()
        },
    );
    let c = d.client();
    let rt = rt();
    let jwks = rt.block_on(c.jwks()).unwrap();
    let url = "https://api.example.com/v1/orders?limit=10&sort=asc";
    let body = "{\"item\":\"tea\",\"qty\":2}";
    let digest = {
        use base64::Engine;
        use sha2::Digest;
        format!(
            "sha-256=:{}:",
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(body.as_bytes()))
        )
    };
    let sig = rt
        .block_on(
            c.http_signature(
                &tessera::HttpSignatureOptions::new("POST", url)
                    .component("@target-uri")
                    .component("@query")
                    .header("Content-Type", "application/json")
                    .header("X-Request-Id", "r-17")
                    .content_digest(&digest),
            ),
        )
        .unwrap();
    assert!(
        sig.signature_input.starts_with("tessera=("),
        "{}",
        sig.signature_input
    );
    let headers = json!({
        "Content-Type": "application/json",
        "X-Request-Id": "r-17",
        "Content-Digest": digest,
        "Signature-Input": sig.signature_input,
        "Signature": sig.signature,
    });
    let (ok, out) = python_check(
        "check_httpsig.py",
        &json!({"method": "POST", "url": url, "headers": headers, "body": body, "jwks": jwks,
                "require": ["@method", "@authority", "@target-uri", "content-digest", "content-type"]}),
    );
    assert!(ok, "http-message-signatures refused it: {out}");
    assert_eq!(out["params"]["tag"], "tessera");
    assert_eq!(out["params"]["alg"], "ecdsa-p256-sha256");
    // Strict: another body, another header value, or another URL does not verify.
    for (what, m) in [
        ("body", json!({"body": "{\"item\":\"tea\",\"qty\":200}"})),
        ("header", json!({"headers": {"X-Request-Id": "r-18"}})),
        (
            "url",
            json!({"url": "https://api.example.com/v1/orders?limit=1000&sort=asc"}),
        ),
    ] {
        let mut input = json!({"method": "POST", "url": url, "headers": headers.clone(),
                               "body": body, "jwks": jwks});
        for (k, v) in m.as_object().unwrap() {
            if k == "headers" {
                for (hk, hv) in v.as_object().unwrap() {
                    input["headers"][hk] = hv.clone();
                }
            } else {
                input[k] = v.clone();
            }
        }
        let (ok, _) = python_check("check_httpsig.py", &input);
        assert!(!ok, "a changed {what} verified");
    }
    // Refusals: a target outside policy, a component the daemon does not sign, a header
    // value with a line break.
    let refused = |o: tessera::HttpSignatureOptions| {
        rt.block_on(c.http_signature(&o))
            .expect_err("refused")
            .problem()
    };
    assert_eq!(
        refused(tessera::HttpSignatureOptions::new(
            "GET",
            "https://evil.example/"
        )),
        Some(ProblemType::TargetNotAllowed)
    );
    let root = format!("{AUD}/");
    assert_eq!(
        refused(tessera::HttpSignatureOptions::new("GET", &root).component("@status")),
        Some(ProblemType::MalformedRequest)
    );
    assert_eq!(
        refused(tessera::HttpSignatureOptions::new("GET", &root).header("x-a", "1\r\nx-b: 2")),
        Some(ProblemType::MalformedRequest)
    );
    // A target not in its normal form is refused: what is checked must be what is signed
    // (here the policy would see /v1/admin, a signature over the raw text /admin).
    assert_eq!(
        refused(
            tessera::HttpSignatureOptions::new("GET", "https://api.example.com\\v1/admin")
                .component("@path")
        ),
        Some(ProblemType::MalformedRequest)
    );
    // The CLI, with the body's digest computed for us.
    let f = d.scratch_dir().join("body.json");
    std::fs::write(&f, body).unwrap();
    let o = d.cli(&[
        "--json",
        "proof",
        "sign-http",
        "--method",
        "PUT",
        "--url",
        "https://api.example.com/v1/orders/9",
        "--header",
        "Content-Type: application/json",
        "--body-file",
        f.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["content_digest"], digest);
    let (ok, out) = python_check(
        "check_httpsig.py",
        &json!({"method": "PUT", "url": "https://api.example.com/v1/orders/9",
                "headers": {"Content-Type": "application/json", "Content-Digest": digest,
                            "Signature-Input": v["signature_input"], "Signature": v["signature"]},
                "body": body, "jwks": jwks, "require": ["content-digest", "content-type"]}),
    );
    assert!(ok, "{out}");
    // Audited, named by nonce.
    let recs: Vec<Value> = events(&d, "proof.issued")
        .into_iter()
        .filter(|r| r["details"]["type"] == "http-signature")
        .collect();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0]["details"]["jti"], sig.jti);
    assert_eq!(recs[0]["details"]["path"], "/v1/orders");
}
tessera_e2e::both_backends!(http_signatures_verify_with_http_message_signatures);

/// Domain separation: whatever the daemon signs for one purpose does not pass for another —
/// checked with the relying-party code nobody here wrote (PyJWT-based checks) and ours.
#[test]
fn proofs_cannot_pass_for_one_another() {
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
    let c = d.client();
    let rt = rt();
    let jwks = rt.block_on(c.jwks()).unwrap();
    let bundle = rt.block_on(c.spiffe_bundle()).unwrap();
    let bound = rt
        .block_on(c.token(&TokenOptions::new(AUD).bind_dpop()))
        .unwrap()
        .token;
    let url = "https://api.example.com/x";
    let dpop = rt
        .block_on(c.dpop_proof(&DpopOptions::new("GET", url).access_token(&bound)))
        .unwrap()
        .proof;
    let wit = rt.block_on(c.wit(None)).unwrap().wit;
    let wpt = rt
        .block_on(c.wpt(&tessera::WptOptions::new(url, &wit)))
        .unwrap()
        .proof;
    // None of the proofs, nor the WIT, is a token (our verifier and the CLI check typ).
    for (what, jws) in [("dpop", &dpop), ("wpt", &wpt), ("wit", &wit)] {
        assert!(
            tessera::verify::verify(jws, &jwks, &tessera::verify::Options::new(url)).is_err(),
            "{what} passed as a token"
        );
        let o = d.cli_stdin(&["verify", "-", "--audience", url], jws.as_bytes());
        assert_eq!(o.status.code(), Some(5), "{what}: {o:?}");
    }
    // A WPT or a WIT is not a DPoP proof; a DPoP proof is not a WPT; a token is not a WIT.
    for (what, proof) in [("wpt", &wpt), ("wit", &wit)] {
        let (ok, out) = python_check(
            "check_dpop.py",
            &json!({"token": bound, "proof": proof, "jwks": jwks, "method": "GET", "url": url,
                    "audience": AUD}),
        );
        assert!(!ok, "{what} passed as a DPoP proof: {out}");
    }
    let (ok, _) = python_check(
        "check_wimse.py",
        &json!({"wit": wit, "wpt": dpop, "bundle": bundle, "aud": url}),
    );
    assert!(!ok, "a DPoP proof passed as a WPT");
    let (ok, _) = python_check(
        "check_wimse.py",
        &json!({"wit": bound, "wpt": wpt, "bundle": bundle, "aud": url}),
    );
    assert!(!ok, "a token passed as a WIT");
    // And the daemon itself takes none of them for another: a DPoP proof or token is no WIT,
    // a WIT or proof is no bound token.
    for not_wit in [&dpop, &bound] {
        let e = rt
            .block_on(c.wpt(&tessera::WptOptions::new(url, not_wit)))
            .expect_err("refused");
        assert_eq!(e.problem(), Some(ProblemType::TokenNotAccepted));
    }
    for not_token in [&wit, &dpop, &wpt] {
        let e = rt
            .block_on(c.dpop_proof(&DpopOptions::new("GET", url).access_token(not_token)))
            .expect_err("refused");
        assert_eq!(e.problem(), Some(ProblemType::TokenNotAccepted));
    }
}

/// `proof_key = "session"`: proofs are signed by an in-memory key that the hardware-signed
/// bound token (and WIT) names; it rotates, never reaches the state dir, and dies with a
/// revocation.
fn session_proof_keys(backend: Backend) {
    let d = Daemon::start_with(
        backend,
        Options {
            agents: vec![(
                "alpha".into(),
                format!(
                    "[selectors]\nuid = 0\n{}",
                    policy("proof_key = \"session\"\nsession_key_ttl = \"20s\"")
                ),
            )],
            ..Default::default()
        },
    );
    let files_before = state_files(&d);
    let keys_before = d.all_device_keys();
    let c = d.client();
    let rt = rt();
    let jwks = rt.block_on(c.jwks()).unwrap();
    let secret_pages_before = secret_pages(d.pid());
    let t0 = std::time::Instant::now();
    let bound = rt
        .block_on(c.token(&TokenOptions::new(AUD).bind_dpop()))
        .unwrap()
        .token;
    let hw_kid = tessera_e2e::jwt_header(&bound)["kid"].clone();
    let jkt = tessera_e2e::jwt_claims(&bound)["cnf"]["jkt"].clone();
    assert_ne!(
        jkt, hw_kid,
        "bound to the session key, signed by the device key"
    );
    // The key sits in memory that is locked and left out of core dumps (the kernel's own
    // account of the daemon's mappings).
    assert!(
        secret_pages(d.pid()) > secret_pages_before,
        "no locked MADV_DONTDUMP mapping appeared for the session key"
    );
    // The token never outlives the key it names.
    let claims = tessera_e2e::jwt_claims(&bound);
    assert!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() <= 20);
    let url = "https://api.example.com/v1/x";
    let p = rt
        .block_on(c.dpop_proof(&DpopOptions::new("GET", url).access_token(&bound)))
        .unwrap();
    let (ok, out) = python_check(
        "check_dpop.py",
        &json!({"token": bound, "proof": p.proof, "jwks": jwks, "method": "GET", "url": url,
                "audience": AUD}),
    );
    assert!(ok, "PyJWT relying party refused a session-key proof: {out}");
    // The WIT binds the same session key; the WPT it goes with verifies.
    let wit = rt.block_on(c.wit(None)).unwrap().wit;
    let wpt = rt
        .block_on(c.wpt(&tessera::WptOptions::new(url, &wit)))
        .unwrap();
    let bundle = rt.block_on(c.spiffe_bundle()).unwrap();
    let (ok, out) = python_check(
        "check_wimse.py",
        &json!({"wit": wit, "wpt": wpt.proof, "bundle": bundle, "aud": url}),
    );
    assert!(ok, "{out}");
    assert!(out["wit"]["exp"].as_i64().unwrap() - out["wit"]["iat"].as_i64().unwrap() <= 20);
    // Rotation: past half its life the next bound token names a new key; the old token still
    // gets proofs until its key expires.
    // (Past half of 20 s; the first key lives until t0 + 20 s.)
    std::thread::sleep(std::time::Duration::from_secs(11).saturating_sub(t0.elapsed()));
    let bound2 = rt
        .block_on(c.token(&TokenOptions::new(AUD).bind_dpop()))
        .unwrap()
        .token;
    let jkt2 = tessera_e2e::jwt_claims(&bound2)["cnf"]["jkt"].clone();
    assert_ne!(jkt2, jkt, "rotated");
    rt.block_on(c.dpop_proof(&DpopOptions::new("GET", url).access_token(&bound)))
        .expect("the previous key still proves for its token");
    // Nothing of the session keys reached the state dir or the device; the audit has only
    // thumbprints.
    assert_eq!(d.all_device_keys(), keys_before, "no device key made");
    let new_files: Vec<String> = state_files(&d)
        .into_iter()
        .filter(|f| !files_before.contains(f))
        .collect();
    assert!(
        new_files.is_empty(),
        "new files in the state dir: {new_files:?}"
    );
    let proofs = events(&d, "proof.issued");
    assert!(proofs
        .iter()
        .all(|r| r["details"]["proof_key"] == "session"));
    assert!(proofs.iter().any(|r| r["details"]["proof_kid"] == jkt));
    // Revocation drops them: no further proof, even for an unexpired bound token.
    std::fs::remove_file(d.agents_dir().join("alpha.toml")).unwrap();
    d.reload();
    let e = rt
        .block_on(c.dpop_proof(&DpopOptions::new("GET", url).access_token(&bound2)))
        .expect_err("revoked");
    assert!(
        matches!(
            e.problem(),
            Some(ProblemType::UnknownCaller) | Some(ProblemType::AgentRevoked)
        ),
        "{e}"
    );
}
tessera_e2e::both_backends!(session_proof_keys);

/// Mappings of `pid` that are both locked (`lo`) and excluded from core dumps (`dd`).
fn secret_pages(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("VmFlags:"))
        .filter(|f| {
            let f: Vec<&str> = f.split_whitespace().collect();
            f.contains(&"lo") && f.contains(&"dd")
        })
        .count()
}

/// Every file under the state dir except the audit trail, the registry and the log (which
/// change with every request).
fn state_files(d: &Daemon) -> Vec<String> {
    fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    let mut out = vec![];
    walk(d.state_dir(), &mut out);
    out.retain(|f| {
        !(f.contains("/audit/")
            || f.contains("registry.db")
            || f.ends_with("tesserad.log")
            || f.contains("/check/"))
    });
    out.sort();
    out
}
