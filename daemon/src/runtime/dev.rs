//! `tesserad --dev`: an embedded default that needs nothing configured. A SoftHSM token
//! (or, with `--dev tpm`, a private swtpm) is created under the state dir on first start and
//! reused after; the socket and `agents.d/` live there too.

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

/// The dev config plus whatever must live as long as the daemon (the swtpm child).
pub struct DevEnv {
    pub config: Config,
    swtpm: Option<Child>,
}

impl Drop for DevEnv {
    fn drop(&mut self) {
        if let Some(c) = &mut self.swtpm {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
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
            let (child, port) = start_swtpm(&dir)?;
            (
                format!("[backend]\nkind = \"tpm\"\ntcti = \"swtpm:host=127.0.0.1,port={port}\"\n"),
                Some(child),
            )
        }
    };
    let text = format!(
        "trust_domain = \"tessera.local\"\nstate_dir = \"{sd}\"\nsocket = \"{sd}/agent.sock\"\nagents_dir = \"{sd}/agents.d\"\n{backend}\n[dbus]\nbus = \"{bus}\"\n",
        sd = state_dir.display(),
        bus = bus.unwrap_or("none"),
    );
    let config = Config::parse(&text, "--dev")?;
    Ok(DevEnv { config, swtpm })
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
