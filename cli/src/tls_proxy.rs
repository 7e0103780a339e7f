//! `tessera tls-proxy`: a TLS-originating byte tunnel for programs that cannot sign
//! externally (curl, Python's ssl). A client speaks plain bytes (HTTP) to the proxy; the proxy
//! speaks TLS 1.3 to one upstream as the agent, with the agent's certificate, the
//! CertificateVerify signed by tesserad. The key never leaves the device.
//!
//! Trust boundary: whoever can connect to the listening socket acts as the agent towards the
//! upstream. So the default is a Unix socket (mode 0600, in a 0700 directory the proxy makes)
//! that accepts only a peer with the proxy's own uid and systemd unit. `--listen-tcp` lets any
//! local user in and needs `--insecure-any-local-user`. The daemon identifies the proxy like any
//! caller, so agents pinned to an executable cannot use it (the proxy is not their program).

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use tessera::tls::rustls::pki_types::ServerName;
use tessera::tls::rustls::RootCertStore;
use tessera::tls::{client_config, TlsOptions};
use tessera::Client;
use tokio::net::{TcpListener, TcpStream, UnixListener};

/// Where distributions keep the system's trust anchors.
const SYSTEM_ROOTS: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

#[derive(clap::Args, Debug)]
pub struct ProxyArgs {
    /// Unix socket to listen on (its directory is made 0700).
    #[arg(long, value_name = "PATH")]
    pub listen: Option<PathBuf>,
    /// Listen on TCP instead (any local user can then connect): needs
    /// --insecure-any-local-user.
    #[arg(long, value_name = "ADDR")]
    pub listen_tcp: Option<String>,
    #[arg(long)]
    pub insecure_any_local_user: bool,
    /// HOST:PORT of the TLS server; SNI and name checks use HOST.
    #[arg(long)]
    pub upstream: String,
    /// Trust anchors for the upstream (PEM); default: the system's.
    #[arg(long, value_name = "PEM")]
    pub upstream_ca: Option<PathBuf>,
    /// The upstream is an agent: check its certificate's SPIFFE ID instead of HOST.
    #[arg(long, value_name = "ID")]
    pub upstream_spiffe_id: Option<String>,
    /// Accept an agent upstream (--upstream-spiffe-id) whose certificate is for a software key.
    #[arg(long)]
    pub allow_software_keys: bool,
    /// Present the agent's session key (policy proof_key = "session"), signed in memory.
    #[arg(long)]
    pub session_key: bool,
    #[arg(long)]
    pub agent: Option<String>,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("tessera tls-proxy: {msg}");
    ExitCode::from(2)
}

