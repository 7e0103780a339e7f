//! Selectors: which processes are an agent, matched against kernel facts about a caller.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::caller::Caller;

/// Which processes are this agent. All given must match; `uid` or `unit` is required.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selectors {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

impl Selectors {
    pub fn validate(&self) -> Result<(), String> {
        if self.uid.is_none() && self.unit.is_none() {
            return Err("selectors need at least one of uid or unit".into());
        }
        if let Some(exe) = &self.exe {
            if !exe.is_absolute() {
                return Err(format!("selector exe {:?} must be an absolute path", exe));
            }
            // Stat'ed in the daemon's mount namespace: a path in a world-writable temporary
            // directory (private per service under systemd) names nothing stable.
            use std::path::Component;
            if exe.components().any(|c| matches!(c, Component::ParentDir)) {
                return Err(format!("selector exe {exe:?} must not contain '..'"));
            }
            if exe.starts_with("/tmp") || exe.starts_with("/var/tmp") {
                return Err(format!(
                    "selector exe {exe:?} is under /tmp or /var/tmp; install the program elsewhere"
                ));
            }
        }
        if let Some(h) = &self.exe_sha256 {
            if h.len() != 64
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err("selector exe_sha256 must be 64 lowercase hex digits".into());
            }
        }
        if let Some(u) = &self.unit {
            if u.is_empty() || u.contains('/') || u.contains(':') {
                // `user@UID:name` (a unit of a user's manager) is not matchable in this release.
                return Err(format!(
                    "selector unit {u:?} is not a system unit name (user-manager units cannot be selected)"
                ));
            }
        }
        Ok(())
    }

    /// Every selector but `exe_sha256` matches (what can be decided without reading the
    /// executable).
    /// Only `uid`/`gid` are given: what a caller known from a message bus can be checked
    /// against.
    pub fn ids_only(&self) -> bool {
        self.exe.is_none()
            && self.exe_sha256.is_none()
            && self.unit.is_none()
            && self.cgroup.is_none()
    }

    /// `uid` and `gid` match.
    pub fn ids_match(&self, c: &Caller) -> bool {
        self.uid.is_none_or(|u| u == c.uid) && self.gid.is_none_or(|g| g == c.gid)
    }

    pub fn matches_cheap(&self, c: &Caller) -> bool {
        self.ids_match(c)
            && self.exe.as_ref().is_none_or(|e| exe_is(e, c))
            && self
                .unit
                .as_ref()
                .is_none_or(|u| c.system_unit() == Some(u.as_str()))
            && self
                .cgroup
                .as_ref()
                .is_none_or(|g| c.cgroup.as_ref() == Some(g))
    }

    pub fn matches(&self, c: &Caller) -> bool {
        self.matches_cheap(c)
            && self
                .exe_sha256
                .as_ref()
                .is_none_or(|h| c.exe_sha256.as_ref() == Some(h))
    }
}

/// The selector's file, stat'ed in the daemon's own mount namespace, is the caller's
/// executable (same device and inode): a bind mount or another namespace can show any path,
/// not another file's identity.
fn exe_is(selector: &std::path::Path, c: &Caller) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(selector), c.exe_id) {
        (Ok(m), Some(id)) => (m.dev(), m.ino()) == id,
        _ => false,
    }
}
