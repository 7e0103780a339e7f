//! X.509 from the host CA, checked with tools we did not write: `openssl` (verify, x509,
//! crl, req) and rustls-webpki; revocation through the CRL; the fleet CSR round trip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use p256::pkcs8::DecodePublicKey;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde_json::Value;
use tessera::{CertificateOptions, ProblemType};
use tessera_e2e::bus::{BusPolicy, TestBus};
use tessera_e2e::daemon::Options;
use tessera_e2e::{bin, rt, Backend, Daemon};

const AUD: &str = "https://api.example.com";

fn agent_toml(uid: u32, extra_policy: &str) -> String {
    format!("[selectors]\nuid = {uid}\n[policy]\naudiences = [\"{AUD}\"]\nmax_ttl = \"15m\"\n{extra_policy}\n")
}

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl")
}

fn openssl_ok(args: &[&str]) -> String {
    let o = openssl(args);
    assert!(
        o.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The PEM blocks of a chain, in order.
fn split_pem(chain: &str) -> Vec<String> {
    chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .filter(|b| b.contains("BEGIN CERTIFICATE"))
        .map(|b| b.trim_start().to_string())
        .collect()
}

/// A fresh P-256 private key made by openssl.
fn new_p256_key(path: &Path) {
    openssl_ok(&[
        "ecparam",
        "-genkey",
        "-name",
        "prime256v1",
        "-noout",
        "-out",
        s(path),
    ]);
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn der_of(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

/// A fresh agent certificate chain and the bundle, from the daemon.
fn chain_and_bundle(d: &Daemon) -> (String, String) {
    rt().block_on(async {
        let c = d.client();
        (
            c.certificate(&CertificateOptions::default()).await.unwrap(),
            c.bundle().await.unwrap(),
        )
    })
}

/// The agent's JWK from the daemon's JWKS.
fn agent_jwk(d: &Daemon) -> Value {
    rt().block_on(async {
        let c = d.client();
        let kid = c.whoami().await.unwrap().key_id.unwrap();
        let jwks = c.jwks().await.unwrap();
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == kid.as_str())
            .cloned()
            .expect("agent key in JWKS")
    })
}

fn agent_certificate_checks_out_with_openssl_and_webpki(backend: Backend) {
    let d = Daemon::start_with(
        backend,
        Options {
            agents: vec![("bot".into(), agent_toml(0, "max_cert_ttl = \"30m\""))],
            ..Default::default()
        },
    );
    let dir = d.scratch_dir();
    let (chain, bundle) = chain_and_bundle(&d);
    let too_long = rt()
        .block_on(
            d.client()
                .certificate(&CertificateOptions::default().ttl(Duration::from_secs(3600))),
        )
        .unwrap_err();
    // Asking beyond the agent's max_cert_ttl is refused with the TTL problem.
    match too_long {
        tessera::Error::Problem(p) => assert_eq!(p.kind(), ProblemType::TtlNotAllowed),
        other => panic!("expected ttl-not-allowed, got {other}"),
    }
    let certs = split_pem(&chain);
    assert_eq!(certs.len(), 2, "agent certificate, then the host CA");
    assert_eq!(certs[1], bundle, "the chain ends in the bundle's CA");
    let leaf = write(&dir, "agent.pem", &certs[0]);
    let ca = write(&dir, "bundle.pem", &bundle);

    let out = openssl_ok(&["verify", "-x509_strict", "-CAfile", s(&ca), s(&leaf)]);
    assert!(out.contains(": OK"), "{out}");

    let text = openssl_ok(&["x509", "-in", s(&leaf), "-noout", "-text"]);
    assert!(
        text.contains("URI:spiffe://test.example/host/testhost/agent/bot"),
        "{text}"
    );
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(!text.contains("Non Repudiation"), "{text}");
    // serverAuth only for agents with tls_server (this one has not).
    assert!(text.contains("TLS Web Client Authentication\n"), "{text}");
    assert!(!text.contains("TLS Web Server Authentication"), "{text}");
    // The key is the agent's device key, and the certificate says so (README: key policies).
    assert!(
        text.contains(&format!(
            "Policy: {}\n",
            tessera::key_policy::HARDWARE_KEY_OID
        )),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("Issuer: CN = spiffe://test.example/host/testhost"));
    // Validity: at most the agent's max_cert_ttl (30m), and not absurdly short.
    let ends_within = |secs: u64| {
        !openssl(&[
            "x509",
            "-in",
            s(&leaf),
            "-noout",
            "-checkend",
            &secs.to_string(),
        ])
        .status
        .success()
    };
    assert!(ends_within(1801), "expires within 30 minutes");
    assert!(!ends_within(1700), "valid for about 30 minutes");
    let leaf_bytes = der_of(&certs[0]);
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf_bytes).unwrap();
    let v = parsed.validity();
    assert_eq!(v.not_after.timestamp() - v.not_before.timestamp(), 1800);

    let ca_text = openssl_ok(&["x509", "-in", s(&ca), "-noout", "-text"]);
    assert!(ca_text.contains("CA:TRUE, pathlen:0"), "{ca_text}");
    assert!(ca_text.contains("Certificate Sign, CRL Sign"), "{ca_text}");

    // The certificate's key is the agent's hardware key from the JWKS.
    let pubkey = openssl_ok(&["x509", "-in", s(&leaf), "-noout", "-pubkey"]);
    let cert_key = p256::ecdsa::VerifyingKey::from_public_key_pem(&pubkey).unwrap();
    let jwk_key = tessera::attestation::key_from_jwk(&agent_jwk(&d)).unwrap();
    assert_eq!(cert_key, jwk_key);

    // rustls-webpki agrees about the chain and the usage: a TLS client, not a server.
    let ca_der = CertificateDer::from(der_of(&bundle));
    let anchor = webpki::anchor_from_trusted_cert(&ca_der).unwrap();
    let leaf_der = CertificateDer::from(der_of(&certs[0]));
    let ee = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
    let verify = |usage| {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            std::slice::from_ref(&anchor),
            &[],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .map(|_| ())
    };
    verify(webpki::KeyUsage::client_auth()).expect("webpki verifies the agent certificate");
    assert!(
        verify(webpki::KeyUsage::server_auth()).is_err(),
        "no serverAuth without tls_server"
    );

    // Issuance is audited like tokens.
    let serial = parsed.raw_serial_as_string().replace(':', "");
    let issued: Vec<Value> = d
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "certificate.issued")
        .collect();
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0]["details"]["serial"], serial.as_str());
    assert_eq!(issued[0]["agent"]["name"], "bot");
    assert!(issued[0]["caller"]["pid"].as_i64().is_some());
}

