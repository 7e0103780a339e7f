//! Agents get their own tokens: the real daemon on swtpm and SoftHSM, checked with an
//! independent JWT library (jsonwebtoken), with callers of other uids and executables.

use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use jsonwebtoken::{decode, decode_header, jwk::JwkSet, Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};
use tessera::{ProblemType, TokenOptions};
use tessera_e2e::daemon::Options;
use tessera_e2e::{agentcall, helper_copy, sha256_file, Backend, Daemon};

const AUD: &str = "https://api.example.com";

fn agent_toml(selectors: &str, extra_policy: &str) -> String {
    format!(
        "[selectors]\n{selectors}\n[policy]\naudiences = [\"{AUD}\", \"https://*.internal.example.com\"]\nscopes = [\"read\", \"write\"]\nmax_ttl = \"15m\"\n{extra_policy}\n"
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// Verify with jsonwebtoken (not our code) against the daemon's JWKS.
fn independent_verify(token: &str, jwks: &Value, aud: &str) -> Value {
    let header = decode_header(token).unwrap();
    assert_eq!(header.alg, Algorithm::ES256);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    let kid = header.kid.expect("kid");
    let set: JwkSet = serde_json::from_value(jwks.clone()).unwrap();
    let jwk = set.find(&kid).expect("kid in JWKS");
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&[aud]);
    decode::<Value>(token, &DecodingKey::from_jwk(jwk).unwrap(), &v)
        .expect("jsonwebtoken verifies the token")
        .claims
}

fn file_enrolled_agent_gets_a_verifiable_token(backend: Backend) {
    let d = Daemon::start_with(
        backend,
        Options {
            agents: vec![("research-bot".into(), agent_toml("uid = 0", ""))],
            ..Default::default()
        },
    );
    rt().block_on(async {
        let c = d.client();
        assert_eq!(c.health().await.unwrap().backend, d.backend.name());
        let who = c.whoami().await.unwrap();
        assert_eq!(who.name, "research-bot");
        assert_eq!(
            who.id,
            "spiffe://test.example/host/testhost/agent/research-bot"
        );
        let t = c
            .token(
                &TokenOptions::new(AUD)
                    .scope("read")
                    .scope("write")
                    .ttl(Duration::from_secs(120)),
            )
            .await
            .unwrap();
        assert_eq!(t.token_type, "Bearer");
        let jwks = c.jwks().await.unwrap();
        let claims = independent_verify(&t.token, &jwks, AUD);
        assert_eq!(claims["sub"], who.id);
        assert_eq!(claims["iss"], "spiffe://test.example/host/testhost");
        assert_eq!(claims["aud"], AUD);
        assert_eq!(claims["scope"], "read write");
        assert_eq!(
            claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
            120
        );
        assert!(claims["jti"].as_str().unwrap().len() >= 16);
        // JWKS entries are complete RFC 7517 keys.
        let k = &jwks["keys"][0];
        assert_eq!(
            (
                k["kty"].as_str(),
                k["crv"].as_str(),
                k["alg"].as_str(),
                k["use"].as_str()
            ),
            (Some("EC"), Some("P-256"), Some("ES256"), Some("sig"))
        );
        // Our own verifier agrees, and refuses another audience.
        let opts = tessera::verify::Options::new(AUD);
        assert_eq!(
            tessera::verify::verify(&t.token, &jwks, &opts).unwrap().sub,
            who.id
        );
        assert!(tessera::verify::verify(
            &t.token,
            &jwks,
            &tessera::verify::Options::new("https://other")
        )
        .is_err());
        // Default TTL: 5 minutes.
        let t = c
            .token(&TokenOptions::new("https://db.internal.example.com"))
            .await
            .unwrap();
        let claims = independent_verify(&t.token, &jwks, "https://db.internal.example.com");
        assert_eq!(
            claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
            300
        );
        assert!(claims.get("scope").is_none());
    });
    // The CLI prints a token that verifies, and `tessera verify` agrees.
    let out = d.cli(&["token", "--audience", AUD, "--scope", "read"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    // From standard input (`-`), never from the command line where /proc/*/cmdline shows it.
    let out = d.cli_stdin(&["verify", "-", "--audience", AUD], token.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = d.scratch_dir().join("token");
    std::fs::write(&file, &token).unwrap();
    let out = d.cli(&["verify", file.to_str().unwrap(), "--audience", AUD]);
    assert!(out.status.success(), "from a file: {out:?}");
    let out = d.cli_stdin(
        &["verify", "-", "--audience", "https://nope"],
        token.as_bytes(),
    );
    assert_eq!(out.status.code(), Some(5));
    let out = d.cli(&["--json", "token", "--audience", AUD]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["expires_at"].as_str().unwrap().ends_with('Z'));
}

tessera_e2e::both_backends!(file_enrolled_agent_gets_a_verifiable_token);

/// Run `exe` (an agentcall copy) as `uid`, asking for a token.
fn callers_are_told_apart_by_uid_and_executable(backend: Backend) {
    let bins = tessera_e2e::exe_dir();
    let a = helper_copy(bins.path(), "agent-a", "salt-a");
    let b = helper_copy(bins.path(), "agent-b", "salt-b");
    let d = Daemon::start_with(
        backend,
        Options {
            agents: vec![
                (
                    "alpha".into(),
                    agent_toml(&format!("uid = 65534\nexe = \"{}\"", a.display()), ""),
                ),
                (
                    "beta".into(),
                    agent_toml(
                        &format!("uid = 65534\nexe_sha256 = \"{}\"", sha256_file(&b)),
                        "",
                    ),
                ),
            ],
            ..Default::default()
        },
    );
    let ra = agentcall(&a, 65534, &d.socket, &["token", AUD]);
    let rb = agentcall(&b, 65534, &d.socket, &["token", AUD]);
    assert_eq!(ra["status"], 200, "{ra}");
    assert_eq!(rb["status"], 200, "{rb}");
    let jwks = rt().block_on(d.client().jwks()).unwrap();
    let ca = independent_verify(ra["body"]["token"].as_str().unwrap(), &jwks, AUD);
    let cb = independent_verify(rb["body"]["token"].as_str().unwrap(), &jwks, AUD);
    assert!(ca["sub"].as_str().unwrap().ends_with("/agent/alpha"));
    assert!(cb["sub"].as_str().unwrap().ends_with("/agent/beta"));
    // Neither can get the other's identity by naming it.
    let rb_as_a = Command::new(&b)
        .arg(&d.socket)
        .args(["whoami"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&rb_as_a.stdout).unwrap();
    assert_eq!(v["body"]["name"], "beta");
    let r = rt().block_on(async {
        // root is neither alpha nor beta even when asking for them by name
        d.client()
            .token(&TokenOptions::new(AUD).agent("alpha"))
            .await
    });
    assert_eq!(r.unwrap_err().problem(), Some(ProblemType::UnknownCaller));
    // Another uid running a matching executable is still not alpha (uid 65533).
    let other = agentcall(&a, 65533, &d.socket, &["token", AUD]);
    assert_eq!(other["status"], 403, "{other}");
    assert_eq!(other["body"]["type"], "urn:tessera:problem:unknown-caller");
    assert!(other["body"].get("token").is_none());
}

tessera_e2e::both_backends!(callers_are_told_apart_by_uid_and_executable);

async fn raw(d: &Daemon, body: &[u8]) -> (u16, Option<u64>, Value) {
    let (s, retry, b) = d
        .client()
        .request(tessera::Method::POST, "/v1/token", Some(body.to_vec()))
        .await
        .unwrap();
    (s, retry, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn policy_refusals_have_stable_types(backend: Backend) {
    let d = Daemon::start_with(
        backend,
        Options {
            agents: vec![("bot".into(), agent_toml("uid = 0", "rate = 5"))],
            extra_config: "[limits]\nmax_body_bytes = 1024\n".into(),
            ..Default::default()
        },
    );
    rt().block_on(async {
        let cases: Vec<(Value, u16, &str)> = vec![
            (
                json!({"audience": "https://evil.example.com"}),
                403,
                "audience-not-allowed",
            ),
            (
                json!({"audience": AUD, "scopes": ["admin"]}),
                403,
                "scope-not-allowed",
            ),
            (
                json!({"audience": AUD, "ttl": "2h"}),
                403,
                "ttl-not-allowed",
            ),
            (
                json!({"audience": AUD, "ttl": "soon"}),
                400,
                "malformed-request",
            ),
            (
                json!({"audience": AUD, "unknown": 1}),
                400,
                "malformed-request",
            ),
        ];
        for (body, status, slug) in cases {
            let (s, _, b) = raw(&d, body.to_string().as_bytes()).await;
            assert_eq!(
                (s, b["type"].as_str()),
                (status, Some(format!("urn:tessera:problem:{slug}").as_str())),
                "{body} -> {b}"
            );
            assert_eq!(b["status"], status);
            assert!(!b["title"].as_str().unwrap().is_empty());
        }
        let (_, _, b) = raw(
            &d,
            json!({"audience": AUD, "ttl": "2h"}).to_string().as_bytes(),
        )
        .await;
        assert!(
            b["detail"].as_str().unwrap().contains("15m"),
            "names the maximum: {b}"
        );
        let (s, _, b) = raw(&d, b"{not json").await;
        assert_eq!(
            (s, b["type"].as_str()),
            (400, Some("urn:tessera:problem:malformed-request"))
        );
        let big = format!("{{\"audience\": \"{}\"}}", "x".repeat(4096));
        let (s, _, b) = raw(&d, big.as_bytes()).await;
        assert_eq!(
            (s, b["type"].as_str()),
            (413, Some("urn:tessera:problem:body-too-large"))
        );
        // Rate: 5 per minute; refusals above did not count, so 5 succeed, the 6th is 429.
        for i in 0..5 {
            let (s, _, b) = raw(&d, json!({"audience": AUD}).to_string().as_bytes()).await;
            assert_eq!(s, 200, "request {i}: {b}");
        }
        let (s, retry, b) = raw(&d, json!({"audience": AUD}).to_string().as_bytes()).await;
        assert_eq!(
            (s, b["type"].as_str()),
            (429, Some("urn:tessera:problem:rate-limited"))
        );
        assert!(retry.unwrap_or(0) >= 1, "Retry-After set");
        // The daemon still serves.
        assert_eq!(d.client().health().await.unwrap().status, "ok");
        let (s, _, _) = raw(&d, b"").await;
        assert_eq!(s, 400);
    });
    // Every refusal is in the audit trail.
    let denied = d
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "access.denied")
        .count();
    assert_eq!(denied, 10, "every refused token request audited");
}

tessera_e2e::both_backends!(policy_refusals_have_stable_types);

fn many_concurrent_tokens_all_verify_and_never_repeat(backend: Backend) {
    let d = Daemon::start_with(
        backend,
        Options {
            agents: vec![("busy".into(), agent_toml("uid = 0", "rate = 100000"))],
            ..Default::default()
        },
    );
    let tokens: Vec<String> = rt().block_on(async {
        let mut tasks = vec![];
        for _ in 0..16 {
            let c = d.client();
            tasks.push(tokio::spawn(async move {
                let mut got = vec![];
                for _ in 0..125 {
                    got.push(
                        c.token(&TokenOptions::new(AUD).scope("read"))
                            .await
                            .expect("token")
                            .token,
                    );
                }
                got
            }));
        }
        let mut all = vec![];
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    assert_eq!(tokens.len(), 2000);
    let jwks = rt().block_on(d.client().jwks()).unwrap();
    let mut jtis = HashSet::new();
    for t in &tokens {
        let c = independent_verify(t, &jwks, AUD);
        assert!(
            jtis.insert(c["jti"].as_str().unwrap().to_string()),
            "jti repeated"
        );
    }
    // Each token is in the audit exactly once, with this process as the caller.
    let mut audited = HashSet::new();
    for r in d
        .audit_records()
        .iter()
        .filter(|r| r["event"] == "token.issued")
    {
        assert!(audited.insert(r["details"]["jti"].as_str().unwrap().to_string()));
        assert_eq!(r["caller"]["pid"], std::process::id());
        assert_eq!(r["caller"]["uid"], 0);
        assert!(r["caller"]["exe"]
            .as_str()
            .is_some_and(|e| e.starts_with('/')));
        // No agent pins this caller by hash, so its executable is never read.
        assert!(r["caller"]["exe_sha256"].is_null());
    }
    assert_eq!(audited, jtis);
}

tessera_e2e::both_backends!(many_concurrent_tokens_all_verify_and_never_repeat);

#[test]
fn slow_clients_are_cut_off_by_the_header_timeout() {
    use std::io::{Read, Write};
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            extra_config: "[limits]\nheader_read_timeout = \"1s\"\nmax_connections = 4\n".into(),
            ..Default::default()
        },
    );
    let mut slow = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    slow.write_all(b"GET /v1/health HTTP/1.1\r\nHost: t\r\n")
        .unwrap(); // headers never finish
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = vec![];
    let _ = slow.read_to_end(&mut buf);
    let waited = t0.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "connection closed by the daemon, after {waited:?}"
    );
    // Other clients are served meanwhile and after.
    assert_eq!(rt().block_on(d.client().health()).unwrap().status, "ok");
}
