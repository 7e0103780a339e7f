//! X.509 agent certificates from the host CA, through the same pipeline as tokens (caller →
//! agent → policy → issuer → audit), plus the bundle and CRL a relying party fetches.

use std::time::Duration;

use serde_json::json;

use crate::agents::policy;
use crate::agents::{Agent, RegistryError};
use crate::audit::Event;
use crate::caller::Caller;
use crate::credentials::hostca::HostCaError;
use crate::credentials::problem::{Kind, Problem};
use crate::credentials::proof::uses_session_key;
use crate::credentials::x509;
use crate::credentials::{check_not_suspended, keystore_problem, Credentials};
use crate::duration::{format_duration, parse_duration};
use tessera::attestation::key_from_jwk;

/// Whose key a certificate certifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    /// The agent's device key.
    Hardware,
    /// The agent's in-memory session key (`?key=session`, policy `proof_key = "session"`).
    Session,
    /// A key the daemon made in software and handed out (Workload API X.509-SVIDs).
    Software,
}

impl KeyKind {
    fn policy(self) -> tessera::key_policy::KeyKind {
        match self {
            KeyKind::Hardware => tessera::key_policy::KeyKind::Hardware,
            KeyKind::Session | KeyKind::Software => tessera::key_policy::KeyKind::Software,
        }
    }
}

/// Certificates issued for session keys, per agent: the key signs for its certificate while
/// both live. Memory only, like the keys: after a restart they are gone together. At most
/// [`SESSION_CERTS_PER_AGENT`] per agent (the oldest goes first: an agent presents the newest),
/// so an agent asking in a loop costs a bounded, per-agent amount.
#[derive(Default)]
pub(crate) struct SessionCerts {
    by_agent: std::collections::HashMap<i64, std::collections::VecDeque<SessionCert>>,
}

const SESSION_CERTS_PER_AGENT: usize = 16;

#[derive(Clone)]
pub(crate) struct SessionCert {
    pub x5t: String,
    /// Thumbprint of the session key.
    pub kid: String,
    pub not_after: i64,
}

impl SessionCerts {
    fn insert(&mut self, agent_row: i64, cert: SessionCert, now: i64) {
        let certs = self.by_agent.entry(agent_row).or_default();
        certs.retain(|c| c.not_after > now);
        if certs.len() >= SESSION_CERTS_PER_AGENT {
            certs.pop_front();
        }
        certs.push_back(cert);
    }

    pub fn get(&self, agent_row: i64, x5t: &str, now: i64) -> Option<SessionCert> {
        self.by_agent
            .get(&agent_row)?
            .iter()
            .find(|c| c.x5t == x5t && c.not_after > now)
            .cloned()
    }

    /// Keep the certificates of the agents `keep` names (after a revocation, suspension or
    /// policy change, the others' keys are gone or may not sign).
    pub fn retain_agents(&mut self, keep: impl Fn(i64) -> bool) {
        self.by_agent.retain(|row, _| keep(*row));
    }
}

/// A certificate just issued, with the CA that signed it.
pub(crate) struct Certified {
    pub cert: x509_cert::Certificate,
    pub der: Vec<u8>,
    /// `x5t#S256` of `der`.
    pub x5t: String,
    pub not_before: i64,
    pub not_after: i64,
    pub ca: std::sync::Arc<crate::credentials::hostca::HostCa>,
}

/// Shortest agent certificate.
const MIN_CERT_TTL: Duration = Duration::from_secs(60);

pub(crate) fn hostca_problem(e: HostCaError) -> Problem {
    match e {
        HostCaError::KeyStore(k)
        | HostCaError::Issue(crate::credentials::issuer::IssueError::KeyStore(k)) => {
            keystore_problem(k)
        }
        other => {
            tracing::error!(error = %other, "host CA failure");
            Problem::new(Kind::Internal, other.to_string())
        }
    }
}