tessera_e2e::both_backends!(agent_certificate_checks_out_with_openssl_and_webpki);

fn revocation_reaches_the_crl(backend: Backend) {
    let mut d = Daemon::start_with(
        backend,
        Options {
            agents: vec![
                ("bot".into(), agent_toml(0, "")),
                ("other".into(), agent_toml(4242, "")),
            ],
            ..Default::default()
        },
    );
    let dir = d.scratch_dir();
    let (chain, bundle) = chain_and_bundle(&d);
    let crl_before = rt().block_on(d.client().crl()).unwrap();
    let leaf = write(&dir, "agent.pem", &split_pem(&chain)[0]);
    let ca = write(&dir, "bundle.pem", &bundle);
    let crl = write(&dir, "crl-before.pem", &crl_before);
    // The CRL itself is valid: with it, the live certificate still verifies.
    let verify_with_crl = |crl: &Path| {
        openssl(&[
            "verify",
            "-crl_check",
            "-CAfile",
            s(&ca),
            "-CRLfile",
            s(crl),
            s(&leaf),
        ])
    };
    let o = verify_with_crl(&crl);
    assert!(o.status.success(), "{o:?}");
    let serial = openssl_ok(&["x509", "-in", s(&leaf), "-noout", "-serial"])
        .trim()
        .trim_start_matches("serial=")
        .to_uppercase();

    // Revoke by removing the agent's file (the declarative path) and reloading.
    std::fs::remove_file(d.agents_dir().join("bot.toml")).unwrap();
    d.reload();
    let check_revoked = |d: &Daemon, name: &str| {
        let crl_after = rt().block_on(d.client().crl()).unwrap();
        let crl = write(&dir, name, &crl_after);
        let text = openssl_ok(&["crl", "-in", s(&crl), "-noout", "-text"]);
        assert!(
            text.contains(&format!("Serial Number: {serial}")),
            "CRL lists {serial}:\n{text}"
        );
        let o = verify_with_crl(&crl);
        assert!(!o.status.success(), "a revoked certificate must not verify");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("certificate revoked")
                || String::from_utf8_lossy(&o.stderr).contains("certificate revoked"),
            "{o:?}"
        );
        // rustls-webpki with the CRL says revoked too.
        let crl_der = {
            let der = openssl(&["crl", "-in", s(&crl), "-outform", "DER"]).stdout;
            webpki::OwnedCertRevocationList::from_der(&der).unwrap()
        };
        let crl_ref = webpki::CertRevocationList::from(crl_der);
        let crls = [&crl_ref];
        let rev = webpki::RevocationOptionsBuilder::new(&crls)
            .unwrap()
            .build();
        let ca_der = CertificateDer::from(der_of(&bundle));
        let anchor = webpki::anchor_from_trusted_cert(&ca_der).unwrap();
        let leaf_der = CertificateDer::from(der_of(&std::fs::read_to_string(&leaf).unwrap()));
        let ee = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
        let res = ee
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                std::slice::from_ref(&anchor),
                &[],
                UnixTime::now(),
                webpki::KeyUsage::client_auth(),
                Some(rev),
                None,
            )
            .map(|_| ());
        assert_eq!(res, Err(webpki::Error::CertRevoked));
    };
    check_revoked(&d, "crl-after.pem");
    // A restart rebuilds the CRL from the registry: the revocation is still there.
    d.restart();
    check_revoked(&d, "crl-restart.pem");
}

