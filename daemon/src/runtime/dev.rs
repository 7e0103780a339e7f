//! `tesserad --dev`: an embedded default that needs nothing configured. A SoftHSM token
//! (or, with `--dev tpm`, a private swtpm) is created under the state dir on first start and
//! reused after; the socket and `agents.d/` live there too. Unless `--bus` says otherwise, a
//! private `dbus-daemon` runs beside it with the shipped policy, the invoking user in the
//! places of the `tessera` user and the `tessera-admin` group, and its address in `<state>/bus`,
//! so the admin commands work in dev mode too.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::keystore::pkcs11::provision_token;
use crate::runtime::config::Config;

pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DevBackend {
    Pkcs11,
    Tpm,
}

/// The dev config plus whatever must live as long as the daemon (swtpm, the private bus).
pub struct DevEnv {
    pub config: Config,
    swtpm: Option<Child>,
    /// Kept for its Drop: the private bus lives as long as the daemon.
    _bus: Option<PrivateBus>,
}

impl Drop for DevEnv {
    fn drop(&mut self) {
        if let Some(c) = &mut self.swtpm {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The private bus stops when `_bus` drops, after this.
    }
}

/// The shipped bus policy; dev mode substitutes the invoking user for the service's names.
const SHIPPED_BUS_POLICY: &str = include_str!("../../../systemd/org.tessera.Tessera1.conf");

/// A system-type bus on `sock`: nobody owns or calls anything but what `policy` (the shipped
/// file's inner rules, or a test's) allows. The dev bus and the tests' buses are this one.
pub fn bus_config(sock: &Path, policy: &str) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={sock}</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
{policy}
</busconfig>
"#,
        sock = sock.display()
    )
}

/// A `dbus-daemon` of our own, for `--dev` without `--bus`.
struct PrivateBus {
    child: Child,
    dir: std::path::PathBuf,
    address: String,
}

impl PrivateBus {
    fn start(state_dir: &Path) -> Result<PrivateBus> {
        let dir = state_dir.join("dbus");
        std::fs::create_dir_all(&dir)?;
        stop_stale(&dir.join("pid"), "dbus-daemon", &dir.join("bus.conf"));
        let _ = std::fs::remove_file(dir.join("bus.sock"));
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let policy = SHIPPED_BUS_POLICY
            .replace("user=\"tessera\"", &format!("user=\"{uid}\""))
            .replace("group=\"tessera-admin\"", &format!("group=\"{gid}\""));
        // The shipped file is a whole <busconfig>: keep what is inside it.
        let inner = policy
            .split_once("<busconfig>")
            .and_then(|(_, rest)| rest.rsplit_once("</busconfig>"))
            .map(|(inner, _)| inner)
            .context("shipped bus policy has no <busconfig>")?;
        let conf = bus_config(&dir.join("bus.sock"), inner);
        let conf_path = dir.join("bus.conf");
        std::fs::write(&conf_path, conf)?;
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf_path.display()))
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start dbus-daemon (is it installed? scripts/setup)")?;
        std::fs::write(dir.join("pid"), child.id().to_string())?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            use std::io::BufRead;
            std::io::BufReader::new(out).read_line(&mut line)?;
        }
        let address = line.trim().to_string();
        if address.is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("dbus-daemon printed no address");
        }
        // Written last and atomically: a CLI that finds the file finds a bus.
        let tmp = state_dir.join("bus.tmp");
        std::fs::write(&tmp, format!("{address}\n"))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
        std::fs::rename(&tmp, state_dir.join("bus"))?;
        Ok(PrivateBus {
            child,
            dir,
            address,
        })
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_file(parent.join("bus"));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.dir.join("pid"));
        let _ = std::fs::remove_file(self.dir.join("bus.sock"));
    }
}

/// A helper (private bus, swtpm) left running by a dev daemon that was killed: stop it, but
/// only if the pid in `pid_file` is still `program` started with `marker` in its arguments.
fn stop_stale(pid_file: &Path, program: &str, marker: &Path) {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    else {
        return;
    };
    let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains(program) && c.contains(&marker.display().to_string())
        })
        .unwrap_or(false);
    if ours {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(2);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_file(pid_file);
}

