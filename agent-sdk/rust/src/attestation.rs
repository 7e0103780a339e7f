//! Verify key attestation evidence (`GET /v1/attestation`, format `tpm2-certify`) as a
//! relying party: the TPM's attestation key (AK) signed a TPMS_ATTEST that certifies the
//! agent key's name, over your nonce; the key's TPMT_PUBLIC says it was made inside the TPM
//! (fixedTPM, fixedParent, sensitiveDataOrigin) and only signs; and it is the key you were
//! shown in the agent's JWK or certificate.
//!
//! What this does not do: decide whether to trust the AK. The evidence carries the TPM's EK
//! certificates, but binding the AK to the EK (credential activation with a fleet
//! attestation CA) is out of band; pin the AK you trust with [`Expectations::ak`].
//! `agent`, `id` and `kid` in the JSON are not signed: bind the key with
//! [`Expectations::key`].

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use p256::ecdsa::{signature::Verifier, Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Evidence as `GET /v1/attestation` returns it.
#[derive(Debug, Clone, Deserialize)]
pub struct Evidence {
    pub format: String,
    pub nonce: String,
    #[serde(default)]
    pub attest: String,
    #[serde(default)]
    pub signature: String,
    #[serde(default)]
    pub ak_public: String,
    #[serde(default)]
    pub key_public: String,
    #[serde(default)]
    pub ek_certificates: Vec<String>,
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub kid: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AttestationError {
    #[error("evidence is not valid JSON: {0}")]
    Json(String),
    #[error("format {0:?} is not hardware evidence (only tpm2-certify is)")]
    NotHardwareEvidence(String),
    #[error("{field} is not valid {what}: {detail}")]
    Encoding {
        field: &'static str,
        what: &'static str,
        detail: String,
    },
    #[error("nonce does not match the one you sent")]
    NonceMismatch,
    #[error("AK signature over attest does not verify")]
    BadSignature,
    #[error("attestation key is not the one you trust")]
    UnexpectedAk,
    #[error("attest is not a TPM-generated certify structure: {0}")]
    BadAttest(String),
    #[error("key_public is not a TPMT_PUBLIC of an ECC P-256 key: {0}")]
    BadKeyPublic(String),
    #[error("the certified name is not the name of key_public")]
    NameMismatch,
    #[error("key attributes do not prove a TPM-made, sign-only key: {0}")]
    Attributes(String),
    #[error("certified key is not the agent's key")]
    KeyMismatch,
}

/// What the relying party expects. All three are required: evidence checked without the
/// agent's key proves nothing about *that* key, and evidence checked against the AK it
/// carries itself proves nothing at all (anyone can make an AK and sign a forged attest).
#[derive(Debug, Clone)]
pub struct Expectations {
    /// The nonce you sent (evidence without your nonce may be replayed).
    pub nonce: Vec<u8>,
    /// The agent key from its JWK or certificate.
    pub key: VerifyingKey,
    /// The AK you trust, recorded when the host was provisioned (the `ak_public` of evidence
    /// taken then) or vouched for by a fleet attestation CA.
    pub ak: VerifyingKey,
}

/// What verified evidence tells you.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The agent key the TPM certified.
    pub key: VerifyingKey,
    /// Its TPMA_OBJECT bits.
    pub object_attributes: u32,
    /// The key's TPM name (nameAlg || SHA-256 of TPMT_PUBLIC).
    pub name: Vec<u8>,
    pub ak: VerifyingKey,
    /// TPM clock (ms) at certification.
    pub clock: u64,
    /// EK certificates the evidence carried (PEM), unverified.
    pub ek_certificates: Vec<String>,
}

// TPMA_OBJECT bits (TPM 2.0 Part 2, 8.3).
pub const FIXED_TPM: u32 = 1 << 1;
pub const FIXED_PARENT: u32 = 1 << 4;
pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
pub const RESTRICTED: u32 = 1 << 16;
pub const DECRYPT: u32 = 1 << 17;
pub const SIGN: u32 = 1 << 18;

const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
const TPM_ST_ATTEST_CERTIFY: u16 = 0x8017;
const TPM_ALG_ECC: u16 = 0x0023;
const TPM_ALG_SHA256: u16 = 0x000b;
const TPM_ALG_NULL: u16 = 0x0010;
const TPM_ALG_ECDSA: u16 = 0x0018;
const TPM_ECC_NIST_P256: u16 = 0x0003;

/// A bounds-checked big-endian reader over TPM marshalled bytes.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() < n {
            return Err(format!("{} is truncated", self.what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let hi = self.u32()? as u64;
        let lo = self.u32()? as u64;
        Ok((hi << 32) | lo)
    }
    fn tpm2b(&mut self) -> Result<&'a [u8], String> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    fn end(&self) -> Result<(), String> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} has {} trailing bytes",
                self.what,
                self.buf.len()
            ))
        }
    }
}

