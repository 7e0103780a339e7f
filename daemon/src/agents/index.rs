//! The in-memory set of agents the hot path reads, indexed so that matching a caller and
//! checking an agent is O(1) in the number of agents: every agent has a `uid` or a `unit`
//! selector (enforced at enrolment), so a caller can only match agents filed under its uid or,
//! for agents without a uid, under its unit.

use std::collections::{HashMap, HashSet};
use std::ops::Deref;
use std::sync::Arc;

use super::record::Agent;
use crate::caller::Caller;

/// Records are shared between successive sets: a change makes a new set of the same `Arc`s
/// and the changed records, never a deep copy of every agent.
#[derive(Debug, Default)]
pub struct AgentSet {
    all: Vec<Arc<Agent>>,
    /// Agents with a `uid` selector, by that uid.
    by_uid: HashMap<u32, Vec<usize>>,
    /// Agents without a `uid` selector, by their `unit`.
    by_unit: HashMap<String, Vec<usize>>,
    /// Anything with neither (not enrolable; kept so a bad record still matches as before).
    unindexed: Vec<usize>,
    by_row: HashMap<i64, usize>,
    by_name: HashMap<String, usize>,
}

impl AgentSet {
    pub fn new(all: Vec<Agent>) -> AgentSet {
        AgentSet::of(all.into_iter().map(Arc::new).collect())
    }

    fn of(all: Vec<Arc<Agent>>) -> AgentSet {
        let mut set = AgentSet {
            all,
            ..Default::default()
        };
        for (i, a) in set.all.iter().enumerate() {
            set.by_row.insert(a.row, i);
            // Revoked sets are newest first and may hold a name twice: the newest counts.
            set.by_name.entry(a.name.clone()).or_insert(i);
            match (&a.selectors.uid, &a.selectors.unit) {
                (Some(uid), _) => set.by_uid.entry(*uid).or_default().push(i),
                (None, Some(unit)) => set.by_unit.entry(unit.clone()).or_default().push(i),
                (None, None) => set.unindexed.push(i),
            }
        }
        set
    }

    /// The only agents `caller` can match (in enrolment order); selectors still decide.
    /// With `wanted`, only the agent of that name (if the caller could match it).
    pub fn candidates<'a>(
        &'a self,
        caller: &Caller,
        wanted: Option<&str>,
    ) -> impl Iterator<Item = &'a Agent> + 'a {
        let mut idx: Vec<usize> = Vec::new();
        if let Some(w) = wanted {
            // Filed under the caller's uid or unit, or it cannot be this caller.
            if let Some(i) = self.by_name.get(w) {
                let a = &self.all[*i];
                let filed = match (&a.selectors.uid, &a.selectors.unit) {
                    (Some(uid), _) => *uid == caller.uid,
                    (None, Some(unit)) => caller.system_unit() == Some(unit.as_str()),
                    (None, None) => true,
                };
                if filed {
                    idx.push(*i);
                }
            }
        } else {
            if let Some(v) = self.by_uid.get(&caller.uid) {
                idx.extend(v);
            }
            if let Some(v) = caller.system_unit().and_then(|u| self.by_unit.get(u)) {
                idx.extend(v);
            }
            idx.extend(&self.unindexed);
            idx.sort_unstable();
        }
        idx.into_iter().map(move |i| &*self.all[i])
    }

    /// The agent of this name, if it is in the set (the newest, for the revoked set).
    pub fn by_name(&self, name: &str) -> Option<&Agent> {
        self.by_name.get(name).map(|i| &*self.all[*i])
    }

    /// The agent with this registry row, if it is in the set.
    pub fn by_row(&self, row: i64) -> Option<&Agent> {
        self.by_row.get(&row).map(|i| &*self.all[*i])
    }

    /// This set with the records of `changed` replaced: each is in the new set if `keep`
    /// says so (and dropped otherwise), the rest shared. Ordered by row, ascending or
    /// descending (the registry's order for live and for revoked agents).
    pub fn apply(
        &self,
        changed: &[Agent],
        keep: impl Fn(&Agent) -> bool,
        newest_first: bool,
        limit: Option<usize>,
    ) -> AgentSet {
        let rows: HashSet<i64> = changed.iter().map(|a| a.row).collect();
        let mut all: Vec<Arc<Agent>> = self
            .all
            .iter()
            .filter(|a| !rows.contains(&a.row))
            .cloned()
            .collect();
        all.extend(changed.iter().filter(|a| keep(a)).cloned().map(Arc::new));
        if newest_first {
            // Newest revocation first (a record is revoked in place: its row is its enrolment).
            all.sort_by_key(|a| std::cmp::Reverse((a.revoked_at.unwrap_or(0), a.row)));
        } else {
            all.sort_by_key(|a| a.row);
        }
        if let Some(n) = limit {
            all.truncate(n);
        }
        AgentSet::of(all)
    }
}

