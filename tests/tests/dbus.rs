//! The off switch: D-Bus control plane and `tessera agent …` against a private dbus-daemon
//! with the shipped policy file, on both backends.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tessera_e2e::bus::{BusPolicy, TestBus};
use tessera_e2e::daemon::Options;
use tessera_e2e::{bin, shared_tempdir, Backend, Daemon};

const AUD: &str = "https://api.example.com";

struct Env {
    bus: TestBus,
    d: Daemon,
    bins: tempfile::TempDir,
}

fn start(backend: Backend, policy: BusPolicy, envs: Vec<(String, String)>) -> Env {
    let bus = TestBus::start(policy);
    let d = Daemon::start_with(
        backend,
        Options {
            bus: bus.address.clone(),
            envs,
            ..Default::default()
        },
    );
    Env {
        bus,
        d,
        bins: tessera_e2e::exe_dir(),
    }
}

impl Env {
    /// `tessera --bus <test bus> ARGS`, optionally as another uid.
    fn cli_as(&self, uid: Option<u32>, args: &[&str]) -> Output {
        let mut c = Command::new(bin("tessera"));
        c.arg("--bus")
            .arg(&self.bus.address)
            .arg("--socket")
            .arg(&self.d.socket)
            .args(args);
        if let Some(u) = uid {
            c.uid(u).gid(u);
        }
        c.output().expect("run tessera")
    }
    fn cli(&self, args: &[&str]) -> Output {
        self.cli_as(None, args)
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "tessera {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
    fn helper(&self, name: &str) -> PathBuf {
        tessera_e2e::helper_copy(self.bins.path(), name, name)
    }
    fn agents(&self) -> Vec<Value> {
        serde_json::from_str(&self.ok(&["--json", "agent", "list"])).unwrap()
    }
}

fn token_via(exe: &Path, socket: &Path) -> Value {
    let out = Command::new(exe)
        .arg(socket)
        .args(["token", AUD])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"))
}

fn key_id_destroyed_for(d: &Daemon, name: &str) -> String {
    d.audit_records()
        .into_iter()
        .find(|r| r["event"] == "key.destroyed" && r["agent"]["name"] == name)
        .and_then(|r| r["details"]["key_id"].as_str().map(str::to_string))
        .expect("key.destroyed recorded")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn revoke_cuts_off_exactly_that_agent(backend: Backend) {
    let env = start(backend, BusPolicy::Shipped, vec![]);
    let (a, b) = (env.helper("alpha-bin"), env.helper("beta-bin"));
    for (name, exe) in [("alpha", &a), ("beta", &b)] {
        let out = env.ok(&[
            "--json",
            "agent",
            "enroll",
            name,
            "--uid",
            "0",
            "--exe",
            exe.to_str().unwrap(),
            "--audience",
            AUD,
            "--scope",
            "read",
        ]);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["Name"], name);
        assert_eq!(v["Status"], "active");
    }
    assert_eq!(env.agents().len(), 2);
    assert!(exported(&env, "alpha") && exported(&env, "beta"));
    let alpha_kid = env
        .agents()
        .into_iter()
        .find(|x| x["Name"] == "alpha")
        .unwrap()["KeyId"]
        .clone();
    assert_eq!(token_via(&a, &env.d.socket)["status"], 200);

    let runtime = rt();
    let signal = runtime.block_on(async {
        let conn = zbus::connection::Builder::address(env.bus.address.as_str())
            .unwrap()
            .build()
            .await
            .unwrap();
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .interface("org.tessera.Tessera1.Manager")
            .unwrap()
            .member("AgentRevoked")
            .unwrap()
            .build();
        let mut stream = zbus::MessageStream::for_match_rule(rule, &conn, None)
            .await
            .unwrap();
        let out = env.cli(&["agent", "revoke", "alpha", "--reason", "compromised"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Right after the command returns: refused, and gone from JWKS.
        let r = token_via(&a, &env.d.socket);
        assert_eq!(r["status"], 403, "{r}");
        assert_eq!(r["body"]["type"], "urn:tessera:problem:agent-revoked");
        let jwks = env.d.client().jwks().await.unwrap();
        assert!(jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["kid"] != alpha_kid));
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
        let msg = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("AgentRevoked seen")
            .unwrap()
            .unwrap();
        let (name, reason): (String, String) = msg.body().deserialize().unwrap();
        (name, reason)
    });
    assert_eq!(signal, ("alpha".to_string(), "compromised".to_string()));
    // The key is gone from the device, checked with tools nobody here wrote.
    let key_id = key_id_destroyed_for(&env.d, "alpha");
    match &env.d.backend {
        Backend::Tpm(_) => {
            let keys = env.d.state_dir().join("tpm/keys");
            assert!(
                !keys.join(format!("{key_id}.priv")).exists()
                    && !keys.join(format!("{key_id}.pub")).exists()
            );
        }
        Backend::Pkcs11(h) => {
            let listing = String::from_utf8_lossy(&h.pkcs11_tool(&["-O"]).stdout).into_owned();
            assert!(!listing.contains(&key_id), "{listing}");
            assert!(
                listing.contains("tessera:agent-"),
                "beta's key is still there: {listing}"
            );
        }
    }
    assert_eq!(env.d.device_keys().len(), 1);
    // Its object went with its key (one object synced, not all of them); beta's stays.
    assert!(!exported(&env, "alpha") && exported(&env, "beta"));
    // The other agent carries on; revoking again is fine; the name can be enrolled anew.
    assert_eq!(token_via(&b, &env.d.socket)["status"], 200);
    env.ok(&["agent", "revoke", "alpha"]);
    env.ok(&[
        "agent",
        "enroll",
        "alpha",
        "--uid",
        "0",
        "--exe",
        a.to_str().unwrap(),
        "--audience",
        AUD,
    ]);
    assert_eq!(token_via(&a, &env.d.socket)["status"], 200);
    assert!(exported(&env, "alpha"), "the new alpha is exported");
    let new_kid = env
        .agents()
        .into_iter()
        .find(|x| x["Name"] == "alpha")
        .unwrap()["KeyId"]
        .clone();
    assert_ne!(new_kid, alpha_kid, "a new key for the new agent");
}

tessera_e2e::both_backends!(revoke_cuts_off_exactly_that_agent);

/// `gdbus` (GLib, not our code) as `uid` calling a Credentials method.
fn gdbus_as(env: &Env, uid: u32, method: &str, args: &[&str]) -> Output {
    gdbus_at(env, uid, "/org/tessera/Tessera1", method, args)
}

/// `gdbus call` on the daemon's object `path`, as `uid`.
fn gdbus_at(env: &Env, uid: u32, path: &str, method: &str, args: &[&str]) -> Output {
    Command::new("gdbus")
        .args([
            "call",
            "--system",
            "--dest",
            "org.tessera.Tessera1",
            "--object-path",
            path,
            "--method",
        ])
        .arg(method)
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &env.bus.address)
        .uid(uid)
        .gid(uid)
        .output()
        .expect("gdbus")
}

fn non_admins_are_refused_twice(backend: Backend) {
    for policy in [BusPolicy::Shipped, BusPolicy::AllowAll] {
        let shipped = matches!(policy, BusPolicy::Shipped);
        let env = start(backend_again(&backend), policy, vec![]);
        env.ok(&["agent", "enroll", "keeper", "--uid", "0", "--audience", AUD]);
        let before = env.agents();
        for args in [
            vec![
                "agent",
                "enroll",
                "intruder",
                "--uid",
                "65534",
                "--audience",
                AUD,
            ],
            vec!["agent", "revoke", "keeper"],
            vec!["agent", "revoke", "--all", "--yes"],
            vec!["agent", "suspend", "keeper"],
        ] {
            let out = env.cli_as(Some(65534), &args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(3), "{args:?}: {err}");
            // The bus refuses with its own error; with the bus wide open the daemon refuses.
            let want = if shipped {
                "org.freedesktop.DBus.Error.AccessDenied"
            } else {
                "org.tessera.Tessera1.Error.AccessDenied"
            };
            assert!(
                err.contains(want) || (shipped && err.contains("AccessDenied")),
                "{args:?}: {err}"
            );
        }
        assert_eq!(env.agents(), before, "nothing changed");
        // Refusals the daemon itself makes are in the audit trail, with who asked for what.
        let denied: Vec<Value> = env
            .d
            .audit_records()
            .into_iter()
            .filter(|r| {
                r["event"] == "access.denied" && r["details"]["problem"] == "admin-access-denied"
            })
            .collect();
        if shipped {
            assert!(
                denied.is_empty(),
                "the bus refused before the daemon saw anything"
            );
        } else {
            assert_eq!(denied.len(), 4, "{denied:?}");
            assert_eq!(denied[0]["details"]["uid"], 65534);
            assert_eq!(denied[0]["details"]["method"], "Enroll");
        }
        // Credentials: anyone may ask; only an enrolled agent gets a token.
        let out = gdbus_as(
            &env,
            65534,
            "org.tessera.Tessera1.Credentials.GetToken",
            &[AUD, "[]", "0"],
        );
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("org.tessera.Tessera1.Error.UnknownCaller"),
            "{out:?}"
        );
        env.ok(&[
            "agent",
            "enroll",
            "nobody-bot",
            "--uid",
            "65534",
            "--audience",
            AUD,
        ]);
        let out = gdbus_as(
            &env,
            65534,
            "org.tessera.Tessera1.Credentials.GetToken",
            &[AUD, "[]", "60"],
        );
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let token = text.split('\'').nth(1).expect("token in gdbus output");
        let v = tessera::verify::verify(
            token,
            &rt().block_on(env.d.client().jwks()).unwrap(),
            &tessera::verify::Options::new(AUD),
        )
        .unwrap();
        assert!(v.sub.ends_with("/agent/nobody-bot"));
        let out = gdbus_as(&env, 65534, "org.tessera.Tessera1.Credentials.WhoAmI", &[]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("nobody-bot"),
            "{out:?}"
        );
    }
}

