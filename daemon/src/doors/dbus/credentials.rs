//! `org.tessera.Tessera1.Credentials`: what an agent may ask over the bus; the caller is the
//! bus's answer about the sender, never an argument.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;
use zbus::message::Header;
use zbus::zvariant::{OwnedValue, Value};
use zbus::{interface, Connection};

use super::{dict_to_json, json_to_dict, owned, Ctx, TesseraError};
use crate::credentials::proof::ProofRequest;
use crate::credentials::TokenRequest;

pub struct Credentials(pub(super) Arc<Ctx>);

impl Credentials {
    /// `GetToken` and `GetBoundToken`: the socket's token pipeline for the bus's caller.
    async fn token(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
        audience: String,
        scopes: Vec<String>,
        ttl_seconds: u64,
        bind: Option<String>,
    ) -> Result<(String, u64), TesseraError> {
        let caller = self.0.caller(conn, hdr).await?;
        let req = TokenRequest {
            audience,
            scopes,
            ttl: (ttl_seconds > 0).then(|| format!("{ttl_seconds}s")),
            agent: None,
            bind,
            x5t_s256: None,
        };
        let t = self
            .0
            .svc
            .issue_token(&caller, req)
            .await
            .map_err(|p| self.0.refusal(p))?;
        Ok((t.token, t.exp as u64))
    }
}

#[interface(name = "org.tessera.Tessera1.Credentials")]
impl Credentials {
    async fn who_am_i(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<HashMap<String, OwnedValue>, TesseraError> {
        let caller = self.0.caller(conn, &hdr).await?;
        let w = self
            .0
            .svc
            .whoami(&caller, None)
            .map_err(|p| self.0.refusal(p))?;
        let mut m = json_to_dict(&w.policy);
        m.insert("name".into(), owned(Value::from(w.name.as_str())));
        m.insert("id".into(), owned(Value::from(w.id.as_str())));
        m.insert(
            "status".into(),
            owned(Value::from(json!(w.status).as_str().unwrap_or(""))),
        );
        m.insert(
            "key_id".into(),
            owned(Value::from(w.key_id.unwrap_or_default().as_str())),
        );
        Ok(m)
    }

    /// `ttl_seconds` 0 means the default TTL. Returns the token and its `exp` (Unix seconds).
    async fn get_token(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        audience: String,
        scopes: Vec<String>,
        ttl_seconds: u64,
    ) -> Result<(String, u64), TesseraError> {
        self.token(conn, &hdr, audience, scopes, ttl_seconds, None)
            .await
    }

    /// A sender-constrained token: `bind` is `"dpop"` (RFC 9449 `cnf.jkt` of the agent's
    /// proof key). Returns the token and its `exp`.
    async fn get_bound_token(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        audience: String,
        scopes: Vec<String>,
        ttl_seconds: u64,
        bind: String,
    ) -> Result<(String, u64), TesseraError> {
        self.token(conn, &hdr, audience, scopes, ttl_seconds, Some(bind))
            .await
    }

    /// `POST /v1/proof` over the bus: the same members in, the same members out.
    async fn get_proof(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        request: HashMap<String, OwnedValue>,
    ) -> Result<HashMap<String, OwnedValue>, TesseraError> {
        let caller = self.0.caller(conn, &hdr).await?;
        let body = dict_to_json("proof request", &request)?;
        let req: ProofRequest = serde_json::from_value(body)
            .map_err(|e| TesseraError::InvalidArgs(format!("proof request: {e}")))?;
        let p = self
            .0
            .svc
            .issue_proof(&caller, req)
            .await
            .map_err(|p| self.0.refusal(p))?;
        Ok(json_to_dict(&json!(p)))
    }
}