fn secret_file(path: &Path) -> Result<String> {
    if let Ok(s) = std::fs::read_to_string(path) {
        return Ok(s.trim().to_string());
    }
    let pin = hex::encode(rand::random::<[u8; 8]>());
    std::fs::write(path, &pin).with_context(|| format!("write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(pin)
}

/// Must run before any thread starts: it sets SOFTHSM2_CONF for this process.
pub fn prepare(kind: DevBackend, state_dir: &Path, bus: Option<&str>) -> Result<DevEnv> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create state dir {}", state_dir.display()))?;
    let state_dir = state_dir
        .canonicalize()
        .with_context(|| format!("state dir {}", state_dir.display()))?;
    std::fs::create_dir_all(state_dir.join("agents.d"))?;
    let (backend, swtpm) = match kind {
        DevBackend::Pkcs11 => {
            let dir = state_dir.join("softhsm");
            std::fs::create_dir_all(dir.join("tokens"))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
            let conf = dir.join("softhsm2.conf");
            std::fs::write(
                &conf,
                format!(
                    "directories.tokendir = {}\nobjectstore.backend = file\nslots.removable = false\nlog.level = ERROR\n",
                    dir.join("tokens").display()
                ),
            )?;
            // Process-wide: fine only because no other thread exists yet (see fn doc).
            std::env::set_var("SOFTHSM2_CONF", &conf);
            let so_pin = secret_file(&dir.join("so-pin"))?;
            let pin_file = dir.join("user-pin");
            let user_pin = secret_file(&pin_file)?;
            provision_token(Path::new(SOFTHSM_MODULE), "tessera", &so_pin, &user_pin).context(
                "cannot create the dev SoftHSM token (is softhsm2 installed? scripts/setup)",
            )?;
            (
                format!(
                    "[backend]\nkind = \"pkcs11\"\nmodule = \"{SOFTHSM_MODULE}\"\ntoken_label = \"tessera\"\npin_file = \"{}\"\n",
                    pin_file.display()
                ),
                None,
            )
        }
        DevBackend::Tpm => {
            let dir = state_dir.join("swtpm");
            std::fs::create_dir_all(&dir)?;
            // A swtpm orphaned by a killed dev daemon holds the state's lock: stop it first.
            stop_stale(&dir.join("pid"), "swtpm", &dir);
            let (child, port) = start_swtpm(&dir)?;
            std::fs::write(dir.join("pid"), child.id().to_string())?;
            (
                format!("[backend]\nkind = \"tpm\"\ntcti = \"swtpm:host=127.0.0.1,port={port}\"\n"),
                Some(child),
            )
        }
    };
    // No --bus: a private bus, the invoking user as admin. A dev daemon without dbus-daemon
    // still runs, without the admin door.
    let private = match bus {
        Some(_) => None,
        None => match PrivateBus::start(&state_dir) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("tesserad --dev: no private bus, so no admin commands: {e:#}");
                None
            }
        },
    };
    let admin_group = nix::unistd::Group::from_gid(nix::unistd::getgid())
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| "tessera-admin".into());
    let bus = match (&private, bus) {
        (Some(b), _) => b.address.clone(),
        (None, Some(b)) => b.to_string(),
        (None, None) => "none".into(),
    };
    let text = format!(
        "trust_domain = \"tessera.local\"\nstate_dir = \"{sd}\"\nsocket = \"{sd}/agent.sock\"\nagents_dir = \"{sd}/agents.d\"\n{backend}\n[dbus]\nbus = \"{bus}\"\nadmin_group = \"{admin_group}\"\n",
        sd = state_dir.display(),
    );
    let config = Config::parse(&text, "--dev")?;
    Ok(DevEnv {
        config,
        swtpm,
        _bus: private,
    })
}

fn start_swtpm(dir: &Path) -> Result<(Child, u16)> {
    for _ in 0..20 {
        let port = 30000 + 2 * (rand::random::<u16>() % 10000);
        let mut child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", dir.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start swtpm (is it installed? scripts/setup)")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(_status) = child.try_wait()? {
                break; // port taken: try another
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok((child, port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    bail!("could not start swtpm on a free port")
}
