//! Builds credentials and is the only code that asks the key store to sign. It signs only
//! payloads it built itself, after the policy check; there is no path that signs bytes a
//! caller supplied.

use p256::ecdsa::Signature;
use x509_cert::certificate::{Certificate, TbsCertificate};
use x509_cert::crl::{CertificateList, TbsCertList};
use x509_cert::der::Encode;
use x509_cert::request::{CertReq, CertReqInfo};

use crate::agents::Agent;
use crate::credentials::jwt::{self, Claims};
use crate::credentials::x509::{self, X509Error};
use crate::keystore::{owner::KeyStoreHandle, KeyEvidence, KeyStoreError};

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    KeyStore(#[from] KeyStoreError),
    #[error("X.509: {0}")]
    X509(#[from] X509Error),
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
        cnf: Option<serde_json::Value>,
    ) -> Result<IssuedToken, KeyStoreError> {
        let mut claims = Claims::new(issuer, agent, audience, scopes, ttl_secs);
        claims.cnf = cnf;
        self.sign_claims(agent, claims).await
    }

    /// A JWT-SVID for `agent`: a token whose `aud` is the one audience asked for, or all of
    /// them as an array. Policy must already have been checked for every audience.
    pub async fn jwt_svid(
        &self,
        issuer: &str,
        agent: &Agent,
        audiences: &[String],
        ttl_secs: u64,
    ) -> Result<IssuedToken, KeyStoreError> {
        let first = audiences.first().map(String::as_str).unwrap_or_default();
        let mut claims = Claims::new(issuer, agent, first, &[], ttl_secs);
        if audiences.len() > 1 {
            claims.aud = serde_json::json!(audiences);
        }
        self.sign_claims(agent, claims).await
    }

    async fn sign_claims(
        &self,
        agent: &Agent,
        claims: Claims,
    ) -> Result<IssuedToken, KeyStoreError> {
        let kid = agent.kid.as_deref().unwrap_or_default();
        let token = if agent.policy.rsa_key() {
            let signing_input = jwt::signing_input("RS256", kid, &claims);
            let sig = self
                .keystore
                .sign_rsa(&agent.key_id, jwt::digest(&signing_input))
                .await?;
            jwt::compact_raw(&signing_input, &sig)
        } else {
            let signing_input = jwt::signing_input("ES256", kid, &claims);
            let sig = self
                .keystore
                .sign(&agent.key_id, jwt::digest(&signing_input))
                .await?;
            jwt::compact(&signing_input, &sig)
        };
        Ok(IssuedToken {
            token,
            jti: claims.jti,
            iat: claims.iat,
            exp: claims.exp,
        })
    }

    /// A WIT for `agent`, signed by the host CA key `ca_key_id` (whose thumbprint is `ca_kid`).
    pub async fn wit(
        &self,
        ca_key_id: &str,
        ca_kid: &str,
        claims: &jwt::WitClaims,
    ) -> Result<String, KeyStoreError> {
        let input = jwt::wit_signing_input(ca_kid, claims);
        let sig = self.keystore.sign(ca_key_id, jwt::digest(&input)).await?;
        Ok(jwt::compact(&input, &sig))
    }

    /// An RFC 9421 `ecdsa-p256-sha256` signature by `agent`'s key over a signature base
    /// built by [`crate::credentials::httpsig`]: standard base64 of r‖s.
    pub async fn http_signature(&self, agent: &Agent, base: &str) -> Result<String, KeyStoreError> {
        let sig = self.keystore.sign(&agent.key_id, jwt::digest(base)).await?;
        use base64::Engine as _;
        Ok(base64::engine::general_purpose::STANDARD.encode(crate::keystore::ecdsa::to_jose(&sig)))
    }

    /// A TLS 1.3 CertificateVerify signature (DER ECDSA) by the agent's key; `digest` is the
    /// SHA-256 of a content the caller has checked with
    /// [`crate::credentials::tls::check_content`].
    pub async fn tls_certificate_verify(
        &self,
        agent: &Agent,
        digest: [u8; 32],
    ) -> Result<Vec<u8>, KeyStoreError> {
        let sig = self.keystore.sign(&agent.key_id, digest).await?;
        Ok(sig.to_der().as_bytes().to_vec())
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
