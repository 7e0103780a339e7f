//! Enrolled agents: selectors, policy, status and key reference, in SQLite (WAL).
//!
//! Every change is one transaction. Records carry the state of their key (`key_state`) so
//! the enrolment and revocation state machines in [`crate::lifecycle`] can be finished or
//! rolled back after a crash. A revoked record is kept for history; its name may be enrolled
//! again as a new agent (the partial unique index only covers live records).

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use crate::caller::Caller;
use crate::config::Dur;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("an agent named {0:?} already exists")]
    AlreadyExists(String),
    #[error("no agent named {0:?}")]
    NotFound(String),
    #[error("registry record is corrupt: {0}")]
    Corrupt(String),
    #[error("agent {0:?} is no longer active")]
    NotLive(String),
    #[error("the registry is closed (the daemon is stopping)")]
    Closed,
}

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
            if u.is_empty() || u.contains('/') {
                return Err(format!("selector unit {u:?} is not a unit name"));
            }
        }
        Ok(())
    }

    pub fn matches(&self, c: &Caller) -> bool {
        self.uid.is_none_or(|u| u == c.uid)
            && self.gid.is_none_or(|g| g == c.gid)
            && self.exe.as_ref().is_none_or(|e| c.exe.as_ref() == Some(e))
            && self
                .exe_sha256
                .as_ref()
                .is_none_or(|h| c.exe_sha256.as_ref() == Some(h))
            && self
                .unit
                .as_ref()
                .is_none_or(|u| c.unit.as_ref() == Some(u))
            && self
                .cgroup
                .as_ref()
                .is_none_or(|g| c.cgroup.as_ref() == Some(g))
    }
}

/// What an agent may ask for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub audiences: Vec<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ttl: Option<Dur>,
    /// Longest agent certificate; defaults to `max_ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cert_ttl: Option<Dur>,
    /// Tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u32>,
}

