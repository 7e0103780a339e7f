//! Sender-constrained credentials: DPoP-bound tokens and DPoP proofs (RFC 9449), made by the
//! daemon for the kernel-identified agent only, for targets its `audiences` allow.
//!
//! The proof key is the agent's hardware key: a bound token carries `cnf.jkt` = its RFC 7638
//! thumbprint (the agent's `kid`), and every proof is a JWT the daemon builds itself (header
//! `typ: dpop+jwt` with the public key, claims `jti`, `htm`, `htu`, `iat`, `ath`, `nonce`); no
//! caller bytes are ever signed as given. Proofs go through the same release rule as tokens
//! (liveness re-checked under the issuance gate, `proof.issued` durable before the answer).

use std::collections::HashMap;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use p256::ecdsa::signature::Verifier;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::agents::{policy, Agent};
use crate::audit::Event;
use crate::caller::Caller;
use crate::credentials::problem::{Kind, Problem};
use crate::credentials::{httpsig, jwt, Credentials};
use crate::keystore::ecdsa;
use crate::keystore::session::{self, SessionKey};
use tessera::attestation::key_from_jwk;

/// Longest `nonce` a proof carries.
const MAX_NONCE: usize = 256;
/// Longest target URI.
const MAX_TARGET: usize = 8192;
/// Bound tokens remembered at most (their `ath`, until they expire).
const MAX_BOUND: usize = 1_000_000;
/// WPT lifetime: default and ceiling (draft-ietf-wimse-wpt: short-lived).
const WPT_DEFAULT_TTL: u64 = 60;
const WPT_MAX_TTL: u64 = 300;
/// Other-token hashes a WPT carries at most.
const MAX_OTH: usize = 8;

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
    /// WPT: the target URI (no query, no fragment).
    #[serde(default)]
    pub aud: Option<String>,
    /// WPT: the WIT this daemon issued to the agent, which the WPT goes with.
    #[serde(default)]
    pub wit: Option<String>,
    /// WPT: hash of a transaction token.
    #[serde(default)]
    pub tth: Option<String>,
    /// WPT: hashes of other tokens, `{name: hash}` (at most 8).
    #[serde(default)]
    pub oth: Option<serde_json::Map<String, Value>>,
    /// WPT lifetime ("60s" by default, at most "5m").
    #[serde(default)]
    pub ttl: Option<String>,
    /// RFC 9421: the request's method.
    #[serde(default)]
    pub method: Option<String>,
    /// RFC 9421: the request's target URI (a query is allowed).
    #[serde(default)]
    pub target_uri: Option<String>,
    /// RFC 9421: header fields the signature may cover, `{lower-case name: value}`.
    #[serde(default)]
    pub headers: Option<serde_json::Map<String, Value>>,
    /// RFC 9421: the request's `Content-Digest` (RFC 9530), always covered when given.
    #[serde(default)]
    pub content_digest: Option<String>,
    /// RFC 9421: components to cover besides `@method` and `@authority`.
    #[serde(default)]
    pub components: Option<Vec<String>>,
}

