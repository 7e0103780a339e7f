//! Agent credentials beyond tokens, through the same pipeline (caller → registry → policy →
//! issuer → audit): X.509 agent certificates from the host CA and key attestation evidence.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use p256::pkcs8::{EncodePublicKey, LineEnding};
use serde_json::{json, Value};

use crate::audit::Event;
use crate::caller::Caller;
use crate::config::{format_duration, parse_duration};
use crate::hostca::HostCaError;
use crate::issuer::IssueError;
use crate::keystore::{KeyEvidence, MAX_NONCE};
use crate::policy;
use crate::problem::{Kind, Problem};
use crate::registry::{Agent, RegistryError};
use crate::service::{check_not_suspended, keystore_problem, rfc3339, Service};
use crate::x509;
use tessera::attestation::key_from_jwk;

/// Smallest nonce accepted: a relying party's nonce must be unpredictable to mean anything.
pub const MIN_NONCE: usize = 8;
/// Shortest agent certificate.
const MIN_CERT_TTL: Duration = Duration::from_secs(60);

fn hostca_problem(e: HostCaError) -> Problem {
    match e {
        HostCaError::KeyStore(k) | HostCaError::Issue(IssueError::KeyStore(k)) => {
            keystore_problem(k)
        }
        other => {
            tracing::error!(error = %other, "host CA failure");
            Problem::new(Kind::Internal, other.to_string())
        }
    }
}

impl Service {
    /// Agent lifetime limit for certificates: policy `max_cert_ttl`, else its token `max_ttl`.
    fn cert_limit(&self, agent: &Agent) -> Duration {
        let cfg = self.config();
        agent
            .policy
            .max_cert_ttl
            .or(agent.policy.max_ttl)
            .map(|d| d.0)
            .unwrap_or(cfg.tokens.max_ttl.0)
    }