tessera_e2e::both_backends!(revocation_reaches_the_crl);

/// `tessera host csr`, signed by an openssl test CA, `tessera host install-cert`; then keyless
/// mTLS through the fleet chain.
#[test]
fn fleet_ca_csr_round_trip() {
    let bus = TestBus::start(BusPolicy::Shipped);
    let mut d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            bus: bus.address.clone(),
            agents: vec![("bot".into(), agent_toml(0, "tls_server = true"))],
            ..Default::default()
        },
    );
    let dir = d.state_dir().join("fleet");
    std::fs::create_dir_all(&dir).unwrap();
    let cli = |args: &[&str]| d.cli_on_bus(&bus.address, args);
    let csr = dir.join("host.csr");
    // Not an admin: refused by the shipped bus policy, exit 3.
    let o = {
        use std::os::unix::process::CommandExt;
        Command::new(bin("tessera"))
            .arg("--bus")
            .arg(&bus.address)
            .args(["host", "csr"])
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    // A common name X.509 cannot hold: a named error, not a panic.
    let o = cli(&["host", "csr", "--cn", &"x".repeat(65)]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("InvalidArgs"),
        "{o:?}"
    );
    let o = cli(&["host", "csr", "-o", s(&csr)]);
    assert!(o.status.success(), "{o:?}");
    // openssl checks the request's self-signature (proof the daemon holds the key).
    let o = openssl(&["req", "-in", s(&csr), "-noout", "-verify", "-text"]);
    assert!(o.status.success(), "{o:?}");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("CN = spiffe://test.example/host/testhost"),
        "{text}"
    );

    // A test fleet CA.
    let ca_key = dir.join("ca.key");
    let ca = dir.join("ca.pem");
    new_p256_key(&ca_key);
    openssl_ok(&[
        "req",
        "-x509",
        "-new",
        "-key",
        s(&ca_key),
        "-subj",
        "/CN=Test Fleet CA",
        "-days",
        "2",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        s(&ca),
    ]);
    let ext = write(
        &dir,
        "ext.cnf",
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    );
    let sign = |csr: &Path, out: &Path| {
        openssl_ok(&[
            "x509",
            "-req",
            "-in",
            s(csr),
            "-CA",
            s(&ca),
            "-CAkey",
            s(&ca_key),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            s(&ext),
            "-out",
            s(out),
        ]);
    };
    let host_cert = dir.join("host.pem");
    sign(&csr, &host_cert);
    let host_pem = std::fs::read_to_string(&host_cert).unwrap();
    let ca_pem = std::fs::read_to_string(&ca).unwrap();
    let bundle_before = rt().block_on(d.client().bundle()).unwrap();

    // Refused: only the host certificate (the chain cannot be checked without its root).
    let only_host = write(&dir, "only-host.pem", &host_pem);
    let o = cli(&["host", "install-cert", s(&only_host)]);
    assert_eq!(o.status.code(), Some(5), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("CertificateRejected"));
    // Refused: a certificate for a different key, even from the same CA.
    let other_key = dir.join("other.key");
    new_p256_key(&other_key);
    let other_csr = dir.join("other.csr");
    openssl_ok(&[
        "req",
        "-new",
        "-key",
        s(&other_key),
        "-subj",
        "/CN=impostor",
        "-out",
        s(&other_csr),
    ]);
    let other_cert = dir.join("other.pem");
    sign(&other_csr, &other_cert);
    let other_chain = write(
        &dir,
        "other-chain.pem",
        &(std::fs::read_to_string(&other_cert).unwrap() + &ca_pem),
    );
    let o = cli(&["host", "install-cert", s(&other_chain)]);
    assert_eq!(o.status.code(), Some(5), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not for this host's CA key"),
        "{o:?}"
    );
    // Refused: not PEM at all.
    let junk = write(&dir, "junk.pem", "hello");
    assert_eq!(
        cli(&["host", "install-cert", s(&junk)]).status.code(),
        Some(5)
    );
    // Refused: an empty file (x509-cert's PEM chain reader overflowed on it; found by fuzzing).
    for (name, text) in [("empty.pem", ""), ("newlines.pem", "\n\r\n")] {
        let empty = write(&dir, name, text);
        let o = cli(&["host", "install-cert", s(&empty)]);
        assert_eq!(o.status.code(), Some(5), "{o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("no certificate"),
            "{o:?}"
        );
    }
    assert_eq!(
        rt().block_on(d.client().bundle()).unwrap(),
        bundle_before,
        "refusals change nothing"
    );

    // Refused: a host certificate without a key usage (issue 11, item 19).
    let no_ku = write(
        &dir,
        "no-ku.cnf",
        "basicConstraints=critical,CA:TRUE,pathlen:0\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    );
    let host_no_ku = dir.join("host-no-ku.pem");
    openssl_ok(&[
        "x509",
        "-req",
        "-in",
        s(&csr),
        "-CA",
        s(&ca),
        "-CAkey",
        s(&ca_key),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        s(&no_ku),
        "-out",
        s(&host_no_ku),
    ]);
    let chain_no_ku = write(
        &dir,
        "chain-no-ku.pem",
        &(std::fs::read_to_string(&host_no_ku).unwrap() + &ca_pem),
    );
    let o = cli(&["host", "install-cert", s(&chain_no_ku)]);
    assert_eq!(o.status.code(), Some(5), "no key usage: {o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("key usage"),
        "{o:?}"
    );
    // Refused: a host certificate issued by a certificate that is not a CA.
    let leaf_key = dir.join("leaf.key");
    new_p256_key(&leaf_key);
    let leaf_csr = dir.join("leaf.csr");
    openssl_ok(&[
        "req",
        "-new",
        "-key",
        s(&leaf_key),
        "-subj",
        "/CN=Not A CA",
        "-out",
        s(&leaf_csr),
    ]);
    let leaf_ext = write(
        &dir,
        "leaf.cnf",
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n",
    );
    let leaf = dir.join("leaf.pem");
    openssl_ok(&[
        "x509",
        "-req",
        "-in",
        s(&leaf_csr),
        "-CA",
        s(&ca),
        "-CAkey",
        s(&ca_key),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        s(&leaf_ext),
        "-out",
        s(&leaf),
    ]);
    let host_by_leaf = dir.join("host-by-leaf.pem");
    openssl_ok(&[
        "x509",
        "-req",
        "-in",
        s(&csr),
        "-CA",
        s(&leaf),
        "-CAkey",
        s(&leaf_key),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        s(&ext),
        "-out",
        s(&host_by_leaf),
    ]);
    let chain_by_leaf = write(
        &dir,
        "chain-by-leaf.pem",
        &(std::fs::read_to_string(&host_by_leaf).unwrap()
            + &std::fs::read_to_string(&leaf).unwrap()
            + &ca_pem),
    );
    let o = cli(&["host", "install-cert", s(&chain_by_leaf)]);
    assert_eq!(o.status.code(), Some(5), "issuer not a CA: {o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not a CA"),
        "{o:?}"
    );
    assert_eq!(
        rt().block_on(d.client().bundle()).unwrap(),
        bundle_before,
        "refusals change nothing"
    );

    // Accepted: host certificate + fleet root.
    let chain_file = write(&dir, "chain.pem", &(host_pem.clone() + &ca_pem));
    let o = cli(&["host", "install-cert", s(&chain_file)]);
    assert!(o.status.success(), "{o:?}");

    let check = |d: &Daemon| {
        let (chain, bundle) = chain_and_bundle(d);
        let crl = rt().block_on(d.client().crl()).unwrap();
        let certs = split_pem(&chain);
        assert_eq!(
            certs.len(),
            2,
            "agent, then the host CA (the root is the bundle)"
        );
        let leaf = write(&dir, "agent.pem", &certs[0]);
        let inter = write(&dir, "inter.pem", &certs[1]);
        let bundle_file = write(&dir, "bundle.pem", &bundle);
        let crl_file = write(&dir, "crl.pem", &crl);
        // The bundle is now the fleet CA, and agent certificates chain to it.
        let fp = |p: &Path| openssl_ok(&["x509", "-in", s(p), "-noout", "-fingerprint"]);
        assert_eq!(fp(&bundle_file), fp(&ca));
        openssl_ok(&[
            "verify",
            "-x509_strict",
            "-CAfile",
            s(&ca),
            "-untrusted",
            s(&inter),
            s(&leaf),
        ]);
        // The CRL is issued under the installed certificate's name and verifies too.
        openssl_ok(&[
            "verify",
            "-crl_check",
            "-CAfile",
            s(&ca),
            "-untrusted",
            s(&inter),
            "-CRLfile",
            s(&crl_file),
            s(&leaf),
        ]);
        // The old self-signed CA no longer anchors new certificates.
        let old = write(&dir, "old-bundle.pem", &bundle_before);
        assert!(!openssl(&["verify", "-CAfile", s(&old), s(&leaf)])
            .status
            .success());
    };
    check(&d);
    // The installed certificate survives a restart.
    d.restart();
    check(&d);
    assert!(d
        .audit_records()
        .iter()
        .any(|r| r["event"] == "hostca.certificate_installed"));

    // Keyless mTLS with the fleet CA as the root (the default: it is the bundle now). The
    // server's client verifier checks the CRL for the client's own certificate only: the host
    // CA certificate is the fleet CA's to revoke, in a CRL the daemon does not have, and
    // demanding one would refuse every client.
    let c = d.client();
    let server = rt()
        .block_on(tessera::tls::server_config(&c, &Default::default()))
        .expect("server config");
    let (port, served) = tessera_e2e::tls::serve(std::sync::Arc::new(server), 1);
    let id = "spiffe://test.example/host/testhost/agent/bot";
    let client = rt()
        .block_on(tessera::tls::client_config(
            &c,
            &tessera::tls::TlsOptions {
                server_spiffe_id: Some(id.into()),
                ..Default::default()
            },
        ))
        .expect("client config");
    let answer = tessera_e2e::tls::exchange(std::sync::Arc::new(client), port, "bot.agent");
    let served = served.join().unwrap();
    assert_eq!(answer, Ok(format!("hello {id}\n")), "server saw {served:?}");
}

