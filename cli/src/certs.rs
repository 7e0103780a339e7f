//! `tessera cert|bundle|crl|attest` (agent side, over the socket) and
//! `tessera verify-attestation` (relying party, offline).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::{json, Value};
use tessera::attestation::{self, Expectations};
use tessera::{CertificateOptions, Client};

use crate::{client_error, print_json, EXIT_UNVERIFIED};

pub async fn cert(client: &Client, opts: &CertificateOptions, as_json: bool) -> ExitCode {
    match client.certificate(opts).await {
        Ok(pem) if as_json => {
            print_json(&json!({"chain": pem}));
            ExitCode::SUCCESS
        }
        Ok(pem) => {
            print!("{pem}");
            ExitCode::SUCCESS
        }
        Err(e) => client_error(&e),
    }
}

pub async fn text(client: &Client, what: &str, as_json: bool) -> ExitCode {
    let res = match what {
        "bundle" => client.bundle().await,
        _ => client.crl().await,
    };
    match res {
        Ok(pem) if as_json => {
            print_json(&json!({ what: pem }));
            ExitCode::SUCCESS
        }
        Ok(pem) => {
            print!("{pem}");
            ExitCode::SUCCESS
        }
        Err(e) => client_error(&e),
    }
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    hex::decode(s.trim()).ok()
}

pub async fn attest(client: &Client, nonce: &str, agent: Option<String>) -> ExitCode {
    let Some(nonce) = parse_hex(nonce) else {
        eprintln!("tessera: --nonce must be hex (16 to 128 digits)");
        return ExitCode::from(2);
    };
    match client.attestation(&nonce, agent.as_deref()).await {
        Ok(v) => {
            print_json(&v);
            ExitCode::SUCCESS
        }
        Err(e) => client_error(&e),
    }
}

pub fn read_input(path: &Path) -> Result<Vec<u8>, String> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).map_err(|e| e.to_string())?;
        return Ok(buf);
    }
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The DER of the first certificate of a PEM file (or `-`).
pub fn first_cert_der(path: &Path) -> Result<Vec<u8>, String> {
    let pem = String::from_utf8(read_input(path)?)
        .map_err(|_| "the certificate file is not PEM text".to_string())?;
    let certs = tesserad::credentials::x509::certs_from_pem(&pem).map_err(|e| e.to_string())?;
    let first = certs
        .first()
        .ok_or_else(|| format!("no certificate in {}", path.display()))?;
    x509_cert::der::Encode::to_der(first).map_err(|e| e.to_string())
}

pub struct VerifyArgs {
    pub file: PathBuf,
    pub nonce: String,
    pub cert: Option<PathBuf>,
    pub jwk: Option<PathBuf>,
    pub ak: PathBuf,
}

pub fn verify_attestation(a: VerifyArgs, as_json: bool) -> ExitCode {
    let Some(nonce) = parse_hex(&a.nonce) else {
        eprintln!("tessera: --nonce must be hex");
        return ExitCode::from(2);
    };
    let prepared = (|| -> Result<(attestation::Evidence, Expectations), String> {
        let ev = attestation::parse(&read_input(&a.file)?).map_err(|e| e.to_string())?;
        let mut key = None;
        if let Some(p) = &a.cert {
            let pem = String::from_utf8(read_input(p)?).map_err(|e| e.to_string())?;
            key = Some(attestation::key_from_certificate_pem(&pem).map_err(|e| e.to_string())?);
        }
        if let Some(p) = &a.jwk {
            let jwk: Value = serde_json::from_slice(&read_input(p)?)
                .map_err(|e| format!("{}: {e}", p.display()))?;
            let k = attestation::key_from_jwk(&jwk).map_err(|e| e.to_string())?;
            if key.is_some_and(|c| c != k) {
                return Err("--cert and --jwk name different keys".into());
            }
            key = Some(k);
        }
        let key = key.ok_or("the agent's key is required (--cert or --jwk)")?;
        let pem = String::from_utf8(read_input(&a.ak)?).map_err(|e| e.to_string())?;
        let ak =
            attestation::ak_from_pem(&pem).map_err(|e| format!("--ak {}: {e}", a.ak.display()))?;
        Ok((ev, Expectations { nonce, key, ak }))
    })();
    let (ev, expect) = match prepared {
        Ok(x) => x,
        Err(e) => {
            eprintln!("tessera: {e}");
            return ExitCode::FAILURE;
        }
    };
    match attestation::verify(&ev, &expect) {
        Ok(v) => {
            let (kid, _) = tesserad::keystore::ecdsa::jwk_of(&v.key);
            if as_json {
                print_json(&json!({
                    "valid": true, "kid": kid, "key_bound": true,
                    "ak_pinned": true, "object_attributes": format!("{:#010x}", v.object_attributes),
                    "ek_certificates": v.ek_certificates.len(), "agent": ev.agent, "id": ev.id,
                }));
            } else {
                println!("valid: key {kid} was made in the TPM (fixedTPM, fixedParent, sensitiveDataOrigin, sign-only)");
                println!("  certified over your nonce by the AK you pinned");
                println!("  key equals the given certificate/JWK");
                println!(
                    "  EK certificates in the evidence: {}",
                    v.ek_certificates.len()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if as_json {
                print_json(&json!({"valid": false, "error": e.to_string()}));
            }
            eprintln!("tessera: evidence does not verify: {e}");
            ExitCode::from(EXIT_UNVERIFIED)
        }
    }
}
