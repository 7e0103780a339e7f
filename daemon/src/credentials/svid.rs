//! SPIFFE SVIDs and bundles, for the Workload API door: JWT-SVIDs through the same policy
//! check, hardware signature and audit as `/v1/token`; JWT-SVID validation against the live
//! bundle; the JWT and X.509 bundles; and the signal that tells open streams the bundles moved.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde_json::{json, Value};
use x509_cert::der::Encode;
use zeroize::Zeroizing;

use super::problem::{Kind, Problem};
use super::{check_not_suspended, rfc3339, token_limit, Credentials, MAX_AUDIENCE};
use crate::agents::{policy, Agent};
use crate::audit::Event;
use crate::caller::Caller;

/// Audiences one JWT-SVID request may name.
pub const MAX_SVID_AUDIENCES: usize = 16;

/// Why `FetchX509SVID` hands out nothing: the private key would have to leave the device.
pub const X509_SVID_REFUSAL: &str = "X.509-SVIDs are disabled: the X.509-SVID profile hands the workload its private key, and tessera's agent keys never leave the TPM/HSM. Use keyless mTLS instead (the SDK's rustls signer, or `tessera tls-proxy`), or the JWT-SVID profile";

/// One JWT-SVID handed out.
#[derive(Debug, Clone)]
pub struct JwtSvid {
    pub spiffe_id: String,
    pub svid: String,
}

/// Lifetime of a software X.509-SVID: this, or the agent's certificate limit when shorter
/// (DESIGN: at most `min(max_cert_ttl, 1h)`, default 10 min).
pub const SOFTWARE_SVID_TTL: Duration = Duration::from_secs(600);
/// Shortest software X.509-SVID (rotated at half of it).
const MIN_SOFTWARE_SVID_TTL: Duration = Duration::from_secs(60);

/// One software X.509-SVID as the Workload API hands it out.
pub struct SoftwareSvid {
    pub spiffe_id: String,
    /// DER certificates, the SVID first, then the host CA chain.
    pub chain: Vec<u8>,
    /// The SVID's private key, PKCS#8 DER: made in software for this one certificate, wiped
    /// when dropped.
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    pub not_before: i64,
    pub not_after: i64,
}

/// What `ValidateJWTSVID` answers: the subject and every claim.
#[derive(Debug, Clone)]
pub struct ValidatedSvid {
    pub spiffe_id: String,
    pub claims: serde_json::Map<String, Value>,
}

/// The X.509 bundle of this host's trust domain: CA certificates and the current CRL (DER).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Bundle {
    pub trust_domain: String,
    pub certificates: Vec<u8>,
    pub crl: Vec<u8>,
}

fn malformed(m: impl Into<String>) -> Problem {
    Problem::new(Kind::MalformedRequest, m)
}

impl Credentials {
    /// `spiffe://<trust_domain>`: the key of this host's bundles.
    pub fn trust_domain_id(&self) -> String {
        format!("spiffe://{}", self.settings().ids.trust_domain)
    }

