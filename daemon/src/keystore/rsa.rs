//! RSA agent keys (`key = "rsa2048"`): their JWK and thumbprint. RS256 = RSASSA-PKCS1-v1_5 with
//! SHA-256, made by the device (the TPM's scheme is fixed in the key's template; PKCS#11 signs
//! the DigestInfo the store builds).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::RsaPublic;

/// `(kid, jwk)`: kid = RFC 7638 thumbprint over `e`, `kty`, `n` (in that order, no spaces).
pub fn jwk_of(key: &RsaPublic) -> (String, Value) {
    let n = B64.encode(&key.n);
    let e = B64.encode(&key.e);
    let thumb_input = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
    let kid = B64.encode(Sha256::digest(thumb_input.as_bytes()));
    let jwk = json!({"kty": "RSA", "n": n, "e": e, "kid": kid, "alg": "RS256", "use": "sig"});
    (kid, jwk)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7638 §3.1's example key and its thumbprint.
    #[test]
    fn thumbprint_matches_rfc_7638() {
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        let key = RsaPublic {
            n: B64.decode(n).unwrap(),
            e: vec![1, 0, 1],
        };
        let (kid, jwk) = jwk_of(&key);
        assert_eq!(kid, "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
        assert_eq!(jwk["e"], "AQAB");
        assert_eq!(jwk["alg"], "RS256");
    }
}
