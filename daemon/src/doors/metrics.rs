//! The Prometheus scrape endpoint: `GET /metrics` in the text exposition format, on a TCP or
//! Unix listener (`[metrics] listen`, or the `metrics` socket systemd passes). Read-only and
//! about the daemon, never about a caller: no identification, nothing signed, nothing audited.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::credentials::Credentials;
use crate::metrics::METRICS;

/// Where the scrapes come in.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// Values that are read, not counted: set just before each scrape is encoded.
fn refresh(svc: &Credentials) {
    let now = crate::credentials::x509::now_unix();
    if let Ok(counts) = svc.agents().count_by_status() {
        // Every status, absent ones as 0: a gauge not set again would keep its last value
        // (one suspended agent resumed would still show as suspended).
        for status in ["pending", "active", "suspended", "revoked"] {
            let n = counts
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n);
            METRICS
                .agents
                .get_or_create(&vec![("status".to_string(), status.to_string())])
                .set(n as i64);
        }
    }
    if let Ok(ca) = svc.host_ca() {
        METRICS.host_ca_expiry.set(ca.not_after - now);
    }
    let next = svc.crl_next_update();
    if next != 0 {
        METRICS.crl_expiry.set(next - now);
    }
    METRICS.device_queue.set(svc.device_queue_depth() as i64);
}

fn answer(svc: &Credentials, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body, kind) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            refresh(svc);
            (
                StatusCode::OK,
                crate::metrics::encode_text(),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        }
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".to_string(),
            "text/plain",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "try /metrics\n".to_string(),
            "text/plain",
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    r
}

async fn serve_conn<S>(svc: Arc<Credentials>, io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let svc = svc.clone();
        async move { Ok::<_, Infallible>(answer(&svc, &req)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(Duration::from_secs(5))
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(io), service);
    // A scraper is not a caller: a slow or broken one is simply dropped.
    let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
}

/// Serve scrapes until `stop` resolves; at most `max_connections` at once.
pub async fn serve(
    svc: Arc<Credentials>,
    listener: Listener,
    stop: impl std::future::Future<Output = ()>,
    max_connections: usize,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    tokio::pin!(stop);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        tokio::select! {
            _ = &mut stop => return,
            r = accept(&listener) => match r {
                Ok(Accepted::Tcp(s)) => {
                    let svc = svc.clone();
                    tokio::spawn(async move { serve_conn(svc, s).await; drop(permit); });
                }
                Ok(Accepted::Unix(s)) => {
                    let svc = svc.clone();
                    tokio::spawn(async move { serve_conn(svc, s).await; drop(permit); });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> std::io::Result<Accepted> {
    Ok(match l {
        Listener::Tcp(l) => Accepted::Tcp(l.accept().await?.0),
        Listener::Unix(l) => Accepted::Unix(l.accept().await?.0),
    })
}