    /// Streams of bundles wait on this: it moves at every agent change (enrolment, rotation,
    /// suspension, revocation), every new CRL and every host CA change.
    pub fn bundle_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Tell bundle streams to look again.
    pub(crate) fn bundles_changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// JWT-SVIDs for `audiences`: one per agent of the caller (or only the one whose SPIFFE ID
    /// is `spiffe_id`) whose policy allows every audience. Each goes through the token
    /// pipeline's rate budget, the liveness check under the issuance gate and the audit.
    pub async fn issue_jwt_svids(
        &self,
        caller: &Caller,
        audiences: &[String],
        spiffe_id: Option<&str>,
    ) -> Result<Vec<JwtSvid>, Problem> {
        let summary =
            json!({"door": "workload-api", "audience": audiences, "spiffe_id": spiffe_id});
        if let Err(p) = check_audiences(audiences) {
            return Err(self.deny(caller, None, p, summary).await);
        }
        let live = self.agents().live();
        let mine: Vec<&Agent> = live
            .candidates(caller, None)
            .filter(|a| a.selectors.matches(caller))
            .collect();
        if mine.is_empty() {
            // Unknown, revoked or bus-only: the same answer as the socket's.
            let p = match self.match_agent(caller, None) {
                Err(p) => p,
                Ok(a) => Problem::new(Kind::Internal, format!("agent {} matched late", a.name)),
            };
            return Err(self.deny(caller, None, p, summary).await);
        }
        let wanted: Vec<&Agent> = match spiffe_id {
            Some(id) => mine.iter().copied().filter(|a| a.id == id).collect(),
            None => mine,
        };
        if wanted.is_empty() {
            let p = Problem::new(
                Kind::UnknownCaller,
                format!(
                    "this process is not {}",
                    crate::audit::client_text(spiffe_id.unwrap_or_default())
                ),
            );
            return Err(self.deny(caller, None, p, summary).await);
        }
        let cfg = self.settings();
        let mut entitled = Vec::new();
        let mut first_refusal = None;
        for a in wanted {
            match self.svid_policy(a, audiences, &cfg) {
                Ok(ttl) => entitled.push((a.clone(), ttl)),
                Err(p) => {
                    let p = self.deny(caller, Some(a), p, summary.clone()).await;
                    first_refusal.get_or_insert(p);
                }
            }
        }
        if entitled.is_empty() {
            return Err(first_refusal.unwrap_or_else(|| {
                Problem::new(
                    Kind::AudienceNotAllowed,
                    "no agent may have these audiences",
                )
            }));
        }
        let host_id = cfg.ids.host_id();
        let mut out = Vec::with_capacity(entitled.len());
        for (agent, ttl) in entitled {
            let issued = match self
                .issuer
                .jwt_svid(&host_id, &agent, audiences, ttl.as_secs())
                .await
            {
                Ok(t) => t,
                Err(e) => return Err(self.signing_problem(&agent, e)),
            };
            let aud = if audiences.len() == 1 {
                json!(audiences[0])
            } else {
                json!(audiences)
            };
            let ev = Event::new("token.issued")
                .agent(&agent.name, &agent.id)
                .caller(caller.record())
                .details(json!({
                    "jti": issued.jti,
                    "aud": aud,
                    "iat": issued.iat,
                    "exp": issued.exp,
                    "kid": agent.kid,
                    "profile": "jwt-svid",
                    "door": "workload-api",
                }));
            self.release(caller, &agent, ev, "JWT-SVID").await?;
            self.count_issued(&agent, "jwt-svid", issued.iat);
            tracing::debug!(agent = %agent.name, exp = %rfc3339(issued.exp), "JWT-SVID issued");
            out.push(JwtSvid {
                spiffe_id: agent.id.clone(),
                svid: issued.token,
            });
        }
        Ok(out)
    }

    /// The caller's active agents that opted in to software X.509-SVIDs (`x509_svid =
    /// "software"`), as their records are now, in enrolment order. Suspended agents get none
    /// (and do not hold up the others).
    pub fn software_svid_agents(&self, caller: &Caller) -> Vec<Agent> {
        self.agents()
            .live()
            .candidates(caller, None)
            .filter(|a| {
                a.selectors.matches(caller)
                    && a.policy.software_x509_svid()
                    && a.status == crate::agents::Status::Active
            })
            .cloned()
            .collect()
    }

    /// A software X.509-SVID for `agent`: a fresh P-256 key made here (never the device key,
    /// which cannot leave the device), certified by the host CA with the agent's SPIFFE ID,
    /// recorded (a revocation's CRL lists it) and audited as a software key.
    pub async fn issue_software_svid(
        &self,
        caller: &Caller,
        agent: &Agent,
    ) -> Result<SoftwareSvid, Problem> {
        use p256::pkcs8::EncodePrivateKey;
        let summary = json!({"door": "workload-api", "call": "FetchX509SVID"});
        if let Err(p) = self.may_issue(agent) {
            return Err(self.deny(caller, Some(agent), p, summary).await);
        }
        let ttl = self.cert_limit(agent).min(SOFTWARE_SVID_TTL);
        if ttl < MIN_SOFTWARE_SVID_TTL {
            let p = Problem::new(
                Kind::TtlNotAllowed,
                format!(
                    "agent {}: software X.509-SVIDs need a certificate lifetime of at least 1m (policy max_cert_ttl)",
                    agent.name
                ),
            );
            return Err(self.deny(caller, Some(agent), p, summary).await);
        }
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let public = p256::ecdsa::VerifyingKey::from(secret.public_key());
        let c = self
            .certify(
                caller,
                agent,
                &public,
                ttl,
                None,
                super::certificate::KeyKind::Software,
                json!({
                    "key": "software",
                    "profile": "x509-svid",
                    "door": "workload-api",
                    "note": "a software key made by the daemon and handed to the workload (policy x509_svid = \"software\"), not the agent's hardware key",
                }),
            )
            .await?;
        let key_pkcs8 = Zeroizing::new(
            secret
                .to_pkcs8_der()
                .map_err(|e| Problem::new(Kind::Internal, format!("PKCS#8: {e}")))?
                .as_bytes()
                .to_vec(),
        );
        // The SVID, then intermediates: the host CA when a fleet CA issued it (the trust
        // anchor is the bundle's, not the chain's).
        let mut chain = c.der;
        let intermediates = if c.ca.self_signed {
            &[][..]
        } else {
            &c.ca.chain[..c.ca.chain.len().saturating_sub(1)]
        };
        for cert in intermediates {
            let der = cert
                .to_der()
                .map_err(|e| Problem::new(Kind::Internal, e.to_string()))?;
            chain.extend_from_slice(&der);
        }
        Ok(SoftwareSvid {
            spiffe_id: agent.id.clone(),
            chain,
            key_pkcs8,
            not_before: c.not_before,
            not_after: c.not_after,
        })
    }

