//! A private system-type dbus-daemon for one test, with the shipped policy file included
//! (or, to test the daemon's own checks, a policy that lets everyone call everything).

use std::path::PathBuf;
use std::process::Command;

use crate::shared_tempdir;

pub enum BusPolicy {
    /// `systemd/org.tessera.Tessera1.conf` exactly as shipped.
    Shipped,
    /// Everyone may own and call anything: only the daemon's own checks stand.
    AllowAll,
}

pub struct TestBus {
    pub dir: tempfile::TempDir,
    pub address: String,
    pid: i32,
}

pub fn shipped_policy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../systemd/org.tessera.Tessera1.conf")
}

impl TestBus {
    pub fn start(policy: BusPolicy) -> TestBus {
        let dir = shared_tempdir();
        let sock = dir.path().join("bus.sock");
        let policy_xml = match policy {
            BusPolicy::Shipped => format!("<include>{}</include>", shipped_policy().canonicalize().unwrap().display()),
            BusPolicy::AllowAll => "<policy context=\"default\"><allow own=\"*\"/><allow send_destination=\"*\"/></policy>".into(),
        };
        let conf = tesserad::runtime::dev::bus_config(&sock, &policy_xml);
        let conf_path = dir.path().join("bus.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let out = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf_path.display()))
            .args([
                "--fork",
                "--print-address=1",
                "--print-pid=1",
                "--nopidfile",
            ])
            .output()
            .expect("dbus-daemon (scripts/setup installs dbus-daemon)");
        assert!(
            out.status.success(),
            "dbus-daemon: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let address = lines.next().expect("address").trim().to_string();
        let pid = lines
            .next()
            .expect("pid")
            .trim()
            .parse()
            .expect("pid number");
        // The socket is for everyone (tests connect as other uids).
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777));
        TestBus { dir, address, pid }
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}