impl Policy {
    pub fn validate(
        &self,
        global_max_ttl: std::time::Duration,
        global_max_cert_ttl: std::time::Duration,
    ) -> Result<(), String> {
        if let Some(m) = self.max_cert_ttl {
            if m.0 > global_max_cert_ttl {
                return Err(format!(
                    "policy max_cert_ttl {} is above the daemon's certificates.max_ttl {}",
                    crate::config::format_duration(m.0),
                    crate::config::format_duration(global_max_cert_ttl)
                ));
            }
            if m.0.as_secs() < 60 {
                return Err("policy max_cert_ttl must be at least 1m".into());
            }
        }
        if self.audiences.is_empty() {
            return Err("policy audiences must not be empty".into());
        }
        if self.audiences.iter().any(|a| a.trim().is_empty()) {
            return Err("policy audiences must not contain an empty string".into());
        }
        if self.scopes.iter().any(|s| s.is_empty() || s.contains(' ')) {
            return Err("policy scopes must be non-empty and contain no spaces".into());
        }
        if let Some(m) = self.max_ttl {
            if m.0 > global_max_ttl {
                return Err(format!(
                    "policy max_ttl {} is above the daemon's tokens.max_ttl {}",
                    crate::config::format_duration(m.0),
                    crate::config::format_duration(global_max_ttl)
                ));
            }
            if m.0.as_secs() < 1 {
                return Err("policy max_ttl must be at least 1s".into());
            }
        }
        Ok(())
    }
}

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
            fn parse(s: &str) -> Result<Self, RegistryError> {
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

pub struct Registry {
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS agents (
  row INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  spiffe_id TEXT NOT NULL,
  status TEXT NOT NULL,
  source TEXT NOT NULL,
  selectors TEXT NOT NULL,
  policy TEXT NOT NULL,
  key_id TEXT NOT NULL UNIQUE,
  key_state TEXT NOT NULL,
  kid TEXT,
  jwk TEXT,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL,
  revoked_at INTEGER,
  revoke_reason TEXT,
  issued_count INTEGER NOT NULL DEFAULT 0,
  last_issued_at INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS agents_live_name ON agents(name) WHERE status != 'revoked';
CREATE TABLE IF NOT EXISTS certificates (
  serial TEXT PRIMARY KEY,
  agent_row INTEGER NOT NULL REFERENCES agents(row),
  not_after INTEGER NOT NULL,
  issued_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS certificates_agent ON certificates(agent_row);
CREATE INDEX IF NOT EXISTS certificates_not_after ON certificates(not_after);
CREATE TABLE IF NOT EXISTS meta (
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
";

const COLUMNS: &str =
    "row, name, spiffe_id, status, source, selectors, policy, key_id, key_state, kid, jwk, \
     created_at, updated_at, revoked_at, revoke_reason, issued_count, last_issued_at";

/// The raw columns of one row; enums and JSON are decoded afterwards in [`decode`] so a bad
/// value is a typed error instead of a panic.
struct RawRow {
    row: i64,
    name: String,
    id: String,
    status: String,
    source: String,
    selectors: String,
    policy: String,
    key_id: String,
    key_state: String,
    kid: Option<String>,
    jwk: Option<String>,
    created_at: i64,
    updated_at: i64,
    revoked_at: Option<i64>,
    revoke_reason: Option<String>,
    issued_count: i64,
    last_issued_at: Option<i64>,
}

fn raw_row(r: &Row<'_>) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        row: r.get(0)?,
        name: r.get(1)?,
        id: r.get(2)?,
        status: r.get(3)?,
        source: r.get(4)?,
        selectors: r.get(5)?,
        policy: r.get(6)?,
        key_id: r.get(7)?,
        key_state: r.get(8)?,
        kid: r.get(9)?,
        jwk: r.get(10)?,
        created_at: r.get(11)?,
        updated_at: r.get(12)?,
        revoked_at: r.get(13)?,
        revoke_reason: r.get(14)?,
        issued_count: r.get(15)?,
        last_issued_at: r.get(16)?,
    })
}

fn decode(r: RawRow) -> Result<Agent, RegistryError> {
    let corrupt = |what: &str, e: serde_json::Error| {
        RegistryError::Corrupt(format!("{what} of {}: {e}", r.name))
    };
    Ok(Agent {
        status: Status::parse(&r.status)?,
        source: Source::parse(&r.source)?,
        key_state: KeyState::parse(&r.key_state)?,
        selectors: serde_json::from_str(&r.selectors).map_err(|e| corrupt("selectors", e))?,
        policy: serde_json::from_str(&r.policy).map_err(|e| corrupt("policy", e))?,
        jwk: match &r.jwk {
            Some(j) => Some(serde_json::from_str(j).map_err(|e| corrupt("jwk", e))?),
            None => None,
        },
        row: r.row,
        name: r.name,
        id: r.id,
        key_id: r.key_id,
        kid: r.kid,
        created_at: r.created_at,
        updated_at: r.updated_at,
        revoked_at: r.revoked_at,
        revoke_reason: r.revoke_reason,
        issued_count: r.issued_count.max(0) as u64,
        last_issued_at: r.last_issued_at,
    })
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

impl Registry {
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a committed enrolment or revocation survives power loss, not just a crash.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Registry { conn })
    }

    fn query(&self, where_: &str, p: impl rusqlite::Params) -> Result<Vec<Agent>, RegistryError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM agents {where_} ORDER BY row"
        ))?;
        let rows = stmt.query_map(p, raw_row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(decode(r?)?);
        }
        Ok(out)
    }

    /// Active and suspended agents.
    pub fn live(&self) -> Result<Vec<Agent>, RegistryError> {
        self.query("WHERE status IN ('active','suspended')", [])
    }

    pub fn all(&self) -> Result<Vec<Agent>, RegistryError> {
        self.query("", [])
    }

    /// Revoked records, newest first (to tell a revoked caller it is revoked).
    pub fn revoked(&self) -> Result<Vec<Agent>, RegistryError> {
        let mut v = self.query("WHERE status = 'revoked'", [])?;
        v.reverse();
        Ok(v)
    }

    pub fn pending(&self) -> Result<Vec<Agent>, RegistryError> {
        self.query("WHERE status = 'pending'", [])
    }

    /// Revoked agents whose key may still exist in the device.
    pub fn revoked_with_key(&self) -> Result<Vec<Agent>, RegistryError> {
        self.query("WHERE status = 'revoked' AND key_state != 'destroyed'", [])
    }

    pub fn get_live(&self, name: &str) -> Result<Option<Agent>, RegistryError> {
        Ok(self
            .query("WHERE name = ?1 AND status != 'revoked'", [name])?
            .into_iter()
            .next())
    }

    /// The most recent record for `name`, revoked or not.
    pub fn get_latest(&self, name: &str) -> Result<Option<Agent>, RegistryError> {
        Ok(self
            .query("WHERE name = ?1", [name])?
            .into_iter()
            .next_back())
    }

    /// Step 1 of enrolment: a durable pending record naming the key id about to be created.
    pub fn insert_pending(
        &mut self,
        name: &str,
        spiffe_id: &str,
        source: Source,
        selectors: &Selectors,
        policy: &Policy,
        key_id: &str,
    ) -> Result<i64, RegistryError> {
        let now = now_unix();
        let res = self.conn.execute(
            "INSERT INTO agents (name, spiffe_id, status, source, selectors, policy, key_id, key_state, created_at, updated_at)
             VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6, 'creating', ?7, ?7)",
            params![name, spiffe_id, source.as_str(), json(selectors), json(policy), key_id, now],
        );
        match res {
            Ok(_) => Ok(self.conn.last_insert_rowid()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(RegistryError::AlreadyExists(name.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Step 3 of enrolment: the key exists; the agent becomes active.
    pub fn activate(
        &mut self,
        row: i64,
        kid: &str,
        jwk: &serde_json::Value,
    ) -> Result<(), RegistryError> {
        self.conn.execute(
            "UPDATE agents SET status='active', key_state='present', kid=?2, jwk=?3, updated_at=?4 WHERE row=?1 AND status='pending'",
            params![row, kid, json(jwk), now_unix()],
        )?;
        Ok(())
    }

    /// Roll back an enrolment whose key was never (or no longer) made.
    pub fn delete_pending(&mut self, row: i64) -> Result<(), RegistryError> {
        self.conn.execute(
            "DELETE FROM agents WHERE row=?1 AND status='pending'",
            [row],
        )?;
        Ok(())
    }

    pub fn update_spec(
        &mut self,
        row: i64,
        selectors: &Selectors,
        policy: &Policy,
    ) -> Result<(), RegistryError> {
        self.conn.execute(
            "UPDATE agents SET selectors=?2, policy=?3, updated_at=?4 WHERE row=?1",
            params![row, json(selectors), json(policy), now_unix()],
        )?;
        Ok(())
    }

    pub fn set_status(&mut self, row: i64, status: Status) -> Result<(), RegistryError> {
        self.conn.execute(
            "UPDATE agents SET status=?2, updated_at=?3 WHERE row=?1 AND status IN ('active','suspended')",
            params![row, status.as_str(), now_unix()],
        )?;
        Ok(())
    }

    /// Step 1 of revocation: durable revoked record; the key is now to be destroyed.
    pub fn mark_revoked(&mut self, row: i64, reason: &str) -> Result<(), RegistryError> {
        let now = now_unix();
        self.conn.execute(
            "UPDATE agents SET status='revoked', key_state='destroying', revoked_at=?2, revoke_reason=?3, updated_at=?2
             WHERE row=?1 AND status != 'revoked'",
            params![row, now, reason],
        )?;
        Ok(())
    }

    pub fn mark_key_destroyed(&mut self, row: i64) -> Result<(), RegistryError> {
        self.conn.execute(
            "UPDATE agents SET key_state='destroyed', updated_at=?2 WHERE row=?1",
            params![row, now_unix()],
        )?;
        Ok(())
    }

    pub fn set_issued(&mut self, row: i64, count: u64, at: i64) -> Result<(), RegistryError> {
        self.conn.execute(
            "UPDATE agents SET issued_count = ?2, last_issued_at = ?3 WHERE row = ?1",
            params![row, count as i64, at],
        )?;
        Ok(())
    }

    /// Every key id a record still refers to as existing or about to exist.
    pub fn referenced_key(&self, key_id: &str) -> Result<Option<Agent>, RegistryError> {
        Ok(self
            .query("WHERE key_id = ?1", [key_id])?
            .into_iter()
            .next())
    }

    /// Record an issued agent certificate, only while its agent is still live: a revocation
    /// that committed first wins, so no certificate of a revoked agent is missing from the CRL.
    pub fn record_certificate(
        &mut self,
        agent: &Agent,
        serial_hex: &str,
        not_after: i64,
    ) -> Result<(), RegistryError> {
        let tx = self.conn.transaction()?;
        let live: Option<String> = tx
            .query_row(
                "SELECT status FROM agents WHERE row=?1 AND status IN ('active','suspended')",
                [agent.row],
                |r| r.get(0),
            )
            .optional()?;
        if live.is_none() {
            return Err(RegistryError::NotLive(agent.name.clone()));
        }
        tx.execute(
            "INSERT INTO certificates (serial, agent_row, not_after, issued_at) VALUES (?1, ?2, ?3, ?4)",
            params![serial_hex, agent.row, not_after, now_unix()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// (serial, revoked_at) of every unexpired certificate whose agent is revoked.
    pub fn revoked_certificates(&self, now: i64) -> Result<Vec<(String, i64)>, RegistryError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT c.serial, a.revoked_at FROM certificates c JOIN agents a ON a.row = c.agent_row
             WHERE a.status = 'revoked' AND c.not_after > ?1 ORDER BY c.serial",
        )?;
        let rows = stmt.query_map([now], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?))
        })?;
        let mut out = Vec::new();
        for r in rows {
            let (serial, at) = r?;
            out.push((serial, at.unwrap_or(now)));
        }
        Ok(out)
    }

    /// Forget certificates that expired: they need no CRL entry any more.
    pub fn prune_certificates(&mut self, now: i64) -> Result<usize, RegistryError> {
        Ok(self
            .conn
            .execute("DELETE FROM certificates WHERE not_after <= ?1", [now])?)
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, RegistryError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key=?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<(), RegistryError> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// Next CRL number (monotonic across restarts).
    pub fn next_crl_number(&mut self) -> Result<u64, RegistryError> {
        let n = self
            .meta("crl.number")?
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        self.set_meta("crl.number", &n.to_string())?;
        Ok(n)
    }

    pub fn exists_row(&self, row: i64) -> Result<bool, RegistryError> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM agents WHERE row=?1", [row], |_| Ok(()))
            .optional()?
            .is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel() -> Selectors {
        Selectors {
            uid: Some(1000),
            ..Default::default()
        }
    }
    fn pol() -> Policy {
        Policy {
            audiences: vec!["a".into()],
            scopes: vec![],
            max_ttl: None,
            max_cert_ttl: None,
            rate: None,
        }
    }

    #[test]
    fn lifecycle_and_name_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(&dir.path().join("r.db")).unwrap();
        let row = r
            .insert_pending(
                "bot",
                "spiffe://x/bot",
                Source::Dbus,
                &sel(),
                &pol(),
                "agent-1",
            )
            .unwrap();
        assert!(matches!(
            r.insert_pending(
                "bot",
                "spiffe://x/bot",
                Source::Dbus,
                &sel(),
                &pol(),
                "agent-2"
            ),
            Err(RegistryError::AlreadyExists(_))
        ));
        assert!(r.live().unwrap().is_empty(), "pending is not live");
        r.activate(row, "kid", &serde_json::json!({"kty": "EC"}))
            .unwrap();
        assert_eq!(r.live().unwrap()[0].status, Status::Active);
        r.mark_revoked(row, "test").unwrap();
        assert_eq!(r.revoked_with_key().unwrap().len(), 1);
        r.mark_key_destroyed(row).unwrap();
        assert!(r.revoked_with_key().unwrap().is_empty());
        // The name is free again; history is kept.
        r.insert_pending(
            "bot",
            "spiffe://x/bot",
            Source::Dbus,
            &sel(),
            &pol(),
            "agent-3",
        )
        .unwrap();
        assert_eq!(r.all().unwrap().len(), 2);
    }

    #[test]
    fn selector_rules() {
        assert!(Selectors::default().validate().is_err());
        assert!(Selectors {
            unit: Some("a.service".into()),
            ..Default::default()
        }
        .validate()
        .is_ok());
        assert!(Selectors {
            uid: Some(1),
            exe: Some("rel/path".into()),
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(Selectors {
            uid: Some(1),
            exe_sha256: Some("ab".into()),
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(validate_name("research-bot").is_ok());
        assert!(validate_name("Bad Name").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("../x").is_err());
    }
}
