//! The SDK's relying-party verifiers (`tessera::verify::{dpop, wimse, httpsig}`) accept what
//! the real daemon makes and refuse replays, other targets and stolen tokens; the `reqwest`
//! helper sends a DPoP-bound request that a relying party on loopback checks with them,
//! including the server-nonce round trip.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use serde_json::{json, Value};
use tessera::verify::dpop::{DpopRequest, DpopVerifier};
use tessera::verify::httpsig::{HttpSignatureVerifier, SignedRequest};
use tessera::verify::wimse::{WimseRequest, WimseVerifier};
use tessera::verify::{Options as VerifyOptions, VerifyError};
use tessera::{DpopOptions, TokenOptions};
use tessera_e2e::daemon::Options;
use tessera_e2e::{rt, Backend, Daemon};

const AUD: &str = "https://api.example.com";

fn daemon(backend: Backend, extra_audience: &str) -> Daemon {
    Daemon::start_with(
        backend,
        Options {
            agents: vec![(
                "alpha".into(),
                format!(
                    "[selectors]\nuid = 0\n[policy]\naudiences = [\"{AUD}\", \"{extra_audience}\"]\nrate = 100000\n"
                ),
            )],
            ..Default::default()
        },
    )
}

fn sdk_verifiers_accept_the_daemons_proofs_once(backend: Backend) {
    let d = daemon(backend, "https://other.example.com");
    let c = d.client();
    let rt = rt();
    let jwks = rt.block_on(c.jwks()).unwrap();
    let url = "https://api.example.com/v1/orders";

    // DPoP: the bound token with its proof, once.
    let bound = rt
        .block_on(c.token(&TokenOptions::new(AUD).bind_dpop()))
        .unwrap()
        .token;
    let auth = format!("DPoP {bound}");
    let v = DpopVerifier::new(VerifyOptions::new(AUD));
    let p = rt
        .block_on(c.dpop_proof(&DpopOptions::new("POST", url).access_token(&bound)))
        .unwrap();
    let ok = v
        .verify(
            &DpopRequest::new("POST", "https://api.example.com/v1/orders?x=1", &[&p.proof])
                .authorization(&auth),
            &jwks,
        )
        .expect("the SDK verifier accepts the daemon's proof");
    assert!(ok.token.unwrap().sub.ends_with("/agent/alpha"));
    assert_eq!(ok.jti, p.jti);
    let again = v.verify(
        &DpopRequest::new("POST", url, &[&p.proof]).authorization(&auth),
        &jwks,
    );
    assert!(matches!(again, Err(VerifyError::Replay(_))), "{again:?}");
    // The stolen token alone: refused as a bearer token, and with a proof for another request.
    assert!(matches!(
        tessera::verify::verify(&bound, &jwks, &VerifyOptions::new(AUD)),
        Err(VerifyError::Bound)
    ));
    let p2 = rt
        .block_on(c.dpop_proof(&DpopOptions::new("GET", url).access_token(&bound)))
        .unwrap();
    for (method, target) in [("POST", url), ("GET", "https://api.example.com/v1/other")] {
        assert!(v
            .verify(
                &DpopRequest::new(method, target, &[&p2.proof]).authorization(&auth),
                &jwks
            )
            .is_err());
    }
    // An unbound token presented with a proof made for the bound one.
    let bearer = rt.block_on(c.token(&TokenOptions::new(AUD))).unwrap().token;
    let p3 = rt
        .block_on(c.dpop_proof(&DpopOptions::new("GET", url).access_token(&bound)))
        .unwrap();
    assert!(v
        .verify(
            &DpopRequest::new("GET", url, &[&p3.proof]).authorization(&format!("DPoP {bearer}")),
            &jwks
        )
        .is_err());

    // WIMSE: the WIT from the bundle's wit-svid key, the WPT for this request, once.
    let wit = rt.block_on(c.wit(None)).unwrap().wit;
    let bundle = rt.block_on(c.spiffe_bundle()).unwrap();
    let wpt = rt
        .block_on(c.wpt(&tessera::WptOptions::new(url, &wit).access_token(&bearer)))
        .unwrap()
        .proof;
    let sub = tessera_e2e::jwt_claims(&wit)["sub"]
        .as_str()
        .unwrap()
        .to_string();
    let td = sub
        .trim_start_matches("spiffe://")
        .split('/')
        .next()
        .unwrap();
    let w = WimseVerifier::new(td);
    let req = WimseRequest {
        url,
        wit: &wit,
        wpt: &wpt,
        access_token: Some(&bearer),
        ..Default::default()
    };
    let ok = w
        .verify(&req, &bundle)
        .expect("the SDK accepts the WIT+WPT");
    assert!(ok.wit.sub.ends_with("/agent/alpha"));
    assert!(matches!(
        w.verify(&req, &bundle),
        Err(VerifyError::Replay(_))
    ));
    // Against the agent token keys (/v1/jwks) a WIT has no key; another trust domain,
    // another URL, or the token left out are refused.
    let fresh = || {
        rt.block_on(c.wpt(&tessera::WptOptions::new(url, &wit).access_token(&bearer)))
            .unwrap()
            .proof
    };
    let wpt2 = fresh();
    let req2 = WimseRequest {
        wpt: &wpt2,
        ..req.clone()
    };
    assert!(matches!(
        w.verify(&req2, &jwks),
        Err(VerifyError::UnknownKey(_))
    ));
    assert!(WimseVerifier::new("elsewhere.example")
        .verify(&req2, &bundle)
        .is_err());
    assert!(w
        .verify(
            &WimseRequest {
                url: "https://api.example.com/v1/other",
                ..req2.clone()
            },
            &bundle
        )
        .is_err());
    assert!(w
        .verify(
            &WimseRequest {
                access_token: None,
                ..req2.clone()
            },
            &bundle
        )
        .is_err());
    w.verify(&req2, &bundle)
        .expect("refusals above took no replay-cache place");

    // RFC 9421: the base rebuilt from the request as received.
    let target = "https://api.example.com/v1/orders?limit=10";
    let body = b"{\"item\":\"tea\"}";
    let digest = {
        use base64::Engine;
        use sha2::Digest;
        format!(
            "sha-256=:{}:",
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(body))
        )
    };
    let sig = rt
        .block_on(
            c.http_signature(
                &tessera::HttpSignatureOptions::new("POST", target)
                    .component("@target-uri")
                    .header("content-type", "application/json")
                    .content_digest(&digest),
            ),
        )
        .unwrap();
    let headers = [
        ("Content-Type", "application/json"),
        ("Content-Digest", digest.as_str()),
        ("Signature-Input", sig.signature_input.as_str()),
        ("Signature", sig.signature.as_str()),
    ];
    let h = HttpSignatureVerifier::new()
        .require("@target-uri")
        .require("content-type");
    let req = SignedRequest {
        method: "POST",
        target_uri: target,
        headers: &headers,
        body: Some(body),
    };
    let changed_body = SignedRequest {
        body: Some(b"{\"item\":\"coffee\"}"),
        ..req.clone()
    };
    assert!(h.verify(&changed_body, &jwks).is_err(), "another body");
    let no_body = SignedRequest {
        body: None,
        ..req.clone()
    };
    assert!(h.verify(&no_body, &jwks).is_err(), "the body dropped");
    let changed_type = [
        ("Content-Type", "text/plain"),
        headers[1],
        headers[2],
        headers[3],
    ];
    assert!(h
        .verify(
            &SignedRequest {
                headers: &changed_type,
                ..req.clone()
            },
            &jwks
        )
        .is_err());
    assert!(h
        .verify(
            &SignedRequest {
                target_uri: "https://api.example.com/v1/orders?limit=1000",
                ..req.clone()
            },
            &jwks
        )
        .is_err());
    let ok = h
        .verify(&req, &jwks)
        .expect("the SDK accepts the signature");
    assert_eq!(
        ok.covered,
        [
            "@method",
            "@authority",
            "@target-uri",
            "content-type",
            "content-digest"
        ]
    );
    assert!(matches!(h.verify(&req, &jwks), Err(VerifyError::Replay(_))));
}
tessera_e2e::both_backends!(sdk_verifiers_accept_the_daemons_proofs_once);

