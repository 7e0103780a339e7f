//! Issued agent certificates (what the CRL is built from) and the `meta` table (host CA key
//! id, CRL number).

use rusqlite::{params, OptionalExtension};

use super::{Registry, RegistryError};
use crate::agents::record::{now_unix, Agent};

impl Registry {
    /// Record an issued agent certificate, only while its agent is still live: a revocation
    /// that committed first wins, so no certificate of a revoked agent is missing from the CRL.
    pub fn record_certificate(
        &mut self,
        agent: &Agent,
        serial_hex: &str,
        not_after: i64,
        x5t_s256: Option<&str>,
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
        // Only certificates of the hardware key can be named by a bound token or a TLS signer.
        if let Some(x5t_s256) = x5t_s256 {
            tx.execute(
                "INSERT OR REPLACE INTO certificate_thumbprints (x5t_s256, serial, agent_row, not_after) VALUES (?1, ?2, ?3, ?4)",
                params![x5t_s256, serial_hex, agent.row, not_after],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The agent row and `notAfter` of the certificate whose DER SHA-256 is `x5t_s256`.
    pub fn certificate_by_thumbprint(
        &self,
        x5t_s256: &str,
    ) -> Result<Option<(i64, i64)>, RegistryError> {
        Ok(self
            .conn
            .query_row(
                "SELECT agent_row, not_after FROM certificate_thumbprints WHERE x5t_s256=?1",
                [x5t_s256],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
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
        self.conn.execute(
            "DELETE FROM certificate_thumbprints WHERE not_after <= ?1",
            [now],
        )?;
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
}