/// `GET /v1/wit` answer.
#[derive(Debug, Clone, Serialize)]
pub struct WitResponse {
    pub wit: String,
    pub expires_at: String,
    pub jti: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProofResponse {
    /// The proof JWT (DPoP, WPT).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The proof's `jti` (RFC 9421: its `nonce`).
    pub jti: String,
    /// RFC 9421: the `Signature-Input` and `Signature` header values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature_input: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// `ath` of the DPoP-bound tokens this daemon issued that have not expired. A bare `ath` for
/// one of them is refused: the daemon checks its own tokens itself.
#[derive(Default)]
pub struct BoundTokens {
    by_ath: HashMap<String, BoundToken>,
    /// Size at which expired entries are next swept: twice what the last sweep left (at least
    /// [`SWEEP_FLOOR`]), so the table holds about twice the unexpired tokens and sweeping
    /// costs O(1) per insert, amortised. (Sweeping only when full let it grow by every bound
    /// token for hours: the soak's RSS climbed 50 MiB in 10 minutes.)
    next_sweep: usize,
}

const SWEEP_FLOOR: usize = 1024;

/// A DPoP-bound token this daemon issued: whose, bound to which proof key, until when.
#[derive(Debug, Clone)]
struct BoundToken {
    exp: i64,
    agent_row: i64,
    jkt: String,
}

impl BoundTokens {
    fn insert(&mut self, ath: String, token: BoundToken, now: i64) {
        if self.by_ath.len() >= self.next_sweep.clamp(SWEEP_FLOOR, MAX_BOUND) {
            self.by_ath.retain(|_, t| t.exp > now);
            self.next_sweep = 2 * self.by_ath.len();
        }
        if self.by_ath.len() < MAX_BOUND {
            self.by_ath.insert(ath, token);
        }
    }

    /// Whether `ath` may be one of ours; `None` when the table is full and cannot tell.
    fn is_ours(&self, ath: &str) -> Option<bool> {
        if self.by_ath.contains_key(ath) {
            return Some(true);
        }
        (self.by_ath.len() < MAX_BOUND).then_some(false)
    }

    /// The proof key thumbprint of an unexpired token of agent `row` whose SHA-256 is `ath`.
    fn known(&self, ath: &str, row: i64, now: i64) -> Option<&str> {
        self.by_ath
            .get(ath)
            .filter(|t| t.agent_row == row && t.exp > now)
            .map(|t| t.jkt.as_str())
    }
}

/// What a token request's `bind` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bind {
    None,
    /// `cnf.jkt` of the agent's proof key (RFC 9449).
    Dpop,
    /// `cnf["x5t#S256"]` of a certificate the daemon issued to the agent (RFC 8705).
    Mtls,
}

/// The binding a token request's `bind` asks for, or a refusal.
pub fn binding(agent: &Agent, bind: Option<&str>) -> Result<Bind, Problem> {
    match bind {
        None if agent.policy.require_binding => Err(Problem::new(
            Kind::BindingRequired,
            format!(
                "agent {} may only get sender-constrained tokens: ask with \"bind\": \"dpop\" or \"mtls\"",
                agent.name
            ),
        )),
        None => Ok(Bind::None),
        Some(b @ ("dpop" | "mtls")) => {
            crate::credentials::p256_only(agent, "bound tokens")?;
            Ok(if b == "dpop" { Bind::Dpop } else { Bind::Mtls })
        }
        Some(other) => Err(Problem::new(
            Kind::MalformedRequest,
            format!(
                "bind {:?} is not supported (\"dpop\" and \"mtls\" are)",
                crate::audit::client_text(other)
            ),
        )),
    }
}

/// The key a proof is signed with: the agent's device key, or one of its session keys.
#[derive(Clone)]
pub enum ProofKey {
    Hardware { kid: String, jwk: Value },
    Session(Arc<SessionKey>),
}

impl ProofKey {
    pub fn kid(&self) -> &str {
        match self {
            ProofKey::Hardware { kid, .. } => kid,
            ProofKey::Session(k) => &k.kid,
        }
    }
    pub fn jwk(&self) -> &Value {
        match self {
            ProofKey::Hardware { jwk, .. } => jwk,
            ProofKey::Session(k) => &k.jwk,
        }
    }
    /// When what it binds must expire at the latest.
    pub fn expires(&self) -> Option<i64> {
        match self {
            ProofKey::Hardware { .. } => None,
            ProofKey::Session(k) => Some(k.expires),
        }
    }
    fn label(&self) -> &'static str {
        match self {
            ProofKey::Hardware { .. } => "hardware",
            ProofKey::Session(_) => "session",
        }
    }
}