fn backend_again(b: &Backend) -> Backend {
    match b {
        Backend::Tpm(_) => Backend::tpm(),
        Backend::Pkcs11(_) => Backend::pkcs11(),
    }
}

tessera_e2e::both_backends!(non_admins_are_refused_twice);

/// Whether the daemon exports `name`'s agent object, asked with gdbus (GLib) as root.
fn exported(env: &Env, name: &str) -> bool {
    gdbus_at(
        env,
        0,
        &format!("/org/tessera/Tessera1/agent/{name}"),
        "org.freedesktop.DBus.Properties.Get",
        &["org.tessera.Tessera1.Agent", "Name"],
    )
    .status
    .success()
}

fn suspend_resume_and_kill_switch(backend: Backend) {
    let env = start(backend, BusPolicy::Shipped, vec![]);
    env.ok(&[
        "agent",
        "enroll",
        "solo",
        "--uid",
        "0",
        "--audience",
        AUD,
        "--max-ttl",
        "10m",
        "--rate",
        "1000",
    ]);
    let c = env.d.client();
    let runtime = rt();
    let kid = runtime.block_on(c.whoami()).unwrap().key_id;
    runtime
        .block_on(c.token(&tessera::TokenOptions::new(AUD)))
        .unwrap();
    env.ok(&["agent", "suspend", "solo"]);
    let show: Value = serde_json::from_str(&env.ok(&["--json", "agent", "show", "solo"])).unwrap();
    assert_eq!(show["Status"], "suspended");
    assert!(exported(&env, "solo"), "a suspended agent keeps its object");
    assert_eq!(show["Policy"]["max_ttl"], "10m");
    assert_eq!(show["Selectors"]["uid"], 0);
    let e = runtime
        .block_on(c.token(&tessera::TokenOptions::new(AUD)))
        .unwrap_err();
    assert_eq!(e.problem(), Some(tessera::ProblemType::AgentSuspended));
    env.ok(&["agent", "resume", "solo"]);
    runtime
        .block_on(c.token(&tessera::TokenOptions::new(AUD)))
        .unwrap();
    assert_eq!(
        runtime.block_on(c.whoami()).unwrap().key_id,
        kid,
        "same key after resume"
    );
    env.ok(&[
        "agent",
        "enroll",
        "second",
        "--uid",
        "65534",
        "--audience",
        AUD,
    ]);
    assert_eq!(env.d.device_keys().len(), 2);
    // Without --yes and without a terminal the kill switch is refused.
    let out = env.cli(&["agent", "revoke", "--all", "--reason", "incident"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(env.agents().len(), 2);
    env.ok(&["agent", "revoke", "--all", "--reason", "incident", "--yes"]);
    assert!(env.agents().is_empty());
    assert!(!exported(&env, "solo") && !exported(&env, "second"));
    assert!(
        env.d.device_keys().is_empty(),
        "no agent key left in the device"
    );
    let e = runtime
        .block_on(c.token(&tessera::TokenOptions::new(AUD)))
        .unwrap_err();
    assert_eq!(e.problem(), Some(tessera::ProblemType::AgentRevoked));
}

tessera_e2e::both_backends!(suspend_resume_and_kill_switch);

fn crash_between_revoke_record_and_destroy(backend: Backend) {
    let mut env = start(
        backend,
        BusPolicy::Shipped,
        vec![("TESSERA_FAULT".into(), "revoke-after-record".into())],
    );
    env.ok(&["agent", "enroll", "doomed", "--uid", "0", "--audience", AUD]);
    assert_eq!(env.d.device_keys().len(), 1);
    let out = env.cli(&["agent", "revoke", "doomed"]);
    assert!(!out.status.success(), "the daemon died mid-revocation");
    let st = env.d.wait_exit(Duration::from_secs(10));
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
    assert_eq!(env.d.device_keys().len(), 1, "crash left the key");
    env.d.spawn_with_env(&[("TESSERA_FAULT", "none")]);
    env.d.wait_ready();
    let e = rt()
        .block_on(env.d.client().token(&tessera::TokenOptions::new(AUD)))
        .unwrap_err();
    assert_eq!(e.problem(), Some(tessera::ProblemType::AgentRevoked));
    env.d.stop();
    assert!(
        env.d.device_keys().is_empty(),
        "restart finished the revocation"
    );
}

tessera_e2e::both_backends!(crash_between_revoke_record_and_destroy);

#[test]
fn bad_arguments_give_named_errors_and_change_nothing() {
    let env = start(Backend::pkcs11(), BusPolicy::Shipped, vec![]);
    env.ok(&["agent", "enroll", "exists", "--uid", "0", "--audience", AUD]);
    let before = env.agents();
    let keys = env.d.device_keys();
    // gdbus (GLib) prints the D-Bus error name: "GDBus.Error:<name>: <message>".
    let gdbus = |method: &str, args: &[&str]| {
        Command::new("gdbus")
            .args([
                "call",
                "--system",
                "--dest",
                "org.tessera.Tessera1",
                "--object-path",
                "/org/tessera/Tessera1",
                "--method",
            ])
            .arg(format!("org.tessera.Tessera1.Manager.{method}"))
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &env.bus.address)
            .output()
            .unwrap()
    };
    let aud = format!("{{'audiences': <['{AUD}']>}}");
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "Enroll",
            vec!["x1", "{'colour': <'red'>}", &aud],
            "InvalidArgs",
        ),
        (
            "Enroll",
            vec!["x2", "{'uid': <uint32 0>}", "{'audiences': <@as []>}"],
            "InvalidArgs",
        ),
        (
            "Enroll",
            vec!["Bad Name", "{'uid': <uint32 0>}", &aud],
            "InvalidArgs",
        ),
        ("Enroll", vec!["x3", "@a{sv} {}", &aud], "InvalidArgs"),
        (
            "Enroll",
            vec!["exists", "{'uid': <uint32 0>}", &aud],
            "AlreadyExists",
        ),
        ("Revoke", vec!["ghost", "why"], "NotFound"),
        ("Suspend", vec!["ghost"], "NotFound"),
        ("Resume", vec!["ghost"], "NotFound"),
    ];
    for (method, args, want) in cases {
        let out = gdbus(method, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{method} {args:?}");
        assert!(
            err.contains(&format!("org.tessera.Tessera1.Error.{want}")),
            "{method} {args:?}: {err}"
        );
    }
    let out = gdbus("Enroll", &["x1", "{'colour': <'red'>}", &aud]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("colour"),
        "the unknown key is named"
    );
    // The same through the CLI shows the error names and exit codes scripts can use.
    let out = env.cli(&[
        "agent",
        "enroll",
        "Bad Name",
        "--uid",
        "0",
        "--audience",
        AUD,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("org.tessera.Tessera1.Error.InvalidArgs"));
    let out = env.cli(&["agent", "revoke", "ghost"]);
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("org.tessera.Tessera1.Error.NotFound"));
    let out = env.cli(&["agent", "enroll", "exists", "--uid", "0", "--audience", AUD]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("org.tessera.Tessera1.Error.AlreadyExists")
    );
    let out = env.cli(&[
        "agent",
        "enroll",
        "x4",
        "--uid",
        "0",
        "--audience",
        AUD,
        "--max-ttl",
        "9h",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("org.tessera.Tessera1.Error.InvalidArgs"));
    assert_eq!(env.agents(), before, "nothing changed");
    assert_eq!(env.d.device_keys(), keys, "no key created");
}

#[test]
fn reload_over_dbus_applies_agents_dir() {
    let env = start(Backend::pkcs11(), BusPolicy::Shipped, vec![]);
    assert!(env.agents().is_empty());
    env.d.write_agent(
        "from-file",
        &format!("[selectors]\nuid = 0\n[policy]\naudiences = [\"{AUD}\"]\n"),
    );
    env.ok(&["agent", "reload"]);
    let agents = env.agents();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0]["Name"], "from-file");
    // A bad file makes Reload report it by name, and changes nothing else.
    env.d.write_agent("bad", "[selectors\n");
    let out = env.cli(&["agent", "reload"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.toml:1"),
        "{out:?}"
    );
    assert_eq!(env.agents().len(), 1);
}

