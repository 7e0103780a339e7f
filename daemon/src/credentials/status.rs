//! `Manager.Status()` / `tessera status`: the daemon on one screen for an admin.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use super::{x509, Credentials};

/// Warn when the host CA or the CRL has less than this left.
const CA_WARN_SECS: i64 = 30 * 86_400;
const CRL_WARN_SECS: i64 = 3_600;
/// How long the device may take to answer the status probe.
const DEVICE_PROBE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub backend: &'static str,
    /// "ok", or why the device did not answer.
    pub device: String,
    /// Agent records by status.
    pub agents: BTreeMap<String, u64>,
    /// Revoked agents whose key is still to be destroyed.
    pub destroy_pending: u64,
    /// Credentials (tokens, proofs, certificates, WITs, evidence) in the last hour.
    pub issued_last_hour: u64,
    /// The audit trail's last durable record and the last signed checkpoint.
    pub audit_seq: u64,
    pub checkpoint_seq: u64,
    /// Unix times; 0 when there is none.
    pub host_ca_not_after: i64,
    pub crl_next_update: i64,
    pub warnings: Vec<String>,
}

/// Credentials issued per minute over the last hour (a ring of 60 minute buckets).
#[derive(Debug)]
pub(crate) struct Activity {
    minutes: Mutex<[(i64, u64); 60]>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            minutes: Mutex::new([(i64::MIN, 0); 60]),
        }
    }
}

impl Activity {
    pub(crate) fn note(&self, at_unix: i64) {
        let minute = at_unix.div_euclid(60);
        let mut m = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut m[minute.rem_euclid(60) as usize];
        if slot.0 != minute {
            *slot = (minute, 0);
        }
        slot.1 += 1;
    }

    pub(crate) fn last_hour(&self, now_unix: i64) -> u64 {
        let now = now_unix.div_euclid(60);
        let m = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter(|(minute, _)| *minute > now - 60 && *minute <= now)
            .map(|(_, n)| n)
            .sum()
    }
}

impl Credentials {
    /// Everything `tessera status` shows.
    pub async fn status(&self) -> Status {
        let now = x509::now_unix();
        let mut warnings = Vec::new();
        let device = match tokio::time::timeout(DEVICE_PROBE, self.keystore.list()).await {
            Ok(Ok(_)) => "ok".to_string(),
            Ok(Err(e)) => format!("error: {e}"),
            Err(_) => format!("no answer within {}s", DEVICE_PROBE.as_secs()),
        };
        if device != "ok" {
            warnings.push(format!("key store: {device}"));
        }
        let agents = match self.agents().count_by_status() {
            Ok(v) => v.into_iter().collect(),
            Err(e) => {
                warnings.push(format!("registry: {e}"));
                BTreeMap::new()
            }
        };
        let destroy_pending = match self.agents().destroy_pending() {
            Ok(v) => v.len() as u64,
            Err(e) => {
                warnings.push(format!("registry: {e}"));
                0
            }
        };
        if destroy_pending > 0 {
            warnings.push(format!(
                "{destroy_pending} revoked agent key(s) still to be destroyed (retried in the background)"
            ));
        }
        let host_ca_not_after = self.host_ca().map(|ca| ca.not_after).unwrap_or(0);
        if host_ca_not_after == 0 {
            warnings.push("no host CA".into());
        } else if host_ca_not_after - now < CA_WARN_SECS {
            warnings.push(format!(
                "host CA expires in {} days",
                (host_ca_not_after - now).max(0) / 86_400
            ));
        }
        let crl_next_update = self.crl_next_update();
        if crl_next_update != 0 && crl_next_update - now < CRL_WARN_SECS {
            warnings.push("CRL is due for re-signing within the hour".into());
        }
        if self.crl_is_stale() {
            warnings.push("the CRL could not be re-signed when it should have been".into());
        }
        Status {
            version: env!("CARGO_PKG_VERSION"),
            backend: self.backend_name(),
            device,
            agents,
            destroy_pending,
            issued_last_hour: self.activity.last_hour(now),
            audit_seq: self.audit.head().seq,
            checkpoint_seq: self.checkpointed.lock().await.seq,
            host_ca_not_after,
            crl_next_update,
            warnings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_counts_the_last_sixty_minutes_only() {
        let a = Activity::default();
        let t0 = 1_800_000_000;
        a.note(t0);
        a.note(t0 + 30);
        a.note(t0 + 61 * 60);
        assert_eq!(a.last_hour(t0 + 59), 2);
        assert_eq!(
            a.last_hour(t0 + 61 * 60),
            1,
            "the bucket an hour ago was reused"
        );
        assert_eq!(a.last_hour(t0 + 200 * 60), 0);
    }
}
