//! Relying-party checks of what tessera hands an agent, by libraries' rules, not the daemon's
//! word:
//! - [`verify`]: a bearer agent token (ES256/RS256 against a JWKS by `kid`, `typ` `JWT`, `iss`,
//!   `sub`, `aud`, `exp`, `nbf`, `iat` within a leeway). A token bound to a key (`cnf`) is refused
//!   here: it is only good with a proof ([`dpop`]).
//! - [`dpop`]: a DPoP-bound token and its proof (RFC 9449 §4.3, §7.1), with a bounded replay cache.
//! - [`wimse`]: a WIMSE Workload Identity Token and Workload Proof Token.
//! - [`httpsig`]: an HTTP Message Signature (RFC 9421) made by tesserad.
//!
//! Every check fails closed: an unknown key, an unexpected type, a full replay cache all refuse.

pub mod dpop;
pub mod httpsig;
mod replay;
pub mod wimse;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use replay::ReplayCache;

/// What a bound token says about its key (RFC 7800 / RFC 9449 §6).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Confirmation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jkt: Option<String>,
    #[serde(default, rename = "x5t#S256", skip_serializing_if = "Option::is_none")]
    pub x5t_s256: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Present on sender-constrained tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
}

impl Claims {
    pub fn scopes(&self) -> Vec<&str> {
        self.scope
            .as_deref()
            .map(|s| s.split(' ').collect())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub audience: String,
    pub issuer: Option<String>,
    /// Allowed clock skew, seconds.
    pub leeway: u64,
}

impl Options {
    pub fn new(audience: impl Into<String>) -> Options {
        Options {
            audience: audience.into(),
            issuer: None,
            leeway: 30,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token has no kid")]
    NoKid,
    #[error("no key {0} in the key set (unknown, or the agent was revoked)")]
    UnknownKey(String),
    #[error("token rejected: {0}")]
    Rejected(String),
    #[error("token issued in the future (iat {iat}, now {now})")]
    IssuedInFuture { iat: i64, now: i64 },
    #[error("the token is bound to a key (cnf); accept it only with its proof (DPoP)")]
    Bound,
    #[error("proof rejected: {0}")]
    Proof(String),
    /// The relying party asked for a server nonce the proof lacks or does not carry: answer
    /// 401 `use_dpop_nonce` with a `DPoP-Nonce` header (RFC 9449 §8).
    #[error("the proof does not carry the server's current nonce")]
    UseNonce,
    #[error("proof {0} was seen before (replay)")]
    Replay(String),
    /// Fail closed: the replay cache holds as many unexpired proofs as it may.
    #[error("replay cache full ({0} unexpired proofs); refusing new proofs until some expire")]
    ReplayCacheFull(usize),
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// base64url(SHA-256(text)): `ath`, `wth`, `tth`, `oth` values.
pub fn b64_sha256(text: &str) -> String {
    B64.encode(Sha256::digest(text.as_bytes()))
}

/// A key published for agent tokens and signatures: `use` absent, `sig` or `jwt-svid` (a
/// SPIFFE bundle's `wit-svid` and `x509-svid` keys sign no token).
pub(crate) fn usable_for_tokens(k: &serde_json::Value) -> bool {
    matches!(
        k.get("use").and_then(|u| u.as_str()),
        None | Some("sig" | "jwt-svid")
    )
}

/// The algorithm a key is used with: ES256 for P-256, RS256 for RSA; nothing else.
pub(crate) fn algorithm_of(jwk: &Jwk) -> Result<Algorithm, String> {
    match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(p)
            if p.curve == jsonwebtoken::jwk::EllipticCurve::P256 =>
        {
            Ok(Algorithm::ES256)
        }
        AlgorithmParameters::RSA(_) => Ok(Algorithm::RS256),
        _ => Err("only P-256 (ES256) and RSA (RS256) keys are accepted".into()),
    }
}

/// A public key given inside a token or proof (`jwk`, `cnf.jwk`): a JSON object with no private
/// members, of a kind [`algorithm_of`] accepts. Returns it and its RFC 7638 thumbprint.
pub(crate) fn public_jwk(v: &serde_json::Value) -> Result<(Jwk, Algorithm, String), String> {
    let obj = v.as_object().ok_or("the key is not a JSON object")?;
    for private in ["d", "p", "q", "dp", "dq", "qi", "oth", "k"] {
        if obj.contains_key(private) {
            return Err(format!("the key holds the private member {private:?}"));
        }
    }
    let jwk: Jwk = serde_json::from_value(v.clone()).map_err(|e| format!("key: {e}"))?;
    let alg = algorithm_of(&jwk)?;
    let thumb = jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256);
    Ok((jwk, alg, thumb))
}

/// The JSON of a compact JWS's protected header, as sent (jsonwebtoken's `Header` drops
/// members it does not know, and a proof's `jwk` must be checked for private parts).
pub(crate) fn raw_header(jws: &str) -> Result<serde_json::Value, String> {
    let h = jws.split('.').next().unwrap_or_default();
    let bytes = B64.decode(h).map_err(|e| format!("header: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("header: {e}"))
}

/// Decode a JWS signed by `jwk` with claims as `T`, checking nothing but the signature and the
/// algorithm (the callers check the claims).
pub(crate) fn decode_signed<T: serde::de::DeserializeOwned>(
    jws: &str,
    jwk: &Jwk,
    alg: Algorithm,
) -> Result<T, String> {
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key: {e}"))?;
    let mut v = Validation::new(alg);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_aud = false;
    decode::<T>(jws, &key, &v)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

/// Check a compact JWS's signature with one key, `jwk` (JSON): ES256 for P-256, RS256 for RSA,
/// the algorithm taken from the key and required in the header. Returns the header and the
/// claims, neither checked further (for callers that check claims themselves).
pub fn verify_with_jwk(
    jws: &str,
    jwk: &serde_json::Value,
) -> Result<(serde_json::Value, serde_json::Value), String> {
    let (key, alg, _) = public_jwk(jwk)?;
    let header = raw_header(jws)?;
    let want = if alg == Algorithm::RS256 {
        "RS256"
    } else {
        "ES256"
    };
    if header.get("alg").and_then(|a| a.as_str()) != Some(want) {
        return Err(format!("alg is not {want}"));
    }
    let claims: serde_json::Value = decode_signed(jws, &key, alg)?;
    Ok((header, claims))
}

/// Verify a **bearer** `token` against `jwks` (the JSON of `/v1/jwks`). A token with `cnf` is
/// refused ([`VerifyError::Bound`]): it is worth nothing without its proof.
pub fn verify(
    token: &str,
    jwks: &serde_json::Value,
    opts: &Options,
) -> Result<Claims, VerifyError> {
    let claims = verify_signed(token, jwks, opts)?;
    if claims.cnf.is_some() {
        return Err(VerifyError::Bound);
    }
    Ok(claims)
}

/// base64url SHA-256 of a DER certificate: its `x5t#S256` (RFC 8705 §3.1).
pub fn x5t_s256(der: &[u8]) -> String {
    B64.encode(Sha256::digest(der))
}

/// Verify a certificate-bound token (RFC 8705 §3) presented on a mutual-TLS connection whose
/// client certificate is `client_cert_der`: the token as [`verify_signed`] checks it, and its
/// `cnf["x5t#S256"]` must be that certificate's hash.
pub fn verify_mtls(
    token: &str,
    jwks: &serde_json::Value,
    opts: &Options,
    client_cert_der: &[u8],
) -> Result<Claims, VerifyError> {
    let claims = verify_signed(token, jwks, opts)?;
    let bound = claims.cnf.as_ref().and_then(|c| c.x5t_s256.as_deref());
    match bound {
        Some(t) if t == x5t_s256(client_cert_der) => Ok(claims),
        Some(_) => Err(VerifyError::Rejected(
            "the token is bound to another certificate than the connection's".into(),
        )),
        None => Err(VerifyError::Rejected(
            "the token is not bound to a certificate (no cnf x5t#S256)".into(),
        )),
    }
}

/// Check an agent token's signature and claims without deciding how it may be presented
/// (bearer or bound): for tools that inspect tokens. Relying parties use [`verify`] or
/// [`dpop::DpopVerifier`].
pub fn verify_signed(
    token: &str,
    jwks: &serde_json::Value,
    opts: &Options,
) -> Result<Claims, VerifyError> {
    let header = decode_header(token).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    // Only agent tokens: a DPoP proof, checkpoint or WIT signed by a key in the set is not
    // a token (explicit typing, RFC 8725 §3.11).
    if header.typ.as_deref() != Some("JWT") {
        return Err(VerifyError::Rejected(format!(
            "typ {:?} is not JWT",
            header.typ.as_deref().unwrap_or("(none)")
        )));
    }
    let kid = header.kid.ok_or(VerifyError::NoKid)?;
    // The key by kid, among those published for tokens; only that key is parsed (no copy of
    // the whole set per token).
    let raw = jwks
        .get("keys")
        .and_then(|k| k.as_array())
        .into_iter()
        .flatten()
        .find(|k| {
            k.get("kid").and_then(|v| v.as_str()) == Some(kid.as_str()) && usable_for_tokens(k)
        })
        .ok_or_else(|| VerifyError::UnknownKey(kid.clone()))?;
    let jwk: Jwk = serde_json::from_value(raw.clone())
        .map_err(|e| VerifyError::Malformed(format!("JWK {kid}: {e}")))?;
    let jwk = &jwk;
    // The key decides the algorithm, never the token's header.
    let alg = algorithm_of(jwk).map_err(VerifyError::Rejected)?;
    if header.alg != alg {
        return Err(VerifyError::Rejected(format!(
            "algorithm {:?} is not the key's {alg:?}",
            header.alg
        )));
    }
    let key = DecodingKey::from_jwk(jwk)
        .map_err(|e| VerifyError::Malformed(format!("JWK {kid}: {e}")))?;
    let mut v = Validation::new(alg);
    v.set_audience(&[&opts.audience]);
    if let Some(iss) = &opts.issuer {
        v.set_issuer(&[iss]);
    }
    v.leeway = opts.leeway;
    v.validate_nbf = true;
    v.set_required_spec_claims(&["exp", "aud", "sub", "iat", "iss"]);
    let data =
        decode::<Claims>(token, &key, &v).map_err(|e| VerifyError::Rejected(e.to_string()))?;
    let now = now();
    if data.claims.iat > now + opts.leeway as i64 {
        return Err(VerifyError::IssuedInFuture {
            iat: data.claims.iat,
            now,
        });
    }
    Ok(data.claims)
}
