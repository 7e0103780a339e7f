//! Key attestation evidence for the caller's key, bound to a relying party's nonce: TPM2_Certify
//! by the attestation key, or (PKCS#11) the token's own answers, labelled as not evidence.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use p256::pkcs8::{EncodePublicKey, LineEnding};
use serde_json::{json, Value};

use crate::audit::Event;
use crate::caller::Caller;
use crate::credentials::problem::{Kind, Problem};
use crate::credentials::x509;
use crate::credentials::{rfc3339, Credentials};
use crate::keystore::{KeyEvidence, MAX_NONCE};

/// Smallest nonce accepted: a relying party's nonce must be unpredictable to mean anything.
pub const MIN_NONCE: usize = 8;

impl Credentials {
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
            .map_err(|e| self.signing_problem(&agent, e))?;
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
            .caller(caller.record())
            .details(json!({"format": body["format"], "nonce": nonce_hex, "kid": agent.kid}));
        self.release(caller, &agent, ev, "evidence").await?;
        Ok(body)
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
