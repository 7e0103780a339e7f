//! `org.tessera.Tessera1.Agent`: one object per live agent, its properties and admin methods.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;
use zbus::message::Header;
use zbus::zvariant::OwnedValue;
use zbus::{interface, Connection};

use super::{json_to_dict, sync_objects, Ctx, TesseraError};
use crate::agents::Agent;

pub struct AgentObject {
    ctx: Arc<Ctx>,
    name: String,
}

impl AgentObject {
    pub(super) fn new(ctx: Arc<Ctx>, name: String) -> AgentObject {
        AgentObject { ctx, name }
    }
}

impl AgentObject {
    fn agent(&self) -> zbus::fdo::Result<Agent> {
        self.ctx
            .svc
            .agents()
            .live()
            .iter()
            .find(|a| a.name == self.name)
            .cloned()
            .ok_or_else(|| zbus::fdo::Error::UnknownObject(format!("agent {} is gone", self.name)))
    }
}

#[interface(name = "org.tessera.Tessera1.Agent")]
impl AgentObject {
    #[zbus(property)]
    fn name(&self) -> String {
        self.name.clone()
    }
    #[zbus(property)]
    fn id(&self) -> zbus::fdo::Result<String> {
        Ok(self.agent()?.id)
    }
    #[zbus(property)]
    fn status(&self) -> zbus::fdo::Result<String> {
        Ok(self.agent()?.status.as_str().to_string())
    }
    #[zbus(property)]
    fn selectors(&self) -> zbus::fdo::Result<HashMap<String, OwnedValue>> {
        Ok(json_to_dict(&json!(self.agent()?.selectors)))
    }
    #[zbus(property)]
    fn policy(&self) -> zbus::fdo::Result<HashMap<String, OwnedValue>> {
        Ok(json_to_dict(&json!(self.agent()?.policy)))
    }
    #[zbus(property)]
    fn key_id(&self) -> zbus::fdo::Result<String> {
        Ok(self.agent()?.kid.unwrap_or_default())
    }
    #[zbus(property)]
    fn created_at(&self) -> zbus::fdo::Result<u64> {
        Ok(self.agent()?.created_at as u64)
    }
    #[zbus(property)]
    fn issued_count(&self) -> zbus::fdo::Result<u64> {
        let row = self.agent()?.row;
        Ok(self.ctx.svc.issued(row).0)
    }
    #[zbus(property)]
    fn last_issued_at(&self) -> zbus::fdo::Result<u64> {
        let row = self.agent()?.row;
        Ok(self.ctx.svc.issued(row).1)
    }

    async fn revoke(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        reason: String,
    ) -> Result<(), TesseraError> {
        let by = self.ctx.require_admin(conn, &hdr).await?;
        self.ctx
            .svc
            .agents()
            .revoke(&self.name, &reason, &by)
            .await?;
        sync_objects(conn, &self.ctx).await;
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
