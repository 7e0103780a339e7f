//! Enrolment and revocation as crash-safe state machines, plus the start-up repair that
//! finishes or rolls back whatever a crash interrupted.
//!
//! Enrolment:  (1) pending record naming a fresh key id → (2) key created in the device →
//!             (3) record active with the public key.
//!   crash after 1 or 2: the next start finds a pending record, destroys the key if it was
//!   made and deletes the record; the agent is "not at all" (a file-enrolled agent is then
//!   enrolled again by the agents_dir reconcile).
//! Revocation: (1) durable revoked record (key_state = destroying; it leaves JWKS and stops
//!             matching at once) → (2) key destroyed in the device → (3) key_state = destroyed.
//!   crash after 1: the next start destroys the key and finishes 3; a revoked agent never
//!   comes back. A destroy that fails is returned to the admin and retried at every start.
//! Orphans: a key in the device that no record refers to is destroyed at start.
//!
//! Every state change bumps the generation and is published as an [`crate::agents::AgentEvent`]
//! once it is durable and visible in memory.

use std::collections::{BTreeSet, HashSet};

use serde_json::json;

use crate::agents::registry::{NewAgent, RegistryError};
use crate::agents::{
    validate_name, Agent, Agents, EventKind, KeyState, Policy, Selectors, Source, Status,
};
use crate::audit::{AuditError, Event};
use crate::fault;
use crate::keystore::ecdsa::jwk_of;
use crate::keystore::{new_key_id, KeyStoreError};

pub const AGENT_KEY_PREFIX: &str = "agent";

/// The longest `sub` every federation relying party takes (Google maps it into
/// `google.subject`, at most 127 bytes); a longer SPIFFE ID is enrolled with a warning.
pub const MAX_PORTABLE_SUBJECT: usize = 127;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgs(String),
    #[error("{0}")]
    AccessDenied(String),
    #[error("key store: {0}")]
    Backend(#[from] KeyStoreError),
    #[error("registry: {0}")]
    Registry(RegistryError),
    #[error("audit: {0}")]
    Audit(#[from] AuditError),
}

impl From<RegistryError> for AdminError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::AlreadyExists(n) => {
                AdminError::AlreadyExists(format!("an agent named {n:?} already exists"))
            }
            RegistryError::NotFound(n) => AdminError::NotFound(format!("no agent named {n:?}")),
            other => AdminError::Registry(other),
        }
    }
}

/// What start-up repair did.
#[derive(Debug, Default)]
pub struct RepairReport {
    pub rolled_back: Vec<String>,
    pub keys_destroyed: Vec<String>,
    pub missing_keys: Vec<String>,
}

/// What makes an enrolment invalid before anything is created: the one check that enrolment,
/// updates and `tessera agent check` share. `max_token_ttl`/`max_cert_ttl` are the daemon's
/// ceilings.
pub fn spec_problem(
    name: &str,
    selectors: &Selectors,
    policy: &Policy,
    max_token_ttl: std::time::Duration,
    max_cert_ttl: std::time::Duration,
) -> Result<(), String> {
    validate_name(name)?;
    selectors.validate()?;
    policy.validate(max_token_ttl, max_cert_ttl)
}

impl Agents {
    async fn audit_admin(&self, ev: Event) {
        // The action itself has happened; hiding that would be worse than a gap.
        self.audit.record_or_log(ev, "an admin action").await;
    }

    fn validate_spec(
        &self,
        name: &str,
        selectors: &Selectors,
        policy: &Policy,
    ) -> Result<(), AdminError> {
        let s = self.settings();
        spec_problem(name, selectors, policy, s.max_token_ttl, s.max_cert_ttl)
            .map_err(AdminError::InvalidArgs)
    }

    /// Enrol a new agent with a new hardware key.
    pub async fn enroll(
        &self,
        name: &str,
        selectors: Selectors,
        policy: Policy,
        source: Source,
        by: &str,
    ) -> Result<Agent, AdminError> {
        self.enroll_from(name, selectors, policy, source, None, by)
            .await
    }

