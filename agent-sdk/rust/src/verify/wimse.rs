//! Relying-party check of a WIMSE Workload Identity Token and the Workload Proof Token that
//! goes with it (draft-ietf-wimse-workload-creds, draft-ietf-wimse-wpt): the WIT against the
//! trust domain's WIT key (`"use": "wit-svid"` in the SPIFFE bundle, never an agent token key),
//! the WPT against the key the WIT binds (`cnf.jwk`), for this request, fresh, once.
//!
//! On the wire: `Workload-Identity-Token: <WIT>` and the WPT in `Workload-Proof-Token: <WPT>`
//! (draft-ietf-wimse-wpt-01, the claims tessera makes: `aud`, `exp`, `jti`, `wth`, `ath`, `tth`,
//! `oth`) or `Authorization: WPT <WPT>` (-02; see [`wpt_from_authorization`]). A WIT is checked
//! against the trust domain the relying party names, never just any key it was given.

use std::collections::BTreeMap;

use jsonwebtoken::jwk::Jwk;
use serde::{Deserialize, Serialize};

use super::dpop::normal_uri;
use super::{
    algorithm_of, b64_sha256, decode_signed, now, public_jwk, raw_header, ReplayCache, VerifyError,
};

/// The claims of a verified WIT.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WitClaims {
    #[serde(default)]
    pub iss: Option<String>,
    /// The workload's SPIFFE ID.
    pub sub: String,
    #[serde(default)]
    pub iat: Option<i64>,
    pub exp: i64,
    #[serde(default)]
    pub jti: Option<String>,
    pub cnf: WitConfirmation,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WitConfirmation {
    pub jwk: serde_json::Value,
}

/// The claims of a verified WPT.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WptClaims {
    pub aud: String,
    pub exp: i64,
    pub jti: String,
    pub wth: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ath: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oth: Option<BTreeMap<String, String>>,
}

/// One request as the relying party received it.
#[derive(Debug, Clone, Default)]
pub struct WimseRequest<'a> {
    /// The request's absolute URI (query and fragment ignored).
    pub url: &'a str,
    pub wit: &'a str,
    pub wpt: &'a str,
    /// The access token sent with the request (`ath` must then be its hash).
    pub access_token: Option<&'a str>,
    /// A transaction token sent with the request (`tth`).
    pub txn_token: Option<&'a str>,
    /// Other tokens sent with the request, by the names the WPT's `oth` uses (lower-case
    /// header names), each once.
    pub other_tokens: Vec<(&'a str, &'a str)>,
}

#[derive(Debug, Clone)]
pub struct WimseVerified {
    pub wit: WitClaims,
    pub wpt: WptClaims,
}

/// Checks WIT+WPT pairs; keep one per relying party (its replay cache stops a WPT being
/// used twice).
pub struct WimseVerifier {
    trust_domain: String,
    leeway: i64,
    max_wpt_life: i64,
    replay: ReplayCache,
}

impl WimseVerifier {
    /// Accept workloads of `trust_domain` only (`sub` = `spiffe://<trust_domain>/…`), with WITs
    /// signed by that trust domain's keys (the bundle given to [`WimseVerifier::verify`]).
    pub fn new(trust_domain: impl Into<String>) -> Self {
        WimseVerifier {
            trust_domain: trust_domain.into(),
            leeway: 30,
            max_wpt_life: 300,
            replay: ReplayCache::default(),
        }
    }

    /// Allowed clock skew (default 30 s).
    pub fn leeway(mut self, d: std::time::Duration) -> Self {
        self.leeway = d.as_secs().min(300) as i64;
        self
    }

    /// Remember at most `n` unexpired WPTs; more are refused until some expire.
    pub fn replay_capacity(mut self, n: usize) -> Self {
        self.replay = ReplayCache::new(n);
        self
    }

