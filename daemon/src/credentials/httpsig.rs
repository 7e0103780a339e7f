//! HTTP Message Signatures (RFC 9421) made by the daemon: it builds the signature base itself
//! from the request's components, so what it signs always starts with a component line
//! (`"@method": …`) and ends with `"@signature-params": …` — never a JWT signing input, DER or a
//! TLS CertificateVerify content. Algorithm `ecdsa-p256-sha256` (§3.3.4: SHA-256, raw r‖s).

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64};
use base64::Engine;
use serde_json::{Map, Value};

use crate::agents::policy;
use crate::credentials::problem::{Kind, Problem};

/// Label and `tag` of every signature the daemon makes.
pub const LABEL: &str = "tessera";
/// Longest component value.
const MAX_VALUE: usize = 8 * 1024;
/// Headers a request may name at most.
const MAX_HEADERS: usize = 32;
/// Components a request may ask for at most.
const MAX_COMPONENTS: usize = 40;
/// How long a signature is good for (`expires` − `created`).
pub const LIFETIME: i64 = 300;

/// A checked request for a signature: the covered components in order, with their values.
#[derive(Debug)]
pub struct Base {
    pub components: Vec<(String, String)>,
    pub target: url::Url,
    pub method: String,
}

fn malformed(m: impl Into<String>) -> Problem {
    Problem::new(Kind::MalformedRequest, m)
}

/// Visible ASCII, SP or HTAB (RFC 9421 §2.1 values never hold CR, LF or NUL), trimmed.
fn field_value(name: &str, v: &str) -> Result<String, Problem> {
    if v.len() > MAX_VALUE || !v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        return Err(malformed(format!(
            "header {name}: values are visible ASCII, SP or HTAB, at most {MAX_VALUE} bytes"
        )));
    }
    Ok(v.trim_matches([' ', '\t']).to_string())
}

fn valid_header_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `sha-256=:<32 bytes>:` or `sha-512=:<64 bytes>:` (RFC 9530).
fn valid_digest(d: &str) -> bool {
    let check = |prefix: &str, len: usize| {
        d.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(':'))
            .and_then(|b| STANDARD.decode(b).ok())
            .is_some_and(|b| b.len() == len)
    };
    check("sha-256=:", 32) || check("sha-512=:", 64)
}

/// Check the request and list the components to cover: always `@method` and `@authority`,
/// then those asked for, then `content-digest` when a digest is given.
pub fn build(
    audiences: &[String],
    method: Option<&str>,
    target_uri: Option<&str>,
    headers: Option<&Map<String, Value>>,
    content_digest: Option<&str>,
    asked: Option<&[String]>,
) -> Result<Base, Problem> {
    let method = method
        .filter(|m| !m.is_empty() && m.len() <= 32 && m.bytes().all(|b| b.is_ascii_uppercase()))
        .ok_or_else(|| malformed("method must be an upper-case HTTP method"))?;
    let raw = target_uri.filter(|u| u.len() <= MAX_VALUE).ok_or_else(|| {
        malformed(format!(
            "target_uri is required (at most {MAX_VALUE} bytes)"
        ))
    })?;
    if !raw.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(malformed(
            "target_uri must be visible ASCII (percent-encode the rest)",
        ));
    }
    if asked.is_some_and(|a| a.len() > MAX_COMPONENTS) {
        return Err(malformed(format!("at most {MAX_COMPONENTS} components")));
    }
    let target = policy::proof_target(raw, true).map_err(|e| malformed(e.to_string()))?;
    // What is checked is what is signed: the target must be written in its normal form
    // (WHATWG URL serialisation), so `\`, dot segments, default ports or case cannot make the
    // signed @path or @target-uri differ from the path the policy allowed.
    if target.as_str() != raw {
        return Err(malformed(format!(
            "write target_uri in its normal form: {}",
            target.as_str()
        )));
    }
    if !policy::proof_target_allowed(audiences, &target) {
        return Err(Problem::new(
            Kind::TargetNotAllowed,
            policy::TargetError::NotAllowed(target.to_string()).to_string(),
        ));
    }
    let (path, query) = (
        target.path().to_string(),
        target.query().map(str::to_string),
    );
    let authority = match (target.host_str(), target.port()) {
        (Some(h), Some(p)) => format!("{}:{p}", h.to_ascii_lowercase()),
        (Some(h), None) => h.to_ascii_lowercase(),
        (None, _) => return Err(malformed("target_uri has no host")),
    };
    let mut fields: Vec<(String, String)> = Vec::new();
    if let Some(h) = headers {
        if h.len() > MAX_HEADERS {
            return Err(malformed(format!("at most {MAX_HEADERS} headers")));
        }
        for (name, v) in h {
            if !valid_header_name(name) {
                return Err(malformed(format!(
                    "header names are lower-case ({:?})",
                    crate::audit::client_text(name)
                )));
            }
            if name == "content-digest" || name.starts_with("signature") {
                return Err(malformed(format!("header {name} is the daemon's to set")));
            }
            let v = v
                .as_str()
                .ok_or_else(|| malformed(format!("header {name}: the value is a string")))?;
            fields.push((name.clone(), field_value(name, v)?));
        }
    }
    if let Some(d) = content_digest {
        if !valid_digest(d) {
            return Err(malformed(
                "content_digest is \"sha-256=:<base64>:\" or \"sha-512=:<base64>:\"",
            ));
        }
    }
    let mut order: Vec<String> = vec!["@method".into(), "@authority".into()];
    for c in asked.unwrap_or_default() {
        if !order.contains(c) {
            order.push(c.clone());
        }
    }
    if content_digest.is_some() && !order.iter().any(|c| c == "content-digest") {
        order.push("content-digest".into());
    }
    let mut components = Vec::with_capacity(order.len());
    for c in order {
        let value = match c.as_str() {
            "@method" => method.to_string(),
            "@target-uri" => raw.to_string(),
            "@authority" => authority.clone(),
            "@path" => if path.is_empty() { "/" } else { path.as_str() }.to_string(),
            "@query" => format!("?{}", query.as_deref().unwrap_or("")),
            "content-digest" => content_digest
                .ok_or_else(|| malformed("content-digest is covered only with content_digest"))?
                .to_string(),
            name if valid_header_name(name) => fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| malformed(format!("component {name} is not in headers")))?,
            other => {
                return Err(malformed(format!(
                    "component {:?} is not one of @method, @target-uri, @authority, @path, @query, content-digest or a lower-case header name",
                    crate::audit::client_text(other)
                )))
            }
        };
        components.push((c, value));
    }
    Ok(Base {
        components,
        target,
        method: method.to_string(),
    })
}

