//! Keyless mutual TLS: agents present certificates for their hardware keys in TLS 1.3, the
//! CertificateVerify signed by the daemon (`POST /v1/tls/sign`), which signs nothing else.
//! Checked against `openssl s_server` (not our code) and between two agents with the SDK's
//! rustls configs; a revoked agent's next handshake fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};
use tessera::tls::rustls::{self, pki_types::pem::PemObject, pki_types::CertificateDer};
use tessera::tls::{
    client_config, client_config_and_resolver, peer_spiffe_id, server_config, TlsOptions,
};
use tessera::Method;
use tessera_e2e::daemon::Options;
use tessera_e2e::{agentcall, exe_dir, helper_copy, rt, Backend, Daemon};

fn agents(other: &Path) -> Vec<(String, String)> {
    let policy = "[policy]\naudiences = [\"https://api.example.com\"]\nrate = 100000\n";
    vec![
        ("alpha".into(), format!("[selectors]\nuid = 0\n{policy}")),
        (
            "beta".into(),
            format!("[selectors]\nuid = 0\n{policy}tls_server = true\n"),
        ),
        (
            "gamma".into(),
            format!(
                "[selectors]\nuid = 65534\nexe = \"{}\"\n{policy}",
                other.display()
            ),
        ),
    ]
}

fn content(role: &str, hash_len: usize) -> Vec<u8> {
    let mut c = vec![0x20u8; 64];
    c.extend_from_slice(format!("TLS 1.3, {role} CertificateVerify").as_bytes());
    c.push(0);
    c.extend(std::iter::repeat_n(0xabu8, hash_len));
    c
}

