//! Signing audit checkpoints with the host CA key (the format and the checks are the audit's):
//! every `checkpoint_every` records or `checkpoint_interval`, whichever comes first, once at
//! start and once at stop. The newest is kept in the registry (what start-up checks the trail
//! against) and in `<state>/audit/checkpoint.jws` (what `tessera audit verify --ca` reads).

use std::sync::Arc;
use std::time::Duration;

use crate::agents::RegistryError;
use crate::audit::checkpoint::{self, Checkpoint, CheckpointError, Head};
use crate::audit::AuditError;
use crate::credentials::hostca::HostCaError;
use crate::credentials::{jwt, Credentials};
use crate::keystore::{ecdsa, KeyStoreError};

/// Registry `meta` key of the newest checkpoint (a compact JWS).
pub const META_CHECKPOINT: &str = "audit.checkpoint";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointSignError {
    #[error(transparent)]
    HostCa(#[from] HostCaError),
    #[error(transparent)]
    KeyStore(#[from] KeyStoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("the stored audit checkpoint: {0}")]
    Stored(#[from] CheckpointError),
}

/// What start-up learnt of the stored checkpoint.
#[derive(Debug)]
pub enum StoredCheckpoint {
    Verified(Checkpoint),
    /// Signed by a host CA key that is gone (its `kid`); the CA was made anew at this start.
    OldCaKey(String),
}

impl Credentials {
    /// Sign a checkpoint over the current audit head, unless the newest already covers it.
    /// Returns the seq it covers.
    pub async fn checkpoint(&self) -> Result<u64, CheckpointSignError> {
        let mut done = self.checkpointed.lock().await;
        let head = self.audit.head();
        if head.seq == 0 || (head.seq == done.seq && head.hash == done.hash) {
            return Ok(done.seq);
        }
        let ca = self.host_ca()?;
        let (kid, _) = ecdsa::jwk_of(&ca.key);
        let cp = Checkpoint {
            seq: head.seq,
            hash: head.hash.clone(),
            iat: crate::agents::now_unix(),
            first: head.first,
        };
        let input = checkpoint::signing_input(&kid, &cp);
        let sig = self.keystore.sign(&ca.key_id, jwt::digest(&input)).await?;
        let jws = jwt::compact(&input, &sig);
        // The registry copy is the one start-up trusts: it goes first.
        self.agents.set_meta(META_CHECKPOINT, &jws)?;
        checkpoint::write_file(&self.audit_dir, &jws)?;
        self.audit.set_anchored(cp.seq);
        *done = head;
        Ok(cp.seq)
    }

    /// The checkpoint start-up checked the trail against (`jws`, the newer of the registry's
    /// and the file's) must carry the host CA's signature: one written by hand anchors
    /// nothing. When the host CA key itself was lost and made anew at this start
    /// (`ca_replaced`), a checkpoint by the old key cannot be checked; that is reported, not
    /// taken for tampering (the trail already matched its seq and hash).
    pub async fn check_stored_checkpoint(
        &self,
        jws: &str,
        ca_replaced: bool,
    ) -> Result<StoredCheckpoint, CheckpointSignError> {
        let ca = self.host_ca()?;
        let (kid, _) = ecdsa::jwk_of(&ca.key);
        let cp = match checkpoint::verify(jws, &ca.key) {
            Ok(cp) => cp,
            Err(CheckpointError::Signature)
                if ca_replaced && checkpoint::kid(jws).is_some_and(|k| k != kid) =>
            {
                return Ok(StoredCheckpoint::OldCaKey(
                    checkpoint::kid(jws).unwrap_or_default(),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        *self.checkpointed.lock().await = Head {
            seq: cp.seq,
            hash: cp.hash.clone(),
            pruned_at: 0,
            first: cp.first,
        };
        Ok(StoredCheckpoint::Verified(cp))
    }

    /// Sign checkpoints as records come, until `stop` turns true.
    pub fn spawn_checkpointer(
        self: &Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut heads = me.audit.watch_head();
            let mut since = tokio::time::Instant::now();
            loop {
                let s = me.settings();
                tokio::select! {
                    r = heads.changed() => if r.is_err() { break },
                    _ = tokio::time::sleep_until(since + s.checkpoint_interval) => {}
                    _ = stop.changed() => break,
                }
                let head = me.audit.head();
                let done = me.checkpointed.lock().await.clone();
                let same = head.seq == done.seq && head.hash == done.hash;
                // Retention just removed files: anchor the audit.pruned record at once.
                let due = head.seq.saturating_sub(done.seq) >= s.checkpoint_every
                    || head.pruned_at > done.seq
                    || (!same && since.elapsed() >= s.checkpoint_interval);
                if same {
                    since = tokio::time::Instant::now();
                }
                if !due {
                    continue;
                }
                if let Err(e) = me.checkpoint().await {
                    tracing::error!(error = %e, "cannot sign an audit checkpoint");
                    // Try again after a pause, not on every record.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                since = tokio::time::Instant::now();
            }
        })
    }
}
