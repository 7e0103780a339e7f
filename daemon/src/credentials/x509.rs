//! X.509 structures tessera issues: the host CA certificate, agent certificates, the CRL and
//! the host CA's PKCS#10 request. Pure construction and assembly; the signature itself comes
//! from the key store (see [`crate::credentials::hostca`]), so each object is built as "to be signed" DER,
//! its SHA-256 digest is signed in hardware, and the DER ECDSA signature is attached here.

use std::time::{Duration, UNIX_EPOCH};

use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::EncodePublicKey;
use sha2::{Digest, Sha256};
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::certificate::{Certificate, TbsCertificate, Version};
use x509_cert::crl::{CertificateList, RevokedCert, TbsCertList};
use x509_cert::der::asn1::{BitString, Ia5String, OctetString, SetOfVec, Uint, Utf8StringRef};
use x509_cert::der::oid::db::{rfc4519, rfc5280, rfc5912};
use x509_cert::der::{self, Any, Decode, Encode, EncodePem};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, CrlNumber, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectAltName, SubjectKeyIdentifier,
};
use x509_cert::ext::{AsExtension, Extension};
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::request::{CertReq, CertReqInfo, ExtensionReq};
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::time::{Time, Validity};

#[derive(Debug, thiserror::Error)]
pub enum X509Error {
    #[error("ASN.1 encoding: {0}")]
    Der(#[from] der::Error),
    #[error("public key encoding: {0}")]
    Spki(String),
    #[error("{0}")]
    Invalid(String),
}

/// `ecdsa-with-SHA256`, with absent parameters (RFC 5758).
pub fn ecdsa_sha256() -> AlgorithmIdentifierOwned {
    AlgorithmIdentifierOwned {
        oid: rfc5912::ECDSA_WITH_SHA_256,
        parameters: None,
    }
}

pub fn spki_of(key: &VerifyingKey) -> Result<SubjectPublicKeyInfoOwned, X509Error> {
    let der = key
        .to_public_key_der()
        .map_err(|e| X509Error::Spki(e.to_string()))?;
    Ok(SubjectPublicKeyInfoOwned::from_der(der.as_bytes())?)
}

/// Key identifier per RFC 7093 method 1: the leftmost 160 bits of the SHA-256 of the
/// subjectPublicKey bits.
pub fn key_identifier(spki: &SubjectPublicKeyInfoOwned) -> Vec<u8> {
    Sha256::digest(spki.subject_public_key.raw_bytes())[..20].to_vec()
}

/// A name with a single common name (UTF8String, so no RFC 4514 escaping is involved).
pub fn cn_name(cn: &str) -> Result<Name, X509Error> {
    if cn.is_empty() || cn.len() > 64 {
        return Err(X509Error::Invalid(format!(
            "common name must be 1 to 64 bytes: {cn:?}"
        )));
    }
    let atv = AttributeTypeAndValue {
        oid: rfc4519::CN,
        value: Any::encode_from(&Utf8StringRef::new(cn)?)?,
    };
    let rdn = RelativeDistinguishedName(SetOfVec::try_from(vec![atv])?);
    Ok(RdnSequence(vec![rdn]))
}

/// 128 random bits, positive and without a leading zero byte (RFC 5280: at most 20 octets).
pub fn random_serial() -> Result<SerialNumber, X509Error> {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::new(&bytes)?)
}

pub fn serial_hex(serial: &SerialNumber) -> String {
    hex::encode(serial.as_bytes())
}

pub fn serial_from_hex(hex_serial: &str) -> Result<SerialNumber, X509Error> {
    let bytes = hex::decode(hex_serial)
        .map_err(|e| X509Error::Invalid(format!("serial {hex_serial:?}: {e}")))?;
    Ok(SerialNumber::new(&bytes)?)
}

/// RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050.
pub fn time_of(unix: i64) -> Result<Time, X509Error> {
    let d = Duration::from_secs(unix.max(0) as u64);
    match der::asn1::UtcTime::from_unix_duration(d) {
        Ok(t) => Ok(Time::UtcTime(t)),
        Err(_) => Ok(Time::GeneralTime(
            der::asn1::GeneralizedTime::from_unix_duration(d)?,
        )),
    }
}

pub fn unix_of(t: &Time) -> i64 {
    t.to_system_time()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub use crate::agents::now_unix;

fn ext<T: AsExtension>(value: &T, subject: &Name) -> Result<Extension, X509Error> {
    Ok(value.to_extension(subject, &[])?)
}

/// What makes the host CA a CA: basicConstraints CA with path length 0 (it issues only agent
/// certificates) and key usage keyCertSign + cRLSign.
fn ca_extensions(subject: &Name) -> Result<Vec<Extension>, X509Error> {
    Ok(vec![
        ext(
            &BasicConstraints {
                ca: true,
                path_len_constraint: Some(0),
            },
            subject,
        )?,
        ext(
            &KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign),
            subject,
        )?,
    ])
}