fn sign(d: &Daemon, body: &Value) -> (u16, Value) {
    let (status, _, bytes) = rt()
        .block_on(d.client().request(
            Method::POST,
            "/v1/tls/sign",
            Some(body.to_string().into_bytes()),
        ))
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn tls_signed(d: &Daemon) -> Vec<Value> {
    d.audit_records()
        .into_iter()
        .filter(|r| r["event"] == "tls.signed")
        .collect()
}

/// The daemon signs a TLS 1.3 CertificateVerify content for the caller's agent and nothing
/// else; the signature verifies over exactly that content with the agent's key.
fn signs_only_tls13_certificate_verify(backend: Backend) {
    let dir = exe_dir();
    let other = helper_copy(dir.path(), "other-agent", "t");
    let mut list = agents(&other);
    list.push((
        "slow".into(),
        "[selectors]\nuid = 0\n[policy]\naudiences = [\"https://api.example.com\"]\nrate = 2\n"
            .into(),
    ));
    let d = Daemon::start_with(
        backend,
        Options {
            agents: list,
            ..Default::default()
        },
    );
    let good = content("client", 32);
    let (status, out) = sign(
        &d,
        &json!({"scheme": "ecdsa_secp256r1_sha256", "role": "client", "agent": "alpha",
                "content": STANDARD.encode(&good)}),
    );
    assert_eq!(status, 200, "{out}");
    // Verified with the agent key from the JWKS by p256 over SHA-256 of the content.
    let sig = STANDARD.decode(out["signature"].as_str().unwrap()).unwrap();
    let sig = p256::ecdsa::Signature::from_der(&sig).unwrap();
    let jwks = rt().block_on(d.client().jwks()).unwrap();
    let alpha_kid = rt()
        .block_on(d.client().whoami_agent(Some("alpha")))
        .unwrap()
        .key_id
        .unwrap();
    let alpha_key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == alpha_kid.as_str())
        .unwrap();
    {
        use p256::ecdsa::signature::Verifier;
        tessera::attestation::key_from_jwk(alpha_key)
            .unwrap()
            .verify(&good, &sig)
            .expect("the signature is over the content, by alpha's key");
    }
    // 48-byte transcript hashes (SHA-384 suites) too.
    let (status, _) = sign(
        &d,
        &json!({"scheme": "ecdsa_secp256r1_sha256", "role": "client", "agent": "alpha",
                "content": STANDARD.encode(content("client", 48))}),
    );
    assert_eq!(status, 200);

    // Not a TLS 1.3 CertificateVerify content: a JWT signing input, a certificate's DER,
    // TLS 1.2 ServerKeyExchange-style data, the other role's context, a wrong length.
    let jwt_input = format!(
        "{}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","typ":"JWT"}"#),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"sub":"x"}"#)
    );
    let pem = rt()
        .block_on(
            d.client()
                .certificate(&tessera::CertificateOptions::default().agent("alpha")),
        )
        .unwrap();
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec();
    let mut tls12 = vec![0u8; 64];
    tls12.extend_from_slice(&[3, 0, 23, 65]);
    tls12.extend(std::iter::repeat_n(4u8, 65));
    let mut not_spaces = content("client", 32);
    not_spaces[0] = b'x';
    for (what, role, bytes) in [
        ("JWT signing input", "client", jwt_input.into_bytes()),
        ("certificate DER", "client", der),
        ("TLS 1.2 signed params", "client", tls12),
        ("server context as client", "client", content("server", 32)),
        ("short hash", "client", content("client", 31)),
        ("long hash", "client", content("client", 64)),
        ("not 64 spaces", "client", not_spaces),
    ] {
        let (status, out) = sign(
            &d,
            &json!({"scheme": "ecdsa_secp256r1_sha256", "role": role, "agent": "alpha",
                    "content": STANDARD.encode(&bytes)}),
        );
        assert_eq!(status, 400, "{what}: {out}");
        assert_eq!(
            out["type"], "urn:tessera:problem:malformed-request",
            "{what}"
        );
    }
    // Another scheme, TLS 1.2-only schemes included.
    for scheme in [
        "rsa_pss_rsae_sha256",
        "ecdsa_sha1",
        "ecdsa_secp384r1_sha384",
    ] {
        let (status, _) = sign(
            &d,
            &json!({"scheme": scheme, "role": "client", "agent": "alpha",
                    "content": STANDARD.encode(content("client", 32))}),
        );
        assert_eq!(status, 400, "{scheme}");
    }
    // The server role needs policy tls_server.
    let (status, out) = sign(
        &d,
        &json!({"scheme": "ecdsa_secp256r1_sha256", "role": "server", "agent": "alpha",
                "content": STANDARD.encode(content("server", 32))}),
    );
    assert_eq!(status, 403, "{out}");
    assert_eq!(out["type"], "urn:tessera:problem:tls-role-not-allowed");
    let (status, _) = sign(
        &d,
        &json!({"scheme": "ecdsa_secp256r1_sha256", "role": "server", "agent": "beta",
                "content": STANDARD.encode(content("server", 32))}),
    );
    assert_eq!(status, 200);
    // The caller is the one signing: gamma's process cannot have alpha sign.
    let body = json!({"scheme": "ecdsa_secp256r1_sha256", "role": "client", "agent": "alpha",
                      "content": STANDARD.encode(content("client", 32))})
    .to_string();
    let r = agentcall(&other, 65534, &d.socket, &["post", "/v1/tls/sign", &body]);
    assert_eq!(r["status"], 403, "{r}");
    // The certificate named must be one of this agent's: its own passes, beta's does not.
    let x5t = |pem: &str| {
        tessera::verify::x5t_s256(
            CertificateDer::from_pem_slice(pem.as_bytes())
                .unwrap()
                .as_ref(),
        )
    };
    let beta_pem = rt()
        .block_on(
            d.client()
                .certificate(&tessera::CertificateOptions::default().agent("beta")),
        )
        .unwrap();
    for (cert, want) in [(x5t(&pem), 200), (x5t(&beta_pem), 403)] {
        let (status, out) = sign(
            &d,
            &json!({"scheme": "ecdsa_secp256r1_sha256", "role": "client", "agent": "alpha",
                    "content": STANDARD.encode(content("client", 32)), "x5t#S256": cert}),
        );
        assert_eq!(status, want, "{out}");
    }
    // Signatures count against the agent's rate like any credential.
    let slow = json!({"scheme": "ecdsa_secp256r1_sha256", "role": "client", "agent": "slow",
                      "content": STANDARD.encode(content("client", 32))});
    assert_eq!(sign(&d, &slow).0, 200);
    assert_eq!(sign(&d, &slow).0, 200);
    let (status, out) = sign(&d, &slow);
    assert_eq!(status, 429, "{out}");
    // Audited: exactly the signatures handed out (alpha 2 + beta 1 + alpha by x5t + slow 2).
    let signed = tls_signed(&d);
    assert_eq!(signed.len(), 6, "{signed:?}");
    assert_eq!(signed[2]["details"]["role"], "server");
    assert!(signed.iter().all(|r| r["caller"]["uid"] == 0));
}
tessera_e2e::both_backends!(signs_only_tls13_certificate_verify);

/// `openssl s_server` requiring a client certificate from the host CA accepts the agent (the
/// page it serves names the client certificate, whose URI SAN is the agent's SPIFFE ID); an
/// `openssl s_client` with a key and certificate of its own is refused.
fn openssl_server_accepts_the_agent(backend: Backend) {
    let dir = exe_dir();
    let other = helper_copy(dir.path(), "other-agent", "o");
    let d = Daemon::start_with(
        backend,
        Options {
            agents: agents(&other),
            ..Default::default()
        },
    );
    let scratch = d.scratch_dir();
    let bundle = scratch.join("bundle.pem");
    std::fs::write(&bundle, rt().block_on(d.client().bundle()).unwrap()).unwrap();
    for name in ["srv", "self"] {
        tessera_e2e::openssl_leaf(&scratch, name, None);
    }
    let (server, port) = s_server(&scratch, &bundle);
    let _kill = KillOnDrop(server);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(scratch.join("srv.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rt()
        .block_on(client_config(
            &d.client(),
            &TlsOptions {
                agent: Some("alpha".into()),
                roots: Some(roots),
                ..Default::default()
            },
        ))
        .unwrap();
    let page = https_get(Arc::new(config), port, "localhost").expect("handshake and page");
    assert!(page.contains("Client certificate"), "{page}");
    let pem_start = page.find("-----BEGIN CERTIFICATE-----").unwrap();
    let cert = CertificateDer::from_pem_slice(&page.as_bytes()[pem_start..]).unwrap();
    let id = peer_spiffe_id(&[cert]).unwrap();
    assert!(id.ends_with("/agent/alpha"), "{id}");
    assert!(page.contains("TLSv1.3"), "{page}");
    assert_eq!(tls_signed(&d).len(), 1);

    // A client with its own key and certificate (not from the host CA) is refused.
    let mut c = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-tls1_3",
            "-ign_eof",
        ])
        .args([
            "-cert", "self.pem", "-key", "self.key", "-CAfile", "srv.pem",
        ])
        .current_dir(&scratch)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .unwrap();
    let o = c.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !text.contains("Client certificate") && !text.contains("HTTP/1.0 200"),
        "{text}"
    );
    assert!(
        text.contains("alert") || text.contains("error"),
        "no refusal in: {text}"
    );
}
tessera_e2e::both_backends!(openssl_server_accepts_the_agent);