/// A crash while the host CA is being made leaves exactly one working CA key.
fn host_ca_creation_survives_a_crash(backend: Backend, point: &str) {
    let mut d = Daemon::prepare(
        backend,
        Options {
            agents: vec![("bot".into(), agent_toml(0, ""))],
            ..Default::default()
        },
    );
    d.crash_at(point);
    d.spawn();
    d.wait_ready();
    assert_eq!(
        d.device_host_ca_keys().len(),
        1,
        "one host CA key, no strays"
    );
    let (chain, bundle) = chain_and_bundle(&d);
    let dir = d.scratch_dir();
    let leaf = write(&dir, "agent.pem", &split_pem(&chain)[0]);
    let ca = write(&dir, "bundle.pem", &bundle);
    openssl_ok(&["verify", "-CAfile", s(&ca), s(&leaf)]);
    // And the CA is stable from then on.
    d.restart();
    assert_eq!(rt().block_on(d.client().bundle()).unwrap(), bundle);
    assert_eq!(d.device_host_ca_keys().len(), 1);
}

#[test]
fn host_ca_crash_after_key_tpm() {
    host_ca_creation_survives_a_crash(Backend::tpm(), "hostca-after-key");
}

#[test]
fn host_ca_crash_after_key_pkcs11() {
    host_ca_creation_survives_a_crash(Backend::pkcs11(), "hostca-after-key");
}

