//! Enrolled agents: who they are (selectors), what they may ask for (policy), their status and
//! the device key that is their identity.
//!
//! [`Agents`] owns the registry and the in-memory view the hot path reads (live and revoked
//! agents, re-read after every change), runs the enrolment and revocation state machines
//! (`lifecycle`) and the declarative `agents_dir` reconcile, and publishes every change as an
//! [`AgentEvent`] with a generation number. Parts above it (credentials, doors, runtime)
//! subscribe; nothing here calls up.
//!
//! - `registry`: SQLite records (agents, certificates, meta)
//! - `record`: an agent as recorded; `selectors`: matching callers; `policy`: what it may ask
//! - `lifecycle`: enrol / update / suspend / revoke / repair; `agents_dir`: declarative files

pub mod agents_dir;
pub mod index;
pub mod lifecycle;
pub mod policy;
pub mod record;
pub mod registry;
pub mod selectors;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::audit::Audit;
use crate::keystore::owner::KeyStoreHandle;
pub use agents_dir::ReconcileReport;
use index::{AgentSet, Order};
pub use lifecycle::{AdminError, RepairReport, AGENT_KEY_PREFIX};
pub use policy::Policy;
pub use record::{now_unix, validate_name, Agent, KeyState, Source, Status};
use registry::Registry;
pub use registry::RegistryError;
pub use selectors::Selectors;

/// How ids are made: `trust_domain`, the host name and `id_template`.
#[derive(Debug, Clone)]
pub struct Ids {
    pub trust_domain: String,
    pub host_name: String,
    pub id_template: String,
}

impl Ids {
    /// The issuer (`iss`) of every token from this host.
    pub fn host_id(&self) -> String {
        format!("spiffe://{}/host/{}", self.trust_domain, self.host_name)
    }

    pub fn agent_id(&self, name: &str) -> String {
        self.id_template
            .replace("{trust_domain}", &self.trust_domain)
            .replace("{host}", &self.host_name)
            .replace("{name}", name)
    }
}

/// What this part needs from the configuration; built and replaced by the runtime.
#[derive(Debug, Clone)]
pub struct Settings {
    pub ids: Ids,
    /// Ceilings a policy's `max_ttl` / `max_cert_ttl` may not exceed.
    pub max_token_ttl: Duration,
    pub max_cert_ttl: Duration,
}

/// What happened to an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Enrolled,
    Updated,
    Suspended,
    Resumed,
    Revoked {
        reason: String,
    },
    /// A revoked agent's key whose destruction had failed is gone at last.
    KeyDestroyed,
}

/// One change, published after it is durable. `generation` is the value of
/// [`Agents::generation`] once the change is visible in memory.
#[derive(Debug, Clone)]
pub struct AgentEvent {
    pub generation: u64,
    pub name: String,
    pub kind: EventKind,
}

pub struct Agents {
    settings: RwLock<Arc<Settings>>,
    /// `None` once [`Agents::close`] has closed it at shutdown.
    registry: Mutex<Option<Registry>>,
    /// Live agents, re-read from the registry after every change (the hot path reads this).
    live: RwLock<Arc<AgentSet>>,
    /// Revoked agents, newest first, re-read with `live`: a refused caller is told whether it
    /// was revoked without a registry query on every refusal.
    revoked: RwLock<Arc<AgentSet>>,
    /// Bumped every time `live`/`revoked` are re-read after a change.
    generation: AtomicU64,
    /// The SPIFFE bundle sequence the registry held at start: published sequences are this
    /// plus `generation`, so they only grow, across restarts too.
    sequence_base: u64,
    pub(crate) keystore: KeyStoreHandle,
    pub(crate) audit: Audit,
    /// Serialises enrolment, revocation and reconciliation.
    admin: tokio::sync::Mutex<()>,
    /// The issuance gate: read by every credential from its last liveness check until its
    /// audit record is written, written by revocation while it commits the revoked records,
    /// refreshes memory and audits them. So no credential of an agent leaves after its revoked
    /// record is durable, and every one that left is in the audit before `agent.revoked`.
    gate: tokio::sync::RwLock<()>,
    /// Kill switches called whose revocations are not yet in memory. While one is, no
    /// credential is released, without waiting for the gate: `RevokeAll` refuses from the
    /// call, not from the commit of its transaction (which takes a while with thousands of
    /// agents). Every agent live meanwhile is about to be revoked (enrolment waits for the
    /// admin lock the kill switch takes next), so such a refusal is never wrong; if the
    /// transaction fails, it only refused early, the safe side.
    killing: AtomicUsize,
    events: broadcast::Sender<AgentEvent>,
}