/// Two agents on one host: beta serves TLS with its hardware-backed certificate and requires
/// a client certificate (host CA + CRL); alpha connects knowing beta by SPIFFE ID and sends a
/// token bound to the certificate it presents (RFC 8705), which beta checks against the
/// connection's certificate. After alpha is revoked its next handshake fails.
fn two_agents_speak_mtls_and_revocation_ends_it(backend: Backend) {
    let dir = exe_dir();
    let other = helper_copy(dir.path(), "other-agent", "m");
    let d = Daemon::start_with(
        backend,
        Options {
            agents: agents(&other),
            ..Default::default()
        },
    );
    let c = d.client();
    let rt = rt();
    let beta_cfg = rt
        .block_on(server_config(
            &c,
            &TlsOptions {
                agent: Some("beta".into()),
                ..Default::default()
            },
        ))
        .unwrap();
    let beta_pem = rt
        .block_on(c.certificate(&tessera::CertificateOptions::default().agent("beta")))
        .unwrap();
    let beta_id =
        peer_spiffe_id(&[CertificateDer::from_pem_slice(beta_pem.as_bytes()).unwrap()]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let beta_cfg = Arc::new(beta_cfg);
    let jwks = rt.block_on(c.jwks()).unwrap();
    let server = std::thread::spawn(move || {
        let mut seen = vec![];
        for _ in 0..3 {
            let (tcp, _) = listener.accept().unwrap();
            let conn = rustls::ServerConnection::new(beta_cfg.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut line = String::new();
            let r = BufReader::new(&mut tls).read_line(&mut line);
            let peer = tls
                .conn
                .peer_certificates()
                .and_then(peer_spiffe_id)
                .unwrap_or_default();
            if r.is_ok() && !peer.is_empty() {
                // The token must be bound to the certificate this connection was made with.
                let cert = tls.conn.peer_certificates().unwrap()[0].to_vec();
                let check = tessera::verify::verify_mtls(
                    line.trim(),
                    &jwks,
                    &tessera::verify::Options::new("https://api.example.com"),
                    &cert,
                )
                .map(|c| c.sub);
                let _ = tls.write_all(format!("hello {peer} {check:?}\n").as_bytes());
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
            seen.push(format!("{r:?} {peer}"));
        }
        seen
    });
    let (alpha_cfg, presented) = rt
        .block_on(client_config_and_resolver(
            &c,
            &TlsOptions {
                agent: Some("alpha".into()),
                server_spiffe_id: Some(beta_id.clone()),
                cert_ttl: Some(std::time::Duration::from_secs(120)),
                ..Default::default()
            },
        ))
        .unwrap();
    let alpha_cfg = Arc::new(alpha_cfg);
    let x5t = presented.x5t_s256().unwrap();
    let bound = rt
        .block_on(
            c.token(
                &tessera::TokenOptions::new("https://api.example.com")
                    .agent("alpha")
                    .ttl(std::time::Duration::from_secs(600))
                    .bind_mtls(&x5t),
            ),
        )
        .unwrap();
    let claims = tessera_e2e::jwt_claims(&bound.token);
    assert_eq!(claims["cnf"]["x5t#S256"], x5t.as_str());
    assert!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() <= 120,
        "the token outlives its certificate: {claims}"
    );
    assert!(matches!(
        tessera::verify::verify(
            &bound.token,
            &jwks_of(&d),
            &tessera::verify::Options::new("https://api.example.com")
        ),
        Err(tessera::verify::VerifyError::Bound)
    ));
    let answer = talk(alpha_cfg.clone(), port, &bound.token).expect("alpha talks to beta");
    assert!(answer.starts_with("hello spiffe://"), "{answer}");
    assert!(answer.contains("/agent/alpha Ok("), "{answer}");
    // A token bound to another certificate (a second one of alpha's) is refused by beta.
    let other_pem = rt
        .block_on(c.certificate(&tessera::CertificateOptions::default().agent("alpha")))
        .unwrap();
    let other_x5t = tessera::verify::x5t_s256(
        CertificateDer::from_pem_slice(other_pem.as_bytes())
            .unwrap()
            .as_ref(),
    );
    let other_bound = rt
        .block_on(
            c.token(
                &tessera::TokenOptions::new("https://api.example.com")
                    .agent("alpha")
                    .bind_mtls(&other_x5t),
            ),
        )
        .unwrap();
    let answer = talk(alpha_cfg.clone(), port, &other_bound.token).unwrap();
    assert!(answer.contains("Err(Rejected"), "{answer}");
    // The daemon binds only certificates it issued to this agent.
    let beta_x5t = tessera::verify::x5t_s256(
        CertificateDer::from_pem_slice(beta_pem.as_bytes())
            .unwrap()
            .as_ref(),
    );
    for (opts, want) in [
        (
            tessera::TokenOptions::new("https://api.example.com")
                .agent("alpha")
                .bind_mtls(&beta_x5t),
            tessera::ProblemType::TokenNotAccepted,
        ),
        (
            tessera::TokenOptions::new("https://api.example.com")
                .agent("alpha")
                .bind_mtls("not-a-thumbprint"),
            tessera::ProblemType::MalformedRequest,
        ),
    ] {
        let e = rt.block_on(c.token(&opts)).expect_err("refused");
        assert_eq!(e.problem(), Some(want), "{e}");
    }
    let roles: Vec<Value> = tls_signed(&d)
        .iter()
        .map(|r| json!([r["agent"]["name"], r["details"]["role"]]))
        .collect();
    assert!(roles.contains(&json!(["alpha", "client"])), "{roles:?}");
    assert!(roles.contains(&json!(["beta", "server"])), "{roles:?}");

    // Revoke alpha: its next handshake fails (the daemon no longer signs for it).
    std::fs::remove_file(d.agents_dir().join("alpha.toml")).unwrap();
    d.reload();
    assert!(
        talk(alpha_cfg, port, &bound.token).is_err(),
        "a revoked agent completed a handshake"
    );
    let seen = server.join().unwrap();
    assert!(seen[2].contains("Err"), "{seen:?}");
}
tessera_e2e::both_backends!(two_agents_speak_mtls_and_revocation_ends_it);

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `openssl s_server` on a free loopback port, requiring a client certificate from `ca`.
fn s_server(dir: &Path, ca: &Path) -> (Child, u16) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new("openssl")
        .args(["s_server", "-accept", &format!("127.0.0.1:{port}")])
        .args(["-cert", "srv.pem", "-key", "srv.key", "-tls1_3", "-www"])
        .args(["-Verify", "1", "-verify_return_error", "-CAfile"])
        .arg(ca)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    for l in lines.by_ref() {
        if l.unwrap().contains("ACCEPT") {
            break;
        }
    }
    // Keep draining so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, port)
}

fn https_get(config: Arc<rustls::ClientConfig>, port: u16, name: &str) -> Result<String, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(config, name.to_string().try_into().unwrap())
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let r = tls.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    match r {
        Ok(_) => Ok(text),
        // openssl may close without close_notify after the page.
        Err(_) if text.contains("HTTP/1.0 200") => Ok(text),
        Err(e) => Err(format!("{e}: {text}")),
    }
}

