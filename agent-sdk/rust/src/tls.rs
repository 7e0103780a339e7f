//! Keyless mutual TLS with rustls 0.23 (feature `rustls`): the agent presents the certificate
//! tesserad issued for its hardware key, and the one signature TLS 1.3 needs from that key
//! (CertificateVerify) is made by the daemon (`POST /v1/tls/sign`), which signs nothing but a
//! TLS 1.3 CertificateVerify content. The key never leaves the TPM/HSM.
//!
//! - [`client_config`] / [`server_config`]: TLS 1.3-only configs (ring provider) that present
//!   the agent's certificate, renewed at half-life; the server verifies clients against the
//!   host CA (or given roots) and the daemon's CRL, re-fetched every [`CRL_REFRESH`].
//! - [`peer_spiffe_id`]: the SPIFFE ID (URI SAN) of the peer's certificate.
//! - Agent peers must present a certificate labelled `tessera-hardware-key`
//!   ([`crate::key_policy`]) unless [`TlsOptions::allow_software_keys`]; an agent whose policy
//!   has `proof_key = "session"` may present its session key instead
//!   ([`TlsOptions::session_key`]), signed in memory.
//!
//! The signer makes a blocking call over the agent socket (inside a multi-threaded tokio
//! runtime it steps aside with `block_in_place`); a handshake costs one device signature.
//! Session resumption is off in both configs, so every handshake is signed by the daemon and a
//! revoked agent's next handshake fails.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureAlgorithm, SignatureScheme,
};

use crate::{CertificateOptions, Client, Error, Problem};

pub use rustls;

/// How often a server config re-fetches the CRL (a revocation ends new handshakes within this).
pub const CRL_REFRESH: Duration = Duration::from_secs(30);
/// The deadline of one call to the daemon.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Tessera(#[from] Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("certificate: {0}")]
    Certificate(String),
}

/// Which agent, which trust anchors, which certificate lifetime.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// The agent, when the process matches several.
    pub agent: Option<String>,
    /// Trust anchors for the peer; default: the host CA (`/v1/bundle`).
    pub roots: Option<RootCertStore>,
    /// Certificate lifetime asked for (at most the agent's limit).
    pub cert_ttl: Option<Duration>,
    /// Client side: the server is another agent, known by its SPIFFE ID (the URI SAN of its
    /// certificate) rather than a DNS name; the chain is still checked against `roots`.
    pub server_spiffe_id: Option<String>,
    /// Present a certificate for the agent's session key (policy `proof_key = "session"`):
    /// signatures are made in memory, not in the device. Peers see `tessera-software-key`.
    pub session_key: bool,
    /// Accept agent peers whose certificate says `tessera-software-key` (session keys,
    /// software SVIDs). By default an agent peer must present a hardware key's certificate.
    pub allow_software_keys: bool,
}

/// The ring provider with TLS 1.3 only.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client config presenting the agent's certificate.
pub async fn client_config(agent: &Client, opts: &TlsOptions) -> Result<ClientConfig, TlsError> {
    Ok(client_config_and_resolver(agent, opts).await?.0)
}

/// [`client_config`] and the resolver it presents certificates from (for
/// [`AgentCertResolver::x5t_s256`], to ask for certificate-bound tokens).
pub async fn client_config_and_resolver(
    agent: &Client,
    opts: &TlsOptions,
) -> Result<(ClientConfig, Arc<AgentCertResolver>), TlsError> {
    let roots = match &opts.roots {
        Some(r) => r.clone(),
        None => roots_from_pem(&agent.bundle().await?)?,
    };
    let resolver = AgentCertResolver::fetch(agent, opts).await?;
    let presented = resolver.clone();
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut config = match &opts.server_spiffe_id {
        None => builder
            .with_root_certificates(roots)
            .with_client_cert_resolver(resolver),
        Some(id) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots,
                id: id.clone(),
                allow_software_keys: opts.allow_software_keys,
            }))
            .with_client_cert_resolver(resolver),
    };
    // No resumption: a resumed session skips CertificateVerify, so a revoked agent could go on
    // connecting on an old ticket. Every handshake is signed by the daemon, or fails.
    config.resumption = rustls::client::Resumption::disabled();
    Ok((config, presented))
}

/// An agent as TLS server: the chain must lead to `roots` (serverAuth), the certificate's
/// SPIFFE ID must be `id`, and its key a hardware key (unless software keys are allowed); the
/// DNS name the client dialled plays no part.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: RootCertStore,
    id: String,
    allow_software_keys: bool,
}