    /// `FetchX509SVID` for a caller with no software-SVID agent: an unknown or revoked caller
    /// is told so, an agent why it gets no X.509-SVID (its key cannot be exported); audited as
    /// a refusal.
    pub async fn refuse_x509_svid(&self, caller: &Caller) -> Problem {
        let live = self.agents().live();
        let mine = live
            .candidates(caller, None)
            .find(|a| a.selectors.matches(caller))
            .cloned();
        let (p, agent) = match mine {
            Some(a) => (
                Problem::new(
                    Kind::Other("x509-svid-disabled".into()),
                    format!("agent {}: {X509_SVID_REFUSAL}", a.name),
                ),
                Some(a),
            ),
            None => match self.match_agent(caller, None) {
                Err(p) => (p, None),
                Ok(a) => (
                    Problem::new(Kind::Internal, format!("agent {} matched late", a.name)),
                    None,
                ),
            },
        };
        self.deny(
            caller,
            agent.as_ref(),
            p,
            json!({"door": "workload-api", "call": "FetchX509SVID"}),
        )
        .await
    }

    /// The token rules for a JWT-SVID: not suspended, every audience allowed, no bearer token
    /// for an agent that requires binding, the agent's rate; the default token lifetime.
    fn svid_policy(
        &self,
        agent: &Agent,
        audiences: &[String],
        cfg: &super::Settings,
    ) -> Result<Duration, Problem> {
        check_not_suspended(agent)?;
        for aud in audiences {
            if !policy::audience_allowed(&agent.policy.audiences, aud) {
                return Err(Problem::new(
                    Kind::AudienceNotAllowed,
                    format!(
                        "audience {:?} is not allowed for agent {}",
                        crate::audit::client_text(aud),
                        agent.name
                    ),
                ));
            }
        }
        if agent.policy.require_binding {
            return Err(Problem::new(
                Kind::BindingRequired,
                format!(
                    "agent {} may only get sender-constrained tokens, and a JWT-SVID is a bearer token: use /v1/token with \"bind\"",
                    agent.name
                ),
            ));
        }
        let max = token_limit(agent, cfg);
        let ttl = policy::credential_ttl(None, cfg.tokens.default_ttl.0, max)
            .map_err(|_| Problem::new(Kind::TtlNotAllowed, "no token lifetime is allowed"))?;
        self.check_rate(agent, cfg)?;
        Ok(ttl)
    }

