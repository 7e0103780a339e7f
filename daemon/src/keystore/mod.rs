//! Hardware key stores: where agent keys are born, sign, and die.
//!
//! Guarantees: private keys never leave the device (TPM keys are fixedTPM|fixedParent|
//! sensitiveDataOrigin|sign; PKCS#11 keys are CKA_SENSITIVE, never extractable, sign only).
//! Every operation is blocking and must run on the one thread that owns the device
//! ([`owner::KeyStoreHandle`] does that); nothing here is called from the async reactor.
//!
//! Key references are opaque ids chosen by the caller (`agent-<hex>`), so a record can be
//! written *before* the key exists and a restart can find out whether the key was made.

pub mod ecdsa;
pub mod owner;
pub mod pkcs11;
pub mod rsa;
pub mod session;
pub mod tpm;

use std::path::PathBuf;

use p256::ecdsa::{Signature, VerifyingKey};
use serde::Deserialize;

/// `[backend]`: which device and how to reach it.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackendConfig {
    Tpm {
        #[serde(default = "default_tcti")]
        tcti: String,
        #[serde(default = "default_max_loaded")]
        max_loaded_keys: usize,
    },
    Pkcs11 {
        #[serde(default = "default_module")]
        module: PathBuf,
        #[serde(default = "default_token_label")]
        token_label: String,
        pin_file: PathBuf,
        /// Sessions signing in parallel (default: one per CPU).
        #[serde(default)]
        sessions: Option<usize>,
    },
}

impl BackendConfig {
    /// How many device sessions sign at once: the configured PKCS#11 pool (default one per
    /// CPU, at most [`MAX_SESSIONS`]); always 1 for a TPM, which runs one command at a time.
    pub fn signing_sessions(&self) -> usize {
        match self {
            BackendConfig::Tpm { .. } => 1,
            BackendConfig::Pkcs11 { sessions, .. } => sessions
                .unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
                })
                .clamp(1, MAX_SESSIONS),
        }
    }
}

/// Upper bound on the PKCS#11 session pool (each session is a thread).
pub const MAX_SESSIONS: usize = 64;

fn default_tcti() -> String {
    "device:/dev/tpmrm0".into()
}
fn default_max_loaded() -> usize {
    tpm::DEFAULT_MAX_LOADED
}
fn default_module() -> PathBuf {
    "/usr/lib/softhsm/libsofthsm2.so".into()
}
fn default_token_label() -> String {
    "tessera".into()
}

/// Which kind of device backs the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Tpm,
    Pkcs11,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Tpm => "tpm",
            BackendKind::Pkcs11 => "pkcs11",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors a key store reports, in words an admin can act on.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error("key store device unavailable: {0}")]
    DeviceUnavailable(String),
    #[error("key store busy, try again: {0}")]
    Busy(String),
    #[error("wrong PIN for the PKCS#11 token")]
    WrongPin,
    #[error("PKCS#11 token with label {0:?} not found (check token_label and SOFTHSM2_CONF)")]
    TokenNotFound(String),
    #[error("key {0} not found in the key store")]
    KeyNotFound(String),
    #[error("key {0} already exists in the key store")]
    KeyExists(String),
    #[error("invalid key id {0:?}")]
    InvalidKeyId(String),
    #[error("key store state at {path}: {source}")]
    State {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("device error in {op}: {detail}")]
    Device { op: &'static str, detail: String },
    #[error("key store thread has stopped")]
    Stopped,
}

impl KeyStoreError {
    /// Stable short name of the error kind (for logs, tests and problem details).
    pub fn kind(&self) -> &'static str {
        match self {
            KeyStoreError::DeviceUnavailable(_) => "device-unavailable",
            KeyStoreError::Busy(_) => "busy",
            KeyStoreError::WrongPin => "wrong-pin",
            KeyStoreError::TokenNotFound(_) => "token-not-found",
            KeyStoreError::KeyNotFound(_) => "key-not-found",
            KeyStoreError::KeyExists(_) => "key-exists",
            KeyStoreError::InvalidKeyId(_) => "invalid-key-id",
            KeyStoreError::State { .. } => "state",
            KeyStoreError::Device { .. } => "device",
            KeyStoreError::Stopped => "stopped",
        }
    }

    /// True when a retry later may succeed (maps to 503 with Retry-After).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            KeyStoreError::Busy(_) | KeyStoreError::DeviceUnavailable(_) | KeyStoreError::Stopped
        )
    }
}

/// The public half of an RSA key: big-endian modulus and public exponent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaPublic {
    pub n: Vec<u8>,
    pub e: Vec<u8>,
}

/// The length of the RSA keys tessera makes (`key = "rsa2048"`).
pub const RSA_BITS: usize = 2048;

/// The DER DigestInfo prefix of a SHA-256 digest (RFC 8017 §9.2, note 1): what RSASSA-PKCS1-v1_5
/// signs around the digest when the device is handed the encoded message (PKCS#11 `CKM_RSA_PKCS`).
pub const SHA256_DIGEST_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// A freshly created key: its id and public half.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub id: String,
    pub public: VerifyingKey,
}

