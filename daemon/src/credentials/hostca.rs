//! The host CA: a key in the key store, its certificate (self-signed, or issued by a fleet
//! CA through `tessera host csr` / `install-cert`), agent certificates and the CRL.
//!
//! State: the registry's `meta` table names the CA key (`hostca.key_id`, written before the
//! key is made, so a crash leaves at worst an id without a key, which is replaced), and
//! `<state>/ca/host-ca.pem` holds the CA certificate followed by its issuers (written whole
//! or not at all). The CRL is rebuilt from the registry at start, at every revocation, when
//! the CA certificate changes and when it is half way to `nextUpdate`.

use std::path::PathBuf;
use std::sync::Arc;

use p256::ecdsa::VerifyingKey;
use serde_json::json;
use x509_cert::certificate::Certificate;
use x509_cert::der::Encode;
use x509_cert::ext::pkix::SubjectKeyIdentifier;
use x509_cert::name::Name;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::agents::{Ids, RegistryError};
use crate::audit::Event;
use crate::credentials::issuer::IssueError;
use crate::credentials::x509::{self, X509Error};
use crate::credentials::Credentials;
use crate::keystore::{new_key_id, KeyStoreError};

pub const HOSTCA_KEY_PREFIX: &str = "hostca";
const META_KEY_ID: &str = "hostca.key_id";
/// A self-signed CA certificate is renewed (same key) when it has less than this left.
const RENEW_BEFORE_SECS: i64 = 30 * 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum HostCaError {
    #[error(transparent)]
    Issue(#[from] IssueError),
    #[error(transparent)]
    KeyStore(#[from] KeyStoreError),
    #[error(transparent)]
    X509(#[from] X509Error),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("host CA state at {path}: {source}")]
    State {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("host CA is not ready")]
    NotReady,
    #[error("{0}")]
    InvalidArgs(String),
    #[error("certificate rejected: {0}")]
    CertificateRejected(String),
}

impl HostCaError {
    /// The key store error underneath, if that is what failed.
    pub fn keystore(&self) -> Option<&KeyStoreError> {
        match self {
            HostCaError::KeyStore(k) | HostCaError::Issue(IssueError::KeyStore(k)) => Some(k),
            _ => None,
        }
    }
}

/// The CA as it is now: key, certificate chain and the names agent certificates refer to,
/// with the PEM every request serves encoded once, here.
#[derive(Debug)]
pub struct HostCa {
    pub key_id: String,
    pub key: VerifyingKey,
    /// The host CA certificate, then its issuers up to a root (only the first when self-signed).
    pub chain: Vec<Certificate>,
    pub subject: Name,
    /// Subject key identifier of the CA certificate (agent certificates and CRLs carry it as
    /// authority key identifier).
    pub key_identifier: Vec<u8>,
    pub self_signed: bool,
    /// Last moment a certificate issued by this CA may be valid: the earliest end in its chain.
    pub not_after: i64,
    /// Every certificate of `chain` as PEM (what `ca/host-ca.pem` holds).
    pub file_pem: String,
    /// The host CA certificate and the intermediates below the root: what follows an agent
    /// certificate in `/v1/certificate`.
    pub chain_pem: String,
    /// The trust anchor a relying party should hold (`/v1/bundle`): the host CA itself when
    /// self-signed, else the root of the installed chain.
    pub bundle_pem: String,
}

impl HostCa {
    fn new(
        key_id: String,
        key: VerifyingKey,
        chain: Vec<Certificate>,
    ) -> Result<HostCa, X509Error> {
        let first = chain
            .first()
            .ok_or_else(|| X509Error::Invalid("host CA has no certificate".into()))?;
        let self_signed = chain.len() == 1 && is_self_issued(first);
        let pems: Vec<String> = chain.iter().map(x509::to_pem).collect::<Result<_, _>>()?;
        let below_root = if self_signed {
            1
        } else {
            (pems.len() - 1).max(1)
        };
        Ok(HostCa {
            key_id,
            key,
            subject: first.tbs_certificate.subject.clone(),
            key_identifier: subject_key_id(first),
            self_signed,
            not_after: chain
                .iter()
                .map(|c| x509::unix_of(&c.tbs_certificate.validity.not_after))
                .min()
                .unwrap_or(0),
            file_pem: pems.concat(),
            chain_pem: pems[..below_root].concat(),
            bundle_pem: pems[pems.len() - 1].clone(),
            chain,
        })
    }
}

/// The current CRL.
#[derive(Debug)]
pub struct Crl {
    pub pem: String,
    pub this_update: i64,
    pub next_update: i64,
    /// [`crate::agents::Agents::generation`] read before the CRL was built: a later change
    /// (a revocation) makes it out of date.
    pub generation: u64,
}

fn state_err(path: &std::path::Path, source: std::io::Error) -> HostCaError {
    HostCaError::State {
        path: path.display().to_string(),
        source,
    }
}

fn subject_key_id(cert: &Certificate) -> Vec<u8> {
    cert.tbs_certificate
        .get::<SubjectKeyIdentifier>()
        .ok()
        .flatten()
        .map(|(_, ski)| ski.0.as_bytes().to_vec())
        .unwrap_or_else(|| x509::key_identifier(&cert.tbs_certificate.subject_public_key_info))
}

fn is_self_issued(cert: &Certificate) -> bool {
    cert.tbs_certificate.issuer == cert.tbs_certificate.subject
}

/// Check an externally issued chain before it replaces the host CA certificate: the first
/// certificate carries our CA key and may sign certificates and CRLs; each certificate is
/// signed by the next; the last is a self-signed root; all are valid now.
pub fn check_installed_chain(
    chain: &[Certificate],
    ca_key: &VerifyingKey,
    now: i64,
) -> Result<(), String> {
    let first = chain.first().ok_or("no certificate in the file")?;
    if x509::cert_p256_key(first).as_ref() != Some(ca_key) {
        return Err(
            "the first certificate is not for this host's CA key (was it issued for this host's CSR?)"
                .into(),
        );
    }
    let ders: Vec<Vec<u8>> = chain
        .iter()
        .map(|c| c.to_der().map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let parsed: Vec<X509Certificate<'_>> = ders
        .iter()
        .enumerate()
        .map(|(i, d)| {
            X509Certificate::from_der(d)
                .map(|(_, c)| c)
                .map_err(|e| format!("certificate {}: {e}", i + 1))
        })
        .collect::<Result<_, _>>()?;
    let host = &parsed[0];
    if !host.is_ca() {
        return Err(
            "the host certificate is not a CA certificate (basicConstraints cA is not set)".into(),
        );
    }
    // Required, not just allowed: the README promises a host CA whose certificate says what
    // it signs (agent certificates and CRLs).
    match host.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() && ku.value.crl_sign() => {}
        _ => {
            return Err(
                "the host certificate must have a key usage with keyCertSign and cRLSign".into(),
            )
        }
    }
    for (i, c) in parsed.iter().enumerate() {
        let nb = c.validity().not_before.timestamp();
        let na = c.validity().not_after.timestamp();
        if now < nb || now > na {
            return Err(format!("certificate {} is not valid now", i + 1));
        }
        let issuer = match parsed.get(i + 1) {
            Some(next) => {
                if c.issuer() != next.subject() {
                    return Err(format!(
                        "certificate {} is issued by {}, but certificate {} is {}",
                        i + 1,
                        c.issuer(),
                        i + 2,
                        next.subject()
                    ));
                }
                // Every issuer, the host certificate's own included, must be a CA allowed to
                // sign certificates (RFC 5280 4.2.1.3: keyCertSign when key usage is present).
                if !next.is_ca() {
                    return Err(format!("certificate {} is not a CA", i + 2));
                }
                match next.key_usage() {
                    Ok(Some(ku)) if !ku.value.key_cert_sign() => {
                        return Err(format!(
                            "certificate {} may not sign certificates (no keyCertSign)",
                            i + 2
                        ))
                    }
                    Err(e) => return Err(format!("certificate {}: key usage: {e}", i + 2)),
                    _ => {}
                }
                next.public_key()
            }
            None => {
                if c.issuer() != c.subject() {
                    return Err(format!(
                        "the chain must end in a self-signed root so it can be checked: append the certificate of {}",
                        c.issuer()
                    ));
                }
                c.public_key()
            }
        };
        c.verify_signature(Some(issuer))
            .map_err(|e| format!("signature of certificate {} does not verify: {e}", i + 1))?;
    }
    if chain.len() == 1 {
        return Err("the file holds only the host certificate; append its issuing CA certificates up to the root".into());
    }
    Ok(())
}

impl Credentials {
    fn ca_dir(&self) -> PathBuf {
        self.ca_dir.clone()
    }

    fn ca_cert_path(&self) -> PathBuf {
        self.ca_dir().join("host-ca.pem")
    }

    pub fn host_ca(&self) -> Result<Arc<HostCa>, HostCaError> {
        self.ca
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(HostCaError::NotReady)
    }

    /// At start: find or make the CA key, load or make its certificate, destroy stray CA
    /// keys, build the CRL. Returns whether a CA key on record was missing and replaced.
    pub async fn init_host_ca(&self) -> Result<bool, HostCaError> {
        let _guard = self.ca_lock.lock().await;
        let dir = self.ca_dir();
        std::fs::create_dir_all(&dir).map_err(|e| state_err(&dir, e))?;
        let known = self.agents.meta(META_KEY_ID)?;
        let existing = match &known {
            Some(id) => match self.keystore.public_key(id).await {
                Ok(k) => Some((id.clone(), k)),
                Err(KeyStoreError::KeyNotFound(_)) => None,
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        let (key_id, key, new_key) = match existing {
            Some((id, k)) => (id, k, false),
            None => {
                if self.ca_cert_path().exists() {
                    tracing::error!(
                        key_id = ?known,
                        "host CA key is missing from the key store; making a new host CA"
                    );
                }
                let id = new_key_id(HOSTCA_KEY_PREFIX);
                // Durable name first: a crash after this leaves an id without a key.
                self.agents.set_meta(META_KEY_ID, &id)?;
                crate::fault::point("hostca-after-name");
                let created = self.keystore.create(&id).await?;
                crate::fault::point("hostca-after-key");
                (id, created.public, true)
            }
        };
        // Stray CA keys (a replaced CA, or one made just before a crash) are destroyed.
        for stray in self
            .keystore
            .list()
            .await?
            .into_iter()
            .filter(|k| k.starts_with(&format!("{HOSTCA_KEY_PREFIX}-")) && *k != key_id)
        {
            match self.keystore.destroy(&stray).await {
                Ok(()) | Err(KeyStoreError::KeyNotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            self.audit
                .record_or_log(
                    Event::new("key.destroyed").details(json!({
                        "by": "tesserad", "key_id": stray, "reason": "stray host CA key",
                    })),
                    "a host CA key destruction",
                )
                .await;
        }
        let now = x509::now_unix();
        let loaded = if new_key {
            None
        } else {
            self.load_ca_chain(&key_id, &key)?
        };
        let ca = match loaded {
            Some(ca) if ca.self_signed && ca_expires_soon(&ca, now) => {
                tracing::info!("renewing the self-signed host CA certificate");
                self.self_sign(&key_id, key, now).await?
            }
            Some(ca) => {
                if ca_expires_soon(&ca, now) {
                    tracing::warn!("the installed host CA certificate expires within 30 days; install a new one with `tessera host install-cert`");
                }
                ca
            }
            None => self.self_sign(&key_id, key, now).await?,
        };
        *self.ca.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(ca));
        self.bundles_changed();
        drop(_guard);
        self.refresh_crl().await?;
        Ok(new_key && known.is_some())
    }

    /// Renew the self-signed host CA certificate (same key) once it is within 30 days of its
    /// end; the runtime calls this periodically, so a daemon that runs for years renews it
    /// without a restart. An installed (fleet-issued) certificate is only warned about.
    /// Returns whether it renewed.
    pub async fn renew_ca_if_due(&self) -> Result<bool, HostCaError> {
        let renewed = {
            let _guard = self.ca_lock.lock().await;
            let ca = self.host_ca()?;
            let now = x509::now_unix();
            if !ca_expires_soon(&ca, now) {
                return Ok(false);
            }
            if !ca.self_signed {
                tracing::warn!("the installed host CA certificate expires within 30 days; install a new one with `tessera host install-cert`");
                return Ok(false);
            }
            tracing::info!("renewing the self-signed host CA certificate");
            let new = self.self_sign(&ca.key_id, ca.key, now).await?;
            *self.ca.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(new));
            self.bundles_changed();
            true
        };
        // The CRL names the CA certificate it belongs with: sign a new one.
        self.refresh_crl().await?;
        Ok(renewed)
    }

    /// How long until [`Credentials::renew_ca_if_due`] has something to do (zero when it is
    /// due now), so the periodic task wakes when renewal is due, not only on its hourly round.
    pub fn ca_renewal_due_in(&self) -> Option<std::time::Duration> {
        let ca = self.host_ca().ok()?;
        let end = x509::unix_of(&ca.chain[0].tbs_certificate.validity.not_after);
        // One second past the boundary: `ca_expires_soon` needs strictly less time left.
        let due = end - RENEW_BEFORE_SECS - x509::now_unix() + 1;
        Some(std::time::Duration::from_secs(due.max(0) as u64))
    }

    /// The stored chain, if it is for `key`.
    fn load_ca_chain(
        &self,
        key_id: &str,
        key: &VerifyingKey,
    ) -> Result<Option<HostCa>, HostCaError> {
        let path = self.ca_cert_path();
        let pem = match std::fs::read_to_string(&path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(state_err(&path, e)),
        };
        let chain = match x509::certs_from_pem(&pem) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "unreadable host CA certificate; making a new one");
                return Ok(None);
            }
        };
        if x509::cert_p256_key(&chain[0]).as_ref() != Some(key) {
            tracing::error!(path = %path.display(), "host CA certificate is not for the host CA key; making a new one");
            return Ok(None);
        }
        Ok(Some(HostCa::new(key_id.to_string(), *key, chain)?))
    }

    async fn self_sign(
        &self,
        key_id: &str,
        key: VerifyingKey,
        now: i64,
    ) -> Result<HostCa, HostCaError> {
        let cfg = self.settings();
        let subject = x509::cn_name(&ca_common_name(&cfg.ids))?;
        let not_after = now + cfg.certificates.ca_validity.0.as_secs() as i64;
        let tbs = x509::host_ca_tbs(&subject, &key, now, not_after)?;
        let cert = self.issuer.certificate(key_id, tbs).await?;
        let serial = x509::serial_hex(&cert.tbs_certificate.serial_number);
        let ca = HostCa::new(key_id.to_string(), key, vec![cert])?;
        self.write_ca_file(&ca)?;
        self.audit
            .record_or_log(
                Event::new("hostca.created").details(json!({
                    "key_id": key_id,
                    "subject": subject.to_string(),
                    "serial": serial,
                    "not_after": not_after,
                })),
                "the host CA's creation",
            )
            .await;
        Ok(ca)
    }

    /// Re-sign the CRL: every unexpired certificate of a revoked agent.
    pub async fn refresh_crl(&self) -> Result<(), HostCaError> {
        let _guard = self.crl_lock.lock().await;
        self.sign_crl().await
    }

    /// The generation of the agents the current CRL was built from (0: none yet).
    pub(crate) fn crl_generation(&self) -> u64 {
        self.crl
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.generation)
            .unwrap_or(0)
    }

    /// Build and sign the CRL; the caller holds `crl_lock`.
    async fn sign_crl(&self) -> Result<(), HostCaError> {
        let ca = self.host_ca()?;
        // Read before the records: a revocation committed after this moves the generation on,
        // so the CRL built here is never taken for newer than it is.
        let generation = self.agents.generation();
        let now = x509::now_unix();
        let validity = self.settings().certificates.crl_validity.0.as_secs() as i64;
        let (revoked, number) = self.agents.crl_entries(now)?;
        let entries: Vec<x509::RevokedEntry> = revoked
            .into_iter()
            .map(|(serial_hex, revoked_at)| x509::RevokedEntry {
                serial_hex,
                revoked_at,
            })
            .collect();
        let tbs = x509::crl_tbs(
            &ca.subject,
            &ca.key_identifier,
            number,
            now,
            now + validity,
            &entries,
        )?;
        let crl = self.issuer.crl(&ca.key_id, tbs).await?;
        let pem = x509::crl_to_pem(&crl)?;
        *self.crl.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(Crl {
            pem,
            this_update: now,
            next_update: now + validity,
            generation,
        }));
        self.crl_stale
            .store(false, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(number, revoked = entries.len(), "CRL signed");
        self.bundles_changed();
        Ok(())
    }

    /// After a revocation: the revocation stands even if the CRL cannot be signed now; the
    /// next `/v1/crl` tries again (it also re-signs whenever the agents changed since).
    pub(crate) async fn refresh_crl_logged(&self) {
        if let Err(e) = self.refresh_crl().await {
            self.crl_stale
                .store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::error!(error = %e, "cannot sign the CRL; will retry on the next request");
        }
    }

    /// Re-sign the CRL now if the agents changed since it was made (DESIGN's revocation step
    /// (5): the CRL is current before a revocation is reported). A failure is logged and left
    /// to the next `/v1/crl`, which retries; the revocation stands either way.
    pub async fn ensure_crl_current(&self) {
        if let Err(e) = self.current_crl().await {
            self.crl_stale
                .store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::error!(error = %e, "cannot sign the CRL; will retry on the next request");
        }
    }

    /// The CRL if nothing it depends on has moved: same agents generation, signed without a
    /// failure since, and less than half way to `nextUpdate`.
    fn fresh_crl(&self) -> Option<Arc<Crl>> {
        let now = x509::now_unix();
        let generation = self.agents.generation();
        self.crl
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|c| c.generation == generation)
            .filter(|c| now < c.this_update + (c.next_update - c.this_update) / 2)
            .filter(|_| !self.crl_stale.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// `nextUpdate` of the CRL last signed (0: none yet).
    pub fn crl_next_update(&self) -> i64 {
        self.crl
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.next_update)
            .unwrap_or(0)
    }

    /// A CRL that should have been re-signed could not be.
    pub fn crl_is_stale(&self) -> bool {
        self.crl_stale.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The current CRL, re-signed first if the agents changed since it was built (a
    /// revocation), a signing failed, or it is half way to `nextUpdate`.
    pub async fn current_crl(&self) -> Result<Arc<Crl>, HostCaError> {
        if let Some(c) = self.fresh_crl() {
            return Ok(c);
        }
        {
            // Checked again under the lock: concurrent requests sign once, not once each.
            let _guard = self.crl_lock.lock().await;
            if self.fresh_crl().is_none() {
                self.sign_crl().await?;
            }
        }
        self.crl
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(HostCaError::NotReady)
    }

    /// PKCS#10 request for the host CA key (for a fleet CA to sign). `subject` defaults to
    /// `CN=<host id>`.
    pub async fn host_csr(&self, common_name: Option<&str>) -> Result<String, HostCaError> {
        let ca = self.host_ca()?;
        let cn = common_name
            .map(str::to_string)
            .unwrap_or_else(|| ca_common_name(&self.settings().ids));
        let subject = x509::cn_name(&cn).map_err(|e| HostCaError::InvalidArgs(e.to_string()))?;
        let info = x509::host_csr_info(&subject, &ca.key)?;
        let req = self.issuer.csr(&ca.key_id, info).await?;
        Ok(x509::to_pem(&req)?)
    }

    /// Replace the host CA certificate with one issued by an external CA (PEM: the host
    /// certificate, then its issuers up to the root). Checked before anything is written.
    pub async fn install_host_certificate(&self, pem: &str, by: &str) -> Result<(), HostCaError> {
        let guard = self.ca_lock.lock().await;
        let ca = self.host_ca()?;
        let chain = x509::certs_from_pem(pem)
            .map_err(|e| HostCaError::CertificateRejected(format!("cannot read the PEM: {e}")))?;
        check_installed_chain(&chain, &ca.key, x509::now_unix())
            .map_err(HostCaError::CertificateRejected)?;
        let new = HostCa::new(ca.key_id.clone(), ca.key, chain)?;
        self.write_ca_file(&new)?;
        let details = json!({
            "by": by,
            "subject": new.subject.to_string(),
            "issuer": new.chain[0].tbs_certificate.issuer.to_string(),
            "serial": x509::serial_hex(&new.chain[0].tbs_certificate.serial_number),
        });
        *self.ca.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(new));
        self.bundles_changed();
        drop(guard);
        self.audit
            .record_or_log(
                Event::new("hostca.certificate_installed").details(details),
                "a host certificate installation",
            )
            .await;
        // The CRL's issuer is the CA certificate's subject: sign a new one now.
        self.refresh_crl().await?;
        Ok(())
    }

    fn write_ca_file(&self, ca: &HostCa) -> Result<(), HostCaError> {
        let path = self.ca_cert_path();
        crate::durable::write_atomic(&path, ca.file_pem.as_bytes()).map_err(|e| state_err(&path, e))
    }
}

/// The host CA's common name: the host id (`spiffe://<trust domain>/host/<host>`), or, when
/// that is longer than X.509's 64-byte limit for a common name, the host name cut to 64 bytes.
pub fn ca_common_name(ids: &Ids) -> String {
    let id = ids.host_id();
    if id.len() <= 64 {
        return id;
    }
    let host = &ids.host_name;
    let mut end = host.len().min(64);
    while !host.is_char_boundary(end) {
        end -= 1;
    }
    host[..end].to_string()
}

fn ca_expires_soon(ca: &HostCa, now: i64) -> bool {
    x509::unix_of(&ca.chain[0].tbs_certificate.validity.not_after) - now < RENEW_BEFORE_SECS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(trust_domain: &str, host: &str) -> Ids {
        Ids {
            trust_domain: trust_domain.into(),
            host_name: host.into(),
            id_template: "spiffe://{trust_domain}/host/{host}/agent/{name}".into(),
        }
    }

    #[test]
    fn ca_common_name_fits_x509() {
        assert_eq!(
            ca_common_name(&ids("example.org", "web-1")),
            "spiffe://example.org/host/web-1"
        );
        let long_host = "h".repeat(70);
        let cn = ca_common_name(&ids("a-rather-long-trust-domain.example.org", &long_host));
        assert_eq!(cn.len(), 64);
        assert!(x509::cn_name(&cn).is_ok());
    }
}
