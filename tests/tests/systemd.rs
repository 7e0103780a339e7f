//! Runs like a system service: the shipped units pass `systemd-analyze`, and tesserad works
//! under socket activation with readiness, watchdog and stop notifications.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tessera::TokenOptions;
use tessera_e2e::devices::write_config;
use tessera_e2e::{bin, shared_tempdir, Backend};

fn units_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

/// The shipped units with ExecStart pointed at the built binary (verify needs it to exist).
fn units_for_check() -> tempfile::TempDir {
    let dir = shared_tempdir();
    let svc = std::fs::read_to_string(units_dir().join("tesserad.service")).unwrap();
    assert!(svc.contains("ExecStart=/usr/bin/tesserad "));
    std::fs::write(
        dir.path().join("tesserad.service"),
        svc.replace("/usr/bin/tesserad", bin("tesserad").to_str().unwrap()),
    )
    .unwrap();
    for unit in [
        "tesserad.socket",
        "tesserad-workload.socket",
        "tesserad-metrics.socket",
    ] {
        std::fs::copy(units_dir().join(unit), dir.path().join(unit)).unwrap();
    }
    dir
}

#[test]
fn units_verify_cleanly_and_score_2_or_lower() {
    let dir = units_for_check();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("tesserad.service"))
        .arg(dir.path().join("tesserad.socket"))
        .arg(dir.path().join("tesserad-workload.socket"))
        .arg(dir.path().join("tesserad-metrics.socket"))
        .output()
        .expect("systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify: {text}"
    );

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20"])
        .arg(dir.path().join("tesserad.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("tesserad.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in: {text}"));
    assert!(score <= 2.0, "exposure {score}: {text}");
    assert!(out.status.success(), "threshold check: {text}");
}

/// The federation examples (a path unit and its sync service) load cleanly; the sync command
/// itself is the admin's, so the copy checked runs `/bin/true`.
#[test]
fn federation_example_units_verify_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let examples = units_dir().join("examples");
    for unit in ["tessera-oidc-sync.path", "tessera-oidc-sync.service"] {
        let text = std::fs::read_to_string(examples.join(unit)).unwrap();
        let text: String = text
            .lines()
            .map(|l| {
                if l.starts_with("ExecStart=") {
                    "ExecStart=/bin/true".to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(dir.path().join(unit), text + "\n").unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("tessera-oidc-sync.path"))
        .arg(dir.path().join("tessera-oidc-sync.service"))
        .output()
        .expect("systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify: {text}"
    );
    let dropin = std::fs::read_to_string(examples.join("tesserad-federation.conf")).unwrap();
    assert!(dropin.contains("[Service]\nReadWritePaths=/srv/tessera-oidc"));
}

fn read_notify(sock: &UnixDatagram, want: &str, within: Duration, seen: &mut Vec<String>) {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = msg.lines().any(|l| l == want);
            seen.push(msg);
            if hit {
                return;
            }
        }
    }
    panic!("no {want} within {within:?}; got {seen:?}");
}

#[test]
fn socket_activation_ready_watchdog_token_and_clean_stop() {
    let backend = Backend::pkcs11();
    let dir = shared_tempdir();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("agents.d")).unwrap();
    let cfg = write_config(&backend, &state, "");
    std::fs::write(
        state.join("agents.d/svc.toml"),
        "[selectors]\nuid = 0\n[policy]\naudiences = [\"https://api.example.com\"]\n",
    )
    .unwrap();
    let sock_path = dir.path().join("activated.sock");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    // Both sockets, told apart by name as the shipped units name them.
    let workload_path = dir.path().join("activated-workload.sock");
    // The metrics socket as tesserad-metrics.socket passes it: TCP, named "metrics".
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("-l").arg(&sock_path);
    cmd.arg("-l").arg(&workload_path);
    cmd.arg("-l").arg(format!("127.0.0.1:{metrics_port}"));
    cmd.arg("--fdname=agent:workload:metrics");
    cmd.arg("-E")
        .arg(format!("NOTIFY_SOCKET={}", notify_path.display()));
    cmd.arg("-E").arg("WATCHDOG_USEC=1000000");
    for (k, v) in backend.envs() {
        cmd.arg("-E").arg(format!("{k}={v}"));
    }
    let mut child = cmd
        .arg(bin("tesserad"))
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("systemd-socket-activate");
    // The socket exists before the daemon (systemd made it); the first request starts it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock_path.exists() {
        assert!(Instant::now() < deadline, "socket not created");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = tessera::Client::with_socket(&sock_path);
    let token = rt
        .block_on(client.token(&TokenOptions::new("https://api.example.com")))
        .expect("token over the inherited socket");
    assert!(!token.token.is_empty());
    // Metrics answer on the TCP socket systemd passed as "metrics", counting that token.
    let scrape = Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{metrics_port}/metrics")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&scrape.stdout);
    assert!(
        scrape.status.success()
            && text.contains("tessera_credentials_issued_total{type=\"token\",agent=\"svc\"} 1"),
        "{scrape:?}"
    );
    // The Workload API answers on the socket systemd passed as "workload".
    let svid = rt.block_on(async {
        let mut c = tessera_e2e::workload::connect(&workload_path).await;
        c.fetch_jwtsvid(tessera_e2e::workload::request(
            tessera_e2e::workload::proto::JwtsvidRequest {
                audience: vec!["https://api.example.com".into()],
                spiffe_id: String::new(),
            },
        ))
        .await
        .expect("a JWT-SVID over the inherited Workload API socket")
        .into_inner()
    });
    // Let the client's connection task (on this runtime) see the client dropped and close, so
    // the stop below does not wait its drain time for an idle HTTP/2 connection.
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(200)).await });
    assert_eq!(svid.svids.len(), 1);
    assert!(
        !state.join("workload.sock").exists(),
        "the daemon used the passed socket instead of binding its own"
    );
    let mut seen = vec![];
    read_notify(&notify, "READY=1", Duration::from_secs(10), &mut seen);
    assert!(
        seen.iter().any(|m| m.contains("STATUS=serving 1 agent")),
        "{seen:?}"
    );
    read_notify(&notify, "WATCHDOG=1", Duration::from_secs(5), &mut seen);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    read_notify(&notify, "STOPPING=1", Duration::from_secs(10), &mut seen);
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(0), "exit 0 after SIGTERM");
    assert!(
        sock_path.exists(),
        "the daemon leaves systemd's socket alone"
    );
    // The same checks as every stop (issue 21): `daemon.stopped` last, the trail verifies,
    // and the next start finds the key.
    let audit_dir = state.join("audit");
    let mut last = None;
    for f in tesserad::audit::files_in_order(&audit_dir).unwrap() {
        for line in std::fs::read_to_string(f).unwrap().lines() {
            last = Some(serde_json::from_str::<serde_json::Value>(line).unwrap());
        }
    }
    assert_eq!(last.unwrap()["event"], "daemon.stopped");
    let o = Command::new(bin("tessera"))
        .args(["audit", "verify"])
        .arg(&audit_dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let mut again = Command::new(bin("tesserad"))
        .arg("--config")
        .arg(&cfg)
        .envs(backend.envs())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let own_socket = state.join("agent.sock");
    while std::os::unix::net::UnixStream::connect(&own_socket).is_err() {
        assert!(Instant::now() < deadline, "restart not up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = tessera::Client::with_socket(&own_socket);
    let again_token = rt
        .block_on(c.token(&TokenOptions::new("https://api.example.com")))
        .expect("a token after the stop");
    // The same key, not a new one.
    let kid = |t: &str| tessera_e2e::jwt_header(t)["kid"].clone();
    assert_eq!(
        kid(&again_token.token),
        kid(&token.token),
        "the key survived the stop"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(again.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(again.wait().unwrap().success());
}
