//! The SPIFFE Workload API on the real daemon: py-spiffe (nobody here wrote it) fetches and
//! validates JWT-SVIDs and bundles; bundle streams follow revocation; every refusal has the
//! status the specification and DESIGN give it; every SVID handed out is in the audit.

use std::time::Duration;

use serde_json::json;
use tessera_e2e::daemon::Options;
use tessera_e2e::workload::{self, proto};
use tessera_e2e::{python_check, Backend, Daemon};
use tonic::Code;

const AUD: &str = "https://api.anthropic.com";
const TD: &str = "test.example";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn agent_toml(uid: u32) -> String {
    format!("[selectors]\nuid = {uid}\n[policy]\naudiences = [\"{AUD}\", \"spiffe://{TD}/*\"]\n")
}

fn agent_id(name: &str) -> String {
    format!("spiffe://{TD}/host/testhost/agent/{name}")
}

fn py_spiffe_fetches_and_validates(backend: Backend) {
    let d = Daemon::start_with(
        backend,
        Options {
            agents: vec![("pybot".into(), agent_toml(0))],
            ..Default::default()
        },
    );
    let (ok, out) = python_check(
        "check_spiffe.py",
        &json!({
            "socket": d.workload_socket(),
            "audience": AUD,
            "denied_audience": "https://not-allowed.example",
            "trust_domain": TD,
            "agent_id": agent_id("pybot"),
        }),
    );
    assert!(ok, "py-spiffe checks failed: {out:#}");
    // The SVID py-spiffe got is in the audit, as a token of this agent from the Workload API.
    let jti = out["jti"].as_str().expect("jti");
    let recs = d.audit_records();
    let rec = recs
        .iter()
        .find(|r| r["event"] == "token.issued" && r["details"]["jti"] == jti)
        .unwrap_or_else(|| panic!("JWT-SVID {jti} not in the audit"));
    assert_eq!(rec["agent"]["name"], "pybot", "{rec}");
    assert_eq!(rec["details"]["profile"], "jwt-svid", "{rec}");
    // The refused audience and the refused X.509-SVID are recorded refusals.
    assert!(
        recs.iter()
            .any(|r| r["event"] == "access.denied"
                && r["details"]["problem"] == "audience-not-allowed"),
        "the refused audience is audited"
    );
    assert!(
        recs.iter()
            .any(|r| r["event"] == "access.denied"
                && r["details"]["problem"] == "x509-svid-disabled"),
        "the refused X.509-SVID is audited"
    );
}
tessera_e2e::both_backends!(py_spiffe_fetches_and_validates);

