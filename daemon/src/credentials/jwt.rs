//! Agent tokens (RFC 7519, ES256): the claims, the signing input the issuer hands to the key
//! store, and the compact serialisation. Nothing here signs.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use p256::ecdsa::Signature;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::agents::{now_unix, Agent};
use crate::keystore::ecdsa;

/// The claims of one agent token.
pub struct Claims {
    pub iss: String,
    pub sub: String,
    /// A string, or an array when a JWT-SVID names several audiences.
    pub aud: Value,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
    /// Space separated; absent when no scope was asked for.
    pub scope: Option<String>,
    /// `cnf` of a bound token: `{"jkt": …}` (DPoP, RFC 9449 §6) or `{"x5t#S256": …}` (a
    /// certificate, RFC 8705 §3.1).
    pub cnf: Option<Value>,
}

impl Claims {
    /// Claims for `agent` from now, with a fresh 128-bit `jti`.
    pub fn new(iss: &str, agent: &Agent, aud: &str, scopes: &[String], ttl_secs: u64) -> Claims {
        let iat = now_unix();
        Claims {
            iss: iss.to_string(),
            sub: agent.id.clone(),
            aud: json!(aud),
            iat,
            exp: iat + ttl_secs as i64,
            jti: new_jti(),
            scope: (!scopes.is_empty()).then(|| scopes.join(" ")),
            cnf: None,
        }
    }
}

/// `base64url(header).base64url(claims)` with header `{"alg":<alg>,"typ":"JWT","kid":..}`;
/// `alg` is "ES256", or "RS256" for an RSA agent.
pub fn signing_input(alg: &str, kid: &str, c: &Claims) -> String {
    let header = json!({"alg": alg, "typ": "JWT", "kid": kid});
    let mut claims = json!({
        "iss": c.iss,
        "sub": c.sub,
        "aud": c.aud,
        "iat": c.iat,
        "exp": c.exp,
        "jti": c.jti,
    });
    if let Some(scope) = &c.scope {
        claims["scope"] = json!(scope);
    }
    if let Some(cnf) = &c.cnf {
        claims["cnf"] = cnf.clone();
    }
    encode(&header, &claims)
}

fn encode(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    )
}

/// A 128-bit random `jti`, base64url.
pub fn new_jti() -> String {
    B64.encode(rand::random::<[u8; 16]>())
}

/// `base64url(SHA-256(s))`: DPoP's `ath` of an access token.
pub fn b64_sha256(s: &str) -> String {
    B64.encode(Sha256::digest(s.as_bytes()))
}

/// The claims of one DPoP proof (RFC 9449 §4.2).
pub struct DpopClaims {
    pub jti: String,
    pub htm: String,
    pub htu: String,
    pub iat: i64,
    pub ath: Option<String>,
    pub nonce: Option<String>,
}

/// Signing input of a DPoP proof: header `{"typ":"dpop+jwt","alg":"ES256","jwk":<public key>}`
/// (the key's public members only), then the claims.
pub fn dpop_signing_input(jwk: &Value, c: &DpopClaims) -> String {
    let public = json!({"kty": jwk["kty"], "crv": jwk["crv"], "x": jwk["x"], "y": jwk["y"]});
    // (No `alg` in the DPoP header's key: the header's own `alg` says it.)
    let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": public});
    let mut claims = json!({"jti": c.jti, "htm": c.htm, "htu": c.htu, "iat": c.iat});
    if let Some(ath) = &c.ath {
        claims["ath"] = json!(ath);
    }
    if let Some(nonce) = &c.nonce {
        claims["nonce"] = json!(nonce);
    }
    encode(&header, &claims)
}

/// What ES256 signs: SHA-256 of the signing input.
pub fn digest(signing_input: &str) -> [u8; 32] {
    Sha256::digest(signing_input.as_bytes()).into()
}

/// The compact JWS with a raw signature (RS256: the RSASSA-PKCS1-v1_5 signature bytes).
pub fn compact_raw(signing_input: &str, sig: &[u8]) -> String {
    format!("{signing_input}.{}", B64.encode(sig))
}

/// The compact JWS: signing input, then the JOSE (r‖s) signature.
pub fn compact(signing_input: &str, sig: &Signature) -> String {
    format!("{signing_input}.{}", B64.encode(ecdsa::to_jose(sig)))
}

/// The claims of a WIMSE Workload Identity Token (draft-ietf-wimse-workload-creds).
pub struct WitClaims {
    /// The host's SPIFFE id (never the federation issuer).
    pub iss: String,
    /// The agent's SPIFFE id.
    pub sub: String,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
    /// The proof key the WIT binds (public members, with `alg`).
    pub cnf_jwk: Value,
}

/// Signing input of a WIT: header `{"typ":"wit+jwt","alg":"ES256","kid":<host CA key
/// thumbprint>}`, no `aud`.
pub fn wit_signing_input(ca_kid: &str, c: &WitClaims) -> String {
    let header = json!({"typ": "wit+jwt", "alg": "ES256", "kid": ca_kid});
    let claims = json!({
        "iss": c.iss, "sub": c.sub, "iat": c.iat, "exp": c.exp, "jti": c.jti,
        "cnf": {"jwk": c.cnf_jwk},
    });
    encode(&header, &claims)
}

/// The claims of a WIMSE Workload Proof Token (draft-ietf-wimse-wpt).
pub struct WptClaims {
    pub aud: String,
    pub exp: i64,
    pub jti: String,
    /// base64url SHA-256 of the WIT it goes with.
    pub wth: String,
    pub ath: Option<String>,
    pub tth: Option<String>,
    pub oth: Option<Value>,
}

/// Signing input of a WPT: header `{"typ":"wpt+jwt","alg":"ES256"}`.
pub fn wpt_signing_input(c: &WptClaims) -> String {
    let header = json!({"typ": "wpt+jwt", "alg": "ES256"});
    let mut claims = json!({"aud": c.aud, "exp": c.exp, "jti": c.jti, "wth": c.wth});
    for (k, v) in [("ath", &c.ath), ("tth", &c.tth)] {
        if let Some(v) = v {
            claims[k] = json!(v);
        }
    }
    if let Some(oth) = &c.oth {
        claims["oth"] = oth.clone();
    }
    encode(&header, &claims)
}

/// The public members of a P-256 JWK, with `alg` (what `cnf.jwk` carries).
pub fn public_jwk(jwk: &Value) -> Value {
    json!({"kty": jwk["kty"], "crv": jwk["crv"], "x": jwk["x"], "y": jwk["y"], "alg": "ES256"})
}