/// The fields of a TPMS_ATTEST of type certify that matter here.
#[derive(Debug, Clone)]
pub struct CertifyInfo {
    pub extra_data: Vec<u8>,
    pub clock: u64,
    pub name: Vec<u8>,
}

/// Unmarshal a TPMS_ATTEST of type certify (TPM 2.0 Part 2, 10.12.12), bounds-checked, with
/// no trailing bytes. [`verify`] calls it only on bytes whose signature checked.
pub fn parse_attest(bytes: &[u8]) -> Result<CertifyInfo, String> {
    let mut r = Reader {
        buf: bytes,
        what: "attest",
    };
    if r.u32()? != TPM_GENERATED_VALUE {
        return Err("magic is not TPM_GENERATED_VALUE".into());
    }
    if r.u16()? != TPM_ST_ATTEST_CERTIFY {
        return Err("type is not TPM_ST_ATTEST_CERTIFY".into());
    }
    let _qualified_signer = r.tpm2b()?;
    let extra_data = r.tpm2b()?.to_vec();
    let clock = r.u64()?;
    let _reset = r.u32()?;
    let _restart = r.u32()?;
    let _safe = r.take(1)?;
    let _firmware = r.u64()?;
    let name = r.tpm2b()?.to_vec();
    let _qualified_name = r.tpm2b()?;
    r.end()?;
    Ok(CertifyInfo {
        extra_data,
        clock,
        name,
    })
}

/// The parts of an ECC TPMT_PUBLIC this checks.
#[derive(Debug, Clone)]
pub struct EccPublic {
    pub object_attributes: u32,
    pub key: VerifyingKey,
}

/// Unmarshal a TPMT_PUBLIC of an ECDSA P-256 signing key (TPM 2.0 Part 2, 12.2.4); anything
/// else is an error.
pub fn parse_ecc_public(bytes: &[u8]) -> Result<EccPublic, String> {
    let mut r = Reader {
        buf: bytes,
        what: "key_public",
    };
    if r.u16()? != TPM_ALG_ECC {
        return Err("type is not ECC".into());
    }
    if r.u16()? != TPM_ALG_SHA256 {
        return Err("nameAlg is not SHA-256".into());
    }
    let object_attributes = r.u32()?;
    let _auth_policy = r.tpm2b()?;
    // TPMT_SYM_DEF_OBJECT: a signing key has none.
    if r.u16()? != TPM_ALG_NULL {
        return Err("a signing key must have no symmetric algorithm".into());
    }
    match r.u16()? {
        TPM_ALG_NULL => {}
        TPM_ALG_ECDSA => {
            if r.u16()? != TPM_ALG_SHA256 {
                return Err("ECDSA scheme hash is not SHA-256".into());
            }
        }
        other => return Err(format!("scheme {other:#06x} is not ECDSA")),
    }
    if r.u16()? != TPM_ECC_NIST_P256 {
        return Err("curve is not NIST P-256".into());
    }
    if r.u16()? != TPM_ALG_NULL {
        return Err("KDF must be NULL".into());
    }
    let x = r.tpm2b()?;
    let y = r.tpm2b()?;
    r.end()?;
    if x.len() > 32 || y.len() > 32 {
        return Err("point coordinates longer than 32 bytes".into());
    }
    let mut sec1 = vec![0x04];
    sec1.extend(std::iter::repeat_n(0u8, 32 - x.len()));
    sec1.extend_from_slice(x);
    sec1.extend(std::iter::repeat_n(0u8, 32 - y.len()));
    sec1.extend_from_slice(y);
    let key = VerifyingKey::from_sec1_bytes(&sec1).map_err(|e| e.to_string())?;
    Ok(EccPublic {
        object_attributes,
        key,
    })
}

