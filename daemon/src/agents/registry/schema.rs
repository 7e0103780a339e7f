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

/// Open (or create) the database: WAL, synchronous FULL, every table present.
pub(super) fn open(path: &Path) -> Result<Connection, RegistryError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a committed enrolment or revocation survives power loss, not just a crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA)?;
    add_column_if_missing(&conn, "agents", "file_hash", "TEXT")?;
    Ok(conn)
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
