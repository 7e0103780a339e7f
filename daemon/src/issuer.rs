//! Builds credentials and is the only code that asks the key store to sign. It signs only
//! payloads it built itself, after the policy check; there is no path that signs bytes a
//! caller supplied.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use p256::ecdsa::VerifyingKey;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use p256::ecdsa::Signature;
use x509_cert::certificate::{Certificate, TbsCertificate};
use x509_cert::crl::{CertificateList, TbsCertList};
use x509_cert::der::Encode;
use x509_cert::request::{CertReq, CertReqInfo};

use crate::keystore::{ecdsa, owner::KeyStoreHandle, KeyEvidence, KeyStoreError};
use crate::registry::Agent;
use crate::x509::{self, X509Error};

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    KeyStore(#[from] KeyStoreError),
    #[error("X.509: {0}")]
    X509(#[from] X509Error),
}

/// RFC 7517 public JWK for a P-256 key, with `kid` = RFC 7638 thumbprint.
pub fn jwk_of(key: &VerifyingKey) -> (String, Value) {
    // Uncompressed SEC1: 0x04 || X (32) || Y (32).
    let point = key.to_encoded_point(false);
    let bytes = point.as_bytes();
    let x = B64.encode(&bytes[1..33]);
    let y = B64.encode(&bytes[33..65]);
    // RFC 7638: required members only, lexicographic order, no whitespace.
    let thumb_input = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    let kid = B64.encode(Sha256::digest(thumb_input.as_bytes()));
    let jwk = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "alg": "ES256", "use": "sig"});
    (kid, jwk)
}

pub struct IssuedToken {
    pub token: String,
    pub jti: String,
    pub iat: i64,
    pub exp: i64,
}

#[derive(Clone)]
pub struct Issuer {
    keystore: KeyStoreHandle,
}

impl Issuer {
    pub fn new(keystore: KeyStoreHandle) -> Issuer {
        Issuer { keystore }
    }

    /// An ES256 JWT for `agent`, signed by its own key. Policy must already have been checked.
    pub async fn jwt(
        &self,
        issuer: &str,
        agent: &Agent,
        audience: &str,
        scopes: &[String],
        ttl_secs: u64,
    ) -> Result<IssuedToken, KeyStoreError> {
        let kid = agent.kid.clone().unwrap_or_default();
        let iat = crate::registry::now_unix();
        let exp = iat + ttl_secs as i64;
        let jti = B64.encode(rand::random::<[u8; 16]>());
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": kid});
        let mut claims = json!({
            "iss": issuer,
            "sub": agent.id,
            "aud": audience,
            "iat": iat,
            "exp": exp,
            "jti": jti,
        });
        if !scopes.is_empty() {
            claims["scope"] = json!(scopes.join(" "));
        }
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let digest: [u8; 32] = Sha256::digest(signing_input.as_bytes()).into();
        let sig = self.keystore.sign(&agent.key_id, digest).await?;
        let token = format!("{signing_input}.{}", B64.encode(ecdsa::to_jose(&sig)));
        Ok(IssuedToken {
            token,
            jti,
            iat,
            exp,
        })
    }

    /// ECDSA signature by `key_id` over SHA-256 of the DER of a structure built here.
    async fn sign_der<T: Encode>(&self, key_id: &str, tbs: &T) -> Result<Signature, IssueError> {
        let (_, digest) = x509::to_be_signed(tbs)?;
        Ok(self.keystore.sign(key_id, digest).await?)
    }

    /// Sign a certificate (host CA or agent) with the host CA key `ca_key_id`.
    pub async fn certificate(
        &self,
        ca_key_id: &str,
        tbs: TbsCertificate,
    ) -> Result<Certificate, IssueError> {
        let sig = self.sign_der(ca_key_id, &tbs).await?;
        Ok(x509::assemble_certificate(tbs, &sig)?)
    }

    pub async fn crl(
        &self,
        ca_key_id: &str,
        tbs: TbsCertList,
    ) -> Result<CertificateList, IssueError> {
        let sig = self.sign_der(ca_key_id, &tbs).await?;
        Ok(x509::assemble_crl(tbs, &sig)?)
    }

    /// PKCS#10 request signed by the key it names (proof of possession).
    pub async fn csr(&self, key_id: &str, info: CertReqInfo) -> Result<CertReq, IssueError> {
        let sig = self.sign_der(key_id, &info).await?;
        Ok(x509::assemble_csr(info, &sig)?)
    }

    /// Evidence about where `agent`'s key lives, bound to the relying party's nonce.
    pub async fn evidence(
        &self,
        agent: &Agent,
        nonce: &[u8],
    ) -> Result<KeyEvidence, KeyStoreError> {
        self.keystore.attest(&agent.key_id, nonce).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprint_matches_rfc7638_example_shape() {
        let sk = p256::ecdsa::SigningKey::from_slice(&[3u8; 32]).unwrap();
        let (kid, jwk) = jwk_of(sk.verifying_key());
        assert_eq!(kid.len(), 43);
        assert_eq!(jwk["kid"], kid);
        // Independent recomputation from the JWK members.
        let input = format!(
            "{{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"{}\",\"y\":\"{}\"}}",
            jwk["x"].as_str().unwrap(),
            jwk["y"].as_str().unwrap()
        );
        assert_eq!(kid, B64.encode(Sha256::digest(input.as_bytes())));
    }
}
