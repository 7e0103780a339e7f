//! Fixed keys and helpers shared by the targets. The keys are made from constant scalars:
//! they only exist so that a fuzzed input can carry a valid signature and reach the checks
//! after it.

#![allow(dead_code)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use p256::ecdsa::{signature::Signer, Signature, SigningKey, VerifyingKey};

/// Made once per process: deriving a public key per input would halve the executions.
static KEYS: std::sync::OnceLock<Vec<SigningKey>> = std::sync::OnceLock::new();

pub fn signing_key(seed: u8) -> &'static SigningKey {
    &KEYS.get_or_init(|| {
        (0..8u8)
            .map(|seed| {
                let mut scalar = [0u8; 32];
                scalar[31] = seed;
                scalar[0] = 0x11;
                SigningKey::from_bytes(&scalar.into())
                    .expect("a constant scalar below the group order")
            })
            .collect()
    })[seed as usize]
}

pub fn verifying_key(seed: u8) -> VerifyingKey {
    *signing_key(seed).verifying_key()
}

/// A compact ES256 JWS over `header` and `payload` as given (any bytes).
pub fn jws(header: &[u8], payload: &[u8], key: &SigningKey) -> String {
    signed(
        &format!("{}.{}", B64.encode(header), B64.encode(payload)),
        key,
    )
}

/// `input` (a JWS signing input) with its ES256 signature appended.
pub fn signed(input: &str, key: &SigningKey) -> String {
    let sig: Signature = key.sign(input.as_bytes());
    format!("{input}.{}", B64.encode(sig.to_bytes()))
}

/// Split `data` at its first `sep` (all of it and nothing when there is none).
pub fn split(data: &[u8], sep: u8) -> (&[u8], &[u8]) {
    match data.iter().position(|b| *b == sep) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// A directory for files a target must write, under `TESSERA_FUZZ_DIR` (scripts/fuzz sets it
/// and removes it afterwards) or the system temp dir.
pub fn work_dir(name: &str) -> std::path::PathBuf {
    let base = std::env::var_os("TESSERA_FUZZ_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("cannot create the fuzz work dir");
    dir
}
