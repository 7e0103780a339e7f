//! The in-memory set of agents the hot path reads, indexed so that matching a caller and
//! checking an agent costs O(log n) in the number of agents, not O(n): every agent has a
//! `uid` or a `unit` selector (enforced at enrolment), so a caller can only match agents filed
//! under its uid or, for agents without a uid, under its unit.
//!
//! The set and its indexes are persistent maps (`imbl`): a change makes a new set that shares
//! all but O(log n) nodes with the old one, so revoking one of 10,000 agents does not rebuild
//! 10,000 entries (it did, and was a quarter of `Revoke`'s time at 10,000 agents), while
//! readers keep the set they hold.

use std::sync::Arc;

use imbl::{HashMap, OrdMap, OrdSet};

use super::record::Agent;
use crate::caller::Caller;

/// How a set is ordered: the registry's order for live agents (enrolment, by row) and for
/// revoked ones (newest revocation first).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Order {
    #[default]
    Enrolment,
    NewestRevocationFirst,
}

/// An agent's place in its set's order (ascending).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pos(i64, i64);

impl Order {
    fn pos(self, a: &Agent) -> Pos {
        match self {
            Order::Enrolment => Pos(0, a.row),
            // A record is revoked in place: its row is its enrolment, its time the revocation.
            Order::NewestRevocationFirst => Pos(
                a.revoked_at.unwrap_or(0).saturating_neg(),
                a.row.saturating_neg(),
            ),
        }
    }
}

/// Records are shared between successive sets, and so are the index nodes a change does not
/// touch: never a deep copy of every agent.
#[derive(Debug, Default, Clone)]
pub struct AgentSet {
    order: Order,
    all: OrdMap<Pos, Arc<Agent>>,
    by_row: HashMap<i64, Pos>,
    /// Live sets hold a name once; a revoked set may hold it twice (the first in order, the
    /// newest, counts). Sorted; a list, not a tree, since it is almost always one long.
    by_name: HashMap<String, Vec<Pos>>,
    /// Agents with a `uid` selector, by that uid.
    by_uid: HashMap<u32, OrdSet<Pos>>,
    /// Agents without a `uid` selector, by their `unit`.
    by_unit: HashMap<String, OrdSet<Pos>>,
    /// Anything with neither (not enrolable; kept so a bad record still matches as before).
    unindexed: OrdSet<Pos>,
}

/// Where an agent is filed: under its uid, else under its unit, else nowhere in particular.
enum Filed<'a> {
    Uid(u32),
    Unit(&'a str),
    Unindexed,
}