/// What a key store can say about where a key lives (`GET /v1/attestation`).
#[derive(Debug, Clone)]
pub enum KeyEvidence {
    /// TPM2_Certify of the key by the TPM's attestation key over the caller's nonce.
    Tpm(TpmCertify),
    /// PKCS#11 attributes as the token reports them: the token's word, not hardware evidence.
    Pkcs11Attributes(Vec<(String, bool)>),
}

#[derive(Debug, Clone)]
pub struct TpmCertify {
    /// The raw TPMS_ATTEST the TPM signed.
    pub attest: Vec<u8>,
    /// The attestation key's signature over SHA-256 of `attest`.
    pub signature: Signature,
    pub ak_public: VerifyingKey,
    /// The certified key's TPMT_PUBLIC; its name is what `attest` certifies.
    pub key_public: Vec<u8>,
    /// EK certificates (DER) found in the TPM's NV storage.
    pub ek_certificates: Vec<Vec<u8>>,
}

/// Largest nonce TPM2_Certify takes as qualifying data (TPM2B_DATA holds a TPMT_HA).
pub const MAX_NONCE: usize = 64;

/// One backend. Implementations own their device handle and are driven from one thread.
pub trait KeyStore {
    fn backend(&self) -> BackendKind;
    /// Create a non-exportable P-256 signing key under `id`. Fails with `KeyExists` if `id` is taken.
    fn create(&mut self, id: &str) -> Result<CreatedKey, KeyStoreError>;
    fn public_key(&mut self, id: &str) -> Result<VerifyingKey, KeyStoreError>;
    /// ECDSA P-256 over a SHA-256 digest; the signature is normalised to low-S.
    fn sign(&mut self, id: &str, digest: &[u8; 32]) -> Result<Signature, KeyStoreError>;
    /// Destroy the key in the device. Destroying a key that does not exist is `KeyNotFound`.
    fn destroy(&mut self, id: &str) -> Result<(), KeyStoreError>;
    /// Ids of every key this store holds (for reconciliation at start).
    fn list(&mut self) -> Result<Vec<String>, KeyStoreError>;
    /// Evidence that key `id` was made inside the device, bound to `nonce`.
    fn attest(&mut self, id: &str, nonce: &[u8]) -> Result<KeyEvidence, KeyStoreError>;
    /// Create a non-exportable RSA-2048 key under `id` that signs (RSASSA-PKCS1-v1_5 with
    /// SHA-256) and does nothing else. Fails with `KeyExists` if `id` is taken.
    fn create_rsa(&mut self, id: &str) -> Result<RsaPublic, KeyStoreError>;
    /// RSASSA-PKCS1-v1_5 over a SHA-256 digest: the raw signature (the modulus length).
    fn sign_rsa(&mut self, id: &str, digest: &[u8; 32]) -> Result<Vec<u8>, KeyStoreError>;
    /// Another handle on the same device that can sign in parallel with this one (a PKCS#11
    /// session of its own), or `None` where the device takes one command at a time (TPM).
    fn worker(&mut self) -> Result<Option<Box<dyn KeyStore + Send>>, KeyStoreError> {
        Ok(None)
    }
}

/// Key ids become file names and labels: keep them to a safe alphabet.
pub fn validate_key_id(id: &str) -> Result<(), KeyStoreError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(KeyStoreError::InvalidKeyId(id.to_string()))
    }
}

/// A fresh random key id with the given prefix (`agent`, `hostca`, ...).
pub fn new_key_id(prefix: &str) -> String {
    let bytes: [u8; 12] = rand::random();
    format!("{prefix}-{}", hex::encode(bytes))
}

/// Open the backend a config names. Runs on the key store thread (see [`owner`]).
pub fn open(
    backend: &BackendConfig,
    state_dir: &std::path::Path,
) -> Result<Box<dyn KeyStore>, KeyStoreError> {
    match backend {
        BackendConfig::Tpm {
            tcti,
            max_loaded_keys,
        } => Ok(Box::new(tpm::TpmKeyStore::open(
            tcti,
            state_dir,
            *max_loaded_keys,
        )?)),
        BackendConfig::Pkcs11 {
            module,
            token_label,
            pin_file,
            ..
        } => {
            let pin = read_pin(pin_file)?;
            Ok(Box::new(pkcs11::Pkcs11KeyStore::open(
                module,
                token_label,
                &pin,
            )?))
        }
    }
}

/// A PIN file holds the PIN and maybe a trailing newline.
pub fn read_pin(path: &std::path::Path) -> Result<String, KeyStoreError> {
    let pin = std::fs::read_to_string(path).map_err(|source| KeyStoreError::State {
        path: path.display().to_string(),
        source,
    })?;
    Ok(pin.trim_end_matches(['\n', '\r']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_are_checked() {
        assert!(validate_key_id(&new_key_id("agent")).is_ok());
        assert!(validate_key_id("../etc/passwd").is_err());
        assert!(validate_key_id("").is_err());
        assert!(validate_key_id("Agent").is_err());
    }
}
