//! The Prometheus endpoint (`[metrics] listen`): scraped with curl, read by the Prometheus
//! project's own parser (PyPI `prometheus_client`), and its values move with what the daemon
//! does: credentials issued and refused, device operations, audit syncs, agents by status.

use std::process::Command;

use serde_json::Value;
use tessera::TokenOptions;
use tessera_e2e::daemon::Options;
use tessera_e2e::{python_check, Backend, Daemon};

const AUD: &str = "https://api.example.com";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every sample, parsed by prometheus_client.
fn scrape(args: &[&str]) -> Vec<(String, Value, f64)> {
    let out = Command::new("curl").arg("-sf").args(args).output().unwrap();
    assert!(out.status.success(), "scrape {args:?}: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (ok, v) = python_check("check_metrics.py", &serde_json::json!({ "text": text }));
    assert!(ok, "prometheus_client refused the scrape: {v}\n{text}");
    v["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s[0].as_str().unwrap().to_string(),
                s[1].clone(),
                s[2].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The value of `name` whose labels include `labels` (0 when absent).
fn value(samples: &[(String, Value, f64)], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l[*k] == *v))
        .map(|s| s.2)
        .unwrap_or(0.0)
}

fn metrics_values_move_with_the_daemon(backend: Backend) {
    let port = free_port();
    let d = Daemon::start_with(
        backend,
        Options {
            extra_config: format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
            agents: vec![
                (
                    "alpha".into(),
                    format!("[selectors]\nuid = 0\n[policy]\naudiences = [\"{AUD}\"]\n"),
                ),
                (
                    "beta".into(),
                    format!("[selectors]\nuid = 65534\n[policy]\naudiences = [\"{AUD}\"]\n"),
                ),
            ],
            ..Default::default()
        },
    );
    let url = format!("http://127.0.0.1:{port}/metrics");
    let before = scrape(&[&url]);
    assert_eq!(
        value(&before, "tessera_agents", &[("status", "active")]),
        2.0
    );
    assert!(value(&before, "tessera_host_ca_expiry_seconds", &[]) > 86_400.0);
    assert!(value(&before, "tessera_crl_expiry_seconds", &[]) > 0.0);
    assert!(
        value(
            &before,
            "tessera_device_operation_seconds_count",
            &[("operation", "create")]
        ) >= 2.0,
        "agent keys were created at start"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c = d.client();
    for _ in 0..2 {
        rt.block_on(c.token(&TokenOptions::new(AUD))).unwrap();
    }
    let refused = rt.block_on(c.token(&TokenOptions::new("https://elsewhere.example.com")));
    assert!(refused.is_err());

    let after = scrape(&[&url]);
    let issued = |s: &[(String, Value, f64)]| {
        value(
            s,
            "tessera_credentials_issued_total",
            &[("type", "token"), ("agent", "alpha")],
        )
    };
    assert_eq!(issued(&before), 0.0);
    assert_eq!(issued(&after), 2.0);
    let refusals = |s: &[(String, Value, f64)]| {
        value(
            s,
            "tessera_refusals_total",
            &[("problem", "audience-not-allowed"), ("door", "socket")],
        )
    };
    assert_eq!(refusals(&after) - refusals(&before), 1.0);
    let signs = |s: &[(String, Value, f64)]| {
        value(
            s,
            "tessera_device_operation_seconds_count",
            &[("operation", "sign")],
        )
    };
    assert!(
        signs(&after) - signs(&before) >= 2.0,
        "two tokens were signed on the device"
    );
    let syncs = |s: &[(String, Value, f64)]| value(s, "tessera_audit_sync_seconds_count", &[]);
    assert!(
        syncs(&after) > syncs(&before),
        "issuing wrote the audit trail"
    );
    assert_eq!(value(&after, "tessera_device_queue_depth", &[]), 0.0);

    // Other paths answer 404/405 and change nothing.
    let o = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            &url,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "405");
}
tessera_e2e::both_backends!(metrics_values_move_with_the_daemon);

#[test]
fn metrics_on_a_unix_socket_and_bad_listen_values() {
    let dir = tessera_e2e::shared_tempdir();
    let sock = dir.path().join("metrics.sock");
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            extra_config: format!("[metrics]\nlisten = \"unix:{}\"\n", sock.display()),
            ..Default::default()
        },
    );
    let samples = scrape(&[
        "--unix-socket",
        sock.to_str().unwrap(),
        "http://tessera/metrics",
    ]);
    assert!(value(&samples, "tessera_host_ca_expiry_seconds", &[]) > 0.0);
    drop(d);

    for bad in ["nonsense", "unix:relative/path", "localhost"] {
        let cfg = dir.path().join("bad.toml");
        std::fs::write(
            &cfg,
            format!("[backend]\nkind = \"tpm\"\n[metrics]\nlisten = \"{bad}\"\n"),
        )
        .unwrap();
        let o = Command::new(tessera_e2e::bin("tesserad"))
            .arg("--check-config")
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{bad}: {o:?}");
        assert!(err.contains("metrics.listen"), "{bad}: {err}");
    }
}
