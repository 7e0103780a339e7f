//! Both sides of key attestation in one place: the agent fetches its certificate and evidence
//! over the relying party's nonce; the relying party checks that the certificate's key was
//! made inside the TPM. `cargo run -p tessera --example attest`

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = tessera::Client::from_env();
    // Relying party: a fresh, unpredictable nonce per check.
    let nonce: [u8; 32] = rand::random();
    // Agent: its certificate and the evidence for its key.
    let chain = client
        .certificate(&tessera::CertificateOptions::default())
        .await?;
    let evidence = client.attestation(&nonce, None).await?;
    // Relying party: verify evidence against the nonce it chose and the certificate's key.
    let ev = tessera::attestation::parse(evidence.to_string().as_bytes())?;
    // The AK you recorded when the host was provisioned (TESSERA_AK: its PEM public key).
    // Evidence is only as good as the AK it is checked against: never take it from the
    // evidence being checked.
    let ak_pem = std::fs::read_to_string(std::env::var("TESSERA_AK")?)?;
    let expect = tessera::attestation::Expectations {
        nonce: nonce.to_vec(),
        key: tessera::attestation::key_from_certificate_pem(&chain)?,
        ak: tessera::attestation::ak_from_pem(&ak_pem)?,
    };
    match tessera::attestation::verify(&ev, &expect) {
        Ok(v) => println!(
            "the key in {}'s certificate was made in the TPM (attributes {:#010x})",
            ev.agent.unwrap_or_default(),
            v.object_attributes
        ),
        Err(e) => println!("not verified: {e}"),
    }
    Ok(())
}