/// The self-signed host CA: `CN` = host id, CA with path length 0, keyCertSign + cRLSign.
pub fn host_ca_tbs(
    subject: &Name,
    key: &VerifyingKey,
    not_before: i64,
    not_after: i64,
) -> Result<TbsCertificate, X509Error> {
    let spki = spki_of(key)?;
    let kid = key_identifier(&spki);
    let mut extensions = ca_extensions(subject)?;
    extensions.push(ext(&SubjectKeyIdentifier(OctetString::new(kid)?), subject)?);
    Ok(TbsCertificate {
        version: Version::V3,
        serial_number: random_serial()?,
        signature: ecdsa_sha256(),
        issuer: subject.clone(),
        validity: Validity {
            not_before: time_of(not_before)?,
            not_after: time_of(not_after)?,
        },
        subject: subject.clone(),
        subject_public_key_info: spki,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(extensions),
    })
}

/// What an agent certificate says.
pub struct AgentCertSpec<'a> {
    pub issuer: &'a Name,
    pub issuer_key_id: &'a [u8],
    pub agent_name: &'a str,
    /// The agent's SPIFFE ID, the one URI SAN.
    pub spiffe_id: &'a str,
    pub key: &'a VerifyingKey,
    pub not_before: i64,
    pub not_after: i64,
    /// Policy `tls_server`: only then does the certificate carry serverAuth.
    pub server_auth: bool,
    /// Where the key lives, stated as a certificate policy.
    pub key_kind: tessera::key_policy::KeyKind,
}

/// An agent certificate (SPIFFE X509-SVID shape): not a CA, digitalSignature only,
/// clientAuth (+ serverAuth for TLS server agents), the key-kind certificate policy, URI SAN =
/// SPIFFE ID, random serial.
pub fn agent_tbs(spec: &AgentCertSpec<'_>) -> Result<TbsCertificate, X509Error> {
    let subject = cn_name(spec.agent_name)?;
    let spki = spki_of(spec.key)?;
    let uri = Ia5String::new(spec.spiffe_id)
        .map_err(|e| X509Error::Invalid(format!("SPIFFE ID {:?}: {e}", spec.spiffe_id)))?;
    let extensions = vec![
        ext(
            &BasicConstraints {
                ca: false,
                path_len_constraint: None,
            },
            &subject,
        )?,
        ext(&KeyUsage(KeyUsages::DigitalSignature.into()), &subject)?,
        Extension {
            // Not critical (x509-cert would mark it so): the usual profile for TLS clients.
            critical: false,
            ..ext(
                &ExtendedKeyUsage(if spec.server_auth {
                    vec![rfc5280::ID_KP_CLIENT_AUTH, rfc5280::ID_KP_SERVER_AUTH]
                } else {
                    vec![rfc5280::ID_KP_CLIENT_AUTH]
                }),
                &subject,
            )?
        },
        Extension {
            // Built by hand: the OIDs' UUID arc does not fit const-oid's 32-bit arcs.
            extn_id: rfc5280::ID_CE_CERTIFICATE_POLICIES,
            critical: false,
            extn_value: OctetString::new(spec.key_kind.extension_value())?,
        },
        ext(
            &SubjectAltName(vec![GeneralName::UniformResourceIdentifier(uri)]),
            &subject,
        )?,
        ext(
            &SubjectKeyIdentifier(OctetString::new(key_identifier(&spki))?),
            &subject,
        )?,
        ext(
            &AuthorityKeyIdentifier {
                key_identifier: Some(OctetString::new(spec.issuer_key_id)?),
                authority_cert_issuer: None,
                authority_cert_serial_number: None,
            },
            &subject,
        )?,
    ];
    Ok(TbsCertificate {
        version: Version::V3,
        serial_number: random_serial()?,
        signature: ecdsa_sha256(),
        issuer: spec.issuer.clone(),
        validity: Validity {
            not_before: time_of(spec.not_before)?,
            not_after: time_of(spec.not_after)?,
        },
        subject,
        subject_public_key_info: spki,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(extensions),
    })
}

/// One revoked certificate: serial (hex) and when its agent was revoked.
pub struct RevokedEntry {
    pub serial_hex: String,
    pub revoked_at: i64,
}

