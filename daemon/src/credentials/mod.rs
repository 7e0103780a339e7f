//! The pipeline every door calls: identify the caller (kernel facts) → match an agent →
//! policy → build → sign (the issuer, the only code that asks for signatures) → audit →
//! reply. Doors translate their transport to these calls and [`Problem`]s back.
//!
//! - `issuer`: asks the key store to sign what this part built; `jwt`, `x509`: the
//!   structures; `hostca`: the host CA and its CRL; `certificate`, `evidence`: agent
//!   certificates and key attestation; `problem`: refusals with stable names.

pub mod certificate;
pub mod checkpoint;
pub mod evidence;
pub mod federation;
pub mod hostca;
pub mod httpsig;
pub mod issuer;
pub mod jwt;
pub mod problem;
pub mod proof;
pub mod settings;
pub mod status;
pub mod svid;
pub mod tls;
pub mod x509;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::agents::policy::{self, RateLimiter};
use crate::agents::{AdminError, Agent, Agents, EventKind, Status};
use crate::audit::{Audit, Event};
use crate::caller::{self, Caller, CallerError, ExeHashCache, Peer};
use crate::duration::{format_duration, parse_duration};
use crate::keystore::{owner::KeyStoreHandle, KeyStoreError};
use issuer::Issuer;
use problem::{Kind, Problem};
pub use settings::Settings;

pub struct Credentials {
    agents: Arc<Agents>,
    settings: RwLock<Arc<Settings>>,
    pub(crate) keystore: KeyStoreHandle,
    pub(crate) issuer: Issuer,
    audit: Audit,
    /// `<state>/ca`: the host CA certificate file.
    ca_dir: PathBuf,
    /// The host CA, set by [`Credentials::init_host_ca`] at start.
    ca: RwLock<Option<Arc<hostca::HostCa>>>,
    crl: RwLock<Option<Arc<hostca::Crl>>>,
    /// Serialises CRL signing so a newer CRL is never replaced by an older one.
    crl_lock: tokio::sync::Mutex<()>,
    /// A CRL that could not be signed when it should have been.
    crl_stale: std::sync::atomic::AtomicBool,
    /// Serialises changes of the host CA (start-up, install-cert).
    ca_lock: tokio::sync::Mutex<()>,
    rate: Mutex<RateLimiter>,
    /// Per-agent (issued count, last issued at), kept in memory on the hot path and written to
    /// the registry by [`Credentials::flush_counters`]; the audit trail is the authoritative record.
    issued: Mutex<HashMap<i64, (u64, u64, bool)>>,
    exe_cache: ExeHashCache,
    /// Per-uid budget for audited refusals, and what was counted over it.
    refusals: Mutex<Refusals>,
    /// Executables being hashed, bounded per uid.
    hashing: Mutex<HashMap<u32, Arc<tokio::sync::Semaphore>>>,
    /// `ath` of the DPoP-bound tokens issued and not yet expired (for the bare-`ath` rule).
    bound: Mutex<proof::BoundTokens>,
    /// Certificates of session keys (`?key=session`), by `x5t#S256`.
    session_certs: Mutex<certificate::SessionCerts>,
    /// `<state>/audit`: where the checkpoint file goes.
    audit_dir: PathBuf,
    /// The seq of the newest signed checkpoint; also serialises signing them.
    checkpointed: tokio::sync::Mutex<crate::audit::Head>,
    /// Moves whenever a bundle may have (see [`Credentials::bundle_changes`]).
    changes: tokio::sync::watch::Sender<u64>,
    /// Credentials issued per minute over the last hour (for `Status()`).
    activity: status::Activity,
    /// `[federation] publish_dir`, opened and checked at start.
    publisher: std::sync::OnceLock<Arc<federation::Publisher>>,
}

/// RSA agents (`key = "rsa2048"`) get tokens, JWT-SVIDs and attestation only: everything
/// else is made for P-256 keys (DESIGN, keys).
pub(crate) fn p256_only(agent: &Agent, what: &str) -> Result<(), Problem> {
    if agent.policy.rsa_key() {
        return Err(Problem::new(
            Kind::KeyTypeUnsupported,
            format!(
                "agent {} has an RSA key (policy key = \"rsa2048\"): {what} need a P-256 key",
                agent.name
            ),
        ));
    }
    Ok(())
}

/// The rate bucket of an agent's TLS server signatures (key ids hold no `#`).
fn server_bucket(key_id: &str) -> String {
    format!("{key_id}#tls-server")
}

/// Refusals over the audit budget, counted per uid.
#[derive(Debug, Clone, Copy)]
struct Collapsed {
    count: u64,
    first: i64,
    last: i64,
}

