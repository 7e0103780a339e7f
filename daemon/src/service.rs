//! The request pipeline shared by every adapter (socket, D-Bus):
//! caller (kernel facts) → registry match → policy → issuer (signs in hardware) → audit → reply.
//! Adapters only translate transport to these calls and [`Problem`]s back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::audit::{Audit, Event};
use crate::caller::{self, Caller, CallerError, ExeHashCache, Peer};
use crate::config::{format_duration, parse_duration, Config};
use crate::issuer::Issuer;
use crate::keystore::{owner::KeyStoreHandle, KeyStoreError};
use crate::policy::{self, RateLimiter};
use crate::problem::{Kind, Problem};
use crate::registry::{Agent, Registry, RegistryError, Status};

/// What changed, for D-Bus signals and anyone else who listens.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    Enrolled(String),
    Revoked(String, String),
    Suspended(String),
    Resumed(String),
    Updated(String),
}

pub struct Service {
    pub(crate) cfg: RwLock<Arc<Config>>,
    /// `None` once [`Service::close`] has closed it at shutdown.
    registry: Mutex<Option<Registry>>,
    /// Live agents, re-read from the registry after every change (the hot path reads this).
    live: RwLock<Arc<Vec<Agent>>>,
    /// Revoked agents, newest first, re-read with `live`: a refused caller is told whether it
    /// was revoked without a registry query on every refusal.
    revoked: RwLock<Arc<Vec<Agent>>>,
    pub(crate) keystore: KeyStoreHandle,
    pub(crate) issuer: Issuer,
    /// The host CA, set by [`Service::init_host_ca`] at start.
    pub(crate) ca: RwLock<Option<Arc<crate::hostca::HostCa>>>,
    pub(crate) crl: RwLock<Option<Arc<crate::hostca::Crl>>>,
    /// Serialises CRL signing so a newer CRL is never replaced by an older one.
    pub(crate) crl_lock: tokio::sync::Mutex<()>,
    /// A revocation whose CRL could not be signed yet.
    pub(crate) crl_stale: std::sync::atomic::AtomicBool,
    pub(crate) audit: Audit,
    rate: Mutex<RateLimiter>,
    /// Per-agent (issued count, last issued at), kept in memory on the hot path and written to
    /// the registry by [`Service::flush_counters`]; the audit trail is the authoritative record.
    issued: Mutex<HashMap<i64, (u64, u64, bool)>>,
    exe_cache: ExeHashCache,
    /// Serialises enrolment, revocation and reconciliation.
    pub(crate) admin: tokio::sync::Mutex<()>,
    pub events: broadcast::Sender<AgentEvent>,
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
}

pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

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

impl Service {
    pub fn new(
        cfg: Config,
        registry: Registry,
        keystore: KeyStoreHandle,
        audit: Audit,
    ) -> Result<Arc<Service>, RegistryError> {
        let live = registry.live()?;
        let revoked = registry.revoked()?;
        let (events, _) = broadcast::channel(256);
        Ok(Arc::new(Service {
            cfg: RwLock::new(Arc::new(cfg)),
            registry: Mutex::new(Some(registry)),
            live: RwLock::new(Arc::new(live)),
            revoked: RwLock::new(Arc::new(revoked)),
            issuer: Issuer::new(keystore.clone()),
            keystore,
            ca: RwLock::new(None),
            crl: RwLock::new(None),
            crl_lock: tokio::sync::Mutex::new(()),
            crl_stale: std::sync::atomic::AtomicBool::new(false),
            audit,
            rate: Mutex::new(RateLimiter::default()),
            issued: Mutex::new(HashMap::new()),
            exe_cache: ExeHashCache::default(),
            admin: tokio::sync::Mutex::new(()),
            events,
        }))
    }