/// The peer's certificate must say `tessera-hardware-key`, unless software keys are allowed.
fn check_key_kind(
    end_entity: &CertificateDer<'_>,
    allow_software: bool,
) -> Result<(), rustls::Error> {
    use crate::key_policy::{key_kind, KeyKind};
    match key_kind(end_entity.as_ref()) {
        Some(KeyKind::Hardware) => Ok(()),
        Some(KeyKind::Software) if allow_software => Ok(()),
        kind => Err(rustls::Error::General(format!(
            "the peer's certificate is {} ({})",
            match kind {
                Some(_) => "for a software key",
                None => "not labelled with a tessera key policy",
            },
            if allow_software {
                "tessera-hardware-key or tessera-software-key required"
            } else {
                "tessera-hardware-key required; allow_software_keys accepts session and software keys"
            }
        ))),
    }
}

impl rustls::client::danger::ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            provider().signature_verification_algorithms.all,
        )?;
        match peer_spiffe_id(std::slice::from_ref(end_entity)) {
            Some(id) if id == self.id => {
                check_key_kind(end_entity, self.allow_software_keys)?;
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            other => Err(rustls::Error::General(format!(
                "server is {other:?}, not {}",
                self.id
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A server config presenting the agent's certificate (its policy needs `tls_server = true`)
/// and requiring client certificates from the given roots (default: the host CA), checked
/// against the daemon's CRL, for hardware keys (unless `allow_software_keys`).
pub async fn server_config(agent: &Client, opts: &TlsOptions) -> Result<ServerConfig, TlsError> {
    let roots = match &opts.roots {
        Some(r) => r.clone(),
        None => roots_from_pem(&agent.bundle().await?)?,
    };
    let verifier = CrlRefreshingVerifier::new(
        agent,
        Arc::new(roots),
        agent.crl().await?,
        opts.allow_software_keys,
    )?;
    let resolver = AgentCertResolver::fetch(agent, opts).await?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(resolver);
    // No resumption either way: every client proves its key (and meets the CRL) each time.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The SPIFFE ID in the URI SAN of the first certificate (the peer's).
pub fn peer_spiffe_id(certs: &[CertificateDer<'_>]) -> Option<String> {
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::SubjectAltName;
    let cert = x509_cert::Certificate::from_der(certs.first()?.as_ref()).ok()?;
    let (_, san) = cert
        .tbs_certificate
        .get::<SubjectAltName>()
        .ok()
        .flatten()?;
    san.0.iter().find_map(|n| match n {
        GeneralName::UniformResourceIdentifier(u) if u.as_str().starts_with("spiffe://") => {
            Some(u.as_str().to_string())
        }
        _ => None,
    })
}

fn roots_from_pem(pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let c = c.map_err(|e| TlsError::Certificate(e.to_string()))?;
        roots.add(c)?;
    }
    Ok(roots)
}

/// Run a blocking call from wherever rustls calls us: a plain thread, or a tokio worker.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// One HTTP/1.1 request over the agent socket, on this thread: status and body.
fn call(
    socket: &PathBuf,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, Vec<u8>), Error> {
    let connect = |source| Error::Connect {
        socket: socket.display().to_string(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(connect)?;
    s.set_read_timeout(Some(CALL_TIMEOUT)).map_err(connect)?;
    s.set_write_timeout(Some(CALL_TIMEOUT)).map_err(connect)?;
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: tessera\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .and_then(|()| s.write_all(body.as_bytes()))
        .map_err(connect)?;
    let mut resp = Vec::new();
    s.take(1 << 20).read_to_end(&mut resp).map_err(connect)?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| Error::Protocol("no HTTP header in the answer".into()))?;
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| Error::Protocol("no HTTP status in the answer".into()))?;
    let mut body = resp[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body)?;
    }
    if status >= 400 {
        let p: Problem = serde_json::from_slice(&body)
            .map_err(|e| Error::Protocol(format!("status {status}: {e}")))?;
        return Err(Error::Problem(p));
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, Error> {
    let bad = || Error::Protocol("bad chunked body".into());
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .ok_or_else(bad)?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(b.get(..size).ok_or_else(bad)?);
        b = b.get(size + 2..).ok_or_else(bad)?;
    }
}

/// The agent's key, as rustls sees it: P-256, signed by the daemon with the key of the
/// certificate `x5t` names.
#[derive(Debug)]
struct AgentKey {
    socket: PathBuf,
    agent: Option<String>,
    x5t: String,
    /// Shared with the resolver: set when the daemon no longer signs for this certificate.
    stale: Arc<AtomicBool>,
}

impl SigningKey for AgentKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| {
                Box::new(AgentSigner {
                    socket: self.socket.clone(),
                    agent: self.agent.clone(),
                    x5t: self.x5t.clone(),
                    stale: self.stale.clone(),
                }) as Box<dyn Signer>
            })
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

#[derive(Debug)]
struct AgentSigner {
    socket: PathBuf,
    agent: Option<String>,
    x5t: String,
    stale: Arc<AtomicBool>,
}

impl Signer for AgentSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        // The role is in the content itself (RFC 8446 §4.4.3); the daemon checks it again.
        let role = match message.get(64..79) {
            Some(b"TLS 1.3, server") => "server",
            _ => "client",
        };
        let body = serde_json::json!({
            "scheme": "ecdsa_secp256r1_sha256", "role": role,
            "content": STANDARD.encode(message), "agent": self.agent,
            "x5t#S256": self.x5t,
        })
        .to_string();
        let (_, answer) = blocking(|| call(&self.socket, "POST", "/v1/tls/sign", Some(&body)))
            .map_err(|e| {
                // The certificate is dead to the daemon (a session key gone with a restart or
                // a suspension): the next handshake fetches a new one rather than waiting for
                // the half-life renewal.
                if e.problem() == Some(crate::ProblemType::TokenNotAccepted) {
                    self.stale.store(true, Ordering::SeqCst);
                }
                rustls::Error::General(format!("tesserad refused to sign: {e}"))
            })?;
        let v: serde_json::Value = serde_json::from_slice(&answer)
            .map_err(|e| rustls::Error::General(format!("tesserad answer: {e}")))?;
        v["signature"]
            .as_str()
            .and_then(|s| STANDARD.decode(s).ok())
            .ok_or_else(|| rustls::Error::General("tesserad answer has no signature".into()))
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

/// The agent's certificate chain with its daemon-backed key, renewed at half-life so a
/// long-running agent never presents an expired certificate.
#[derive(Debug)]
pub struct AgentCertResolver {
    socket: PathBuf,
    request: CertificateOptions,
    current: Mutex<Current>,
    /// The daemon refused to sign for the current certificate: renew before the next use.
    stale: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    renew_at: SystemTime,
    not_after: SystemTime,
    /// A renewal is under way on some thread: the others present the current certificate.
    renewing: bool,
}

/// How long after a failed renewal or CRL fetch the next attempt waits.
const RETRY: Duration = Duration::from_secs(30);

impl AgentCertResolver {
    /// Fetch the agent's certificate now.
    pub async fn fetch(agent: &Client, opts: &TlsOptions) -> Result<Arc<Self>, TlsError> {
        let mut request = CertificateOptions::default();
        if let Some(a) = &opts.agent {
            request = request.agent(a);
        }
        if let Some(t) = opts.cert_ttl {
            request = request.ttl(t);
        }
        if opts.session_key {
            request = request.session_key();
        }
        let pem = agent.certificate(&request).await?;
        let stale = Arc::new(AtomicBool::new(false));
        let current = Self::load(
            agent.socket().to_path_buf(),
            request.agent.clone(),
            &pem,
            stale.clone(),
        )?;
        Ok(Arc::new(AgentCertResolver {
            socket: agent.socket().to_path_buf(),
            request,
            current: Mutex::new(current),
            stale,
        }))
    }

    fn load(
        socket: PathBuf,
        agent: Option<String>,
        pem: &str,
        stale: Arc<AtomicBool>,
    ) -> Result<Current, TlsError> {
        use x509_cert::der::Decode;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::Certificate("empty chain".into()))?;
        let cert = x509_cert::Certificate::from_der(leaf.as_ref())
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        let v = &cert.tbs_certificate.validity;
        let (nb, na) = (v.not_before.to_system_time(), v.not_after.to_system_time());
        let life = na.duration_since(nb).unwrap_or_default();
        let x5t = crate::verify::x5t_s256(leaf.as_ref());
        let key = Arc::new(CertifiedKey::new(
            chain,
            Arc::new(AgentKey {
                socket,
                agent,
                x5t,
                stale,
            }),
        ));
        Ok(Current {
            key,
            renew_at: nb + life / 2,
            not_after: na,
            renewing: false,
        })
    }

    /// `x5t#S256` of the certificate presented now (renewal changes it: a token bound to the
    /// old one stops working with the new one, so ask again after a renewal).
    pub fn x5t_s256(&self) -> Option<String> {
        let key = self.current()?;
        key.cert
            .first()
            .map(|c| crate::verify::x5t_s256(c.as_ref()))
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let lock = || self.current.lock().unwrap_or_else(|p| p.into_inner());
        let now = SystemTime::now();
        let renew = {
            let mut cur = lock();
            let due = (now >= cur.renew_at || self.stale.load(Ordering::SeqCst)) && !cur.renewing;
            if due {
                // One thread renews; the lock is not held across the call.
                cur.renewing = true;
            }
            due
        };
        if renew {
            let path = self.request.path();
            let renewed = blocking(|| call(&self.socket, "GET", &path, None))
                .map_err(TlsError::from)
                .and_then(|(_, pem)| {
                    Self::load(
                        self.socket.clone(),
                        self.request.agent.clone(),
                        &String::from_utf8_lossy(&pem),
                        self.stale.clone(),
                    )
                });
            let mut cur = lock();
            match renewed {
                Ok(c) => {
                    *cur = c;
                    self.stale.store(false, Ordering::SeqCst);
                }
                Err(e) => {
                    // Keep the current one while it is valid; try again after a pause.
                    cur.renewing = false;
                    cur.renew_at = now + RETRY;
                    // Stale or not, the next attempt waits out the pause.
                    self.stale.store(false, Ordering::SeqCst);
                    tracing_free_log(&format!("certificate renewal failed: {e}"));
                }
            }
        }
        let cur = lock();
        (SystemTime::now() < cur.not_after).then(|| cur.key.clone())
    }
}

/// The SDK has no logger dependency: a failed renewal goes to stderr once per attempt.
fn tracing_free_log(msg: &str) {
    eprintln!("tessera: {msg}");
}

impl ResolvesClientCert for AgentCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        if !sigschemes.contains(&SignatureScheme::ECDSA_NISTP256_SHA256) {
            return None;
        }
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for AgentCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

/// WebPKI client verification against fixed roots and the daemon's CRL, the CRL re-fetched
/// every [`CRL_REFRESH`] so a long-running server refuses a revoked agent's next handshake.
#[derive(Debug)]
struct CrlRefreshingVerifier {
    socket: PathBuf,
    roots: Arc<RootCertStore>,
    inner: Mutex<CrlState>,
    allow_software_keys: bool,
}

#[derive(Debug)]
struct CrlState {
    verifier: Arc<dyn ClientCertVerifier>,
    /// When the CRL is next fetched.
    next: Instant,
    refreshing: bool,
}

impl CrlRefreshingVerifier {
    fn new(
        agent: &Client,
        roots: Arc<RootCertStore>,
        crl_pem: String,
        allow_software_keys: bool,
    ) -> Result<Self, TlsError> {
        let verifier = Self::build(&roots, &crl_pem)?;
        Ok(CrlRefreshingVerifier {
            socket: agent.socket().to_path_buf(),
            roots,
            allow_software_keys,
            inner: Mutex::new(CrlState {
                verifier,
                next: Instant::now() + CRL_REFRESH,
                refreshing: false,
            }),
        })
    }

    fn build(
        roots: &Arc<RootCertStore>,
        crl_pem: &str,
    ) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        let crls: Vec<CertificateRevocationListDer<'static>> =
            CertificateRevocationListDer::pem_slice_iter(crl_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::Certificate(e.to_string()))?;
        if crls.is_empty() {
            return Err(TlsError::Certificate("the daemon sent no CRL".into()));
        }
        // The host CA's CRL covers agent certificates; a fleet CA above it publishes its own
        // (not ours to fetch), so only the client's own certificate is checked, and an
        // out-of-date CRL is refused rather than trusted.
        Ok(
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .with_crls(crls)
                .only_check_end_entity_revocation()
                .enforce_revocation_expiration()
                .build()?,
        )
    }

    fn verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let lock = || self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let refresh = {
            let mut g = lock();
            let due = Instant::now() >= g.next && !g.refreshing;
            if due {
                g.refreshing = true;
            }
            due
        };
        if refresh {
            // One thread fetches, without the lock; the others use the CRL they have (an
            // expired one is refused by the verifier itself: fail closed).
            let fetched = blocking(|| call(&self.socket, "GET", "/v1/crl", None))
                .map_err(|e| e.to_string())
                .and_then(|(_, pem)| {
                    Self::build(&self.roots, &String::from_utf8_lossy(&pem))
                        .map_err(|e| e.to_string())
                });
            let mut g = lock();
            g.refreshing = false;
            match fetched {
                Ok(v) => {
                    g.verifier = v;
                    g.next = Instant::now() + CRL_REFRESH;
                }
                Err(e) => {
                    g.next = Instant::now() + RETRY.min(CRL_REFRESH);
                    tracing_free_log(&format!("cannot refresh the CRL: {e}"));
                }
            }
        }
        Ok(lock().verifier.clone())
    }
}

impl ClientCertVerifier for CrlRefreshingVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .verifier()?
            .verify_client_cert(end_entity, intermediates, now)?;
        check_key_kind(end_entity, self.allow_software_keys)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