fn chain_pem(c: &Certified) -> Result<String, Problem> {
    let mut pem = x509::to_pem(&c.cert).map_err(|e| Problem::new(Kind::Internal, e.to_string()))?;
    pem.push_str(&c.ca.chain_pem);
    Ok(pem)
}

impl Credentials {
    /// Agent lifetime limit for certificates: policy `max_cert_ttl`, else its token `max_ttl`,
    /// at most `certificates.max_ttl`.
    pub(crate) fn cert_limit(&self, agent: &Agent) -> Duration {
        let cfg = self.settings();
        let limit = agent
            .policy
            .max_cert_ttl
            .or(agent.policy.max_ttl)
            .map(|d| d.0)
            .unwrap_or(cfg.tokens.max_ttl.0);
        // The daemon's ceiling as it is now applies to agents enrolled before it was lowered.
        limit.min(cfg.certificates.max_ttl.0)
    }

    fn cert_ttl(&self, agent: &Agent, requested: Option<&str>) -> Result<Duration, Problem> {
        let limit = self.cert_limit(agent);
        let requested = requested
            .map(parse_duration)
            .transpose()
            .map_err(|e| Problem::new(Kind::MalformedRequest, e))?;
        let default = self.settings().certificates.default_ttl.0;
        policy::credential_ttl(requested, default, limit)
            .ok()
            .filter(|t| requested.is_none() || *t >= MIN_CERT_TTL)
            .ok_or_else(|| {
                Problem::new(
                    Kind::TtlNotAllowed,
                    format!(
                        "certificate ttl must be between 1m and the agent's maximum of {}",
                        format_duration(limit)
                    ),
                )
            })
    }

    /// Status and rate checks every credential shares.
    pub(crate) fn may_issue(&self, agent: &Agent) -> Result<(), Problem> {
        check_not_suspended(agent)?;
        self.check_rate(agent, &self.settings())
    }

    /// A short-lived X.509 certificate signed by the host CA for the caller's hardware key, or
    /// with `key = "session"` for its current session key: PEM, the agent certificate, then
    /// the host CA (and intermediates).
    pub async fn issue_certificate(
        &self,
        caller: &Caller,
        wanted: Option<&str>,
        ttl: Option<&str>,
        key: Option<&str>,
    ) -> Result<String, Problem> {
        let summary = json!({"credential": "certificate", "agent": wanted, "ttl": ttl, "key": key});
        let agent = match self.match_agent(caller, wanted) {
            Ok(a) => a,
            Err(p) => return Err(self.deny(caller, None, p, summary).await),
        };
        if let Err(p) = crate::credentials::p256_only(&agent, "certificates") {
            return Err(self.deny(caller, Some(&agent), p, summary).await);
        }
        let session = match key {
            None | Some("identity") => false,
            Some("session") if uses_session_key(&agent) => true,
            Some("session") => {
                let p = Problem::new(
                    Kind::MalformedRequest,
                    format!(
                        "agent {} has no session key (its policy does not say proof_key = \"session\")",
                        agent.name
                    ),
                );
                return Err(self.deny(caller, Some(&agent), p, summary).await);
            }
            Some(_) => {
                let p = Problem::new(Kind::MalformedRequest, "key is \"identity\" or \"session\"");
                return Err(self.deny(caller, Some(&agent), p, summary).await);
            }
        };
        let ttl = match self
            .cert_ttl(&agent, ttl)
            .and_then(|t| self.may_issue(&agent).map(|_| t))
        {
            Ok(t) => t,
            Err(p) => return Err(self.deny(caller, Some(&agent), p, summary).await),
        };
        if session {
            return self
                .issue_session_certificate(caller, &agent, ttl, summary)
                .await;
        }
        // The public key the device gave at enrolment, kept in the registry as the agent's JWK
        // (no device round trip per certificate).
        let key = agent
            .jwk
            .as_ref()
            .ok_or_else(|| "agent has no public key on record".to_string())
            .and_then(|j| key_from_jwk(j).map_err(|e| e.to_string()))
            .map_err(|e| Problem::new(Kind::Internal, format!("agent {}: {e}", agent.name)))?;
        let c = self
            .certify(
                caller,
                &agent,
                &key,
                ttl,
                None,
                KeyKind::Hardware,
                json!({"kid": agent.kid}),
            )
            .await?;
        chain_pem(&c)
    }

