//! Session proof keys (`proof_key = "session"`): a P-256 key per agent held only in this
//! process's memory (never on disk, never in the audit: only its thumbprint), locked in RAM,
//! zeroized when dropped, rotated every `session_key_ttl`, and certified by the hardware side —
//! the bound token that names it is signed by the agent's device key, the WIT by the host CA key
//! in the device. A slow TPM then signs once per rotation, not once per proof. Revocation and
//! suspension drop the agent's keys; every proof still passes the same liveness check under the
//! issuance gate as a device signature before it leaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::{Signature, SigningKey};
use serde_json::Value;

use crate::keystore::ecdsa;

/// Default and longest life of a session key.
pub const DEFAULT_TTL: i64 = 600;
pub const MAX_TTL: i64 = 3600;

/// One session key. The secret lives in its own heap allocation, `mlock`ed so it is never
/// swapped out; `SigningKey` zeroizes itself on drop.
pub struct SessionKey {
    secret: Box<SigningKey>,
    /// RFC 7638 thumbprint: `cnf.jkt`, and how a proof names the key.
    pub kid: String,
    /// Public JWK (with kid, alg, use).
    pub jwk: Value,
    pub expires: i64,
}

impl SessionKey {
    fn new(now: i64, ttl: i64) -> SessionKey {
        let secret = Box::new(SigningKey::random(&mut rand::rngs::OsRng));
        lock_in_ram(&secret);
        let (kid, jwk) = ecdsa::jwk_of(secret.verifying_key());
        SessionKey {
            secret,
            kid,
            jwk,
            expires: now + ttl,
        }
    }

    /// ES256 over a digest the daemon computed of a structure it built.
    pub fn sign(&self, digest: &[u8; 32]) -> Option<Signature> {
        self.secret.sign_prehash(digest).ok()
    }
}

impl Drop for SessionKey {
    fn drop(&mut self) {
        unlock(&self.secret);
    }
}

fn lock_in_ram(k: &SigningKey) {
    let p = k as *const SigningKey as *const libc::c_void;
    // SAFETY: `p` points to a live allocation of `size_of::<SigningKey>()` bytes owned by the
    // Box for as long as the key exists; mlock only pins those pages and reads nothing.
    let rc = unsafe { libc::mlock(p, std::mem::size_of::<SigningKey>()) };
    if rc != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot lock a session key in RAM (RLIMIT_MEMLOCK?)"
        );
    }
}

fn unlock(k: &SigningKey) {
    let p = k as *const SigningKey as *const libc::c_void;
    // SAFETY: the same live allocation `lock_in_ram` pinned; munlock only unpins.
    unsafe { libc::munlock(p, std::mem::size_of::<SigningKey>()) };
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
    pub fn current(&self, row: i64, now: i64, ttl: i64) -> Arc<SessionKey> {
        let mut m = self.by_agent.lock().unwrap_or_else(|p| p.into_inner());
        let keys = m.entry(row).or_default();
        keys.retain(|k| k.expires > now);
        match keys.last() {
            Some(k) if k.expires - now > ttl / 2 => k.clone(),
            _ => {
                let k = Arc::new(SessionKey::new(now, ttl));
                keys.push(k.clone());
                // The one before stays for what it bound; older ones go.
                while keys.len() > 2 {
                    keys.remove(0);
                }
                k
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
        let a = s.current(1, 1000, 100);
        assert_eq!(
            s.current(1, 1040, 100).kid,
            a.kid,
            "more than half its life left"
        );
        let b = s.current(1, 1060, 100);
        assert_ne!(b.kid, a.kid, "rotated past half its life");
        assert!(
            s.find(1, &a.kid, 1090).is_some(),
            "the previous key still proves"
        );
        assert!(s.find(1, &a.kid, 1100).is_none(), "not after it expires");
        s.drop_agent(1);
        assert!(s.find(1, &b.kid, 1061).is_none());
        let digest = [7u8; 32];
        let sig = b.sign(&digest).unwrap();
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        let vk = tessera::attestation::key_from_jwk(&b.jwk).unwrap();
        vk.verify_prehash(&digest, &sig).unwrap();
    }
}
