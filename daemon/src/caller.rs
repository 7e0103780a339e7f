//! Who is on the other end of the socket, from the kernel only.
//!
//! Contract: a [`Caller`] is built from `SO_PEERCRED` (uid, gid, pid) and what `/proc/<pid>`
//! says, and it is only believed if the process the pid named is *still the same process*
//! after `/proc` was read. For that we hold a pidfd taken when the connection was accepted
//! (`SO_PEERPIDFD`, which names the peer itself; `pidfd_open(pid)` on kernels without it) and
//! check after reading `/proc` that the pidfd's process is still alive: a pid cannot be reused
//! while its process exists, so `/proc/<pid>` was that process. A dead peer is refused, never
//! misattributed.
//!
//! It must also still be the process that connected: same effective uid/gid as the
//! connection's credentials, same executable (device, inode) as at accept, and every byte it
//! sends must come from it ([`SenderChecked`], `SO_PASSCRED`): a connection cannot be handed to
//! another process or spoken through an exec. Nothing the client sends is used.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{getsockopt, sockopt};
use serde::Serialize;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum CallerError {
    #[error("cannot read peer credentials: {0}")]
    PeerCred(nix::Error),
    #[error("peer process {0} has exited")]
    Gone(i32),
    #[error("process {0} has executed another program since it connected")]
    Execd(i32),
    #[error("executable of process {pid} not hashed: {why}")]
    ExeNotHashed { pid: i32, why: String },
    #[error("process {pid} no longer has the uid/gid it connected with ({what})")]
    CredentialsChanged { pid: i32, what: String },
    #[error("cannot inspect peer process {pid}: {source}")]
    Proc {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
}

/// What the kernel said about a connection when it was accepted.
#[derive(Debug)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pidfd: Option<OwnedFd>,
    /// Device and inode of the peer's executable when it was accepted: a process that has
    /// exec'd since is not the caller it was.
    exe_at_accept: Option<(u64, u64)>,
}

impl Peer {
    /// Read SO_PEERCRED and take a pidfd at once, before the peer can exit and its pid be reused.
    pub fn from_socket<F: AsFd>(sock: &F) -> Result<Peer, CallerError> {
        let cred = getsockopt(sock, sockopt::PeerCredentials).map_err(CallerError::PeerCred)?;
        let pidfd = match getsockopt(sock, sockopt::PeerPidfd) {
            Ok(fd) => Some(fd),
            // Only a kernel without SO_PEERPIDFD falls back to pidfd_open on the number; any
            // other error means the peer is gone, and the number may already be someone else's.
            Err(nix::errno::Errno::ENOPROTOOPT | nix::errno::Errno::EOPNOTSUPP) => {
                pidfd_open(cred.pid())
            }
            Err(_) => return Err(CallerError::Gone(cred.pid())),
        };
        Ok(Peer {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
            pidfd,
            // Taken by `snapshot_exe`, off the accept loop (a stat can block on a hostile
            // filesystem).
            exe_at_accept: None,
        })
    }

    /// Record the peer's executable as it is now (may wait on a remote filesystem: call off
    /// the reactor, before the first request is read).
    pub fn snapshot_exe(mut self) -> Peer {
        self.exe_at_accept = exe_id(Path::new("/proc"), self.pid);
        self
    }

    /// A peer known by pid only (D-Bus gives uid and pid through the bus daemon).
    pub fn from_pid(pid: i32, uid: u32, gid: u32) -> Peer {
        Peer {
            pid,
            uid,
            gid,
            pidfd: pidfd_open(pid),
            exe_at_accept: exe_id(Path::new("/proc"), pid),
        }
    }

    /// True while the process this peer was when accepted still exists.
    pub fn alive(&self) -> bool {
        match &self.pidfd {
            Some(fd) => pidfd_alive(fd),
            // No pidfd at all (very old kernel): the pid cannot be pinned; refuse.
            None => false,
        }
    }
}

/// What identifies one version of an executable file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ExeStat {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl From<&fs::Metadata> for ExeStat {
    fn from(md: &fs::Metadata) -> ExeStat {
        ExeStat {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }
}

