//! Per-uid connection slots: no local user can hold every connection the daemon serves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Open connections per uid, shared by the accept loop and the connections it serves.
#[derive(Default, Clone)]
pub struct PerUid {
    counts: Arc<Mutex<HashMap<u32, usize>>>,
}

/// One connection's slot; given back when dropped.
pub struct UidSlot {
    counts: Arc<Mutex<HashMap<u32, usize>>>,
    uid: u32,
}

impl PerUid {
    /// A slot for `uid`, unless it already holds `cap`.
    pub fn take(&self, uid: u32, cap: usize) -> Option<UidSlot> {
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(uid).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(UidSlot {
            counts: self.counts.clone(),
            uid,
        })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_uid_and_given_back() {
        let p = PerUid::default();
        let a: Vec<_> = (0..3).map(|_| p.take(1000, 3).unwrap()).collect();
        assert!(p.take(1000, 3).is_none());
        assert!(p.take(1001, 3).is_some(), "other uids are not affected");
        drop(a);
        assert!(p.take(1000, 3).is_some());
    }
}
