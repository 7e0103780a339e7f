//! `tessera agent …`: admin commands over D-Bus (root or `admin_group`).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{json, Value as Json};
use zbus::zvariant::{OwnedObjectPath, Value};

#[zbus::proxy(
    interface = "org.tessera.Tessera1.Manager",
    default_service = "org.tessera.Tessera1",
    default_path = "/org/tessera/Tessera1"
)]
pub trait Manager {
    fn enroll(
        &self,
        name: &str,
        selectors: HashMap<&str, Value<'_>>,
        policy: HashMap<&str, Value<'_>>,
    ) -> zbus::Result<OwnedObjectPath>;
    fn list_agents(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
    fn revoke(&self, name: &str, reason: &str) -> zbus::Result<()>;
    fn suspend(&self, name: &str) -> zbus::Result<()>;
    fn resume(&self, name: &str) -> zbus::Result<()>;
    fn revoke_all(&self, reason: &str) -> zbus::Result<()>;
    fn reload(&self) -> zbus::Result<()>;
    fn host_certificate_request(&self, common_name: &str) -> zbus::Result<String>;
    fn install_host_certificate(&self, pem: &str) -> zbus::Result<()>;
    fn status(&self) -> zbus::Result<HashMap<String, zbus::zvariant::OwnedValue>>;
}

#[derive(Subcommand)]
pub enum AgentSub {
    /// Enrol an agent: creates its key in the TPM/HSM.
    Enroll {
        name: String,
        #[arg(long)]
        uid: Option<u32>,
        #[arg(long)]
        gid: Option<u32>,
        #[arg(long)]
        exe: Option<String>,
        #[arg(long)]
        exe_sha256: Option<String>,
        #[arg(long)]
        unit: Option<String>,
        #[arg(long)]
        cgroup: Option<String>,
        /// Repeat for several audiences (`*` globs allowed).
        #[arg(long = "audience", required = true)]
        audiences: Vec<String>,
        #[arg(long = "scope")]
        scopes: Vec<String>,
        #[arg(long)]
        max_ttl: Option<String>,
        /// Longest agent certificate (default: max_ttl).
        #[arg(long)]
        max_cert_ttl: Option<String>,
        /// Credentials per minute.
        #[arg(long)]
        rate: Option<u32>,
        /// Only sender-constrained (DPoP-bound) tokens, never bearer tokens.
        #[arg(long)]
        require_binding: bool,
        /// The identity key: p256 (ES256, the default) or rsa2048 (RS256 tokens and JWT-SVIDs
        /// only, for relying parties that take nothing else). Fixed at enrolment.
        #[arg(long, value_parser = ["p256", "rsa2048"])]
        key: Option<String>,
    },
    /// All live agents.
    List,
    /// One agent's properties.
    Show { name: String },
    /// Revoke one agent (or all with --all): its key is destroyed before this returns.
    Revoke {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        #[arg(long, default_value = "revoked by admin")]
        reason: String,
        /// The kill switch: revoke every agent.
        #[arg(long)]
        all: bool,
        /// Do not ask for confirmation (with --all).
        #[arg(long)]
        yes: bool,
    },
    /// Suspend one agent: its requests are refused until it is resumed (its key is kept).
    Suspend { name: String },
    /// Resume a suspended agent.
    Resume { name: String },
    /// Re-read the config and agents_dir.
    Reload,
    /// Validate agent files exactly as enrolment does, without a daemon: exit 0 when all are
    /// valid, 1 with `file[:line]: problem` lines otherwise (for configuration-management
    /// hooks such as Ansible's `validate: tessera agent check --as NAME %s`).
    Check {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<std::path::PathBuf>,
        /// The daemon's config, for its ceilings (tokens.max_ttl, certificates.max_ttl);
        /// default /etc/tessera/tesserad.toml when it exists, else the built-in defaults.
        #[arg(long, value_name = "FILE")]
        config: Option<std::path::PathBuf>,
        /// Check the content as agent NAME's file, whatever the file is called (a hook's
        /// temporary copy): `tessera agent check --as research-bot %s`.
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
    },
}

/// `tessera agent check`: no bus, no daemon.
fn check(
    files: &[std::path::PathBuf],
    as_name: Option<&str>,
    config: Option<&std::path::Path>,
    as_json: bool,
) -> ExitCode {
    use tesserad::credentials::settings::{CertificatesConfig, TokensConfig};
    use tesserad::runtime::config::Config;
    let default = std::path::Path::new(tesserad::runtime::config::DEFAULT_CONFIG_PATH);
    let path = config.or_else(|| default.exists().then_some(default));
    let (max_token_ttl, max_cert_ttl) = match path {
        Some(p) => match Config::load(p) {
            Ok(c) => (c.tokens.max_ttl.0, c.certificates.max_ttl.0),
            Err(e) => {
                eprintln!("tessera: {e}");
                return ExitCode::from(2);
            }
        },
        None => (
            TokensConfig::default().max_ttl.0,
            CertificatesConfig::default().max_ttl.0,
        ),
    };
    let mut results = Vec::new();
    let mut ok = true;
    for f in files {
        let res = tesserad::agents::agents_dir::check_file(f, as_name, max_token_ttl, max_cert_ttl);
        match &res {
            Ok(()) if !as_json => println!("{}: ok", f.display()),
            Err(problems) if !as_json => {
                for p in problems {
                    eprintln!("{p}");
                }
            }
            _ => {}
        }
        ok &= res.is_ok();
        results
            .push(json!({"file": f, "ok": res.is_ok(), "problems": res.err().unwrap_or_default()}));
    }
    if as_json {
        println!("{}", Json::Array(results));
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub const EXIT_REFUSED: u8 = 3;
pub const EXIT_UNAVAILABLE: u8 = 4;
pub const EXIT_NOT_FOUND: u8 = 6;
pub const EXIT_UNVERIFIED: u8 = 5;

async fn connect(bus: &str) -> zbus::Result<zbus::Connection> {
    match bus {
        "system" => zbus::Connection::system().await,
        "session" => zbus::Connection::session().await,
        addr => zbus::connection::Builder::address(addr)?.build().await,
    }
}

/// The bus connection and the Manager proxy, or the exit code that says why not.
pub async fn manager(bus: &str) -> Result<(zbus::Connection, ManagerProxy<'static>), ExitCode> {
    let conn = connect(bus).await.map_err(|e| fail(&e))?;
    let mgr = ManagerProxy::new(&conn).await.map_err(|e| fail(&e))?;
    Ok((conn, mgr))
}

pub fn fail(e: &zbus::Error) -> ExitCode {
    match e {
        zbus::Error::MethodError(name, msg, _) => {
            let short = name.rsplit('.').next().unwrap_or("");
            eprintln!("tessera: {} ({name})", msg.as_deref().unwrap_or(short));
            match short {
                "AccessDenied" => ExitCode::from(EXIT_REFUSED),
                "NotFound" | "ServiceUnknown" | "UnknownObject" => ExitCode::from(EXIT_NOT_FOUND),
                "Backend" | "AuditUnavailable" | "NoReply" => ExitCode::from(EXIT_UNAVAILABLE),
                "CertificateRejected" => ExitCode::from(EXIT_UNVERIFIED),
                _ => ExitCode::FAILURE,
            }
        }
        zbus::Error::FDO(fdo) => {
            eprintln!("tessera: {fdo}");
            match **fdo {
                zbus::fdo::Error::AccessDenied(_) => ExitCode::from(EXIT_REFUSED),
                zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_) => {
                    ExitCode::from(EXIT_UNAVAILABLE)
                }
                _ => ExitCode::FAILURE,
            }
        }
        other => {
            eprintln!("tessera: cannot reach tesserad over D-Bus: {other}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

pub fn value_json(v: &Value<'_>) -> Json {
    match v {
        Value::U32(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::Bool(x) => json!(x),
        Value::Str(s) => json!(s.as_str()),
        Value::Array(a) => Json::Array(a.iter().map(value_json).collect()),
        Value::Dict(d) => {
            let mut out = serde_json::Map::new();
            for (k, v) in d.iter() {
                let key = match k {
                    Value::Str(s) => s.to_string(),
                    other => other.to_string(),
                };
                out.insert(key, value_json(v));
            }
            Json::Object(out)
        }
        Value::Value(inner) => value_json(inner),
        other => json!(other.to_string()),
    }
}

/// Every property of one agent object, as JSON.
async fn agent_props(conn: &zbus::Connection, path: &OwnedObjectPath) -> zbus::Result<Json> {
    let props = zbus::fdo::PropertiesProxy::builder(conn)
        .destination("org.tessera.Tessera1")?
        .path(path.clone())?
        .build()
        .await?;
    let iface = zbus::names::InterfaceName::try_from("org.tessera.Tessera1.Agent")?;
    let all = props.get_all(iface).await?;
    let mut out = serde_json::Map::new();
    let mut keys: Vec<_> = all.keys().cloned().collect();
    keys.sort();
    for k in keys {
        out.insert(k.clone(), value_json(&all[&k]));
    }
    Ok(Json::Object(out))
}

pub async fn run(cmd: AgentSub, bus: &str, as_json: bool) -> ExitCode {
    if let AgentSub::Check {
        files,
        config,
        as_name,
    } = &cmd
    {
        return check(files, as_name.as_deref(), config.as_deref(), as_json);
    }
    let (conn, mgr) = match manager(bus).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let res: zbus::Result<()> = async {
        match cmd {
            AgentSub::Enroll {
                name,
                uid,
                gid,
                exe,
                exe_sha256,
                unit,
                cgroup,
                audiences,
                scopes,
                max_ttl,
                max_cert_ttl,
                rate,
                require_binding,
                key,
            } => {
                let mut sel: HashMap<&str, Value<'_>> = HashMap::new();
                if let Some(v) = uid {
                    sel.insert("uid", v.into());
                }
                if let Some(v) = gid {
                    sel.insert("gid", v.into());
                }
                for (k, v) in [("exe", &exe), ("exe_sha256", &exe_sha256), ("unit", &unit), ("cgroup", &cgroup)] {
                    if let Some(v) = v {
                        sel.insert(k, Value::from(v.as_str()));
                    }
                }
                let mut pol: HashMap<&str, Value<'_>> = HashMap::new();
                pol.insert("audiences", audiences.clone().into());
                pol.insert("scopes", scopes.clone().into());
                if let Some(t) = &max_ttl {
                    pol.insert("max_ttl", Value::from(t.as_str()));
                }
                if let Some(t) = &max_cert_ttl {
                    pol.insert("max_cert_ttl", Value::from(t.as_str()));
                }
                if let Some(r) = rate {
                    pol.insert("rate", r.into());
                }
                if require_binding {
                    pol.insert("require_binding", true.into());
                }
                if let Some(k) = &key {
                    pol.insert("key", Value::from(k.as_str()));
                }
                let path = mgr.enroll(&name, sel, pol).await?;
                let props = agent_props(&conn, &path).await?;
                if as_json {
                    println!("{}", serde_json::to_string_pretty(&props).unwrap_or_default());
                } else {
                    println!("enrolled {name}: {} (key {})", props["Id"].as_str().unwrap_or(""), props["KeyId"].as_str().unwrap_or(""));
                }
            }
            AgentSub::List => {
                let mut rows = vec![];
                for p in mgr.list_agents().await? {
                    rows.push(agent_props(&conn, &p).await?);
                }
                if as_json {
                    println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
                } else {
                    println!("{:<24} {:<10} {:>8}  {:<44} ID", "NAME", "STATUS", "ISSUED", "KEY");
                    for r in rows {
                        println!(
                            "{:<24} {:<10} {:>8}  {:<44} {}",
                            r["Name"].as_str().unwrap_or(""),
                            r["Status"].as_str().unwrap_or(""),
                            r["IssuedCount"],
                            r["KeyId"].as_str().unwrap_or(""),
                            r["Id"].as_str().unwrap_or("")
                        );
                    }
                }
            }
            AgentSub::Show { name } => {
                let path = OwnedObjectPath::try_from(tesserad::doors::dbus::agent_path(&name))
                    .map_err(zbus::Error::from)?;
                let props = agent_props(&conn, &path).await?;
                if as_json {
                    println!("{}", serde_json::to_string_pretty(&props).unwrap_or_default());
                } else if let Json::Object(m) = props {
                    for (k, v) in m {
                        println!("{k:<14} {}", v.as_str().map(str::to_string).unwrap_or(v.to_string()));
                    }
                }
            }
            AgentSub::Revoke { name, reason, all, yes } => {
                if all {
                    if !yes {
                        if !std::io::stdin().is_terminal() {
                            eprintln!("tessera: refusing to revoke every agent without --yes (stdin is not a terminal)");
                            return Err(zbus::Error::Failure("not confirmed".into()));
                        }
                        eprint!("Revoke EVERY agent and destroy every key? Type 'revoke all' to confirm: ");
                        let mut line = String::new();
                        let _ = std::io::stdin().read_line(&mut line);
                        if line.trim() != "revoke all" {
                            eprintln!("tessera: not confirmed; nothing revoked");
                            return Err(zbus::Error::Failure("not confirmed".into()));
                        }
                    }
                    mgr.revoke_all(&reason).await?;
                    if as_json {
                        println!("{}", json!({"revoked": "all"}));
                    } else {
                        println!("revoked every agent");
                    }
                } else if let Some(n) = name {
                    mgr.revoke(&n, &reason).await?;
                    if as_json {
                        println!("{}", json!({"revoked": n}));
                    } else {
                        println!("revoked {n}");
                    }
                }
            }
            AgentSub::Suspend { name } => {
                mgr.suspend(&name).await?;
                println!("{}", if as_json { json!({"suspended": name}).to_string() } else { format!("suspended {name}") });
            }
            AgentSub::Resume { name } => {
                mgr.resume(&name).await?;
                println!("{}", if as_json { json!({"resumed": name}).to_string() } else { format!("resumed {name}") });
            }
            AgentSub::Reload => {
                mgr.reload().await?;
                println!("{}", if as_json { json!({"reloaded": true}).to_string() } else { "reloaded".to_string() });
            }
            AgentSub::Check { .. } => unreachable!("handled before connecting"),
        }
        Ok(())
    }
    .await;
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(zbus::Error::Failure(m)) if m == "not confirmed" => ExitCode::from(2),
        Err(e) => fail(&e),
    }
}