impl Deref for AgentSet {
    type Target = [Arc<Agent>];
    fn deref(&self) -> &[Arc<Agent>] {
        &self.all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::selectors::Selectors;

    fn agent(row: i64, uid: Option<u32>, unit: Option<&str>) -> Agent {
        Agent {
            row,
            name: format!("a{row}"),
            id: String::new(),
            status: crate::agents::record::Status::Active,
            source: crate::agents::record::Source::Dbus,
            selectors: Selectors {
                uid,
                unit: unit.map(str::to_string),
                ..Default::default()
            },
            policy: serde_json::from_value(serde_json::json!({"audiences": ["https://a"]}))
                .unwrap(),
            key_id: String::new(),
            key_state: crate::agents::record::KeyState::Present,
            kid: None,
            jwk: None,
            created_at: 0,
            updated_at: 0,
            revoked_at: None,
            revoke_reason: None,
            issued_count: 0,
            last_issued_at: None,
            file_hash: None,
        }
    }

    #[test]
    fn candidates_are_the_callers_uid_and_unit_only() {
        let set = AgentSet::new(vec![
            agent(1, Some(1000), None),
            agent(2, Some(1001), None),
            agent(3, None, Some("a.service")),
            agent(4, Some(1000), Some("b.service")),
            agent(5, None, Some("b.service")),
        ]);
        let mut c = Caller::from_bus(1, 1000, 1000);
        let rows: Vec<i64> = set.candidates(&c, None).map(|a| a.row).collect();
        assert_eq!(rows, vec![1, 4]);
        let rows: Vec<i64> = set.candidates(&c, Some("a4")).map(|a| a.row).collect();
        assert_eq!(rows, vec![4]);
        assert_eq!(set.candidates(&c, Some("a2")).count(), 0);
        assert_eq!(set.candidates(&c, Some("a5")).count(), 0);
        assert_eq!(set.candidates(&c, Some("nobody")).count(), 0);
        c.unit = Some("b.service".into());
        c.cgroup = Some("/system.slice/b.service".into());
        let rows: Vec<i64> = set.candidates(&c, None).map(|a| a.row).collect();
        assert_eq!(rows, vec![1, 4, 5]);
        let rows: Vec<i64> = set.candidates(&c, Some("a5")).map(|a| a.row).collect();
        assert_eq!(rows, vec![5]);
        assert_eq!(set.by_row(3).map(|a| a.name.as_str()), Some("a3"));
        assert!(set.by_row(9).is_none());
        assert_eq!(set.len(), 5);
        // Agent 2 leaves, 3 changes its unit, 9 comes in: the rest is shared, not copied.
        let mut three = agent(3, None, Some("c.service"));
        three.name = "a3".into();
        let next = set.apply(
            &[agent(2, None, None), three, agent(9, Some(1000), None)],
            |a| a.row != 2,
            false,
            None,
        );
        let rows: Vec<i64> = next.iter().map(|a| a.row).collect();
        assert_eq!(rows, vec![1, 3, 4, 5, 9]);
        assert!(Arc::ptr_eq(&set.all[0], &next.all[0]));
        assert_eq!(
            next.by_row(3).unwrap().selectors.unit.as_deref(),
            Some("c.service")
        );
        let c = Caller::from_bus(1, 1000, 1000);
        let rows: Vec<i64> = next.candidates(&c, None).map(|a| a.row).collect();
        assert_eq!(rows, vec![1, 4, 9]);
        let rev = next.apply(&[], |_| true, true, None);
        let rows: Vec<i64> = rev.iter().map(|a| a.row).collect();
        assert_eq!(rows, vec![9, 5, 4, 3, 1]);
        // A window keeps the newest only (memory for revoked agents is bounded).
        let rev = next.apply(&[agent(10, Some(7), None)], |_| true, true, Some(3));
        let rows: Vec<i64> = rev.iter().map(|a| a.row).collect();
        assert_eq!(rows, vec![10, 9, 5]);
        assert!(rev.by_row(1).is_none());
        // Ordered by revocation, not enrolment: an old agent revoked just now is kept.
        let mut old = agent(1, Some(7), None);
        old.revoked_at = Some(100);
        let rev = rev.apply(&[old], |_| true, true, Some(3));
        let rows: Vec<i64> = rev.iter().map(|a| a.row).collect();
        assert_eq!(rows, vec![1, 10, 9]);
    }
}