/// The file `/proc/<pid>/exe` names (the magic link leads to the very file the process runs,
/// whatever path it was started by), as the kernel has its attributes cached: with
/// AT_STATX_DONT_SYNC no filesystem (FUSE, NFS) is asked anything, so this never waits on one
/// and runs on the reactor. Device and inode never change for a file; size and times are the
/// kernel's own for local filesystems, the only ones whose executables are hashed.
fn exe_stat(proc_root: &Path, pid: i32) -> Option<ExeStat> {
    use rustix::fs::{makedev, statx, AtFlags, StatxFlags, CWD};
    let st = statx(
        CWD,
        proc_root.join(pid.to_string()).join("exe"),
        AtFlags::STATX_DONT_SYNC,
        StatxFlags::BASIC_STATS,
    )
    .ok()?;
    Some(ExeStat {
        dev: makedev(st.stx_dev_major, st.stx_dev_minor),
        ino: st.stx_ino,
        size: st.stx_size,
        mtime: (st.stx_mtime.tv_sec, i64::from(st.stx_mtime.tv_nsec)),
        ctime: (st.stx_ctime.tv_sec, i64::from(st.stx_ctime.tv_nsec)),
    })
}

/// Device and inode of the peer's executable (see [`exe_stat`]).
fn exe_id(proc_root: &Path, pid: i32) -> Option<(u64, u64)> {
    exe_stat(proc_root, pid).map(|s| (s.dev, s.ino))
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new fd or -1; no memory is
    // shared with the kernel. A non-negative return is a fresh fd that we alone own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd was just returned by the kernel and is not owned by anything else.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A pidfd turns readable once its process has exited (zombies included): polled without
/// waiting, not readable means the very process that connected is still there.
fn pidfd_alive(fd: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    loop {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => return true,
            Err(nix::errno::Errno::EINTR) => continue,
            // Readable (exited), or an error: not believed to be alive.
            _ => return false,
        }
    }
}

/// A caller as the kernel describes it at the time of a request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Caller {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub exe: Option<PathBuf>,
    /// Device and inode of the executable: what `exe` selectors compare (a path can be made
    /// to show anything in another mount namespace; the file cannot).
    pub exe_id: Option<(u64, u64)>,
    pub exe_sha256: Option<String>,
    pub unit: Option<String>,
    pub cgroup: Option<String>,
    /// Known only from a message bus: the bus names the process that connected to it, not the
    /// sender of each message, so only `uid`/`gid` facts are believed.
    pub via_bus: bool,
}

impl Caller {
    /// A caller as the bus reports it: uid and gid, nothing read from `/proc` that could
    /// belong to another process sharing the bus connection.
    pub fn from_bus(pid: i32, uid: u32, gid: u32) -> Caller {
        Caller {
            pid,
            uid,
            gid,
            exe: None,
            exe_id: None,
            exe_sha256: None,
            unit: None,
            cgroup: None,
            via_bus: true,
        }
    }

    /// This caller as the audit trail records it.
    pub fn record(&self) -> crate::audit::CallerRecord {
        crate::audit::CallerRecord {
            pid: self.pid,
            uid: self.uid,
            gid: self.gid,
            exe: self.exe.as_ref().map(|p| p.to_string_lossy().into_owned()),
            exe_sha256: self.exe_sha256.clone(),
            unit: self.unit.clone(),
            cgroup: self.cgroup.clone(),
        }
    }
}

/// SHA-256 of executables, keyed by what changes when the file does. Concurrent misses for
/// the same file wait for one hash instead of each reading the whole file.
#[derive(Default)]
pub struct ExeHashCache {
    map: Mutex<HashMap<ExeKey, Arc<Mutex<Option<String>>>>>,
}

/// Device, inode, size, mtime and ctime (seconds and nanoseconds). ctime matters: the owner
/// of a file can rewrite it and set mtime back, but any change of content or metadata moves
/// ctime, and nobody can set it.
type ExeKey = ExeStat;

