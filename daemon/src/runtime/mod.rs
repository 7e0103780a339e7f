//! The daemon's wiring: config, dev mode, systemd, logging, start-up, signals and stop.
//!
//! Start: state dir → registry (it holds the last audit checkpoint) → audit, checked against
//! that checkpoint → key store → crash repair → host CA → agents_dir → checkpoint → D-Bus name
//! → socket → ready. A failure before "ready" exits non-zero with the reason;
//! nothing is half-started.
//!
//! Stop (SIGTERM, SIGINT): stop accepting and release the bus name → drain connections →
//! flush issue counters → `daemon.stopped` recorded → final checkpoint → key store closed on its owner thread and
//! joined (TPM objects flushed, PKCS#11 `C_Finalize`, module unloaded) → audit writer joined
//! → registry closed → return. Nothing of a device is left for process exit to tear down.

pub mod config;
pub mod dev;
pub mod logging;
pub mod systemd;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sd_notify::NotifyState;
use serde_json::json;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::agents::registry::Registry;
use crate::agents::{Agents, ReconcileReport};
use crate::audit::{checkpoint, Audit, Event};
use crate::credentials::checkpoint::{CheckpointSignError, StoredCheckpoint};
use crate::credentials::Credentials;
use crate::doors::{self, SharedSettings};
use crate::keystore::{self, owner::KeyStoreHandle};
use config::Config;

/// A directory the daemon keeps things in must be its own and writable by nobody else:
/// otherwise another user could swap what is inside (a key blob, the registry, the socket).
fn check_own_dir(dir: &Path, what: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::symlink_metadata(dir)
        .with_context(|| format!("cannot inspect {what} {}", dir.display()))?;
    if !md.is_dir() {
        bail!("{what} {} is not a directory", dir.display());
    }
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != me {
        bail!(
            "{what} {} belongs to uid {}, not to the daemon's uid {me}",
            dir.display(),
            md.uid()
        );
    }
    if md.mode() & 0o022 != 0 {
        bail!(
            "{what} {} is writable by group or others (mode {:o})",
            dir.display(),
            md.mode() & 0o7777
        );
    }
    Ok(())
}

fn check_state_dir(dir: &Path, socket: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create state dir {}", dir.display()))?;
    check_own_dir(dir, "state dir")?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"")
        .with_context(|| format!("state dir {} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    // Key blobs, registry and audit: nobody else's business. When the socket lives inside
    // (`--dev`), others may traverse to it but not list or read anything.
    let mode = if socket.starts_with(dir) {
        0o711
    } else {
        0o700
    };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of state dir {}", dir.display()))?;
    Ok(())
}

/// `[metrics] listen`, bound: the listener and the socket file to remove at stop (Unix). A
/// Unix socket keeps the daemon's private mode (0700): scrapers run as the daemon's user or
/// root, or systemd's `tesserad-metrics.socket` sets the mode and group.
fn bind_metrics(
    cfg: &Config,
) -> Result<(Option<doors::metrics::Listener>, Option<std::path::PathBuf>)> {
    use crate::runtime::config::MetricsListen;
    match cfg.metrics.parsed().map_err(anyhow::Error::msg)? {
        None => Ok((None, None)),
        Some(MetricsListen::Tcp(addr)) => {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot bind metrics on {addr}"))?;
            l.set_nonblocking(true)?;
            tracing::info!(%addr, "metrics served");
            Ok((
                Some(doors::metrics::Listener::Tcp(
                    tokio::net::TcpListener::from_std(l)?,
                )),
                None,
            ))
        }
        Some(MetricsListen::Unix(path)) => {
            if let Ok(md) = std::fs::symlink_metadata(&path) {
                use std::os::unix::fs::FileTypeExt;
                if !md.file_type().is_socket() {
                    bail!(
                        "{} exists and is not a socket; refusing to replace it",
                        path.display()
                    );
                }
                let _ = std::fs::remove_file(&path);
            }
            let l = std::os::unix::net::UnixListener::bind(&path)
                .with_context(|| format!("cannot bind metrics on {}", path.display()))?;
            l.set_nonblocking(true)?;
            tracing::info!(socket = %path.display(), "metrics served");
            Ok((
                Some(doors::metrics::Listener::Unix(UnixListener::from_std(l)?)),
                Some(path),
            ))
        }
    }
}

fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(parent) = path.parent() {
        if !parent.exists() {
            // Every directory made here is explicitly 0755 (the daemon's umask is 077):
            // everyone must be able to reach the socket.
            let missing: Vec<&Path> = parent.ancestors().take_while(|d| !d.exists()).collect();
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create socket dir {}", parent.display()))?;
            for d in missing {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                    .with_context(|| format!("cannot set the mode of {}", d.display()))?;
            }
        }
        check_own_dir(parent, "socket dir")?;
    }
    if let Ok(md) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !md.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another daemon is already serving {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("remove stale socket {}", path.display()))?;
    }
    // Bound under a private name, opened to everyone, then renamed into place: the socket
    // appears at its path only with its final mode (no client ever finds it 0700).
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).with_context(|| format!("cannot bind {}", tmp.display()))?;
    // Any local process may ask; who it is comes from the kernel, not from access to the file.
    open_socket_to_all(&tmp)?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move the socket into place at {}", path.display()))?;
    Ok(l)
}