fn bundle_streams_follow_revocation(backend: Backend) {
    let d = Daemon::start_with(
        backend,
        Options {
            agents: vec![
                ("leaving".into(), agent_toml(0)),
                ("staying".into(), agent_toml(54321)),
            ],
            ..Default::default()
        },
    );
    rt().block_on(async {
        let mut c = workload::connect(&d.workload_socket()).await;
        // The caller (uid 0) is agent "leaving": its SVID verifies through ValidateJWTSVID.
        let svids = c
            .fetch_jwtsvid(workload::request(proto::JwtsvidRequest {
                audience: vec![AUD.into(), format!("spiffe://{TD}/peer")],
                spiffe_id: String::new(),
            }))
            .await
            .expect("FetchJWTSVID")
            .into_inner()
            .svids;
        assert_eq!(svids.len(), 1);
        assert_eq!(svids[0].spiffe_id, agent_id("leaving"));
        let claims = tessera_e2e::jwt_claims(&svids[0].svid);
        assert_eq!(
            claims["aud"],
            json!([AUD, format!("spiffe://{TD}/peer")]),
            "two audiences: an array"
        );
        let leaving_kid = tessera_e2e::jwt_header(&svids[0].svid)["kid"]
            .as_str()
            .unwrap()
            .to_string();

        let mut jwt = c
            .fetch_jwt_bundles(workload::request(proto::JwtBundlesRequest {}))
            .await
            .expect("FetchJWTBundles")
            .into_inner();
        let mut x509 = c
            .fetch_x509_bundles(workload::request(proto::X509BundlesRequest {}))
            .await
            .expect("FetchX509Bundles")
            .into_inner();
        let first = jwt.message().await.unwrap().expect("first JWT bundle");
        let td = format!("spiffe://{TD}");
        let kids = workload::kids(&first.bundles[&td]);
        assert_eq!(kids.len(), 2, "{kids:?}");
        assert!(kids.contains(&leaving_kid));
        let x_first = x509.message().await.unwrap().expect("first X.509 bundle");
        assert_eq!(x_first.crl.len(), 1);

        // Revoke "leaving" (its file removed, then a reload).
        std::fs::remove_file(d.agents_dir().join("leaving.toml")).unwrap();
        d.reload();
        let next = tokio::time::timeout(Duration::from_secs(20), jwt.message())
            .await
            .expect("a JWT bundle message after the revocation")
            .unwrap()
            .expect("stream open");
        let kids = workload::kids(&next.bundles[&td]);
        assert_eq!(
            kids.len(),
            1,
            "the revoked key left the bundle in the next message: {kids:?}"
        );
        assert!(!kids.contains(&leaving_kid));
        let x_next = tokio::time::timeout(Duration::from_secs(20), x509.message())
            .await
            .expect("an X.509 bundle message after the revocation")
            .unwrap()
            .expect("stream open");
        assert_ne!(x_next.crl, x_first.crl, "a new CRL after the revocation");

        // The revoked agent is refused, and told so; its SVID no longer validates.
        let e = c
            .fetch_jwtsvid(workload::request(proto::JwtsvidRequest {
                audience: vec![AUD.into()],
                spiffe_id: String::new(),
            }))
            .await
            .expect_err("a revoked agent gets no SVID");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("revoked"), "{e:?}");
        let e = c
            .validate_jwtsvid(workload::request(proto::ValidateJwtsvidRequest {
                audience: AUD.into(),
                svid: svids[0].svid.clone(),
            }))
            .await
            .expect_err("a revoked agent's SVID does not validate");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    });
}
tessera_e2e::both_backends!(bundle_streams_follow_revocation);