#[test]
fn a_second_daemon_cannot_take_the_bus_name() {
    let env = start(Backend::pkcs11(), BusPolicy::Shipped, vec![]);
    env.ok(&["agent", "enroll", "first", "--uid", "0", "--audience", AUD]);
    // Another tesserad (own state, own socket) on the same bus must fail to start.
    let other = Backend::pkcs11();
    let dir = shared_tempdir();
    let cfg = tessera_e2e::devices::write_config(&other, dir.path(), "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("bus = \"none\"", &format!("bus = \"{}\"", env.bus.address));
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(bin("tesserad"))
        .arg("--config")
        .arg(&cfg)
        .envs(other.envs())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot own org.tessera.Tessera1"), "{err}");
    // The first daemon still owns it and answers.
    assert_eq!(env.agents().len(), 1);
}

/// Bound tokens and DPoP proofs over D-Bus (uid agents only, as DESIGN says for the bus):
/// `require_binding` refuses `GetToken` with `Error.BindingRequired`; `GetBoundToken` and
/// `GetProof` give what the socket gives, and a PyJWT relying party accepts it.
#[test]
fn bound_tokens_and_proofs_over_dbus() {
    let env = start(Backend::pkcs11(), BusPolicy::Shipped, vec![]);
    env.ok(&[
        "agent",
        "enroll",
        "bound-bot",
        "--uid",
        "65534",
        "--audience",
        AUD,
        "--require-binding",
    ]);
    let out = gdbus_as(
        &env,
        65534,
        "org.tessera.Tessera1.Credentials.GetToken",
        &[AUD, "[]", "0"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("org.tessera.Tessera1.Error.BindingRequired"),
        "{out:?}"
    );
    let out = gdbus_as(
        &env,
        65534,
        "org.tessera.Tessera1.Credentials.GetBoundToken",
        &[AUD, "[]", "60", "dpop"],
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let token = text.split('\'').nth(1).expect("token in gdbus output");
    let url = format!("{AUD}/v1/things");
    let req = format!(
        "{{'type': <'dpop'>, 'htm': <'PATCH'>, 'htu': <'{url}'>, 'access_token': <'{token}'>}}"
    );
    let out = gdbus_as(
        &env,
        65534,
        "org.tessera.Tessera1.Credentials.GetProof",
        &[&req],
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let proof = text
        .split("'proof': <'")
        .nth(1)
        .and_then(|r| r.split('\'').next())
        .expect("proof in gdbus output");
    let jwks = rt().block_on(env.d.client().jwks()).unwrap();
    let (ok, out) = tessera_e2e::python_check(
        "check_dpop.py",
        &serde_json::json!({"token": token, "proof": proof, "jwks": jwks, "method": "PATCH",
                            "url": url, "audience": AUD}),
    );
    assert!(ok, "{out}");
    // A target outside the policy is refused over the bus too.
    let req = "{'type': <'dpop'>, 'htm': <'GET'>, 'htu': <'https://evil.example/'>}";
    let out = gdbus_as(
        &env,
        65534,
        "org.tessera.Tessera1.Credentials.GetProof",
        &[req],
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("org.tessera.Tessera1.Error.TargetNotAllowed"),
        "{out:?}"
    );
}

/// `tessera status` (D-Bus `Manager.Status()`): counts that move with what happens, expiry
/// times from the CA and CRL the daemon serves, a warning for a key left to destroy, and
/// non-admins refused.
fn status_shows_the_daemon_on_one_screen(backend: Backend) {
    let env = start(backend, BusPolicy::Shipped, vec![]);
    let status = |env: &Env| -> Value {
        serde_json::from_str(&env.ok(&["--json", "status"])).expect("status JSON")
    };
    let s0 = status(&env);
    assert_eq!(s0["device"], "ok", "{s0}");
    assert_eq!(s0["issued_last_hour"], 0, "{s0}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        s0["host_ca_not_after"].as_i64().unwrap() > now + 86_400,
        "{s0}"
    );
    assert!(s0["crl_next_update"].as_i64().unwrap() > now, "{s0}");
    assert!(s0["warnings"].as_array().unwrap().is_empty(), "{s0}");
    for name in ["one", "two", "three"] {
        env.ok(&["agent", "enroll", name, "--uid", "0", "--audience", AUD]);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for _ in 0..3 {
        rt.block_on(
            env.d
                .client()
                .token(&tessera::TokenOptions::new(AUD).agent("one")),
        )
        .unwrap();
    }
    env.ok(&["agent", "suspend", "two"]);
    env.ok(&["agent", "revoke", "three"]);
    let s = status(&env);
    assert_eq!(s["agents"]["active"], 1, "{s}");
    assert_eq!(s["agents"]["suspended"], 1, "{s}");
    assert_eq!(s["agents"]["revoked"], 1, "{s}");
    assert_eq!(s["issued_last_hour"], 3, "{s}");
    assert!(
        s["audit_seq"].as_u64().unwrap() > s0["audit_seq"].as_u64().unwrap(),
        "{s0} {s}"
    );
    assert_eq!(s["destroy_pending"], 0, "{s}");
    // The human form says the same.
    let text = env.ok(&["status"]);
    assert!(text.contains("1 active, 1 suspended, 1 revoked"), "{text}");
    assert!(text.contains("3 credentials in the last hour"), "{text}");
    // Admins only.
    let o = env.cli_as(Some(65534), &["status"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
}
tessera_e2e::both_backends!(status_shows_the_daemon_on_one_screen);
