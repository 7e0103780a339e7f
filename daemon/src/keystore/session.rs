//! Session proof keys (`proof_key = "session"`): a P-256 key per agent held only in this
//! process's memory (never on disk, never in the audit: only its thumbprint), locked in RAM,
//! zeroized when dropped, rotated every `session_key_ttl`, and certified by the hardware side —
//! the bound token that names it is signed by the agent's device key, the WIT by the host CA key
//! in the device. A slow TPM then signs once per rotation, not once per proof. They live beside
//! the device keys (the key store handle holds them) so revocation and suspension drop them
//! before the device key is destroyed; every proof still passes the same liveness check under
//! the issuance gate as a device signature before it leaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::EncodePrivateKey;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::Value;

use crate::keystore::{ecdsa, KeyStoreError};

/// Default and longest life of a session key.
pub const DEFAULT_TTL: i64 = 600;
pub const MAX_TTL: i64 = 3600;

/// One session key. The secret lives alone in its own anonymous page, locked in RAM (never
/// swapped out) and marked `MADV_DONTDUMP` (never in a core file), and the page is zeroed
/// before it is unmapped. It signs with `ring` (assembly P-256, about ten times faster here
/// than the pure-Rust `p256` signer): session keys exist to make proofs cheap.
pub struct SessionKey {
    secret: SecretPage,
    public: VerifyingKey,
    /// RFC 7638 thumbprint: `cnf.jkt`, and how a proof names the key.
    pub kid: String,
    /// Public JWK (with kid, alg, use).
    pub jwk: Value,
    pub expires: i64,
}

impl SessionKey {
    fn new(now: i64, ttl: i64) -> Option<SessionKey> {
        // Made by `p256` (which zeroizes the scalar and the PKCS#8 document when they drop),
        // handed to `ring` in the one form it imports.
        let made = SigningKey::random(&mut rand::rngs::OsRng);
        let public = *made.verifying_key();
        let pkcs8 = made.to_pkcs8_der().ok()?;
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_bytes(),
            &ring::rand::SystemRandom::new(),
        )
        .ok()?;
        let secret = SecretPage::new(pair)?;
        let (kid, jwk) = ecdsa::jwk_of(&public);
        Some(SessionKey {
            secret,
            public,
            kid,
            jwk,
            expires: now + ttl,
        })
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.public
    }

    /// ES256 over `message` (a structure the daemon built: a JWS signing input, an RFC 9421
    /// base, a TLS 1.3 CertificateVerify content), hashed with SHA-256 here.
    pub fn sign(&self, message: &[u8]) -> Result<Signature, KeyStoreError> {
        let failed = || KeyStoreError::Device {
            op: "session key sign",
            detail: "ECDSA signing failed".into(),
        };
        let sig = self
            .secret
            .key()
            .sign(&ring::rand::SystemRandom::new(), message)
            .map_err(|_| failed())?;
        Signature::from_slice(sig.as_ref()).map_err(|_| failed())
    }
}

/// A key pair in a page of its own: `mmap`ed anonymous and private, `mlock`ed and
/// `MADV_DONTDUMP`. Page-sized so neither call touches memory the allocator also hands out.
/// `EcdsaKeyPair` holds its scalar and nonce key inline (no heap), so zeroing the page on drop
/// erases them.
struct SecretPage {
    ptr: std::ptr::NonNull<EcdsaKeyPair>,
    len: usize,
}

// SAFETY: the page is owned by this value alone (never aliased); `EcdsaKeyPair` is Send + Sync.
unsafe impl Send for SecretPage {}
// SAFETY: shared access only reads the key (`key()` hands out `&EcdsaKeyPair`).
unsafe impl Sync for SecretPage {}