    pub fn config(&self) -> Arc<Config> {
        self.cfg
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub(crate) fn with_registry<T>(
        &self,
        f: impl FnOnce(&mut Registry) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let mut guard = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_mut() {
            Some(r) => f(r),
            None => Err(RegistryError::Closed),
        }
    }

    /// The last steps of a stop, after every door has closed and `daemon.stopped` is
    /// recorded: close the key store on its own thread and join it (TPM objects flushed,
    /// PKCS#11 session closed, `C_Finalize`, module unloaded), then the audit writer, then
    /// the registry. Nothing of a device is left to be torn down by process exit.
    pub async fn close(&self) {
        self.keystore.shutdown().await;
        self.audit.close().await;
        let reg = self
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(reg);
    }

    /// Re-read live agents after a change.
    pub(crate) fn refresh(&self) -> Result<(), RegistryError> {
        let (live, revoked) = self.with_registry(|r| Ok((r.live()?, r.revoked()?)))?;
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(live);
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(revoked);
        Ok(())
    }

    pub fn live_agents(&self) -> Arc<Vec<Agent>> {
        self.live
            .read()
            .map(|l| l.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn backend_name(&self) -> &'static str {
        self.keystore.backend().as_str()
    }

    /// Kernel facts about `peer`, read off the reactor.
    pub async fn identify(self: &Arc<Self>, peer: Arc<Peer>) -> Result<Caller, Problem> {
        let me = self.clone();
        let res = tokio::task::spawn_blocking(move || caller::identify(&peer, &me.exe_cache))
            .await
            .map_err(|e| Problem::new(Kind::Internal, e.to_string()))?;
        res.map_err(|e| match e {
            CallerError::Gone(pid) => Problem::new(
                Kind::CallerGone,
                format!("process {pid} exited before it could be identified"),
            ),
            other => Problem::new(Kind::UnknownCaller, other.to_string()),
        })
    }

    /// Which agent this caller is. `wanted` names one when several match.
    pub fn match_agent(&self, caller: &Caller, wanted: Option<&str>) -> Result<Agent, Problem> {
        let live = self.live_agents();
        let matching: Vec<&Agent> = live
            .iter()
            .filter(|a| a.selectors.matches(caller))
            .filter(|a| wanted.is_none_or(|w| a.name == w))
            .collect();
        match matching.as_slice() {
            [one] => Ok((*one).clone()),
            [] => {
                // Tell a revoked agent that it is revoked, not that it is unknown.
                let revoked = self
                    .revoked
                    .read()
                    .map(|r| r.clone())
                    .unwrap_or_else(|p| p.into_inner().clone());
                let hit = revoked
                    .iter()
                    .find(|a| a.selectors.matches(caller) && wanted.is_none_or(|w| a.name == w));
                match hit {
                    Some(a) => Err(Problem::new(
                        Kind::AgentRevoked,
                        format!(
                            "agent {} was revoked: {}",
                            a.name,
                            a.revoke_reason.as_deref().unwrap_or_default()
                        ),
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
        Ok(WhoAmI {
            policy: self.effective_policy(&a),
            name: a.name,
            id: a.id,
            status: a.status,
            key_id: a.kid,
        })
    }

    fn effective_policy(&self, a: &Agent) -> Value {
        let cfg = self.config();
        json!({
            "audiences": a.policy.audiences,
            "scopes": a.policy.scopes,
            "max_ttl": format_duration(a.policy.max_ttl.map(|d| d.0).unwrap_or(cfg.tokens.max_ttl.0)),
            "rate": a.policy.rate.unwrap_or(cfg.limits.default_rate),
        })
    }

    /// Record a refusal; a refusal stands even if the audit cannot take it.
    pub async fn deny(
        &self,
        caller: &Caller,
        agent: Option<&Agent>,
        p: Problem,
        req: Value,
    ) -> Problem {
        let mut ev = Event::new("access.denied").caller(caller).details(json!({
            "problem": p.kind.slug(),
            "reason": p.detail,
            "request": req,
        }));
        if let Some(a) = agent {
            ev = ev.agent(&a.name, &a.id);
        }
        if let Err(e) = self.audit.record(ev).await {
            tracing::error!(error = %e, "could not audit a refusal");
        }
        p
    }

    /// The whole token pipeline for an identified caller.
    pub async fn issue_token(
        &self,
        caller: &Caller,
        req: TokenRequest,
    ) -> Result<TokenResponse, Problem> {
        let req_summary = json!({"audience": req.audience, "scopes": req.scopes, "ttl": req.ttl, "agent": req.agent});
        let agent = match self.match_agent(caller, req.agent.as_deref()) {
            Ok(a) => a,
            Err(p) => return Err(self.deny(caller, None, p, req_summary).await),
        };
        match self.check_policy(&agent, &req) {
            Ok(ttl) => {
                let cfg = self.config();
                let issued = match self
                    .issuer
                    .jwt(
                        &cfg.host_id(),
                        &agent,
                        &req.audience,
                        &req.scopes,
                        ttl.as_secs(),
                    )
                    .await
                {
                    Ok(t) => t,
                    Err(e) => return Err(keystore_problem(e)),
                };
                let ev = Event::new("token.issued")
                    .agent(&agent.name, &agent.id)
                    .caller(caller)
                    .details(json!({
                        "jti": issued.jti,
                        "aud": req.audience,
                        "scope": req.scopes.join(" "),
                        "iat": issued.iat,
                        "exp": issued.exp,
                        "kid": agent.kid,
                    }));
                // No credential leaves without its durable record.
                if let Err(e) = self.audit.record(ev).await {
                    return Err(Problem::new(
                        Kind::AuditUnavailable,
                        format!("{e}; no token was issued"),
                    )
                    .retry_after(5));
                }
                self.count_issued(&agent, issued.iat);
                Ok(TokenResponse {
                    token: issued.token,
                    token_type: "Bearer",
                    expires_at: rfc3339(issued.exp),
                    exp: issued.exp,
                })
            }
            Err(p) => Err(self.deny(caller, Some(&agent), p, req_summary).await),
        }
    }

    fn check_policy(&self, agent: &Agent, req: &TokenRequest) -> Result<Duration, Problem> {
        let cfg = self.config();
        check_not_suspended(agent)?;
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
        let max = agent
            .policy
            .max_ttl
            .map(|d| d.0)
            .unwrap_or(cfg.tokens.max_ttl.0);
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
    pub(crate) fn check_rate(&self, agent: &Agent, cfg: &Config) -> Result<(), Problem> {
        let rate = agent.policy.rate.unwrap_or(cfg.limits.default_rate);
        let mut rl = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(wait) = rl.check(&agent.key_id, rate, Instant::now()) {
            return Err(Problem::new(
                Kind::RateLimited,
                format!("agent {} may get {rate} credentials per minute", agent.name),
            )
            .retry_after(wait.as_secs_f64().ceil() as u64));
        }
        Ok(())
    }

    /// Count a credential in the agent's issued counters.
    pub(crate) fn count_issued(&self, agent: &Agent, at: i64) {
        let mut counts = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        let e = counts.entry(agent.row).or_insert((
            agent.issued_count,
            agent.last_issued_at.unwrap_or(0) as u64,
            false,
        ));
        *e = (e.0 + 1, at as u64, true);
    }

    /// (issued count, last issued at) of an agent record.
    pub fn issued(&self, row: i64) -> (u64, u64) {
        if let Some((c, l, _)) = self
            .issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&row)
        {
            return (*c, *l);
        }
        self.live_agents()
            .iter()
            .find(|a| a.row == row)
            .map(|a| (a.issued_count, a.last_issued_at.unwrap_or(0) as u64))
            .unwrap_or((0, 0))
    }

    /// Write changed issue counters to the registry.
    pub fn flush_counters(&self) -> Result<(), RegistryError> {
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
        if dirty.is_empty() {
            return Ok(());
        }
        self.with_registry(|r| {
            for (row, count, last) in &dirty {
                r.set_issued(*row, *count, *last as i64)?;
            }
            Ok(())
        })
    }

    pub(crate) fn forget_rate(&self, key_id: &str) {
        self.rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(key_id);
    }

    /// RFC 7517 key set of every live agent key (a revoked key is gone at once).
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .live_agents()
            .iter()
            .filter_map(|a| a.jwk.clone())
            .collect();
        json!({ "keys": keys })
    }
}