impl<'a> Filed<'a> {
    fn of(a: &'a Agent) -> Filed<'a> {
        match (&a.selectors.uid, &a.selectors.unit) {
            (Some(uid), _) => Filed::Uid(*uid),
            (None, Some(unit)) => Filed::Unit(unit),
            (None, None) => Filed::Unindexed,
        }
    }
}

/// Take `pos` out of the set filed under `key`, dropping the key when nothing is left.
fn unfile<K, Q>(map: &mut HashMap<K, OrdSet<Pos>>, key: &Q, pos: &Pos)
where
    K: std::hash::Hash + Eq + Clone + std::borrow::Borrow<Q>,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(set) = map.get_mut(key) {
        set.remove(pos);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

impl AgentSet {
    pub fn new(all: Vec<Agent>, order: Order) -> AgentSet {
        let mut set = AgentSet {
            order,
            ..Default::default()
        };
        for a in all {
            set.insert(Arc::new(a));
        }
        set
    }

    fn insert(&mut self, a: Arc<Agent>) {
        self.remove(a.row);
        let pos = self.order.pos(&a);
        self.by_row.insert(a.row, pos);
        let named = self.by_name.entry(a.name.clone()).or_default();
        let at = named.partition_point(|p| *p < pos);
        named.insert(at, pos);
        match Filed::of(&a) {
            Filed::Uid(uid) => self.by_uid.entry(uid).or_default().insert(pos),
            Filed::Unit(unit) => self
                .by_unit
                .entry(unit.to_string())
                .or_default()
                .insert(pos),
            Filed::Unindexed => self.unindexed.insert(pos),
        };
        self.all.insert(pos, a);
    }

    fn remove(&mut self, row: i64) {
        let Some(pos) = self.by_row.remove(&row) else {
            return;
        };
        let Some(a) = self.all.remove(&pos) else {
            return;
        };
        if let Some(named) = self.by_name.get_mut(&a.name) {
            named.retain(|p| *p != pos);
            if named.is_empty() {
                self.by_name.remove(&a.name);
            }
        }
        match Filed::of(&a) {
            Filed::Uid(uid) => unfile(&mut self.by_uid, &uid, &pos),
            Filed::Unit(unit) => unfile(&mut self.by_unit, unit, &pos),
            Filed::Unindexed => {
                self.unindexed.remove(&pos);
            }
        }
    }

    /// The only agents `caller` can match (in the set's order); selectors still decide.
    /// With `wanted`, only the agent of that name (if the caller could match it).
    pub fn candidates<'a>(
        &'a self,
        caller: &Caller,
        wanted: Option<&str>,
    ) -> impl Iterator<Item = &'a Agent> + 'a {
        let mut found: Vec<Pos> = Vec::new();
        match wanted {
            Some(w) => {
                if let Some(a) = self.by_name(w) {
                    // Filed under the caller's uid or unit, or it cannot be this caller.
                    let filed = match Filed::of(a) {
                        Filed::Uid(uid) => uid == caller.uid,
                        Filed::Unit(unit) => caller.system_unit() == Some(unit),
                        Filed::Unindexed => true,
                    };
                    if filed {
                        found.push(self.order.pos(a));
                    }
                }
            }
            None => {
                if let Some(v) = self.by_uid.get(&caller.uid) {
                    found.extend(v.iter().copied());
                }
                if let Some(v) = caller.system_unit().and_then(|u| self.by_unit.get(u)) {
                    found.extend(v.iter().copied());
                }
                found.extend(self.unindexed.iter().copied());
                found.sort_unstable();
            }
        }
        found
            .into_iter()
            .filter_map(move |p| self.all.get(&p).map(|a| &**a))
    }

    /// The agent of this name, if it is in the set (the newest, for the revoked set).
    pub fn by_name(&self, name: &str) -> Option<&Agent> {
        let pos = self.by_name.get(name)?.first()?;
        self.all.get(pos).map(|a| &**a)
    }

    /// The agent with this registry row, if it is in the set.
    pub fn by_row(&self, row: i64) -> Option<&Agent> {
        self.all.get(self.by_row.get(&row)?).map(|a| &**a)
    }

    /// Every agent, in the set's order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Agent>> + '_ {
        self.all.values()
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// This set with the records of `changed` replaced: each is in the new set if `keep`
    /// says so (and dropped otherwise), the rest shared. With `limit`, only that many of the
    /// first in the set's order are kept (memory for revoked agents is bounded).
    pub fn apply(
        &self,
        changed: &[Agent],
        keep: impl Fn(&Agent) -> bool,
        limit: Option<usize>,
    ) -> AgentSet {
        let mut next = self.clone();
        for a in changed {
            next.remove(a.row);
        }
        for a in changed.iter().filter(|a| keep(a)) {
            next.insert(Arc::new(a.clone()));
        }
        if let Some(n) = limit {
            while next.all.len() > n {
                let Some(row) = next.all.get_max().map(|(_, a)| a.row) else {
                    break;
                };
                next.remove(row);
            }
        }
        next
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
        let set = AgentSet::new(
            vec![
                agent(1, Some(1000), None),
                agent(2, Some(1001), None),
                agent(3, None, Some("a.service")),
                agent(4, Some(1000), Some("b.service")),
                agent(5, None, Some("b.service")),
            ],
            Order::Enrolment,
        );
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
            None,
        );
        let rows: Vec<i64> = next.iter().map(|a| a.row).collect();
        assert_eq!(rows, vec![1, 3, 4, 5, 9]);
        assert!(Arc::ptr_eq(
            set.iter().next().unwrap(),
            next.iter().next().unwrap()
        ));
        assert_eq!(
            next.by_row(3).unwrap().selectors.unit.as_deref(),
            Some("c.service")
        );
        let c = Caller::from_bus(1, 1000, 1000);
        let rows: Vec<i64> = next.candidates(&c, None).map(|a| a.row).collect();
        assert_eq!(rows, vec![1, 4, 9]);
        // Revoked sets: newest revocation first, a name may be there twice (the newest
        // counts), and a window keeps the newest only (memory for revoked agents is bounded).
        let revoked = |row: i64, at: i64| {
            let mut a = agent(row, Some(7), None);
            a.revoked_at = Some(at);
            a
        };
        let rev = AgentSet::new(
            vec![revoked(9, 50), revoked(5, 40), revoked(4, 30)],
            Order::NewestRevocationFirst,
        );
        let rows: Vec<i64> = rev.iter().map(|a| a.row).collect();
        assert_eq!(rows, vec![9, 5, 4]);
        let rev = rev.apply(&[revoked(10, 60)], |_| true, Some(3));
        let rows: Vec<i64> = rev.iter().map(|a| a.row).collect();
        assert_eq!(rows, vec![10, 9, 5]);
        assert!(rev.by_row(4).is_none());
        let c7 = Caller::from_bus(1, 7, 7);
        let rows: Vec<i64> = rev.candidates(&c7, None).map(|a| a.row).collect();
        assert_eq!(
            rows,
            vec![10, 9, 5],
            "the evicted agent left the uid index too"
        );
        let mut again = revoked(11, 70);
        again.name = "a9".into();
        let rev = rev.apply(&[again], |_| true, Some(3));
        assert_eq!(rev.by_name("a9").map(|a| a.row), Some(11));
        // Ordered by revocation, not enrolment: an old agent revoked just now is kept.
        let rev = rev.apply(&[revoked(1, 100)], |_| true, Some(3));
        let rows: Vec<i64> = rev.iter().map(|a| a.row).collect();
        assert_eq!(rows, vec![1, 11, 10]);
        assert!(rev.by_row(9).is_none());
        assert_eq!(
            rev.by_name("a9").map(|a| a.row),
            Some(11),
            "the newer a9 stays"
        );
    }
}
