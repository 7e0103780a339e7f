//! The registry's tables and connection settings.

use std::path::Path;

use rusqlite::Connection;

use super::RegistryError;

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
  last_issued_at INTEGER,
  file_hash TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS agents_live_name ON agents(name) WHERE status != 'revoked';
-- Lookups that would otherwise scan every agent ever enrolled: the latest record of a name
-- (enrolment from agents_dir), and revoked agents whose key is still to be destroyed (read on
-- every revocation). Additive: an older tesserad opens the file unchanged.
CREATE INDEX IF NOT EXISTS agents_name ON agents(name);
CREATE INDEX IF NOT EXISTS agents_destroy_pending ON agents(row) WHERE status = 'revoked' AND key_state != 'destroyed';
CREATE TABLE IF NOT EXISTS certificates (
  serial TEXT PRIMARY KEY,
  agent_row INTEGER NOT NULL REFERENCES agents(row),
  not_after INTEGER NOT NULL,
  issued_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS certificates_agent ON certificates(agent_row);
CREATE INDEX IF NOT EXISTS certificates_not_after ON certificates(not_after);
CREATE TABLE IF NOT EXISTS certificate_thumbprints (
  x5t_s256 TEXT PRIMARY KEY,
  serial TEXT NOT NULL,
  agent_row INTEGER NOT NULL REFERENCES agents(row),
  not_after INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
";

/// The registry's schema version, kept in `PRAGMA user_version`. 0 is a registry from before
/// versioning (version 1's tables, maybe without `agents.file_hash`). Every schema change bumps
/// this and adds its step to [`migrate`]; a registry with a higher version than this is from a
/// newer tesserad and is refused, untouched.
pub const SCHEMA_VERSION: i64 = 1;

/// Open (or create) the database: WAL, synchronous FULL, every table present.
pub(super) fn open(path: &Path) -> Result<Connection, RegistryError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Before anything is written: a newer daemon's state is left exactly as it is.
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(RegistryError::TooNew {
            path: path.display().to_string(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a committed enrolment or revocation survives power loss, not just a crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    migrate(&conn, found)?;
    Ok(conn)
}

/// From version `found` to [`SCHEMA_VERSION`], in one transaction: a crash leaves the old
/// version or the new one, never half of a step.
fn migrate(conn: &Connection, found: i64) -> Result<(), RegistryError> {
    let tx = conn.unchecked_transaction()?;
    tx.execute_batch(SCHEMA)?;
    if found < 1 {
        add_column_if_missing(&tx, "agents", "file_hash", "TEXT")?;
    }
    if found != SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    tx.commit()?;
    Ok(())
}

/// Columns added after a table was first shipped: a registry from an earlier version gets
/// them on open (SQLite has no `ADD COLUMN IF NOT EXISTS`).
fn add_column_if_missing(
    conn: &Connection,
    table: &str,
    column: &str,
    decl: &str,
) -> Result<(), RegistryError> {
    let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
    let present = stmt
        .query_map([], |r| r.get::<_, String>(1))?
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .any(|c| c == column);
    if !present {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(c: &Connection) -> i64 {
        c.pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn an_unversioned_registry_is_migrated_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.db");
        {
            // What releases before versioning wrote: version 0, no agents.file_hash.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(SCHEMA).unwrap();
            c.execute_batch("ALTER TABLE agents DROP COLUMN file_hash")
                .unwrap();
            assert_eq!(version(&c), 0);
        }
        let c = open(&path).unwrap();
        assert_eq!(version(&c), SCHEMA_VERSION);
        let cols: Vec<String> = c
            .prepare("PRAGMA table_info(agents)")
            .unwrap()
            .query_map([], |r| r.get(1))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(cols.iter().any(|c| c == "file_hash"), "{cols:?}");
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(c);
        match open(&path) {
            Err(RegistryError::TooNew { found, known, .. }) => {
                assert_eq!((found, known), (SCHEMA_VERSION + 1, SCHEMA_VERSION))
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
    }
}