/// Mode 0666 on the socket just bound, set through a descriptor of that very inode (opened
/// without following links, checked to be our socket), never by following the path again.
fn open_socket_to_all(path: &Path) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("cannot open the socket {} just bound", path.display()))?;
    let md = f.metadata()?;
    if !md.file_type().is_socket() || md.uid() != nix::unistd::geteuid().as_raw() {
        bail!("{} is not the socket the daemon bound", path.display());
    }
    // An O_PATH descriptor cannot be fchmod'ed; its /proc/self/fd entry names the same
    // inode whatever happens to the path meanwhile.
    use std::os::fd::AsRawFd;
    let by_fd = format!("/proc/self/fd/{}", f.as_raw_fd());
    std::fs::set_permissions(&by_fd, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(())
}

/// How often keys whose destruction failed are tried again.
const DESTROY_RETRY: Duration = Duration::from_secs(5);

/// The running daemon's parts, as the runtime holds them.
pub struct Daemon {
    pub credentials: Arc<Credentials>,
    pub agents: Arc<Agents>,
    pub audit: Audit,
    pub doors: SharedSettings,
    /// The configuration in force (replaced on reload).
    config: std::sync::RwLock<Arc<Config>>,
    config_path: Option<std::path::PathBuf>,
}

impl Daemon {
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// A start that failed after `start`: close the key store on its thread, the audit
    /// writer and the registry, as a stop would.
    async fn abort(&self) {
        self.credentials.close().await;
        self.audit.close().await;
        self.agents.close();
    }

    /// Re-read the config (what can change without a restart) and `agents_dir`.
    pub async fn reload(&self) -> Result<ReconcileReport> {
        if let Some(p) = &self.config_path {
            let new = Config::load(p)?;
            let old = self.config();
            if new.state_dir != old.state_dir || new.socket != old.socket {
                tracing::warn!("state_dir and socket changes take effect at the next restart");
            }
            if new.federation.publish_dir != old.federation.publish_dir {
                tracing::warn!("federation.publish_dir changes take effect at the next restart");
            }
            let mut merged = new;
            merged.state_dir = old.state_dir.clone();
            merged.socket = old.socket.clone();
            merged.backend = old.backend.clone();
            merged.federation.publish_dir = old.federation.publish_dir.clone();
            self.agents.set_settings(merged.agents_settings());
            self.credentials.set_settings(merged.credentials_settings());
            *self.doors.write().unwrap_or_else(|p| p.into_inner()) = merged.door_settings();
            *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(merged);
        }
        let dir = self.config().agents_dir.clone();
        let r = self.agents.reconcile_agents_dir(&dir).await?;
        // Files removed meanwhile revoked their agents: the CRL is current before we report.
        self.credentials.ensure_crl_current().await;
        // So is the published key set (and the discovery document, if the issuer changed).
        self.credentials.publish_trust().await;
        tracing::info!(enrolled = ?r.enrolled, updated = ?r.updated, revoked = ?r.revoked, errors = ?r.errors, "reloaded");
        Ok(r)
    }
}

