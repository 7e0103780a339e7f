//! D-Bus adapter (zbus): `org.tessera.Tessera1` with the `Manager` (admin), one `Agent` object
//! per live agent, and `Credentials` (for agents). Thin: every call goes to [`Service`].
//!
//! Authorization happens twice: the shipped bus policy lets only root and `admin_group` send
//! to `Manager`/`Agent`, and every admin method here checks the caller's uid and groups again
//! through `GetConnectionCredentials`. `Credentials` identifies the caller through the bus the
//! same way (uid + pid from the bus daemon, then the kernel facts of that pid), never from
//! arguments.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value as Json};
use zbus::fdo::DBusProxy;
use zbus::message::Header;
use zbus::names::BusName;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{ObjectPath, OwnedObjectPath, OwnedValue, Value};
use zbus::{connection, interface, Connection};

use crate::caller::Peer;
use crate::lifecycle::AdminError;
use crate::problem::{Kind, Problem};
use crate::registry::{Agent, Policy, Selectors, Source};
use crate::service::{AgentEvent, Service, TokenRequest};

pub const BUS_NAME: &str = "org.tessera.Tessera1";
pub const PATH: &str = "/org/tessera/Tessera1";

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.tessera.Tessera1.Error")]
pub enum TesseraError {
    #[zbus(error)]
    ZBus(zbus::Error),
    NotFound(String),
    AlreadyExists(String),
    InvalidArgs(String),
    AccessDenied(String),
    Backend(String),
    UnknownCaller(String),
    AmbiguousCaller(String),
    CallerGone(String),
    AudienceNotAllowed(String),
    ScopeNotAllowed(String),
    TtlNotAllowed(String),
    AgentSuspended(String),
    AgentRevoked(String),
    RateLimited(String),
    AuditUnavailable(String),
    CertificateRejected(String),
    Failed(String),
}

impl From<AdminError> for TesseraError {
    fn from(e: AdminError) -> Self {
        let msg = e.to_string();
        match e {
            AdminError::NotFound(_) => TesseraError::NotFound(msg),
            AdminError::AlreadyExists(_) => TesseraError::AlreadyExists(msg),
            AdminError::InvalidArgs(_) => TesseraError::InvalidArgs(msg),
            AdminError::AccessDenied(_) => TesseraError::AccessDenied(msg),
            AdminError::Backend(_) => TesseraError::Backend(msg),
            AdminError::Registry(_) => TesseraError::Failed(msg),
            AdminError::Audit(_) => TesseraError::AuditUnavailable(msg),
            AdminError::CertificateRejected(_) => TesseraError::CertificateRejected(msg),
            AdminError::Failed(_) => TesseraError::Failed(msg),
        }
    }
}

impl From<Problem> for TesseraError {
    fn from(p: Problem) -> Self {
        let msg = p.to_string();
        match p.kind {
            Kind::UnknownCaller => TesseraError::UnknownCaller(msg),
            Kind::AmbiguousCaller => TesseraError::AmbiguousCaller(msg),
            Kind::CallerGone => TesseraError::CallerGone(msg),
            Kind::AudienceNotAllowed => TesseraError::AudienceNotAllowed(msg),
            Kind::ScopeNotAllowed => TesseraError::ScopeNotAllowed(msg),
            Kind::TtlNotAllowed => TesseraError::TtlNotAllowed(msg),
            Kind::AgentSuspended => TesseraError::AgentSuspended(msg),
            Kind::AgentRevoked => TesseraError::AgentRevoked(msg),
            Kind::RateLimited => TesseraError::RateLimited(msg),
            Kind::BackendUnavailable => TesseraError::Backend(msg),
            Kind::AuditUnavailable => TesseraError::AuditUnavailable(msg),
            Kind::MalformedRequest | Kind::BodyTooLarge => TesseraError::InvalidArgs(msg),
            Kind::NotFound | Kind::MethodNotAllowed | Kind::Internal | Kind::Other(_) => {
                TesseraError::Failed(msg)
            }
        }
    }
}