/// `(<components>);created=…;expires=…;nonce="…";keyid="…";alg="ecdsa-p256-sha256";tag="tessera"`
pub fn signature_params(base: &Base, created: i64, nonce: &str, keyid: &str) -> String {
    let list: Vec<String> = base
        .components
        .iter()
        .map(|(c, _)| format!("\"{c}\""))
        .collect();
    format!(
        "({});created={created};expires={};nonce=\"{nonce}\";keyid=\"{keyid}\";alg=\"ecdsa-p256-sha256\";tag=\"{LABEL}\"",
        list.join(" "),
        created + LIFETIME
    )
}

/// The signature base (RFC 9421 §2.5): one line per component, then `@signature-params`.
pub fn signature_base(base: &Base, params: &str) -> String {
    let mut out = String::new();
    for (c, v) in &base.components {
        out.push_str(&format!("\"{c}\": {v}\n"));
    }
    out.push_str(&format!("\"@signature-params\": {params}"));
    out
}

/// A fresh nonce (128 random bits).
pub fn nonce() -> String {
    B64.encode(rand::random::<[u8; 16]>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn base_follows_rfc9421() {
        let aud = vec!["https://example.com".to_string()];
        let headers = json!({"content-type": "  application/json ", "x-trace": "a\tb"});
        let b = build(
            &aud,
            Some("POST"),
            Some("https://example.com/foo/bar?param=Value&Pet=dog"),
            headers.as_object(),
            Some("sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"),
            Some(&[
                "@target-uri".into(),
                "@path".into(),
                "@query".into(),
                "content-type".into(),
            ]),
        )
        .unwrap();
        let params = signature_params(&b, 1618884473, "n", "k");
        assert_eq!(
            signature_base(&b, &params),
            "\"@method\": POST\n\"@authority\": example.com\n\"@target-uri\": https://example.com/foo/bar?param=Value&Pet=dog\n\"@path\": /foo/bar\n\"@query\": ?param=Value&Pet=dog\n\"content-type\": application/json\n\"content-digest\": sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:\n\"@signature-params\": (\"@method\" \"@authority\" \"@target-uri\" \"@path\" \"@query\" \"content-type\" \"content-digest\");created=1618884473;expires=1618884773;nonce=\"n\";keyid=\"k\";alg=\"ecdsa-p256-sha256\";tag=\"tessera\""
        );
        for (comps, hdrs) in [
            (vec!["x-missing".to_string()], json!({})),
            (vec!["Content-Type".to_string()], json!({})),
            (vec!["@status".to_string()], json!({})),
            (vec![], json!({"x": "a\nb"})),
            (vec![], json!({"signature": "x"})),
        ] {
            assert!(
                build(
                    &aud,
                    Some("GET"),
                    Some("https://example.com/"),
                    hdrs.as_object(),
                    None,
                    Some(&comps)
                )
                .is_err(),
                "{comps:?} {hdrs}"
            );
        }
        // Not in normal form: the signed path could differ from the checked one.
        for raw in [
            "https://example.com\\public/admin",
            "https://example.com/a/../b",
            "https://Example.com/",
            "https://example.com:443/",
            "https://example.com",
        ] {
            let e = build(&aud, Some("GET"), Some(raw), None, None, None).unwrap_err();
            assert_eq!(e.kind, Kind::MalformedRequest, "{raw}");
        }
        let out = build(
            &aud,
            Some("GET"),
            Some("https://other.example/"),
            None,
            None,
            None,
        );
        assert_eq!(out.unwrap_err().kind, Kind::TargetNotAllowed);
    }
}