impl ExeHashCache {
    /// The hash of this exact file version if it was computed before (no reading).
    fn cached(&self, st: &ExeStat) -> Option<String> {
        let slot = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(st)
            .cloned()?;
        // A hash being computed holds the slot: that is a miss here, never a wait.
        let h = match slot.try_lock() {
            Ok(g) => g.clone(),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().clone(),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        h
    }

    fn hash(&self, file: &mut fs::File) -> std::io::Result<String> {
        let md = file.metadata()?;
        let key = ExeStat::from(&md);
        let slot = {
            let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if m.len() > 4096 {
                m.clear();
            }
            m.entry(key).or_default().clone()
        };
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = slot.as_ref() {
            return Ok(h.clone());
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let h = hex::encode(hasher.finalize());
        *slot = Some(h.clone());
        Ok(h)
    }
}

/// Have the kernel attach the sender's credentials to every message on sockets accepted
/// from `listener` (accepted sockets inherit `SO_PASSCRED`; bytes sent before `accept` carry
/// them too). [`SenderChecked`] relies on it.
pub fn pass_credentials<F: AsFd>(listener: &F) -> Result<(), CallerError> {
    nix::sys::socket::setsockopt(listener, sockopt::PassCred, &true).map_err(CallerError::PeerCred)
}

/// A connection whose every byte must come from the process that connected. A process that
/// connects and hands its socket on (or forks a child that keeps it, then execs an enrolled
/// program) cannot lend its identity: bytes from any other process end the connection before
/// they are read as a request. Needs [`pass_credentials`] on the listening socket.
pub struct SenderChecked {
    inner: tokio::net::UnixStream,
    pid: i32,
}

impl SenderChecked {
    pub fn new(inner: tokio::net::UnixStream, peer: &Peer) -> SenderChecked {
        SenderChecked {
            inner,
            pid: peer.pid,
        }
    }
}

impl tokio::io::AsyncRead for SenderChecked {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixCredentials};
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            match this.inner.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            let fd = this.inner.as_raw_fd();
            let unfilled = buf.initialize_unfilled();
            let res = this.inner.try_io(tokio::io::Interest::READABLE, || {
                let mut iov = [std::io::IoSliceMut::new(unfilled)];
                let mut space = nix::cmsg_space!(UnixCredentials);
                let msg = recvmsg::<()>(
                    fd,
                    &mut iov,
                    Some(&mut space[..]),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)?;
                let mut sender = None;
                for c in msg.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmCredentials(cr) = c {
                        sender = Some(cr.pid());
                    }
                }
                Ok((msg.bytes, sender))
            });
            match res {
                Ok((0, _)) => return Poll::Ready(Ok(())),
                // The kernel never merges data of two senders into one read: checking each
                // read checks every byte.
                Ok((n, Some(pid))) if pid == this.pid => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }

