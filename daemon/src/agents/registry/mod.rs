//! Enrolled agents: selectors, policy, status and key reference, in SQLite (WAL).
//!
//! Every change is one transaction. Records carry the state of their key (`key_state`) so
//! the enrolment and revocation state machines in [`crate::agents::lifecycle`] can be
//! finished or rolled back after a crash. A revoked record is kept for history; its name may
//! be enrolled again as a new agent (the partial unique index only covers live records).
//!
//! `schema`: tables and connection settings; this file: agent records; `certificates`:
//! issued certificate records (for the CRL) and the `meta` table.

mod certificates;
mod schema;

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;

use crate::agents::policy::Policy;
use crate::agents::record::{now_unix, Agent, KeyState, Source, Status};
use crate::agents::selectors::Selectors;

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
    #[error(
        "registry {path} was written by a newer tesserad (schema version {found}; this one knows \
         up to {known}); it is left unchanged: run the newer tesserad, or restore a backup of \
         the state dir made with this version"
    )]
    TooNew {
        path: String,
        found: i64,
        known: i64,
    },
}

pub struct Registry {
    conn: Connection,
}

const COLUMNS: &str =
    "row, name, spiffe_id, status, source, selectors, policy, key_id, key_state, kid, jwk, \
     created_at, updated_at, revoked_at, revoke_reason, issued_count, last_issued_at, file_hash";

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
    file_hash: Option<String>,
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
        file_hash: r.get(17)?,
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
        file_hash: r.file_hash,
    })
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// What enrolment step 1 records.
pub struct NewAgent<'a> {
    pub name: &'a str,
    pub spiffe_id: &'a str,
    pub source: Source,
    pub selectors: &'a Selectors,
    pub policy: &'a Policy,
    pub key_id: &'a str,
    /// SHA-256 of the `agents_dir` file, for file-declared agents.
    pub file_hash: Option<&'a str>,
}

impl Registry {
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        Ok(Registry {
            conn: schema::open(path)?,
        })
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