    /// `ValidateJWTSVID`: signed by a live agent key of this host (by `kid`), `typ` `JWT`,
    /// `iss` this host, `sub` the SPIFFE ID of the agent that key belongs to, not bound to a
    /// proof key, `aud` holding `audience`, unexpired.
    pub fn validate_jwt_svid(&self, audience: &str, svid: &str) -> Result<ValidatedSvid, Problem> {
        if audience.is_empty() {
            return Err(malformed("audience is required"));
        }
        if svid.is_empty() {
            return Err(malformed("svid is required"));
        }
        let reject =
            |why: &str| Problem::new(Kind::TokenNotAccepted, format!("JWT-SVID rejected: {why}"));
        let header: Value = svid
            .split('.')
            .next()
            .and_then(|h| B64.decode(h).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| reject("not a compact JWS"))?;
        let kid = header["kid"]
            .as_str()
            .ok_or_else(|| reject("the header has no kid"))?;
        let (owner, jwk) = self
            .agents()
            .live()
            .iter()
            .find(|a| a.kid.as_deref() == Some(kid))
            .and_then(|a| Some((a.id.clone(), a.jwk.clone()?)))
            .ok_or_else(|| reject("no key with this kid in the bundle (unknown, or revoked)"))?;
        // ES256 or RS256, as the agent's key says.
        let (header, claims) = tessera::verify::verify_with_jwk(svid, &jwk)
            .map_err(|e| reject(&format!("signature: {e}")))?;
        // Every token the daemon signs is typed (DESIGN "Typing"): a proof, WIT or checkpoint
        // signed by an agent key is not a JWT-SVID.
        if header.get("typ").and_then(Value::as_str) != Some("JWT") {
            return Err(reject("typ is not JWT"));
        }
        let Value::Object(claims) = claims else {
            return Err(reject("the claims are not a JSON object"));
        };
        if claims.contains_key("cnf") {
            return Err(reject(
                "the token is bound to a proof key (cnf): it is not a bearer JWT-SVID",
            ));
        }
        let now = crate::agents::now_unix();
        match claims.get("exp").and_then(Value::as_i64) {
            Some(exp) if exp > now => {}
            Some(_) => return Err(reject("expired")),
            None => return Err(reject("no exp")),
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => a == audience,
            Some(Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(audience)),
            _ => false,
        };
        if !aud_ok {
            return Err(reject("the audience is not in aud"));
        }
        // JWT-SVIDs name the host; agent tokens name the federation issuer when one is set.
        let settings = self.settings();
        let iss = claims.get("iss").and_then(Value::as_str);
        if iss != Some(&settings.ids.host_id()) && iss != Some(&settings.token_issuer()) {
            return Err(reject("iss is not this host"));
        }
        // The key speaks only for its own agent.
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| *s == owner)
            .ok_or_else(|| reject("sub is not the SPIFFE ID of the agent whose key signed it"))?
            .to_string();
        Ok(ValidatedSvid {
            spiffe_id: sub,
            claims,
        })
    }

    /// The live agent keys as SPIFFE bundle entries (`use: jwt-svid`).
    pub(crate) fn jwt_svid_keys(&self) -> Vec<Value> {
        self.agents()
            .live()
            .iter()
            .filter_map(|a| a.jwk.clone())
            .map(|mut k| {
                k["use"] = json!("jwt-svid");
                k
            })
            .collect()
    }

    /// The JWT bundle of this trust domain: the live agent keys (`use: jwt-svid`) and the
    /// bundle's sequence. A revoked agent's key is gone from the next one.
    pub fn jwt_bundle(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "keys": self.jwt_svid_keys(),
            "spiffe_sequence": self.agents().spiffe_sequence(),
        }))
        .unwrap_or_default()
    }

    /// The host CA certificates and the current CRL (re-signed first when it is not).
    pub async fn x509_bundle(&self) -> Result<X509Bundle, Problem> {
        let ca = self.host_ca().map_err(super::certificate::hostca_problem)?;
        let anchors = super::x509::certs_from_pem(&ca.bundle_pem)
            .map_err(|e| Problem::new(Kind::Internal, e.to_string()))?;
        let mut certificates = Vec::new();
        for c in &anchors {
            let der = c
                .to_der()
                .map_err(|e| Problem::new(Kind::Internal, e.to_string()))?;
            certificates.extend_from_slice(&der);
        }
        let crl = self
            .current_crl()
            .await
            .map_err(super::certificate::hostca_problem)?;
        let (_, crl) = x509_cert::der::pem::decode_vec(crl.pem.as_bytes())
            .map_err(|e| Problem::new(Kind::Internal, format!("CRL: {e}")))?;
        Ok(X509Bundle {
            trust_domain: self.trust_domain_id(),
            certificates,
            crl,
        })
    }
}

fn check_audiences(audiences: &[String]) -> Result<(), Problem> {
    if audiences.is_empty() {
        return Err(malformed("at least one audience is required"));
    }
    if audiences.len() > MAX_SVID_AUDIENCES {
        return Err(malformed(format!(
            "at most {MAX_SVID_AUDIENCES} audiences in one request"
        )));
    }
    for a in audiences {
        if a.is_empty() {
            return Err(malformed("an audience is empty"));
        }
        if a.len() > MAX_AUDIENCE {
            return Err(malformed(format!(
                "an audience is longer than {MAX_AUDIENCE} bytes"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_are_checked_before_any_agent_is() {
        assert!(check_audiences(&[]).is_err());
        assert!(check_audiences(&["".into()]).is_err());
        assert!(check_audiences(&["a".repeat(MAX_AUDIENCE + 1)]).is_err());
        assert!(check_audiences(&vec!["x".to_string(); MAX_SVID_AUDIENCES + 1]).is_err());
        assert!(check_audiences(&["https://api.example.com".into(), "b".into()]).is_ok());
    }
}
