//! Which kind of key a tessera certificate certifies, as its certificate policies extension
//! (RFC 5280 §4.2.1.4) says: `tessera-hardware-key` for an agent's identity key (made in and
//! never leaving the TPM/HSM), `tessera-software-key` for keys the daemon holds in memory
//! (session keys) or hands out (Workload API X.509-SVIDs).
//!
//! The OIDs sit under a UUID arc (ITU-T X.667, `2.25.<UUID>`): tessera has no IANA private
//! enterprise number, and a UUID arc is the one kind anybody may allocate. Such arcs exceed 64
//! bits; OpenSSL, Python's `cryptography`, Java and Go ≥ 1.22 parse them. The arc is
//! `2.25.196713540859399724016930344593458218957` (UUID 93fda65e-95d1-4d41-9856-0243fd8847cd).

use x509_cert::der::asn1::AnyRef;
use x509_cert::der::{Decode, Reader, SliceReader, Tag, Tagged};

/// The arc every tessera OID is under.
pub const ARC: u128 = 196_713_540_859_399_724_016_930_344_593_458_218_957;

/// `tessera-hardware-key`: the certified key is an agent's device key.
pub const HARDWARE_KEY_OID: &str = "2.25.196713540859399724016930344593458218957.1";
/// `tessera-software-key`: the certified key lives in software (session or software SVID key).
pub const SOFTWARE_KEY_OID: &str = "2.25.196713540859399724016930344593458218957.2";

/// id-ce-certificatePolicies.
const CERTIFICATE_POLICIES: &str = "2.5.29.32";

/// What a certificate's policy says of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Hardware,
    Software,
}

impl KeyKind {
    fn last_arc(self) -> u128 {
        match self {
            KeyKind::Hardware => 1,
            KeyKind::Software => 2,
        }
    }

    pub fn oid(self) -> &'static str {
        match self {
            KeyKind::Hardware => HARDWARE_KEY_OID,
            KeyKind::Software => SOFTWARE_KEY_OID,
        }
    }

    /// The OID's content octets (what follows tag and length in its DER).
    fn oid_content(self) -> Vec<u8> {
        // First two arcs 2.25 make one subidentifier, 2 * 40 + 25 (X.690 §8.19.4).
        let mut out = Vec::with_capacity(22);
        for arc in [2 * 40 + 25, ARC, self.last_arc()] {
            base128(arc, &mut out);
        }
        out
    }

    /// DER of a certificatePolicies extension value naming this kind alone (no qualifiers).
    pub fn extension_value(self) -> Vec<u8> {
        let oid = der_tlv(0x06, &self.oid_content());
        let info = der_tlv(0x30, &oid);
        der_tlv(0x30, &info)
    }
}

fn base128(mut v: u128, out: &mut Vec<u8>) {
    let mut groups = vec![(v & 0x7f) as u8];
    v >>= 7;
    while v > 0 {
        groups.push((v & 0x7f) as u8 | 0x80);
        v >>= 7;
    }
    out.extend(groups.iter().rev());
}

/// Tag, definite length, content (lengths here are under 128 bytes or short multi-byte).
fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else if n <= 0xff {
        out.extend([0x81, n as u8]);
    } else {
        out.extend([0x82, (n >> 8) as u8, n as u8]);
    }
    out.extend_from_slice(content);
    out
}

/// The kind of key a DER certificate certifies per tessera's policy OIDs; `None` when it
/// names neither (not a tessera agent certificate) or cannot be parsed. A certificate naming
/// both is read as software.
pub fn key_kind(cert_der: &[u8]) -> Option<KeyKind> {
    let cert = x509_cert::Certificate::from_der(cert_der).ok()?;
    let ext = cert
        .tbs_certificate
        .extensions
        .as_ref()?
        .iter()
        .find(|e| e.extn_id.to_string() == CERTIFICATE_POLICIES)?;
    let oids = policy_oids(ext.extn_value.as_bytes()).ok()?;
    let has = |k: KeyKind| oids.iter().any(|o| *o == k.oid_content());
    if has(KeyKind::Software) {
        Some(KeyKind::Software)
    } else if has(KeyKind::Hardware) {
        Some(KeyKind::Hardware)
    } else {
        None
    }
}

/// The policy identifiers (OID content octets) of a certificatePolicies value: parsed by
/// hand because the `const-oid` type holds arcs of 32 bits only.
fn policy_oids(value: &[u8]) -> Result<Vec<Vec<u8>>, x509_cert::der::Error> {
    let mut r = SliceReader::new(value)?;
    let oids = r.sequence(|policies| {
        let mut oids = Vec::new();
        while !policies.is_finished() {
            oids.push(policies.sequence(|info| {
                let oid = AnyRef::decode(info)?;
                if oid.tag() != Tag::ObjectIdentifier {
                    return Err(Tag::ObjectIdentifier.value_error());
                }
                // Qualifiers, if any, are not ours to read.
                let rest = info.remaining_len();
                info.read_slice(rest)?;
                Ok(oid.value().to_vec())
            })?);
        }
        Ok(oids)
    })?;
    r.finish(oids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_uuid_arc() {
        // The content octets decode back to the dotted string (X.690 §8.19).
        for kind in [KeyKind::Hardware, KeyKind::Software] {
            let content = kind.oid_content();
            let mut arcs: Vec<u128> = Vec::new();
            let mut acc: u128 = 0;
            for b in content {
                acc = (acc << 7) | u128::from(b & 0x7f);
                if b & 0x80 == 0 {
                    arcs.push(acc);
                    acc = 0;
                }
            }
            let first = arcs.remove(0);
            let dotted = std::iter::once((first / 40).min(2))
                .chain(std::iter::once(first - 40 * (first / 40).min(2)))
                .chain(arcs)
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(".");
            assert_eq!(dotted, kind.oid());
        }
        assert_eq!(
            uuid_of(ARC),
            "93fda65e-95d1-4d41-9856-0243fd8847cd",
            "the arc is the README's UUID"
        );
    }

    fn uuid_of(v: u128) -> String {
        let h = format!("{v:032x}");
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    }

    #[test]
    fn reads_its_own_extension_and_ignores_others() {
        for kind in [KeyKind::Hardware, KeyKind::Software] {
            let oids = policy_oids(&kind.extension_value()).unwrap();
            assert_eq!(oids, vec![kind.oid_content()]);
        }
        // anyPolicy (2.5.29.32.0) with a CPS qualifier: read, not ours.
        let any_policy = [
            0x30, 0x1c, 0x30, 0x1a, 0x06, 0x04, 0x55, 0x1d, 0x20, 0x00, 0x30, 0x12, 0x30, 0x10,
            0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x02, 0x01, 0x16, 0x04, 0x68, 0x74,
            0x74, 0x70,
        ];
        let oids = policy_oids(&any_policy).unwrap();
        assert_eq!(oids, vec![vec![0x55, 0x1d, 0x20, 0x00]]);
        assert!(policy_oids(&[0x30, 0x03, 0x30, 0x01, 0x05]).is_err());
        assert!(policy_oids(&[]).is_err());
    }
}