    /// Enrol; `file_hash` is the SHA-256 of the `agents_dir` file it comes from.
    pub(crate) async fn enroll_from(
        &self,
        name: &str,
        selectors: Selectors,
        policy: Policy,
        source: Source,
        file_hash: Option<&str>,
        by: &str,
    ) -> Result<Agent, AdminError> {
        self.validate_spec(name, &selectors, &policy)?;
        // Model steps (lifecycle.pml): E0 admin lock, E1 pending record, E2 key, E3 activate,
        // E4 memory, E5 audit and unlock.
        let _guard = self.admin.lock().await; // model: E0
        let spiffe_id = self.settings().ids.agent_id(name);
        let key_id = new_key_id(AGENT_KEY_PREFIX);
        // model: E1
        let row = self.with_registry(|r| {
            r.insert_pending(&NewAgent {
                name,
                spiffe_id: &spiffe_id,
                source,
                selectors: &selectors,
                policy: &policy,
                key_id: &key_id,
                file_hash,
            })
        })?;
        fault::point("enroll-after-record");
        // model: E2
        let made = if policy.rsa_key() {
            self.keystore
                .create_rsa(&key_id)
                .await
                .map(|k| crate::keystore::rsa::jwk_of(&k))
        } else {
            self.keystore
                .create(&key_id)
                .await
                .map(|k| jwk_of(&k.public))
        };
        let (kid, jwk) = match made {
            Ok(k) => k,
            Err(e) => {
                self.with_registry(|r| r.delete_pending(row))?;
                return Err(e.into());
            }
        };
        fault::point("enroll-after-key");
        self.with_registry(|r| r.activate(row, &kid, &jwk))?; // model: E3
        let agent = self.with_registry(|r| r.get_live(name))?.ok_or_else(|| {
            AdminError::NotFound(format!("agent {name} vanished during enrolment"))
        })?;
        let generation = self.apply(std::slice::from_ref(&agent)); // model: E4
        let mut details = json!({
            "by": by, "source": source, "selectors": selectors, "policy": policy, "kid": kid,
        });
        if spiffe_id.len() > MAX_PORTABLE_SUBJECT {
            let warning = format!(
                "the SPIFFE ID is {} bytes: relying parties that limit `sub` to {MAX_PORTABLE_SUBJECT} bytes (Google) will refuse its tokens; shorten id_template or the name",
                spiffe_id.len()
            );
            tracing::warn!(agent = name, spiffe_id, "{warning}");
            details["warning"] = json!(warning);
        }
        self.audit_admin(
            Event::new("agent.enrolled")
                .agent(name, &spiffe_id)
                .details(details),
        )
        .await;
        self.publish(generation, name, EventKind::Enrolled);
        Ok(agent)
    }

    /// Change an agent's selectors and policy; its key stays.
    pub async fn update(
        &self,
        name: &str,
        selectors: Selectors,
        policy: Policy,
        file_hash: Option<&str>,
        by: &str,
    ) -> Result<(), AdminError> {
        self.validate_spec(name, &selectors, &policy)?;
        let _guard = self.admin.lock().await;
        let a = self.live_by_name(name)?;
        // The key was made at enrolment: a different kind would mean another key.
        if a.policy.rsa_key() != policy.rsa_key() {
            return Err(AdminError::InvalidArgs(format!(
                "agent {name}: policy key is fixed at enrolment ({}); to re-key, revoke the agent, then enrol it again",
                a.policy.key.as_deref().unwrap_or("p256")
            )));
        }
        let generation = {
            // Under the gate: no credential checked against the old policy leaves after this.
            let _gate = self.gate.write().await;
            self.with_registry(|r| r.update_spec(a.row, &selectors, &policy, file_hash))?;
            self.apply(&[self.live_by_name(name)?])
        };
        self.audit_admin(
            Event::new("agent.updated")
                .agent(&a.name, &a.id)
                .details(json!({
                    "by": by, "selectors": selectors, "policy": policy,
                })),
        )
        .await;
        self.publish(generation, name, EventKind::Updated);
        Ok(())
    }

    fn live_by_name(&self, name: &str) -> Result<Agent, AdminError> {
        self.with_registry(|r| r.get_live(name))?
            .ok_or_else(|| AdminError::NotFound(format!("no agent named {name:?}")))
    }