/// TPM name of a public area with nameAlg SHA-256.
pub fn tpm_name(tpmt_public: &[u8]) -> Vec<u8> {
    let mut name = TPM_ALG_SHA256.to_be_bytes().to_vec();
    name.extend_from_slice(&Sha256::digest(tpmt_public));
    name
}

fn b64(field: &'static str, v: &str) -> Result<Vec<u8>, AttestationError> {
    B64.decode(v.trim())
        .map_err(|e| AttestationError::Encoding {
            field,
            what: "base64",
            detail: e.to_string(),
        })
}

/// Parse evidence JSON.
pub fn parse(json: &[u8]) -> Result<Evidence, AttestationError> {
    serde_json::from_slice(json).map_err(|e| AttestationError::Json(e.to_string()))
}

/// Check evidence against what you expect. Every check must pass.
pub fn verify(ev: &Evidence, expect: &Expectations) -> Result<Verified, AttestationError> {
    if ev.format != "tpm2-certify" {
        return Err(AttestationError::NotHardwareEvidence(ev.format.clone()));
    }
    let nonce = hex::decode(&ev.nonce).map_err(|e| AttestationError::Encoding {
        field: "nonce",
        what: "hex",
        detail: e.to_string(),
    })?;
    if expect.nonce.is_empty() || nonce != expect.nonce {
        return Err(AttestationError::NonceMismatch);
    }
    let attest = b64("attest", &ev.attest)?;
    let sig_der = b64("signature", &ev.signature)?;
    let key_public = b64("key_public", &ev.key_public)?;
    let ak = VerifyingKey::from_public_key_pem(&ev.ak_public).map_err(|e| {
        AttestationError::Encoding {
            field: "ak_public",
            what: "P-256 SubjectPublicKeyInfo PEM",
            detail: e.to_string(),
        }
    })?;
    if expect.ak != ak {
        return Err(AttestationError::UnexpectedAk);
    }
    let sig = Signature::from_der(&sig_der).map_err(|e| AttestationError::Encoding {
        field: "signature",
        what: "DER ECDSA signature",
        detail: e.to_string(),
    })?;
    ak.verify(&attest, &sig)
        .map_err(|_| AttestationError::BadSignature)?;
    let info = parse_attest(&attest).map_err(AttestationError::BadAttest)?;
    if info.extra_data != expect.nonce {
        return Err(AttestationError::NonceMismatch);
    }
    let name = tpm_name(&key_public);
    if info.name != name {
        return Err(AttestationError::NameMismatch);
    }
    let public = parse_ecc_public(&key_public).map_err(AttestationError::BadKeyPublic)?;
    let a = public.object_attributes;
    let mut missing = Vec::new();
    for (bit, label) in [
        (FIXED_TPM, "fixedTPM"),
        (FIXED_PARENT, "fixedParent"),
        (SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
        (SIGN, "sign"),
    ] {
        if a & bit == 0 {
            missing.push(format!("{label} not set"));
        }
    }
    if a & DECRYPT != 0 {
        missing.push("decrypt set".into());
    }
    if a & RESTRICTED != 0 {
        missing.push("restricted set".into());
    }
    if !missing.is_empty() {
        return Err(AttestationError::Attributes(missing.join(", ")));
    }
    if expect.key != public.key {
        return Err(AttestationError::KeyMismatch);
    }
    Ok(Verified {
        key: public.key,
        object_attributes: a,
        name,
        ak,
        clock: info.clock,
        ek_certificates: ev.ek_certificates.clone(),
    })
}

/// The P-256 key of a public JWK (`kty` EC, `crv` P-256; other members are ignored).
pub fn key_from_jwk(jwk: &serde_json::Value) -> Result<VerifyingKey, AttestationError> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let bad = |detail: String| AttestationError::Encoding {
        field: "jwk",
        what: "EC P-256 JWK",
        detail,
    };
    if jwk["kty"] != "EC" || jwk["crv"] != "P-256" {
        return Err(bad("kty must be EC and crv P-256".into()));
    }
    let coord = |name: &str| -> Result<Vec<u8>, AttestationError> {
        let v = jwk[name]
            .as_str()
            .ok_or_else(|| bad(format!("missing {name}")))?;
        let b = URL_SAFE_NO_PAD
            .decode(v)
            .map_err(|e| bad(format!("{name}: {e}")))?;
        if b.len() != 32 {
            return Err(bad(format!("{name} must be 32 bytes")));
        }
        Ok(b)
    };
    let mut sec1 = vec![0x04];
    sec1.extend(coord("x")?);
    sec1.extend(coord("y")?);
    VerifyingKey::from_sec1_bytes(&sec1).map_err(|e| bad(e.to_string()))
}

