//! `tessera host install-cert` and `host csr` input: a PEM chain read and checked against the
//! host CA key exactly as the daemon does before it writes anything, a DER certificate's key
//! read back, and a CSR built for a fuzzed common name. Layout: `cn \0 chain`.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tesserad::credentials::hostca::check_installed_chain;
use tesserad::credentials::x509;
use x509_cert::der::{Decode, Encode};

fuzz_target!(|data: &[u8]| {
    let ca_key = common::verifying_key(1);
    let (cn, chain) = common::split(data, 0);
    if let Ok(cn) = std::str::from_utf8(cn) {
        if let Ok(subject) = x509::cn_name(cn) {
            let info = x509::host_csr_info(&subject, &ca_key).expect("CSR info for a valid name");
            let (tbs, _digest) = x509::to_be_signed(&info).expect("CSR info encodes");
            assert!(!tbs.is_empty());
        }
    }
    if let Ok(pem) = std::str::from_utf8(chain) {
        if let Ok(certs) = x509::certs_from_pem(pem) {
            let _ = check_installed_chain(&certs, &ca_key, 1_800_000_000);
            for c in &certs {
                let _ = x509::cert_p256_key(c);
                let _ = x509::serial_hex(&c.tbs_certificate.serial_number);
                let _ = x509::unix_of(&c.tbs_certificate.validity.not_after);
            }
        }
    }
    if let Ok(cert) = x509_cert::Certificate::from_der(chain) {
        let _ = x509::cert_p256_key(&cert);
        let _ = check_installed_chain(std::slice::from_ref(&cert), &ca_key, 1_800_000_000);
        let _ = cert.to_der();
    }
});