    pub async fn set_suspended(
        &self,
        name: &str,
        suspended: bool,
        by: &str,
    ) -> Result<(), AdminError> {
        // Model steps: S0-S5 (suspend), R6-R11 (resume): lock, live_by_name, gate, status,
        // memory, unlock.
        let _guard = self.admin.lock().await;
        let a = self.live_by_name(name)?;
        let (status, event) = if suspended {
            (Status::Suspended, "agent.suspended")
        } else {
            (Status::Active, "agent.resumed")
        };
        if a.status == status {
            return Ok(());
        }
        let generation = {
            // Under the gate: no credential leaves after a suspension is recorded.
            let _gate = self.gate.write().await; // model: S2/R8
            self.with_registry(|r| r.set_status(a.row, status))?; // model: S3/R9
            self.apply(&[self.live_by_name(name)?]) // model: S4/R10
        };
        if suspended {
            self.keystore.sessions().drop_agent(a.row);
        }
        self.audit_admin(
            Event::new(event)
                .agent(&a.name, &a.id)
                .details(json!({"by": by})),
        )
        .await;
        let kind = if suspended {
            EventKind::Suspended
        } else {
            EventKind::Resumed
        };
        self.publish(generation, name, kind);
        Ok(())
    }

    /// Revoke (an admin's act): durable record, then destroy the key, then report.
    /// Idempotent. A file-declared agent stays revoked while its file is unchanged.
    pub async fn revoke(&self, name: &str, reason: &str, by: &str) -> Result<(), AdminError> {
        self.revoke_with(name, reason, by, true).await
    }

    /// Revoke; `hold` keeps a file-declared agent from coming back from the same file.
    pub(crate) async fn revoke_with(
        &self,
        name: &str,
        reason: &str,
        by: &str,
        hold: bool,
    ) -> Result<(), AdminError> {
        // Model steps: V0 lock, V1 get_live, V2-V4 mark_revoked, V5 destroy, V6 mark destroyed,
        // V7 unlock.
        let _guard = self.admin.lock().await;
        let a = match self.with_registry(|r| r.get_live(name))? {
            Some(a) => a,
            None => {
                return match self.with_registry(|r| r.get_latest(name))? {
                    Some(prev) if prev.status == Status::Revoked => {
                        // Already revoked; finish a destroy that failed before, if any.
                        if prev.key_state != KeyState::Destroyed {
                            self.destroy_key(&prev, by).await?;
                        }
                        Ok(())
                    }
                    _ => Err(AdminError::NotFound(format!("no agent named {name:?}"))),
                };
            }
        };
        let generation = self
            .mark_revoked(std::slice::from_ref(&a), reason, by, hold)
            .await?;
        fault::point("revoke-after-record");
        self.keystore.sessions().drop_agent(a.row);
        let destroyed = self.destroy_key(&a, by).await;
        // The event comes after the key is gone (or its destruction failed and is reported to
        // the admin and retried at start); the agent is revoked either way. Subscribers
        // re-sign the CRL and emit the D-Bus signal; anything built from the agents records
        // the generation it saw, so the CRL served after this reply includes the agent.
        self.publish(
            generation,
            &a.name,
            EventKind::Revoked {
                reason: reason.to_string(),
            },
        );
        destroyed
    }

