//! TPM structures from outside the process: the SDK's TPMS_ATTEST and TPMT_PUBLIC readers
//! (evidence a relying party is sent), and the TPM2B_PUBLIC / TPM2B_PRIVATE blobs the TPM
//! back end reads from its state dir (tss-esapi's unmarshalling, which the daemon relies on).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera::attestation::{parse_attest, parse_ecc_public, tpm_name};
use tss_esapi::structures::{Private, Public};
use tss_esapi::traits::{Marshall, UnMarshall};

fuzz_target!(|data: &[u8]| {
    // No panic, no overflow, no read past the input: that is the check.
    let _ = parse_attest(data);
    if parse_ecc_public(data).is_ok() {
        let _ = tpm_name(data);
    }
    if let Ok(public) = Public::unmarshall(data) {
        let _ = public.marshall();
    }
    let _ = Private::try_from(data.to_vec());
});
