//! An agent as the registry records it: name, SPIFFE id, status, selectors, policy and the
//! state of its device key.

use serde::{Deserialize, Serialize};

use crate::agents::policy::Policy;
use crate::agents::registry::RegistryError;
use crate::agents::selectors::Selectors;

/// Agent names become file names, D-Bus paths and URI path segments.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "agent name {name:?} must be 1-63 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Active,
    Suspended,
    Revoked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Creating,
    Present,
    Destroying,
    Destroyed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    File,
    Dbus,
}

macro_rules! text_enum {
    ($t:ty, $($v:ident => $s:literal),+) => {
        impl $t {
            pub fn as_str(self) -> &'static str { match self { $(Self::$v => $s),+ } }
            pub(crate) fn parse(s: &str) -> Result<Self, RegistryError> {
                match s { $($s => Ok(Self::$v),)+ other => Err(RegistryError::Corrupt(format!("unknown value {other:?}"))) }
            }
        }
    };
}
text_enum!(Status, Pending => "pending", Active => "active", Suspended => "suspended", Revoked => "revoked");
text_enum!(KeyState, Creating => "creating", Present => "present", Destroying => "destroying", Destroyed => "destroyed");
text_enum!(Source, File => "file", Dbus => "dbus");

#[derive(Debug, Clone)]
pub struct Agent {
    pub row: i64,
    pub name: String,
    pub id: String,
    pub status: Status,
    pub source: Source,
    pub selectors: Selectors,
    pub policy: Policy,
    pub key_id: String,
    pub key_state: KeyState,
    pub kid: Option<String>,
    pub jwk: Option<serde_json::Value>,
    pub created_at: i64,
    pub updated_at: i64,
    pub revoked_at: Option<i64>,
    pub revoke_reason: Option<String>,
    pub issued_count: u64,
    pub last_issued_at: Option<i64>,
    /// SHA-256 of the `agents_dir` file it was enrolled or last updated from. Kept on a
    /// revoked record when an admin revoked it: the same file does not bring it back.
    pub file_hash: Option<String>,
}

impl Agent {
    pub fn is_live(&self) -> bool {
        matches!(self.status, Status::Active | Status::Suspended)
    }
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
