//! Federation: trade a fresh tessera assertion for a relying party's access token, in the
//! agent's own process (the daemon makes no outbound calls).
//!
//! - RFC 7523 JWT bearer grant (`grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`,
//!   `assertion=<token>`), form-encoded;
//! - RFC 8693 token exchange (`subject_token`, `subject_token_type=…:jwt`), form-encoded;
//! - the Claude API's `POST /v1/oauth/token`: the jwt-bearer grant as a JSON body with its
//!   `federation_rule_id`, `organization_id`, `service_account_id` and `workspace_id`.
//!
//! Every exchange asks the daemon for a new assertion (a relying party takes each `jti`
//! once). [`Exchanger`] caches the access token: it refreshes ahead of expiry (advisory
//! [`ADVISORY_REFRESH`] before, when a failure still returns the cached token; mandatory
//! [`MANDATORY_REFRESH`] before, when a failure is the caller's). Server certificates are
//! checked against the system roots (`SSL_CERT_FILE` / `SSL_CERT_DIR` are honoured).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::{Client, TokenOptions};

pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The one audience Microsoft Entra federated identity credentials take.
pub const ENTRA_AUDIENCE: &str = "api://AzureADTokenExchange";

/// Refresh this long before expiry; a failure then still hands out the cached token.
pub const ADVISORY_REFRESH: Duration = Duration::from_secs(120);
/// Refresh this long before expiry; a failure then is an error.
pub const MANDATORY_REFRESH: Duration = Duration::from_secs(30);
/// The longest access-token lifetime believed from `expires_in` (seconds).
pub const MAX_LIFETIME: u64 = 30 * 24 * 3600;
/// The largest token endpoint answer read.
const MAX_ANSWER: usize = 1 << 20;
/// Connect, TLS, request and answer together.
const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("no assertion from tesserad: {0}")]
    Assertion(#[from] crate::Error),
    #[error("token endpoint {0}")]
    Endpoint(String),
    #[error("cannot reach the token endpoint: {0}")]
    Transport(String),
    /// The endpoint answered with an error (RFC 6749 §5.2 `error`, when it sent one).
    #[error("token endpoint refused ({status}): {error}{}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Refused {
        status: u16,
        error: String,
        description: Option<String>,
        body: String,
    },
    #[error("unexpected answer from the token endpoint: {0}")]
    Answer(String),
}

/// Which grant the token endpoint takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// RFC 7523 §2.1.
    JwtBearer,
    /// RFC 8693.
    TokenExchange,
    /// RFC 7523 §2.2: the assertion authenticates the client of a `client_credentials` grant
    /// (`client_assertion`; Microsoft Entra federated identity credentials).
    ClientAssertion,
}

/// How the request body is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/x-www-form-urlencoded` (RFC 6749).
    Form,
    /// `application/json` (the Claude API).
    Json,
}

/// One token endpoint and what to send it.
#[derive(Debug, Clone)]
pub struct ExchangeOptions {
    pub token_endpoint: String,
    /// The assertion's `aud` (default: the token endpoint URL). Must be allowed by the
    /// agent's `audiences`.
    pub audience: Option<String>,
    pub grant: Grant,
    pub body: BodyFormat,
    /// Extra members of the request (`scope`, `audience`, `resource`, `federation_rule_id`…).
    pub params: Vec<(String, String)>,
    /// Scopes and lifetime of the assertion itself.
    pub assertion_scopes: Vec<String>,
    pub assertion_ttl: Option<String>,
    /// Which agent, when this process matches several.
    pub agent: Option<String>,
    /// Ask for a DPoP-bound assertion and send a DPoP proof for the token endpoint (agents
    /// with `require_binding`; the endpoint must accept DPoP).
    pub dpop: bool,
}

impl ExchangeOptions {
    /// RFC 7523 JWT bearer grant, form-encoded.
    pub fn jwt_bearer(token_endpoint: impl Into<String>) -> ExchangeOptions {
        ExchangeOptions {
            token_endpoint: token_endpoint.into(),
            audience: None,
            grant: Grant::JwtBearer,
            body: BodyFormat::Form,
            params: vec![],
            assertion_scopes: vec![],
            assertion_ttl: None,
            agent: None,
            dpop: false,
        }
    }