/// Everything that runs before the socket opens; used by `run` and by tests of start-up.
pub async fn start(
    cfg: Config,
    config_path: Option<&Path>,
    opts: StartOptions,
) -> Result<Arc<Daemon>> {
    check_state_dir(&cfg.state_dir, &cfg.socket)?;
    // The registry first: it holds the last checkpoint the trail is checked against. The
    // copy beside the trail counts too: the newer of the two is the anchor, so removing one
    // of them (or rolling one back) does not switch the check off.
    let registry =
        Registry::open(&cfg.state_dir.join("registry.db")).context("cannot open the registry")?;
    let audit_dir = cfg.state_dir.join("audit");
    let stored = [
        registry
            .meta(crate::credentials::checkpoint::META_CHECKPOINT)
            .context("cannot read the registry")?,
        checkpoint::read_file(&audit_dir).context("cannot read the audit checkpoint")?,
    ];
    let mut anchor: Option<(checkpoint::Checkpoint, String)> = None;
    let mut unreadable = None;
    for jws in stored.into_iter().flatten() {
        match checkpoint::parse_unverified(&jws) {
            Ok(cp) if anchor.as_ref().is_none_or(|(a, _)| cp.seq > a.seq) => {
                anchor = Some((cp, jws))
            }
            Ok(_) => {}
            Err(e) => unreadable = Some(format!("a stored audit checkpoint is unreadable ({e})")),
        }
    }
    if let Some(e) = &unreadable {
        if !opts.accept_audit_tamper {
            bail!("{e}; start with --accept-audit-tamper to carry on (recorded in the trail)");
        }
    }
    let anchor_cp = anchor.as_ref().map(|(cp, _)| cp.clone());
    let (audit, opened) = Audit::open_with(
        &audit_dir,
        &cfg.audit,
        anchor_cp.as_ref(),
        opts.accept_audit_tamper,
    )
    .context("cannot open the audit trail")?;
    if let Some(t) = opened.torn {
        audit
            .record(Event::new("audit.tail_recovered").details(json!({
                "bytes": t.bytes, "saved_to": t.saved_to,
            })))
            .await?;
        tracing::warn!(bytes = t.bytes, saved_to = %t.saved_to.display(), "torn audit tail set aside");
    }
    let tamper = opened.tamper_accepted.map(|t| (t.seq, t.reason));
    if let Some((seq, reason)) = tamper.or(unreadable.map(|e| (0, e))) {
        accept_tamper(&audit, anchor_cp.as_ref(), seq, &reason).await?;
    }
    let backend = cfg.backend.clone();
    let state_dir = cfg.state_dir.clone();
    let signers = cfg.backend.signing_sessions();
    let ks = KeyStoreHandle::spawn(move || keystore::open(&backend, &state_dir), signers)
        .context("cannot open the key store")?;
    // From here the key store runs on its own thread: a failed start closes it there (and
    // the audit writer), never leaving it to process exit (the SoftHSM teardown race).
    let rest = async {
        let agents = Agents::new(cfg.agents_settings(), registry, ks.clone(), audit.clone())?;
        let creds = Credentials::new(
            cfg.credentials_settings(),
            agents.clone(),
            ks.clone(),
            audit.clone(),
            &cfg.state_dir,
        );
        audit
            .record(Event::new("daemon.started").details(json!({
                "version": env!("CARGO_PKG_VERSION"), "backend": creds.backend_name(), "pid": std::process::id(),
            })))
            .await?;
        let report = agents.repair().await.context("start-up repair failed")?;
        if !report.rolled_back.is_empty() || !report.keys_destroyed.is_empty() {
            tracing::warn!(rolled_back = ?report.rolled_back, keys_destroyed = ?report.keys_destroyed, "repaired state left by a crash");
        }
        let ca_replaced = creds
            .init_host_ca()
            .await
            .context("cannot set up the host CA")?;
        // The anchor the trail was checked against must be the host CA's own.
        if let Some((cp, jws)) = &anchor {
            match creds.check_stored_checkpoint(jws, ca_replaced).await {
                Ok(StoredCheckpoint::Verified(_)) => {}
                Ok(StoredCheckpoint::OldCaKey(kid)) => {
                    tracing::error!(kid, "the last audit checkpoint was signed by a host CA key that is gone; the trail matched it, but its signature cannot be checked");
                    audit
                        .record(Event::new("audit.checkpoint_unverifiable").details(json!({
                            "seq": cp.seq, "hash": cp.hash, "kid": kid,
                            "reason": "the host CA key was missing from the key store and was made anew",
                        })))
                        .await?;
                }
                Err(e @ CheckpointSignError::Stored(_)) => {
                    if !opts.accept_audit_tamper {
                        bail!(
                            "{e}; start with --accept-audit-tamper to carry on (recorded in the trail)"
                        );
                    }
                    accept_tamper(&audit, Some(cp), cp.seq, &e.to_string()).await?;
                }
                Err(e) => return Err(e).context("cannot check the stored audit checkpoint"),
            }
        }
        let r = agents.reconcile_agents_dir(&cfg.agents_dir).await?;
        tracing::info!(enrolled = ?r.enrolled, updated = ?r.updated, revoked = ?r.revoked, errors = r.errors.len(), "agents_dir reconciled");
        if let Some(dir) = &cfg.federation.publish_dir {
            let p = crate::credentials::federation::Publisher::open(dir)?;
            creds.set_publisher(p).await?;
            tracing::info!(dir = %dir.display(), "federation key set published");
        }
        // Anchor what start-up wrote (and re-anchor after accepted tampering).
        creds
            .checkpoint()
            .await
            .context("cannot sign the audit checkpoint")?;
        Ok(Arc::new(Daemon {
            credentials: creds,
            agents,
            audit: audit.clone(),
            doors: Arc::new(std::sync::RwLock::new(cfg.door_settings())),
            config: std::sync::RwLock::new(Arc::new(cfg)),
            config_path: config_path.map(Path::to_path_buf),
        }))
    };
    match rest.await {
        Ok(d) => Ok(d),
        Err(e) => {
            ks.shutdown().await;
            audit.close().await;
            Err(e)
        }
    }
}

