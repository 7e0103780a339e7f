//! `org.tessera.Tessera1.Agent`: one object per live agent, its properties and admin methods.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;
use zbus::message::Header;
use zbus::zvariant::OwnedValue;
use zbus::{interface, Connection};

use super::{json_to_dict, sync_object, Ctx, TesseraError};
use crate::agents::Agent;

pub struct AgentObject {
    ctx: Arc<Ctx>,
    name: String,
}

impl AgentObject {
    pub(super) fn new(ctx: Arc<Ctx>, name: String) -> AgentObject {
        AgentObject { ctx, name }
    }

    /// The agent, for an admin only. No header means the daemon itself asked (e.g. a change
    /// notification).
    async fn read(&self, conn: &Connection, hdr: Option<Header<'_>>) -> zbus::fdo::Result<Agent> {
        if let Some(h) = hdr {
            self.ctx
                .require_admin(conn, &h)
                .await
                .map_err(|e| zbus::fdo::Error::AccessDenied(e.to_string()))?;
        }
        let agents = self.ctx.svc.agents();
        if let Some(a) = agents.live().by_name(&self.name) {
            return Ok(a.clone());
        }
        agents
            .destroy_pending_named(&self.name)
            .map_err(|e| zbus::fdo::Error::Failed(e.to_string()))?
            .ok_or_else(|| zbus::fdo::Error::UnknownObject(format!("agent {} is gone", self.name)))
    }
}

#[interface(name = "org.tessera.Tessera1.Agent")]
impl AgentObject {
    // Every property is for admins, like the methods: the bus policy already keeps others
    // out, and the daemon checks again (a property read over an open bus is refused too).
    #[zbus(property)]
    async fn name(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        Ok(self.read(conn, hdr).await?.name)
    }
    #[zbus(property)]
    async fn id(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        Ok(self.read(conn, hdr).await?.id)
    }
    #[zbus(property)]
    async fn status(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        Ok(self.read(conn, hdr).await?.status.as_str().to_string())
    }
    #[zbus(property)]
    async fn selectors(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<HashMap<String, OwnedValue>> {
        Ok(json_to_dict(&json!(self.read(conn, hdr).await?.selectors)))
    }
    #[zbus(property)]
    async fn policy(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<HashMap<String, OwnedValue>> {
        Ok(json_to_dict(&json!(self.read(conn, hdr).await?.policy)))
    }
    #[zbus(property)]
    async fn key_id(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        Ok(self.read(conn, hdr).await?.kid.unwrap_or_default())
    }
    /// "active", or "destroy-pending" for a revoked agent whose key could not be destroyed
    /// yet (retried in the background until it is gone).
    #[zbus(property)]
    async fn key_state(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        let a = self.read(conn, hdr).await?;
        Ok(match a.status {
            crate::agents::Status::Revoked => "destroy-pending",
            _ => "active",
        }
        .to_string())
    }
    /// The key of its Workload API X.509-SVIDs: "off" (none: the hardware key cannot leave
    /// the device) or "software" (a daemon-made software key handed to the workload).
    #[zbus(property)]
    async fn x509_svid_key(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<String> {
        let a = self.read(conn, hdr).await?;
        Ok(if a.policy.software_x509_svid() {
            "software"
        } else {
            "off"
        }
        .to_string())
    }
    #[zbus(property)]
    async fn created_at(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<u64> {
        Ok(self.read(conn, hdr).await?.created_at as u64)
    }
    #[zbus(property)]
    async fn issued_count(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<u64> {
        Ok(self.ctx.svc.issued(&self.read(conn, hdr).await?).0)
    }
    #[zbus(property)]
    async fn last_issued_at(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> zbus::fdo::Result<u64> {
        Ok(self.ctx.svc.issued(&self.read(conn, hdr).await?).1)
    }

    async fn revoke(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        reason: String,
    ) -> Result<(), TesseraError> {
        let by = self.ctx.require_admin(conn, &hdr).await?;
        self.ctx.svc.revoke(&self.name, &reason, &by).await?;
        sync_object(conn, &self.ctx, &self.name).await;
        Ok(())
    }

    async fn suspend(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), TesseraError> {
        let by = self.ctx.require_admin(conn, &hdr).await?;
        Ok(self
            .ctx
            .svc
            .agents()
            .set_suspended(&self.name, true, &by)
            .await?)
    }

    async fn resume(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), TesseraError> {
        let by = self.ctx.require_admin(conn, &hdr).await?;
        Ok(self
            .ctx
            .svc
            .agents()
            .set_suspended(&self.name, false, &by)
            .await?)
    }
}