    /// How many agent records have each status (revoked ones accumulate: counted, not loaded).
    pub fn count_by_status(&self) -> Result<Vec<(String, u64)>, RegistryError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT status, COUNT(*) FROM agents GROUP BY status ORDER BY status",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for r in rows {
            let (status, n) = r?;
            out.push((status, n.max(0) as u64));
        }
        Ok(out)
    }

    /// The newest `limit` revoked records, newest first (to tell a revoked caller it is
    /// revoked). Older ones stay on disk for history; memory holds a bounded window.
    pub fn revoked(&self, limit: usize) -> Result<Vec<Agent>, RegistryError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM agents WHERE status = 'revoked'
             ORDER BY revoked_at DESC, row DESC LIMIT ?1"
        ))?;
        let rows = stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], raw_row)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(decode(r?)?);
        }
        Ok(out)
    }

    pub fn pending(&self) -> Result<Vec<Agent>, RegistryError> {
        self.query("WHERE status = 'pending'", [])
    }

    /// Revoked agents whose key may still exist in the device.
    pub fn revoked_with_key(&self) -> Result<Vec<Agent>, RegistryError> {
        self.query("WHERE status = 'revoked' AND key_state != 'destroyed'", [])
    }

    /// The revoked agent of this name whose key is still to be destroyed, if any (index
    /// `agents_name`).
    pub fn revoked_with_key_named(&self, name: &str) -> Result<Option<Agent>, RegistryError> {
        Ok(self
            .query(
                "WHERE name = ?1 AND status = 'revoked' AND key_state != 'destroyed'",
                [name],
            )?
            .pop())
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
    pub fn insert_pending(&mut self, a: &NewAgent<'_>) -> Result<i64, RegistryError> {
        let now = now_unix();
        let res = self.conn.execute(
            "INSERT INTO agents (name, spiffe_id, status, source, selectors, policy, key_id, key_state, created_at, updated_at, file_hash)
             VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6, 'creating', ?7, ?7, ?8)",
            params![a.name, a.spiffe_id, a.source.as_str(), json(a.selectors), json(a.policy), a.key_id, now, a.file_hash],
        );
        let name = a.name;
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
        file_hash: Option<&str>,
    ) -> Result<(), RegistryError> {
        self.conn.execute(
            "UPDATE agents SET selectors=?2, policy=?3, updated_at=?4, file_hash=?5 WHERE row=?1",
            params![row, json(selectors), json(policy), now_unix(), file_hash],
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
    /// `hold`: keep the file hash of a file-declared agent, so the same file does not enrol
    /// it again (an admin revoked it); without it (the file was removed) the hash is dropped.
    pub fn mark_revoked(
        &mut self,
        row: i64,
        reason: &str,
        hold: bool,
    ) -> Result<(), RegistryError> {
        self.mark_all_revoked(&[row], reason, hold)
    }

    /// Step 1 of revocation for many agents in one transaction (the kill switch).
    pub fn mark_all_revoked(
        &mut self,
        rows: &[i64],
        reason: &str,
        hold: bool,
    ) -> Result<(), RegistryError> {
        let now = now_unix();
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE agents SET status='revoked', key_state='destroying', revoked_at=?2, revoke_reason=?3, updated_at=?2,
                 file_hash = CASE WHEN ?4 THEN file_hash ELSE NULL END
                 WHERE row=?1 AND status != 'revoked'",
            )?;
            for row in rows {
                stmt.execute(params![row, now, reason, hold])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn mark_key_destroyed(&mut self, row: i64) -> Result<(), RegistryError> {
        self.conn.execute(
            "UPDATE agents SET key_state='destroyed', updated_at=?2 WHERE row=?1",
            params![row, now_unix()],
        )?;
        Ok(())
    }

    /// Issue counters `(row, count, last issued at)`, all in one transaction: one sync for
    /// the lot. One commit each held the registry for a sync per agent, so after a busy
    /// minute with 10,000 agents a `Revoke` waited seconds behind the counters (perf).
    pub fn set_issued(&mut self, counts: &[(i64, u64, u64)]) -> Result<(), RegistryError> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE agents SET issued_count = ?2, last_issued_at = ?3 WHERE row = ?1",
            )?;
            for (row, count, at) in counts {
                stmt.execute(params![row, *count as i64, *at as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every key id a record still refers to as existing or about to exist.
    pub fn referenced_key(&self, key_id: &str) -> Result<Option<Agent>, RegistryError> {
        Ok(self
            .query("WHERE key_id = ?1", [key_id])?
            .into_iter()
            .next())
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
    use crate::agents::validate_name;

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
            require_binding: false,
            tls_server: false,
            wit_ttl: None,
            proof_key: None,
            session_key_ttl: None,
            x509_svid: None,
            key: None,
        }
    }

    #[test]
    fn issue_counters_are_written_together() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(&dir.path().join("r.db")).unwrap();
        let rows: Vec<i64> = ["a", "b"]
            .iter()
            .map(|n| {
                let row = r
                    .insert_pending(&NewAgent {
                        name: n,
                        spiffe_id: "spiffe://x/a",
                        source: Source::Dbus,
                        selectors: &sel(),
                        policy: &pol(),
                        key_id: &format!("agent-{n}"),
                        file_hash: None,
                    })
                    .unwrap();
                r.activate(row, n, &serde_json::json!({"kty": "EC"}))
                    .unwrap();
                row
            })
            .collect();
        r.set_issued(&[(rows[0], 3, 100), (rows[1], 7, 200)])
            .unwrap();
        let live = r.live().unwrap();
        let got: Vec<(u64, Option<i64>)> = live
            .iter()
            .map(|a| (a.issued_count, a.last_issued_at))
            .collect();
        assert_eq!(got, vec![(3, Some(100)), (7, Some(200))]);
        // A row that is gone is no error (the agent was deleted meanwhile); nothing else moves.
        r.set_issued(&[(rows[1], 8, 300), (9999, 1, 1)]).unwrap();
        assert_eq!(r.live().unwrap()[1].issued_count, 8);
    }

    #[test]
    fn lifecycle_and_name_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(&dir.path().join("r.db")).unwrap();
        let row = r
            .insert_pending(&NewAgent {
                name: "bot",
                spiffe_id: "spiffe://x/bot",
                source: Source::Dbus,
                selectors: &sel(),
                policy: &pol(),
                key_id: "agent-1",
                file_hash: None,
            })
            .unwrap();
        assert!(matches!(
            r.insert_pending(&NewAgent {
                name: "bot",
                spiffe_id: "spiffe://x/bot",
                source: Source::Dbus,
                selectors: &sel(),
                policy: &pol(),
                key_id: "agent-2",
                file_hash: None
            }),
            Err(RegistryError::AlreadyExists(_))
        ));
        assert!(r.live().unwrap().is_empty(), "pending is not live");
        r.activate(row, "kid", &serde_json::json!({"kty": "EC"}))
            .unwrap();
        assert_eq!(r.live().unwrap()[0].status, Status::Active);
        r.mark_revoked(row, "test", true).unwrap();
        assert_eq!(r.revoked_with_key().unwrap().len(), 1);
        r.mark_key_destroyed(row).unwrap();
        assert!(r.revoked_with_key().unwrap().is_empty());
        // The name is free again; history is kept.
        r.insert_pending(&NewAgent {
            name: "bot",
            spiffe_id: "spiffe://x/bot",
            source: Source::Dbus,
            selectors: &sel(),
            policy: &pol(),
            key_id: "agent-3",
            file_hash: None,
        })
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
