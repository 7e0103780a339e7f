//! What an agent may ask for ([`Policy`]), and policy decisions as pure functions: audience globs, scope subsets, TTL, rate.
//! Everything here is deterministic given its inputs (the rate limiter takes the time).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::duration::{format_duration, Dur};

/// What an agent may ask for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub audiences: Vec<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ttl: Option<Dur>,
    /// Longest agent certificate; defaults to `max_ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cert_ttl: Option<Dur>,
    /// Tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u32>,
}

impl Policy {
    pub fn validate(
        &self,
        global_max_ttl: std::time::Duration,
        global_max_cert_ttl: std::time::Duration,
    ) -> Result<(), String> {
        if let Some(m) = self.max_cert_ttl {
            if m.0 > global_max_cert_ttl {
                return Err(format!(
                    "policy max_cert_ttl {} is above the daemon's certificates.max_ttl {}",
                    format_duration(m.0),
                    format_duration(global_max_cert_ttl)
                ));
            }
            if m.0.as_secs() < 60 {
                return Err("policy max_cert_ttl must be at least 1m".into());
            }
        }
        if self.audiences.is_empty() {
            return Err("policy audiences must not be empty".into());
        }
        if self.audiences.iter().any(|a| a.trim().is_empty()) {
            return Err("policy audiences must not contain an empty string".into());
        }
        if self.scopes.iter().any(|s| s.is_empty() || s.contains(' ')) {
            return Err("policy scopes must be non-empty and contain no spaces".into());
        }
        if let Some(m) = self.max_ttl {
            if m.0 > global_max_ttl {
                return Err(format!(
                    "policy max_ttl {} is above the daemon's tokens.max_ttl {}",
                    format_duration(m.0),
                    format_duration(global_max_ttl)
                ));
            }
            if m.0.as_secs() < 1 {
                return Err("policy max_ttl must be at least 1s".into());
            }
        }
        Ok(())
    }
}

/// One piece of a glob pattern.
#[derive(Clone, Copy)]
enum Tok {
    Lit(char),
    /// `*` in a URL's authority: one or more DNS label characters (`A-Z a-z 0-9 -`), so it
    /// never spans a dot, a port, userinfo, a query or a fragment.
    Label,
    /// `*` anywhere else: any run of characters but `/`, `?` and `#`.
    Segment,
}

fn label_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-'
}

fn tokens(pattern: &str) -> Vec<Tok> {
    // The authority runs from after "://" to the first '/', '?' or '#'.
    let (auth_start, auth_end) = match pattern.find("://") {
        Some(i) => {
            let start = i + 3;
            let end = pattern[start..]
                .find(['/', '?', '#'])
                .map(|e| start + e)
                .unwrap_or(pattern.len());
            (start, end)
        }
        None => (0, 0),
    };
    pattern
        .char_indices()
        .map(|(i, c)| match c {
            '*' if (auth_start..auth_end).contains(&i) => Tok::Label,
            '*' => Tok::Segment,
            c => Tok::Lit(c),
        })
        .collect()
}

/// Audience globs. In a URL's host part `*` matches one or more DNS label characters, so
/// `https://*.example.com` is satisfied by `https://api.example.com` and never by
/// `https://evil.test#.example.com`, `https://a@b.example.com` or `https://.example.com`;
/// elsewhere `*` matches a run of characters without `/`, `?` or `#`. Everything else
/// matches literally.
pub fn glob_match(pattern: &str, s: &str) -> bool {
    let p = tokens(pattern);
    let t: Vec<char> = s.chars().collect();
    // ok[j]: the first i pattern tokens match the first j characters.
    let mut ok = vec![false; t.len() + 1];
    ok[0] = true;
    for tok in &p {
        let mut next = vec![false; t.len() + 1];
        match *tok {
            Tok::Lit(c) => {
                for j in 0..t.len() {
                    next[j + 1] = ok[j] && t[j] == c;
                }
            }
            Tok::Label | Tok::Segment => {
                let allowed = |c: char| match tok {
                    Tok::Label => label_char(c),
                    _ => !matches!(c, '/' | '?' | '#'),
                };
                let min_one = matches!(tok, Tok::Label);
                for j in 0..=t.len() {
                    // Zero characters (Segment only), or one more allowed character.
                    next[j] = (!min_one && ok[j])
                        || (j > 0 && allowed(t[j - 1]) && (ok[j - 1] || next[j - 1]));
                }
            }
        }
        ok = next;
    }
    ok[t.len()]
}

pub fn audience_allowed(patterns: &[String], audience: &str) -> bool {
    !audience.is_empty() && patterns.iter().any(|p| glob_match(p, audience))
}

/// Requested scopes that the policy does not allow (empty = all allowed).
pub fn scopes_not_allowed(allowed: &[String], requested: &[String]) -> Vec<String> {
    requested
        .iter()
        .filter(|s| !allowed.contains(s))
        .cloned()
        .collect()
}

/// The lifetime a credential (token, certificate) gets: the request's, else the default,
/// never above the agent's maximum. A request above the maximum is refused (naming the
/// maximum) rather than silently cut.
pub fn credential_ttl(
    requested: Option<Duration>,
    default: Duration,
    max: Duration,
) -> Result<Duration, Duration> {
    match requested {
        Some(t) if t > max => Err(max),
        // Credentials carry whole seconds (`exp`): no sub-second or fractional lifetimes.
        Some(t) if t < Duration::from_secs(1) || t.subsec_nanos() != 0 => Err(max),
        Some(t) => Ok(t),
        None => Ok(default.min(max)),
    }
}