/// A v2 CRL with CRL number and authority key identifier (both required by RFC 5280).
pub fn crl_tbs(
    issuer: &Name,
    issuer_key_id: &[u8],
    number: u64,
    this_update: i64,
    next_update: i64,
    revoked: &[RevokedEntry],
) -> Result<TbsCertList, X509Error> {
    let entries = revoked
        .iter()
        .map(|r| {
            Ok(RevokedCert {
                serial_number: serial_from_hex(&r.serial_hex)?,
                revocation_date: time_of(r.revoked_at)?,
                crl_entry_extensions: None,
            })
        })
        .collect::<Result<Vec<_>, X509Error>>()?;
    let extensions = vec![
        ext(
            &AuthorityKeyIdentifier {
                key_identifier: Some(OctetString::new(issuer_key_id)?),
                authority_cert_issuer: None,
                authority_cert_serial_number: None,
            },
            issuer,
        )?,
        ext(&CrlNumber(Uint::new(&number.to_be_bytes())?), issuer)?,
    ];
    Ok(TbsCertList {
        version: Version::V2,
        signature: ecdsa_sha256(),
        issuer: issuer.clone(),
        this_update: time_of(this_update)?,
        next_update: Some(time_of(next_update)?),
        revoked_certificates: (!entries.is_empty()).then_some(entries),
        crl_extensions: Some(extensions),
    })
}

/// PKCS#10 request for the host CA key, asking for a CA certificate with path length 0.
pub fn host_csr_info(subject: &Name, key: &VerifyingKey) -> Result<CertReqInfo, X509Error> {
    let ext_req = ExtensionReq(ca_extensions(subject)?);
    let attr = x509_cert::attr::Attribute::try_from(ext_req)?;
    Ok(CertReqInfo {
        version: x509_cert::request::Version::V1,
        subject: subject.clone(),
        public_key: spki_of(key)?,
        attributes: SetOfVec::try_from(vec![attr])?,
    })
}

/// DER of a to-be-signed structure and the SHA-256 digest the key store signs.
pub fn to_be_signed<T: Encode>(tbs: &T) -> Result<(Vec<u8>, [u8; 32]), X509Error> {
    let der = tbs.to_der()?;
    let digest: [u8; 32] = Sha256::digest(&der).into();
    Ok((der, digest))
}

fn der_signature(sig: &Signature) -> Result<BitString, X509Error> {
    Ok(BitString::from_bytes(sig.to_der().as_bytes())?)
}

pub fn assemble_certificate(
    tbs: TbsCertificate,
    sig: &Signature,
) -> Result<Certificate, X509Error> {
    Ok(Certificate {
        tbs_certificate: tbs,
        signature_algorithm: ecdsa_sha256(),
        signature: der_signature(sig)?,
    })
}

pub fn assemble_crl(tbs: TbsCertList, sig: &Signature) -> Result<CertificateList, X509Error> {
    Ok(CertificateList {
        tbs_cert_list: tbs,
        signature_algorithm: ecdsa_sha256(),
        signature: der_signature(sig)?,
    })
}

pub fn assemble_csr(info: CertReqInfo, sig: &Signature) -> Result<CertReq, X509Error> {
    Ok(CertReq {
        info,
        algorithm: ecdsa_sha256(),
        signature: der_signature(sig)?,
    })
}

pub fn to_pem<T: EncodePem>(value: &T) -> Result<String, X509Error> {
    Ok(value.to_pem(der::pem::LineEnding::LF)?)
}

/// x509-cert 0.2 gives `CertificateList` no PEM label; RFC 7468 calls it `X509 CRL`.
pub fn crl_to_pem(crl: &CertificateList) -> Result<String, X509Error> {
    der::pem::encode_string("X509 CRL", der::pem::LineEnding::LF, &crl.to_der()?)
        .map_err(|e| X509Error::Invalid(format!("PEM encoding: {e}")))
}

/// The P-256 public key a certificate carries (None for other key types).
pub fn cert_p256_key(cert: &Certificate) -> Option<VerifyingKey> {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    VerifyingKey::from_sec1_bytes(spki.subject_public_key.raw_bytes()).ok()
}

