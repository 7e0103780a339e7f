//! Property tests (proptest) for the pure parts the daemon's decisions rest on: audience globs,
//! credential lifetimes, the unit of a cgroup path, canonical JSON and record hashes of the
//! audit trail, client text kept in records, and the problem list. Each property is checked
//! against an oracle written differently from the code, or against the rule DESIGN states.

use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Value};
use tesserad::agents::policy::{audience_allowed, credential_ttl, glob_match};
use tesserad::audit::{canonical, client_text, record_hash, MAX_CLIENT_TEXT};
use tesserad::caller::unit_of_cgroup;

/// Backtracking glob matcher, written from the rule rather than from the code: inside a URL
/// authority (after `://`, up to the first `/`, `?` or `#` of the pattern) `*` matches one or
/// more of `A-Z a-z 0-9 -`; elsewhere any run, possibly empty, without `/`, `?`, `#`.
fn oracle(pattern: &[char], in_authority: &[bool], s: &[char]) -> bool {
    match pattern.split_first() {
        None => s.is_empty(),
        Some(('*', rest)) => {
            let label = in_authority[0];
            let ok = |c: &char| {
                if label {
                    c.is_ascii_alphanumeric() || *c == '-'
                } else {
                    !matches!(c, '/' | '?' | '#')
                }
            };
            let start = usize::from(label);
            (start..=s.len())
                .any(|n| s[..n].iter().all(ok) && oracle(rest, &in_authority[1..], &s[n..]))
        }
        Some((c, rest)) => s.first() == Some(c) && oracle(rest, &in_authority[1..], &s[1..]),
    }
}

fn oracle_match(pattern: &str, s: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let mut auth = vec![false; p.len()];
    let text: String = p.iter().collect();
    if let Some(i) = text.find("://") {
        let start = text[..i + 3].chars().count();
        let mut j = start;
        while j < p.len() && !matches!(p[j], '/' | '?' | '#') {
            auth[j] = true;
            j += 1;
        }
    }
    let t: Vec<char> = s.chars().collect();
    oracle(&p, &auth, &t)
}

fn piece() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "a", "b", "-", ".", "/", "?", "#", ":", "@", "*", "https://", "x.y", "é",
    ])
    .prop_map(str::to_string)
}

fn filler() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "", "a", "ab", "a-b", "a.b", "a/b", "a?b", "a#b", "@", ":1",
    ])
    .prop_map(str::to_string)
}

