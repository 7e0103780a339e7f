//! Certificates from PEM text, block by block. x509-cert 0.2.5's `load_pem_chain` overflows on
//! an empty input, and der 0.7's streaming PEM reader under it loops forever on a truncated
//! body (both found by fuzzing): each block here is decoded whole by pem-rfc7468 and its DER
//! read from a slice.

use x509_cert::der::Decode;
use x509_cert::Certificate;

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("no certificate in the PEM input")]
    Empty,
    #[error("text outside the PEM blocks (expected -----BEGIN CERTIFICATE-----)")]
    Outside,
    #[error("a PEM block has no complete END line")]
    Unterminated,
    #[error("PEM: {0}")]
    Pem(pem_rfc7468::Error),
    #[error("a PEM block is a {0}, not a CERTIFICATE")]
    Label(String),
    #[error("certificate DER: {0}")]
    Der(#[from] x509_cert::der::Error),
}

/// Every certificate in `pem`, in order. Only whitespace may come between the blocks.
pub fn certificates(pem: &str) -> Result<Vec<Certificate>, PemError> {
    const BEGIN: &str = "-----BEGIN ";
    const END: &str = "-----END ";
    let mut certs = Vec::new();
    let mut rest = pem;
    loop {
        let skipped = rest.trim_start();
        if skipped.is_empty() {
            break;
        }
        if !skipped.starts_with(BEGIN) {
            return Err(PemError::Outside);
        }
        let end = skipped.find(END).ok_or(PemError::Unterminated)?;
        let after_end = &skipped[end + END.len()..];
        let close = after_end.find("-----").ok_or(PemError::Unterminated)?;
        let block_len = end + END.len() + close + "-----".len();
        let (label, der) =
            pem_rfc7468::decode_vec(&skipped.as_bytes()[..block_len]).map_err(PemError::Pem)?;
        if label != "CERTIFICATE" {
            return Err(PemError::Label(label.to_string()));
        }
        certs.push(Certificate::from_der(&der)?);
        rest = &skipped[block_len..];
    }
    if certs.is_empty() {
        return Err(PemError::Empty);
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_truncated_inputs_are_errors() {
        for pem in [
            "",
            "\n",
            "\r\n\n",
            "hello",
            "-----BEGIN CERTIFICATE-----\nMII=\n",
        ] {
            assert!(certificates(pem).is_err(), "{pem:?}");
        }
        // The fuzzer's input that kept der 0.7's PEM reader looping forever.
        let pem = "-----BEGIN CERTIFICATE-----\nMII=\n-----END CERTIFICATE-----\n------END CERTIFBT2oBYE/pEk9\nEg==\n-----END CERTIFICATE-----\n------END CERTIFICAT";
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(certificates(pem).is_err());
        });
        assert!(rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("no answer within 10 s"));
    }
}
