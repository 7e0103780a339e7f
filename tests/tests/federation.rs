//! Federation (issue 17): an agent trades its tessera assertion for an access token at an
//! OAuth authorization server built on authlib's RFC 7523 grant (tests/python/federation_as.py),
//! which trusts the host only through what the daemon publishes in `publish_dir`, fetched over
//! HTTPS from a static server (discovery document, then `jwks.json`). Real daemon, real SoftHSM.

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tessera_e2e::daemon::Options;
use tessera_e2e::{jwt_claims, jwt_header, rt, Backend, Daemon};

const ISSUER: &str = "https://idp.test/tessera/testhost";
const CLAUDE: &str = "https://api.anthropic.com";

/// The authorization server and its static HTTPS server, killed on drop.
struct AuthServer {
    child: Child,
    port: u16,
    ca: PathBuf,
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AuthServer {
    fn start(publish_dir: &Path, dir: &Path) -> AuthServer {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut child = Command::new(root.join("target/pyenv/bin/python"))
            .arg(root.join("tests/python/federation_as.py"))
            .arg("--publish-dir")
            .arg(publish_dir)
            .args([
                "--issuer",
                ISSUER,
                "--subject-prefix",
                "spiffe://test.example/",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("as.log")).unwrap())
            .spawn()
            .expect("start the authorization server (run scripts/setup)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ports: Value = serde_json::from_str(&line).unwrap_or_else(|_| {
            panic!(
                "authorization server did not start: {line}{}",
                std::fs::read_to_string(dir.join("as.log")).unwrap_or_default()
            )
        });
        AuthServer {
            child,
            port: ports["as"].as_u64().unwrap() as u16,
            ca: dir.join("ca.pem"),
        }
    }

    fn token_endpoint(&self) -> String {
        format!("https://localhost:{}/token", self.port)
    }

    /// POST a form to the token endpoint with curl (another client than ours).
    fn post_form(&self, fields: &[(&str, &str)]) -> (u16, Value) {
        let mut c = Command::new("curl");
        c.args(["-s", "-w", "\n%{http_code}", "--cacert"])
            .arg(&self.ca)
            .arg(self.token_endpoint());
        for (k, v) in fields {
            c.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        let out = c.output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').expect("curl status");
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(body).unwrap_or(json!({ "raw": body })),
        )
    }
}

fn agent_toml(as_port: u16) -> String {
    format!(
        "[selectors]\nuid = {}\n[policy]\naudiences = [\"https://localhost:{as_port}/token\", \"{CLAUDE}\"]\nmax_ttl = \"1h\"\n",
        nix::unistd::getuid()
    )
}

