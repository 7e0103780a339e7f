use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::UnixStream;

use crate::error::{Error, Problem};

pub const DEFAULT_SOCKET: &str = "/run/tessera/agent.sock";

/// Client for the local daemon's agent API.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Health {
    pub status: String,
    pub backend: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WhoAmI {
    pub name: String,
    pub id: String,
    pub status: String,
    pub policy: Value,
    #[serde(default)]
    pub key_id: Option<String>,
    /// The kinds of selector that identify the agent (`uid`, `exe`, `unit`, …).
    #[serde(default)]
    pub selectors: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TokenResponse {
    pub token: String,
    pub token_type: String,
    pub expires_at: String,
}

/// What to ask for: an audience, optional scopes and TTL, and which agent if several match.
#[derive(Debug, Clone, Serialize)]
pub struct TokenOptions {
    pub audience: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// `"dpop"`: a token bound to the agent's proof key (`cnf.jkt`, `token_type` `DPoP`);
    /// `"mtls"`: bound to the certificate named by `x5t_s256` (RFC 8705).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    #[serde(rename = "x5t#S256", skip_serializing_if = "Option::is_none")]
    pub x5t_s256: Option<String>,
}

/// A DPoP proof (RFC 9449) for one HTTP request, made and signed by the daemon with the
/// agent's proof key: `htm` the method, `htu` the target URI without query or fragment (its
/// origin and path must be allowed by the agent's `audiences`), and the bound token the request
/// carries (the daemon checks it is this agent's and puts its hash in `ath`).
#[derive(Debug, Clone, Serialize)]
pub struct DpopOptions {
    #[serde(rename = "type")]
    kind: &'static str,
    pub htm: String,
    pub htu: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// `ath` of another issuer's token (for one this daemon issued, give `access_token`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ath: Option<String>,
    /// The server's `DPoP-Nonce`, when it asked for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

impl DpopOptions {
    pub fn new(htm: impl Into<String>, htu: impl Into<String>) -> DpopOptions {
        DpopOptions {
            kind: "dpop",
            htm: htm.into(),
            htu: htu.into(),
            access_token: None,
            ath: None,
            nonce: None,
            agent: None,
        }
    }
    pub fn access_token(mut self, token: impl Into<String>) -> Self {
        self.access_token = Some(token.into());
        self
    }
    pub fn ath(mut self, ath: impl Into<String>) -> Self {
        self.ath = Some(ath.into());
        self
    }
    pub fn nonce(mut self, nonce: impl Into<String>) -> Self {
        self.nonce = Some(nonce.into());
        self
    }
    pub fn agent(mut self, name: impl Into<String>) -> Self {
        self.agent = Some(name.into());
        self
    }
}

/// A WIMSE Workload Proof Token (draft-ietf-wimse-wpt) for a request to `aud`, going with
/// `wit` (from [`Client::wit`]): signed by the daemon with the key the WIT binds.
#[derive(Debug, Clone, Serialize)]
pub struct WptOptions {
    #[serde(rename = "type")]
    kind: &'static str,
    pub aud: String,
    pub wit: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ath: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tth: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oth: Option<std::collections::BTreeMap<String, String>>,
    /// Lifetime, default 60 s, at most 5 min.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

impl WptOptions {
    pub fn new(aud: impl Into<String>, wit: impl Into<String>) -> WptOptions {
        WptOptions {
            kind: "wpt",
            aud: aud.into(),
            wit: wit.into(),
            access_token: None,
            ath: None,
            tth: None,
            oth: None,
            ttl: None,
            agent: None,
        }
    }
    pub fn access_token(mut self, token: impl Into<String>) -> Self {
        self.access_token = Some(token.into());
        self
    }
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(format!("{}s", ttl.as_secs()));
        self
    }
}

/// An RFC 9421 HTTP message signature for one request, made by the daemon with the agent's
/// proof key over a signature base it builds from these parts: `@method` and `@authority`
/// always, `content-digest` when `content_digest` is given, and the `components` asked for
/// (`@target-uri`, `@path`, `@query`, `content-type`, or lower-case names of `headers`).
#[derive(Debug, Clone, Serialize)]
pub struct HttpSignatureOptions {
    #[serde(rename = "type")]
    kind: &'static str,
    pub method: String,
    pub target_uri: String,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_digest: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

impl HttpSignatureOptions {
    pub fn new(method: impl Into<String>, target_uri: impl Into<String>) -> Self {
        HttpSignatureOptions {
            kind: "http-signature",
            method: method.into(),
            target_uri: target_uri.into(),
            headers: Default::default(),
            content_digest: None,
            // The whole target by default: the SDK's verifier requires it, and without it a
            // signature for one path or query would hold for another on the same authority.
            components: vec!["@target-uri".into()],
            agent: None,
        }
    }
    /// Cover a header field (its name is lower-cased).
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        let name = name.to_ascii_lowercase();
        self.headers.insert(name.clone(), value.into());
        self.component(name)
    }
    /// Cover a derived component (`@target-uri`, `@path`, `@query`).
    pub fn component(mut self, c: impl Into<String>) -> Self {
        let c = c.into();
        if !self.components.contains(&c) {
            self.components.push(c);
        }
        self
    }
    /// The `Content-Digest` of the body (RFC 9530), `sha-256=:<base64>:`.
    pub fn content_digest(mut self, d: impl Into<String>) -> Self {
        self.content_digest = Some(d.into());
        self
    }
}

/// The `Signature-Input` and `Signature` header values to send.
#[derive(Debug, Clone, Deserialize)]
pub struct HttpSignature {
    pub signature_input: String,
    pub signature: String,
    /// The signature's `nonce`.
    pub jti: String,
}

/// `GET /v1/wit` answer.
#[derive(Debug, Clone, Deserialize)]
pub struct WitResponse {
    pub wit: String,
    pub expires_at: String,
    pub jti: String,
}

/// `POST /v1/proof` answer.
#[derive(Debug, Clone, Deserialize)]
pub struct ProofResponse {
    pub proof: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub jti: String,
}

/// Which certificate to ask for: a lifetime (at most the agent's limit) and which agent if
/// several match.
#[derive(Debug, Clone, Default)]
pub struct CertificateOptions {
    pub ttl: Option<String>,
    pub agent: Option<String>,
    /// Certify the agent's session key (`?key=session`; policy `proof_key = "session"`)
    /// instead of its hardware identity key.
    pub session_key: bool,
}

impl CertificateOptions {
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(format!("{}s", ttl.as_secs()));
        self
    }
    pub fn agent(mut self, name: impl Into<String>) -> Self {
        self.agent = Some(name.into());
        self
    }
    /// Certify the session key: cheap TLS signatures in memory, a certificate labelled
    /// `tessera-software-key` that lives no longer than the key.
    pub fn session_key(mut self) -> Self {
        self.session_key = true;
        self
    }

    /// `GET` path of this certificate request.
    pub(crate) fn path(&self) -> String {
        let mut q = Vec::new();
        if let Some(t) = &self.ttl {
            q.push(format!("ttl={}", query_value(t)));
        }
        if let Some(a) = &self.agent {
            q.push(format!("agent={}", query_value(a)));
        }
        if self.session_key {
            q.push("key=session".to_string());
        }
        if q.is_empty() {
            "/v1/certificate".to_string()
        } else {
            format!("/v1/certificate?{}", q.join("&"))
        }
    }
}

impl TokenOptions {
    pub fn new(audience: impl Into<String>) -> TokenOptions {
        TokenOptions {
            audience: audience.into(),
            scopes: vec![],
            ttl: None,
            agent: None,
            bind: None,
            x5t_s256: None,
        }
    }
    /// Ask for a DPoP-bound token (RFC 9449): use it with [`Client::dpop_proof`].
    pub fn bind_dpop(mut self) -> Self {
        self.bind = Some("dpop".into());
        self
    }
    /// A token usable only over mTLS with the certificate whose DER SHA-256 is `x5t_s256`
    /// (see [`crate::verify::x5t_s256`]): a certificate the daemon issued to this agent.
    pub fn bind_mtls(mut self, x5t_s256: impl Into<String>) -> Self {
        self.bind = Some("mtls".into());
        self.x5t_s256 = Some(x5t_s256.into());
        self
    }
    pub fn scope(mut self, s: impl Into<String>) -> Self {
        self.scopes.push(s.into());
        self
    }
    /// e.g. `Duration::from_secs(300)`.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(format!("{}s", ttl.as_secs()));
        self
    }
    pub fn agent(mut self, name: impl Into<String>) -> Self {
        self.agent = Some(name.into());
        self
    }
}