/// Per-agent token bucket: `rate` tokens per minute, bursts up to `rate`.
#[derive(Default)]
pub struct RateLimiter {
    buckets: HashMap<String, (f64, Instant)>,
}

impl RateLimiter {
    /// Ok, or how long until the next token is allowed.
    pub fn check(&mut self, key: &str, rate_per_min: u32, now: Instant) -> Result<(), Duration> {
        if rate_per_min == 0 {
            return Err(Duration::from_secs(60));
        }
        let cap = rate_per_min as f64;
        let per_sec = cap / 60.0;
        let (tokens, last) = self.buckets.entry(key.to_string()).or_insert((cap, now));
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * per_sec).min(cap);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / per_sec))
        }
    }

    pub fn forget(&mut self, key: &str) {
        self.buckets.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let pats = vec![
            "https://api.example.com".to_string(),
            "https://*.internal.example.com".to_string(),
        ];
        assert!(audience_allowed(&pats, "https://api.example.com"));
        assert!(!audience_allowed(&pats, "https://api.example.com/x"));
        assert!(audience_allowed(&pats, "https://db.internal.example.com"));
        // One label only: `*` never spans a dot.
        assert!(!audience_allowed(&pats, "https://a.b.internal.example.com"));
        assert!(!audience_allowed(
            &pats,
            "https://evil.test/.internal.example.com"
        ));
        assert!(!audience_allowed(&pats, "https://internal.example.com"));
        assert!(!audience_allowed(&pats, ""));
        assert!(glob_match("*", "abc"));
        assert!(!glob_match("*", "a/b"));
        assert!(glob_match("a*c*e", "abcde"));
    }

    #[test]
    fn hostile_audiences_never_match_a_host_glob() {
        let host = "https://*.internal.example.com";
        for ok in [
            "https://db.internal.example.com",
            "https://a-b.internal.example.com",
            "https://X9.internal.example.com",
        ] {
            assert!(glob_match(host, ok), "{ok}");
        }
        for bad in [
            "https://.internal.example.com",
            "https://evil.test#.internal.example.com",
            "https://evil.test?.internal.example.com",
            "https://evil.test/.internal.example.com",
            "https://user@db.internal.example.com",
            "https://evil.test:443.internal.example.com",
            "https://a.b.internal.example.com",
            "https://db.internal.example.com.evil.test",
            "https://db_x.internal.example.com",
            "https://db.internal.example.com/",
            "https://db.internal.example.com#x",
            "https://\u{0430}.internal.example.com",
        ] {
            assert!(!glob_match(host, bad), "{bad}");
        }
        // In the path `*` is one segment: no '/', '?' or '#'.
        let path = "https://api.example.com/v1/*";
        assert!(glob_match(path, "https://api.example.com/v1/items"));
        assert!(glob_match(path, "https://api.example.com/v1/"));
        for bad in [
            "https://api.example.com/v1/a/b",
            "https://api.example.com/v1/a?b",
            "https://api.example.com/v1/a#b",
            "https://api.example.com/v2/a",
        ] {
            assert!(!glob_match(path, bad), "{bad}");
        }
        // A port glob is a label too: digits only then, never a host.
        assert!(glob_match(
            "https://api.example.com:*",
            "https://api.example.com:8443"
        ));
        assert!(!glob_match(
            "https://api.example.com:*",
            "https://api.example.com:1@evil.test"
        ));
    }

    #[test]
    fn sub_second_and_fractional_ttls_are_refused() {
        let (d, m) = (Duration::from_secs(300), Duration::from_secs(3600));
        assert!(credential_ttl(Some(Duration::from_millis(500)), d, m).is_err());
        assert!(credential_ttl(Some(Duration::from_millis(1500)), d, m).is_err());
        assert!(credential_ttl(Some(Duration::ZERO), d, m).is_err());
        assert_eq!(
            credential_ttl(Some(Duration::from_secs(1)), d, m),
            Ok(Duration::from_secs(1))
        );
    }

    #[test]
    fn scopes_and_ttl() {
        let allowed = vec!["read".to_string(), "write".to_string()];
        assert!(scopes_not_allowed(&allowed, &["read".into()]).is_empty());
        assert_eq!(
            scopes_not_allowed(&allowed, &["admin".into(), "read".into()]),
            vec!["admin"]
        );
        let m = Duration::from_secs(900);
        let d = Duration::from_secs(300);
        assert_eq!(credential_ttl(None, d, m), Ok(d));
        assert_eq!(credential_ttl(None, Duration::from_secs(3600), m), Ok(m));
        assert_eq!(
            credential_ttl(Some(Duration::from_secs(60)), d, m),
            Ok(Duration::from_secs(60))
        );
        assert_eq!(credential_ttl(Some(Duration::from_secs(901)), d, m), Err(m));
        assert_eq!(credential_ttl(Some(Duration::ZERO), d, m), Err(m));
    }

    #[test]
    fn rate_limit_refills() {
        let mut rl = RateLimiter::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(rl.check("a", 3, t0).is_ok());
        }
        let wait = rl.check("a", 3, t0).unwrap_err();
        assert!(wait > Duration::from_secs(19) && wait <= Duration::from_secs(20));
        assert!(rl.check("b", 3, t0).is_ok(), "agents are independent");
        assert!(rl.check("a", 3, t0 + Duration::from_secs(20)).is_ok());
    }
}
