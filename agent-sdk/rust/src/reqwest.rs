//! Send a [`reqwest`] request with a DPoP-bound token: each send gets a fresh proof from
//! tesserad for its method and URL, and a resource server that answers 401 `use_dpop_nonce`
//! with a `DPoP-Nonce` (RFC 9449 §9) gets one retry carrying that nonce. A redirect the
//! reqwest client follows carries the proof made for the first URL, which a relying party
//! elsewhere refuses (`htu`); build the client with `redirect::Policy::none()` to handle
//! redirects yourself.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tessera::reqwest::SendError> {
//! let agent = tessera::Client::from_env();
//! let token = agent
//!     .token(&tessera::TokenOptions::new("https://api.example.com").bind_dpop())
//!     .await?
//!     .token;
//! let http = reqwest::Client::new();
//! let resp = tessera::reqwest::send_with_dpop(
//!     &agent,
//!     http.get("https://api.example.com/v1/orders?limit=10"),
//!     &token,
//! )
//! .await?;
//! println!("{}", resp.status());
//! # Ok(()) }
//! ```

use reqwest::header::{HeaderName, HeaderValue};

use crate::{Client, Error};

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Tessera(#[from] Error),
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    #[error("{0}")]
    Request(String),
}

/// Send `req` with `Authorization: DPoP <token>` and a `DPoP` proof made for it.
pub async fn send_with_dpop(
    tessera: &Client,
    req: reqwest::RequestBuilder,
    token: &str,
) -> Result<reqwest::Response, SendError> {
    let (http, req) = req.build_split();
    let req = req?;
    let mut nonce: Option<String> = None;
    loop {
        let mut r = req.try_clone().ok_or_else(|| {
            SendError::Request("a streaming body cannot be sent with a DPoP retry".into())
        })?;
        let headers = tessera
            .dpop_headers(
                r.method().as_str(),
                r.url().as_str(),
                token,
                nonce.as_deref(),
            )
            .await?;
        for (name, value) in headers {
            let v = HeaderValue::from_str(&value)
                .map_err(|e| SendError::Request(format!("header {name}: {e}")))?;
            r.headers_mut().insert(HeaderName::from_static(name), v);
        }
        let resp = http.execute(r).await?;
        match asked_nonce(&resp) {
            // Once: a server that keeps asking gets its answer back to the caller.
            Some(n) if nonce.is_none() => nonce = Some(n),
            _ => return Ok(resp),
        }
    }
}

/// The nonce a resource server requires (RFC 9449 §9): a 401 whose `WWW-Authenticate`
/// lines include a DPoP `use_dpop_nonce` challenge, with a `DPoP-Nonce` header. (An
/// authorization server's 400 is left to the caller: its reason is in the body.)
fn asked_nonce(resp: &reqwest::Response) -> Option<String> {
    if resp.status().as_u16() != 401 {
        return None;
    }
    let challenged = resp
        .headers()
        .get_all("www-authenticate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.trim_start()
                .get(..5)
                .is_some_and(|s| s.eq_ignore_ascii_case("dpop "))
                && v.contains("use_dpop_nonce")
        });
    if !challenged {
        return None;
    }
    resp.headers()
        .get("dpop-nonce")?
        .to_str()
        .ok()
        .map(str::to_string)
}