    /// RFC 8693 token exchange (subject token: the tessera assertion), form-encoded.
    pub fn token_exchange(token_endpoint: impl Into<String>) -> ExchangeOptions {
        ExchangeOptions {
            grant: Grant::TokenExchange,
            ..Self::jwt_bearer(token_endpoint)
        }
    }

    /// The Claude API (`https://api.anthropic.com/v1/oauth/token`, audience
    /// `https://api.anthropic.com`): a JSON jwt-bearer request naming the federation rule,
    /// the organisation and the service account (and the workspace, when given).
    pub fn anthropic(
        federation_rule_id: &str,
        organization_id: &str,
        service_account_id: &str,
        workspace_id: Option<&str>,
    ) -> ExchangeOptions {
        let mut o = ExchangeOptions {
            audience: Some(ANTHROPIC_AUDIENCE.into()),
            body: BodyFormat::Json,
            ..Self::jwt_bearer(ANTHROPIC_TOKEN_ENDPOINT)
        };
        o.params = vec![
            ("federation_rule_id".into(), federation_rule_id.into()),
            ("organization_id".into(), organization_id.into()),
            ("service_account_id".into(), service_account_id.into()),
        ];
        if let Some(w) = workspace_id {
            o.params.push(("workspace_id".into(), w.into()));
        }
        o
    }

    pub fn param(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.params.push((k.into(), v.into()));
        self
    }

    /// The assertion's `aud`: the audience given, else the token endpoint.
    pub fn assertion_audience(&self) -> &str {
        self.audience.as_deref().unwrap_or(&self.token_endpoint)
    }

    /// The request body for `assertion`, and its content type.
    pub fn request_body(&self, assertion: &str) -> (Vec<u8>, &'static str) {
        let mut fields: Vec<(String, String)> = match self.grant {
            Grant::JwtBearer => vec![
                ("grant_type".into(), JWT_BEARER.into()),
                ("assertion".into(), assertion.into()),
            ],
            Grant::TokenExchange => vec![
                ("grant_type".into(), TOKEN_EXCHANGE.into()),
                ("subject_token".into(), assertion.into()),
                ("subject_token_type".into(), JWT_TOKEN_TYPE.into()),
            ],
            Grant::ClientAssertion => vec![
                ("grant_type".into(), "client_credentials".into()),
                ("client_assertion_type".into(), CLIENT_ASSERTION_TYPE.into()),
                ("client_assertion".into(), assertion.into()),
            ],
        };
        // A parameter naming a grant member replaces it; parameters given several times
        // (RFC 8693 `resource`, `audience`) are all sent.
        fields.retain(|(f, _)| !self.params.iter().any(|(k, _)| k == f));
        fields.extend(self.params.iter().cloned());
        match self.body {
            BodyFormat::Form => {
                let mut s = url::form_urlencoded::Serializer::new(String::new());
                for (k, v) in &fields {
                    s.append_pair(k, v);
                }
                (s.finish().into_bytes(), "application/x-www-form-urlencoded")
            }
            BodyFormat::Json => {
                let m: serde_json::Map<String, Value> =
                    fields.into_iter().map(|(k, v)| (k, json!(v))).collect();
                (
                    serde_json::to_vec(&Value::Object(m)).unwrap_or_default(),
                    "application/json",
                )
            }
        }
    }
}

pub const ANTHROPIC_TOKEN_ENDPOINT: &str = "https://api.anthropic.com/v1/oauth/token";
pub const ANTHROPIC_AUDIENCE: &str = "https://api.anthropic.com";

/// An access token from the endpoint.
#[derive(Debug, Clone)]
pub struct AccessToken {
    pub access_token: String,
    pub token_type: Option<String>,
    /// From `expires_in` when the endpoint sent it.
    pub expires_at: Option<SystemTime>,
    /// The endpoint's whole answer.
    pub response: Value,
}