    fn cert_ttl(&self, agent: &Agent, requested: Option<&str>) -> Result<Duration, Problem> {
        let limit = self.cert_limit(agent);
        let requested = requested
            .map(parse_duration)
            .transpose()
            .map_err(|e| Problem::new(Kind::MalformedRequest, e))?;
        let default = self.config().certificates.default_ttl.0;
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
    fn may_issue(&self, agent: &Agent) -> Result<(), Problem> {
        check_not_suspended(agent)?;
        self.check_rate(agent, &self.config())
    }

    /// A short-lived X.509 certificate for the caller's hardware key, signed by the host CA:
    /// PEM, the agent certificate, then the host CA (and intermediates).
    pub async fn issue_certificate(
        &self,
        caller: &Caller,
        wanted: Option<&str>,
        ttl: Option<&str>,
    ) -> Result<String, Problem> {
        let summary = json!({"credential": "certificate", "agent": wanted, "ttl": ttl});
        let agent = match self.match_agent(caller, wanted) {
            Ok(a) => a,
            Err(p) => return Err(self.deny(caller, None, p, summary).await),
        };
        let ttl = match self
            .cert_ttl(&agent, ttl)
            .and_then(|t| self.may_issue(&agent).map(|_| t))
        {
            Ok(t) => t,
            Err(p) => return Err(self.deny(caller, Some(&agent), p, summary).await),
        };
        let ca = self.host_ca().map_err(hostca_problem)?;
        // The public key the device gave at enrolment, kept in the registry as the agent's JWK
        // (no device round trip per certificate).
        let key = agent
            .jwk
            .as_ref()
            .ok_or_else(|| "agent has no public key on record".to_string())
            .and_then(|j| key_from_jwk(j).map_err(|e| e.to_string()))
            .map_err(|e| Problem::new(Kind::Internal, format!("agent {}: {e}", agent.name)))?;
        let now = x509::now_unix();
        let not_after = (now + ttl.as_secs() as i64).min(ca.not_after);
        if not_after <= now {
            return Err(Problem::new(
                Kind::BackendUnavailable,
                "the host CA certificate has expired; install a new one (tessera host install-cert)",
            )
            .retry_after(60));
        }
        let tbs = x509::agent_tbs(&x509::AgentCertSpec {
            issuer: &ca.subject,
            issuer_key_id: &ca.key_identifier,
            agent_name: &agent.name,
            spiffe_id: &agent.id,
            key: &key,
            not_before: now,
            not_after,
        })
        .map_err(|e| Problem::new(Kind::Internal, e.to_string()))?;
        let serial = x509::serial_hex(&tbs.serial_number);
        let cert = self
            .issuer
            .certificate(&ca.key_id, tbs)
            .await
            .map_err(|e| hostca_problem(e.into()))?;
        // Recorded only while the agent is live, so a racing revocation's CRL includes it.
        match self.with_registry(|r| r.record_certificate(&agent, &serial, not_after)) {
            Ok(()) => {}
            Err(RegistryError::NotLive(name)) => {
                return Err(Problem::new(
                    Kind::AgentRevoked,
                    format!("agent {name} was revoked"),
                ))
            }
            Err(e) => return Err(Problem::new(Kind::Internal, e.to_string())),
        }
        let ev = Event::new("certificate.issued")
            .agent(&agent.name, &agent.id)
            .caller(caller)
            .details(json!({
                "serial": serial,
                "not_before": now,
                "not_after": not_after,
                "kid": agent.kid,
                "issuer": ca.subject.to_string(),
            }));
        if let Err(e) = self.audit.record(ev).await {
            return Err(Problem::new(
                Kind::AuditUnavailable,
                format!("{e}; no certificate was issued"),
            )
            .retry_after(5));
        }
        self.count_issued(&agent, now);
        let mut chain_pem =
            x509::to_pem(&cert).map_err(|e| Problem::new(Kind::Internal, e.to_string()))?;
        chain_pem.push_str(&ca.chain_pem);
        Ok(chain_pem)
    }

    /// Key attestation evidence for the caller's key, bound to the relying party's nonce.
    pub async fn attestation(
        &self,
        caller: &Caller,
        wanted: Option<&str>,
        nonce_hex: Option<&str>,
    ) -> Result<Value, Problem> {
        let summary = json!({"credential": "attestation", "agent": wanted, "nonce": nonce_hex});
        let nonce = match parse_nonce(nonce_hex) {
            Ok(n) => n,
            Err(p) => return Err(self.deny(caller, None, p, summary).await),
        };
        let agent = match self.match_agent(caller, wanted) {
            Ok(a) => a,
            Err(p) => return Err(self.deny(caller, None, p, summary).await),
        };
        if let Err(p) = self.may_issue(&agent) {
            return Err(self.deny(caller, Some(&agent), p, summary).await);
        }
        let evidence = self
            .issuer
            .evidence(&agent, &nonce)
            .await
            .map_err(keystore_problem)?;
        let nonce_hex = hex::encode(&nonce);
        let mut body = match evidence {
            KeyEvidence::Tpm(t) => {
                let ak_pem = t
                    .ak_public
                    .to_public_key_pem(LineEnding::LF)
                    .map_err(|e| Problem::new(Kind::Internal, e.to_string()))?;
                let ek: Vec<String> = t
                    .ek_certificates
                    .iter()
                    .filter_map(|der| {
                        x509_cert::der::pem::encode_string(
                            "CERTIFICATE",
                            x509_cert::der::pem::LineEnding::LF,
                            der,
                        )
                        .ok()
                    })
                    .collect();
                json!({
                    "format": "tpm2-certify",
                    "nonce": nonce_hex,
                    "attest": B64.encode(&t.attest),
                    "signature": B64.encode(t.signature.to_der().as_bytes()),
                    "ak_public": ak_pem,
                    "key_public": B64.encode(&t.key_public),
                    "ek_certificates": ek,
                })
            }
            KeyEvidence::Pkcs11Attributes(attrs) => {
                let map: serde_json::Map<String, Value> = attrs
                    .into_iter()
                    .map(|(k, v)| (k, Value::Bool(v)))
                    .collect();
                json!({
                    "format": "pkcs11-attributes",
                    "hardware_evidence": false,
                    "note": "PKCS#11 has no key attestation: these are the token's own answers about the key, not signed evidence",
                    "nonce": nonce_hex,
                    "attributes": map,
                })
            }
        };
        body["agent"] = json!(agent.name);
        body["id"] = json!(agent.id);
        body["kid"] = json!(agent.kid);
        let now = x509::now_unix();
        body["issued_at"] = json!(rfc3339(now));
        let ev = Event::new("attestation.issued")
            .agent(&agent.name, &agent.id)
            .caller(caller)
            .details(json!({"format": body["format"], "nonce": nonce_hex, "kid": agent.kid}));
        if let Err(e) = self.audit.record(ev).await {
            return Err(Problem::new(
                Kind::AuditUnavailable,
                format!("{e}; no evidence was issued"),
            )
            .retry_after(5));
        }
        Ok(body)
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

fn parse_nonce(nonce_hex: Option<&str>) -> Result<Vec<u8>, Problem> {
    let bad = |why: String| Problem::new(Kind::MalformedRequest, why);
    let hex_str = nonce_hex.ok_or_else(|| bad("query parameter nonce (hex) is required".into()))?;
    let nonce = hex::decode(hex_str).map_err(|e| bad(format!("nonce is not hex: {e}")))?;
    if nonce.len() < MIN_NONCE || nonce.len() > MAX_NONCE {
        return Err(bad(format!(
            "nonce must be {MIN_NONCE} to {MAX_NONCE} bytes ({} to {} hex digits)",
            MIN_NONCE * 2,
            MAX_NONCE * 2
        )));
    }
    Ok(nonce)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_checked() {
        assert!(parse_nonce(None).is_err());
        assert!(parse_nonce(Some("zz")).is_err());
        assert!(parse_nonce(Some("00")).is_err());
        assert!(parse_nonce(Some(&"ab".repeat(65))).is_err());
        assert_eq!(parse_nonce(Some(&"ab".repeat(32))).unwrap().len(), 32);
    }
}
