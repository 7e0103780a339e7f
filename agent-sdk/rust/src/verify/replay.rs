//! A replay cache with bounded memory: each proof id is kept until the end of the window in
//! which its proof could still be accepted, and when the cache holds `capacity` unexpired ids it
//! refuses new proofs (fail closed) rather than forgetting one early.
//!
//! Callers read the clock before slow checks, so their `now` values arrive out of order: the
//! cache forgets an id only `GRACE` seconds after the latest `now` it has seen passed its end,
//! and refuses a call whose `now` is older than that latest `now` minus `GRACE` (a stalled
//! check, or the clock stepped back), which could otherwise find a forgotten id.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::VerifyError;

/// Default capacity: about 6 MiB at most.
pub const DEFAULT_CAPACITY: usize = 65_536;
/// Seconds of disorder tolerated between callers' clock readings.
const GRACE: i64 = 5;

pub struct ReplayCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// SHA-256 of the id → until when it is kept.
    seen: HashMap<[u8; 32], i64>,
    /// The latest `now` a caller brought.
    high: i64,
    /// The same entries by expiry, oldest first, to drop them in order.
    by_expiry: BinaryHeap<Reverse<(i64, [u8; 32])>>,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> ReplayCache {
        ReplayCache {
            capacity: capacity.max(1),
            inner: Mutex::default(),
        }
    }

    /// Accept `id` once: remembered until `until` (unix seconds). A second use before then is
    /// [`VerifyError::Replay`]; a full cache is [`VerifyError::ReplayCacheFull`].
    pub fn check_and_insert(&self, id: &str, until: i64, now: i64) -> Result<(), VerifyError> {
        let key: [u8; 32] = Sha256::digest(id.as_bytes()).into();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *g;
        if now < inner.high.saturating_sub(GRACE) {
            return Err(VerifyError::Proof(format!(
                "checked with a clock reading {} s behind the latest; refused (replay cannot be excluded)",
                inner.high - now
            )));
        }
        inner.high = inner.high.max(now);
        while let Some(Reverse((t, k))) = inner.by_expiry.peek().copied() {
            if t.saturating_add(GRACE) > inner.high {
                break;
            }
            inner.by_expiry.pop();
            if inner.seen.get(&k) == Some(&t) {
                inner.seen.remove(&k);
            }
        }
        if inner.seen.contains_key(&key) {
            return Err(VerifyError::Replay(id.chars().take(64).collect()));
        }
        if inner.seen.len() >= self.capacity {
            return Err(VerifyError::ReplayCacheFull(self.capacity));
        }
        inner.seen.insert(key, until);
        inner.by_expiry.push(Reverse((until, key)));
        Ok(())
    }

    /// Unexpired ids held (as of the last insert).
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seen
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for ReplayCache {
    fn default() -> Self {
        ReplayCache::new(DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_window_and_fail_closed_when_full() {
        let c = ReplayCache::new(2);
        c.check_and_insert("a", 100, 0).unwrap();
        assert!(matches!(
            c.check_and_insert("a", 100, 50),
            Err(VerifyError::Replay(_))
        ));
        c.check_and_insert("b", 120, 50).unwrap();
        // Full: a new id is refused...
        assert!(matches!(
            c.check_and_insert("c", 130, 60),
            Err(VerifyError::ReplayCacheFull(2))
        ));
        // ... and one seen before is still a replay: nothing is forgotten early.
        assert!(matches!(
            c.check_and_insert("a", 100, 99),
            Err(VerifyError::Replay(_))
        ));
        // "a" is kept GRACE seconds past its end by the latest clock reading.
        assert!(matches!(
            c.check_and_insert("c", 130, 103),
            Err(VerifyError::ReplayCacheFull(2))
        ));
        // Once it is gone it leaves room; "a" itself could no longer pass a window check.
        c.check_and_insert("c", 130, 105).unwrap();
        assert_eq!(c.len(), 2);
        c.check_and_insert("d", 200, 135).unwrap();
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn a_stale_clock_reading_cannot_find_a_forgotten_id() {
        let c = ReplayCache::new(10);
        c.check_and_insert("p", 1001, 940).unwrap();
        // A later caller's clock passes the end of "p" (and the grace), so "p" is forgotten...
        c.check_and_insert("q", 1100, 1006).unwrap();
        // ... and a delayed check of "p" that read its clock at 1000 is refused, not accepted.
        assert!(matches!(
            c.check_and_insert("p", 1001, 1000),
            Err(VerifyError::Proof(_))
        ));
        // Small disorder within the grace is fine.
        c.check_and_insert("r", 1100, 1002).unwrap();
    }
}