impl AccessToken {
    fn left(&self, now: SystemTime) -> Option<Duration> {
        self.expires_at
            .map(|e| e.duration_since(now).unwrap_or(Duration::ZERO))
    }
}

/// One exchange: a fresh assertion from the daemon, posted to the endpoint.
pub async fn exchange(
    agent: &Client,
    opts: &ExchangeOptions,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<AccessToken, ExchangeError> {
    let endpoint = check_endpoint(&opts.token_endpoint)?;
    let assertion = agent
        .token(&TokenOptions {
            audience: opts.assertion_audience().to_string(),
            scopes: opts.assertion_scopes.clone(),
            ttl: opts.assertion_ttl.clone(),
            agent: opts.agent.clone(),
            bind: opts.dpop.then(|| "dpop".to_string()),
            x5t_s256: None,
        })
        .await?;
    // RFC 9449 §5: a proof for the token request itself, with no access token to hash.
    let dpop = if opts.dpop {
        let mut htu = endpoint.clone();
        htu.set_query(None);
        let mut o = crate::DpopOptions::new("POST", htu.as_str());
        o.agent = opts.agent.clone();
        Some(agent.dpop_proof(&o).await?.proof)
    } else {
        None
    };
    let (body, content_type) = opts.request_body(&assertion.token);
    let (status, answer) = tokio::time::timeout(
        DEADLINE,
        post(&endpoint, content_type, body, dpop, tls.clone()),
    )
    .await
    .map_err(|_| ExchangeError::Transport(format!("no answer within {DEADLINE:?}")))??;
    let now = SystemTime::now();
    parse_answer(status, &answer, now)
}

/// RFC 6749 §5.1 / §5.2: the access token and its lifetime, or the endpoint's refusal.
pub fn parse_answer(
    status: u16,
    body: &[u8],
    now: SystemTime,
) -> Result<AccessToken, ExchangeError> {
    let text = String::from_utf8_lossy(body).into_owned();
    let v: Option<Value> = serde_json::from_slice(body).ok();
    if !(200..300).contains(&status) {
        let error = v
            .as_ref()
            .and_then(|v| v["error"].as_str())
            .unwrap_or("no error code")
            .to_string();
        let description = v
            .as_ref()
            .and_then(|v| v["error_description"].as_str())
            .map(str::to_string);
        return Err(ExchangeError::Refused {
            status,
            error,
            description,
            body: text.chars().take(2000).collect(),
        });
    }
    let v = v.ok_or_else(|| ExchangeError::Answer("not JSON".into()))?;
    let access_token = v["access_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ExchangeError::Answer("no access_token".into()))?
        .to_string();
    let secs = match &v["expires_in"] {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
        }),
        Value::String(s) => s.parse::<u64>().ok(),
        _ => None,
    };
    // An endpoint's number is not trusted to be sane: at most MAX_LIFETIME is believed (and a
    // huge one must not overflow the clock).
    let expires_at = secs.and_then(|s| now.checked_add(Duration::from_secs(s.min(MAX_LIFETIME))));
    Ok(AccessToken {
        access_token,
        token_type: v["token_type"].as_str().map(str::to_string),
        expires_at,
        response: v,
    })
}

/// An access token kept and refreshed ahead of its expiry.
pub struct Exchanger {
    agent: Client,
    opts: ExchangeOptions,
    tls: Arc<rustls::ClientConfig>,
    cached: tokio::sync::Mutex<Option<AccessToken>>,
}