fn jwks_of(d: &Daemon) -> Value {
    rt().block_on(d.client().jwks()).unwrap()
}

fn talk(config: Arc<rustls::ClientConfig>, port: u16, token: &str) -> Result<String, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(config, "beta.agent".try_into().unwrap())
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(format!("{token}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    tls.read_to_string(&mut out).map_err(|e| e.to_string())?;
    if out.is_empty() {
        return Err("no answer".into());
    }
    Ok(out)
}

/// `tessera tls-proxy`: curl speaks plain HTTP to a Unix socket, the proxy carries it over
/// mutual TLS as the agent to an `openssl s_server` that requires the agent's certificate. The
/// socket is 0600 in a 0700 directory; an agent pinned to an executable is refused, and so is
/// TCP without --insecure-any-local-user.
fn tls_proxy_carries_curl_over_mtls(backend: Backend) {
    let dir = exe_dir();
    let other = helper_copy(dir.path(), "other-agent", "p");
    let mut list = agents(&other);
    // Pinned to a copy of the CLI (outside /tmp, where exe selectors are refused): the proxy
    // run from that copy matches the agent, and must refuse to act for it.
    let pinned_cli = dir.path().join("tessera-pinned");
    std::fs::copy(tessera_e2e::bin("tessera"), &pinned_cli).unwrap();
    list.push((
        "pinned".into(),
        format!(
            "[selectors]\nuid = 0\nexe = \"{}\"\n[policy]\naudiences = [\"https://api.example.com\"]\n",
            pinned_cli.display()
        ),
    ));
    let d = Daemon::start_with(
        backend,
        Options {
            agents: list,
            ..Default::default()
        },
    );
    let scratch = d.scratch_dir();
    let bundle = scratch.join("bundle.pem");
    std::fs::write(&bundle, rt().block_on(d.client().bundle()).unwrap()).unwrap();
    tessera_e2e::openssl_leaf(&scratch, "srv", None);
    let (server, port) = s_server(&scratch, &bundle);
    let _server = KillOnDrop(server);
    let sock = scratch.join("proxy").join("alpha.sock");
    let upstream = format!("localhost:{port}");
    let proxy_from = |cli: &Path, extra: &[&str]| {
        let mut c = Command::new(cli);
        c.arg("--socket")
            .arg(&d.socket)
            .args(["tls-proxy", "--upstream", &upstream, "--upstream-ca"])
            .arg(scratch.join("srv.pem"))
            .args(extra);
        c
    };
    let cli = tessera_e2e::bin("tessera");
    let proxy_cmd = |extra: &[&str]| proxy_from(&cli, extra);
    let proxy = proxy_cmd(&["--agent", "alpha", "--listen", sock.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut proxy = KillOnDrop(proxy);
    let t0 = std::time::Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed().as_secs() < 20, "the proxy did not listen");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(mode(sock.parent().unwrap()), 0o700);
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--unix-socket"])
        .arg(&sock)
        .arg("http://localhost/")
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{o:?}");
    assert!(page.contains("Client certificate"), "{page}");
    let pem_start = page.find("-----BEGIN CERTIFICATE-----").unwrap();
    let cert = CertificateDer::from_pem_slice(&page.as_bytes()[pem_start..]).unwrap();
    assert!(peer_spiffe_id(&[cert]).unwrap().ends_with("/agent/alpha"));
    assert!(tls_signed(&d).iter().any(|r| r["agent"]["name"] == "alpha"));
    // The same uid with another gid may open the socket (root), but the proxy turns it away:
    // a peer must match the proxy's uid, gid and unit.
    let signed_before = tls_signed(&d).len();
    let o = {
        use std::os::unix::process::CommandExt;
        Command::new("curl")
            .args(["-sS", "--max-time", "20", "--unix-socket"])
            .arg(&sock)
            .arg("http://localhost/")
            .gid(4321)
            .output()
            .unwrap()
    };
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("Client certificate"),
        "{o:?}"
    );
    assert_eq!(tls_signed(&d).len(), signed_before, "no handshake for it");
    let _ = proxy.0.kill();
    let mut log = String::new();
    proxy
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains("refused a client: uid/gid 0/4321 is not 0/0"),
        "{log}"
    );

    // Refusals at start.
    let o = proxy_from(&pinned_cli, &["--agent", "pinned", "--listen"])
        .arg(scratch.join("p2").join("s.sock"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("pinned to its executable"),
        "{o:?}"
    );
    let o = proxy_cmd(&["--agent", "alpha", "--listen-tcp", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--insecure-any-local-user"));
    // Local users at most, never the network.
    let o = proxy_cmd(&[
        "--agent",
        "alpha",
        "--listen-tcp",
        "0.0.0.0:0",
        "--insecure-any-local-user",
    ])
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("loopback"),
        "{o:?}"
    );
    // A file that is not a socket at the path is left alone.
    let taken = scratch.join("proxy").join("taken");
    std::fs::write(&taken, "mine").unwrap();
    let o = proxy_cmd(&["--agent", "alpha", "--listen"])
        .arg(&taken)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert_eq!(std::fs::read_to_string(&taken).unwrap(), "mine");
}
tessera_e2e::both_backends!(tls_proxy_carries_curl_over_mtls);

/// The SDK's example (`agent-sdk/rust/examples/mtls.rs`) as a user runs it: beta serves, alpha
/// calls knowing beta by SPIFFE ID, and beta names alpha from its certificate.
#[test]
fn the_mtls_example_runs_between_two_agents() {
    let dir = exe_dir();
    let other = helper_copy(dir.path(), "other-agent", "e");
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: agents(&other),
            ..Default::default()
        },
    );
    let example = tessera_e2e::bin("examples/mtls");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut server = Command::new(&example)
        .args(["serve", "beta", &addr])
        .env("TESSERA_SOCKET", &d.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().contains("serving mTLS"));
    let _server = KillOnDrop(server);
    let beta_pem = rt()
        .block_on(
            d.client()
                .certificate(&tessera::CertificateOptions::default().agent("beta")),
        )
        .unwrap();
    let beta_id =
        peer_spiffe_id(&[CertificateDer::from_pem_slice(beta_pem.as_bytes()).unwrap()]).unwrap();
    let o = Command::new(&example)
        .args(["call", "alpha", &addr, &beta_id])
        .env("TESSERA_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with("hello spiffe://") && out.trim().ends_with("/agent/alpha"),
        "{out}"
    );
    // The wrong server identity is refused by the caller.
    let o = Command::new(&example)
        .args(["call", "alpha", &addr, "spiffe://test.example/elsewhere"])
        .env("TESSERA_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert!(!o.status.success(), "{o:?}");
}

fn roots_of(ders: &[&[u8]]) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for d in ders {
        roots.add(CertificateDer::from(d.to_vec())).unwrap();
    }
    roots
}