#[test]
fn host_ca_crash_after_name_pkcs11() {
    host_ca_creation_survives_a_crash(Backend::pkcs11(), "hostca-after-name");
}

/// Certificates issued while the agent is being revoked: every one that was handed out is on
/// the CRL afterwards (the registry records a certificate only while its agent is live).
#[test]
fn certificates_racing_a_revocation_all_reach_the_crl() {
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![("bot".into(), agent_toml(0, "rate = 100000"))],
            ..Default::default()
        },
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let c = d.client();
            let stop = stop.clone();
            let count = count.clone();
            rt.spawn(async move {
                let mut serials = vec![];
                let mut refused = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match c.certificate(&CertificateOptions::default()).await {
                        Ok(chain) => {
                            let der = der_of(&split_pem(&chain)[0]);
                            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
                            serials.push(cert.raw_serial_as_string().replace(':', ""));
                            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Err(tessera::Error::Problem(p))
                            if matches!(
                                p.kind(),
                                ProblemType::AgentRevoked
                                    | ProblemType::UnknownCaller
                                    | ProblemType::BackendUnavailable
                            ) =>
                        {
                            refused += 1;
                            if refused > 20 {
                                break;
                            }
                        }
                        Err(e) => return Err(format!("{e:?}")),
                    }
                }
                Ok(serials)
            })
        })
        .collect();
    // Revoke once issuance is under way (however slow the machine is).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while count.load(std::sync::atomic::Ordering::SeqCst) < 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "no certificates issued"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::remove_file(d.agents_dir().join("bot.toml")).unwrap();
    d.reload();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut issued = vec![];
    for c in clients {
        match rt.block_on(c).unwrap() {
            Ok(serials) => issued.extend(serials),
            Err(e) => panic!("unexpected answer: {e}\n{}", d.log_text()),
        }
    }
    let dir = d.scratch_dir();
    let crl = write(&dir, "crl.pem", &rt.block_on(d.client().crl()).unwrap());
    let text = openssl_ok(&["crl", "-in", s(&crl), "-noout", "-text"]).to_uppercase();
    for serial in &issued {
        assert!(
            text.contains(&format!("SERIAL NUMBER: {}", serial.to_uppercase())),
            "issued serial {serial} missing from the CRL ({} issued)",
            issued.len()
        );
    }
}

