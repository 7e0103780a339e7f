//! The SDK's token verifier as a relying party runs it. First byte even: the rest is the
//! token text. Odd: the rest is `header \0 payload` (any bytes), signed here with the key the
//! JWKS holds, so the claim checks after the signature are reached.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tessera::verify::{self, Options};

static JWKS: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();

fn jwks() -> serde_json::Value {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    let key = common::verifying_key(4);
    let point = key.to_encoded_point(false);
    serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256",
        "x": B64.encode(point.x().expect("x")),
        "y": B64.encode(point.y().expect("y")),
    }]})
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let token = if pick & 1 == 0 {
        match std::str::from_utf8(rest) {
            Ok(t) => t.to_string(),
            Err(_) => return,
        }
    } else {
        let (header, payload) = common::split(rest, 0);
        common::jws(header, payload, common::signing_key(4))
    };
    let jwks = JWKS.get_or_init(jwks);
    let mut opts = Options::new("https://api.example");
    opts.issuer = Some("spiffe://tessera.local".into());
    if let Ok(c) = verify::verify_signed(&token, jwks, &opts) {
        // Whatever passed names our audience and is within its lifetime.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        assert!(
            c.exp.saturating_add(opts.leeway as i64) >= now,
            "expired token accepted"
        );
        assert_eq!(c.aud, opts.audience);
        assert_eq!(Some(&c.iss), opts.issuer.as_ref());
        let _ = c.scopes();
    }
    let _ = verify::verify(&token, jwks, &opts);
    let _ = verify::verify_mtls(&token, jwks, &opts, b"certificate");
});