fn leaf_der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// `?key=session`: an agent with `proof_key = "session"` gets a certificate for its in-memory
/// session key, labelled `tessera-software-key` and ending with the key; the daemon signs TLS
/// with the key of the certificate named. openssl accepts it; an SDK server accepts it only
/// when told to accept software keys; a bound token can name it; revocation ends it.
fn session_key_certificates_sign_in_memory(backend: Backend) {
    let policy = "[policy]\naudiences = [\"https://api.example.com\"]\nrate = 100000\n";
    let mut d = Daemon::start_with(
        backend,
        Options {
            agents: vec![
                (
                    "hw".into(),
                    format!("[selectors]\nuid = 0\n{policy}tls_server = true\n"),
                ),
                (
                    "sess".into(),
                    format!(
                        "[selectors]\nuid = 0\n{policy}proof_key = \"session\"\nsession_key_ttl = \"2m\"\n"
                    ),
                ),
            ],
            ..Default::default()
        },
    );
    let c = d.client();
    let rt = rt();
    let scratch = d.scratch_dir();
    let session_opts = tessera::CertificateOptions::default()
        .agent("sess")
        .ttl(std::time::Duration::from_secs(600));
    let pem = rt
        .block_on(c.certificate(&session_opts.clone().session_key()))
        .unwrap();
    let hw_pem = rt
        .block_on(c.certificate(&tessera::CertificateOptions::default().agent("sess")))
        .unwrap();
    let (der, hw_der) = (leaf_der(&pem), leaf_der(&hw_pem));
    // openssl reads the policies: software for the session key, hardware for the identity key.
    let text = |der: &[u8], name: &str| {
        let f = scratch.join(name);
        std::fs::write(&f, der).unwrap();
        let o = Command::new("openssl")
            .args(["x509", "-inform", "DER", "-noout", "-text", "-in"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let session_text = text(&der, "session.der");
    assert!(
        session_text.contains(&format!(
            "Policy: {}\n",
            tessera::key_policy::SOFTWARE_KEY_OID
        )),
        "{session_text}"
    );
    assert!(text(&hw_der, "hw.der").contains(&format!(
        "Policy: {}\n",
        tessera::key_policy::HARDWARE_KEY_OID
    )));
    // The certified key is the session key a WIT binds, and the certificate ends with it
    // (2 minutes, though 10 were asked for).
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let cert_key = p256::ecdsa::VerifyingKey::from_sec1_bytes(
        &cert.tbs_certificate.subject_pki.subject_public_key.data,
    )
    .unwrap();
    let wit = rt.block_on(c.wit(Some("sess"))).unwrap();
    let wit_jwk = &tessera_e2e::jwt_claims(&wit.wit)["cnf"]["jwk"];
    assert_eq!(
        cert_key,
        tessera::attestation::key_from_jwk(wit_jwk).unwrap(),
        "the session key"
    );
    let v = cert.validity();
    assert!(
        v.not_after.timestamp() - v.not_before.timestamp() <= 120,
        "the certificate outlives the session key: {v:?}"
    );
    // Refusals: no session key for a hardware-only agent, an unknown key name.
    let e = rt
        .block_on(
            c.certificate(
                &tessera::CertificateOptions::default()
                    .agent("hw")
                    .session_key(),
            ),
        )
        .expect_err("hw has no session key");
    assert_eq!(
        e.problem(),
        Some(tessera::ProblemType::MalformedRequest),
        "{e}"
    );
    let (status, _, body) = rt
        .block_on(c.request(Method::GET, "/v1/certificate?agent=sess&key=device", None))
        .unwrap();
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));

    // openssl s_server (requiring a client certificate from the host CA) accepts the session
    // key's certificate: the CertificateVerify was made with the session key.
    let bundle = scratch.join("bundle.pem");
    std::fs::write(&bundle, rt.block_on(c.bundle()).unwrap()).unwrap();
    tessera_e2e::openssl_leaf(&scratch, "srv", None);
    let (server, port) = s_server(&scratch, &bundle);
    let _kill = KillOnDrop(server);
    let mut srv_roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(scratch.join("srv.pem")).unwrap() {
        srv_roots.add(cert.unwrap()).unwrap();
    }
    let (session_client, presented) = rt
        .block_on(client_config_and_resolver(
            &c,
            &TlsOptions {
                agent: Some("sess".into()),
                roots: Some(srv_roots),
                session_key: true,
                ..Default::default()
            },
        ))
        .unwrap();
    let session_client = Arc::new(session_client);
    let page = https_get(session_client.clone(), port, "localhost").expect("handshake");
    assert!(page.contains("Client certificate"), "{page}");
    let x5t = presented.x5t_s256().unwrap();
    let signed = tls_signed(&d);
    let last = signed.last().unwrap();
    assert_eq!(last["agent"]["name"], "sess");
    assert_eq!(last["details"]["key"], "session", "{last}");
    let session_kid = serde_json::from_value::<jsonwebtoken::jwk::Jwk>(wit_jwk.clone())
        .unwrap()
        .thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256);
    assert_eq!(
        last["details"]["kid"],
        session_kid.as_str(),
        "the session key's id"
    );
    assert_eq!(last["details"]["x5t#S256"], x5t.as_str());

    // An agent server (hardware key, SDK defaults) refuses a software key; told to accept
    // software keys, it names the client.
    let host_roots = || {
        let pem = rt.block_on(c.bundle()).unwrap();
        roots_of(&[&leaf_der(&pem)])
    };
    let hw_id = peer_spiffe_id(&[CertificateDer::from(leaf_der(
        &rt.block_on(c.certificate(&tessera::CertificateOptions::default().agent("hw")))
            .unwrap(),
    ))])
    .unwrap();
    let client_to_hw = |session_key: bool| {
        Arc::new(
            rt.block_on(client_config(
                &c,
                &TlsOptions {
                    agent: Some("sess".into()),
                    roots: Some(host_roots()),
                    server_spiffe_id: Some(hw_id.clone()),
                    session_key,
                    ..Default::default()
                },
            ))
            .unwrap(),
        )
    };
    // hw as a TLS server, accepting software-key clients or not.
    let hw_server = |allow_software_keys: bool| {
        Arc::new(
            rt.block_on(server_config(
                &c,
                &TlsOptions {
                    agent: Some("hw".into()),
                    allow_software_keys,
                    ..Default::default()
                },
            ))
            .unwrap(),
        )
    };
    for (allow, want_ok) in [(false, false), (true, true)] {
        let (port, served) = tessera_e2e::tls::serve(hw_server(allow), 1);
        let answer = tessera_e2e::tls::exchange(client_to_hw(true), port, "hw.agent");
        let served = served.join().unwrap();
        assert_eq!(
            answer.is_ok(),
            want_ok,
            "allow {allow}: {answer:?} {served:?}"
        );
        if want_ok {
            assert!(answer.unwrap().trim().ends_with("/agent/sess"));
        } else {
            let why = format!("{served:?}");
            assert!(why.contains("tessera-hardware-key"), "{why}");
        }
    }
    // The same agent's hardware certificate passes the default server.
    let (port, served) = tessera_e2e::tls::serve(hw_server(false), 1);
    let answer = tessera_e2e::tls::exchange(client_to_hw(false), port, "hw.agent");
    served.join().unwrap();
    assert!(answer
        .expect("hardware client")
        .trim()
        .ends_with("/agent/sess"));

    // A token bound to the session key's certificate ends no later than it.
    let bound = rt
        .block_on(
            c.token(
                &tessera::TokenOptions::new("https://api.example.com")
                    .agent("sess")
                    .ttl(std::time::Duration::from_secs(900))
                    .bind_mtls(&x5t),
            ),
        )
        .expect("a token bound to the session certificate");
    let claims = tessera_e2e::jwt_claims(&bound.token);
    assert_eq!(claims["cnf"]["x5t#S256"], x5t.as_str());
    // The session key lives 2 minutes; the certificate, and so the token, no longer.
    assert!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() <= 120,
        "{claims}"
    );

    // Only the agent the certificate was issued to signs with its key.
    let sign_as = |d: &Daemon, agent: &str, x5t: &str| {
        sign(
            d,
            &json!({"scheme": "ecdsa_secp256r1_sha256", "role": "client",
                    "content": STANDARD.encode(content("client", 32)),
                    "agent": agent, "x5t#S256": x5t}),
        )
    };
    assert_eq!(sign_as(&d, "sess", &x5t).0, 200, "signs while live");
    let (status, problem) = sign_as(&d, "hw", &x5t);
    assert_eq!(status, 403, "{problem}");
    assert_eq!(problem["type"], "urn:tessera:problem:token-not-accepted");

    // A restart ends the session key and its certificates; the SDK's next handshake is
    // refused, and the one after it presents a new certificate.
    let (port, served) = tessera_e2e::tls::serve(hw_server(true), 3);
    let (to_hw, resolver) = rt
        .block_on(client_config_and_resolver(
            &c,
            &TlsOptions {
                agent: Some("sess".into()),
                roots: Some(host_roots()),
                server_spiffe_id: Some(hw_id.clone()),
                session_key: true,
                ..Default::default()
            },
        ))
        .unwrap();
    let to_hw = Arc::new(to_hw);
    let before = resolver.x5t_s256().unwrap();
    tessera_e2e::tls::exchange(to_hw.clone(), port, "hw.agent").expect("before the restart");
    d.restart();
    let (status, problem) = sign_as(&d, "sess", &before);
    assert_eq!(status, 403, "{problem}");
    assert!(
        tessera_e2e::tls::exchange(to_hw.clone(), port, "hw.agent").is_err(),
        "a dead session certificate"
    );
    let answer = tessera_e2e::tls::exchange(to_hw, port, "hw.agent");
    let served = served.join().unwrap();
    assert!(
        answer
            .as_deref()
            .is_ok_and(|a| a.trim().ends_with("/agent/sess")),
        "renewed at once: {answer:?} {served:?}"
    );
    let renewed = resolver.x5t_s256().unwrap();
    assert_ne!(renewed, before);
    assert_eq!(sign_as(&d, "sess", &renewed).0, 200);

    // The policy no longer says session keys: the live one signs no more.
    std::fs::write(
        d.agents_dir().join("sess.toml"),
        format!("[selectors]\nuid = 0\n{policy}"),
    )
    .unwrap();
    d.reload();
    let (status, problem) = sign_as(&d, "sess", &renewed);
    assert_eq!(status, 403, "{problem}");
    assert_eq!(problem["type"], "urn:tessera:problem:token-not-accepted");
}
tessera_e2e::both_backends!(session_key_certificates_sign_in_memory);

