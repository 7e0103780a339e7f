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
    /// Only sender-constrained tokens (`bind`): a bearer token request is refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_binding: bool,
    /// Keyless TLS: may the agent's key sign as a TLS server (`/v1/tls/sign` role `server`)?
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls_server: bool,
    /// Lifetime of a WIMSE WIT (default and at most 1 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wit_ttl: Option<Dur>,
    /// Proof key: "hardware" (default, the agent's device key) or "session" (an in-memory
    /// key bound by hardware-signed tokens and WITs, rotated every `session_key_ttl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof_key: Option<String>,
    /// Life of a session proof key (default 10 min, at most 1 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_key_ttl: Option<Dur>,
    /// Workload API X.509-SVIDs: "off" (default: the key would have to leave the device) or
    /// "software" (a daemon-made software key per rotation, handed to the workload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_svid: Option<String>,
    /// The identity key: "p256" (default, ES256) or "rsa2048" (RS256, for relying parties that
    /// take nothing else). Fixed at enrolment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl Policy {
    /// Whether the agent's identity key is RSA-2048 (`key = "rsa2048"`).
    pub fn rsa_key(&self) -> bool {
        self.key.as_deref() == Some("rsa2048")
    }

    /// Whether the agent opted in to software X.509-SVIDs.
    pub fn software_x509_svid(&self) -> bool {
        self.x509_svid.as_deref() == Some("software")
    }
}

