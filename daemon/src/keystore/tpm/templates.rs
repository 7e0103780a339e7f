//! Object templates: the storage primary, agent keys and the attestation key.

use super::*;

/// The storage primary's fixed template: same template + same owner seed = same key.
pub fn primary_template() -> Result<Public, tss_esapi::Error> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .with_sign_encrypt(false)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
                .with_ecc_scheme(EccScheme::Null)
                .with_curve(EccCurve::NistP256)
                .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                .with_is_signing_key(false)
                .with_is_decryption_key(true)
                .with_restricted(true)
                .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// Agent keys: fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, sign only.
pub fn agent_key_template() -> Result<Public, tss_esapi::Error> {
    ecdsa_key_template(false)
}

/// RSA agent keys (`key = "rsa2048"`): RSA-2048, exponent 65537, fixedTPM, fixedParent,
/// sensitiveDataOrigin, userWithAuth, sign only, with RSASSA-PKCS1-v1_5/SHA-256 fixed in the
/// template so the key cannot be used with any other scheme.
pub fn rsa_agent_key_template() -> Result<Public, tss_esapi::Error> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(false)
        .with_restricted(false)
        .with_decrypt(false)
        .with_sign_encrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_rsa_parameters(
            PublicRsaParametersBuilder::new_unrestricted_signing_key(
                RsaScheme::RsaSsa(HashScheme::new(HashingAlgorithm::Sha256)),
                RsaKeyBits::Rsa2048,
                RsaExponent::ZERO_EXPONENT,
            )
            .build()?,
        )
        .with_rsa_unique_identifier(PublicKeyRsa::default())
        .build()
}

/// The attestation key: a restricted ECDSA P-256 signing key, so it signs only structures
/// the TPM itself produced (quotes, certifications), never an outside digest that could
/// pass for one.
pub fn attestation_key_template() -> Result<Public, tss_esapi::Error> {
    ecdsa_key_template(true)
}

/// An ECDSA P-256 (SHA-256) signing key made inside this TPM, never to leave it.
fn ecdsa_key_template(restricted: bool) -> Result<Public, tss_esapi::Error> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        // The AK has no secret worth guessing; agent keys keep dictionary-attack protection.
        .with_no_da(restricted)
        .with_restricted(restricted)
        .with_decrypt(false)
        .with_sign_encrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::Null)
                .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
                .with_curve(EccCurve::NistP256)
                .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                .with_is_signing_key(true)
                .with_is_decryption_key(false)
                .with_restricted(restricted)
                .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}
