//! D-Bus adapter (zbus): `org.tessera.Tessera1` with the `Manager` (admin, `manager`), one
//! `Agent` object per live agent (`agent`), and `Credentials` (for agents, `credentials`).
//! Thin: every call goes to the credentials pipeline or the agents' lifecycle.
//!
//! Authorization happens twice: the shipped bus policy lets only root and `admin_group` send
//! to `Manager`/`Agent`, and every admin method here checks the caller's uid and groups again
//! through `GetConnectionCredentials`. `Credentials` identifies the caller through the bus the
//! same way (uid + pid from the bus daemon, then the kernel facts of that pid), never from
//! arguments.

mod agent;
mod credentials;
mod manager;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{json, Value as Json};
use zbus::fdo::DBusProxy;
use zbus::message::Header;
use zbus::names::BusName;
use zbus::zvariant::{ObjectPath, OwnedValue, Value};
use zbus::{connection, Connection};

use crate::agents::{AdminError, EventKind, ReconcileReport};
use crate::credentials::hostca::HostCaError;
use crate::credentials::problem::{Kind, Problem};
use crate::credentials::Credentials as Pipeline;
use crate::doors::SharedSettings;
pub use agent::AgentObject;
pub use credentials::Credentials;
pub use manager::Manager;

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
    UseSocket(String),
    BindingRequired(String),
    TargetNotAllowed(String),
    TokenNotAccepted(String),
    KeyTypeUnsupported(String),
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
        }
    }
}

impl From<HostCaError> for TesseraError {
    fn from(e: HostCaError) -> Self {
        let msg = e.to_string();
        if e.keystore().is_some() {
            return TesseraError::Backend(msg);
        }
        match e {
            HostCaError::InvalidArgs(_) => TesseraError::InvalidArgs(msg),
            HostCaError::CertificateRejected(_) => TesseraError::CertificateRejected(msg),
            _ => TesseraError::Failed(msg),
        }
    }
}