    /// Check `req` with the WIT keys of `bundle`, the trust domain's SPIFFE bundle (the JSON of
    /// `/v1/bundle?format=spiffe`).
    pub fn verify(
        &self,
        req: &WimseRequest,
        bundle: &serde_json::Value,
    ) -> Result<WimseVerified, VerifyError> {
        let now = now();
        let wit = self.check_wit(req.wit, bundle, now)?;
        let bad = |m: String| VerifyError::Proof(format!("WPT: {m}"));
        // The WPT: typed, signed by the WIT's key with the algorithm the key names.
        let (jwk, alg, _) = public_jwk(&wit.cnf.jwk).map_err(|e| bad(format!("cnf.jwk: {e}")))?;
        let h = raw_header(req.wpt).map_err(bad)?;
        if !matches!(
            h.get("typ").and_then(|v| v.as_str()),
            Some("wpt+jwt" | "application/wpt+jwt")
        ) {
            return Err(bad(format!("typ {} is not wpt+jwt", h["typ"])));
        }
        let alg_name = format!("{alg:?}");
        if h.get("alg").and_then(|v| v.as_str()) != Some(alg_name.as_str())
            || wit.cnf.jwk.get("alg").and_then(|v| v.as_str()) != Some(alg_name.as_str())
        {
            return Err(bad(format!(
                "alg {} is not the WIT key's {alg_name}",
                h["alg"]
            )));
        }
        let c: WptClaims = decode_signed(req.wpt, &jwk, alg).map_err(bad)?;
        if normal_uri(&c.aud)? != normal_uri(req.url)? {
            return Err(bad(format!("aud {:?} is not this request's URI", c.aud)));
        }
        if c.exp <= now - self.leeway {
            return Err(bad(format!("expired at {}", c.exp)));
        }
        if c.exp > now + self.max_wpt_life + self.leeway {
            return Err(bad(format!(
                "exp {} is more than {} s ahead",
                c.exp, self.max_wpt_life
            )));
        }
        if c.jti.is_empty() || c.jti.len() > 256 {
            return Err(bad("jti is 1 to 256 characters".into()));
        }
        if c.wth != b64_sha256(req.wit) {
            return Err(bad("wth is not the hash of this WIT".into()));
        }
        check_hash("ath", c.ath.as_deref(), req.access_token).map_err(bad)?;
        check_hash("tth", c.tth.as_deref(), req.txn_token).map_err(bad)?;
        let oth = c.oth.clone().unwrap_or_default();
        let mut names: Vec<&str> = req.other_tokens.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        if names.len() != req.other_tokens.len()
            || names
                .iter()
                .any(|n| n.bytes().any(|b| b.is_ascii_uppercase()))
        {
            return Err(bad("other tokens are named once each, in lower case".into()));
        }
        if oth.len() != req.other_tokens.len() {
            return Err(bad(format!(
                "oth covers {} tokens, the request carries {}",
                oth.len(),
                req.other_tokens.len()
            )));
        }
        for (name, token) in &req.other_tokens {
            check_hash(
                &format!("oth.{name}"),
                oth.get(*name).map(String::as_str),
                Some(token.trim()),
            )
            .map_err(bad)?;
        }
        self.replay.check_and_insert(
            &format!("{}.{}", c.wth, c.jti),
            c.exp + self.leeway + 1,
            now,
        )?;
        Ok(WimseVerified { wit, wpt: c })
    }

    fn check_wit(
        &self,
        wit: &str,
        bundle: &serde_json::Value,
        now: i64,
    ) -> Result<WitClaims, VerifyError> {
        let bad = |m: String| VerifyError::Rejected(format!("WIT: {m}"));
        let h = raw_header(wit).map_err(bad)?;
        if h.get("typ").and_then(|v| v.as_str()) != Some("wit+jwt") {
            return Err(bad(format!("typ {} is not wit+jwt", h["typ"])));
        }
        let kid = h
            .get("kid")
            .and_then(|v| v.as_str())
            .ok_or(VerifyError::NoKid)?;
        // Only a key the bundle publishes for WITs: an agent's token key signs no WIT.
        let key = bundle
            .get("keys")
            .and_then(|k| k.as_array())
            .into_iter()
            .flatten()
            .find(|k| {
                k.get("use").and_then(|u| u.as_str()) == Some("wit-svid")
                    && k.get("kid").and_then(|u| u.as_str()) == Some(kid)
            })
            .ok_or_else(|| VerifyError::UnknownKey(kid.to_string()))?;
        let jwk: Jwk =
            serde_json::from_value(key.clone()).map_err(|e| bad(format!("bundle key: {e}")))?;
        let alg = algorithm_of(&jwk).map_err(bad)?;
        if h.get("alg").and_then(|v| v.as_str()) != Some(format!("{alg:?}").as_str()) {
            return Err(bad(format!("alg {} is not the key's {alg:?}", h["alg"])));
        }
        let raw: serde_json::Value = decode_signed(wit, &jwk, alg).map_err(bad)?;
        if raw.get("aud").is_some() {
            return Err(bad("a WIT has no aud".into()));
        }
        let c: WitClaims = serde_json::from_value(raw).map_err(|e| bad(e.to_string()))?;
        if c.exp <= now - self.leeway {
            return Err(bad(format!("expired at {}", c.exp)));
        }
        if c.iat.is_some_and(|iat| iat > now + self.leeway) {
            return Err(bad("issued in the future".into()));
        }
        let Some(id) = c.sub.strip_prefix("spiffe://") else {
            return Err(bad(format!("sub {:?} is not a SPIFFE ID", c.sub)));
        };
        if id.split('/').next() != Some(self.trust_domain.as_str()) {
            return Err(bad(format!(
                "sub {:?} is not in trust domain {}",
                c.sub, self.trust_domain
            )));
        }
        Ok(c)
    }
}

/// The WPT of an `Authorization: WPT <jwt>` header value (draft-ietf-wimse-wpt-02).
pub fn wpt_from_authorization(value: &str) -> Option<&str> {
    let (scheme, jwt) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("WPT").then(|| jwt.trim())
}

/// A hash claim and the token it covers: both or neither, and equal.
fn check_hash(name: &str, claim: Option<&str>, token: Option<&str>) -> Result<(), String> {
    match (claim, token) {
        (None, None) => Ok(()),
        (Some(h), Some(t)) if h == b64_sha256(t) => Ok(()),
        (Some(_), Some(_)) => Err(format!("{name} is not the hash of the token sent")),
        (Some(_), None) => Err(format!("{name} given but its token was not sent")),
        (None, Some(_)) => Err(format!("a token was sent that {name} does not cover")),
    }
}