fn publish_dir(base: &Path) -> PathBuf {
    let dir = base.join("publish");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn federation_config(dir: &Path) -> String {
    format!(
        "[federation]\nissuer = \"https://idp.test/tessera/{{host}}\"\npublish_dir = \"{}\"\n",
        dir.display()
    )
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn kids(set: &Value) -> Vec<String> {
    set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn an_agent_exchanges_its_assertion_at_an_authlib_token_endpoint() {
    let base = tessera_e2e::shared_tempdir();
    let publish = publish_dir(base.path());
    let asrv = AuthServer::start(&publish, base.path());
    let mut d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            extra_config: federation_config(&publish),
            agents: vec![
                ("fed-bot".into(), agent_toml(asrv.port)),
                // Another agent (of another uid): its key stays published after fed-bot's goes.
                (
                    "other-bot".into(),
                    "[selectors]\nuid = 65534\n[policy]\naudiences = [\"https://a.example\"]\n"
                        .into(),
                ),
            ],
            ..Default::default()
        },
    );
    let ca = asrv.ca.to_str().unwrap().to_string();
    let cli = |args: &[&str]| {
        Command::new(tessera_e2e::bin("tessera"))
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .env("SSL_CERT_FILE", &ca)
            .output()
            .unwrap()
    };

    // What the daemon published: the discovery document and the agent's key.
    let doc = read_json(&publish.join(".well-known/openid-configuration"));
    assert_eq!(doc["issuer"], ISSUER);
    assert_eq!(doc["jwks_uri"], format!("{ISSUER}/jwks.json"));
    assert_eq!(
        doc["id_token_signing_alg_values_supported"],
        json!(["ES256", "RS256"])
    );
    assert_eq!(doc["subject_types_supported"], json!(["public"]));
    assert_eq!(doc["response_types_supported"], json!(["id_token"]));
    let mode = std::fs::metadata(publish.join("jwks.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644, "readable by the web server");
    let who = rt().block_on(d.client().whoami()).unwrap();
    let published = read_json(&publish.join("jwks.json"));
    assert_eq!(kids(&published).len(), 2, "{published}");
    // The CLI prints the same set, and the inline form keeps only key members.
    let out = cli(&["federation", "jwks"]);
    assert!(out.status.success(), "{out:?}");
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, published);
    let out = cli(&["federation", "jwks", "--inline"]);
    let inline: Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in inline["keys"].as_array().unwrap() {
        for m in k.as_object().unwrap().keys() {
            assert!(
                ["kty", "crv", "x", "y", "kid", "alg", "use"].contains(&m.as_str()),
                "{m} in inline JWKS"
            );
        }
    }

    // The token profile: iss from config, kid, typ, one aud, iat, exp - iat <= 1 h, jti.
    let t = cli(&["token", "--audience", &asrv.token_endpoint()]);
    assert!(t.status.success(), "{t:?}");
    let assertion = String::from_utf8(t.stdout).unwrap().trim().to_string();
    let h = jwt_header(&assertion);
    let c = jwt_claims(&assertion);
    assert_eq!(
        (h["alg"].as_str(), h["typ"].as_str()),
        (Some("ES256"), Some("JWT"))
    );
    let agent_kid = h["kid"].as_str().unwrap().to_string();
    assert!(kids(&published).contains(&agent_kid));
    assert_eq!(c["iss"], ISSUER);
    assert_eq!(c["sub"], who.id.as_str());
    assert_eq!(c["aud"], asrv.token_endpoint().as_str());
    let (iat, exp) = (c["iat"].as_i64().unwrap(), c["exp"].as_i64().unwrap());
    assert!(iat <= tessera_e2e::now_unix() + 1 && exp - iat <= 3600 && exp > iat);
    assert!(c["jti"].as_str().is_some_and(|j| !j.is_empty()));
    assert!(assertion.len() < 16 * 1024);

    // The exchange: authlib verifies against the published key set and hands out a token.
    let (code, first) = asrv.post_form(&[
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("assertion", &assertion),
    ]);
    assert_eq!(code, 200, "{first}");
    assert_eq!(first["subject"], who.id.as_str());
    // The same assertion again: its jti was used.
    let (code, replay) = asrv.post_form(&[
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("assertion", &assertion),
    ]);
    assert_eq!(
        (code, replay["error"].as_str()),
        (400, Some("invalid_grant")),
        "{replay}"
    );
    assert!(
        replay["error_description"]
            .as_str()
            .unwrap_or("")
            .contains("jti"),
        "{replay}"
    );

    // `tessera exchange` asks for a fresh assertion every time, so it never replays.
    for _ in 0..2 {
        let out = cli(&[
            "exchange",
            "--token-endpoint",
            &asrv.token_endpoint(),
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["response"]["subject"], who.id.as_str());
        assert_eq!(v["token_type"], "Bearer");
        assert!(v["expires_at"].as_u64().unwrap() > tessera_e2e::now_unix() as u64);
    }
    let out = cli(&["exchange", "--token-endpoint", &asrv.token_endpoint()]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    // RFC 8693, and the Claude API's JSON shape.
    let out = cli(&[
        "exchange",
        "--preset",
        "rfc8693",
        "--token-endpoint",
        &asrv.token_endpoint(),
        "--param",
        "audience=https://rs.example",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["response"]["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    let claude = format!("https://localhost:{}/v1/oauth/token", asrv.port);
    let claude_args = |extra: &[&str]| {
        let mut a = vec![
            "exchange",
            "--preset",
            "anthropic",
            "--token-endpoint",
            &claude,
            "--param",
            "federation_rule_id=fdrl_01",
            "--param",
            "organization_id=org-1",
        ];
        a.extend_from_slice(extra);
        cli(&a)
    };
    let out = claude_args(&["--param", "service_account_id=svac_01", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = claude_args(&[]);
    assert_eq!(out.status.code(), Some(2), "service_account_id missing");
    // An audience the agent's policy does not allow: the daemon refuses (exit 3).
    let out = cli(&[
        "exchange",
        "--token-endpoint",
        &asrv.token_endpoint(),
        "--audience",
        "https://other.example",
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    // An assertion lifetime over 1 h is refused by the daemon's policy.
    let out = cli(&[
        "exchange",
        "--token-endpoint",
        &asrv.token_endpoint(),
        "--ttl",
        "2h",
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("ttl"),
        "{out:?}"
    );
    // The token endpoint refusing is exit 3 with its error: a form body where the Claude
    // API's endpoint takes JSON.
    let out = cli(&[
        "exchange",
        "--token-endpoint",
        &claude,
        "--audience",
        CLAUDE,
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid_request"),
        "{out:?}"
    );

    // The Rust SDK: one exchange, then the cached token until it nears expiry.
    rt().block_on(async {
        let tls = tessera::exchange::tls_with_roots_pem(&std::fs::read(&ca).unwrap()).unwrap();
        let x = tessera::exchange::Exchanger::new(
            d.client(),
            tessera::exchange::ExchangeOptions::jwt_bearer(asrv.token_endpoint()),
            tls,
        );
        let a = x.access_token().await.unwrap();
        let b = x.access_token().await.unwrap();
        assert_eq!(a.access_token, b.access_token, "cached");
        x.invalidate().await;
        let c = x.access_token().await.unwrap();
        assert_ne!(a.access_token, c.access_token, "a new exchange");
    });

    // The Python and TypeScript SDKs, run as the agent: cached, both grants, the Claude shape.
    let input = json!({
        "socket": d.socket, "endpoint": asrv.token_endpoint(), "claude": claude, "ca": ca,
    });
    let (ok, py) = tessera_e2e::python_check("exchange_sdk.py", &input);
    assert!(ok, "{py}");
    let (ok, node) = tessera_e2e::node_check("exchange_sdk.mjs", &input);
    assert!(ok, "{node}");
    for (sdk, v, refused) in [
        ("python", &py, "AudienceNotAllowed"),
        ("node", &node, "invalid_request"),
    ] {
        assert_eq!(v["first"], v["second"], "{sdk}: cached");
        assert_eq!(v["subject"], who.id.as_str(), "{sdk}");
        assert_eq!(v["claude"], who.id.as_str(), "{sdk}");
        assert_eq!(
            v["token_exchange"], "urn:ietf:params:oauth:token-type:access_token",
            "{sdk}"
        );
        assert_eq!(v["refused"], refused, "{sdk}: {v}");
        assert!(v["expires_at"].as_f64().unwrap() > 0.0, "{sdk}");
    }

    // Revocation: the key leaves the published set, the agent gets no assertion, and an
    // assertion it got before no longer verifies at the relying party.
    let t = cli(&["token", "--audience", &asrv.token_endpoint()]);
    let old = String::from_utf8(t.stdout).unwrap().trim().to_string();
    std::fs::remove_file(d.agents_dir().join("fed-bot.toml")).unwrap();
    d.reload();
    let after = read_json(&publish.join("jwks.json"));
    assert!(!kids(&after).contains(&agent_kid), "{after}");
    assert_eq!(
        kids(&after).len(),
        1,
        "the other agent's key stays: {after}"
    );
    let out = cli(&["exchange", "--token-endpoint", &asrv.token_endpoint()]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let (code, refused) = asrv.post_form(&[
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("assertion", &old),
    ]);
    assert_eq!(code, 400, "{refused}");

    // A restart publishes the same set again, and the trail recorded no failure.
    d.restart();
    assert_eq!(read_json(&publish.join("jwks.json")), after);
    assert!(!d
        .audit_records()
        .iter()
        .any(|r| r["event"] == "federation.publish_failed"));
}

/// `publish_dir` is the power to impersonate every agent: the daemon refuses to start when
/// others could write it, and the configuration is checked (issuer shape, token lifetime).
#[test]
fn an_unsafe_publish_dir_or_a_bad_issuer_is_refused() {
    let base = tessera_e2e::shared_tempdir();
    let publish = publish_dir(base.path());
    std::fs::set_permissions(&publish, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut d = Daemon::prepare(
        Backend::pkcs11(),
        Options {
            extra_config: federation_config(&publish),
            ..Default::default()
        },
    );
    d.spawn();
    let status = d.wait_exit(Duration::from_secs(60));
    assert!(!status.success());
    assert!(
        d.log_text().contains("lets others write it"),
        "{}",
        d.log_text()
    );
    assert!(!publish.join("jwks.json").exists());

    let check = |extra: &str| {
        let cfg = base.path().join("check.toml");
        let text = std::fs::read_to_string(&d.config).unwrap();
        let text = text.replace(&federation_config(&publish), "");
        std::fs::write(&cfg, format!("{text}\n{extra}\n")).unwrap();
        Command::new(tessera_e2e::bin("tesserad"))
            .arg("--check-config")
            .arg(&cfg)
            .output()
            .unwrap()
    };
    for (extra, why) in [
        ("[federation]\nissuer = \"https://idp.test:8443/t\"", "port"),
        ("[federation]\nissuer = \"http://idp.test/t\"", "https"),
        (
            "[federation]\nissuer = \"https://idp.test/t/\"",
            "end with /",
        ),
        (
            "[federation]\npublish_dir = \"/tmp\"",
            "needs federation.issuer",
        ),
        ("[tokens]\nmax_ttl = \"2h\"", "at most 1h"),
    ] {
        let out = check(extra);
        assert!(!out.status.success(), "{extra} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{extra}: {err}");
    }
    assert!(
        check("[federation]\nissuer = \"https://idp.test/tessera/{host}\"")
            .status
            .success()
    );
}

/// A SPIFFE ID over 127 bytes (Google's limit for `sub`) is enrolled with a warning in the log
/// and the audit record; a short one without.
#[test]
fn a_subject_too_long_for_some_relying_parties_is_warned_about() {
    let uid = nix::unistd::getuid();
    let long = "x".repeat(100);
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            extra_config: format!(
                "id_template = \"spiffe://{{trust_domain}}/host/{{host}}/{long}/{{name}}\"\n"
            ),
            agents: vec![(
                "bot".into(),
                format!(
                    "[selectors]\nuid = {uid}\n[policy]\naudiences = [\"https://a.example\"]\n"
                ),
            )],
            ..Default::default()
        },
    );
    let enrolled: Vec<Value> = d
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "agent.enrolled")
        .collect();
    assert_eq!(enrolled.len(), 1);
    let warning = enrolled[0]["details"]["warning"]
        .as_str()
        .unwrap_or_default();
    assert!(warning.contains("127"), "{:?}", enrolled[0]);
    assert!(d.log_text().contains("relying parties that limit `sub`"));
}