/// Item 20: the self-signed host CA renews itself while the daemon runs (same key, new
/// certificate), not only at the next start. With `ca_validity` 20 s beyond the 30-day renewal
/// window, renewal falls due 20 s after start; the old daemon only looked once an hour.
#[test]
fn self_signed_host_ca_renews_while_running() {
    let mut d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            extra_config: "[certificates]\nca_validity = \"30days 20s\"\n".into(),
            ..Default::default()
        },
    );
    let first = rt().block_on(d.client().bundle()).unwrap();
    let serial = |pem: &str| {
        let f = write(&d.scratch_dir(), "ca.pem", pem);
        openssl_ok(&[
            "x509",
            "-in",
            s(&f),
            "-noout",
            "-serial",
            "-pubkey",
            "-enddate",
        ])
    };
    let before = serial(&first);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let renewed = loop {
        let now = rt().block_on(d.client().bundle()).unwrap();
        if now != first {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "host CA not renewed within 60 s:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let after = serial(&renewed);
    let field = |text: &str, name: &str| {
        text.lines()
            .skip_while(|l| !l.starts_with(name))
            .take(if name == "-----BEGIN" { 4 } else { 1 })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_ne!(field(&before, "serial="), field(&after, "serial="));
    assert_eq!(
        field(&before, "-----BEGIN"),
        field(&after, "-----BEGIN"),
        "same key"
    );
    assert_ne!(field(&before, "notAfter="), field(&after, "notAfter="));
    // The renewed certificate is what the daemon now issues from, and it is the one on disk.
    let on_disk = std::fs::read_to_string(d.state_dir().join("ca/host-ca.pem")).unwrap();
    assert_eq!(split_pem(&on_disk)[0].trim(), split_pem(&renewed)[0].trim());
    let created = d
        .audit_records()
        .iter()
        .filter(|r| r["event"] == "hostca.created")
        .count();
    assert!(created >= 2, "the renewal is audited");
    assert!(d.stop().success());
}
