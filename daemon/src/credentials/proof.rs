//! Sender-constrained credentials: DPoP-bound tokens and DPoP proofs (RFC 9449), made by the
//! daemon for the kernel-identified agent only, for targets its `audiences` allow.
//!
//! The proof key is the agent's hardware key: a bound token carries `cnf.jkt` = its RFC 7638
//! thumbprint (the agent's `kid`), and every proof is a JWT the daemon builds itself (header
//! `typ: dpop+jwt` with the public key, claims `jti`, `htm`, `htu`, `iat`, `ath`, `nonce`); no
//! caller bytes are ever signed as given. Proofs go through the same release rule as tokens
//! (liveness re-checked under the issuance gate, `proof.issued` durable before the answer).

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use p256::ecdsa::signature::Verifier;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::agents::{policy, Agent};
use crate::audit::Event;
use crate::caller::Caller;
use crate::credentials::problem::{Kind, Problem};
use crate::credentials::{jwt, Credentials};
use tessera::attestation::key_from_jwk;

/// Longest `nonce` a proof carries.
const MAX_NONCE: usize = 256;
/// Longest target URI.
const MAX_TARGET: usize = 8192;
/// Bound tokens remembered at most (their `ath`, until they expire).
const MAX_BOUND: usize = 1_000_000;

/// `POST /v1/proof` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofRequest {
    /// `"dpop"` (others to come: `"wpt"`, `"http-signature"`).
    #[serde(rename = "type")]
    pub kind: String,
    /// HTTP method of the request the proof is for.
    #[serde(default)]
    pub htm: Option<String>,
    /// Target URI (no query, no fragment).
    #[serde(default)]
    pub htu: Option<String>,
    /// The bound token the request carries (the daemon checks it and puts its hash in `ath`).
    #[serde(default)]
    pub access_token: Option<String>,
    /// `ath` of a token this daemon did not issue (another issuer's DPoP-bound token).
    #[serde(default)]
    pub ath: Option<String>,
    /// A server-provided nonce (RFC 9449 §8).
    #[serde(default)]
    pub nonce: Option<String>,
    /// Which agent, when the caller matches several.
    #[serde(default)]
    pub agent: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProofResponse {
    pub proof: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub jti: String,
}

/// `ath` of the DPoP-bound tokens this daemon issued that have not expired. A bare `ath` for
/// one of them is refused: the daemon checks its own tokens itself.
#[derive(Default)]
pub struct BoundTokens {
    by_ath: HashMap<String, i64>,
}

impl BoundTokens {
    fn insert(&mut self, ath: String, exp: i64) {
        if self.by_ath.len() >= MAX_BOUND {
            let now = crate::agents::now_unix();
            self.by_ath.retain(|_, e| *e > now);
        }
        if self.by_ath.len() < MAX_BOUND {
            self.by_ath.insert(ath, exp);
        }
    }

    /// Whether `ath` may be one of ours; `None` when the table is full and cannot tell.
    fn is_ours(&self, ath: &str) -> Option<bool> {
        if self.by_ath.contains_key(ath) {
            return Some(true);
        }
        (self.by_ath.len() < MAX_BOUND).then_some(false)
    }
}

/// The `cnf.jkt` a token request's `bind` asks for, or a refusal. `None` = a bearer token.
pub fn binding(agent: &Agent, bind: Option<&str>) -> Result<Option<String>, Problem> {
    match bind {
        None if agent.policy.require_binding => Err(Problem::new(
            Kind::BindingRequired,
            format!(
                "agent {} may only get sender-constrained tokens: ask with \"bind\": \"dpop\"",
                agent.name
            ),
        )),
        None => Ok(None),
        Some("dpop") => agent.kid.clone().map(Some).ok_or_else(|| {
            Problem::new(
                Kind::Internal,
                format!("agent {} has no key id on record", agent.name),
            )
        }),
        Some(other) => Err(Problem::new(
            Kind::MalformedRequest,
            format!(
                "bind {:?} is not supported (\"dpop\" is)",
                crate::audit::client_text(other)
            ),
        )),
    }
}