impl SecretPage {
    fn new(key: EcdsaKeyPair) -> Option<SecretPage> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = usize::try_from(page).ok().filter(|p| *p > 0)?;
        let len = std::mem::size_of::<EcdsaKeyPair>().div_ceil(page) * page;
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: `p..p+len` is the mapping made above, owned here; both calls only change
        // how the kernel treats those pages.
        unsafe {
            if libc::mlock(p, len) != 0 {
                tracing::warn!(
                    error = %std::io::Error::last_os_error(),
                    "cannot lock a session key in RAM (RLIMIT_MEMLOCK?)"
                );
            }
            if libc::madvise(p, len, libc::MADV_DONTDUMP) != 0 {
                tracing::warn!(
                    error = %std::io::Error::last_os_error(),
                    "cannot keep a session key out of core dumps"
                );
            }
        }
        let ptr = std::ptr::NonNull::new(p.cast::<EcdsaKeyPair>())?;
        // SAFETY: the mapping is page-aligned (enough for any type), writable and at least
        // `size_of::<EcdsaKeyPair>()` bytes; nothing was there to drop.
        unsafe { ptr.as_ptr().write(key) };
        Some(SecretPage { ptr, len })
    }

    fn key(&self) -> &EcdsaKeyPair {
        // SAFETY: initialised in `new`, dropped only in `drop`; lives as long as `self`.
        unsafe { self.ptr.as_ref() }
    }
}

impl Drop for SecretPage {
    fn drop(&mut self) {
        // SAFETY: the key was written in `new` and is dropped exactly once, here; then its
        // bytes (the whole mapping made in `new`, `len` bytes, writable) are zeroed with
        // volatile writes the compiler cannot elide, and the mapping is removed, never used
        // again.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            let bytes = self.ptr.as_ptr().cast::<u8>();
            for i in 0..self.len {
                bytes.add(i).write_volatile(0);
            }
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Per agent (by registry row): the current key and the one before it (still good for the
/// bound tokens and WITs that name it, until it expires).
#[derive(Default)]
pub struct SessionKeys {
    by_agent: Mutex<HashMap<i64, Vec<Arc<SessionKey>>>>,
}

impl SessionKeys {
    /// The key to bind into a new token or WIT: the current one, or a new one when it has
    /// less than half its life left (so what it binds has time to be used).
    /// `None` only when the kernel gives no page for it.
    pub fn current(&self, row: i64, now: i64, ttl: i64) -> Option<Arc<SessionKey>> {
        let mut m = self.by_agent.lock().unwrap_or_else(|p| p.into_inner());
        let keys = m.entry(row).or_default();
        keys.retain(|k| k.expires > now);
        match keys.last() {
            Some(k) if k.expires - now > ttl / 2 => Some(k.clone()),
            _ => {
                let k = Arc::new(SessionKey::new(now, ttl)?);
                keys.push(k.clone());
                // The one before stays for what it bound; older ones go.
                while keys.len() > 2 {
                    keys.remove(0);
                }
                Some(k)
            }
        }
    }

    /// An unexpired key of the agent by thumbprint.
    pub fn find(&self, row: i64, kid: &str, now: i64) -> Option<Arc<SessionKey>> {
        let m = self.by_agent.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&row)?
            .iter()
            .find(|k| k.kid == kid && k.expires > now)
            .cloned()
    }

    /// Stop: every key zeroized (proofs still in flight hold their own `Arc`, dropped when
    /// they finish).
    pub fn clear(&self) {
        self.by_agent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Revocation, suspension: the agent's keys are gone at once.
    pub fn drop_agent(&self, row: i64) {
        self.by_agent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_previous_key_until_it_expires() {
        let s = SessionKeys::default();
        let a = s.current(1, 1000, 100).unwrap();
        assert_eq!(
            s.current(1, 1040, 100).unwrap().kid,
            a.kid,
            "more than half its life left"
        );
        let b = s.current(1, 1060, 100).unwrap();
        assert_ne!(b.kid, a.kid, "rotated past half its life");
        assert!(
            s.find(1, &a.kid, 1090).is_some(),
            "the previous key still proves"
        );
        assert!(s.find(1, &a.kid, 1100).is_none(), "not after it expires");
        s.drop_agent(1);
        assert!(s.find(1, &b.kid, 1061).is_none());
        // The signature verifies with the public JWK, by another implementation (`p256`).
        let message = b"header.payload";
        let sig = b.sign(message).unwrap();
        use p256::ecdsa::signature::Verifier;
        let vk = tessera::attestation::key_from_jwk(&b.jwk).unwrap();
        vk.verify(message, &sig).unwrap();
        assert_eq!(vk, b.verifying_key());
    }
}