impl Exchanger {
    pub fn new(agent: Client, opts: ExchangeOptions, tls: Arc<rustls::ClientConfig>) -> Exchanger {
        Exchanger {
            agent,
            opts,
            tls,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// The cached token while it has more than [`ADVISORY_REFRESH`] left; else a new one.
    /// Between the advisory and the mandatory margins a failed refresh returns the cached
    /// token; past the mandatory margin it is an error. A token without `expires_in` is
    /// never cached.
    pub async fn access_token(&self) -> Result<AccessToken, ExchangeError> {
        let mut cached = self.cached.lock().await;
        let now = SystemTime::now();
        let left = cached.as_ref().and_then(|t| t.left(now));
        match (cached.as_ref(), left) {
            (Some(t), Some(l)) if l > ADVISORY_REFRESH => return Ok(t.clone()),
            _ => {}
        }
        match exchange(&self.agent, &self.opts, &self.tls).await {
            Ok(t) => {
                *cached = t.expires_at.is_some().then(|| t.clone());
                Ok(t)
            }
            Err(e) => match (cached.as_ref(), left) {
                (Some(t), Some(l)) if l > MANDATORY_REFRESH => Ok(t.clone()),
                _ => Err(e),
            },
        }
    }

    /// Forget the cached token (the relying party refused it).
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }
}

/// A TLS client config with the system's roots (honouring `SSL_CERT_FILE`/`SSL_CERT_DIR`).
pub fn system_tls() -> Result<Arc<rustls::ClientConfig>, ExchangeError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(ExchangeError::Transport(format!(
            "no trusted root certificates found ({} errors)",
            found.errors.len()
        )));
    }
    tls_with_roots(roots)
}

