//! The agent API: HTTP/1.1 + JSON over the Unix socket. A thin adapter: each connection's
//! peer is taken from the kernel at accept time ([`Peer`]), each request re-identified, and
//! everything else is the [`Credentials`] pipeline's. Limits: connections served at once and
//! per uid, header read timeout, a deadline on the whole request, body size.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use serde_json::json;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

use crate::caller::Peer;
use crate::credentials::problem::{Kind, Problem};
use crate::credentials::proof::ProofRequest;
use crate::credentials::tls::TlsSignRequest;
use crate::credentials::{Credentials, TokenRequest};
use crate::doors::limits::PerUid;
use crate::doors::problem::problem_response;
use crate::doors::SharedSettings;

pub(crate) type Resp = Response<Full<Bytes>>;

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Resp {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn pem_response(content_type: &'static str, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    max: usize,
) -> Result<T, Problem> {
    let too_large = || {
        Problem::new(
            Kind::BodyTooLarge,
            format!("request body is larger than {max} bytes"),
        )
    };
    if let Some(len) = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > max {
            return Err(too_large());
        }
    }
    let body = Limited::new(req.into_body(), max)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large()
            } else {
                Problem::new(Kind::MalformedRequest, format!("cannot read body: {e}"))
            }
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        Problem::new(
            Kind::MalformedRequest,
            format!("request body is not valid JSON for this endpoint: {e}"),
        )
    })
}

/// Query parameter `name` from a request URI, percent-decoded (`None` when absent or not
/// UTF-8 once decoded).
pub fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        if k != name {
            return None;
        }
        percent_encoding::percent_decode_str(v)
            .decode_utf8()
            .ok()
            .map(|v| v.into_owned())
    })
}

async fn route(
    svc: Arc<Credentials>,
    settings: SharedSettings,
    peer: Arc<Peer>,
    req: Request<Incoming>,
) -> Result<Resp, Problem> {
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/v1/health") => Ok(json_response(
            StatusCode::OK,
            &json!({"status": "ok", "backend": svc.backend_name()}),
        )),
        (Method::GET, "/v1/jwks") => Ok(json_response(StatusCode::OK, &svc.jwks())),
        (Method::GET, "/v1/whoami") => {
            let caller = svc.identify(peer).await?;
            let wanted = query_param(&req, "agent");
            Ok(json_response(
                StatusCode::OK,
                &svc.whoami(&caller, wanted.as_deref())?,
            ))
        }
        (Method::POST, "/v1/token") => {
            let max = crate::doors::with(&settings, |s| s.max_body_bytes);
            let caller = svc.identify(peer).await?;
            let body: TokenRequest = match read_json(req, max).await {
                Ok(b) => b,
                // Every refused token request is in the audit trail, malformed ones included.
                Err(p) => return Err(svc.deny(&caller, None, p, json!(null)).await),
            };
            let t = svc.issue_token(&caller, body).await?;
            Ok(json_response(StatusCode::OK, &t))
        }
        (Method::POST, "/v1/proof") => {
            let max = crate::doors::with(&settings, |s| s.max_body_bytes);
            let caller = svc.identify(peer).await?;
            let body: ProofRequest = match read_json(req, max).await {
                Ok(b) => b,
                Err(p) => return Err(svc.deny(&caller, None, p, json!(null)).await),
            };
            let proof = svc.issue_proof(&caller, body).await?;
            Ok(json_response(StatusCode::OK, &proof))
        }
        (Method::POST, "/v1/tls/sign") => {
            let max = crate::doors::with(&settings, |s| s.max_body_bytes);
            let caller = svc.identify(peer).await?;
            let body: TlsSignRequest = match read_json(req, max).await {
                Ok(b) => b,
                Err(p) => return Err(svc.deny(&caller, None, p, json!(null)).await),
            };
            Ok(json_response(
                StatusCode::OK,
                &svc.sign_tls(&caller, body).await?,
            ))
        }
        (Method::GET, "/v1/certificate") => {
            let caller = svc.identify(peer).await?;
            let chain = svc
                .issue_certificate(
                    &caller,
                    query_param(&req, "agent").as_deref(),
                    query_param(&req, "ttl").as_deref(),
                    query_param(&req, "key").as_deref(),
                )
                .await?;
            Ok(pem_response("application/pem-certificate-chain", chain))
        }
        (Method::GET, "/v1/bundle") => match query_param(&req, "format").as_deref() {
            None | Some("pem") => Ok(pem_response(
                "application/pem-certificate-chain",
                svc.bundle_pem()?,
            )),
            Some("spiffe") => Ok(json_response(StatusCode::OK, &svc.spiffe_bundle()?)),
            Some(_) => Err(Problem::new(
                Kind::MalformedRequest,
                "format is \"pem\" (default) or \"spiffe\"",
            )),
        },
        (Method::GET, "/v1/wit") => {
            let caller = svc.identify(peer).await?;
            let wit = svc
                .issue_wit(&caller, query_param(&req, "agent").as_deref())
                .await?;
            Ok(json_response(StatusCode::OK, &wit))
        }
        (Method::GET, "/v1/crl") => {
            Ok(pem_response("application/x-pem-file", svc.crl_pem().await?))
        }
        (Method::GET, "/v1/attestation") => {
            let caller = svc.identify(peer).await?;
            let body = svc
                .attestation(
                    &caller,
                    query_param(&req, "agent").as_deref(),
                    query_param(&req, "nonce").as_deref(),
                )
                .await?;
            Ok(json_response(StatusCode::OK, &body))
        }
        (
            _,
            "/v1/health" | "/v1/jwks" | "/v1/whoami" | "/v1/token" | "/v1/proof" | "/v1/wit"
            | "/v1/tls/sign" | "/v1/certificate" | "/v1/bundle" | "/v1/crl" | "/v1/attestation",
        ) => Err(Problem::new(
            Kind::MethodNotAllowed,
            format!("{} is not allowed on {path}", req.method()),
        )),
        _ => Err(Problem::new(Kind::NotFound, format!("no endpoint {path}"))),
    }
}