/// Policy `proof_key = "session"`: the agent's proofs, and its `?key=session` certificates,
/// use an in-memory session key.
pub(crate) fn uses_session_key(agent: &Agent) -> bool {
    agent.policy.proof_key.as_deref() == Some("session")
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
    /// The key a new bound token or WIT names: the current session key (made or rotated as
    /// needed) under `proof_key = "session"`, else the device key.
    pub(crate) fn proof_key_for_new(&self, agent: &Agent) -> Result<ProofKey, Problem> {
        if uses_session_key(agent) {
            let ttl = agent
                .policy
                .session_key_ttl
                .map_or(session::DEFAULT_TTL, |d| d.0.as_secs() as i64)
                .clamp(1, session::MAX_TTL);
            return self
                .keystore
                .sessions()
                .current(agent.row, crate::agents::now_unix(), ttl)
                .map(ProofKey::Session)
                .ok_or_else(|| {
                    Problem::new(Kind::BackendUnavailable, "no memory for a session key")
                });
        }
        self.hardware_proof_key(agent)
    }

    fn hardware_proof_key(&self, agent: &Agent) -> Result<ProofKey, Problem> {
        match (&agent.kid, &agent.jwk) {
            (Some(kid), Some(jwk)) => Ok(ProofKey::Hardware {
                kid: kid.clone(),
                jwk: jwk.clone(),
            }),
            _ => Err(Problem::new(
                Kind::Internal,
                format!("agent {} has no key on record", agent.name),
            )),
        }
    }

    /// The agent's live proof key with thumbprint `kid`, under its current policy.
    fn proof_key_by_kid(&self, agent: &Agent, kid: &str) -> Option<ProofKey> {
        if uses_session_key(agent) {
            self.keystore
                .sessions()
                .find(agent.row, kid, crate::agents::now_unix())
                .map(ProofKey::Session)
        } else {
            self.hardware_proof_key(agent)
                .ok()
                .filter(|k| k.kid() == kid)
        }
    }

    /// A compact JWS over `input` (built by the daemon) with `key`.
    async fn sign_jws(
        &self,
        agent: &Agent,
        key: &ProofKey,
        input: &str,
    ) -> Result<String, crate::keystore::KeyStoreError> {
        let sig = match key {
            ProofKey::Hardware { .. } => {
                self.keystore
                    .sign(&agent.key_id, jwt::digest(input))
                    .await?
            }
            ProofKey::Session(k) => k.sign(input.as_bytes())?,
        };
        Ok(jwt::compact(input, &sig))
    }

    pub(crate) fn remember_bound(&self, token: &str, exp: i64, agent: &Agent, jkt: &str) {
        self.bound.lock().unwrap_or_else(|p| p.into_inner()).insert(
            jwt::b64_sha256(token),
            BoundToken {
                exp,
                agent_row: agent.row,
                jkt: jkt.to_string(),
            },
            crate::agents::now_unix(),
        );
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
            "ath": req.ath, "nonce": req.nonce, "aud": req.aud,
            "wit": req.wit.as_ref().map(|_| "(given)"), "ttl": req.ttl,
            "method": req.method, "target_uri": req.target_uri, "components": req.components,
        });
        let agent = match self.match_agent(caller, req.agent.as_deref()) {
            Ok(a) => a,
            Err(p) => return Err(self.deny(caller, None, p, summary).await),
        };
        if let Err(p) = crate::credentials::p256_only(&agent, "proofs") {
            return Err(self.deny(caller, Some(&agent), p, summary).await);
        }
        let made = match req.kind.as_str() {
            "dpop" => self.check_dpop(&agent, &req).map(Checked::Dpop),
            "wpt" => self.check_wpt(&agent, &req).map(Checked::Wpt),
            "http-signature" => crate::credentials::check_not_suspended(&agent)
                .and_then(|()| {
                    httpsig::build(
                        &agent.policy.audiences,
                        req.method.as_deref(),
                        req.target_uri.as_deref(),
                        req.headers.as_ref(),
                        req.content_digest.as_deref(),
                        req.components.as_deref(),
                    )
                })
                .and_then(|b| self.check_rate(&agent, &self.settings()).map(|()| b))
                .map(Checked::HttpSig),
            other => Err(Problem::new(
                Kind::MalformedRequest,
                format!(
                    "proof type {:?} is not supported (\"dpop\", \"wpt\" and \"http-signature\" are)",
                    crate::audit::client_text(other)
                ),
            )),
        };
        let checked = match made {
            Ok(c) => c,
            Err(p) => return Err(self.deny(caller, Some(&agent), p, summary).await),
        };
        let iat = crate::agents::now_unix();
        let jti = jwt::new_jti();
        let mut http = None;
        let (signed, kind, target, details) = match checked {
            Checked::HttpSig(b) => {
                let nonce = httpsig::nonce();
                let params = httpsig::signature_params(
                    &b,
                    iat,
                    &nonce,
                    agent.kid.as_deref().unwrap_or_default(),
                );
                let base = httpsig::signature_base(&b, &params);
                let signed = self.issuer.http_signature(&agent, &base).await;
                let details = json!({
                    "htm": b.method,
                    "components": b.components.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
                    "expires": iat + httpsig::LIFETIME,
                });
                http = Some(params);
                (signed, "http-signature", b.target, details)
            }
            Checked::Dpop(c) => {
                let claims = jwt::DpopClaims {
                    jti: jti.clone(),
                    htm: c.htm,
                    htu: c.htu.to_string(),
                    iat,
                    ath: c.ath,
                    nonce: req.nonce.clone(),
                };
                let details = json!({
                    "htm": claims.htm, "ath": claims.ath,
                    "proof_key": c.key.label(), "proof_kid": c.key.kid(),
                });
                let input = jwt::dpop_signing_input(c.key.jwk(), &claims);
                (
                    self.sign_jws(&agent, &c.key, &input).await,
                    "dpop",
                    c.htu,
                    details,
                )
            }
            Checked::Wpt(c) => {
                let claims = jwt::WptClaims {
                    aud: c.aud.to_string(),
                    exp: iat + c.ttl as i64,
                    jti: jti.clone(),
                    wth: c.wth,
                    ath: c.ath,
                    tth: req.tth.clone(),
                    oth: req.oth.clone().map(Value::Object),
                };
                let details = json!({
                    "wth": claims.wth, "exp": claims.exp, "ath": claims.ath,
                    "proof_key": c.key.label(), "proof_kid": c.key.kid(),
                });
                let input = jwt::wpt_signing_input(&claims);
                (
                    self.sign_jws(&agent, &c.key, &input).await,
                    "wpt",
                    c.aud,
                    details,
                )
            }
        };
        let proof = match signed {
            Ok(p) => p,
            Err(e) => return Err(self.signing_problem(&agent, e)),
        };
        let mut details = details;
        // An RFC 9421 signature is named by its nonce.
        let jti = match &http {
            Some(params) => params
                .split("nonce=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or_default()
                .to_string(),
            None => jti,
        };
        details["type"] = json!(kind);
        details["jti"] = json!(jti);
        details["iat"] = json!(iat);
        details["kid"] = json!(agent.kid);
        // The target without its query: origin and path.
        details["origin"] = json!(target.origin().ascii_serialization());
        details["path"] = json!(target.path());
        let ev = Event::new("proof.issued")
            .agent(&agent.name, &agent.id)
            .caller(caller.record())
            .details(details);
        self.release(caller, &agent, ev, "proof").await?;
        self.count_issued(&agent, "proof", iat);
        Ok(match http {
            Some(params) => ProofResponse {
                proof: None,
                kind,
                jti,
                signature_input: Some(format!("{}={params}", httpsig::LABEL)),
                signature: Some(format!("{}=:{proof}:", httpsig::LABEL)),
            },
            None => ProofResponse {
                proof: Some(proof),
                kind,
                jti,
                signature_input: None,
                signature: None,
            },
        })
    }

    /// `GET /v1/wit`: a Workload Identity Token binding the agent's proof key, signed by the
    /// host CA key in the device.
    pub async fn issue_wit(
        &self,
        caller: &Caller,
        wanted: Option<&str>,
    ) -> Result<WitResponse, Problem> {
        let summary = json!({"credential": "wit", "agent": wanted});
        let agent = match self.match_agent(caller, wanted) {
            Ok(a) => a,
            Err(p) => return Err(self.deny(caller, None, p, summary).await),
        };
        if let Err(p) = crate::credentials::p256_only(&agent, "WITs") {
            return Err(self.deny(caller, Some(&agent), p, summary).await);
        }
        if let Err(p) = self.may_issue(&agent) {
            return Err(self.deny(caller, Some(&agent), p, summary).await);
        }
        let ca = self
            .host_ca()
            .map_err(crate::credentials::certificate::hostca_problem)?;
        let (ca_kid, _) = ecdsa::jwk_of(&ca.key);
        let ttl = agent
            .policy
            .wit_ttl
            .map_or(policy::MAX_WIT_TTL, |d| d.0.min(policy::MAX_WIT_TTL));
        let iat = crate::agents::now_unix();
        let key = self.proof_key_for_new(&agent)?;
        // A WIT never outlives the key it binds.
        let exp = (iat + ttl.as_secs() as i64).min(key.expires().unwrap_or(i64::MAX));
        let claims = jwt::WitClaims {
            iss: self.settings().ids.host_id(),
            sub: agent.id.clone(),
            iat,
            exp,
            jti: jwt::new_jti(),
            cnf_jwk: jwt::public_jwk(key.jwk()),
        };
        let wit = match self.issuer.wit(&ca.key_id, &ca_kid, &claims).await {
            Ok(w) => w,
            Err(e) => return Err(self.signing_problem(&agent, e)),
        };
        let ev = Event::new("wit.issued")
            .agent(&agent.name, &agent.id)
            .caller(caller.record())
            .details(json!({
                "jti": claims.jti, "iat": iat, "exp": claims.exp, "kid": agent.kid, "ca_kid": ca_kid,
                "proof_key": key.label(), "proof_kid": key.kid(),
            }));
        self.release(caller, &agent, ev, "WIT").await?;
        self.count_issued(&agent, "wit", iat);
        Ok(WitResponse {
            wit,
            expires_at: crate::credentials::rfc3339(claims.exp),
            jti: claims.jti,
        })
    }

    /// `GET /v1/bundle?format=spiffe`: a SPIFFE trust bundle. Agent keys (`use: jwt-svid`),
    /// the host CA key once as a `wit-svid` JWK (`kid` = thumbprint) and the trust anchor
    /// certificates as `x509-svid` entries (`x5c`, no `kid`). `/v1/jwks` keeps agent keys only.
    pub fn spiffe_bundle(&self) -> Result<Value, Problem> {
        let ca = self
            .host_ca()
            .map_err(crate::credentials::certificate::hostca_problem)?;
        let mut keys = self.jwt_svid_keys();
        let (_, mut wit_key) = ecdsa::jwk_of(&ca.key);
        wit_key["use"] = json!("wit-svid");
        keys.push(wit_key);
        let anchors = crate::credentials::x509::certs_from_pem(&ca.bundle_pem)
            .map_err(|e| Problem::new(Kind::Internal, e.to_string()))?;
        for cert in &anchors {
            let Some(key) = crate::credentials::x509::cert_p256_key(cert) else {
                continue;
            };
            let der = x509_cert::der::Encode::to_der(cert)
                .map_err(|e| Problem::new(Kind::Internal, e.to_string()))?;
            let (_, jwk) = ecdsa::jwk_of(&key);
            keys.push(json!({
                "kty": jwk["kty"], "crv": jwk["crv"], "x": jwk["x"], "y": jwk["y"],
                "use": "x509-svid",
                "x5c": [base64::engine::general_purpose::STANDARD.encode(der)],
            }));
        }
        Ok(json!({
            "keys": keys,
            "spiffe_sequence": self.agents().spiffe_sequence(),
            "spiffe_refresh_hint": 300,
        }))
    }

    fn check_dpop(&self, agent: &Agent, req: &ProofRequest) -> Result<CheckedDpop, Problem> {
        let malformed = |m: String| Problem::new(Kind::MalformedRequest, m);
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
        let (ath, key) = match (&req.access_token, &req.ath) {
            (Some(_), Some(_)) => {
                return Err(malformed("give access_token or ath, not both".into()));
            }
            (Some(token), None) => {
                let (ath, key) = self.check_own_token(agent, token)?;
                (Some(ath), key)
            }
            (None, Some(ath)) => (
                Some(self.check_bare_ath(ath)?),
                self.proof_key_for_new(agent)?,
            ),
            (None, None) => (None, self.proof_key_for_new(agent)?),
        };
        self.check_rate(agent, &self.settings())?;
        Ok(CheckedDpop {
            htm: htm.to_string(),
            htu,
            ath,
            key,
        })
    }

    fn check_wpt(&self, agent: &Agent, req: &ProofRequest) -> Result<CheckedWpt, Problem> {
        let malformed = |m: String| Problem::new(Kind::MalformedRequest, m);
        crate::credentials::check_not_suspended(agent)?;
        let aud = req
            .aud
            .as_deref()
            .filter(|u| u.len() <= MAX_TARGET)
            .ok_or_else(|| malformed(format!("aud is required (at most {MAX_TARGET} bytes)")))?;
        let aud = policy::proof_target(aud, false).map_err(|e| malformed(e.to_string()))?;
        if !policy::proof_target_allowed(&agent.policy.audiences, &aud) {
            return Err(Problem::new(
                Kind::TargetNotAllowed,
                policy::TargetError::NotAllowed(aud.to_string()).to_string(),
            ));
        }
        let wit = req
            .wit
            .as_deref()
            .ok_or_else(|| malformed("wit is required (GET /v1/wit)".into()))?;
        let (wth, wit_exp, key) = self.check_wit(agent, wit)?;
        let ath = match (&req.access_token, &req.ath) {
            (Some(_), Some(_)) => {
                return Err(malformed("give access_token or ath, not both".into()))
            }
            (Some(token), None) => Some(jwt::b64_sha256(token)),
            (None, Some(ath)) => Some(check_hash("ath", ath)?),
            (None, None) => None,
        };
        if let Some(t) = &req.tth {
            check_hash("tth", t)?;
        }
        if let Some(oth) = &req.oth {
            if oth.len() > MAX_OTH {
                return Err(malformed(format!("oth has at most {MAX_OTH} entries")));
            }
            for (k, v) in oth {
                let ok = k.len() <= 64
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    && v.as_str().is_some_and(|h| check_hash("oth", h).is_ok());
                if !ok {
                    return Err(malformed(
                        "oth entries are {name: base64url SHA-256} with short token names".into(),
                    ));
                }
            }
        }
        let ttl = match &req.ttl {
            None => WPT_DEFAULT_TTL,
            Some(t) => {
                let d = crate::duration::parse_duration(t).map_err(malformed)?;
                if d.subsec_nanos() != 0 || d.as_secs() < 1 || d.as_secs() > WPT_MAX_TTL {
                    return Err(Problem::new(
                        Kind::TtlNotAllowed,
                        format!("a WPT lives whole seconds from 1s to {WPT_MAX_TTL}s"),
                    ));
                }
                d.as_secs()
            }
        };
        self.check_rate(agent, &self.settings())?;
        // Never past the WIT it goes with.
        let left = (wit_exp - crate::agents::now_unix()).max(1) as u64;
        Ok(CheckedWpt {
            aud,
            wth,
            ath,
            ttl: ttl.min(left),
            key,
        })
    }

    /// `wit` must be an unexpired WIT this daemon's host CA signed for this agent, binding
    /// this agent's proof key. Returns its hash (`wth`), its `exp` and the key it binds.
    fn check_wit(&self, agent: &Agent, wit: &str) -> Result<(String, i64, ProofKey), Problem> {
        let refuse = |why: &str| {
            Problem::new(
                Kind::TokenNotAccepted,
                format!("wit is not a WIT of agent {}: {why}", agent.name),
            )
        };
        let ca = self
            .host_ca()
            .map_err(crate::credentials::certificate::hostca_problem)?;
        let (header, claims) = verify_compact(wit, &ca.key).map_err(&refuse)?;
        if header["typ"] != "wit+jwt" {
            return Err(refuse("typ is not wit+jwt"));
        }
        if claims["sub"] != json!(agent.id) || claims["iss"] != json!(self.settings().ids.host_id())
        {
            return Err(refuse("issued to someone else"));
        }
        let exp = claims["exp"].as_i64().unwrap_or(0);
        if exp <= crate::agents::now_unix() {
            return Err(refuse("expired"));
        }
        let cnf = &claims["cnf"]["jwk"];
        let key = key_from_jwk(cnf)
            .ok()
            .and_then(|k| self.proof_key_by_kid(agent, &ecdsa::jwk_of(&k).0))
            .ok_or_else(|| refuse("it binds a key that is not this agent's live proof key"))?;
        Ok((jwt::b64_sha256(wit), exp, key))
    }

    /// `access_token` must be a token this agent's key signed, bound to that same key.
    fn check_own_token(&self, agent: &Agent, token: &str) -> Result<(String, ProofKey), Problem> {
        let refuse = |why: &str| {
            Problem::new(
                Kind::TokenNotAccepted,
                format!(
                    "access_token is not a DPoP-bound token of agent {}: {why}",
                    agent.name
                ),
            )
        };
        // A token this daemon issued to this agent is known by its SHA-256 (the table of
        // bound tokens): the same token, byte for byte, so its signature need not be checked
        // again on every proof. Anything else (another agent's, after a restart, a full
        // table) is verified.
        let ath = jwt::b64_sha256(token);
        let now = crate::agents::now_unix();
        let known = self
            .bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .known(&ath, agent.row, now)
            .map(str::to_string);
        if let Some(jkt) = known {
            let key = self
                .proof_key_by_kid(agent, &jkt)
                .ok_or_else(|| refuse("not bound to a live proof key of this agent (cnf.jkt)"))?;
            return Ok((ath, key));
        }
        let key = agent
            .jwk
            .as_ref()
            .and_then(|j| key_from_jwk(j).ok())
            .ok_or_else(|| refuse("the agent has no key on record"))?;
        let (header, claims) = verify_compact(token, &key).map_err(refuse)?;
        // Tokens are `typ: JWT`; a proof or checkpoint signed by the same key is not a token.
        if header["typ"] != "JWT" || claims["sub"] != json!(agent.id) {
            return Err(refuse("not a token issued to this agent"));
        }
        let key = claims["cnf"]["jkt"]
            .as_str()
            .and_then(|jkt| self.proof_key_by_kid(agent, jkt))
            .ok_or_else(|| refuse("not bound to a live proof key of this agent (cnf.jkt)"))?;
        if claims["exp"].as_i64().unwrap_or(0) <= now {
            return Err(refuse("expired"));
        }
        Ok((ath, key))
    }

    /// A bare `ath` is for another issuer's token: refused for tokens this daemon issued
    /// (those are checked through `access_token`).
    fn check_bare_ath(&self, ath: &str) -> Result<String, Problem> {
        check_hash("ath", ath)?;
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
    key: ProofKey,
}

