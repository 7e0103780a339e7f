//! `tessera agent check` says of each agent file what the daemon does with it: a file it calls
//! valid is enrolled, a file it refuses is refused by the daemon's own reconcile.

use tessera_e2e::daemon::Options;
use tessera_e2e::{Backend, Daemon};

/// `(name, content)`: valid and invalid files of every kind the check must catch.
fn files() -> Vec<(&'static str, String, bool)> {
    let pol = "[policy]\naudiences = [\"https://api.example.com\"]\n";
    vec![
        ("good", format!("[selectors]\nuid = 0\n{pol}"), true),
        (
            "longttl",
            format!("[selectors]\nuid = 0\n{pol}max_ttl = \"5h\"\n"),
            false,
        ),
        (
            "typo",
            "[selectors]\nuid = 0\n[policy]\naudience = [\"https://a.example\"]\n".into(),
            false,
        ),
        ("nosel", format!("[selectors]\ngid = 0\n{pol}"), false),
        (
            "tmpexe",
            format!("[selectors]\nuid = 0\nexe = \"/tmp/agent\"\n{pol}"),
            false,
        ),
        (
            "badkey",
            format!("[selectors]\nuid = 0\n{pol}proof_key = \"cloud\"\n"),
            false,
        ),
        (
            "scoped",
            format!("[selectors]\nuid = 0\n{pol}scopes = [\"read\"]\nrequire_binding = true\n"),
            true,
        ),
    ]
}

#[test]
fn agent_check_agrees_with_the_daemon() {
    let files = files();
    let d = Daemon::start_with(
        Backend::pkcs11(),
        Options {
            agents: files
                .iter()
                .map(|(n, c, _)| (n.to_string(), c.clone()))
                .collect(),
            ..Default::default()
        },
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = d.client();
    for (name, _, valid) in &files {
        let path = d.agents_dir().join(format!("{name}.toml"));
        let o = d.cli(&["agent", "check", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.success(), *valid, "{name}: {o:?}");
        let enrolled = rt.block_on(client.whoami_agent(Some(name))).is_ok();
        assert_eq!(enrolled, *valid, "{name}: check and daemon disagree");
        if !valid {
            assert!(
                stderr.starts_with(&format!("{}", path.display())),
                "{name}: {stderr}"
            );
        }
    }
    // The parse error names the line; a hook's temporary copy is checked under --as.
    let typo = d.agents_dir().join("typo.toml");
    let o = d.cli(&["agent", "check", typo.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("typo.toml:4:"),
        "{o:?}"
    );
    let copy = d.scratch_dir().join("ansible-tmp-1234");
    std::fs::copy(d.agents_dir().join("good.toml"), &copy).unwrap();
    let o = d.cli(&["agent", "check", copy.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let o = d.cli(&["agent", "check", "--as", "good", copy.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    // Several files: all are reported, exit 1 when any fails; --json lists each.
    let all: Vec<String> = files
        .iter()
        .map(|(n, _, _)| {
            d.agents_dir()
                .join(format!("{n}.toml"))
                .display()
                .to_string()
        })
        .collect();
    let mut args = vec!["--json", "agent", "check"];
    args.extend(all.iter().map(|s| s.as_str()));
    let o = d.cli(&args);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let oks: Vec<bool> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ok"].as_bool().unwrap())
        .collect();
    assert_eq!(oks, files.iter().map(|f| f.2).collect::<Vec<_>>());
}