    /// Steps 1-2 of revocation for `agents`: under the issuance gate's write side, one durable
    /// transaction and memory refreshed once; then, with the gate released, `agent.revoked`
    /// audited for each. Credentials whose issuance passed its last liveness check before the
    /// gate was taken held its read side until their own records were written, so they are in
    /// the audit before these records; none is released after (see [`Agents::issuance`]).
    /// Writing the records after the gate lets refusals start at the transaction, not after
    /// thousands of records (the kill switch).
    async fn mark_revoked(
        &self,
        agents: &[Agent],
        reason: &str,
        by: &str,
        hold: bool,
    ) -> Result<u64, AdminError> {
        let gate = self.gate.write().await; // model: V2
        let rows: Vec<i64> = agents.iter().map(|a| a.row).collect();
        self.with_registry(|r| r.mark_all_revoked(&rows, reason, hold))?; // model: V3
                                                                          // Memory follows the durable records at once, without re-reading every agent: these
                                                                          // records as `mark_all_revoked` left them (only the revoked set, which words refusals,
                                                                          // holds them; the CRL and everything durable come from the registry).
        let now = super::now_unix();
        let revoked: Vec<Agent> = agents
            .iter()
            .map(|a| {
                let mut r = a.clone();
                r.status = Status::Revoked;
                r.key_state = KeyState::Destroying;
                r.revoked_at = Some(now);
                r.revoke_reason = Some(reason.to_string());
                r.updated_at = now;
                if !hold {
                    r.file_hash = None;
                }
                r
            })
            .collect();
        let generation = self.apply(&revoked); // model: V4
        drop(gate);
        let mut records = tokio::task::JoinSet::new();
        for a in agents {
            let audit = self.audit.clone();
            let ev = Event::new("agent.revoked")
                .agent(&a.name, &a.id)
                .details(json!({"by": by, "reason": reason, "kid": a.kid}));
            // Concurrent records share fsyncs (group commit): the kill switch stays fast.
            records.spawn(async move { audit.record_or_log(ev, "a revocation").await });
        }
        while records.join_next().await.is_some() {}
        Ok(generation)
    }

    async fn destroy_key(&self, a: &Agent, by: &str) -> Result<(), AdminError> {
        // model: V5 (and C2 at start-up)
        match self.keystore.destroy(&a.key_id).await {
            Ok(()) | Err(KeyStoreError::KeyNotFound(_)) => {}
            Err(e) => {
                tracing::error!(agent = %a.name, error = %e, "key destroy failed; retrying in the background");
                self.audit_admin(
                    Event::new("key.destroy_failed")
                        .agent(&a.name, &a.id)
                        .details(json!({
                            "by": by, "key_id": a.key_id, "error": e.to_string(),
                            "retry": "in the background until it is gone",
                        })),
                )
                .await;
                return Err(e.into());
            }
        }
        self.with_registry(|r| r.mark_key_destroyed(a.row))?; // model: V6
        self.audit_admin(
            Event::new("key.destroyed")
                .agent(&a.name, &a.id)
                .details(json!({
                    "by": by, "key_id": a.key_id, "kid": a.kid,
                })),
        )
        .await;
        Ok(())
    }

    /// The kill switch: every credential refused from the call, every live agent revoked in
    /// one transaction, then every key destroyed, then one event per agent (one CRL).
    /// Returns who was revoked.
    pub async fn revoke_all(&self, reason: &str, by: &str) -> Result<Vec<String>, AdminError> {
        // Refusals start here, before the admin lock, the registry read and the transaction.
        let switch = super::KillSwitch::begin(&self.killing);
        let _guard = match self.admin.try_lock() {
            Ok(g) => g,
            Err(_) => {
                // Refusing already; say why nothing else moves if another admin call hangs.
                tracing::warn!("kill switch waiting for an admin call in progress; every credential is refused meanwhile");
                self.admin.lock().await
            }
        };
        // From the registry, not memory: an agent made live durably whose memory update
        // failed must not escape the kill switch.
        let live = self.with_registry(|r| r.live())?;
        let generation = self.mark_revoked(&live, reason, by, true).await?;
        // Memory says revoked now; agents enrolled after this call are served again.
        drop(switch);
        let mut first_err = None;
        for a in &live {
            self.keystore.sessions().drop_agent(a.row);
            if let Err(e) = self.destroy_key(a, by).await {
                first_err.get_or_insert(e);
            }
        }
        for a in &live {
            self.publish(
                generation,
                &a.name,
                EventKind::Revoked {
                    reason: reason.to_string(),
                },
            );
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(live.iter().map(|a| a.name.clone()).collect()),
        }
    }