#[derive(Default)]
struct Refusals {
    budget: RateLimiter,
    over: HashMap<u32, Collapsed>,
}

impl Refusals {
    /// Whether this refusal is recorded on its own; and, when it is and earlier ones were
    /// counted, that count (to be recorded first).
    fn admit(&mut self, uid: u32, per_min: u32, now: Instant) -> (bool, Option<Collapsed>) {
        if self
            .budget
            .check(&format!("uid:{uid}"), per_min, now)
            .is_ok()
        {
            return (true, self.over.remove(&uid));
        }
        let t = crate::agents::now_unix();
        let c = self.over.entry(uid).or_insert(Collapsed {
            count: 0,
            first: t,
            last: t,
        });
        c.count += 1;
        c.last = t;
        (false, None)
    }

    fn take_all(&mut self) -> Vec<(u32, Collapsed)> {
        self.over.drain().collect()
    }
}

/// `POST /v1/token` body (also what D-Bus `GetToken` maps to).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub audience: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// "5m", "90s", ...
    #[serde(default)]
    pub ttl: Option<String>,
    /// Which agent, when the caller matches several.
    #[serde(default)]
    pub agent: Option<String>,
    /// `"dpop"`: a sender-constrained token (`cnf.jkt` of the agent's proof key); `"mtls"`:
    /// bound to the certificate named by `x5t#S256` (RFC 8705).
    #[serde(default)]
    pub bind: Option<String>,
    /// With `"bind": "mtls"`: base64url SHA-256 of an unexpired certificate the daemon issued
    /// to this agent.
    #[serde(default, rename = "x5t#S256")]
    pub x5t_s256: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenResponse {
    pub token: String,
    pub token_type: &'static str,
    pub expires_at: String,
    #[serde(skip)]
    pub exp: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WhoAmI {
    pub name: String,
    pub id: String,
    pub status: Status,
    pub policy: Value,
    pub key_id: Option<String>,
    /// Which kinds of selector the agent has (`uid`, `exe`, `unit`, …), not their values.
    pub selectors: Vec<&'static str>,
}

/// A Unix time as RFC 3339 (UTC).
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Longest token for `agent`: its policy `max_ttl`, never above the daemon's `tokens.max_ttl`
/// as it is now (lowering it applies to agents enrolled before).
pub(crate) fn token_limit(agent: &Agent, s: &Settings) -> Duration {
    let global = s.tokens.max_ttl.0;
    agent
        .policy
        .max_ttl
        .map(|d| d.0.min(global))
        .unwrap_or(global)
}

fn caller_problem(e: CallerError) -> Problem {
    match e {
        CallerError::Gone(pid) => Problem::new(
            Kind::CallerGone,
            format!("process {pid} exited before it could be identified"),
        ),
        other => Problem::new(Kind::UnknownCaller, other.to_string()),
    }
}

/// Longest audience a token may carry.
const MAX_AUDIENCE: usize = 1024;

/// A suspended agent gets no credential of any kind.
pub(crate) fn check_not_suspended(agent: &Agent) -> Result<(), Problem> {
    if agent.status == Status::Suspended {
        return Err(Problem::new(
            Kind::AgentSuspended,
            format!("agent {} is suspended", agent.name),
        ));
    }
    Ok(())
}

pub(crate) fn keystore_problem(e: KeyStoreError) -> Problem {
    if e.is_transient() {
        Problem::new(Kind::BackendUnavailable, e.to_string()).retry_after(1)
    } else {
        tracing::error!(error = %e, "key store failure");
        Problem::new(Kind::BackendUnavailable, e.to_string()).retry_after(5)
    }
}

/// The answer while a kill switch is under way (between the call and its revocations in
/// memory). Should its transaction fail, nobody was revoked after all and requests are
/// served again (README, "Kill switch").
fn kill_switch_refusal(agent: &str) -> Problem {
    Problem::new(
        Kind::AgentRevoked,
        format!("every agent is being revoked (kill switch); nothing was issued for {agent}"),
    )
}

impl Credentials {
    pub fn new(
        settings: Settings,
        agents: Arc<Agents>,
        keystore: KeyStoreHandle,
        audit: Audit,
        state_dir: &std::path::Path,
    ) -> Arc<Credentials> {
        Arc::new(Credentials {
            agents,
            settings: RwLock::new(Arc::new(settings)),
            issuer: Issuer::new(keystore.clone()),
            keystore,
            audit,
            ca_dir: state_dir.join("ca"),
            ca: RwLock::new(None),
            crl: RwLock::new(None),
            crl_lock: tokio::sync::Mutex::new(()),
            crl_stale: std::sync::atomic::AtomicBool::new(false),
            ca_lock: tokio::sync::Mutex::new(()),
            rate: Mutex::new(RateLimiter::default()),
            issued: Mutex::new(HashMap::new()),
            activity: status::Activity::default(),
            exe_cache: ExeHashCache::default(),
            refusals: Mutex::new(Refusals::default()),
            hashing: Mutex::new(HashMap::new()),
            bound: Mutex::new(proof::BoundTokens::default()),
            session_certs: Mutex::new(certificate::SessionCerts::default()),
            audit_dir: state_dir.join("audit"),
            checkpointed: tokio::sync::Mutex::new(crate::audit::Head {
                seq: 0,
                hash: crate::audit::GENESIS.to_string(),
                pruned_at: 0,
                first: 1,
            }),
            changes: tokio::sync::watch::Sender::new(0),
            publisher: std::sync::OnceLock::new(),
        })
    }

    /// Keep `[federation] publish_dir` current from now on (set once, at start), after a
    /// first publication that must succeed (a directory the unit cannot write fails the start,
    /// not every later revocation).
    pub async fn set_publisher(
        &self,
        p: federation::Publisher,
    ) -> Result<(), federation::PublishError> {
        let p = Arc::new(p);
        self.publish_with(&p).await?;
        if self.publisher.set(p).is_err() {
            tracing::warn!("federation publisher set twice; the first stays");
        }
        Ok(())
    }

    /// One publication on a blocking thread (it fsyncs), the key set read under its lock.
    async fn publish_with(
        &self,
        p: &Arc<federation::Publisher>,
    ) -> Result<bool, federation::PublishError> {
        let Some(issuer) = self.settings().federation_issuer.clone() else {
            return Ok(false);
        };
        let (p, agents) = (p.clone(), self.agents.clone());
        match tokio::task::spawn_blocking(move || p.publish(&issuer, || jwks_of(&agents))).await {
            Ok(r) => r,
            Err(e) => Err(federation::PublishError::Unfit {
                path: String::new(),
                why: format!("publishing task failed: {e}"),
            }),
        }
    }

    /// Rewrite the published discovery document and key set if they changed. A failure is
    /// logged and audited; relying parties keep the previous files (never a torn one), and
    /// the flusher tries again every few seconds.
    pub async fn publish_trust(&self) {
        let Some(p) = self.publisher.get() else {
            return;
        };
        match self.publish_with(p).await {
            Ok(true) => tracing::debug!("federation key set published"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot publish the federation key set");
                let _ = self
                    .audit
                    .record(
                        Event::new("federation.publish_failed")
                            .details(json!({"error": e.to_string()})),
                    )
                    .await;
            }
        }
    }

    /// The agents this pipeline issues for (their lifecycle is the doors' to drive).
    pub fn agents(&self) -> &Arc<Agents> {
        &self.agents
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// New settings (config reload).
    pub fn set_settings(&self, s: Settings) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
    }

    /// Follow agent changes: a revoked agent's CRL entry is signed at once (the CRL is also
    /// rebuilt on demand when it is older than the agents' generation) and its rate budget
    /// forgotten. Runs until the event channel closes.
    pub fn spawn_event_follower(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let mut events = self.agents.subscribe();
        tokio::spawn(async move {
            loop {
                let ev = match events.recv().await {
                    Ok(ev) => ev,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        me.bundles_changed();
                        me.publish_trust().await;
                        // Revocations among the events missed: forget what each kept.
                        for a in me.agents.revoked().iter() {
                            me.forget_rate(&a.key_id);
                            crate::metrics::forget_agent(&a.name);
                        }
                        me.refresh_crl_logged().await;
                        continue;
                    }
                    Err(_) => break,
                };
                // Every agent change may change the JWT bundle and the published key set.
                me.bundles_changed();
                me.publish_trust().await;
                if matches!(
                    ev.kind,
                    EventKind::Suspended | EventKind::Revoked { .. } | EventKind::Updated
                ) {
                    let live = me.agents.live();
                    me.session_certs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .retain_agents(|row| {
                            live.by_row(row).is_some_and(|a| {
                                a.status == Status::Active && proof::uses_session_key(a)
                            })
                        });
                }
                if let EventKind::Revoked { .. } = ev.kind {
                    if let Some(a) = me.agents.revoked().by_name(&ev.name) {
                        me.forget_rate(&a.key_id);
                    }
                    crate::metrics::forget_agent(&ev.name);
                    if me.crl_generation() < ev.generation {
                        me.refresh_crl_logged().await;
                    }
                }
            }
        })
    }

    /// Revoke an agent (an admin's act) and report only once its certificates are on a
    /// signed CRL: steps (1)-(4) are the agents', (5) the CRL here, (6) the caller's reply.
    pub async fn revoke(&self, name: &str, reason: &str, by: &str) -> Result<(), AdminError> {
        let res = self.agents.revoke(name, reason, by).await;
        self.ensure_crl_current().await;
        // The key leaves the published set before the admin hears "revoked".
        self.publish_trust().await;
        res
    }

    /// The kill switch, with one CRL for all before it reports.
    pub async fn revoke_all(&self, reason: &str, by: &str) -> Result<Vec<String>, AdminError> {
        let res = self.agents.revoke_all(reason, by).await;
        self.ensure_crl_current().await;
        self.publish_trust().await;
        res
    }

    /// Close the key store on its owner thread (TPM
    /// objects flushed, PKCS#11 session closed, `C_Finalize`, module unloaded), joined before
    /// this returns. Part of the daemon's stop; nothing of a device is left to process exit.
    pub async fn close(&self) {
        self.keystore.shutdown().await;
    }

    /// Signing requests waiting for a device session (for the metrics door).
    pub fn device_queue_depth(&self) -> usize {
        self.keystore.queued()
    }

    pub fn backend_name(&self) -> &'static str {
        self.keystore.backend().as_str()
    }

    /// Kernel facts about `peer`, read off the reactor (a remote filesystem under the
    /// executable can hold up even a cached stat).
    pub async fn identify(self: &Arc<Self>, peer: Arc<Peer>) -> Result<Caller, Problem> {
        let me = self.clone();
        let p = peer.clone();
        let res = tokio::task::spawn_blocking(move || caller::identify(&p, &me.exe_cache))
            .await
            .map_err(|e| Problem::new(Kind::Internal, e.to_string()))?;
        let caller = match res {
            Ok(c) => c,
            Err(e) => return Err(self.deny_unidentified(&peer, e).await),
        };
        // The executable is read only when an agent this caller already matches on everything
        // else pins it by hash, and only within bounds (size, filesystem, deadline, per uid).
        let needs_hash =
            caller.exe_sha256.is_none()
                && self.agents.live().candidates(&caller, None).any(|a| {
                    a.selectors.exe_sha256.is_some() && a.selectors.matches_cheap(&caller)
                });
        if !needs_hash {
            return Ok(caller);
        }
        self.hash_exe(peer, caller).await
    }

    /// A caller that could not be identified (gone, exec'd since it connected, changed
    /// uid): refused, and recorded within the same per-uid audit budget as other refusals.
    async fn deny_unidentified(&self, peer: &Peer, e: CallerError) -> Problem {
        let p = caller_problem(e);
        let ev = Event::new("access.denied")
            .caller(crate::audit::CallerRecord {
                pid: peer.pid,
                uid: peer.uid,
                gid: peer.gid,
                exe: None,
                exe_sha256: None,
                unit: None,
                cgroup: None,
            })
            .details(json!({
                "problem": p.kind.slug(),
                "reason": crate::audit::client_text(&p.detail),
            }));
        self.audit_refusal(peer.uid, ev).await;
        p
    }

    async fn hash_exe(
        self: &Arc<Self>,
        peer: Arc<Peer>,
        mut caller: Caller,
    ) -> Result<Caller, Problem> {
        let s = self.settings();
        let uid = caller.uid;
        let permit = {
            let mut m = self.hashing.lock().unwrap_or_else(|p| p.into_inner());
            let sem = m
                .entry(uid)
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(s.identify_per_uid)))
                .clone();
            sem.try_acquire_owned().map_err(|_| {
                Problem::new(
                    Kind::BackendUnavailable,
                    format!(
                        "uid {uid} already has {} executables being hashed",
                        s.identify_per_uid
                    ),
                )
                .retry_after(1)
            })?
        };
        let me = self.clone();
        let max = s.max_exe_bytes;
        let unhashed = caller.clone();
        // The permit goes with the blocking work: a read stuck on a slow file keeps holding its
        // uid's share, never more.
        let work = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let r = caller::hash_exe(&peer, &mut caller, &me.exe_cache, max);
            r.map(|()| caller)
        });
        match tokio::time::timeout(s.identify_deadline, work).await {
            Ok(Ok(Ok(c))) => Ok(c),
            // Too large, or on a FUSE/network filesystem: not hashed, so no `exe_sha256`
            // selector matches it; agents that need no hash still can.
            Ok(Ok(Err(e @ CallerError::ExeNotHashed { .. }))) => {
                tracing::debug!(error = %e, "executable not hashed");
                Ok(unhashed)
            }
            Ok(Ok(Err(e))) => Err(caller_problem(e)),
            Ok(Err(e)) => Err(Problem::new(Kind::Internal, e.to_string())),
            Err(_) => Err(Problem::new(
                Kind::RequestTimeout,
                format!(
                    "the caller's executable could not be read within {:?}",
                    s.identify_deadline
                ),
            )),
        }
    }

    /// Which agent this caller is. `wanted` names one when several match.
    pub fn match_agent(&self, caller: &Caller, wanted: Option<&str>) -> Result<Agent, Problem> {
        let live = self.agents.live();
        let matching: Vec<&Agent> = live
            .candidates(caller, wanted)
            .filter(|a| a.selectors.matches(caller))
            .collect();
        match matching.as_slice() {
            // Before any signature or registry write: a kill switch refuses from its call.
            [one] if self.agents.killing() => Err(kill_switch_refusal(&one.name)),
            [one] => Ok((*one).clone()),
            [] if caller.via_bus => {
                // The bus cannot vouch for more than uid/gid: an agent that needs more is
                // served on the socket only (DESIGN: `UseSocket`).
                match live.iter().find(|a| {
                    !a.selectors.ids_only()
                        && a.selectors.ids_match(caller)
                        && wanted.is_none_or(|w| a.name == w)
                }) {
                    Some(a) => Err(Problem::new(
                        Kind::UseSocket,
                        format!(
                            "agent {} has selectors a D-Bus caller cannot be checked against; ask on the agent socket",
                            a.name
                        ),
                    )),
                    None => Err(Problem::new(
                        Kind::UnknownCaller,
                        format!("no enrolled agent matches uid {}", caller.uid),
                    )),
                }
            }
            [] => {
                // Tell a revoked agent that it is revoked, not that it is unknown.
                let revoked = self.agents.revoked();
                let hit = revoked
                    .candidates(caller, wanted)
                    .find(|a| a.selectors.matches(caller));
                match hit {
                    // The admin's reason is for admins (audit, D-Bus signal), not for callers.
                    Some(a) => Err(Problem::new(
                        Kind::AgentRevoked,
                        format!("agent {} was revoked", a.name),
                    )),
                    None => Err(Problem::new(
                        Kind::UnknownCaller,
                        format!(
                            "no enrolled agent matches this process (pid {}, uid {})",
                            caller.pid, caller.uid
                        ),
                    )),
                }
            }
            many => Err(Problem::new(
                Kind::AmbiguousCaller,
                format!(
                    "this process matches agents {}; name one with \"agent\"",
                    many.iter()
                        .map(|a| a.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    pub fn whoami(&self, caller: &Caller, wanted: Option<&str>) -> Result<WhoAmI, Problem> {
        let a = self.match_agent(caller, wanted)?;
        let s = &a.selectors;
        let selectors = [
            ("uid", s.uid.is_some()),
            ("gid", s.gid.is_some()),
            ("exe", s.exe.is_some()),
            ("exe_sha256", s.exe_sha256.is_some()),
            ("unit", s.unit.is_some()),
            ("cgroup", s.cgroup.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, on)| on.then_some(k))
        .collect();
        Ok(WhoAmI {
            selectors,
            policy: self.effective_policy(&a),
            name: a.name,
            id: a.id,
            status: a.status,
            key_id: a.kid,
        })
    }

    fn effective_policy(&self, a: &Agent) -> Value {
        let s = self.settings();
        json!({
            "audiences": a.policy.audiences,
            "scopes": a.policy.scopes,
            "max_ttl": format_duration(token_limit(a, &s)),
            "rate": a.policy.rate.unwrap_or(s.default_rate),
            // What a client needs to know to ask correctly (an SDK binds tokens on its own
            // when the policy requires it).
            "require_binding": a.policy.require_binding,
            "proof_key": a.policy.proof_key.as_deref().unwrap_or("hardware"),
            "tls_server": a.policy.tls_server,
            "x509_svid": a.policy.x509_svid.as_deref().unwrap_or("off"),
            "key": a.policy.key.as_deref().unwrap_or("p256"),
        })
    }

    /// Record an admin call a door refused (not root, not in the admin group); `details`
    /// names the problem, the method and who asked.
    pub async fn audit_refused_admin(&self, details: Value) {
        self.audit
            .record_or_log(
                Event::new("access.denied").details(details),
                "a refused admin call",
            )
            .await;
    }

    /// A device error while signing for `agent`: if the agent was revoked meanwhile (its key
    /// is gone), that is what the caller is told.
    pub(crate) fn signing_problem(&self, agent: &Agent, e: KeyStoreError) -> Problem {
        if !self.agents.may_release(agent) {
            return Problem::new(
                Kind::AgentRevoked,
                format!("agent {} was revoked", agent.name),
            );
        }
        keystore_problem(e)
    }

    /// Let a credential built for `agent` leave: under the issuance gate, check the agent is
    /// still active, then write the credential's audit record. A revocation that committed
    /// meanwhile wins (the credential is refused and never leaves); one that commits later
    /// finds this record already in the audit. No credential leaves without this returning Ok.
    pub(crate) async fn release(
        &self,
        caller: &Caller,
        agent: &Agent,
        ev: Event,
        what: &str,
    ) -> Result<(), Problem> {
        let refused = {
            if self.agents.killing() {
                // Not behind the gate, which the kill switch's transaction holds.
                let p = kill_switch_refusal(&agent.name);
                return Err(self
                    .deny(caller, Some(agent), p, json!({"credential": what}))
                    .await);
            }
            // Model steps (agents/lifecycle.pml): T2 gate read, T3 may_release, T4 the durable
            // record and release, T5 the gate dropped.
            let _gate = self.agents.issuance().await;
            if self.agents.may_release(agent) {
                return self.audit.record(ev).await.map(|_| ()).map_err(|e| {
                    Problem::new(Kind::AuditUnavailable, format!("{e}; no {what} was issued"))
                        .retry_after(5)
                });
            }
            let suspended = self
                .agents
                .live()
                .by_row(agent.row)
                .is_some_and(|a| a.status == Status::Suspended);
            let kind = if suspended {
                Kind::AgentSuspended
            } else {
                Kind::AgentRevoked
            };
            Problem::new(
                kind,
                format!(
                    "agent {} was revoked or suspended while its {what} was made; none was issued",
                    agent.name
                ),
            )
        };
        Err(self
            .deny(caller, Some(agent), refused, json!({"credential": what}))
            .await)
    }

    /// Record a refusal; a refusal stands even if the audit cannot take it.
    pub async fn deny(
        &self,
        caller: &Caller,
        agent: Option<&Agent>,
        p: Problem,
        req: Value,
    ) -> Problem {
        let mut ev = Event::new("access.denied")
            .caller(caller.record())
            .details(json!({
                "problem": p.kind.slug(),
                // The detail quotes what the client sent (an audience, a TTL): capped too.
                "reason": crate::audit::client_text(&p.detail),
                "request": crate::audit::client_value(&req),
            }));
        if let Some(a) = agent {
            ev = ev.agent(&a.name, &a.id);
        }
        self.audit_refusal(caller.uid, ev).await;
        p
    }

    /// Record a refusal of `uid`'s. Refusals are what anyone can cause: at most
    /// `refusal_audit_per_uid` a minute per uid are recorded one by one, the excess is counted
    /// and recorded as one collapsed record. A refusal stands even if the audit cannot take it.
    async fn audit_refusal(&self, uid: u32, ev: Event) {
        let (allowed, collapsed) = {
            let per_min = self.settings().refusal_audit_per_uid;
            let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            r.admit(uid, per_min, Instant::now())
        };
        if let Some(c) = collapsed {
            self.record_collapsed(uid, c).await;
        }
        if allowed {
            self.audit.record_or_log(ev, "a refusal").await;
        }
    }

    async fn record_collapsed(&self, uid: u32, c: Collapsed) {
        self.audit
            .record_or_log(
                Event::new("access.denied.collapsed").details(json!({
                    "uid": uid,
                    "count": c.count,
                    "first": rfc3339(c.first),
                    "last": rfc3339(c.last),
                    "note": "refusals over the per-uid audit rate, counted instead of recorded one by one",
                })),
                "collapsed refusals",
            )
            .await;
    }

    /// Record every pending collapsed refusal count (periodically and at stop).
    pub async fn flush_refusals(&self) {
        let pending = {
            let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            r.take_all()
        };
        for (uid, c) in pending {
            self.record_collapsed(uid, c).await;
        }
    }

    /// The whole token pipeline for an identified caller.
    pub async fn issue_token(
        &self,
        caller: &Caller,
        req: TokenRequest,
    ) -> Result<TokenResponse, Problem> {
        let req_summary = json!({"audience": req.audience, "scopes": req.scopes, "ttl": req.ttl, "agent": req.agent, "bind": req.bind});
        let agent = match self.match_agent(caller, req.agent.as_deref()) {
            Ok(a) => a,
            Err(p) => return Err(self.deny(caller, None, p, req_summary).await),
        };
        match self.check_policy(&agent, &req).and_then(|ttl| {
            let bind = proof::binding(&agent, req.bind.as_deref())?;
            if bind != proof::Bind::Mtls && req.x5t_s256.is_some() {
                return Err(Problem::new(
                    Kind::MalformedRequest,
                    "x5t#S256 goes with \"bind\": \"mtls\"",
                ));
            }
            let key = match bind {
                proof::Bind::Dpop => Some(self.proof_key_for_new(&agent)?),
                _ => None,
            };
            let cert = match bind {
                proof::Bind::Mtls => Some(self.bound_certificate(&agent, req.x5t_s256.as_deref())?),
                _ => None,
            };
            Ok((ttl, key, cert))
        }) {
            Ok((ttl, key, cert)) => {
                // A bound token never outlives the proof key (session keys rotate) or the
                // certificate it names.
                let now = crate::agents::now_unix();
                let end = key
                    .as_ref()
                    .and_then(|k| k.expires())
                    .or(cert.as_ref().map(|(_, not_after)| *not_after));
                // `exp` is counted from a clock read again when the token is made: leave a
                // second for it to tick.
                let ttl = match end {
                    Some(end) => ttl.min(Duration::from_secs((end - now - 1).max(1) as u64)),
                    None => ttl,
                };
                let jkt = key.as_ref().map(|k| k.kid().to_string());
                let cnf = match (&jkt, &cert) {
                    (Some(jkt), _) => Some(json!({ "jkt": jkt })),
                    (None, Some((x5t, _))) => Some(json!({ "x5t#S256": x5t })),
                    (None, None) => None,
                };
                let iss = self.settings().token_issuer();
                let issued = match self
                    .issuer
                    .jwt(&iss, &agent, &req.audience, &req.scopes, ttl.as_secs(), cnf)
                    .await
                {
                    Ok(t) => t,
                    Err(e) => return Err(self.signing_problem(&agent, e)),
                };
                let mut details = json!({
                    "jti": issued.jti,
                    "aud": req.audience,
                    "scope": req.scopes.join(" "),
                    "iat": issued.iat,
                    "exp": issued.exp,
                    "kid": agent.kid,
                });
                if let (Some(jkt), Some(k)) = (&jkt, &key) {
                    details["bind"] = json!("dpop");
                    details["cnf_jkt"] = json!(jkt);
                    details["proof_key"] = json!(if k.expires().is_some() {
                        "session"
                    } else {
                        "hardware"
                    });
                }
                if let Some((x5t, _)) = &cert {
                    details["bind"] = json!("mtls");
                    details["cnf_x5t#S256"] = json!(x5t);
                }
                let ev = Event::new("token.issued")
                    .agent(&agent.name, &agent.id)
                    .caller(caller.record())
                    .details(details);
                self.release(caller, &agent, ev, "token").await?;
                self.count_issued(&agent, "token", issued.iat);
                if let Some(jkt) = &jkt {
                    self.remember_bound(&issued.token, issued.exp, &agent, jkt);
                }
                Ok(TokenResponse {
                    token: issued.token,
                    token_type: if jkt.is_some() { "DPoP" } else { "Bearer" },
                    expires_at: rfc3339(issued.exp),
                    exp: issued.exp,
                })
            }
            Err(p) => Err(self.deny(caller, Some(&agent), p, req_summary).await),
        }
    }

    /// `bind: "mtls"`: the certificate named must be one this daemon issued to `agent` and
    /// not expired (a revoked agent gets no token at all). Returns its thumbprint and notAfter.
    pub(crate) fn bound_certificate(
        &self,
        agent: &Agent,
        x5t: Option<&str>,
    ) -> Result<(String, i64), Problem> {
        let x5t = x5t
            .filter(|t| t.len() == 43 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
            .ok_or_else(|| {
                Problem::new(
                    Kind::MalformedRequest,
                    "\"bind\": \"mtls\" needs \"x5t#S256\": the base64url SHA-256 of the certificate",
                )
            })?;
        if let Some((cert, _)) = self.session_certificate(agent, x5t) {
            return Ok((x5t.to_string(), cert.not_after));
        }
        let found = self
            .agents
            .certificate_by_thumbprint(x5t)
            .map_err(|e| Problem::new(Kind::Internal, e.to_string()))?;
        match found {
            Some((row, not_after)) if row == agent.row && not_after > crate::agents::now_unix() => {
                Ok((x5t.to_string(), not_after))
            }
            _ => Err(Problem::new(
                Kind::TokenNotAccepted,
                format!(
                    "x5t#S256 names no unexpired certificate issued to agent {}{}",
                    agent.name,
                    if proof::uses_session_key(agent) {
                        " (a session key's certificate ends with the key, at a restart, suspension or revocation)"
                    } else {
                        ""
                    }
                ),
            )),
        }
    }

    fn check_policy(&self, agent: &Agent, req: &TokenRequest) -> Result<Duration, Problem> {
        let cfg = self.settings();
        check_not_suspended(agent)?;
        if req.audience.len() > MAX_AUDIENCE {
            return Err(Problem::new(
                Kind::MalformedRequest,
                format!("audience is longer than {MAX_AUDIENCE} bytes"),
            ));
        }
        if !policy::audience_allowed(&agent.policy.audiences, &req.audience) {
            return Err(Problem::new(
                Kind::AudienceNotAllowed,
                format!(
                    "audience {:?} is not allowed for agent {}",
                    req.audience, agent.name
                ),
            ));
        }
        let bad = policy::scopes_not_allowed(&agent.policy.scopes, &req.scopes);
        if !bad.is_empty() {
            return Err(Problem::new(
                Kind::ScopeNotAllowed,
                format!(
                    "scopes not allowed for agent {}: {}",
                    agent.name,
                    bad.join(" ")
                ),
            ));
        }
        let requested = match &req.ttl {
            Some(t) => {
                Some(parse_duration(t).map_err(|e| Problem::new(Kind::MalformedRequest, e))?)
            }
            None => None,
        };
        let max = token_limit(agent, &cfg);
        let ttl =
            policy::credential_ttl(requested, cfg.tokens.default_ttl.0, max).map_err(|max| {
                Problem::new(
                    Kind::TtlNotAllowed,
                    format!(
                        "ttl must be between 1s and the maximum of {}",
                        format_duration(max)
                    ),
                )
            })?;
        self.check_rate(agent, &cfg)?;
        Ok(ttl)
    }

    /// One per-agent budget for every credential it is issued (tokens, certificates, evidence).
    pub(crate) fn check_rate(&self, agent: &Agent, cfg: &Settings) -> Result<(), Problem> {
        self.check_budget(agent, cfg, &agent.key_id, "credentials")
    }

    /// TLS server signatures have a budget of their own, of the same size: a server signs
    /// before its client has proved anything, so remote peers must not be able to spend the
    /// budget the agent's tokens and proofs live on.
    pub(crate) fn check_server_rate(&self, agent: &Agent, cfg: &Settings) -> Result<(), Problem> {
        self.check_budget(
            agent,
            cfg,
            &server_bucket(&agent.key_id),
            "TLS server signatures",
        )
    }

    fn check_budget(
        &self,
        agent: &Agent,
        cfg: &Settings,
        bucket: &str,
        what: &str,
    ) -> Result<(), Problem> {
        let rate = agent.policy.rate.unwrap_or(cfg.default_rate);
        let mut rl = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(wait) = rl.check(bucket, rate, Instant::now()) {
            return Err(Problem::new(
                Kind::RateLimited,
                format!("agent {} may get {rate} {what} per minute", agent.name),
            )
            .retry_after(wait.as_secs_f64().ceil() as u64));
        }
        Ok(())
    }

    /// Count a credential in the agent's issued counters.
    pub(crate) fn count_issued(&self, agent: &Agent, kind: &str, at: i64) {
        debug_assert!(crate::metrics::CREDENTIAL_TYPES.contains(&kind), "{kind}");
        self.activity.note(at);
        crate::metrics::issued(kind, &agent.name);
        let mut counts = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        let e = counts.entry(agent.row).or_insert((
            agent.issued_count,
            agent.last_issued_at.unwrap_or(0) as u64,
            false,
        ));
        *e = (e.0 + 1, at as u64, true);
    }

    /// (issued count, last issued at) of an agent: the counters of this process, else what
    /// its record holds (written by the last flush).
    pub fn issued(&self, agent: &Agent) -> (u64, u64) {
        if let Some((c, l, _)) = self
            .issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&agent.row)
        {
            return (*c, *l);
        }
        (agent.issued_count, agent.last_issued_at.unwrap_or(0) as u64)
    }

    /// Write changed issue counters to the registry.
    pub fn flush_counters(&self) -> Result<(), crate::agents::RegistryError> {
        let dirty: Vec<(i64, u64, u64)> = {
            let mut counts = self.issued.lock().unwrap_or_else(|p| p.into_inner());
            counts
                .iter_mut()
                .filter(|(_, v)| v.2)
                .map(|(row, v)| {
                    v.2 = false;
                    (*row, v.0, v.1)
                })
                .collect()
        };
        if !dirty.is_empty() {
            self.agents.set_issued(&dirty)?;
        }
        // Revoked agents' counters are written: forget them, or every enrolment ever made
        // stays in memory.
        let live = self.agents.live();
        self.issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|row, v| v.2 || live.by_row(*row).is_some());
        Ok(())
    }

    pub(crate) fn forget_rate(&self, key_id: &str) {
        let mut rl = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        rl.forget(key_id);
        rl.forget(&server_bucket(key_id));
    }

    /// RFC 7517 key set of every live agent key (a revoked key is gone at once).
    pub fn jwks(&self) -> Value {
        jwks_of(&self.agents)
    }
}

/// RFC 7517 key set of every live agent key.
fn jwks_of(agents: &Agents) -> Value {
    let keys: Vec<Value> = agents.live().iter().filter_map(|a| a.jwk.clone()).collect();
    json!({ "keys": keys })
}