/// A TLS client config trusting only the CA certificates in `pem` (an internal token
/// service's own CA).
pub fn tls_with_roots_pem(pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, ExchangeError> {
    let text = std::str::from_utf8(pem)
        .map_err(|_| ExchangeError::Transport("CA file is not PEM text".into()))?;
    let certs = crate::pem::certificates(text)
        .map_err(|e| ExchangeError::Transport(format!("CA file: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        use x509_cert::der::Encode as _;
        let der = c
            .to_der()
            .map_err(|e| ExchangeError::Transport(format!("CA file: {e}")))?;
        roots
            .add(der.into())
            .map_err(|e| ExchangeError::Transport(format!("CA file: {e}")))?;
    }
    tls_with_roots(roots)
}

fn tls_with_roots(
    roots: rustls::RootCertStore,
) -> Result<Arc<rustls::ClientConfig>, ExchangeError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ExchangeError::Transport(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `https`, or `http` to a loopback address (local test servers), no user info or fragment.
fn check_endpoint(s: &str) -> Result<url::Url, ExchangeError> {
    let bad = |why: &str| ExchangeError::Endpoint(format!("{s:?}: {why}"));
    let u = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
    let loopback = match u.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    };
    match u.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => return Err(bad("must be https (or http to loopback)")),
    }
    if u.host_str().is_none() {
        return Err(bad("has no host"));
    }
    if !u.username().is_empty() || u.password().is_some() || u.fragment().is_some() {
        return Err(bad("must not carry user info or a fragment"));
    }
    Ok(u)
}

async fn post(
    url: &url::Url,
    content_type: &str,
    body: Vec<u8>,
    dpop: Option<String>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(u16, Vec<u8>), ExchangeError> {
    let transport = |e: &dyn std::fmt::Display| ExchangeError::Transport(e.to_string());
    let host = url
        .host_str()
        .ok_or_else(|| ExchangeError::Endpoint("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url.port_or_known_default().unwrap_or(443);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| transport(&format!("{host}:{port}: {e}")))?;
    let mut path = url.path().to_string();
    if let Some(q) = url.query() {
        path = format!("{path}?{q}");
    }
    let authority = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_string(),
    };
    let mut req = hyper::Request::post(path);
    if let Some(p) = dpop {
        req = req.header("dpop", p);
    }
    let req = req
        .header("host", authority)
        .header("content-type", content_type)
        .header("accept", "application/json")
        .header("user-agent", concat!("tessera/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| transport(&e))?;
    if url.scheme() == "https" {
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| transport(&format!("server name {host:?}: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| transport(&format!("TLS with {host}: {e}")))?;
        send(stream, req).await
    } else {
        send(tcp, req).await
    }
}

async fn send<S>(
    stream: S,
    req: hyper::Request<Full<Bytes>>,
) -> Result<(u16, Vec<u8>), ExchangeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let transport = |e: &dyn std::fmt::Display| ExchangeError::Transport(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| transport(&e))?;
    let driver = tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| transport(&e))?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| transport(&format!("reading the answer: {e}")))?
        .to_bytes()
        .to_vec();
    driver.abort();
    Ok((status, body))
}

/// Seconds since the epoch (for callers printing `expires_at`).
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_follow_the_grants() {
        let (b, ct) = ExchangeOptions::jwt_bearer("https://as.example/token")
            .param("scope", "a b")
            .request_body("A.B.C");
        assert_eq!(ct, "application/x-www-form-urlencoded");
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=A.B.C&scope=a+b"
        );
        let (b, _) = ExchangeOptions::token_exchange("https://as.example/token")
            .param("audience", "x")
            .request_body("A.B.C");
        let form: Vec<(String, String)> = url::form_urlencoded::parse(&b).into_owned().collect();
        assert!(form.contains(&("subject_token".into(), "A.B.C".into())));
        let mut ca = ExchangeOptions::jwt_bearer("https://login.example/token");
        ca.grant = Grant::ClientAssertion;
        let (b, _) = ca.param("client_id", "app").request_body("A.B.C");
        let f: Vec<(String, String)> = url::form_urlencoded::parse(&b).into_owned().collect();
        assert!(f.contains(&("grant_type".into(), "client_credentials".into())));
        assert!(f.contains(&("client_assertion".into(), "A.B.C".into())));
        assert!(f.contains(&("client_assertion_type".into(), CLIENT_ASSERTION_TYPE.into())));
        assert!(form.contains(&("subject_token_type".into(), JWT_TOKEN_TYPE.into())));
        assert!(form.contains(&("grant_type".into(), TOKEN_EXCHANGE.into())));
        let o = ExchangeOptions::anthropic("fdrl_1", "org", "svac_1", Some("wrkspc_1"));
        assert_eq!(o.assertion_audience(), ANTHROPIC_AUDIENCE);
        let (b, ct) = o.request_body("A.B.C");
        assert_eq!(ct, "application/json");
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["grant_type"], JWT_BEARER);
        assert_eq!(v["assertion"], "A.B.C");
        assert_eq!(v["federation_rule_id"], "fdrl_1");
        assert_eq!(v["workspace_id"], "wrkspc_1");
    }

    #[test]
    fn answers_and_refusals_are_read() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let t = parse_answer(
            200,
            br#"{"access_token":"at","token_type":"Bearer","expires_in":600}"#,
            now,
        )
        .unwrap();
        assert_eq!(t.access_token, "at");
        assert_eq!(t.expires_at, Some(now + Duration::from_secs(600)));
        match parse_answer(
            400,
            br#"{"error":"invalid_grant","error_description":"jti replayed"}"#,
            now,
        ) {
            Err(ExchangeError::Refused {
                status: 400,
                error,
                description,
                ..
            }) => {
                assert_eq!(error, "invalid_grant");
                assert_eq!(description.as_deref(), Some("jti replayed"));
            }
            other => panic!("{other:?}"),
        }
        for huge in [
            &b"1e300"[..],
            b"18446744073709551615",
            b"\"99999999999999999999\"",
        ] {
            let body = [&br#"{"access_token":"at","expires_in":"#[..], huge, b"}"].concat();
            let t = parse_answer(200, &body, now).unwrap();
            let limit = now + Duration::from_secs(MAX_LIFETIME);
            assert!(t.expires_at.is_none_or(|e| e <= limit), "{huge:?}");
        }
        assert!(parse_answer(200, b"{}", now).is_err());
        assert!(parse_answer(200, b"<html>", now).is_err());
    }

    #[test]
    fn endpoints_are_https_or_loopback_http() {
        assert!(check_endpoint("https://as.example/token").is_ok());
        assert!(check_endpoint("http://127.0.0.1:8080/token").is_ok());
        assert!(check_endpoint("http://as.example/token").is_err());
        assert!(check_endpoint("https://u:p@as.example/token").is_err());
        assert!(check_endpoint("ftp://as.example/").is_err());
    }
}
