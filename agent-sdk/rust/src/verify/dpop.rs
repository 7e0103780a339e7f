//! Relying-party check of a DPoP-bound token and its proof (RFC 9449 §4.3 and §7.1).
//!
//! ```no_run
//! # fn demo(jwks: serde_json::Value, auth: &str, dpop: &str) -> Result<(), tessera::verify::VerifyError> {
//! use tessera::verify::{dpop::{DpopRequest, DpopVerifier}, Options};
//! let verifier = DpopVerifier::new(Options::new("https://api.example.com"));
//! let ok = verifier.verify(
//!     &DpopRequest::new("GET", "https://api.example.com/v1/x?y=1", &[dpop]).authorization(auth),
//!     &jwks,
//! )?;
//! let agent = ok.token.expect("verify() always checks a token");
//! println!("agent {} (key {})", agent.sub, ok.jkt);
//! # Ok(()) }
//! ```

use serde::Deserialize;

use super::{
    b64_sha256, decode_signed, now, public_jwk, raw_header, verify_signed, Claims, Options,
    ReplayCache, VerifyError,
};

/// One request as the relying party received it.
#[derive(Debug, Clone)]
pub struct DpopRequest<'a> {
    /// The request method (`GET`, `POST`, …).
    pub method: &'a str,
    /// The request's absolute URI as the relying party serves it (query and fragment ignored).
    pub url: &'a str,
    /// The `Authorization` header value, `DPoP <token>` (required by
    /// [`DpopVerifier::verify`]; a token endpoint uses [`DpopVerifier::verify_token_request`]).
    pub authorization: Option<&'a str>,
    /// Every `DPoP` header value the request carried (exactly one is accepted).
    pub dpop: &'a [&'a str],
    /// The nonce this relying party currently requires (RFC 9449 §8), if any.
    pub nonce: Option<&'a str>,
}

impl<'a> DpopRequest<'a> {
    pub fn new(method: &'a str, url: &'a str, dpop: &'a [&'a str]) -> Self {
        DpopRequest {
            method,
            url,
            authorization: None,
            dpop,
            nonce: None,
        }
    }

    pub fn authorization(mut self, value: &'a str) -> Self {
        self.authorization = Some(value);
        self
    }

    pub fn nonce(mut self, nonce: &'a str) -> Self {
        self.nonce = Some(nonce);
        self
    }
}

/// What a verified request proves.
#[derive(Debug, Clone)]
pub struct DpopVerified {
    /// The access token's claims (always there from [`DpopVerifier::verify`]; `None` from
    /// [`DpopVerifier::verify_token_request`]).
    pub token: Option<Claims>,
    /// RFC 7638 thumbprint of the proof key (= the token's `cnf.jkt`).
    pub jkt: String,
    pub jti: String,
    pub iat: i64,
}

#[derive(Deserialize)]
struct ProofClaims {
    jti: String,
    htm: String,
    htu: String,
    iat: i64,
    #[serde(default)]
    ath: Option<String>,
    #[serde(default)]
    nonce: Option<String>,
}

/// Checks DPoP proofs; keep one per relying party (its replay cache is what stops a proof
/// being used twice).
pub struct DpopVerifier {
    token: Options,
    /// How old a proof's `iat` may be, seconds.
    max_age: i64,
    replay: ReplayCache,
}

impl DpopVerifier {
    /// `token`: how the access token is checked (audience, issuer, leeway; the leeway also
    /// bounds how far in the future a proof's `iat` may be).
    pub fn new(token: Options) -> DpopVerifier {
        DpopVerifier {
            token,
            max_age: 60,
            replay: ReplayCache::default(),
        }
    }

    /// Accept proofs made at most `max_age` ago (default 60 s).
    pub fn max_age(mut self, max_age: std::time::Duration) -> Self {
        self.max_age = max_age.as_secs().min(3600) as i64;
        self
    }

    /// Remember at most `n` unexpired proofs; more are refused until some expire.
    pub fn replay_capacity(mut self, n: usize) -> Self {
        self.replay = ReplayCache::new(n);
        self
    }