impl Client {
    /// `TESSERA_SOCKET`, else the default socket path.
    pub fn from_env() -> Client {
        let socket = std::env::var_os("TESSERA_SOCKET")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        Client::with_socket(socket)
    }

    pub fn with_socket(socket: impl AsRef<Path>) -> Client {
        Client {
            socket: socket.as_ref().to_path_buf(),
            timeout: Duration::from_secs(30),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn health(&self) -> Result<Health, Error> {
        self.call(Method::GET, "/v1/health", None).await
    }

    pub async fn whoami(&self) -> Result<WhoAmI, Error> {
        self.call(Method::GET, "/v1/whoami", None).await
    }

    /// [`Client::whoami`] as agent `agent` when the process matches several.
    pub async fn whoami_agent(&self, agent: Option<&str>) -> Result<WhoAmI, Error> {
        match agent {
            Some(a) => {
                let path = format!("/v1/whoami?agent={}", query_value(a));
                self.call(Method::GET, &path, None).await
            }
            None => self.whoami().await,
        }
    }

    pub async fn token(&self, opts: &TokenOptions) -> Result<TokenResponse, Error> {
        let body = serde_json::to_vec(opts).map_err(|e| Error::Protocol(e.to_string()))?;
        self.call(Method::POST, "/v1/token", Some(body)).await
    }

    /// A DPoP proof for one request (see [`DpopOptions`]).
    pub async fn dpop_proof(&self, opts: &DpopOptions) -> Result<ProofResponse, Error> {
        let body = serde_json::to_vec(opts).map_err(|e| Error::Protocol(e.to_string()))?;
        self.call(Method::POST, "/v1/proof", Some(body)).await
    }

    /// The two headers of one request made with a DPoP-bound `token` (from
    /// [`TokenOptions::bind_dpop`]): `Authorization: DPoP <token>` and `DPoP: <proof>`, the
    /// proof made for `method` and `url` (its query and fragment left out, as RFC 9449 says).
    /// `nonce`: the server's last `DPoP-Nonce`, if it sent one.
    pub async fn dpop_headers(
        &self,
        method: &str,
        url: &str,
        token: &str,
        nonce: Option<&str>,
    ) -> Result<[(&'static str, String); 2], Error> {
        let mut htu = url::Url::parse(url)
            .map_err(|e| Error::Protocol(format!("request URL {url:?}: {e}")))?;
        htu.set_query(None);
        htu.set_fragment(None);
        let mut o = DpopOptions::new(method, htu.as_str()).access_token(token);
        if let Some(n) = nonce {
            o = o.nonce(n);
        }
        let p = self.dpop_proof(&o).await?;
        Ok([
            ("authorization", format!("DPoP {token}")),
            ("dpop", p.proof),
        ])
    }

    /// An RFC 9421 signature for one request (see [`HttpSignatureOptions`]).
    pub async fn http_signature(
        &self,
        opts: &HttpSignatureOptions,
    ) -> Result<HttpSignature, Error> {
        let body = serde_json::to_vec(opts).map_err(|e| Error::Protocol(e.to_string()))?;
        self.call(Method::POST, "/v1/proof", Some(body)).await
    }

    /// A WPT for one request (see [`WptOptions`]).
    pub async fn wpt(&self, opts: &WptOptions) -> Result<ProofResponse, Error> {
        let body = serde_json::to_vec(opts).map_err(|e| Error::Protocol(e.to_string()))?;
        self.call(Method::POST, "/v1/proof", Some(body)).await
    }

    /// A WIMSE Workload Identity Token binding this agent's proof key, signed by the host CA;
    /// `agent` names the agent when this process matches several.
    pub async fn wit(&self, agent: Option<&str>) -> Result<WitResponse, Error> {
        let path = match agent {
            Some(a) => format!("/v1/wit?agent={}", query_value(a)),
            None => "/v1/wit".to_string(),
        };
        self.call(Method::GET, &path, None).await
    }

    /// The SPIFFE trust bundle (`/v1/bundle?format=spiffe`): agent keys (`jwt-svid`), the host
    /// CA key (`wit-svid`) and the trust anchor certificates (`x509-svid`).
    pub async fn spiffe_bundle(&self) -> Result<Value, Error> {
        self.call(Method::GET, "/v1/bundle?format=spiffe", None)
            .await
    }

    /// The daemon's JWKS (every live agent key).
    pub async fn jwks(&self) -> Result<Value, Error> {
        self.call(Method::GET, "/v1/jwks", None).await
    }

    /// A short-lived X.509 certificate for this agent's hardware key: PEM, the agent
    /// certificate first, then the host CA.
    pub async fn certificate(&self, opts: &CertificateOptions) -> Result<String, Error> {
        self.text(&opts.path()).await
    }

    /// The host CA a relying party trusts (PEM).
    pub async fn bundle(&self) -> Result<String, Error> {
        self.text("/v1/bundle").await
    }

    /// The host CA's current CRL (PEM).
    pub async fn crl(&self) -> Result<String, Error> {
        self.text("/v1/crl").await
    }

    /// Key attestation evidence for this agent's key over `nonce` (8 to 64 bytes, chosen by
    /// the relying party). Raw JSON; check it with [`crate::attestation::verify`].
    pub async fn attestation(&self, nonce: &[u8], agent: Option<&str>) -> Result<Value, Error> {
        let hex = hex::encode(nonce);
        let path = match agent {
            Some(a) => format!("/v1/attestation?nonce={hex}&agent={}", query_value(a)),
            None => format!("/v1/attestation?nonce={hex}"),
        };
        self.call(Method::GET, &path, None).await
    }

    async fn text(&self, path: &str) -> Result<String, Error> {
        let bytes = self.checked(Method::GET, path, None).await?;
        String::from_utf8(bytes.to_vec()).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// Raw request: status, headers' Retry-After and body bytes.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Option<u64>, Bytes), Error> {
        let fut = async {
            let stream =
                UnixStream::connect(&self.socket)
                    .await
                    .map_err(|source| Error::Connect {
                        socket: self.socket.display().to_string(),
                        source,
                    })?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| Error::Protocol(e.to_string()))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            // One request per connection, closed by the daemon right after its answer: an
            // idle connection would count against this uid's share of the daemon's slots.
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "tessera")
                .header("connection", "close");
            if body.is_some() {
                req = req.header("content-type", "application/json");
            }
            let req = req
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| Error::Protocol(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| Error::Protocol(e.to_string()))?;
            let status = resp.status().as_u16();
            let retry = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| Error::Protocol(e.to_string()))?
                .to_bytes();
            Ok((status, retry, bytes))
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| Error::Protocol("timed out waiting for tesserad".into()))?
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, Error> {
        let bytes = self.checked(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// The body of a 2xx answer; anything else as [`Error::Problem`].
    async fn checked(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, Error> {
        let (status, retry, bytes) = self.request(method, path, body).await?;
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        match serde_json::from_slice::<Problem>(&bytes) {
            Ok(mut p) => {
                p.retry_after = retry;
                Err(Error::Problem(p))
            }
            Err(_) => Err(Error::Protocol(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&bytes)
            ))),
        }
    }
}

/// A query-string value, percent-encoded so that no value can add a parameter or break the
/// request line (everything but unreserved characters is encoded).
fn query_value(v: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(v, RESERVED).to_string()
}

#[cfg(test)]
mod query_tests {
    #[test]
    fn query_values_cannot_add_parameters() {
        assert_eq!(super::query_value("bot&ttl=999h"), "bot%26ttl%3D999h");
        assert_eq!(super::query_value("1m 30s"), "1m%2030s");
        assert_eq!(super::query_value("research-bot_2"), "research-bot_2");
    }
}
