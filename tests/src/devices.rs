//! Real devices for tests: swtpm and SoftHSM, each private to one test.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::shared_tempdir;

pub const SO_PIN: &str = "12345678";
pub const USER_PIN: &str = "87654321";
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A private swtpm, killed by pid on drop.
pub struct Swtpm {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub pid: i32,
}

/// Start swtpm on `port` (and `port + 1` for control) over the state in `dir`: its pid once it
/// answers, `None` if it could not start (a port taken).
fn launch(dir: &Path, port: u16) -> Option<i32> {
    let pidfile = dir.join("pid");
    let _ = std::fs::remove_file(&pidfile);
    let status = Command::new("swtpm")
        .args(["socket", "--tpm2", "--tpmstate"])
        .arg(format!("dir={}", dir.display()))
        .arg("--server")
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
        .args(["--flags", "not-need-init,startup-clear", "--pid"])
        .arg(format!("file={}", pidfile.display()))
        .arg("-d")
        .status()
        .expect("run swtpm (is it installed? scripts/setup)");
    if !status.success() {
        return None;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(s) = std::fs::read_to_string(&pidfile) {
            if let Ok(pid) = s.trim().parse::<i32>() {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(pid);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("swtpm did not come up on port {port}");
}

fn port_pair_free(p: u16) -> bool {
    TcpListener::bind(("127.0.0.1", p)).is_ok() && TcpListener::bind(("127.0.0.1", p + 1)).is_ok()
}

impl Swtpm {
    pub fn start() -> Swtpm {
        Self::start_with(|_| {})
    }

    /// `prepare` may provision the state dir (e.g. `swtpm_setup`) before the TPM starts.
    pub fn start_with(prepare: impl FnOnce(&Path)) -> Swtpm {
        let dir = shared_tempdir();
        prepare(dir.path());
        for _ in 0..50 {
            let port = 20000 + 2 * (rand::random::<u16>() % 20000);
            if !port_pair_free(port) {
                continue;
            }
            match launch(dir.path(), port) {
                Some(pid) => return Swtpm { dir, port, pid },
                None => continue, // port taken in between: try another
            }
        }
        panic!("no free port pair for swtpm");
    }

    /// Kill -9, as a crash or a power loss would; the state dir stays.
    pub fn kill9(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "swtpm {} did not die", self.pid);
            std::thread::sleep(Duration::from_millis(20));
        }
        // Its pid may be another process's soon: drop must not signal it.
        self.pid = 0;
    }

    /// Start again on the same ports with the same state (a TPM that came back).
    pub fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(pid) = launch(self.dir.path(), self.port) {
                self.pid = pid;
                return;
            }
            // The killed process's ports may linger a moment.
            assert!(
                Instant::now() < deadline,
                "swtpm did not restart on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A TPM manufactured by `swtpm_setup` with EK certificates (RSA 2048 and ECC P-384) in
    /// NV, signed by a private local CA (its own config, so parallel tests do not share one).
    pub fn start_with_ek_certs() -> Swtpm {
        Self::start_with(|dir| {
            let ca = dir.join("localca");
            std::fs::create_dir_all(&ca).expect("localca dir");
            let setup_conf = dir.join("swtpm_setup.conf");
            let localca_conf = dir.join("swtpm-localca.conf");
            let localca_opts = dir.join("swtpm-localca.options");
            std::fs::write(
                &setup_conf,
                format!(
                    "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {}\ncreate_certs_tool_options = {}\nactive_pcr_banks = sha256\n",
                    localca_conf.display(),
                    localca_opts.display()
                ),
            )
            .expect("swtpm_setup.conf");
            std::fs::write(
                &localca_conf,
                format!(
                    "statedir = {c}\nsigningkey = {c}/signkey.pem\nissuercert = {c}/issuercert.pem\ncertserial = {c}/certserial\n",
                    c = ca.display()
                ),
            )
            .expect("swtpm-localca.conf");
            std::fs::write(
                &localca_opts,
                "--platform-manufacturer tessera\n--platform-version 2.1\n--platform-model test\n",
            )
            .expect("swtpm-localca.options");
            let out = Command::new("swtpm_setup")
                .args([
                    "--tpm2",
                    "--create-ek-cert",
                    "--create-platform-cert",
                    "--overwrite",
                ])
                .arg("--tpmstate")
                .arg(dir)
                .arg("--config")
                .arg(&setup_conf)
                .output()
                .expect("run swtpm_setup (is swtpm-tools installed? scripts/setup)");
            assert!(
                out.status.success(),
                "swtpm_setup: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        })
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        if self.pid == 0 {
            return;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// A private SoftHSM token store with one initialised token labelled `tessera`.
pub struct SoftHsm {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub pin_file: PathBuf,
}

impl SoftHsm {
    pub fn new() -> SoftHsm {
        Self::with_label("tessera")
    }

    pub fn with_label(label: &str) -> SoftHsm {
        let dir = shared_tempdir();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir_all(&tokens).expect("token dir");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nslots.removable = false\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("write softhsm2.conf");
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                SO_PIN,
                "--pin",
                USER_PIN,
            ])
            .output()
            .expect("run softhsm2-util (is softhsm2 installed? scripts/setup)");
        assert!(
            out.status.success(),
            "softhsm2-util: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, format!("{USER_PIN}\n")).expect("pin file");
        SoftHsm {
            dir,
            conf,
            pin_file,
        }
    }

    /// `pkcs11-tool` (OpenSC) against this token, logged in.
    pub fn pkcs11_tool(&self, args: &[&str]) -> std::process::Output {
        Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", &self.conf)
            .args([
                "--module",
                SOFTHSM_MODULE,
                "--token-label",
                "tessera",
                "--login",
                "--pin",
                USER_PIN,
            ])
            .args(args)
            .output()
            .expect("run pkcs11-tool (opensc)")
    }
}

impl Default for SoftHsm {
    fn default() -> Self {
        Self::new()
    }
}

/// Which real device a test runs against.
pub enum Backend {
    Tpm(Swtpm),
    Pkcs11(SoftHsm),
}

impl Backend {
    pub fn tpm() -> Backend {
        Backend::Tpm(Swtpm::start())
    }
    pub fn pkcs11() -> Backend {
        Backend::Pkcs11(SoftHsm::new())
    }
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Tpm(_) => "tpm",
            Backend::Pkcs11(_) => "pkcs11",
        }
    }

    /// The `[backend]` table of a tesserad config for this device.
    pub fn config_table(&self) -> String {
        match self {
            Backend::Tpm(t) => format!("[backend]\nkind = \"tpm\"\ntcti = \"{}\"\n", t.tcti()),
            Backend::Pkcs11(h) => format!(
                "[backend]\nkind = \"pkcs11\"\nmodule = \"{SOFTHSM_MODULE}\"\ntoken_label = \"tessera\"\npin_file = \"{}\"\n",
                h.pin_file.display()
            ),
        }
    }

    /// Environment a process needs to reach this device.
    pub fn envs(&self) -> Vec<(String, String)> {
        let mut v = vec![("TSS2_LOG".to_string(), "all+NONE".to_string())];
        if let Backend::Pkcs11(h) = self {
            v.push(("SOFTHSM2_CONF".into(), h.conf.display().to_string()));
        }
        v
    }
}

/// Write a minimal tesserad config for `backend` with state under `state_dir`.
pub fn write_config(backend: &Backend, state_dir: &Path, extra: &str) -> PathBuf {
    let path = state_dir.join("tesserad.toml");
    let text = format!(
        "trust_domain = \"test.example\"\nhost = \"testhost\"\nstate_dir = \"{sd}\"\nsocket = \"{sd}/agent.sock\"\nagents_dir = \"{sd}/agents.d\"\n{extra}\n{}\n[dbus]\nbus = \"none\"\n",
        backend.config_table(),
        sd = state_dir.display(),
    );
    std::fs::write(&path, text).expect("write config");
    path
}
