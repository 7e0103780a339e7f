//! Relying-party check of an agent token: ES256 signature against a JWKS (by `kid`),
//! `aud`, `exp`, `nbf` and `iat` within a clock-skew leeway, optionally `iss`.

use jsonwebtoken::{decode, decode_header, jwk::JwkSet, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

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
}

/// Verify `token` against `jwks` (the JSON of `/v1/jwks`).
pub fn verify(
    token: &str,
    jwks: &serde_json::Value,
    opts: &Options,
) -> Result<Claims, VerifyError> {
    let header = decode_header(token).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    if header.alg != Algorithm::ES256 {
        return Err(VerifyError::Rejected(format!(
            "algorithm {:?} is not ES256",
            header.alg
        )));
    }
    // Only agent tokens: a DPoP proof, checkpoint or WIT signed by a key in the set is not
    // a token (explicit typing, RFC 8725 §3.11).
    if header.typ.as_deref() != Some("JWT") {
        return Err(VerifyError::Rejected(format!(
            "typ {:?} is not JWT",
            header.typ.as_deref().unwrap_or("(none)")
        )));
    }
    let kid = header.kid.ok_or(VerifyError::NoKid)?;
    let set: JwkSet = serde_json::from_value(jwks.clone())
        .map_err(|e| VerifyError::Malformed(format!("JWKS: {e}")))?;
    let jwk = set
        .find(&kid)
        .ok_or_else(|| VerifyError::UnknownKey(kid.clone()))?;
    let key = DecodingKey::from_jwk(jwk)
        .map_err(|e| VerifyError::Malformed(format!("JWK {kid}: {e}")))?;
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&[&opts.audience]);
    if let Some(iss) = &opts.issuer {
        v.set_issuer(&[iss]);
    }
    v.leeway = opts.leeway;
    v.validate_nbf = true;
    v.set_required_spec_claims(&["exp", "aud", "sub", "iat", "iss"]);
    let data =
        decode::<Claims>(token, &key, &v).map_err(|e| VerifyError::Rejected(e.to_string()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if data.claims.iat > now + opts.leeway as i64 {
        return Err(VerifyError::IssuedInFuture {
            iat: data.claims.iat,
            now,
        });
    }
    Ok(data.claims)
}