/// How this start may differ from a normal one.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartOptions {
    /// `--accept-audit-tamper`: carry on over a trail that fails its start-up check,
    /// recording `audit.tamper_accepted`, instead of refusing to start.
    pub accept_audit_tamper: bool,
}

async fn accept_tamper(
    audit: &Audit,
    anchor: Option<&checkpoint::Checkpoint>,
    seq: u64,
    reason: &str,
) -> Result<()> {
    tracing::error!(
        seq,
        reason,
        "audit tampering accepted by --accept-audit-tamper"
    );
    audit
        .record(Event::new("audit.tamper_accepted").details(json!({
            "seq": seq,
            "reason": reason,
            "checkpoint": anchor.map(|a| json!({"seq": a.seq, "hash": a.hash, "iat": a.iat})),
        })))
        .await?;
    Ok(())
}

/// Run until SIGTERM/SIGINT. SIGHUP re-reads `agents_dir` (and the config file, if any).
pub async fn run(cfg: Config, config_path: Option<&Path>, opts: StartOptions) -> Result<()> {
    let d = start(cfg.clone(), config_path, opts).await?;
    let svc = d.credentials.clone();
    let follower = svc.spawn_event_follower();
    // The bus name first, then the socket: once the socket answers, everything is up.
    let reload_hook: doors::dbus::ReloadHook = {
        let d = Arc::downgrade(&d);
        Arc::new(move || {
            let d = d.clone();
            Box::pin(async move {
                match d.upgrade() {
                    Some(d) => d.reload().await.map_err(|e| format!("{e:#}")),
                    None => Err("the daemon is stopping".to_string()),
                }
            })
        })
    };
    let dbus = match doors::dbus::start(svc.clone(), d.doors.clone(), reload_hook)
        .await
        .context("D-Bus")
    {
        Ok(x) => x,
        Err(e) => {
            d.abort().await;
            return Err(e);
        }
    };
    // Socket activation: systemd owns the socket files; otherwise we bind them ourselves.
    let listeners = systemd::inherited_listeners()
        .context("cannot use the sockets passed by systemd")
        .and_then(|inh| {
            let metrics = inh.metrics;
            // The Workload API socket first: once the agent socket answers, both are there.
            let workload = match (cfg.spiffe.enabled, inh.workload) {
                (false, _) => None,
                (true, Some(l)) => Some((l, false)),
                // systemd owns the socket directory: without tesserad-workload.socket (masked,
                // or an older unit) the daemon runs without the door rather than not at all.
                (true, None) if inh.agent.is_some() => {
                    tracing::warn!("systemd passed no Workload API socket (tesserad-workload.socket); the SPIFFE Workload API is off");
                    None
                }
                (true, None) => Some((
                    bind_socket(&cfg.workload_socket())
                        .context("the SPIFFE Workload API socket")?,
                    true,
                )),
            };
            let agent = match inh.agent {
                Some(l) => (l, false),
                None => match bind_socket(&cfg.socket) {
                    Ok(l) => (l, true),
                    Err(e) => {
                        if matches!(workload, Some((_, true))) {
                            let _ = std::fs::remove_file(cfg.workload_socket());
                        }
                        return Err(e);
                    }
                },
            };
            Ok((agent, workload, metrics))
        });
    let ((listener, owns_socket), workload, metrics) = match listeners {
        Ok(x) => x,
        Err(e) => {
            if let Some(door) = dbus {
                door.stop().await;
            }
            d.abort().await;
            return Err(e);
        }
    };
    let owns_workload_socket = matches!(workload, Some((_, true)));
    // Metrics: the socket systemd passed, else `[metrics] listen`, else none. A listen address
    // that cannot be bound is logged, not fatal: scraping is not what agents depend on.
    let (metrics, owned_metrics_socket) = match metrics {
        Some(l) => (Some(l), None),
        None => match bind_metrics(&cfg) {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "metrics endpoint not served");
                (None, None)
            }
        },
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server = tokio::spawn(doors::socket::serve(
        svc.clone(),
        d.doors.clone(),
        listener,
        stopped(stop_rx.clone()),
        Duration::from_secs(10),
    ));
    let metrics_server = metrics.map(|l| {
        tokio::spawn(doors::metrics::serve(
            svc.clone(),
            l,
            stopped(stop_rx.clone()),
            8,
        ))
    });
    let workload_server = workload.map(|(l, _)| {
        tokio::spawn(doors::spiffe::serve(
            svc.clone(),
            d.doors.clone(),
            l,
            stopped(stop_rx.clone()),
            Duration::from_secs(10),
        ))
    });
    // Stopped by a signal, never aborted: an abort inside a flush would lose what it had
    // taken (collapsed refusal counts).
    let (flusher_stop, mut flusher_stopped) = tokio::sync::watch::channel(false);
    let flusher = {
        let svc = svc.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            let mut n: u64 = 0;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = flusher_stopped.changed() => break,
                }
                if let Err(e) = svc.flush_counters() {
                    tracing::warn!(error = %e, "cannot write issue counters");
                }
                // A publication that failed (full disk, a read-only mount) is tried again;
                // an unchanged key set costs no write.
                if n.is_multiple_of(5) {
                    svc.publish_trust().await;
                }
                n += 1;
                // Counted refusals reach the audit within a minute even if nobody asks again.
                if n.is_multiple_of(30) {
                    svc.flush_refusals().await;
                }
                // Expired certificates need no CRL entry: forget them every 5 minutes so the
                // table stays the size of what is still valid.
                if n.is_multiple_of(150) {
                    if let Err(e) = svc.agents().prune_certificates(crate::agents::now_unix()) {
                        tracing::warn!(error = %e, "cannot prune expired certificates");
                    }
                }
            }
        })
    };
    let checkpointer = svc.spawn_checkpointer(flusher_stop.subscribe());
    // The self-signed host CA renews itself 30 days before its end: wake when that is due
    // (at most an hour apart, so a clock change is noticed), without a restart.
    let ca_renewer = {
        let svc = svc.clone();
        let mut stopped = flusher_stop.subscribe();
        tokio::spawn(async move {
            const ROUND: Duration = Duration::from_secs(3600);
            let mut wait = svc.ca_renewal_due_in().map_or(ROUND, |d| d.min(ROUND));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stopped.changed() => break,
                }
                wait = match svc.renew_ca_if_due().await {
                    Ok(true) => Duration::from_secs(1),
                    Ok(false) => ROUND,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot renew the host CA certificate");
                        ROUND
                    }
                };
                // Next: when it is due, unless that is now and nothing could be done (an
                // installed certificate only warns; a failure waits for the next round).
                if let Some(due) = svc.ca_renewal_due_in() {
                    if !due.is_zero() {
                        wait = due.min(ROUND);
                    }
                }
            }
        })
    };
    // A key whose destruction failed at revocation is retried until it is gone.
    let destroyer_stop = flusher_stop.subscribe();
    let destroyer = {
        let agents = d.agents.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(DESTROY_RETRY);
            let mut stopped = destroyer_stop;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                if let Err(e) = agents.retry_pending_destroys().await {
                    tracing::warn!(error = %e, "cannot retry pending key destructions");
                }
            }
        })
    };
    let watchdog = systemd::spawn_watchdog();
    let status = format!(
        "serving {} agent(s) on {} ({})",
        d.agents.live().len(),
        if owns_socket {
            cfg.socket.display().to_string()
        } else {
            "the systemd socket".into()
        },
        svc.backend_name()
    );
    systemd::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    tracing::info!(socket = %cfg.socket.display(), workload_api = cfg.spiffe.enabled, backend = svc.backend_name(), agents = d.agents.live().len(), "tesserad ready");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                systemd::notify(&[NotifyState::Reloading]);
                if let Err(e) = d.reload().await {
                    tracing::error!(error = %e, "reload failed; keeping the running configuration");
                }
                systemd::notify(&[NotifyState::Ready]);
            }
        }
    }
    tracing::info!("stopping: draining connections");
    systemd::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    // Release the bus name first so a new instance can take it, then drain the socket.
    if let Some(door) = dbus {
        door.stop().await;
    }
    let _ = stop_tx.send(true);
    let _ = server.await;
    if let Some(w) = workload_server {
        let _ = w.await;
    }
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    if let Some(p) = owned_metrics_socket {
        let _ = std::fs::remove_file(p);
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    let _ = flusher_stop.send(true);
    let _ = flusher.await;
    let _ = checkpointer.await;
    let _ = ca_renewer.await;
    follower.abort();
    // Awaited, not aborted: a retry in flight finishes and records `key.destroyed` before
    // `daemon.stopped` and the final checkpoint.
    let _ = destroyer.await;
    if let Err(e) = svc.flush_counters() {
        tracing::warn!(error = %e, "cannot write issue counters");
    }
    svc.flush_refusals().await;
    if owns_socket {
        let _ = std::fs::remove_file(&cfg.socket);
    }
    if owns_workload_socket {
        let _ = std::fs::remove_file(cfg.workload_socket());
    }
    let stopped = d.audit.record(Event::new("daemon.stopped")).await;
    // The final checkpoint covers `daemon.stopped`: a trail cut short after a clean stop
    // is found at the next start.
    if let Err(e) = svc.checkpoint().await {
        tracing::error!(error = %e, "cannot sign the final audit checkpoint");
    }
    svc.close().await;
    d.audit.close().await;
    d.agents.close();
    stopped?;
    tracing::info!("tesserad stopped");
    Ok(())
}
