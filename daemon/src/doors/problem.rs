//! Refusals on the socket as RFC 9457 problem JSON (`type`, `title`, `status`, `detail`), with
//! `Retry-After` for 429 and 503.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};

use crate::credentials::problem::Problem;
use crate::doors::socket::Resp;

pub fn problem_response(p: &Problem) -> Resp {
    crate::metrics::refused(p.kind.slug(), "socket");
    let body = serde_json::to_vec(&p.body()).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() =
        StatusCode::from_u16(p.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let Some(s) = p.retry_after {
        if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
            r.headers_mut().insert(RETRY_AFTER, v);
        }
    }
    r
}