    /// Destroy the keys of revoked agents whose destruction failed (a busy or unreachable
    /// device, a read-only key directory). Run periodically: a failed destroy is retried until
    /// the key is gone, never forgotten. Returns how many keys are still to go.
    pub async fn retry_pending_destroys(&self) -> Result<usize, AdminError> {
        let _guard = self.admin.lock().await;
        let mut left = 0;
        for a in self.with_registry(|r| r.revoked_with_key())? {
            match self.keystore.destroy(&a.key_id).await {
                Ok(()) | Err(KeyStoreError::KeyNotFound(_)) => {
                    self.with_registry(|r| r.mark_key_destroyed(a.row))?;
                    self.audit_admin(Event::new("key.destroyed").agent(&a.name, &a.id).details(
                        json!({"by": "tesserad", "key_id": a.key_id, "kid": a.kid, "retried": true}),
                    ))
                    .await;
                    tracing::info!(agent = %a.name, "key destroyed on retry");
                    self.publish(self.generation(), &a.name, EventKind::KeyDestroyed);
                }
                Err(e) => {
                    left += 1;
                    tracing::warn!(agent = %a.name, error = %e, "key destroy still failing; will retry");
                }
            }
        }
        Ok(left)
    }

    /// Start-up repair: finish or roll back what a crash interrupted, destroy orphan keys.
    pub async fn repair(&self) -> Result<RepairReport, AdminError> {
        let _guard = self.admin.lock().await;
        let mut report = RepairReport::default();
        // Sets, not lists: with 10,000 agents a scan per agent made the start quadratic.
        let in_store: BTreeSet<String> = self.keystore.list().await?.into_iter().collect();
        // model: C1
        for p in self.with_registry(|r| r.pending())? {
            if in_store.contains(&p.key_id) {
                match self.keystore.destroy(&p.key_id).await {
                    Ok(()) | Err(KeyStoreError::KeyNotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
                report.keys_destroyed.push(p.key_id.clone());
            }
            self.with_registry(|r| r.delete_pending(p.row))?;
            self.audit_admin(Event::new("agent.enroll_rolled_back").agent(&p.name, &p.id).details(json!({
                "by": "tesserad", "key_id": p.key_id, "reason": "enrolment interrupted by a crash",
            })))
            .await;
            report.rolled_back.push(p.name);
        }
        // model: C2
        for a in self.with_registry(|r| r.revoked_with_key())? {
            match self.destroy_key(&a, "tesserad").await {
                Ok(()) => report.keys_destroyed.push(a.key_id.clone()),
                Err(e) => {
                    tracing::error!(agent = %a.name, error = %e, "revoked agent's key still not destroyed")
                }
            }
        }
        let in_store: BTreeSet<String> = self.keystore.list().await?.into_iter().collect();
        // Orphans: every key no live agent holds (`key_id` is unique, so a live owner's key is
        // in `live_keys`); only those are looked up, for a revoked owner to mark (one registry
        // query per key made the start linear in queries).
        let live = self.with_registry(|r| r.live())?;
        let live_keys: HashSet<&str> = live.iter().map(|a| a.key_id.as_str()).collect();
        let prefix = format!("{AGENT_KEY_PREFIX}-");
        for key in in_store
            .iter()
            .filter(|k| k.starts_with(&prefix) && !live_keys.contains(k.as_str()))
        {
            let owner = self.with_registry(|r| r.referenced_key(key))?;
            match self.keystore.destroy(key).await {
                Ok(()) | Err(KeyStoreError::KeyNotFound(_)) => {}
                Err(e) => {
                    // No live agent holds it, so nothing can sign with it: start, and retry
                    // (a revoked owner's key in the background, an ownerless one next start)
                    // rather than refuse to start over a busy device.
                    tracing::error!(key_id = %key, error = %e, "orphan key not destroyed; will retry");
                    continue;
                }
            }
            if let Some(a) = &owner {
                self.with_registry(|r| r.mark_key_destroyed(a.row))?;
            }
            self.audit_admin(Event::new("key.destroyed").details(json!({
                "by": "tesserad", "key_id": key, "reason": "orphan key with no live agent",
            })))
            .await;
            report.keys_destroyed.push(key.clone());
        }
        for a in live {
            if !in_store.contains(&a.key_id) {
                tracing::error!(agent = %a.name, key_id = %a.key_id, "agent's key is missing from the key store");
                self.audit_admin(
                    Event::new("key.missing")
                        .agent(&a.name, &a.id)
                        .details(json!({"key_id": a.key_id})),
                )
                .await;
                report.missing_keys.push(a.name);
            }
        }
        self.refresh()?;
        Ok(report)
    }
}
