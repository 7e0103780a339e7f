//! TPM structures from outside the process: the SDK's TPMS_ATTEST and TPMT_PUBLIC readers
//! (evidence a relying party is sent), and the TPM2B_PUBLIC / TPM2B_PRIVATE blobs the TPM
//! back end reads from its state dir (tss-esapi's unmarshalling, which the daemon relies on).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera::attestation::{parse_attest, parse_ecc_public, tpm_name};
use tss_esapi::structures::{Private, Public};
use tss_esapi::traits::{Marshall, UnMarshall};

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = parse_attest(data) {
        assert!(info.extra_data.len() <= data.len() && info.name.len() <= data.len());
    }
    if let Ok(p) = parse_ecc_public(data) {
        // A key that parsed has a name, and it is the SHA-256 name of these bytes.
        assert_eq!(tpm_name(data).len(), 34);
        let _ = p.object_attributes;
    }
    if let Ok(public) = Public::unmarshall(data) {
        // What tss-esapi read back must marshal again (the daemon loads keys from it).
        let _ = public.marshall();
    }
    let _ = Private::try_from(data.to_vec());
});