pub async fn run(client: &Client, a: ProxyArgs) -> ExitCode {
    let (host, port) = match a.upstream.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
            (h.trim_matches(['[', ']']).to_string(), p.to_string())
        }
        _ => return fail("--upstream is HOST:PORT"),
    };
    let Ok(server_name) = ServerName::try_from(host.clone()) else {
        return fail(format!(
            "--upstream host {host:?} is not a DNS name or IP address"
        ));
    };
    if a.listen.is_some() && a.listen_tcp.is_some() {
        return fail("give --listen or --listen-tcp, not both");
    }
    if let Some(addr) = &a.listen_tcp {
        if !a.insecure_any_local_user {
            return fail(
                "--listen-tcp lets every local user act as the agent: add --insecure-any-local-user",
            );
        }
        // Local users, never the network.
        match addr.parse::<std::net::SocketAddr>() {
            Ok(s) if s.ip().is_loopback() => {}
            _ => {
                return fail("--listen-tcp takes a loopback address (127.0.0.1:PORT or [::1]:PORT)")
            }
        }
    }
    // Who the daemon sees: this process. Agents pinned to their executable are refused (the
    // proxy would need to pass for their program); `unit` agents may not be reached over TCP.
    let me = match client.whoami_agent(a.agent.as_deref()).await {
        Ok(w) => w,
        Err(e) => {
            return fail(format!(
                "the daemon does not know this process as an agent: {e}"
            ))
        }
    };
    if me.selectors.iter().any(|s| s == "exe" || s == "exe_sha256") {
        return fail(format!(
            "agent {} is pinned to its executable (exe/exe_sha256): the proxy cannot act for it",
            me.name
        ));
    }
    if a.listen_tcp.is_some() && me.selectors.iter().any(|s| s == "unit" || s == "cgroup") {
        return fail(format!(
            "agent {} is pinned to a systemd unit: a TCP listener would let any process act for it",
            me.name
        ));
    }
    if a.allow_software_keys && a.upstream_spiffe_id.is_none() {
        return fail("--allow-software-keys is about an agent upstream: give --upstream-spiffe-id");
    }
    // An agent upstream is vouched for by the host CA, never by any public CA.
    let roots = match (&a.upstream_ca, &a.upstream_spiffe_id) {
        (None, Some(_)) => match client.bundle().await {
            Ok(pem) => roots_from_pem_text(&pem, "the daemon's bundle"),
            Err(e) => return fail(e),
        },
        _ => load_roots(a.upstream_ca.as_deref()),
    };
    let roots = match roots {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let opts = TlsOptions {
        agent: Some(me.name.clone()),
        roots: Some(roots),
        server_spiffe_id: a.upstream_spiffe_id.clone(),
        session_key: a.session_key,
        allow_software_keys: a.allow_software_keys,
        ..Default::default()
    };
    let connector = match client_config(client, &opts).await {
        Ok(c) => tokio_rustls::TlsConnector::from(Arc::new(c)),
        Err(e) => return fail(e),
    };
    let upstream = format!("{host}:{port}");
    let forward = Arc::new(Forward {
        connector,
        server_name: server_name.to_owned(),
        upstream,
    });
    match (&a.listen, &a.listen_tcp) {
        (_, Some(addr)) => match TcpListener::bind(addr).await {
            Ok(l) => {
                eprintln!(
                    "tessera tls-proxy: {addr} -> {} as {}",
                    forward.upstream, me.id
                );
                loop {
                    let Some(s) = accepted(l.accept().await).await else {
                        continue;
                    };
                    let f = forward.clone();
                    tokio::spawn(async move { f.carry(s).await });
                }
            }
            Err(e) => fail(format!("cannot listen on {addr}: {e}")),
        },
        (Some(path), None) => match unix_listener(path) {
            Ok(l) => {
                eprintln!(
                    "tessera tls-proxy: {} -> {} as {}",
                    path.display(),
                    forward.upstream,
                    me.id
                );
                let own_unit = own_unit();
                loop {
                    let Some(s) = accepted(l.accept().await).await else {
                        continue;
                    };
                    if let Err(why) = same_owner(&s, own_unit.as_deref()) {
                        eprintln!("tessera tls-proxy: refused a client: {why}");
                        continue;
                    }
                    let f = forward.clone();
                    tokio::spawn(async move { f.carry(s).await });
                }
            }
            Err(e) => fail(e),
        },
        (None, None) => fail("give --listen PATH (a Unix socket) or --listen-tcp ADDR"),
    }
}

/// The stream of an accepted connection; on an error (out of descriptors and the like) a
/// pause rather than a spin.
async fn accepted<S, A>(r: std::io::Result<(S, A)>) -> Option<S> {
    match r {
        Ok((s, _)) => Some(s),
        Err(e) => {
            eprintln!("tessera tls-proxy: accept: {e}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            None
        }
    }
}

struct Forward {
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    upstream: String,
}

impl Forward {
    async fn carry<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(&self, mut client: S) {
        let tcp = match TcpStream::connect(&self.upstream).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("tessera tls-proxy: cannot reach {}: {e}", self.upstream);
                return;
            }
        };
        let mut tls = match self.connector.connect(self.server_name.clone(), tcp).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("tessera tls-proxy: TLS to {}: {e}", self.upstream);
                return;
            }
        };
        let _ = tokio::io::copy_bidirectional(&mut client, &mut tls).await;
    }
}