    /// A resource server's check (RFC 9449 §7.1): the request must carry `Authorization: DPoP
    /// <token>`; the token is checked against `jwks`, the proof against the token and the
    /// request, and the proof must not have been seen before.
    pub fn verify(
        &self,
        req: &DpopRequest,
        jwks: &serde_json::Value,
    ) -> Result<DpopVerified, VerifyError> {
        if req.authorization.is_none() {
            return Err(VerifyError::Proof(
                "no Authorization: DPoP <token> header".into(),
            ));
        }
        self.check(req, jwks, now())
    }

    /// A token endpoint's check (RFC 9449 §5): a proof alone, with no access token and no
    /// `ath`; the key it proves is the one to bind the new token to (`jkt`).
    pub fn verify_token_request(&self, req: &DpopRequest) -> Result<DpopVerified, VerifyError> {
        if req.authorization.is_some() {
            return Err(VerifyError::Proof(
                "a token request carries no access token".into(),
            ));
        }
        self.check(req, &serde_json::Value::Null, now())
    }

    fn check(
        &self,
        req: &DpopRequest,
        jwks: &serde_json::Value,
        now: i64,
    ) -> Result<DpopVerified, VerifyError> {
        let bad = |m: String| VerifyError::Proof(m);
        // (1) exactly one DPoP header.
        let [proof] = req.dpop else {
            return Err(bad(format!(
                "{} DPoP headers; exactly one is accepted",
                req.dpop.len()
            )));
        };
        // The access token: `DPoP` scheme, bound to a key.
        let token = match req.authorization {
            None => None,
            Some(v) => {
                let (scheme, t) = v
                    .split_once(' ')
                    .ok_or_else(|| bad("Authorization is not \"DPoP <token>\"".into()))?;
                if !scheme.eq_ignore_ascii_case("DPoP") {
                    return Err(bad(format!(
                        "Authorization scheme {scheme:?}: a bound token is presented as DPoP"
                    )));
                }
                let t = t.trim();
                let claims = verify_signed(t, jwks, &self.token)?;
                Some((t, claims))
            }
        };
        // (2)-(5) a typed, asymmetric JWS with the key in its header.
        let h = raw_header(proof).map_err(bad)?;
        if h.get("typ").and_then(|v| v.as_str()) != Some("dpop+jwt") {
            return Err(bad(format!("typ {} is not dpop+jwt", h["typ"])));
        }
        // (7) a public key only; (6) it verifies the signature, with the algorithm it implies.
        let (jwk, alg, jkt) = public_jwk(&h["jwk"]).map_err(|e| bad(format!("jwk: {e}")))?;
        if h.get("alg").and_then(|v| v.as_str()) != Some(&format!("{alg:?}")) {
            return Err(bad(format!("alg {} does not fit the jwk", h["alg"])));
        }
        let c: ProofClaims = decode_signed(proof, &jwk, alg).map_err(bad)?;
        if c.jti.is_empty() || c.jti.len() > 256 {
            return Err(bad("jti is 1 to 256 characters".into()));
        }
        // (8) method, (9) URI without query and fragment.
        if c.htm != req.method {
            return Err(bad(format!(
                "htm {:?} is not the method {:?}",
                c.htm, req.method
            )));
        }
        if normal_uri(&c.htu)? != normal_uri(req.url)? {
            return Err(bad(format!("htu {:?} is not this request's URI", c.htu)));
        }
        // (10) the server's nonce.
        if let Some(n) = req.nonce {
            if c.nonce.as_deref() != Some(n) {
                return Err(VerifyError::UseNonce);
            }
        }
        // (11) fresh.
        let leeway = self.token.leeway as i64;
        if c.iat > now + leeway || c.iat < now - self.max_age {
            return Err(bad(format!(
                "iat {} is outside [{}, {}]",
                c.iat,
                now - self.max_age,
                now + leeway
            )));
        }
        // (12) the token's hash and its key.
        let claims = match token {
            Some((t, claims)) => {
                if c.ath.as_deref() != Some(b64_sha256(t).as_str()) {
                    return Err(bad("ath is not the hash of the access token".into()));
                }
                let bound = claims.cnf.as_ref().and_then(|c| c.jkt.as_deref());
                match bound {
                    Some(k) if k == jkt => {}
                    Some(_) => {
                        return Err(bad(
                            "the token's cnf.jkt is not the proof key's thumbprint".into()
                        ))
                    }
                    None => return Err(bad("the token is not bound to a key (no cnf.jkt)".into())),
                }
                Some(claims)
            }
            None if c.ath.is_some() => {
                return Err(bad("ath given but no access token presented".into()))
            }
            None => None,
        };
        // Last, so a refused proof does not take a place: kept until no window accepts it.
        self.replay.check_and_insert(
            &format!("{jkt}.{}", c.jti),
            c.iat + self.max_age.max(leeway) + 1,
            now,
        )?;
        Ok(DpopVerified {
            token: claims,
            jkt,
            jti: c.jti,
            iat: c.iat,
        })
    }
}