/// RFC 9110 method token: upper-case letters only here (what DPoP relying parties compare).
fn valid_method(m: &str) -> bool {
    !m.is_empty() && m.len() <= 32 && m.bytes().all(|b| b.is_ascii_uppercase())
}

/// RFC 9449 nonce: NQCHAR = %x21 / %x23-5B / %x5D-7E.
fn valid_nonce(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NONCE
        && n.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

impl Credentials {
    pub(crate) fn remember_bound(&self, token: &str, exp: i64) {
        self.bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(jwt::b64_sha256(token), exp);
    }

    /// `POST /v1/proof`.
    pub async fn issue_proof(
        &self,
        caller: &Caller,
        req: ProofRequest,
    ) -> Result<ProofResponse, Problem> {
        let summary = json!({
            "type": req.kind, "htm": req.htm, "htu": req.htu, "agent": req.agent,
            "access_token": req.access_token.as_ref().map(|_| "(given)"),
            "ath": req.ath, "nonce": req.nonce,
        });
        let agent = match self.match_agent(caller, req.agent.as_deref()) {
            Ok(a) => a,
            Err(p) => return Err(self.deny(caller, None, p, summary).await),
        };
        let checked = match self.check_dpop(&agent, &req) {
            Ok(c) => c,
            Err(p) => return Err(self.deny(caller, Some(&agent), p, summary).await),
        };
        let claims = jwt::DpopClaims {
            jti: jwt::new_jti(),
            htm: checked.htm,
            htu: checked.htu.to_string(),
            iat: crate::agents::now_unix(),
            ath: checked.ath,
            nonce: req.nonce.clone(),
        };
        let proof = match self.issuer.dpop(&agent, &claims).await {
            Ok(p) => p,
            Err(e) => return Err(self.signing_problem(&agent, e)),
        };
        let ev = Event::new("proof.issued")
            .agent(&agent.name, &agent.id)
            .caller(caller.record())
            .details(json!({
                "type": "dpop",
                "jti": claims.jti,
                "htm": claims.htm,
                "origin": checked.htu.origin().ascii_serialization(),
                "path": checked.htu.path(),
                "iat": claims.iat,
                "ath": claims.ath,
                "kid": agent.kid,
            }));
        self.release(caller, &agent, ev, "proof").await?;
        self.count_issued(&agent, claims.iat);
        Ok(ProofResponse {
            proof,
            kind: "dpop",
            jti: claims.jti,
        })
    }

    fn check_dpop(&self, agent: &Agent, req: &ProofRequest) -> Result<CheckedDpop, Problem> {
        let malformed = |m: String| Problem::new(Kind::MalformedRequest, m);
        if req.kind != "dpop" {
            return Err(malformed(format!(
                "proof type {:?} is not supported (\"dpop\" is)",
                crate::audit::client_text(&req.kind)
            )));
        }
        crate::credentials::check_not_suspended(agent)?;
        let htm = req
            .htm
            .as_deref()
            .filter(|m| valid_method(m))
            .ok_or_else(|| malformed("htm must be an upper-case HTTP method".into()))?;
        let htu = req
            .htu
            .as_deref()
            .filter(|u| u.len() <= MAX_TARGET)
            .ok_or_else(|| malformed(format!("htu is required (at most {MAX_TARGET} bytes)")))?;
        let htu = policy::proof_target(htu, false).map_err(|e| malformed(e.to_string()))?;
        if !policy::proof_target_allowed(&agent.policy.audiences, &htu) {
            return Err(Problem::new(
                Kind::TargetNotAllowed,
                policy::TargetError::NotAllowed(htu.to_string()).to_string(),
            ));
        }
        if let Some(n) = &req.nonce {
            if !valid_nonce(n) {
                return Err(malformed(format!(
                    "nonce must be 1 to {MAX_NONCE} visible ASCII characters without '\"' or '\\'"
                )));
            }
        }
        let ath = match (&req.access_token, &req.ath) {
            (Some(_), Some(_)) => {
                return Err(malformed("give access_token or ath, not both".into()));
            }
            (Some(token), None) => Some(self.check_own_token(agent, token)?),
            (None, Some(ath)) => Some(self.check_bare_ath(ath)?),
            (None, None) => None,
        };
        self.check_rate(agent, &self.settings())?;
        Ok(CheckedDpop {
            htm: htm.to_string(),
            htu,
            ath,
        })
    }

    /// `access_token` must be a token this agent's key signed, bound to that same key.
    fn check_own_token(&self, agent: &Agent, token: &str) -> Result<String, Problem> {
        let refuse = |why: &str| {
            Problem::new(
                Kind::TokenNotAccepted,
                format!(
                    "access_token is not a DPoP-bound token of agent {}: {why}",
                    agent.name
                ),
            )
        };
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(refuse("not a compact JWS"));
        };
        let key = agent
            .jwk
            .as_ref()
            .and_then(|j| key_from_jwk(j).ok())
            .ok_or_else(|| refuse("the agent has no key on record"))?;
        let sig = B64
            .decode(s)
            .ok()
            .and_then(|b| p256::ecdsa::Signature::from_slice(&b).ok())
            .ok_or_else(|| refuse("not an ES256 signature"))?;
        key.verify(format!("{h}.{p}").as_bytes(), &sig)
            .map_err(|_| refuse("not signed by this agent's key"))?;
        let header: Value = B64
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| refuse("unreadable header"))?;
        let claims: Value = B64
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| refuse("unreadable claims"))?;
        // Tokens are `typ: JWT`; a proof or checkpoint signed by the same key is not a token.
        if header["typ"] != "JWT" || claims["sub"] != json!(agent.id) {
            return Err(refuse("not a token issued to this agent"));
        }
        if claims["cnf"]["jkt"] != json!(agent.kid) {
            return Err(refuse("not bound to this agent's proof key (cnf.jkt)"));
        }
        if claims["exp"].as_i64().unwrap_or(0) <= crate::agents::now_unix() {
            return Err(refuse("expired"));
        }
        Ok(jwt::b64_sha256(token))
    }

    /// A bare `ath` is for another issuer's token: refused for tokens this daemon issued
    /// (those are checked through `access_token`).
    fn check_bare_ath(&self, ath: &str) -> Result<String, Problem> {
        let well_formed =
            ath.len() == 43 && B64.decode(ath).map(|b| b.len() == 32).unwrap_or(false);
        if !well_formed {
            return Err(Problem::new(
                Kind::MalformedRequest,
                "ath must be the base64url SHA-256 of an access token (43 characters)",
            ));
        }
        let ours = self
            .bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_ours(ath);
        match ours {
            Some(false) => Ok(ath.to_string()),
            Some(true) => Err(Problem::new(
                Kind::TokenNotAccepted,
                "ath is of a token this daemon issued: send it as access_token",
            )),
            None => Err(Problem::new(
                Kind::TokenNotAccepted,
                "cannot tell whether ath is of a token this daemon issued now: send access_token",
            )),
        }
    }
}

struct CheckedDpop {
    htm: String,
    htu: url::Url,
    ath: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_and_method_rules() {
        assert!(valid_nonce("abc-._~!#$%&'()*+,/:;<=>?@[]^`{|}"));
        assert!(!valid_nonce("a\"b"));
        assert!(!valid_nonce("a\\b"));
        assert!(!valid_nonce("a b"));
        assert!(!valid_nonce(""));
        assert!(!valid_nonce(&"a".repeat(257)));
        assert!(valid_method("GET") && valid_method("PATCH"));
        assert!(!valid_method("get") && !valid_method("GE T") && !valid_method(""));
    }
}
