//! Relying-party check of an HTTP Message Signature (RFC 9421) made by tesserad
//! (`ecdsa-p256-sha256`, label and `tag` `tessera`, key by `keyid` from the daemon's JWKS).
//! The signature base is rebuilt here from the request as received (§2.5), so a signature
//! holds only for the method, target, headers and body digest it covered.

use p256::ecdsa::signature::Verifier;
use sfv::{BareItem, ListEntry, Parser, SerializeValue};
use sha2::{Digest, Sha256, Sha512};

use super::{now, ReplayCache, VerifyError};

/// A request as the relying party received it.
#[derive(Debug, Clone)]
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// The absolute target URI (RFC 9110 §7.1) as the relying party serves it.
    pub target_uri: &'a str,
    /// Every header line (name, value); names in any case, repeated names allowed.
    pub headers: &'a [(&'a str, &'a str)],
    /// The body: when given and not empty, `content-digest` must be covered and match it.
    pub body: Option<&'a [u8]>,
}

#[derive(Debug, Clone)]
pub struct HttpSignatureVerified {
    pub keyid: String,
    /// The covered components, in order.
    pub covered: Vec<String>,
    pub created: i64,
    pub expires: i64,
    pub nonce: String,
}

/// Checks tessera's RFC 9421 signatures; keep one per relying party (its replay cache holds
/// each `nonce` until the signature expires).
pub struct HttpSignatureVerifier {
    label: String,
    require: Vec<String>,
    leeway: i64,
    max_age: i64,
    replay: ReplayCache,
}

impl Default for HttpSignatureVerifier {
    fn default() -> Self {
        HttpSignatureVerifier {
            label: "tessera".into(),
            require: vec!["@method".into(), "@authority".into(), "@target-uri".into()],
            leeway: 30,
            max_age: 300,
            replay: ReplayCache::default(),
        }
    }
}

fn bad(m: impl Into<String>) -> VerifyError {
    VerifyError::Proof(m.into())
}

impl HttpSignatureVerifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Components the signature must cover besides `@method`, `@authority` and `@target-uri`
    /// (e.g. `content-type`).
    pub fn require(mut self, component: impl Into<String>) -> Self {
        let c = component.into();
        if !self.require.contains(&c) {
            self.require.push(c);
        }
        self
    }

    /// Remember at most `n` unexpired nonces; more are refused until some expire.
    pub fn replay_capacity(mut self, n: usize) -> Self {
        self.replay = ReplayCache::new(n);
        self
    }

    /// Verify the `tessera` signature of `req` with a key of `jwks` (the JSON of `/v1/jwks`).
    pub fn verify(
        &self,
        req: &SignedRequest,
        jwks: &serde_json::Value,
    ) -> Result<HttpSignatureVerified, VerifyError> {
        let now = now();
        let input = header(req.headers, "signature-input")
            .ok_or_else(|| bad("no Signature-Input header"))?;
        let sigs = header(req.headers, "signature").ok_or_else(|| bad("no Signature header"))?;
        let input = Parser::new(&input)
            .parse_dictionary()
            .map_err(|e| bad(format!("Signature-Input: {e}")))?;
        let sigs = Parser::new(&sigs)
            .parse_dictionary()
            .map_err(|e| bad(format!("Signature: {e}")))?;
        let member = |d: &sfv::Dictionary| {
            d.iter()
                .find(|(k, _)| k.as_str() == self.label)
                .map(|(_, v)| v.clone())
        };
        let Some(ListEntry::InnerList(list)) = member(&input) else {
            return Err(bad(format!("no signature labelled {:?}", self.label)));
        };
        let sig = match member(&sigs) {
            Some(ListEntry::Item(i)) => match i.bare_item {
                BareItem::ByteSequence(b) => b,
                _ => return Err(bad("the signature is not a byte sequence")),
            },
            _ => return Err(bad(format!("no Signature labelled {:?}", self.label))),
        };
        // The parameters tessera always sets.
        let (mut created, mut expires, mut nonce, mut keyid, mut alg, mut tag) =
            (None, None, None, None, None, None);
        for (k, v) in &list.params {
            let int = || v.as_integer().map(i64::from);
            let text = || v.as_string().map(|s| s.as_str().to_string());
            match k.as_str() {
                "created" => created = int(),
                "expires" => expires = int(),
                "nonce" => nonce = text(),
                "keyid" => keyid = text(),
                "alg" => alg = text(),
                "tag" => tag = text(),
                other => return Err(bad(format!("unknown signature parameter {other:?}"))),
            }
        }
        let (Some(created), Some(expires), Some(nonce), Some(keyid)) =
            (created, expires, nonce, keyid)
        else {
            return Err(bad("created, expires, nonce and keyid are required"));
        };
        if alg.as_deref().is_some_and(|a| a != "ecdsa-p256-sha256") {
            return Err(bad(format!("alg {alg:?} is not ecdsa-p256-sha256")));
        }
        if tag.as_deref() != Some(self.label.as_str()) {
            return Err(bad(format!("tag {tag:?} is not {:?}", self.label)));
        }
        if created > now + self.leeway || created < now - self.max_age {
            return Err(bad(format!("created {created} is not recent")));
        }
        if expires <= now - self.leeway || expires < created || expires - created > 3600 {
            return Err(bad(format!("expired at {expires}")));
        }
        // The covered components, each a plain string item.
        let mut covered: Vec<String> = Vec::with_capacity(list.items.len());
        for item in &list.items {
            match (&item.bare_item, item.params.is_empty()) {
                (BareItem::String(s), true) if covered.iter().any(|c| c == s.as_str()) => {
                    return Err(bad(format!("component {} covered twice", s.as_str())))
                }
                (BareItem::String(s), true) => covered.push(s.as_str().to_string()),
                _ => return Err(bad("components are plain strings (no parameters)")),
            }
        }
        for r in &self.require {
            if !covered.contains(r) {
                return Err(bad(format!("the signature does not cover {r}")));
            }
        }
        // A body must be covered by its digest; a covered digest must match the body (an
        // empty one too: the body cannot be dropped from a signed request).
        let digest_covered = covered.iter().any(|c| c == "content-digest");
        match (req.body, digest_covered) {
            (Some(b), false) if !b.is_empty() => {
                return Err(bad("a request with a body must cover content-digest"))
            }
            (None, true) => {
                return Err(bad(
                    "content-digest is covered: give the body to check it against",
                ))
            }
            (Some(body), true) => {
                let d = header(req.headers, "content-digest")
                    .ok_or_else(|| bad("no Content-Digest header"))?;
                check_digest(&d, body)?;
            }
            _ => {}
        }
        // The base (§2.5), then the signature over it.
        let url = url::Url::parse(req.target_uri)
            .map_err(|e| bad(format!("target URI {:?}: {e}", req.target_uri)))?;
        let mut base = String::new();
        for c in &covered {
            let v = component(c, req, &url)?;
            base.push_str(&format!("\"{c}\": {v}\n"));
        }
        let params = vec![ListEntry::InnerList(list.clone())]
            .serialize_value()
            .map_err(|e| bad(format!("signature parameters: {e}")))?;
        base.push_str(&format!("\"@signature-params\": {params}"));
        let key = jwks
            .get("keys")
            .and_then(|k| k.as_array())
            .into_iter()
            .flatten()
            .filter(|k| super::usable_for_tokens(k))
            .find(|k| k.get("kid").and_then(|v| v.as_str()) == Some(keyid.as_str()))
            .ok_or_else(|| VerifyError::UnknownKey(keyid.clone()))?;
        let vk = crate::attestation::key_from_jwk(key).map_err(|e| bad(e.to_string()))?;
        let sig = p256::ecdsa::Signature::from_slice(&sig)
            .map_err(|_| bad("the signature is not 64 bytes r||s"))?;
        vk.verify(base.as_bytes(), &sig)
            .map_err(|_| bad("the signature does not verify"))?;
        self.replay.check_and_insert(
            &format!("{keyid}.{nonce}"),
            expires + self.leeway + 1,
            now,
        )?;
        Ok(HttpSignatureVerified {
            keyid,
            covered,
            created,
            expires,
            nonce,
        })
    }
}