/// An absolute http(s) URI in its normal form, without query and fragment (RFC 9449 §4.3:
/// syntax- and scheme-based normalisation, as the WHATWG URL parser does).
pub(crate) fn normal_uri(u: &str) -> Result<String, VerifyError> {
    let mut url = url::Url::parse(u).map_err(|e| VerifyError::Proof(format!("URI {u:?}: {e}")))?;
    if !matches!(url.scheme(), "https" | "http") || url.host().is_none() {
        return Err(VerifyError::Proof(format!("URI {u:?} is not http(s)")));
    }
    url.set_query(None);
    url.set_fragment(None);
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    use p256::ecdsa::{signature::Signer, Signature, SigningKey};
    use serde_json::{json, Value};

    const AUD: &str = "https://api.example.com";
    const URL: &str = "https://api.example.com/v1/x";

    struct Key {
        sk: SigningKey,
        jwk: Value,
        kid: String,
    }

    fn key(seed: u8) -> Key {
        let sk = SigningKey::from_slice(&[seed; 32]).unwrap();
        let p = sk.verifying_key().to_encoded_point(false);
        let (x, y) = (B64.encode(p.x().unwrap()), B64.encode(p.y().unwrap()));
        let kid = b64_sha256(&format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#
        ));
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y});
        Key { sk, jwk, kid }
    }

    fn jws(k: &Key, header: Value, claims: Value) -> String {
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig: Signature = k.sk.sign(input.as_bytes());
        format!("{input}.{}", B64.encode(sig.to_bytes()))
    }

    fn setup() -> (Key, Key, Value, String) {
        let issuer = key(1);
        let agent = key(2);
        let mut pub_jwk = issuer.jwk.clone();
        pub_jwk["kid"] = json!(issuer.kid);
        pub_jwk["alg"] = json!("ES256");
        let jwks = json!({"keys": [pub_jwk]});
        let t = now();
        let token = jws(
            &issuer,
            json!({"typ": "JWT", "alg": "ES256", "kid": issuer.kid}),
            json!({"iss": "spiffe://td/host/h", "sub": "spiffe://td/agent/a", "aud": AUD,
                   "iat": t, "exp": t + 300, "jti": "t1", "cnf": {"jkt": agent.kid}}),
        );
        (issuer, agent, jwks, token)
    }

    fn proof(k: &Key, claims: Value) -> String {
        jws(
            k,
            json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": k.jwk}),
            claims,
        )
    }

    #[test]
    fn every_rfc9449_rule_is_checked() {
        let (_issuer, agent, jwks, token) = setup();
        let auth = format!("DPoP {token}");
        let ath = b64_sha256(&token);
        let t = now();
        let v = DpopVerifier::new(Options::new(AUD));
        let good = proof(
            &agent,
            json!({"jti": "p1", "htm": "GET", "htu": URL, "iat": t, "ath": ath}),
        );
        let ok = v
            .verify(
                &DpopRequest::new("GET", "https://API.example.com:443/v1/x?q=1", &[&good])
                    .authorization(&auth),
                &jwks,
            )
            .unwrap();
        assert_eq!(ok.jkt, agent.kid);
        assert_eq!(ok.token.unwrap().sub, "spiffe://td/agent/a");
        // Replay.
        let again = v.verify(
            &DpopRequest::new("GET", URL, &[&good]).authorization(&auth),
            &jwks,
        );
        assert!(matches!(again, Err(VerifyError::Replay(_))), "{again:?}");
        let other = key(3);
        let mut with_private = agent.jwk.clone();
        with_private["d"] = json!(B64.encode([2u8; 32]));
        let cases: Vec<(&str, String, String, Vec<String>)> = vec![
            (
                "wrong method",
                auth.clone(),
                "POST".into(),
                vec![proof(
                    &agent,
                    json!({"jti": "a", "htm": "GET", "htu": URL, "iat": t, "ath": ath}),
                )],
            ),
            (
                "wrong uri",
                auth.clone(),
                "GET".into(),
                vec![proof(
                    &agent,
                    json!({"jti": "b", "htm": "GET", "htu": "https://api.example.com/v1/y", "iat": t, "ath": ath}),
                )],
            ),
            (
                "old",
                auth.clone(),
                "GET".into(),
                vec![proof(
                    &agent,
                    json!({"jti": "c", "htm": "GET", "htu": URL, "iat": t - 120, "ath": ath}),
                )],
            ),
            (
                "future",
                auth.clone(),
                "GET".into(),
                vec![proof(
                    &agent,
                    json!({"jti": "d", "htm": "GET", "htu": URL, "iat": t + 120, "ath": ath}),
                )],
            ),
            (
                "no ath",
                auth.clone(),
                "GET".into(),
                vec![proof(
                    &agent,
                    json!({"jti": "e", "htm": "GET", "htu": URL, "iat": t}),
                )],
            ),
            (
                "wrong ath",
                auth.clone(),
                "GET".into(),
                vec![proof(
                    &agent,
                    json!({"jti": "f", "htm": "GET", "htu": URL, "iat": t, "ath": b64_sha256("x")}),
                )],
            ),
            (
                "other key",
                auth.clone(),
                "GET".into(),
                vec![proof(
                    &other,
                    json!({"jti": "g", "htm": "GET", "htu": URL, "iat": t, "ath": ath}),
                )],
            ),
            (
                "bearer scheme",
                format!("Bearer {token}"),
                "GET".into(),
                vec![proof(
                    &agent,
                    json!({"jti": "h", "htm": "GET", "htu": URL, "iat": t, "ath": ath}),
                )],
            ),
            (
                "two proofs",
                auth.clone(),
                "GET".into(),
                vec![
                    proof(
                        &agent,
                        json!({"jti": "i", "htm": "GET", "htu": URL, "iat": t, "ath": ath})
                    );
                    2
                ],
            ),
            (
                "typ",
                auth.clone(),
                "GET".into(),
                vec![jws(
                    &agent,
                    json!({"typ": "JWT", "alg": "ES256", "jwk": agent.jwk}),
                    json!({"jti": "j", "htm": "GET", "htu": URL, "iat": t, "ath": ath}),
                )],
            ),
            (
                "private jwk",
                auth.clone(),
                "GET".into(),
                vec![jws(
                    &agent,
                    json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": with_private}),
                    json!({"jti": "k", "htm": "GET", "htu": URL, "iat": t, "ath": ath}),
                )],
            ),
            (
                "missing jti",
                auth.clone(),
                "GET".into(),
                vec![proof(
                    &agent,
                    json!({"htm": "GET", "htu": URL, "iat": t, "ath": ath}),
                )],
            ),
            (
                "alg none",
                auth.clone(),
                "GET".into(),
                vec![jws(
                    &agent,
                    json!({"typ": "dpop+jwt", "alg": "none", "jwk": agent.jwk}),
                    json!({"jti": "l", "htm": "GET", "htu": URL, "iat": t, "ath": ath}),
                )],
            ),
            (
                "alg mismatch",
                auth.clone(),
                "GET".into(),
                vec![jws(
                    &agent,
                    json!({"typ": "dpop+jwt", "alg": "RS256", "jwk": agent.jwk}),
                    json!({"jti": "l2", "htm": "GET", "htu": URL, "iat": t, "ath": ath}),
                )],
            ),
        ];
        for (what, auth, method, proofs) in cases {
            let proofs: Vec<&str> = proofs.iter().map(String::as_str).collect();
            let r = v.verify(
                &DpopRequest::new(&method, URL, &proofs).authorization(&auth),
                &jwks,
            );
            // Each refused by the proof check itself (not a token or replay-cache error).
            match &r {
                Err(VerifyError::Proof(m)) => {
                    let want = match what {
                        "wrong method" => "htm",
                        "wrong uri" => "htu",
                        "old" | "future" => "iat",
                        "no ath" | "wrong ath" => "ath",
                        "other key" => "cnf.jkt",
                        "bearer scheme" => "scheme",
                        "two proofs" => "DPoP headers",
                        "typ" => "typ",
                        "private jwk" => "private member",
                        "alg none" | "alg mismatch" => "alg",
                        "missing jti" => "jti",
                        _ => "",
                    };
                    assert!(m.contains(want), "{what}: refused for another reason: {m}");
                }
                other => panic!("{what}: {other:?}"),
            }
        }
        // A tampered signature.
        let mut forged = proof(
            &agent,
            json!({"jti": "m", "htm": "GET", "htu": URL, "iat": t, "ath": ath}),
        );
        forged.replace_range(forged.len() - 3.., "AAA");
        assert!(v
            .verify(
                &DpopRequest::new("GET", URL, &[&forged]).authorization(&auth),
                &jwks
            )
            .is_err());
        // The server nonce.
        let p = proof(
            &agent,
            json!({"jti": "n", "htm": "GET", "htu": URL, "iat": t, "ath": ath}),
        );
        assert!(matches!(
            v.verify(
                &DpopRequest::new("GET", URL, &[&p])
                    .authorization(&auth)
                    .nonce("N1"),
                &jwks
            ),
            Err(VerifyError::UseNonce)
        ));
        let p = proof(
            &agent,
            json!({"jti": "o2", "htm": "GET", "htu": URL, "iat": t, "ath": ath, "nonce": "N0"}),
        );
        assert!(
            matches!(
                v.verify(
                    &DpopRequest::new("GET", URL, &[&p])
                        .authorization(&auth)
                        .nonce("N1"),
                    &jwks
                ),
                Err(VerifyError::UseNonce)
            ),
            "a wrong nonce"
        );
        let p = proof(
            &agent,
            json!({"jti": "o", "htm": "GET", "htu": URL, "iat": t, "ath": ath, "nonce": "N1"}),
        );
        v.verify(
            &DpopRequest::new("GET", URL, &[&p])
                .authorization(&auth)
                .nonce("N1"),
            &jwks,
        )
        .unwrap();
        // The bound token is useless as a bearer token.
        assert!(matches!(
            super::super::verify(&token, &jwks, &Options::new(AUD)),
            Err(VerifyError::Bound)
        ));
        // A resource server always needs the token.
        let p = proof(
            &agent,
            json!({"jti": "q", "htm": "POST", "htu": URL, "iat": t}),
        );
        assert!(v
            .verify(&DpopRequest::new("POST", URL, &[&p]), &jwks)
            .is_err());
        // Token endpoint: a proof alone, without ath.
        let ok = v
            .verify_token_request(&DpopRequest::new("POST", URL, &[&p]))
            .unwrap();
        assert!(ok.token.is_none());
        assert_eq!(ok.jkt, agent.kid);
        let p = proof(
            &agent,
            json!({"jti": "r", "htm": "POST", "htu": URL, "iat": t, "ath": ath}),
        );
        assert!(
            v.verify_token_request(&DpopRequest::new("POST", URL, &[&p]))
                .is_err(),
            "ath without a token"
        );
        // The edge of the window: iat exactly max_age ago still passes, one second more not.
        let req = |p: &str| -> Result<DpopVerified, VerifyError> {
            v.check(
                &DpopRequest::new("GET", URL, &[p]).authorization(&auth),
                &jwks,
                t,
            )
        };
        req(&proof(
            &agent,
            json!({"jti": "s", "htm": "GET", "htu": URL, "iat": t - 60, "ath": ath}),
        ))
        .unwrap();
        assert!(req(&proof(
            &agent,
            json!({"jti": "u", "htm": "GET", "htu": URL, "iat": t - 61, "ath": ath})
        ))
        .is_err());
    }

    #[test]
    fn a_full_replay_cache_refuses() {
        let (_issuer, agent, jwks, token) = setup();
        let auth = format!("DPoP {token}");
        let ath = b64_sha256(&token);
        let v = DpopVerifier::new(Options::new(AUD)).replay_capacity(1);
        let t = now();
        for (jti, full) in [("a", false), ("b", true)] {
            let p = proof(
                &agent,
                json!({"jti": jti, "htm": "GET", "htu": URL, "iat": t, "ath": ath}),
            );
            let r = v.verify(
                &DpopRequest::new("GET", URL, &[&p]).authorization(&auth),
                &jwks,
            );
            assert_eq!(
                matches!(r, Err(VerifyError::ReplayCacheFull(1))),
                full,
                "{r:?}"
            );
        }
    }
}