    /// `?key=session`: the session key is made or rotated as for a bound token, and the
    /// certificate ends no later than the key.
    async fn issue_session_certificate(
        &self,
        caller: &Caller,
        agent: &Agent,
        ttl: Duration,
        summary: serde_json::Value,
    ) -> Result<String, Problem> {
        let key = match self.proof_key_for_new(agent) {
            Ok(crate::credentials::proof::ProofKey::Session(k)) => k,
            Ok(_) => {
                let p = Problem::new(Kind::Internal, "the policy's session key is not one");
                return Err(self.deny(caller, Some(agent), p, summary).await);
            }
            Err(p) => return Err(self.deny(caller, Some(agent), p, summary).await),
        };
        let c = self
            .certify(
                caller,
                agent,
                &key.verifying_key(),
                ttl,
                Some(key.expires),
                KeyKind::Session,
                json!({"key": "session", "proof_kid": key.kid}),
            )
            .await?;
        self.session_certs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                agent.row,
                SessionCert {
                    x5t: c.x5t.clone(),
                    kid: key.kid.clone(),
                    not_after: c.not_after,
                },
                x509::now_unix(),
            );
        chain_pem(&c)
    }

    /// Certify `key` for `agent` with the host CA for `ttl` (cut at the CA's end and at
    /// `until`, the end of a session key), record the certificate so a revocation's CRL lists
    /// it, audit `certificate.issued` (with `details` added) and let it leave only if the agent
    /// is still live.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn certify(
        &self,
        caller: &Caller,
        agent: &Agent,
        key: &p256::ecdsa::VerifyingKey,
        ttl: Duration,
        until: Option<i64>,
        kind: KeyKind,
        details: serde_json::Value,
    ) -> Result<Certified, Problem> {
        let ca = self.host_ca().map_err(hostca_problem)?;
        let now = x509::now_unix();
        if ca.not_after <= now {
            return Err(Problem::new(
                Kind::BackendUnavailable,
                "the host CA certificate has expired; install a new one (tessera host install-cert)",
            )
            .retry_after(60));
        }
        let not_after = (now + ttl.as_secs() as i64)
            .min(ca.not_after)
            .min(until.unwrap_or(i64::MAX));
        if not_after <= now {
            return Err(Problem::new(
                Kind::BackendUnavailable,
                "the session key expires now; ask again for its successor",
            )
            .retry_after(1));
        }
        let tbs = x509::agent_tbs(&x509::AgentCertSpec {
            issuer: &ca.subject,
            issuer_key_id: &ca.key_identifier,
            agent_name: &agent.name,
            spiffe_id: &agent.id,
            key,
            not_before: now,
            not_after,
            // The daemon signs server handshakes only with tls_server; a software SVID's key is
            // the workload's, which serves as it likes, and SPIFFE X509-SVIDs with an EKU carry
            // both usages.
            server_auth: agent.policy.tls_server || kind == KeyKind::Software,
            key_kind: kind.policy(),
        })
        .map_err(|e| Problem::new(Kind::Internal, e.to_string()))?;
        let serial = x509::serial_hex(&tbs.serial_number);
        let cert = self
            .issuer
            .certificate(&ca.key_id, tbs)
            .await
            .map_err(|e| hostca_problem(e.into()))?;
        let der = x509_cert::der::Encode::to_der(&cert)
            .map_err(|e| Problem::new(Kind::Internal, e.to_string()))?;
        let x5t = tessera::verify::x5t_s256(&der);
        // Recorded only while the agent is live, so a racing revocation's CRL includes it. A
        // software or session key's certificate is on the CRL like any other, but is not named
        // in the registry: the daemon does not hold a software key, and a session key's
        // certificate is known in memory only, where the key is.
        let named = (kind == KeyKind::Hardware).then_some(x5t.as_str());
        match self
            .agents
            .record_certificate(agent, &serial, not_after, named)
        {
            Ok(()) => {}
            Err(RegistryError::NotLive(name)) => {
                return Err(Problem::new(
                    Kind::AgentRevoked,
                    format!("agent {name} was revoked"),
                ))
            }
            Err(e) => return Err(Problem::new(Kind::Internal, e.to_string())),
        }
        let mut d = json!({
            "serial": serial,
            "x5t#S256": x5t,
            "not_before": now,
            "not_after": not_after,
            "issuer": ca.subject.to_string(),
        });
        if let (Some(d), serde_json::Value::Object(extra)) = (d.as_object_mut(), details) {
            d.extend(extra);
        }
        let ev = Event::new("certificate.issued")
            .agent(&agent.name, &agent.id)
            .caller(caller.record())
            .details(d);
        self.release(caller, agent, ev, "certificate").await?;
        self.count_issued(agent, "certificate", now);
        Ok(Certified {
            cert,
            der,
            x5t,
            not_before: now,
            not_after,
            ca,
        })
    }

    /// A session-key certificate this agent may sign TLS with: issued to it, unexpired, its
    /// key still live.
    pub(crate) fn session_certificate(
        &self,
        agent: &Agent,
        x5t: &str,
    ) -> Option<(
        SessionCert,
        std::sync::Arc<crate::keystore::session::SessionKey>,
    )> {
        let now = x509::now_unix();
        if !uses_session_key(agent) {
            return None;
        }
        let cert = self
            .session_certs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(agent.row, x5t, now)?;
        let key = self.keystore.sessions().find(agent.row, &cert.kid, now)?;
        Some((cert, key))
    }

    pub fn bundle_pem(&self) -> Result<String, Problem> {
        Ok(self.host_ca().map_err(hostca_problem)?.bundle_pem.clone())
    }

    pub async fn crl_pem(&self) -> Result<String, Problem> {
        Ok(self
            .current_crl()
            .await
            .map_err(hostca_problem)?
            .pem
            .clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(x5t: &str, not_after: i64) -> SessionCert {
        SessionCert {
            x5t: x5t.into(),
            kid: "k".into(),
            not_after,
        }
    }

    /// Session certificates are found only for their own agent and until they end, and an
    /// agent asking in a loop keeps at most the newest `SESSION_CERTS_PER_AGENT`.
    #[test]
    fn session_certificates_are_per_agent_bounded_and_expire() {
        let mut s = SessionCerts::default();
        s.insert(1, cert("a", 200), 100);
        assert!(s.get(1, "a", 150).is_some());
        assert!(s.get(2, "a", 150).is_none(), "another agent's");
        assert!(s.get(1, "a", 200).is_none(), "ended");
        for i in 0..(SESSION_CERTS_PER_AGENT + 4) {
            s.insert(1, cert(&format!("c{i}"), 1000), 100);
        }
        assert_eq!(s.by_agent[&1].len(), SESSION_CERTS_PER_AGENT);
        assert!(s.get(1, "a", 150).is_none(), "the oldest went first");
        assert!(s.get(1, "c0", 150).is_none());
        assert!(s
            .get(1, &format!("c{}", SESSION_CERTS_PER_AGENT + 3), 150)
            .is_some());
        // An expired one is pruned at the next insert.
        s.insert(3, cert("old", 110), 100);
        s.insert(3, cert("new", 1000), 120);
        assert_eq!(s.by_agent[&3].len(), 1);
        s.retain_agents(|row| row == 3);
        assert!(s.get(1, "c19", 150).is_none() && s.get(3, "new", 150).is_some());
    }
}
