//! Crash points for tests: `TESSERA_FAULT=<name>` makes the daemon SIGKILL itself at that
//! point, so tests can prove a crash anywhere leaves state that the next start repairs.
//! Nothing a client sends can reach these; only whoever starts the daemon sets its env.

use std::sync::OnceLock;

static FAULT: OnceLock<Option<String>> = OnceLock::new();

/// Every fault point in the daemon. The crash test (`tests/tests/fault_points.rs`) runs each
/// one; a unit test below checks that this list and the `point(...)` calls in the source are
/// the same, so a new point cannot be left untested.
pub const POINTS: &[&str] = &[
    "enroll-after-record",
    "enroll-after-key",
    "revoke-after-record",
    "hostca-after-name",
    "hostca-after-key",
];

pub fn point(name: &str) {
    debug_assert!(
        POINTS.contains(&name),
        "fault point {name} is not in POINTS"
    );
    let armed = FAULT.get_or_init(|| std::env::var("TESSERA_FAULT").ok());
    if armed.as_deref() == Some(name) {
        tracing::warn!(fault = name, "fault point reached: killing the daemon");
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    /// The names of `point("...")` calls in the daemon's source are exactly [`super::POINTS`].
    #[test]
    fn the_list_names_every_point_in_the_source() {
        let mut found = std::collections::BTreeSet::new();
        let mut dirs = vec![std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src"
        ))];
        while let Some(dir) = dirs.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("fault.rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    for piece in text.split("fault::point(\"").skip(1) {
                        found.insert(piece.split('"').next().unwrap().to_string());
                    }
                }
            }
        }
        let listed: std::collections::BTreeSet<String> =
            super::POINTS.iter().map(|s| s.to_string()).collect();
        assert_eq!(found, listed, "fault points in the source vs fault::POINTS");
    }
}