struct CheckedWpt {
    aud: url::Url,
    wth: String,
    ath: Option<String>,
    ttl: u64,
    key: ProofKey,
}

enum Checked {
    Dpop(CheckedDpop),
    Wpt(CheckedWpt),
    HttpSig(httpsig::Base),
}

/// A base64url SHA-256 (43 characters).
fn check_hash(what: &str, h: &str) -> Result<String, Problem> {
    let ok = h.len() == 43 && B64.decode(h).map(|b| b.len() == 32).unwrap_or(false);
    if ok {
        Ok(h.to_string())
    } else {
        Err(Problem::new(
            Kind::MalformedRequest,
            format!("{what} must be a base64url SHA-256 (43 characters)"),
        ))
    }
}

/// Check an ES256 compact JWS against `key`; its header and claims.
pub(crate) fn verify_compact(
    jws: &str,
    key: &p256::ecdsa::VerifyingKey,
) -> Result<(Value, Value), &'static str> {
    let mut parts = jws.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a compact JWS");
    };
    let sig = B64
        .decode(s)
        .ok()
        .and_then(|b| p256::ecdsa::Signature::from_slice(&b).ok())
        .ok_or("not an ES256 signature")?;
    key.verify(format!("{h}.{p}").as_bytes(), &sig)
        .map_err(|_| "not signed by the expected key")?;
    let part = |x: &str| -> Option<Value> { serde_json::from_slice(&B64.decode(x).ok()?).ok() };
    let header = part(h).ok_or("unreadable header")?;
    let claims = part(p).ok_or("unreadable claims")?;
    if header["alg"] != "ES256" {
        return Err("alg is not ES256");
    }
    Ok((header, claims))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_bound_token_is_only_its_agents_and_only_until_it_expires() {
        let mut t = BoundTokens::default();
        let tok = |row, exp| BoundToken {
            exp,
            agent_row: row,
            jkt: format!("jkt-{row}"),
        };
        t.insert("a".into(), tok(1, 100), 0);
        assert_eq!(t.known("a", 1, 99), Some("jkt-1"));
        assert_eq!(
            t.known("a", 2, 99),
            None,
            "another agent's token is verified, not trusted"
        );
        assert_eq!(t.known("a", 1, 100), None, "expired");
        assert_eq!(t.known("b", 1, 0), None);
        assert_eq!(t.is_ours("a"), Some(true));
    }

    #[test]
    fn expired_bound_tokens_are_swept_long_before_the_table_is_full() {
        let mut t = BoundTokens::default();
        let mut most = 0;
        // 100,000 tokens, one a second, each valid for 10 s: never more than 10 alive.
        for i in 0..100_000i64 {
            let token = BoundToken {
                exp: i + 10,
                agent_row: 1,
                jkt: "j".into(),
            };
            t.insert(format!("ath-{i}"), token, i);
            most = most.max(t.by_ath.len());
        }
        assert!(most <= SWEEP_FLOOR, "the table grew to {most}");
        assert_eq!(t.known("ath-99999", 1, 99_999), Some("j"));
    }

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