fn text_of(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(piece(), 0..max).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The dynamic-programming matcher agrees with a backtracking one on every pattern, for
    /// random texts and for texts made from the pattern by filling its stars (which match far
    /// more often, so both answers are exercised).
    #[test]
    fn glob_agrees_with_a_backtracking_oracle(
        p in text_of(8),
        s in text_of(8),
        fills in prop::collection::vec(filler(), 8),
    ) {
        prop_assert_eq!(glob_match(&p, &s), oracle_match(&p, &s), "pattern {:?}, text {:?}", p, s);
        let mut filled = String::new();
        let mut stars = fills.iter();
        for c in p.chars() {
            match c {
                '*' => filled.push_str(stars.next().map_or("", String::as_str)),
                c => filled.push(c),
            }
        }
        prop_assert_eq!(
            glob_match(&p, &filled),
            oracle_match(&p, &filled),
            "pattern {:?}, text {:?}",
            p,
            filled
        );
    }

    /// Without `*` a pattern is a literal: it matches itself and nothing else.
    #[test]
    fn a_pattern_without_a_star_is_a_literal(p in text_of(8), s in text_of(8)) {
        let p = p.replace('*', "");
        prop_assert!(glob_match(&p, &p));
        prop_assert_eq!(glob_match(&p, &s), p == s);
    }

    /// `https://*.example.com` only ever admits a host under example.com: whatever matches
    /// parses as a URL whose host is one label, then `.example.com` (no userinfo, port, path
    /// trickery).
    #[test]
    fn a_host_glob_stays_under_its_domain(s in "https://[a-z0-9.@:#?/-]{1,12}\\.example\\.com") {
        if glob_match("https://*.example.com", &s) {
            let u = url::Url::parse(&s).expect("a matched audience is a URL");
            let host = u.host_str().unwrap_or_default().to_string();
            let label = host.strip_suffix(".example.com");
            prop_assert!(label.is_some_and(|l| !l.is_empty() && !l.contains('.')), "{} -> {}", s, host);
            prop_assert_eq!(u.port(), None);
            prop_assert_eq!(u.username(), "");
            prop_assert_eq!(u.path(), "/");
        }
    }

    /// An empty audience is never allowed, whatever the patterns.
    #[test]
    fn an_empty_audience_is_never_allowed(pats in prop::collection::vec(text_of(4), 0..4)) {
        prop_assert!(!audience_allowed(&pats, ""));
    }

    /// A lifetime handed out is whole seconds, at least one, at most the maximum; a request
    /// inside the bounds is granted as asked, one outside is refused naming the maximum.
    #[test]
    fn credential_lifetimes_stay_in_bounds(
        req in prop::option::of(0u64..10_000_000),
        sub in 0u32..2,
        default in 1u64..100_000,
        max in 1u64..100_000,
    ) {
        let requested = req.map(|ms| Duration::from_millis(ms * if sub == 0 { 1000 } else { 1 }));
        let (default, max) = (Duration::from_secs(default), Duration::from_secs(max));
        match credential_ttl(requested, default, max) {
            Ok(t) => {
                prop_assert!(t >= Duration::from_secs(1) && t <= max && t.subsec_nanos() == 0);
                prop_assert_eq!(t, requested.unwrap_or(default.min(max)));
            }
            Err(m) => {
                prop_assert_eq!(m, max);
                let r = requested.expect("no request is never refused");
                prop_assert!(r > max || r < Duration::from_secs(1) || r.subsec_nanos() != 0);
            }
        }
    }

    /// The unit of a cgroup path (systemd's rule): the first component after the leading
    /// `*.slice` run, when it is a service or scope; nothing below it can name another.
    #[test]
    fn the_unit_is_the_first_component_after_the_slices(
        slices in prop::collection::vec("[a-z]{1,4}\\.slice", 0..3),
        unit in prop::sample::select(vec!["a.service", "b.scope", "c.mount", "d.slice", "e"]),
        below in prop::collection::vec("[a-z]{1,3}\\.(service|scope|slice)", 0..3),
    ) {
        let mut parts = slices.clone();
        parts.push(unit.to_string());
        parts.extend(below.iter().cloned());
        let path = format!("/{}", parts.join("/"));
        let expected = if unit.ends_with(".slice") {
            // The slice run goes on: the unit is the next non-slice component, if any.
            below
                .iter()
                .find(|c| !c.ends_with(".slice"))
                .filter(|c| c.ends_with(".service") || c.ends_with(".scope"))
                .cloned()
        } else if unit.ends_with(".service") || unit.ends_with(".scope") {
            Some(unit.to_string())
        } else {
            None
        };
        prop_assert_eq!(unit_of_cgroup(&path), expected, "{}", path);
    }

    /// Canonical JSON is a fixed point, parses back to the same value, and has sorted keys.
    #[test]
    fn canonical_json_round_trips(v in json_value()) {
        let c = canonical(&v);
        let back: Value = serde_json::from_str(&c).expect("canonical JSON parses");
        prop_assert_eq!(&back, &v);
        prop_assert_eq!(canonical(&back), c.clone());
        // Compact: serde_json's compact form of the same (sorted) value, byte for byte.
        prop_assert_eq!(c, serde_json::to_string(&v).expect("serialisable"));
    }

    /// A record's hash ignores its own `hash` field and changes with any other member.
    #[test]
    fn a_record_hash_covers_everything_but_itself(v in json_value(), extra in "[a-z]{1,8}", h in "[0-9a-f]{0,64}") {
        let mut r = json!({"seq": 1, "event": "x", "details": v});
        let base = record_hash(&r);
        r["hash"] = json!(h);
        prop_assert_eq!(record_hash(&r), base.clone());
        r["details_extra"] = json!(extra);
        prop_assert_ne!(record_hash(&r), base);
    }

    /// Client text kept in a record is bounded, whole when short, and names long text by
    /// length and SHA-256 (never cut inside a character).
    #[test]
    fn client_text_is_bounded(s in "\\PC{0,400}") {
        let v = client_text(&s);
        if s.len() <= MAX_CLIENT_TEXT {
            prop_assert_eq!(v, Value::String(s));
        } else {
            let prefix = v["prefix"].as_str().expect("a prefix");
            prop_assert!(prefix.len() <= MAX_CLIENT_TEXT && s.starts_with(prefix));
            prop_assert!(MAX_CLIENT_TEXT - prefix.len() < 4, "cut at the last char boundary");
            prop_assert_eq!(v["len"].as_u64(), Some(s.len() as u64));
            use sha2::Digest;
            let digest = hex::encode(sha2::Sha256::digest(s.as_bytes()));
            prop_assert_eq!(v["sha256"].as_str(), Some(digest.as_str()));
        }
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z_é]{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every problem the daemon sends has one slug, a status that says refusal, a title, and
/// round-trips through its type URI (the contract the SDKs are built on).
#[test]
fn the_problem_list_is_consistent() {
    use std::collections::HashSet;
    use tessera::ProblemType;
    let mut slugs = HashSet::new();
    for t in ProblemType::KNOWN.iter() {
        assert!(
            slugs.insert(t.slug().to_string()),
            "duplicate slug {}",
            t.slug()
        );
        assert!((400..600).contains(&t.status()), "{t:?}");
        assert!(!t.title().is_empty());
        assert_eq!(&ProblemType::from_uri(&t.type_uri()), t);
        assert!(t
            .slug()
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'-'));
    }
    assert!(matches!(
        ProblemType::from_uri("urn:tessera:problem:no-such-thing"),
        ProblemType::Other(_)
    ));
}

mod agent_sets {
    use proptest::prelude::*;
    use tesserad::agents::index::{AgentSet, Order};
    use tesserad::agents::record::{Agent, KeyState, Source, Status};
    use tesserad::agents::selectors::Selectors;
    use tesserad::caller::Caller;

    /// One change: (row, name, uid, unit, revoked_at, kept in the set).
    type Change = (i64, u8, Option<u32>, Option<u8>, i64, bool);

    fn agent(&(row, name, uid, unit, at, _): &Change) -> Agent {
        Agent {
            row,
            name: format!("n{name}"),
            id: String::new(),
            status: Status::Active,
            source: Source::Dbus,
            selectors: Selectors {
                uid,
                unit: unit.map(|u| format!("u{u}.service")),
                ..Default::default()
            },
            policy: serde_json::from_value(serde_json::json!({"audiences": ["https://a"]}))
                .unwrap(),
            key_id: String::new(),
            key_state: KeyState::Present,
            kid: None,
            jwk: None,
            created_at: 0,
            updated_at: 0,
            revoked_at: Some(at),
            revoke_reason: None,
            issued_count: 0,
            last_issued_at: None,
            file_hash: None,
        }
    }

    /// The oracle: a plain list, re-sorted and truncated after every change.
    fn oracle_apply(all: &mut Vec<Agent>, batch: &[Change], order: Order, limit: Option<usize>) {
        all.retain(|a| !batch.iter().any(|c| c.0 == a.row));
        for c in batch {
            all.retain(|a| a.row != c.0);
            if c.5 {
                all.push(agent(c));
            }
        }
        match order {
            Order::Enrolment => all.sort_by_key(|a| a.row),
            Order::NewestRevocationFirst => {
                all.sort_by_key(|a| std::cmp::Reverse((a.revoked_at, a.row)))
            }
        }
        if let Some(n) = limit {
            all.truncate(n);
        }
    }

    fn change() -> impl Strategy<Value = Change> {
        (
            1i64..24,
            0u8..6,
            prop::option::of(0u32..3),
            prop::option::of(0u8..3),
            0i64..8,
            prop::bool::weighted(0.7),
        )
    }

    fn rows<'a>(it: impl Iterator<Item = &'a Agent>) -> Vec<i64> {
        it.map(|a| a.row).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

        /// The persistent, incrementally indexed set answers like a list rebuilt from scratch
        /// after any sequence of changes: order, rows, names (the first in order wins), and
        /// every caller's candidates, in both orders and with a window.
        #[test]
        fn agent_set_agrees_with_a_rebuilt_list(
            batches in prop::collection::vec(prop::collection::vec(change(), 0..4), 1..12),
            newest_first in any::<bool>(),
            limit in prop::option::of(1usize..10),
        ) {
            let order = if newest_first { Order::NewestRevocationFirst } else { Order::Enrolment };
            let mut set = AgentSet::new(vec![], order);
            let mut all: Vec<Agent> = vec![];
            for batch in &batches {
                let changed: Vec<Agent> = batch.iter().map(agent).collect();
                let keep: std::collections::HashMap<i64, bool> =
                    batch.iter().map(|c| (c.0, c.5)).collect();
                let (before, before_rows) = (set.clone(), rows(all.iter()));
                set = set.apply(&changed, |a| keep[&a.row], limit);
                oracle_apply(&mut all, batch, order, limit);
                // The old set is unchanged by the new one (readers keep what they hold).
                prop_assert_eq!(rows(before.iter().map(|a| &**a)), before_rows);
                prop_assert_eq!(rows(set.iter().map(|a| &**a)), rows(all.iter()));
                prop_assert_eq!(set.len(), all.len());
                for row in 0..25 {
                    prop_assert_eq!(
                        set.by_row(row).map(|a| a.row),
                        all.iter().find(|a| a.row == row).map(|a| a.row)
                    );
                }
                for name in 0..7u8 {
                    let name = format!("n{name}");
                    let expect = all.iter().find(|a| a.name == name).map(|a| a.row);
                    prop_assert_eq!(set.by_name(&name).map(|a| a.row), expect);
                }
                for uid in 0..4u32 {
                    for unit in [None, Some("u0.service"), Some("u1.service")] {
                        let mut c = Caller::from_bus(1, uid, uid);
                        c.unit = unit.map(str::to_string);
                        c.cgroup = unit.map(|u| format!("/system.slice/{u}"));
                        let files = |a: &&Agent| match (&a.selectors.uid, &a.selectors.unit) {
                            (Some(u), _) => *u == uid,
                            (None, Some(un)) => Some(un.as_str()) == unit,
                            (None, None) => true,
                        };
                        prop_assert_eq!(
                            rows(set.candidates(&c, None)),
                            rows(all.iter().filter(files))
                        );
                        for name in 0..7u8 {
                            let name = format!("n{name}");
                            let expect = all.iter().find(|a| a.name == name).filter(files);
                            prop_assert_eq!(
                                rows(set.candidates(&c, Some(&name))),
                                rows(expect.into_iter())
                            );
                        }
                    }
                }
            }
        }
    }
}