impl From<Problem> for TesseraError {
    fn from(p: Problem) -> Self {
        crate::metrics::refused(p.kind.slug(), "dbus");
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
            Kind::UseSocket => TesseraError::UseSocket(msg),
            Kind::BindingRequired => TesseraError::BindingRequired(msg),
            Kind::TargetNotAllowed => TesseraError::TargetNotAllowed(msg),
            Kind::TokenNotAccepted => TesseraError::TokenNotAccepted(msg),
            Kind::KeyTypeUnsupported => TesseraError::KeyTypeUnsupported(msg),
            Kind::RateLimited => TesseraError::RateLimited(msg),
            Kind::BackendUnavailable => TesseraError::Backend(msg),
            Kind::AuditUnavailable => TesseraError::AuditUnavailable(msg),
            Kind::MalformedRequest | Kind::BodyTooLarge => TesseraError::InvalidArgs(msg),
            Kind::NotFound
            | Kind::TlsRoleNotAllowed
            | Kind::MethodNotAllowed
            | Kind::RequestTimeout
            | Kind::Internal
            | Kind::Other(_) => TesseraError::Failed(msg),
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
        // a{sv} / a{ss}: a JSON object (RFC 9421 headers, WPT oth).
        Value::Dict(d) => {
            let mut m = serde_json::Map::new();
            for (k, v) in d.iter() {
                let Value::Str(k) = k else {
                    return Err("dictionary keys must be strings".into());
                };
                m.insert(k.to_string(), variant_to_json(v)?);
            }
            Json::Object(m)
        }
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
                // The effective gid, as for socket peers.
                .and_then(|l| l.split_whitespace().nth(1).and_then(|g| g.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

/// The running D-Bus door.
pub struct Door {
    conn: Connection,
    follower: tokio::task::JoinHandle<()>,
}

impl Door {
    /// Stop step (1): give up the bus name and close the connection, so nothing is answered
    /// on the bus once the daemon starts closing its parts.
    pub async fn stop(self) {
        let _ = self.conn.release_name(BUS_NAME).await;
        self.follower.abort();
        let _ = self.follower.await;
        drop(self.conn);
    }
}

/// `Manager.Reload()`: re-read the config and `agents_dir`, which is the runtime's to do; it
/// hands the door this hook.
pub type ReloadHook = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<ReconcileReport, String>> + Send>> + Send + Sync,
>;

struct Ctx {
    svc: Arc<Pipeline>,
    settings: SharedSettings,
    reload: ReloadHook,
    /// Names of the agent objects currently exported.
    exported: tokio::sync::Mutex<std::collections::HashSet<String>>,
}

impl Ctx {
    /// Root or a member of `admin_group`; returns a description of who, for the audit.
    async fn require_admin(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
    ) -> Result<String, TesseraError> {
        let (uid, pid) = bus_creds(conn, hdr).await?;
        let group = crate::doors::with(&self.settings, |s| s.admin_group.clone());
        if uid == 0 || in_group(uid, &group) {
            Ok(format!("dbus uid {uid} pid {pid}"))
        } else {
            let reason = format!("uid {uid} is neither root nor in group {group}");
            let method = hdr.member().map(|m| m.to_string()).unwrap_or_default();
            let ev = json!({
                "problem": "admin-access-denied", "reason": reason,
                "method": method, "uid": uid, "pid": pid,
            });
            self.svc.audit_refused_admin(ev).await;
            Err(TesseraError::AccessDenied(reason))
        }
    }

    /// A refusal as a D-Bus error; `UseSocket` names the socket to use.
    fn refusal(&self, p: Problem) -> TesseraError {
        if p.kind == Kind::UseSocket {
            let socket = crate::doors::with(&self.settings, |s| s.socket.clone());
            return TesseraError::UseSocket(format!("{p} ({})", socket.display()));
        }
        p.into()
    }

    /// The calling process as the kernel describes it, pinned like a socket peer.
    async fn caller(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
    ) -> Result<crate::caller::Caller, TesseraError> {
        let (uid, pid) = bus_creds(conn, hdr).await?;
        let gid = primary_gid(pid);
        // The gid was read for this pid after the bus answered: confirm the same connection
        // still has the same pid.
        let (uid2, pid2) = bus_creds(conn, hdr).await?;
        if (uid2, pid2) != (uid, pid) {
            return Err(TesseraError::CallerGone(
                "caller changed while being identified".into(),
            ));
        }
        // The bus names the process that connected to it, not the sender of this message, and
        // Debian 12's dbus-daemon gives no ProcessFD: only uid/gid are believed; agents with
        // other selectors are refused with UseSocket.
        let caller = crate::caller::Caller::from_bus(pid as i32, uid, gid);
        Ok(caller)
    }
}

/// Make the exported agent objects match the live agents. Called before an admin method
/// returns (so a returned path exists) and on every change event.
async fn sync_objects(conn: &Connection, ctx: &Arc<Ctx>) {
    let mut exported = ctx.exported.lock().await;
    // Live agents, and revoked ones whose key is still being destroyed (KeyState tells).
    // Sets: with thousands of agents a pairwise comparison would cost seconds per change.
    let mut live: std::collections::HashSet<String> = ctx
        .svc
        .agents()
        .live()
        .iter()
        .map(|a| a.name.clone())
        .collect();
    match ctx.svc.agents().destroy_pending() {
        Ok(pending) => live.extend(pending.into_iter().map(|a| a.name)),
        Err(e) => tracing::warn!(error = %e, "cannot list keys pending destruction"),
    }
    let server = conn.object_server();
    for name in exported.iter().filter(|n| !live.contains(*n)) {
        unexport(server, name).await;
    }
    for name in live.iter().filter(|n| !exported.contains(*n)) {
        export(server, ctx, name).await;
    }
    *exported = live;
}

/// Export `name`'s agent object; false (and a warning) if the bus refused it.
async fn export(server: &zbus::ObjectServer, ctx: &Arc<Ctx>, name: &str) -> bool {
    let obj = AgentObject::new(ctx.clone(), name.to_string());
    match server.at(agent_path(name).as_str(), obj).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(agent = %name, error = %e, "cannot export agent object");
            false
        }
    }
}

async fn unexport(server: &zbus::ObjectServer, name: &str) {
    let _ = server
        .remove::<AgentObject, _>(agent_path(name).as_str())
        .await;
}

/// Make one agent's object match its state: [`sync_objects`] for a change to one agent, O(1)
/// in the number of agents (comparing every name cost milliseconds per change at 10,000).
async fn sync_object(conn: &Connection, ctx: &Arc<Ctx>, name: &str) {
    let mut exported = ctx.exported.lock().await;
    let agents = ctx.svc.agents();
    let wanted = agents.live().by_name(name).is_some()
        || match agents.destroy_pending_named(name) {
            Ok(pending) => pending.is_some(),
            Err(e) => {
                tracing::warn!(agent = %name, error = %e, "cannot read the agent's key state");
                exported.contains(name)
            }
        };
    let server = conn.object_server();
    if wanted && !exported.contains(name) {
        if export(server, ctx, name).await {
            exported.insert(name.to_string());
        }
    } else if !wanted && exported.remove(name) {
        unexport(server, name).await;
    }
}

/// Connect to the configured bus, own the name (no replacement allowed), export the
/// objects, and keep them and the signals in step with the service. `None` when `bus = "none"`.
pub async fn start(
    svc: Arc<Pipeline>,
    settings: SharedSettings,
    reload: ReloadHook,
) -> Result<Option<Door>, zbus::Error> {
    let bus = crate::doors::with(&settings, |s| s.bus.clone());
    let builder = match bus.as_str() {
        "none" => return Ok(None),
        "system" => connection::Builder::system()?,
        "session" => connection::Builder::session()?,
        addr => connection::Builder::address(addr)?,
    };
    let ctx = Arc::new(Ctx {
        svc: svc.clone(),
        settings,
        reload,
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
        .map_err(|e| {
            zbus::Error::Failure(format!("cannot own {BUS_NAME} on the {bus} bus: {e}"))
        })?;
    sync_objects(&conn, &ctx).await;
    let mut events = svc.agents().subscribe();
    let c = conn.clone();
    let follower = tokio::spawn(async move {
        loop {
            let ev = match events.recv().await {
                Ok(ev) => ev,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    // Signals for those changes are lost; the exported objects are not.
                    tracing::warn!(missed = n, "D-Bus fell behind agent changes");
                    sync_objects(&c, &ctx).await;
                    continue;
                }
                Err(_) => break,
            };
            sync_object(&c, &ctx, &ev.name).await;
            let Ok(iface) = c.object_server().interface::<_, Manager>(PATH).await else {
                continue;
            };
            let e = iface.signal_emitter();
            let n = ev.name.as_str();
            let res = match &ev.kind {
                EventKind::Enrolled => match ObjectPath::try_from(agent_path(n)) {
                    Ok(p) => Manager::agent_enrolled(e, n, p).await,
                    Err(_) => Ok(()),
                },
                EventKind::Revoked { reason } => Manager::agent_revoked(e, n, reason).await,
                EventKind::Suspended => Manager::agent_suspended(e, n).await,
                EventKind::Resumed => Manager::agent_resumed(e, n).await,
                EventKind::Updated | EventKind::KeyDestroyed => Ok(()),
            };
            if let Err(err) = res {
                tracing::warn!(error = %err, "cannot emit D-Bus signal");
            }
        }
    });
    tracing::info!(bus = %bus, name = BUS_NAME, "D-Bus service up");
    Ok(Some(Door { conn, follower }))
}