/// Every certificate in a PEM bundle, in order. Only whitespace may come between the blocks.
/// (Not x509-cert's `load_pem_chain`: see `tessera::pem`.)
pub fn certs_from_pem(pem: &str) -> Result<Vec<Certificate>, X509Error> {
    tessera::pem::certificates(pem).map_err(|e| X509Error::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::hazmat::PrehashSigner;
    use p256::ecdsa::SigningKey;
    use x509_parser::prelude::FromDer;

    fn sign(sk: &SigningKey, digest: &[u8; 32]) -> Signature {
        sk.sign_prehash(digest).unwrap()
    }

    #[test]
    fn ca_and_leaf_chain_and_parse_back() {
        let ca_sk = SigningKey::from_slice(&[5u8; 32]).unwrap();
        let leaf_sk = SigningKey::from_slice(&[6u8; 32]).unwrap();
        let ca_name = cn_name("host-1").unwrap();
        let now = now_unix();
        let tbs = host_ca_tbs(&ca_name, ca_sk.verifying_key(), now, now + 3600).unwrap();
        let (_, d) = to_be_signed(&tbs).unwrap();
        let ca = assemble_certificate(tbs, &sign(&ca_sk, &d)).unwrap();
        let ca_der = ca.to_der().unwrap();
        let kid = key_identifier(&ca.tbs_certificate.subject_public_key_info);
        // A leaf for `leaf_sk`, signed by the CA, with the given usage and key kind.
        let leaf_of = |server_auth, key_kind| {
            let tbs = agent_tbs(&AgentCertSpec {
                issuer: &ca_name,
                issuer_key_id: &kid,
                agent_name: "bot",
                spiffe_id: "spiffe://example.org/host/h/agent/bot",
                key: leaf_sk.verifying_key(),
                not_before: now,
                not_after: now + 600,
                server_auth,
                key_kind,
            })
            .unwrap();
            let (_, d) = to_be_signed(&tbs).unwrap();
            assemble_certificate(tbs, &sign(&ca_sk, &d)).unwrap()
        };
        let leaf = leaf_of(false, tessera::key_policy::KeyKind::Hardware);
        let leaf_der = leaf.to_der().unwrap();
        // An independent parser checks both signatures.
        let (_, ca_p) = x509_parser::certificate::X509Certificate::from_der(&ca_der).unwrap();
        let (_, leaf_p) = x509_parser::certificate::X509Certificate::from_der(&leaf_der).unwrap();
        ca_p.verify_signature(None).unwrap();
        leaf_p.verify_signature(Some(ca_p.public_key())).unwrap();
        assert!(ca_p.is_ca());
        assert!(!leaf_p.is_ca());
        assert_eq!(cert_p256_key(&leaf).unwrap(), *leaf_sk.verifying_key());
        // clientAuth only (no tls_server), and the hardware-key policy.
        let eku = leaf_p.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let policies = leaf_p
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::CertificatePolicies(p) => Some(p),
                _ => None,
            })
            .expect("a certificate policies extension x509-parser can read")
            .iter()
            .map(|p| hex::encode(p.policy_id.as_bytes()))
            .collect::<Vec<_>>();
        // What `openssl asn1parse -genstr OID:<HARDWARE_KEY_OID>` encodes, after tag and length.
        assert_eq!(
            policies,
            vec!["6982a7fdd397d2dd8ab58398ab80c8bfeca18f4d01"],
            "{}",
            tessera::key_policy::HARDWARE_KEY_OID
        );
        assert_eq!(
            tessera::key_policy::key_kind(&leaf_der),
            Some(tessera::key_policy::KeyKind::Hardware)
        );
        assert_eq!(tessera::key_policy::key_kind(&ca_der), None);

        // A TLS server's software-key certificate.
        let der = leaf_of(true, tessera::key_policy::KeyKind::Software)
            .to_der()
            .unwrap();
        let (_, p) = x509_parser::certificate::X509Certificate::from_der(&der).unwrap();
        let eku = p.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && eku.server_auth);
        assert_eq!(
            tessera::key_policy::key_kind(&der),
            Some(tessera::key_policy::KeyKind::Software)
        );
    }

    #[test]
    fn crl_lists_serials() {
        let ca_sk = SigningKey::from_slice(&[5u8; 32]).unwrap();
        let name = cn_name("host-1").unwrap();
        let now = now_unix();
        let serial = serial_hex(&random_serial().unwrap());
        let tbs = crl_tbs(
            &name,
            &[1u8; 20],
            7,
            now,
            now + 60,
            &[RevokedEntry {
                serial_hex: serial.clone(),
                revoked_at: now,
            }],
        )
        .unwrap();
        let (_, d) = to_be_signed(&tbs).unwrap();
        let crl = assemble_crl(tbs, &sign(&ca_sk, &d)).unwrap();
        let der = crl.to_der().unwrap();
        let (_, parsed) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
        let listed: Vec<String> = parsed
            .iter_revoked_certificates()
            .map(|r| hex::encode(r.raw_serial()))
            .collect();
        assert_eq!(listed, vec![serial]);
        assert_eq!(parsed.crl_number().map(|n| n.to_string()), Some("7".into()));
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(cn_name("").is_err());
        assert!(cn_name(&"x".repeat(65)).is_err());
    }
}
