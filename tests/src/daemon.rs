//! The real `tesserad` binary on a real device, with its own state dir and socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::devices::{write_config, Backend};
use crate::{bin, shared_tempdir};

pub struct Daemon {
    pub backend: Backend,
    pub state: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    envs: Vec<(String, String)>,
    /// Extra `tesserad` arguments for the next spawn (e.g. `--accept-audit-tamper`).
    pub args: Vec<String>,
}

pub struct Options {
    /// Extra top-level TOML (tables like `[limits]` go here).
    pub extra_config: String,
    /// D-Bus `bus` value.
    pub bus: String,
    /// `(name, toml)` agent files written before start.
    pub agents: Vec<(String, String)>,
    pub envs: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            extra_config: String::new(),
            bus: "none".into(),
            agents: vec![],
            envs: vec![],
        }
    }
}

impl Daemon {
    pub fn start(backend: Backend) -> Daemon {
        Self::start_with(backend, Options::default())
    }

    pub fn start_with(backend: Backend, opts: Options) -> Daemon {
        let mut d = Self::prepare(backend, opts);
        d.spawn();
        d.wait_ready();
        d
    }

    /// State dir, config and agent files, but no process yet (for crash tests at start-up).
    pub fn prepare(backend: Backend, opts: Options) -> Daemon {
        let state = shared_tempdir();
        let config = write_config(&backend, state.path(), &opts.extra_config);
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("bus = \"none\"", &format!("bus = \"{}\"", opts.bus));
        std::fs::write(&config, text).unwrap();
        std::fs::create_dir_all(state.path().join("agents.d")).unwrap();
        let d = Daemon {
            socket: state.path().join("agent.sock"),
            log: state.path().join("tesserad.log"),
            config,
            state,
            backend,
            child: None,
            envs: opts.envs,
            args: vec![],
        };
        for (name, toml) in &opts.agents {
            d.write_agent(name, toml);
        }
        d
    }

    /// The SPIFFE Workload API socket (beside the agent socket unless configured).
    pub fn workload_socket(&self) -> PathBuf {
        self.state.path().join("workload.sock")
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// A directory for a test's own files (certificates, evidence) beside the daemon's state.
    pub fn scratch_dir(&self) -> PathBuf {
        let dir = self.state.path().join("check");
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    pub fn agents_dir(&self) -> PathBuf {
        self.state.path().join("agents.d")
    }

    pub fn write_agent(&self, name: &str, toml: &str) {
        std::fs::write(self.agents_dir().join(format!("{name}.toml")), toml).unwrap();
    }

    /// Start the process without waiting (for fault-point tests).
    pub fn spawn_with_env(&mut self, extra: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // TESSERA_DAEMON_WRAPPER (e.g. "valgrind --tool=callgrind"): profile the daemon.
        let wrapper = std::env::var("TESSERA_DAEMON_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut cmd = match words.next() {
            Some(w) => {
                let mut c = Command::new(w);
                c.args(words).arg(bin("tesserad"));
                c
            }
            None => Command::new(bin("tesserad")),
        };
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .args(&self.args)
            .envs(self.backend.envs())
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tesserad");
        self.child = Some(child);
    }

    pub fn spawn(&mut self) {
        self.spawn_with_env(&[]);
    }

    /// Wait until the socket answers health, or panic with the daemon's log.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(c) = &mut self.child {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("tesserad exited ({st}) before ready:\n{}", self.log_text());
                }
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tesserad not ready after 30s:\n{}", self.log_text());
    }

    /// Wait for the process to exit by itself (e.g. a fault point's SIGKILL).
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        let c = self.child.as_mut().expect("running");
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "tesserad did not exit:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start with fault point `point` armed (`TESSERA_FAULT`) and assert that the daemon
    /// killed itself there (SIGKILL); the state is left as the crash left it.
    pub fn crash_at(&mut self, point: &str) {
        self.spawn_with_env(&[("TESSERA_FAULT", point)]);
        let st = self.wait_exit(Duration::from_secs(30));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(9),
            "the daemon did not die at fault point {point}: {}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// SIGHUP, then wait until the daemon logs that the reload finished.
    pub fn reload(&self) {
        let before = self.log_text().matches(" reloaded").count();
        self.signal(nix::sys::signal::Signal::SIGHUP);
        // Generous: enrolling hundreds of SoftHSM keys takes about 150 ms each.
        let deadline = Instant::now() + Duration::from_secs(180);
        while self.log_text().matches(" reloaded").count() == before {
            assert!(
                Instant::now() < deadline,
                "no reload after SIGHUP:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(20))
    }

    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.spawn();
        self.wait_ready();
    }

    pub fn client(&self) -> tessera::Client {
        tessera::Client::with_socket(&self.socket)
    }

    /// Run the `tessera` CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("tessera"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tessera")
    }

    /// Run the `tessera` CLI against this daemon, its admin commands over the bus at `bus`.
    pub fn cli_on_bus(&self, bus: &str, args: &[&str]) -> std::process::Output {
        Command::new(bin("tessera"))
            .arg("--bus")
            .arg(bus)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tessera")
    }

    /// Run the `tessera` CLI against this daemon with `input` on its standard input.
    pub fn cli_stdin(&self, args: &[&str], input: &[u8]) -> std::process::Output {
        use std::io::Write;
        let mut child = Command::new(bin("tessera"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tessera");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
        child.wait_with_output().expect("tessera output")
    }

    /// Ids of the agent keys the device holds (the host CA key is listed by
    /// [`Daemon::device_host_ca_keys`]).
    pub fn device_keys(&self) -> Vec<String> {
        self.all_device_keys()
            .into_iter()
            .filter(|k| k.starts_with("agent-"))
            .collect()
    }

    /// Ids of host CA keys in the device (exactly one once the daemon has started).
    pub fn device_host_ca_keys(&self) -> Vec<String> {
        self.all_device_keys()
            .into_iter()
            .filter(|k| k.starts_with("hostca-"))
            .collect()
    }

    /// Ids of every key the device holds. PKCS#11: listed on the token by a separate process.
    /// TPM: the key blobs in the state (a TPM key exists only as its wrapped blob; a second
    /// TPM user would also disturb the daemon's loaded objects on swtpm).
    pub fn all_device_keys(&self) -> Vec<String> {
        if let crate::Backend::Tpm(_) = self.backend {
            let mut ids: Vec<String> = std::fs::read_dir(self.state.path().join("tpm/keys"))
                .map(|rd| {
                    rd.flatten()
                        .filter_map(|e| {
                            e.file_name()
                                .to_str()?
                                .strip_suffix(".priv")
                                .map(str::to_string)
                        })
                        .collect()
                })
                .unwrap_or_default();
            ids.sort();
            return ids;
        }
        let out = Command::new(bin("ksprobe"))
            .arg(&self.config)
            .arg("list")
            .envs(self.backend.envs())
            .output()
            .expect("run ksprobe");
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("ksprobe: {out:?}"));
        serde_json::from_value(v["ids"].clone()).expect("ids")
    }

    pub fn audit_dir(&self) -> PathBuf {
        self.state.path().join("audit")
    }

    /// Every audit record so far, in order.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        let mut out = vec![];
        for f in tesserad::audit::files_in_order(&self.audit_dir()).unwrap() {
            for line in std::fs::read_to_string(f).unwrap().lines() {
                out.push(serde_json::from_str(line).unwrap());
            }
        }
        out
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
