//! The SDK's TPM attestation check, as a relying party runs it on evidence it was sent.
//! First byte even: the rest is evidence JSON, checked against fixed expectations. Odd: the
//! rest is `TPMS_ATTEST \0 TPMT_PUBLIC`, signed here with the expected AK so that the checks
//! after the signature (structure, nonce, name, attributes, key) are reached; with bit 1 set
//! too, the TPMS_ATTEST is made here for the fuzzed TPMT_PUBLIC.

#![no_main]

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::{signature::Signer, Signature};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use tessera::attestation::{self, Expectations};

const NONCE: &[u8] = b"fuzz-nonce";

/// A TPMS_ATTEST of type certify over `key_public` (TPM 2.0 Part 2, 10.12.12).
fn certify_attest(key_public: &[u8]) -> Vec<u8> {
    let tpm2b = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u16).to_be_bytes());
        out.extend_from_slice(b);
    };
    let mut a = Vec::new();
    a.extend_from_slice(&0xff54_4347u32.to_be_bytes());
    a.extend_from_slice(&0x8017u16.to_be_bytes());
    tpm2b(&mut a, b"");
    tpm2b(&mut a, NONCE);
    a.extend_from_slice(&[0u8; 8 + 4 + 4]);
    a.push(1);
    a.extend_from_slice(&[0u8; 8]);
    tpm2b(&mut a, &attestation::tpm_name(key_public));
    tpm2b(&mut a, b"");
    a
}

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
        // Bit 1: the attest is made here, with our nonce and the name of `key_public`, so
        // that the fuzzed public area reaches the attribute and key checks behind the name.
        let made;
        let attest = if pick & 2 != 0 {
            made = certify_attest(key_public);
            &made[..]
        } else {
            attest
        };
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
