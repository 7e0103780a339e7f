//! `org.tessera.Tessera1.Manager`: the admin's methods, properties and signals.

use std::collections::HashMap;
use std::sync::Arc;

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{ObjectPath, OwnedObjectPath, OwnedValue, Value};
use zbus::{interface, Connection};

use super::{agent_path, dict_to_json, sync_object, sync_objects, Ctx, TesseraError};
use crate::agents::{Policy, Selectors, Source};

pub struct Manager(pub(super) Arc<Ctx>);

#[interface(name = "org.tessera.Tessera1.Manager")]
impl Manager {
    async fn enroll(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        selectors: HashMap<String, OwnedValue>,
        policy: HashMap<String, OwnedValue>,
    ) -> Result<OwnedObjectPath, TesseraError> {
        let by = self.0.require_admin(conn, &hdr).await?;
        let sel: Selectors = serde_json::from_value(dict_to_json("selector", &selectors)?)
            .map_err(|e| TesseraError::InvalidArgs(format!("selectors: {e}")))?;
        let pol: Policy = serde_json::from_value(dict_to_json("policy", &policy)?)
            .map_err(|e| TesseraError::InvalidArgs(format!("policy: {e}")))?;
        let a = self
            .0
            .svc
            .agents()
            .enroll(&name, sel, pol, Source::Dbus, &by)
            .await?;
        sync_object(conn, &self.0, &a.name).await;
        OwnedObjectPath::try_from(agent_path(&a.name))
            .map_err(|e| TesseraError::Failed(e.to_string()))
    }

    async fn list_agents(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Vec<OwnedObjectPath>, TesseraError> {
        self.0.require_admin(conn, &hdr).await?;
        Ok(self
            .0
            .svc
            .agents()
            .live()
            .iter()
            .filter_map(|a| OwnedObjectPath::try_from(agent_path(&a.name)).ok())
            .collect())
    }

    async fn revoke(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        reason: String,
    ) -> Result<(), TesseraError> {
        let by = self.0.require_admin(conn, &hdr).await?;
        self.0.svc.revoke(&name, &reason, &by).await?;
        sync_object(conn, &self.0, &name).await;
        Ok(())
    }

    async fn suspend(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
    ) -> Result<(), TesseraError> {
        let by = self.0.require_admin(conn, &hdr).await?;
        self.0.svc.agents().set_suspended(&name, true, &by).await?;
        sync_object(conn, &self.0, &name).await;
        Ok(())
    }

    async fn resume(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
    ) -> Result<(), TesseraError> {
        let by = self.0.require_admin(conn, &hdr).await?;
        self.0.svc.agents().set_suspended(&name, false, &by).await?;
        sync_object(conn, &self.0, &name).await;
        Ok(())
    }

    async fn revoke_all(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        reason: String,
    ) -> Result<(), TesseraError> {
        let by = self.0.require_admin(conn, &hdr).await?;
        let res = self.0.svc.revoke_all(&reason, &by).await;
        sync_objects(conn, &self.0).await;
        res?;
        Ok(())
    }

    async fn reload(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), TesseraError> {
        self.0.require_admin(conn, &hdr).await?;
        let report = (self.0.reload)().await.map_err(TesseraError::InvalidArgs)?;
        if report.errors.is_empty() {
            Ok(())
        } else {
            Err(TesseraError::InvalidArgs(report.errors.join("; ")))
        }
    }

    /// PKCS#10 request (PEM) for the host CA key, for a fleet CA to sign. An empty
    /// `common_name` means the host id.
    async fn host_certificate_request(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        common_name: String,
    ) -> Result<String, TesseraError> {
        self.0.require_admin(conn, &hdr).await?;
        let cn = (!common_name.is_empty()).then_some(common_name.as_str());
        Ok(self.0.svc.host_csr(cn).await?)
    }

    /// Install a host CA certificate issued by an external CA (PEM: the host certificate,
    /// then its issuers up to the root). Refused unless it is for the host CA key and the
    /// chain verifies.
    async fn install_host_certificate(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        pem: String,
    ) -> Result<(), TesseraError> {
        let by = self.0.require_admin(conn, &hdr).await?;
        Ok(self.0.svc.install_host_certificate(&pem, &by).await?)
    }

    /// The daemon on one screen (admin): backend and device, agents by status, credentials in
    /// the last hour, audit head and last checkpoint, host CA and CRL expiry, warnings.
    async fn status(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<HashMap<String, OwnedValue>, TesseraError> {
        self.0.require_admin(conn, &hdr).await?;
        let s = self.0.svc.status().await;
        let mut out: HashMap<String, OwnedValue> = HashMap::new();
        let mut put = |k: &str, v: Value<'_>| {
            if let Ok(v) = OwnedValue::try_from(v) {
                out.insert(k.to_string(), v);
            }
        };
        put("version", Value::from(s.version));
        put("backend", Value::from(s.backend));
        put("device", Value::from(s.device.as_str()));
        let agents: HashMap<&str, u64> = s.agents.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        put("agents", Value::from(agents));
        put("destroy_pending", Value::from(s.destroy_pending));
        put("issued_last_hour", Value::from(s.issued_last_hour));
        put("audit_seq", Value::from(s.audit_seq));
        put("checkpoint_seq", Value::from(s.checkpoint_seq));
        put("host_ca_not_after", Value::from(s.host_ca_not_after));
        put("crl_next_update", Value::from(s.crl_next_update));
        put("warnings", Value::from(s.warnings.clone()));
        Ok(out)
    }

    #[zbus(property)]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    #[zbus(property)]
    fn backend(&self) -> String {
        self.0.svc.backend_name().to_string()
    }

    #[zbus(property)]
    fn agent_count(&self) -> u32 {
        self.0.svc.agents().live().len() as u32
    }

    #[zbus(signal)]
    pub(super) async fn agent_enrolled(
        e: &SignalEmitter<'_>,
        name: &str,
        path: ObjectPath<'_>,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    pub(super) async fn agent_revoked(
        e: &SignalEmitter<'_>,
        name: &str,
        reason: &str,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    pub(super) async fn agent_suspended(e: &SignalEmitter<'_>, name: &str) -> zbus::Result<()>;
    #[zbus(signal)]
    pub(super) async fn agent_resumed(e: &SignalEmitter<'_>, name: &str) -> zbus::Result<()>;
}