                Ok((_, sender)) => {
                    tracing::warn!(
                        connected = this.pid,
                        sender = ?sender,
                        "bytes from a process other than the one that connected; closing"
                    );
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        "bytes from a process other than the one that connected",
                    )));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl tokio::io::AsyncWrite for SenderChecked {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Read `/proc` for `peer` and confirm afterwards that the pid still names the same process.
/// Blocking (procfs, and [`exe_stat`] which a remote filesystem can hold up): call from a
/// blocking context.
pub fn identify(peer: &Peer, cache: &ExeHashCache) -> Result<Caller, CallerError> {
    identify_at(peer, cache, Path::new("/proc"))
}

fn identify_at(peer: &Peer, cache: &ExeHashCache, proc_root: &Path) -> Result<Caller, CallerError> {
    if !peer.alive() {
        return Err(CallerError::Gone(peer.pid));
    }
    let dir = proc_root.join(peer.pid.to_string());
    let proc_err = |source| CallerError::Proc {
        pid: peer.pid,
        source,
    };
    // The exe link and file: unreadable for other users' processes without CAP_SYS_PTRACE,
    // in which case exe selectors cannot match (None), never a guess.
    let exe = fs::read_link(dir.join("exe")).ok();
    // One stat for the identity and the cache key, so both describe the same file.
    let exe_md = exe_stat(proc_root, peer.pid);
    let exe_id = exe_md.as_ref().map(|m| (m.dev, m.ino));
    // Unknown at accept (unreadable then) counts as a change too: no exe selector can match
    // a process whose program at accept nobody saw.
    if exe_id != peer.exe_at_accept {
        return Err(CallerError::Execd(peer.pid));
    }
    // Hashing is lazy ([`hash_exe`], only for an agent that needs it); a hash already known
    // for this exact file version costs nothing and goes into the audit.
    let exe_sha256 = exe_md.as_ref().and_then(|md| cache.cached(md));
    // The process that sends is the one we describe: its effective ids now must be the ones
    // the kernel gave for the connection (a process that dropped or changed them since is
    // not the caller it was).
    let status = fs::read_to_string(dir.join("status")).map_err(proc_err)?;
    let (euid, egid) = effective_ids(&status);
    if euid != Some(peer.uid) || egid != Some(peer.gid) {
        return Err(CallerError::CredentialsChanged {
            pid: peer.pid,
            what: format!(
                "connected as uid {} gid {}, now {:?} {:?}",
                peer.uid, peer.gid, euid, egid
            ),
        });
    }
    let cgroup_text = fs::read_to_string(dir.join("cgroup")).map_err(proc_err)?;
    let cgroup = parse_cgroup_v2(&cgroup_text);
    let unit = cgroup.as_deref().and_then(unit_of_cgroup);
    if !peer.alive() {
        return Err(CallerError::Gone(peer.pid));
    }
    // Still the same program after everything above was read.
    if self::exe_id(proc_root, peer.pid) != exe_id {
        return Err(CallerError::Execd(peer.pid));
    }
    Ok(Caller {
        pid: peer.pid,
        uid: peer.uid,
        gid: peer.gid,
        exe,
        exe_id,
        exe_sha256,
        unit,
        cgroup,
        via_bus: false,
    })
}

/// Filesystems whose reads can block for as long as someone else likes (FUSE, network):
/// executables on them are not hashed.
const UNHASHABLE_FS: [i64; 9] = [
    0x6573_5546, // FUSE
    0x6969,      // NFS
    0xFF53_4D42, // CIFS
    0xFE53_4D42, // SMB2
    0x517B,      // SMB
    0x0102_1997, // 9P
    0x00C3_6400, // Ceph
    0x6B41_4653, // AFS
    0x5346_414F, // OpenAFS
];

/// Hash the caller's executable for `exe_sha256` selectors: only a local file of at most
/// `max_bytes`, and only the very file the caller was identified with (same device and inode).
/// Blocking, and possibly slow: the caller of this bounds it (deadline, per-uid concurrency).
pub fn hash_exe(
    peer: &Peer,
    caller: &mut Caller,
    cache: &ExeHashCache,
    max_bytes: u64,
) -> Result<(), CallerError> {
    let path = Path::new("/proc").join(peer.pid.to_string()).join("exe");
    let refuse = |why: String| CallerError::ExeNotHashed { pid: peer.pid, why };
    let mut f = fs::File::open(&path).map_err(|e| refuse(e.to_string()))?;
    let md = f.metadata().map_err(|e| refuse(e.to_string()))?;
    if Some((md.dev(), md.ino())) != caller.exe_id {
        return Err(CallerError::Execd(peer.pid));
    }
    if md.len() > max_bytes {
        return Err(refuse(format!(
            "executable is {} bytes, over the {max_bytes}-byte limit",
            md.len()
        )));
    }
    let fs_type = nix::sys::statfs::fstatfs(&f)
        .map_err(|e| refuse(e.to_string()))?
        .filesystem_type()
        .0 as i64;
    if UNHASHABLE_FS.contains(&fs_type) {
        return Err(refuse(format!(
            "executable is on a FUSE or network filesystem (type {fs_type:#x})"
        )));
    }
    let h = cache.hash(&mut f).map_err(|e| refuse(e.to_string()))?;
    if !peer.alive() {
        return Err(CallerError::Gone(peer.pid));
    }
    caller.exe_sha256 = Some(h);
    Ok(())
}

/// Effective uid and gid from `/proc/<pid>/status` (`Uid:`/`Gid:` list real, effective,
/// saved, filesystem).
fn effective_ids(status: &str) -> (Option<u32>, Option<u32>) {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    (field("Uid:"), field("Gid:"))
}

/// The unified (v2) hierarchy line `0::/path`.
pub fn parse_cgroup_v2(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

/// The systemd unit a cgroup path belongs to (systemd's `cg_path_get_unit`): the first
/// component after the leading run of `*.slice` components, if it is a `.service` or `.scope`.
/// Components below it (a delegated subtree, a container) never name a unit, so
/// `/system.slice/evil.service/victim.service` is `evil.service`.
pub fn unit_of_cgroup(path: &str) -> Option<String> {
    path.split('/')
        .filter(|c| !c.is_empty())
        .find(|c| !c.ends_with(".slice"))
        .filter(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_string)
}

impl Caller {
    /// The caller's unit when `unit` selectors may match it: a unit of the system manager,
    /// not inside `user.slice` (a user's own manager and sessions name their units freely,
    /// e.g. `systemd-run --user --unit=research-bot.service`).
    pub fn system_unit(&self) -> Option<&str> {
        let in_user_slice = self
            .cgroup
            .as_deref()
            .is_some_and(|g| g.trim_start_matches('/').split('/').next() == Some("user.slice"));
        if in_user_slice {
            None
        } else {
            self.unit.as_deref()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_from_cgroups() {
        let unit = |p: &str| unit_of_cgroup(p);
        assert_eq!(
            unit("/system.slice/research-bot.service").as_deref(),
            Some("research-bot.service")
        );
        assert_eq!(
            unit("/system.slice/system-getty.slice/getty@tty1.service").as_deref(),
            Some("getty@tty1.service")
        );
        // Below the unit nothing renames it.
        assert_eq!(
            unit("/system.slice/evil.service/victim.service").as_deref(),
            Some("evil.service")
        );
        assert_eq!(
            unit("/user.slice/user-1000.slice/user@1000.service/app.slice/bot.service").as_deref(),
            Some("user@1000.service")
        );
        assert_eq!(
            unit("/user.slice/user-1000.slice/session-3.scope").as_deref(),
            Some("session-3.scope")
        );
        assert_eq!(unit("/"), None);
        assert_eq!(unit("/machine/bot.service"), None);
        assert_eq!(unit("/system.slice/victim.service.d"), None);
        assert_eq!(
            parse_cgroup_v2("0::/a/b.service\n").as_deref(),
            Some("/a/b.service")
        );
        let caller = |cg: &str| Caller {
            pid: 1,
            uid: 0,
            gid: 0,
            exe: None,
            exe_id: None,
            exe_sha256: None,
            unit: unit_of_cgroup(cg),
            cgroup: Some(cg.to_string()),
            via_bus: false,
        };
        assert_eq!(
            caller("/system.slice/bot.service").system_unit(),
            Some("bot.service")
        );
        // Inside user.slice no unit is matchable: not a user's manager, not a session.
        assert_eq!(
            caller("/user.slice/user-1000.slice/user@1000.service/app.slice/bot.service")
                .system_unit(),
            None
        );
        assert_eq!(
            caller("/user.slice/user-1000.slice/session-3.scope").system_unit(),
            None
        );
    }

    #[test]
    fn effective_ids_are_the_second_field() {
        let status = "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t100\t50\t50\t50\n";
        assert_eq!(effective_ids(status), (Some(0), Some(50)));
        assert_eq!(effective_ids("Name:\tx\n"), (None, None));
    }

    #[test]
    fn identifies_self_over_a_socketpair_and_refuses_dead_peers() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = Peer::from_socket(&a).unwrap().snapshot_exe();
        assert_eq!(peer.pid, std::process::id() as i32);
        let cache = ExeHashCache::default();
        let mut c = identify(&peer, &cache).unwrap();
        assert_eq!(c.exe.as_deref(), std::env::current_exe().ok().as_deref());
        assert_eq!(c.exe_sha256, None, "hashing is lazy");
        hash_exe(&peer, &mut c, &cache, u64::MAX).unwrap();
        assert_eq!(c.exe_sha256.as_ref().map(String::len), Some(64));
        assert!(matches!(
            hash_exe(&peer, &mut c, &cache, 10),
            Err(CallerError::ExeNotHashed { .. })
        ));
        // Once known, the hash of this file version comes with identification for free.
        assert_eq!(identify(&peer, &cache).unwrap().exe_sha256, c.exe_sha256);

        // A child that exits: its pidfd says so, and identify refuses it even though the pid
        // number might be reused.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let peer = Peer::from_pid(child.id() as i32, 0, 0);
        child.wait().unwrap();
        assert!(!peer.alive());
        assert!(matches!(
            identify(&peer, &ExeHashCache::default()),
            Err(CallerError::Gone(_))
        ));
    }
}