/// Longest WIT (and the default).
pub const MAX_WIT_TTL: Duration = Duration::from_secs(3600);

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
        if let Some(w) = self.wit_ttl {
            if w.0 > MAX_WIT_TTL || w.0.as_secs() < 1 || w.0.subsec_nanos() != 0 {
                return Err("policy wit_ttl must be whole seconds from 1s to 1h".into());
            }
        }
        if let Some(k) = &self.proof_key {
            if k != "hardware" && k != "session" {
                return Err("policy proof_key is \"hardware\" or \"session\"".into());
            }
        }
        if let Some(k) = &self.x509_svid {
            if k != "off" && k != "software" {
                return Err("policy x509_svid is \"off\" or \"software\"".into());
            }
        }
        if let Some(k) = &self.key {
            if k != "p256" && k != "rsa2048" {
                return Err("policy key is \"p256\" or \"rsa2048\"".into());
            }
        }
        // RSA agents get tokens, JWT-SVIDs and attestation only (DESIGN, keys).
        if self.rsa_key() {
            let p256_only = [
                (self.require_binding, "require_binding"),
                (self.tls_server, "tls_server"),
                (
                    self.proof_key.as_deref() == Some("session"),
                    "proof_key = \"session\"",
                ),
                (self.software_x509_svid(), "x509_svid = \"software\""),
            ];
            if let Some((_, what)) = p256_only.iter().find(|(on, _)| *on) {
                return Err(format!(
                    "policy {what} needs a P-256 key: key = \"rsa2048\" agents get tokens, JWT-SVIDs and attestation only"
                ));
            }
        }
        if let Some(t) = self.session_key_ttl {
            if t.0 > MAX_WIT_TTL || t.0.as_secs() < 2 || t.0.subsec_nanos() != 0 {
                return Err("policy session_key_ttl must be whole seconds from 2s to 1h".into());
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

/// Why a proof target (DPoP `htu`, WPT `aud`, RFC 9421 `@target-uri`) cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("the target must be an absolute https URI (http only to loopback): {0}")]
    Malformed(String),
    #[error("target {0} is not allowed by the agent's audiences")]
    NotAllowed(String),
}

/// Parse and check a proof target: absolute `https` (or `http` to a loopback host), no
/// userinfo, no fragment, and no query unless `query_ok`. Returns it normalised (WHATWG URL).
pub fn proof_target(target: &str, query_ok: bool) -> Result<url::Url, TargetError> {
    let bad = |why: &str| {
        TargetError::Malformed(format!("{why} ({:?})", crate::audit::client_text(target)))
    };
    let u = url::Url::parse(target).map_err(|_| bad("not a URI"))?;
    let loopback = match u.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        None => false,
    };
    match u.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => return Err(bad("scheme must be https, or http to loopback")),
    }
    if u.host().is_none() {
        return Err(bad("no host"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(bad("userinfo is not allowed"));
    }
    if u.fragment().is_some() {
        return Err(bad("a fragment is not allowed"));
    }
    if u.query().is_some() && !query_ok {
        return Err(bad("a query is not allowed"));
    }
    // Encoded separators and dots survive the path-prefix check but some servers decode them
    // and route elsewhere (`/public/..%2Fadmin`): refused.
    let path = u.path().to_ascii_lowercase();
    if ["%2f", "%5c", "%2e"].iter().any(|e| path.contains(e)) {
        return Err(bad(
            "an encoded '/', '\\' or '.' in the path is not allowed",
        ));
    }
    Ok(u)
}

/// Whether some `audiences` entry allows proof target `t`: an entry that parses as an
/// http(s) URL with the same scheme and port (default ports explicit), a matching host (globs
/// as for audiences: case-insensitive, trailing dot removed, `*` = one or more DNS label
/// characters) and a path that is a prefix of the target's on a `/` boundary (no path = every
/// path). Entries that are not URLs (or carry userinfo, a query or a fragment) allow nothing.
pub fn proof_target_allowed(audiences: &[String], t: &url::Url) -> bool {
    let Some(host) = t.host_str() else {
        return false;
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let port = t.port_or_known_default();
    audiences.iter().any(|a| {
        let Some((scheme, rest)) = a.split_once("://") else {
            return false;
        };
        let scheme = scheme.to_ascii_lowercase();
        if scheme != t.scheme() || rest.contains(['?', '#', '@']) {
            return false;
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host_pat, pat_port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                match p.parse::<u16>() {
                    Ok(p) => (h, Some(p)),
                    Err(_) => return false,
                }
            }
            _ => (authority, None),
        };
        let default = if scheme == "https" { 443 } else { 80 };
        if pat_port.unwrap_or(default) != port.unwrap_or(default) {
            return false;
        }
        let host_pat = host_pat.trim_end_matches('.').to_ascii_lowercase();
        if host_pat.is_empty() || !host_glob(&host_pat, &host) {
            return false;
        }
        let path = path.trim_end_matches('/');
        path.is_empty() || t.path() == path || t.path().starts_with(&format!("{path}/"))
    })
}

/// A host pattern where `*` is one or more DNS label characters.
fn host_glob(pattern: &str, host: &str) -> bool {
    glob_match(&format!("https://{pattern}"), &format!("https://{host}"))
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
    fn proof_targets_follow_the_audience_urls() {
        let pats: Vec<String> = [
            "https://api.example.com",
            "https://*.internal.example.com:8443/v1",
            "http://127.0.0.1:9000/x/",
            "spiffe://other/agent",
            "https://q.example.com/?a=b",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let ok = |t: &str| {
            let u = proof_target(t, false).unwrap();
            proof_target_allowed(&pats, &u)
        };
        assert!(ok("https://api.example.com/anything/at/all"));
        assert!(ok("https://API.Example.com./"));
        assert!(ok("https://api.example.com:443/x"));
        assert!(!ok("https://api.example.com:8443/x"), "port differs");
        assert!(ok("https://db.internal.example.com:8443/v1"));
        assert!(ok("https://db.internal.example.com:8443/v1/items"));
        assert!(
            !ok("https://db.internal.example.com:8443/v10"),
            "not on a / boundary"
        );
        assert!(
            !ok("https://db.internal.example.com:8443/"),
            "outside the path"
        );
        assert!(
            !ok("https://a.b.internal.example.com:8443/v1"),
            "* is one label"
        );
        assert!(!ok("https://internal.example.com:8443/v1"));
        assert!(ok("http://127.0.0.1:9000/x/y"));
        assert!(!ok("http://127.0.0.1:9001/x/y"));
        assert!(
            !ok("https://q.example.com/"),
            "an audience with a query allows nothing"
        );
        assert!(!ok("https://other/agent"));
        for bad in [
            "https://api.example.com/public/..%2Fadmin",
            "https://api.example.com/a%5cb",
            "http://api.example.com/",
            "https://user@api.example.com/",
            "https://api.example.com/#f",
            "https://api.example.com/?q=1",
            "api.example.com/x",
            "ftp://api.example.com/",
            "",
        ] {
            assert!(proof_target(bad, false).is_err(), "{bad}");
        }
        assert!(proof_target("https://api.example.com/?q=1", true).is_ok());
        // Encoded dot segments are resolved by the parser: what is checked is the result.
        let u = proof_target("https://api.example.com/public/%2e%2e/admin", false).unwrap();
        assert_eq!(u.path(), "/admin");
        assert!(!proof_target_allowed(
            &["https://api.example.com/public".to_string()],
            &u
        ));
    }

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