/// A kill switch between its call and its revocations in memory (see `Agents::killing`).
struct KillSwitch<'a>(&'a AtomicUsize);

impl<'a> KillSwitch<'a> {
    fn begin(count: &'a AtomicUsize) -> KillSwitch<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        KillSwitch(count)
    }
}

impl Drop for KillSwitch<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Registry `meta` key of the SPIFFE bundle sequence.
const SEQUENCE_KEY: &str = "spiffe.sequence";

/// Revoked agents kept in memory, newest first, so that a revoked agent's process is told
/// "revoked" rather than "unknown". Every revoked record stays in the registry; memory holds
/// this many (the 10-minute soak's churn otherwise grew RSS by about 1 KiB per revocation).
pub const REMEMBERED_REVOKED: usize = 1024;

impl Agents {
    pub fn new(
        settings: Settings,
        registry: Registry,
        keystore: KeyStoreHandle,
        audit: Audit,
    ) -> Result<Arc<Agents>, RegistryError> {
        let live = registry.live()?;
        let revoked = registry.revoked(REMEMBERED_REVOKED)?;
        let sequence_base = registry
            .meta(SEQUENCE_KEY)?
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let (events, _) = broadcast::channel(1024);
        Ok(Arc::new(Agents {
            settings: RwLock::new(Arc::new(settings)),
            registry: Mutex::new(Some(registry)),
            live: RwLock::new(Arc::new(AgentSet::new(live, Order::Enrolment))),
            revoked: RwLock::new(Arc::new(AgentSet::new(
                revoked,
                Order::NewestRevocationFirst,
            ))),
            generation: AtomicU64::new(1),
            sequence_base,
            keystore,
            audit,
            admin: tokio::sync::Mutex::new(()),
            gate: tokio::sync::RwLock::new(()),
            killing: AtomicUsize::new(0),
            events,
        }))
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// New settings (config reload); agents already enrolled keep their ids.
    pub fn set_settings(&self, s: Settings) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
    }