/// `/org/tessera/Tessera1/agent/<name>`; `-` and `_` are escaped (`_2d`, `_5f`) because
/// object paths allow only `[A-Za-z0-9_]`.
pub fn agent_path(name: &str) -> String {
    let mut p = format!("{PATH}/agent/");
    for c in name.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' => p.push(c),
            other => p.push_str(&format!("_{:02x}", other as u32)),
        }
    }
    p
}

fn owned(v: Value<'_>) -> OwnedValue {
    // Our values never carry file descriptors, so conversion cannot fail.
    OwnedValue::try_from(v).unwrap_or_else(|_| OwnedValue::from(0u32))
}

fn variant_to_json(v: &Value<'_>) -> Result<Json, String> {
    Ok(match v {
        Value::U8(x) => json!(x),
        Value::Bool(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::Str(s) => json!(s.as_str()),
        Value::Value(inner) => variant_to_json(inner)?,
        Value::Array(a) => Json::Array(a.iter().map(variant_to_json).collect::<Result<_, _>>()?),
        other => {
            return Err(format!(
                "unsupported D-Bus type {}",
                other.value_signature()
            ))
        }
    })
}

fn dict_to_json(kind: &str, d: &HashMap<String, OwnedValue>) -> Result<Json, TesseraError> {
    let mut m = serde_json::Map::new();
    for (k, v) in d {
        let mut j = variant_to_json(v)
            .map_err(|e| TesseraError::InvalidArgs(format!("{kind} {k}: {e}")))?;
        // A TTL may come as seconds.
        if k == "max_ttl" || k == "max_cert_ttl" {
            if let Some(n) = j.as_u64() {
                j = json!(format!("{n}s"));
            }
        }
        m.insert(k.clone(), j);
    }
    Ok(Json::Object(m))
}

fn json_to_dict(j: &Json) -> HashMap<String, OwnedValue> {
    let mut out = HashMap::new();
    if let Json::Object(m) = j {
        for (k, v) in m {
            let val = match v {
                Json::Bool(b) => owned(Value::from(*b)),
                Json::Number(n) => match n.as_u64() {
                    Some(x) if x <= u32::MAX as u64 => owned(Value::from(x as u32)),
                    Some(x) => owned(Value::from(x)),
                    None => owned(Value::from(n.as_i64().unwrap_or(0))),
                },
                Json::String(s) => owned(Value::from(s.as_str())),
                Json::Array(a) => owned(Value::from(
                    a.iter()
                        .map(|x| x.as_str().unwrap_or_default().to_string())
                        .collect::<Vec<_>>(),
                )),
                _ => continue,
            };
            out.insert(k.clone(), val);
        }
    }
    out
}

/// uid and pid of a bus peer, from the bus daemon.
async fn bus_creds(conn: &Connection, hdr: &Header<'_>) -> Result<(u32, u32), TesseraError> {
    let sender = hdr
        .sender()
        .ok_or_else(|| TesseraError::AccessDenied("message has no sender".into()))?;
    let proxy = DBusProxy::new(conn).await?;
    let creds = proxy
        .get_connection_credentials(BusName::from(sender.to_owned()))
        .await
        .map_err(|e| TesseraError::AccessDenied(format!("cannot get caller credentials: {e}")))?;
    let uid = creds
        .unix_user_id()
        .ok_or_else(|| TesseraError::AccessDenied("bus did not report the caller's uid".into()))?;
    let pid = creds
        .process_id()
        .ok_or_else(|| TesseraError::AccessDenied("bus did not report the caller's pid".into()))?;
    Ok((uid, pid))
}

fn in_group(uid: u32, group: &str) -> bool {
    use nix::unistd::{Group, Uid, User};
    let (Ok(Some(user)), Ok(Some(grp))) =
        (User::from_uid(Uid::from_raw(uid)), Group::from_name(group))
    else {
        return false;
    };
    user.gid == grp.gid || grp.mem.contains(&user.name)
}

fn primary_gid(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Gid:"))
                .and_then(|l| l.split_whitespace().next().and_then(|g| g.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

struct Ctx {
    svc: Arc<Service>,
    config_path: Option<PathBuf>,
    /// Names of the agent objects currently exported.
    exported: tokio::sync::Mutex<Vec<String>>,
}

impl Ctx {
    /// Root or a member of `admin_group`; returns a description of who, for the audit.
    async fn require_admin(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
    ) -> Result<String, TesseraError> {
        let (uid, pid) = bus_creds(conn, hdr).await?;
        let group = self.svc.config().dbus.admin_group.clone();
        if uid == 0 || in_group(uid, &group) {
            Ok(format!("dbus uid {uid} pid {pid}"))
        } else {
            let reason = format!("uid {uid} is neither root nor in group {group}");
            let method = hdr.member().map(|m| m.to_string()).unwrap_or_default();
            let ev = crate::audit::Event::new("access.denied").details(json!({
                "problem": "admin-access-denied", "reason": reason,
                "method": method, "uid": uid, "pid": pid,
            }));
            if let Err(e) = self.svc.audit.record(ev).await {
                tracing::error!(error = %e, "could not audit a refused admin call");
            }
            Err(TesseraError::AccessDenied(reason))
        }
    }

    /// The calling process as the kernel describes it, pinned like a socket peer.
    async fn caller(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
    ) -> Result<crate::caller::Caller, TesseraError> {
        let (uid, pid) = bus_creds(conn, hdr).await?;
        let peer = Peer::from_pid(pid as i32, uid, primary_gid(pid));
        // The pidfd was taken after the bus answered: confirm the same connection still has
        // the same pid, so the pidfd is of the process that sent the message.
        let (uid2, pid2) = bus_creds(conn, hdr).await?;
        if (uid2, pid2) != (uid, pid) {
            return Err(TesseraError::CallerGone(
                "caller changed while being identified".into(),
            ));
        }
        Ok(self.svc.identify(Arc::new(peer)).await?)
    }
}

pub struct Manager(Arc<Ctx>);
pub struct Credentials(Arc<Ctx>);
pub struct AgentObject {
    ctx: Arc<Ctx>,
    name: String,
}

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
            .enroll(&name, sel, pol, Source::Dbus, &by)
            .await?;
        sync_objects(conn, &self.0).await;
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
            .live_agents()
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
        sync_objects(conn, &self.0).await;
        Ok(())
    }

    async fn suspend(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
    ) -> Result<(), TesseraError> {
        let by = self.0.require_admin(conn, &hdr).await?;
        self.0.svc.set_suspended(&name, true, &by).await?;
        sync_objects(conn, &self.0).await;
        Ok(())
    }

    async fn resume(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
    ) -> Result<(), TesseraError> {
        let by = self.0.require_admin(conn, &hdr).await?;
        self.0.svc.set_suspended(&name, false, &by).await?;
        sync_objects(conn, &self.0).await;
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
        let report = crate::daemon::reload(&self.0.svc, self.0.config_path.as_deref())
            .await
            .map_err(|e| TesseraError::InvalidArgs(format!("{e:#}")))?;
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
        self.0.svc.live_agents().len() as u32
    }

    #[zbus(signal)]
    async fn agent_enrolled(
        e: &SignalEmitter<'_>,
        name: &str,
        path: ObjectPath<'_>,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    async fn agent_revoked(e: &SignalEmitter<'_>, name: &str, reason: &str) -> zbus::Result<()>;
    #[zbus(signal)]
    async fn agent_suspended(e: &SignalEmitter<'_>, name: &str) -> zbus::Result<()>;
    #[zbus(signal)]
    async fn agent_resumed(e: &SignalEmitter<'_>, name: &str) -> zbus::Result<()>;
}

#[interface(name = "org.tessera.Tessera1.Credentials")]
impl Credentials {
    async fn who_am_i(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<HashMap<String, OwnedValue>, TesseraError> {
        let caller = self.0.caller(conn, &hdr).await?;
        let w = self.0.svc.whoami(&caller, None)?;
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
        let caller = self.0.caller(conn, &hdr).await?;
        let req = TokenRequest {
            audience,
            scopes,
            ttl: (ttl_seconds > 0).then(|| format!("{ttl_seconds}s")),
            agent: None,
        };
        let t = self.0.svc.issue_token(&caller, req).await?;
        Ok((t.token, t.exp as u64))
    }
}

impl AgentObject {
    fn agent(&self) -> zbus::fdo::Result<Agent> {
        self.ctx
            .svc
            .live_agents()
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
        self.ctx.svc.revoke(&self.name, &reason, &by).await?;
        sync_objects(conn, &self.ctx).await;
        Ok(())
    }

    async fn suspend(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), TesseraError> {
        let by = self.ctx.require_admin(conn, &hdr).await?;
        Ok(self.ctx.svc.set_suspended(&self.name, true, &by).await?)
    }

    async fn resume(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), TesseraError> {
        let by = self.ctx.require_admin(conn, &hdr).await?;
        Ok(self.ctx.svc.set_suspended(&self.name, false, &by).await?)
    }
}

/// Make the exported agent objects match the live agents. Called before an admin method
/// returns (so a returned path exists) and on every change event.
async fn sync_objects(conn: &Connection, ctx: &Arc<Ctx>) {
    let mut exported = ctx.exported.lock().await;
    let live: Vec<String> = ctx
        .svc
        .live_agents()
        .iter()
        .map(|a| a.name.clone())
        .collect();
    let server = conn.object_server();
    for name in exported.iter().filter(|n| !live.contains(n)) {
        let _ = server
            .remove::<AgentObject, _>(agent_path(name).as_str())
            .await;
    }
    for name in live.iter().filter(|n| !exported.contains(n)) {
        let obj = AgentObject {
            ctx: ctx.clone(),
            name: name.clone(),
        };
        if let Err(e) = server.at(agent_path(name).as_str(), obj).await {
            tracing::warn!(agent = %name, error = %e, "cannot export agent object");
        }
    }
    *exported = live;
}

/// Connect to the configured bus, own the name (no replacement allowed), export the
/// objects, and keep them and the signals in step with the service. `None` when `bus = "none"`.
pub async fn start(
    svc: Arc<Service>,
    config_path: Option<PathBuf>,
) -> anyhow::Result<Option<Connection>> {
    let bus = svc.config().dbus.bus.clone();
    let builder = match bus.as_str() {
        "none" => return Ok(None),
        "system" => connection::Builder::system()?,
        "session" => connection::Builder::session()?,
        addr => connection::Builder::address(addr)?,
    };
    let ctx = Arc::new(Ctx {
        svc: svc.clone(),
        config_path,
        exported: Default::default(),
    });
    let conn = builder
        .name(BUS_NAME)?
        .allow_name_replacements(false)
        .replace_existing_names(false)
        .serve_at(PATH, Manager(ctx.clone()))?
        .serve_at(PATH, Credentials(ctx.clone()))?
        .build()
        .await
        .map_err(|e| anyhow::anyhow!("cannot own {BUS_NAME} on the {bus} bus: {e}"))?;
    sync_objects(&conn, &ctx).await;
    let mut events = svc.events.subscribe();
    let c = conn.clone();
    tokio::spawn(async move {
        loop {
            let ev = match events.recv().await {
                Ok(ev) => ev,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            };
            sync_objects(&c, &ctx).await;
            let Ok(iface) = c.object_server().interface::<_, Manager>(PATH).await else {
                continue;
            };
            let e = iface.signal_emitter();
            let res = match &ev {
                AgentEvent::Enrolled(n) => match ObjectPath::try_from(agent_path(n)) {
                    Ok(p) => Manager::agent_enrolled(e, n, p).await,
                    Err(_) => Ok(()),
                },
                AgentEvent::Revoked(n, r) => Manager::agent_revoked(e, n, r).await,
                AgentEvent::Suspended(n) => Manager::agent_suspended(e, n).await,
                AgentEvent::Resumed(n) => Manager::agent_resumed(e, n).await,
                AgentEvent::Updated(_) => Ok(()),
            };
            if let Err(err) = res {
                tracing::warn!(error = %err, "cannot emit D-Bus signal");
            }
        }
    });
    tracing::info!(bus = %bus, name = BUS_NAME, "D-Bus service up");
    Ok(Some(conn))
}