/// Refusals: no header → InvalidArgument; unenrolled caller → PermissionDenied; malformed →
/// InvalidArgument; X.509-SVIDs → PermissionDenied naming keyless mTLS; a client that never
/// sends the HTTP/2 preface is dropped; a stream ends with Unavailable when the daemon stops.
#[test]
fn refusals_have_the_specified_codes() {
    let mut d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![("other".into(), agent_toml(54321))],
            ..Default::default()
        },
    );
    let seq_before = rt().block_on(async {
        let mut c = workload::connect(&d.workload_socket()).await;
        let e = c
            .fetch_jwtsvid(tonic::Request::new(proto::JwtsvidRequest {
                audience: vec![AUD.into()],
                spiffe_id: String::new(),
            }))
            .await
            .expect_err("no security header");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = c
            .fetch_jwt_bundles(tonic::Request::new(proto::JwtBundlesRequest {}))
            .await
            .expect_err("no security header on a stream either");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = c
            .fetch_jwtsvid(workload::request(proto::JwtsvidRequest {
                audience: vec![AUD.into()],
                spiffe_id: String::new(),
            }))
            .await
            .expect_err("uid 0 is not enrolled");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let e = c
            .fetch_jwtsvid(workload::request(proto::JwtsvidRequest {
                audience: vec![],
                spiffe_id: String::new(),
            }))
            .await
            .expect_err("no audience");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = c
            .fetch_x509svid(workload::request(proto::X509svidRequest {}))
            .await
            .expect_err("X.509-SVIDs are off");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let e = c
            .validate_jwtsvid(workload::request(proto::ValidateJwtsvidRequest {
                audience: AUD.into(),
                svid: "not.a.jwt".into(),
            }))
            .await
            .expect_err("garbage does not validate");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        // A connection that never speaks HTTP/2 is closed after the header timeout (5 s).
        let mut silent = tokio::net::UnixStream::connect(d.workload_socket())
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            use tokio::io::AsyncReadExt;
            loop {
                match silent.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue, // the server's SETTINGS
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a silent connection was not closed");
        // Bundles are public, like /v1/jwks: an unenrolled caller gets them.
        let mut s = c
            .fetch_jwt_bundles(workload::request(proto::JwtBundlesRequest {}))
            .await
            .expect("bundles for anyone")
            .into_inner();
        let m = s.message().await.unwrap().expect("a bundle");
        assert_eq!(
            workload::kids(&m.bundles[&format!("spiffe://{TD}")]).len(),
            1
        );
        let seq_before = workload::sequence(&m.bundles[&format!("spiffe://{TD}")]);
        // Stopping the daemon ends the stream (it does not hold the stop for its drain time).
        let t = std::time::Instant::now();
        let status = d.stop();
        assert!(status.success(), "{status:?}");
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "stop took {:?}",
            t.elapsed()
        );
        let end = tokio::time::timeout(Duration::from_secs(5), s.message())
            .await
            .expect("the stream ended");
        match end {
            Err(st) => assert_eq!(st.code(), Code::Unavailable, "{st:?}"),
            other => panic!("the stream should end with Unavailable: {other:?}"),
        }
        seq_before
    });
    assert!(
        !d.workload_socket().exists(),
        "the socket is removed at stop"
    );
    // The bundle sequence lives in the registry: after a restart it only grows.
    d.restart();
    rt().block_on(async {
        let mut c = workload::connect(&d.workload_socket()).await;
        let mut s = c
            .fetch_jwt_bundles(workload::request(proto::JwtBundlesRequest {}))
            .await
            .unwrap()
            .into_inner();
        let m = s.message().await.unwrap().expect("a bundle");
        let seq_after = workload::sequence(&m.bundles[&format!("spiffe://{TD}")]);
        assert!(
            seq_after > seq_before,
            "spiffe_sequence {seq_before} -> {seq_after}"
        );
    });
}