fn roots_from_pem_text(pem: &str, what: &str) -> Result<RootCertStore, String> {
    use tessera::tls::rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let c = c.map_err(|e| format!("{what}: {e}"))?;
        roots.add(c).map_err(|e| format!("{what}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{what} holds no certificate"));
    }
    Ok(roots)
}

fn load_roots(ca: Option<&Path>) -> Result<RootCertStore, String> {
    use tessera::tls::rustls::pki_types::{pem::PemObject, CertificateDer};
    let files: Vec<PathBuf> = match ca {
        Some(p) => vec![p.to_path_buf()],
        None => SYSTEM_ROOTS
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.exists())
            .take(1)
            .collect(),
    };
    let mut roots = RootCertStore::empty();
    for f in &files {
        for c in CertificateDer::pem_file_iter(f).map_err(|e| format!("{}: {e}", f.display()))? {
            let c = c.map_err(|e| format!("{}: {e}", f.display()))?;
            // The system bundle holds some certificates webpki cannot use; skip those.
            if roots.add(c).is_err() && ca.is_some() {
                return Err(format!("{}: not a usable trust anchor", f.display()));
            }
        }
    }
    if roots.is_empty() {
        return Err("no trust anchors: give --upstream-ca PEM".into());
    }
    Ok(roots)
}

/// Bind `path` in a directory only this user can enter (made 0700 if missing; an existing one
/// must be ours and 0700), the socket itself 0600. The directory is opened once and checked
/// through that descriptor; the socket is bound, replaced and chmod'ed relative to it
/// (`/proc/self/fd/N/NAME`), so swapping a path component afterwards changes nothing.
fn unix_listener(path: &Path) -> Result<UnixListener, String> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or("--listen needs a directory part")?;
    let name = path
        .file_name()
        .ok_or("--listen needs a file name after the directory")?;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    let not_private = || {
        format!(
            "{} must be a directory of this user with mode 0700 (whoever can reach the socket acts as the agent)",
            dir.display()
        )
    };
    // O_NOFOLLOW: a symlink in the directory's place is refused, not followed.
    let d = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| format!("{}: {e} ({})", dir.display(), not_private()))?;
    let meta = d
        .metadata()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != nix::unistd::getuid().as_raw() || meta.mode() & 0o077 != 0 {
        return Err(not_private());
    }
    let at = PathBuf::from(format!("/proc/self/fd/{}", d.as_raw_fd())).join(name);
    if at.as_os_str().len() >= 108 {
        return Err(format!("{}: the socket name is too long", path.display()));
    }
    // A socket left by an earlier run is replaced; anything else at the path is not ours.
    if let Ok(m) = std::fs::symlink_metadata(&at) {
        if !m.file_type().is_socket() {
            return Err(format!("{} exists and is not a socket", path.display()));
        }
        std::fs::remove_file(&at).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let l =
        UnixListener::bind(&at).map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(l)
}

fn cgroup_unit(pid: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    tesserad::caller::unit_of_cgroup(&tesserad::caller::parse_cgroup_v2(&text)?)
}

fn own_unit() -> Option<String> {
    cgroup_unit("self")
}

/// The peer must run as this uid and gid and in this systemd unit (when the proxy runs in
/// one). The peer is held by a pidfd taken with its credentials and must still be alive after
/// its cgroup was read, so a reused pid cannot lend its unit.
fn same_owner(s: &tokio::net::UnixStream, own_unit: Option<&str>) -> Result<(), String> {
    let peer = tesserad::caller::Peer::from_socket(s).map_err(|e| e.to_string())?;
    let (uid, gid) = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    if peer.uid != uid || peer.gid != gid {
        return Err(format!(
            "uid/gid {}/{} is not {uid}/{gid}",
            peer.uid, peer.gid
        ));
    }
    let theirs = cgroup_unit(&peer.pid.to_string());
    if !peer.alive() {
        return Err("the peer exited while it was checked".into());
    }
    if theirs.as_deref() != own_unit {
        return Err(format!(
            "unit {} is not {}",
            theirs.as_deref().unwrap_or("(none)"),
            own_unit.unwrap_or("(none)")
        ));
    }
    Ok(())
}
