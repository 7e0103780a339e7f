//! The SDK's TPM attestation check, as a relying party runs it on evidence it was sent.
//! First byte even: the rest is evidence JSON, checked against fixed expectations. Odd: the
//! rest is `TPMS_ATTEST \0 TPMT_PUBLIC`, signed here with the expected AK so that the checks
//! after the signature (structure, nonce, name, attributes, key) are reached.

#![no_main]

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::{signature::Signer, Signature};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use tessera::attestation::{self, Expectations};

const NONCE: &[u8] = b"fuzz-nonce";

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let expect = Expectations {
        nonce: NONCE.to_vec(),
        key: common::verifying_key(2),
        ak: common::verifying_key(3),
    };
    let evidence = if pick & 1 == 0 {
        match attestation::parse(rest) {
            Ok(e) => e,
            Err(_) => return,
        }
    } else {
        let (attest, key_public) = common::split(rest, 0);
        let ak = common::signing_key(3);
        let sig: Signature = ak.sign(attest);
        let json = serde_json::json!({
            "format": "tpm2-certify",
            "nonce": hex::encode(NONCE),
            "attest": B64.encode(attest),
            "signature": B64.encode(sig.to_der().as_bytes()),
            "ak_public": ak.verifying_key().to_public_key_pem(LineEnding::LF).expect("PEM"),
            "key_public": B64.encode(key_public),
        });
        attestation::parse(json.to_string().as_bytes()).expect("evidence made here parses")
    };
    if let Ok(v) = attestation::verify(&evidence, &expect) {
        // Only the expected key, certified under the expected AK, may ever pass.
        assert_eq!(v.key, expect.key);
        assert_eq!(v.ak, expect.ak);
    }
    for pem in &evidence.ek_certificates {
        let _ = attestation::key_from_certificate_pem(pem);
    }
    let _ = attestation::ak_from_pem(&evidence.ak_public);
});