/// The SDK's check of an agent TLS server: the chain, the validity, serverAuth, the SPIFFE ID
/// and the key kind. The server certificates are made here with a test CA (so each can be
/// wrong in one way); the client is a real agent of a real daemon.
#[test]
fn an_agent_server_is_checked_for_time_usage_id_and_key_kind() {
    use p256::ecdsa::signature::hazmat::PrehashSigner;
    use p256::ecdsa::{Signature, SigningKey};
    use p256::pkcs8::EncodePrivateKey;
    use tessera::key_policy::KeyKind;
    use tesserad::credentials::x509;
    let dir = exe_dir();
    let other = helper_copy(dir.path(), "other-agent", "v");
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: agents(&other),
            ..Default::default()
        },
    );
    let c = d.client();
    let ca_sk = SigningKey::random(&mut rand::rngs::OsRng);
    let ca_name = x509::cn_name("test-ca").unwrap();
    let now = x509::now_unix();
    let signed = |tbs: x509_cert::TbsCertificate| {
        let (_, digest) = x509::to_be_signed(&tbs).unwrap();
        let sig: Signature = ca_sk.sign_prehash(&digest).unwrap();
        let cert = x509::assemble_certificate(tbs, &sig).unwrap();
        x509_cert::der::Encode::to_der(&cert).unwrap()
    };
    let ca_tbs =
        x509::host_ca_tbs(&ca_name, ca_sk.verifying_key(), now - 86400, now + 86400).unwrap();
    let ca_kid = x509::key_identifier(&ca_tbs.subject_public_key_info);
    let ca_der = signed(ca_tbs);
    let id = "spiffe://test.example/host/testhost/agent/srv";
    let leaf = |not_before: i64, not_after: i64, server_auth: bool, key_kind, spiffe_id: &str| {
        let sk = SigningKey::random(&mut rand::rngs::OsRng);
        let der = signed(
            x509::agent_tbs(&x509::AgentCertSpec {
                issuer: &ca_name,
                issuer_key_id: &ca_kid,
                agent_name: "srv",
                spiffe_id,
                key: sk.verifying_key(),
                not_before,
                not_after,
                server_auth,
                key_kind,
            })
            .unwrap(),
        );
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            sk.to_pkcs8_der().unwrap().as_bytes().to_vec().into(),
        );
        let config = rustls::ServerConfig::builder_with_provider(tessera::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(der)], key)
            .unwrap();
        Arc::new(config)
    };
    let other_id = "spiffe://test.example/host/testhost/agent/other";
    let cases = [
        (
            "good",
            leaf(now - 60, now + 3600, true, KeyKind::Hardware, id),
            false,
            true,
        ),
        (
            "expired",
            leaf(now - 7200, now - 3600, true, KeyKind::Hardware, id),
            false,
            false,
        ),
        (
            "not yet valid",
            leaf(now + 3600, now + 7200, true, KeyKind::Hardware, id),
            false,
            false,
        ),
        (
            "no serverAuth",
            leaf(now - 60, now + 3600, false, KeyKind::Hardware, id),
            false,
            false,
        ),
        (
            "software key",
            leaf(now - 60, now + 3600, true, KeyKind::Software, id),
            false,
            false,
        ),
        (
            "software key allowed",
            leaf(now - 60, now + 3600, true, KeyKind::Software, id),
            true,
            true,
        ),
        (
            "another agent",
            leaf(now - 60, now + 3600, true, KeyKind::Hardware, other_id),
            false,
            false,
        ),
    ];
    for (name, server, allow_software_keys, want_ok) in cases {
        let client = rt()
            .block_on(client_config(
                &c,
                &TlsOptions {
                    agent: Some("alpha".into()),
                    roots: Some(roots_of(&[&ca_der])),
                    server_spiffe_id: Some(id.into()),
                    allow_software_keys,
                    ..Default::default()
                },
            ))
            .unwrap();
        let (port, served) = tessera_e2e::tls::serve(server, 1);
        let answer = tessera_e2e::tls::exchange(Arc::new(client), port, "srv.agent");
        let served = served.join().unwrap();
        assert_eq!(
            answer.is_ok(),
            want_ok,
            "{name}: {answer:?} (server: {served:?})"
        );
    }
}

/// A TLS server signs before its client has proved anything, so its signatures have a rate
/// budget of their own: remote peers cannot spend the budget the agent's tokens live on.
#[test]
fn server_signatures_have_their_own_budget() {
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![(
                "srv".into(),
                "[selectors]\nuid = 0\n[policy]\naudiences = [\"https://api.example.com\"]\nrate = 3\ntls_server = true\n".into(),
            )],
            ..Default::default()
        },
    );
    let body = |role: &str| {
        json!({"scheme": "ecdsa_secp256r1_sha256", "role": role,
               "content": STANDARD.encode(content(role, 32))})
    };
    for _ in 0..3 {
        assert_eq!(sign(&d, &body("server")).0, 200);
    }
    let (status, problem) = sign(&d, &body("server"));
    assert_eq!(status, 429, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("TLS server signatures"),
        "{problem}"
    );
    // The agent's own budget is untouched.
    rt().block_on(
        d.client()
            .token(&tessera::TokenOptions::new("https://api.example.com")),
    )
    .expect("a token after the server budget ran out");
    assert_eq!(sign(&d, &body("client")).0, 200);
}