/// One HTTP/1.1 request head: method, target, headers.
fn read_head(r: &mut impl BufRead) -> (String, String, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap().to_string(),
        parts.next().unwrap().to_string(),
    );
    let mut headers = vec![];
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').unwrap();
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    (method, target, headers)
}

/// A relying party on loopback that requires a server nonce: the first request is answered
/// 401 `use_dpop_nonce`, the retry is checked with the SDK's DPoP verifier.
#[test]
fn reqwest_helper_sends_a_bound_request_and_follows_the_nonce() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let origin = format!("http://127.0.0.1:{port}");
    let d = daemon(Backend::pkcs11(), &origin);
    let c = d.client();
    let rt = rt();
    let jwks = rt.block_on(c.jwks()).unwrap();
    let server_origin = origin.clone();
    let server = std::thread::spawn(move || -> Vec<Value> {
        let v = DpopVerifier::new(VerifyOptions::new(AUD));
        let mut seen = vec![];
        for i in 0..2 {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let (method, target, headers) = read_head(&mut r);
            let get = |n: &str| -> Vec<&str> {
                headers
                    .iter()
                    .filter(|(k, _)| k == n)
                    .map(|(_, v)| v.as_str())
                    .collect()
            };
            let url = format!("{server_origin}{target}");
            let dpop = get("dpop");
            let auth = get("authorization").first().copied().unwrap_or("");
            let result = v.verify(
                &DpopRequest::new(&method, &url, &dpop)
                    .authorization(auth)
                    .nonce("n-42"),
                &jwks,
            );
            let answer = match (&result, i) {
                (Err(VerifyError::UseNonce), 0) => "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: DPoP error=\"use_dpop_nonce\"\r\nDPoP-Nonce: n-42\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(),
                (Ok(ok), 1) => {
                    let body = json!({"sub": ok.token.as_ref().unwrap().sub}).to_string();
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                }
                _ => "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(),
            };
            seen.push(json!({"method": method, "target": target, "result": format!("{result:?}")}));
            s.write_all(answer.as_bytes()).unwrap();
        }
        seen
    });
    let bound = rt
        .block_on(c.token(&TokenOptions::new(AUD).bind_dpop()))
        .unwrap()
        .token;
    let http = reqwest::Client::new();
    let resp = rt
        .block_on(tessera::reqwest::send_with_dpop(
            &c,
            http.get(format!("{origin}/v1/orders?limit=5")),
            &bound,
        ))
        .unwrap();
    let status = resp.status().as_u16();
    let body = rt.block_on(resp.text()).unwrap();
    let seen = server.join().unwrap();
    assert_eq!(status, 200, "{body} {seen:?}");
    assert!(body.contains("/agent/alpha"), "{body}");
    assert_eq!(seen[1]["target"], "/v1/orders?limit=5");
    // Each proof was audited with the path, never the query.
    let proofs: Vec<Value> = d
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "proof.issued")
        .collect();
    assert_eq!(proofs.len(), 2);
    assert!(proofs.iter().all(|r| r["details"]["path"] == "/v1/orders"));
}
