//! Policy decisions as pure functions: audience globs, scope subsets, TTL, rate.
//! Everything here is deterministic given its inputs (the rate limiter takes the time).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// `*` matches any run of characters except `/`, so `https://*.example.com` cannot be
/// satisfied by `https://evil.test/.example.com`. Everything else matches literally.
pub fn glob_match(pattern: &str, s: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = s.chars().collect();
    // Iterative matcher with backtracking to the last star.
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            if t[st] == '/' {
                return false;
            }
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
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
        Some(t) if t.is_zero() => Err(max),
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
        assert!(audience_allowed(&pats, "https://a.b.internal.example.com"));
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