/// `x509_svid = "software"`: py-spiffe gets an X.509-SVID whose certificate chains to the
/// bundle and whose key matches; the stream rotates at half-life, and at revocation it stops
/// with every certificate it handed out on the CRL; the audit says the key is software.
fn software_x509_svids_rotate_and_stop_at_revocation(backend: Backend) {
    let d = Daemon::start_with(
        backend,
        Options {
            agents: vec![(
                "legacy".into(),
                format!(
                    "[selectors]\nuid = 0\n[policy]\naudiences = [\"{AUD}\"]\nmax_cert_ttl = \"1m\"\nx509_svid = \"software\"\n"
                ),
            )],
            ..Default::default()
        },
    );
    let (ok, out) = python_check(
        "check_spiffe_x509.py",
        &json!({
            "socket": d.workload_socket(),
            "trust_domain": TD,
            "agent_id": agent_id("legacy"),
            "software_key_oid": tessera::key_policy::SOFTWARE_KEY_OID,
        }),
    );
    assert!(ok, "py-spiffe X.509-SVID checks failed: {out:#}");
    let recs = d.audit_records();
    assert!(
        recs.iter().any(|r| r["event"] == "certificate.issued"
            && r["details"]["key"] == "software"
            && r["details"]["profile"] == "x509-svid"),
        "the audit says the SVID key is a software key"
    );
    let leaf_serial = |m: &proto::X509svidResponse| -> String {
        let (_, cert) = x509_parser::parse_x509_certificate(&m.svids[0].x509_svid).unwrap();
        cert.tbs_certificate.raw_serial_as_string().replace(':', "")
    };
    rt().block_on(async {
        let mut c = workload::connect(&d.workload_socket()).await;
        let mut s = c
            .fetch_x509svid(workload::request(proto::X509svidRequest {}))
            .await
            .expect("FetchX509SVID for a software agent")
            .into_inner();
        let first = s.message().await.unwrap().expect("first SVID");
        assert_eq!(first.svids.len(), 1);
        assert_eq!(first.svids[0].spiffe_id, agent_id("legacy"));
        assert!(!first.svids[0].x509_svid_key.is_empty());
        assert_eq!(first.svids[0].hint, "software-key");
        // The leaf alone: the self-signed host CA is the bundle's, not the chain's.
        let (rest, _) = x509_parser::parse_x509_certificate(&first.svids[0].x509_svid).unwrap();
        assert!(rest.is_empty(), "only the SVID in the chain");
        // No bound token may name a software key's certificate (the daemon does not hold it).
        let x5t = tessera::verify::x5t_s256(&first.svids[0].x509_svid);
        let e = d
            .client()
            .token(&tessera::TokenOptions::new(AUD).bind_mtls(&x5t))
            .await
            .expect_err("a token bound to a software SVID");
        assert_eq!(
            e.problem(),
            Some(tessera::ProblemType::TokenNotAccepted),
            "{e}"
        );
        // A 1 minute SVID is replaced at half-life (30 s).
        let second = tokio::time::timeout(Duration::from_secs(50), s.message())
            .await
            .expect("a rotated SVID within 50 s")
            .unwrap()
            .expect("stream open");
        let (a, b) = (leaf_serial(&first), leaf_serial(&second));
        assert_ne!(a, b, "a new certificate");
        assert_ne!(
            first.svids[0].x509_svid_key, second.svids[0].x509_svid_key,
            "a new key"
        );

        std::fs::remove_file(d.agents_dir().join("legacy.toml")).unwrap();
        d.reload();
        let end = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match s.message().await {
                    Ok(Some(_)) => continue, // a new CRL may come first
                    other => return other,
                }
            }
        })
        .await
        .expect("the stream stops after the revocation");
        match end {
            Err(st) => assert_eq!(st.code(), Code::PermissionDenied, "{st:?}"),
            other => panic!("the stream should end with PermissionDenied: {other:?}"),
        }
        // Both certificates it handed out are on the CRL.
        let pem = d.client().crl().await.expect("CRL");
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&pem.contents).unwrap();
        let crl: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| r.raw_serial_as_string().replace(':', ""))
            .collect();
        for serial in [&a, &b] {
            assert!(
                crl.iter().any(|s| s.eq_ignore_ascii_case(serial)),
                "{serial} on the CRL {crl:?}"
            );
        }
    });
}
tessera_e2e::both_backends!(software_x509_svids_rotate_and_stop_at_revocation);

/// An admin who moves a software-SVID agent to another uid cuts off the process that had its
/// stream open: no rotation, no further SVID (the caller is re-identified and re-matched).
#[test]
fn a_software_svid_stream_ends_when_the_agent_no_longer_matches() {
    let toml = |uid: u32| {
        format!("[selectors]\nuid = {uid}\n[policy]\naudiences = [\"{AUD}\"]\nx509_svid = \"software\"\n")
    };
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: vec![("moving".into(), toml(0))],
            ..Default::default()
        },
    );
    rt().block_on(async {
        let mut c = workload::connect(&d.workload_socket()).await;
        let mut s = c
            .fetch_x509svid(workload::request(proto::X509svidRequest {}))
            .await
            .expect("FetchX509SVID")
            .into_inner();
        s.message().await.unwrap().expect("first SVID");
        d.write_agent("moving", &toml(54321));
        d.reload();
        let end = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match s.message().await {
                    Ok(Some(m)) => assert!(m.svids.is_empty(), "no SVID after the change"),
                    other => return other,
                }
            }
        })
        .await
        .expect("the stream ends after the agent moved to another uid");
        match end {
            Err(st) => assert_eq!(st.code(), Code::PermissionDenied, "{st:?}"),
            other => panic!("the stream should end with PermissionDenied: {other:?}"),
        }
    });
}
