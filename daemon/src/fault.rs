//! Crash points for tests: `TESSERA_FAULT=<name>` makes the daemon SIGKILL itself at that
//! point, so tests can prove a crash anywhere leaves state that the next start repairs.
//! Nothing a client sends can reach these; only whoever starts the daemon sets its env.

use std::sync::OnceLock;

static FAULT: OnceLock<Option<String>> = OnceLock::new();

pub fn point(name: &str) {
    let armed = FAULT.get_or_init(|| std::env::var("TESSERA_FAULT").ok());
    if armed.as_deref() == Some(name) {
        tracing::warn!(fault = name, "fault point reached: killing the daemon");
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
    }
}
