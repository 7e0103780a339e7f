//! Key attestation: the attestation key (made on first use), EK certificates from NV, and
//! TPM2_Certify of an agent key over a relying party's nonce.

use super::*;

/// NV indices where TCG-compliant TPMs keep EK certificates (TCG EK Credential Profile 2.x):
/// RSA 2048 and ECC P-256 (low range), then the high range (RSA 2048..4096, ECC P-256..P-521).
const EK_CERT_INDICES: [u32; 9] = [
    0x01c0_0002,
    0x01c0_000a,
    0x01c0_0012,
    0x01c0_0014,
    0x01c0_0016,
    0x01c0_0018,
    0x01c0_001a,
    0x01c0_001c,
    0x01c0_001e,
];

/// EK certificates present in NV (a TPM without them, or one that refuses the read, has none).
pub(super) fn read_ek_certificates(ctx: &mut Context) -> Vec<Vec<u8>> {
    use tss_esapi::abstraction::nv;
    use tss_esapi::handles::NvIndexTpmHandle;
    use tss_esapi::interface_types::resource_handles::NvAuth;
    let defined: Vec<u32> = match nv::list(ctx) {
        Ok(list) => list.iter().map(|(p, _)| u32::from(p.nv_index())).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list TPM NV indices; no EK certificates");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for index in EK_CERT_INDICES.iter().filter(|i| defined.contains(i)) {
        let read = NvIndexTpmHandle::new(*index).and_then(|h| nv::read_full(ctx, NvAuth::Owner, h));
        match read {
            Ok(der) if !der.is_empty() => out.push(der),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(index = format!("{index:#010x}"), error = %e, "cannot read EK certificate")
            }
        }
    }
    out
}

impl TpmKeyStore {
    /// Load the attestation key, creating it on first use. Its blobs are written whole or not
    /// at all, so a crash leaves either the old AK or none (and a new one is made).
    fn load_ak(&mut self) -> Result<(KeyHandle, Public), KeyStoreError> {
        let (public, private) = match self.ak.clone() {
            Some(blobs) => blobs,
            None => {
                let pub_path = self.ak_dir.join("ak.pub");
                let priv_path = self.ak_dir.join("ak.priv");
                let blobs = match (read_blob(&pub_path)?, read_blob(&priv_path)?) {
                    (Some(pb), Some(vb)) => (
                        Public::unmarshall(&pb).map_err(|e| tpm_err("read AK public blob", e))?,
                        Private::try_from(vb).map_err(|e| tpm_err("read AK private blob", e))?,
                    ),
                    _ => {
                        let template =
                            attestation_key_template().map_err(|e| tpm_err("AK template", e))?;
                        self.create_saved(template, &pub_path, &priv_path)?
                    }
                };
                self.ak = Some(blobs.clone());
                blobs
            }
        };
        let primary = self.primary;
        let h = self
            .ctx()?
            .load(primary, private, public.clone())
            .map_err(|e| tpm_err("load attestation key", e))?;
        Ok((h, public))
    }

    /// TPM2_Certify of key `id` by the AK over `nonce`, checked before it is returned.
    pub(super) fn certify(&mut self, id: &str, nonce: &[u8]) -> Result<KeyEvidence, KeyStoreError> {
        use tss_esapi::structures::Data;
        validate_key_id(id)?;
        if nonce.is_empty() || nonce.len() > MAX_NONCE {
            return Err(KeyStoreError::Device {
                op: "certify",
                detail: format!("nonce must be 1 to {MAX_NONCE} bytes"),
            });
        }
        let key_public = self.read_public(id)?;
        // The certified key, the AK and the primary must fit in the TPM's slots together:
        // load the key (most recently used) and flush every other one.
        let key = self.handle(id)?;
        self.evict_to(1)?;
        let (ak, ak_pub) = self.load_ak()?;
        let qualifying = Data::try_from(nonce.to_vec()).map_err(|e| tpm_err("nonce", e));
        let result = qualifying.and_then(|q| {
            self.ctx()?
                .execute_with_sessions(
                    (
                        Some(AuthSession::Password),
                        Some(AuthSession::Password),
                        None,
                    ),
                    |ctx| ctx.certify(key.into(), ak, q, SignatureScheme::Null),
                )
                .map_err(|e| tpm_err("certify", e))
        });
        // The AK is loaded only for this call; give its slot back whatever happened.
        let flushed = self
            .ctx()?
            .flush_context(ak.into())
            .map_err(|e| tpm_err("flush attestation key", e));
        let (attest, sig) = result?;
        flushed?;
        let attest = attest
            .marshall()
            .map_err(|e| tpm_err("marshal attest", e))?;
        let signature = ecdsa_of("certify", sig)?;
        let ak_public = verifying_key_of(&ak_pub)?;
        // Our re-encoding of the attest structure must be the bytes the TPM signed.
        {
            use p256::ecdsa::signature::Verifier;
            ak_public
                .verify(&attest, &signature)
                .map_err(|e| KeyStoreError::Device {
                    op: "certify",
                    detail: format!("AK signature does not verify over the attest bytes: {e}"),
                })?;
        }
        Ok(KeyEvidence::Tpm(TpmCertify {
            attest,
            signature,
            ak_public,
            key_public: key_public
                .marshall()
                .map_err(|e| tpm_err("marshal key public", e))?,
            ek_certificates: self.ek_certificates.clone(),
        }))
    }
}