/// An attestation key from its PEM SubjectPublicKeyInfo (what evidence's `ak_public` holds).
pub fn ak_from_pem(pem: &str) -> Result<VerifyingKey, AttestationError> {
    VerifyingKey::from_public_key_pem(pem).map_err(|e| AttestationError::Encoding {
        field: "ak",
        what: "P-256 SubjectPublicKeyInfo PEM",
        detail: e.to_string(),
    })
}

/// The P-256 key of the first certificate in a PEM chain (an agent certificate).
pub fn key_from_certificate_pem(pem: &str) -> Result<VerifyingKey, AttestationError> {
    let bad = |detail: String| AttestationError::Encoding {
        field: "certificate",
        what: "PEM certificate with a P-256 key",
        detail,
    };
    let chain = crate::pem::certificates(pem).map_err(|e| bad(e.to_string()))?;
    let first = chain.first().ok_or_else(|| bad("no certificate".into()))?;
    VerifyingKey::from_sec1_bytes(
        first
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes(),
    )
    .map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// EK certificates in evidence come from outside: x509-cert's chain reader overflowed on an
    /// empty one and looped forever on a truncated body (both found by fuzzing).
    #[test]
    fn a_bad_certificate_pem_is_an_error_not_a_panic_or_a_hang() {
        let truncated = "-----BEGIN CERTIFICATE-----\nMII=\n-----END CERTIFICATE-----\n------END CERTIFBT2oBYE/pEk9\nEg==\n-----END CERTIFICATE-----\n------END CERTIFICAT";
        for pem in ["", "\n", truncated] {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(key_from_certificate_pem(pem).is_err());
            });
            let refused = rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no answer within 10 s for {pem:?}"));
            assert!(refused, "{pem:?}");
        }
    }

    fn ecc_public(attrs: u32, key: &VerifyingKey) -> Vec<u8> {
        let p = key.to_encoded_point(false);
        let mut v = Vec::new();
        v.extend_from_slice(&TPM_ALG_ECC.to_be_bytes());
        v.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
        v.extend_from_slice(&attrs.to_be_bytes());
        v.extend_from_slice(&0u16.to_be_bytes());
        v.extend_from_slice(&TPM_ALG_NULL.to_be_bytes());
        v.extend_from_slice(&TPM_ALG_ECDSA.to_be_bytes());
        v.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
        v.extend_from_slice(&TPM_ECC_NIST_P256.to_be_bytes());
        v.extend_from_slice(&TPM_ALG_NULL.to_be_bytes());
        for c in [p.x().unwrap(), p.y().unwrap()] {
            v.extend_from_slice(&32u16.to_be_bytes());
            v.extend_from_slice(c);
        }
        v
    }

    #[test]
    fn parses_what_it_builds_and_refuses_trailing_bytes() {
        let sk = p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap();
        let attrs = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | SIGN;
        let mut bytes = ecc_public(attrs, sk.verifying_key());
        let p = parse_ecc_public(&bytes).unwrap();
        assert_eq!(p.key, *sk.verifying_key());
        assert_eq!(p.object_attributes, attrs);
        bytes.push(0);
        assert!(parse_ecc_public(&bytes).is_err());
        assert!(parse_ecc_public(&bytes[..10]).is_err());
        assert!(parse_attest(&[0xff, 0x54]).is_err());
    }
}