    fn with_registry<T>(
        &self,
        f: impl FnOnce(&mut Registry) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let run = || {
            let mut guard = self.registry.lock().unwrap_or_else(|p| p.into_inner());
            match guard.as_mut() {
                Some(r) => f(r),
                None => Err(RegistryError::Closed),
            }
        };
        // A registry call can block for seconds (an fsync, or SQLite's busy wait while another
        // process holds the file's write lock) and callers wait on the mutex meanwhile: on the
        // daemon's runtime, give the worker's other tasks to another thread first, or two such
        // waits stall every connection (found by the kill-switch test with a locked registry).
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(run)
            }
            _ => run(),
        }
    }

    /// Close the registry (last step of a stop); later calls fail with `Closed`.
    pub fn close(&self) {
        let reg = self
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(reg);
    }

    /// Re-read live agents after a change and bump the generation.
    fn refresh(&self) -> Result<u64, RegistryError> {
        let (live, revoked) =
            self.with_registry(|r| Ok((r.live()?, r.revoked(REMEMBERED_REVOKED)?)))?;
        let (live, revoked) = (
            AgentSet::new(live, Order::Enrolment),
            AgentSet::new(revoked, Order::NewestRevocationFirst),
        );
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(live);
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(revoked);
        let g = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.store_sequence(g);
        Ok(g)
    }

    /// Keep the bundle sequence in the registry so the next start continues above it.
    fn store_sequence(&self, generation: u64) {
        let seq = (self.sequence_base + generation).to_string();
        if let Err(e) = self.with_registry(|r| r.set_meta(SEQUENCE_KEY, &seq)) {
            tracing::warn!(error = %e, "cannot store the SPIFFE bundle sequence");
        }
    }

    /// `spiffe_sequence` of the trust bundles: grows at every agent change, across restarts.
    pub fn spiffe_sequence(&self) -> u64 {
        self.sequence_base + self.generation()
    }

    /// Put the current records of changed agents (as the registry now holds them) into the
    /// in-memory sets and bump the generation: O(changed) records, the rest shared, so a
    /// revocation or an enrolment costs the same with ten thousand agents as with ten.
    fn apply(&self, changed: &[Agent]) -> u64 {
        {
            let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
            let next = live.apply(changed, Agent::is_live, None);
            *live = Arc::new(next);
        }
        {
            let mut revoked = self.revoked.write().unwrap_or_else(|p| p.into_inner());
            let next = revoked.apply(
                changed,
                |a| a.status == Status::Revoked,
                Some(REMEMBERED_REVOKED),
            );
            *revoked = Arc::new(next);
        }
        let g = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.store_sequence(g);
        g
    }

    /// Changes so far; anything derived from the agents (the CRL) records the generation it
    /// was built at and is rebuilt when this has moved on.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn publish(&self, generation: u64, name: &str, kind: EventKind) {
        let _ = self.events.send(AgentEvent {
            generation,
            name: name.to_string(),
            kind,
        });
    }

    /// Every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    pub fn live(&self) -> Arc<AgentSet> {
        self.live
            .read()
            .map(|l| l.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Revoked agents, newest first.
    pub fn revoked(&self) -> Arc<AgentSet> {
        self.revoked
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Hold while releasing a credential: check [`Agents::may_release`] under it, then write
    /// the audit record, then drop it. Revocation waits for holders and blocks new ones.
    pub async fn issuance(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    /// Whether a kill switch is under way: refuse before waiting for the gate.
    pub fn killing(&self) -> bool {
        self.killing.load(Ordering::SeqCst) > 0
    }

    /// Whether a credential built for `agent` may still leave: it is active (not revoked or
    /// suspended since it was matched). Call under [`Agents::issuance`], after checking
    /// [`Agents::killing`] (which refuses before the gate, where a kill switch holds it).
    pub fn may_release(&self, agent: &Agent) -> bool {
        self.live()
            .by_row(agent.row)
            .is_some_and(|a| a.status == Status::Active)
    }

    /// Record an issued agent certificate, only while its agent is still live (so a racing
    /// revocation's CRL includes it); `NotLive` otherwise.
    pub fn record_certificate(
        &self,
        agent: &Agent,
        serial_hex: &str,
        not_after: i64,
        x5t_s256: Option<&str>,
    ) -> Result<(), RegistryError> {
        self.with_registry(|r| r.record_certificate(agent, serial_hex, not_after, x5t_s256))
    }

    /// `(agent row, notAfter)` of the certificate issued with DER SHA-256 `x5t_s256`.
    pub fn certificate_by_thumbprint(
        &self,
        x5t_s256: &str,
    ) -> Result<Option<(i64, i64)>, RegistryError> {
        self.with_registry(|r| r.certificate_by_thumbprint(x5t_s256))
    }

    /// (serial, revoked_at) of every unexpired certificate of a revoked agent, and the next
    /// CRL number.
    pub fn crl_entries(&self, now: i64) -> Result<(Vec<(String, i64)>, u64), RegistryError> {
        self.with_registry(|r| Ok((r.revoked_certificates(now)?, r.next_crl_number()?)))
    }

    /// Forget expired certificate records.
    pub fn prune_certificates(&self, now: i64) -> Result<usize, RegistryError> {
        self.with_registry(|r| r.prune_certificates(now))
    }

    /// Agent records by status ("active", "suspended", "revoked", "pending").
    pub fn count_by_status(&self) -> Result<Vec<(String, u64)>, RegistryError> {
        self.with_registry(|r| r.count_by_status())
    }

    /// Revoked agents whose key is still to be destroyed (retried in the background).
    pub fn destroy_pending(&self) -> Result<Vec<Agent>, RegistryError> {
        self.with_registry(|r| r.revoked_with_key())
    }

    /// The revoked agent `name` if its key is still to be destroyed.
    pub fn destroy_pending_named(&self, name: &str) -> Result<Option<Agent>, RegistryError> {
        self.with_registry(|r| r.revoked_with_key_named(name))
    }

    /// A value of the registry's `meta` table (state other parts keep with the agents so it
    /// commits with the same durability).
    pub fn meta(&self, key: &str) -> Result<Option<String>, RegistryError> {
        self.with_registry(|r| r.meta(key))
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), RegistryError> {
        self.with_registry(|r| r.set_meta(key, value))
    }

    /// Write issue counters `(row, count, last issued at)`.
    pub fn set_issued(&self, counts: &[(i64, u64, u64)]) -> Result<(), RegistryError> {
        self.with_registry(|r| r.set_issued(counts))
    }
}