/// Every line of header `name`, trimmed and joined with ", " (RFC 9421 §2.1).
fn header(headers: &[(&str, &str)], name: &str) -> Option<String> {
    let v: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim_matches([' ', '\t']))
        .collect();
    (!v.is_empty()).then(|| v.join(", "))
}

fn component(c: &str, req: &SignedRequest, url: &url::Url) -> Result<String, VerifyError> {
    Ok(match c {
        "@method" => req.method.to_string(),
        // The normal form, as the daemon signs it.
        "@target-uri" => url.as_str().to_string(),
        "@authority" => match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{}:{p}", h.to_ascii_lowercase()),
            (Some(h), None) => h.to_ascii_lowercase(),
            _ => return Err(bad("the target URI has no host")),
        },
        "@scheme" => url.scheme().to_string(),
        "@path" => match url.path() {
            "" => "/".to_string(),
            p => p.to_string(),
        },
        "@query" => format!("?{}", url.query().unwrap_or("")),
        "@request-target" => match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        },
        name if !name.starts_with('@') && name.bytes().all(|b| b.is_ascii_graphic()) => {
            if name.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(bad(format!("component {name:?} is not lower-case")));
            }
            header(req.headers, name)
                .ok_or_else(|| bad(format!("the request has no {name} header")))?
        }
        other => return Err(bad(format!("component {other:?} is not supported"))),
    })
}

/// `Content-Digest` (RFC 9530): a sha-256 or sha-512 member equal to the body's digest.
fn check_digest(header: &str, body: &[u8]) -> Result<(), VerifyError> {
    let d = Parser::new(header)
        .parse_dictionary()
        .map_err(|e| bad(format!("Content-Digest: {e}")))?;
    let mut checked = false;
    for (alg, v) in &d {
        let ListEntry::Item(i) = v else { continue };
        let Some(got) = i.bare_item.as_byte_sequence() else {
            continue;
        };
        let want: Vec<u8> = match alg.as_str() {
            "sha-256" => Sha256::digest(body).to_vec(),
            "sha-512" => Sha512::digest(body).to_vec(),
            _ => continue,
        };
        if got != want.as_slice() {
            return Err(bad(format!(
                "Content-Digest {} does not match the body",
                alg.as_str()
            )));
        }
        checked = true;
    }
    if !checked {
        return Err(bad("Content-Digest has no sha-256 or sha-512 member"));
    }
    Ok(())
}