/// Serve until `shutdown` resolves, then drain open connections (bounded by `drain`).
pub async fn serve(
    svc: Arc<Credentials>,
    settings: SharedSettings,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let (max_connections, header_timeout) = {
        let s = crate::doors::read(&settings);
        (s.max_connections, s.header_read_timeout)
    };
    let slots = Arc::new(Semaphore::new(max_connections));
    let per_uid = PerUid::default();
    // Every byte of a request must come from the process that connected.
    if let Err(e) = crate::caller::pass_credentials(&listener) {
        tracing::error!(error = %e, "cannot enable sender credentials on the socket; refusing to serve");
        return;
    }
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        // Take a slot before accepting: excess clients wait in the kernel backlog.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let peer = match Peer::from_socket(&stream) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "dropping connection without peer credentials");
                continue;
            }
        };
        // Connections queued before the listener passed credentials get it now.
        if let Err(e) = crate::caller::pass_credentials(&stream) {
            tracing::warn!(error = %e, "dropping a connection that cannot pass credentials");
            continue;
        }
        // One uid cannot hold every slot: past its share, its new connections are closed.
        let cap = crate::doors::with(&settings, |s| s.per_uid_connections);
        let Some(uid_slot) = per_uid.take(peer.uid, cap) else {
            tracing::debug!(
                uid = peer.uid,
                cap,
                "closing a connection over the per-uid cap"
            );
            continue;
        };
        let svc = svc.clone();
        let settings = settings.clone();
        let watcher = graceful.watcher();
        // Everything that may block (reading /proc) happens in the connection's own task,
        // never in this accept loop.
        tokio::spawn(async move {
            let peer = match tokio::task::spawn_blocking(move || peer.snapshot_exe()).await {
                Ok(p) => Arc::new(p),
                Err(_) => return,
            };
            let peer_for_io = peer.clone();
            let service = service_fn(move |req| {
                let svc = svc.clone();
                let settings = settings.clone();
                let peer = peer.clone();
                async move {
                    // The whole request, body included, within the deadline: a client that
                    // announces a body and never sends it holds its slot only this long.
                    let deadline = crate::doors::with(&settings, |s| s.request_deadline);
                    let resp = match tokio::time::timeout(deadline, route(svc, settings, peer, req))
                        .await
                    {
                        Ok(Ok(r)) => r,
                        Ok(Err(p)) => problem_response(&p),
                        Err(_) => {
                            let mut r = problem_response(&Problem::new(
                                Kind::RequestTimeout,
                                format!("the request did not complete within {deadline:?}"),
                            ));
                            // The rest of the request is not read: the connection ends.
                            r.headers_mut()
                                .insert(CONNECTION, HeaderValue::from_static("close"));
                            r
                        }
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(
                    TokioIo::new(crate::caller::SenderChecked::new(stream, &peer_for_io)),
                    service,
                );
            let _ = watcher.watch(conn).await;
            drop(uid_slot);
            drop(permit);
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(drain) => tracing::warn!("connections still open after drain timeout"),
    }
}
