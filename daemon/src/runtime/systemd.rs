//! Running under systemd: socket activation, readiness/status/stopping notifications and the
//! watchdog. Every function is a no-op outside systemd (no `LISTEN_FDS`, no `NOTIFY_SOCKET`).

use std::time::Duration;

use sd_notify::NotifyState;

/// Tell the service manager something; failures only matter to systemd, so they are logged.
/// The send never blocks: a notification socket nobody reads (a full queue) must not stall a
/// runtime thread, least of all the watchdog's during a stop.
pub fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = try_notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

fn try_notify(states: &[NotifyState<'_>]) -> std::io::Result<()> {
    use std::fmt::Write as _;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let mut msg = String::new();
    for s in states {
        let _ = writeln!(msg, "{s}");
    }
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    let bytes = path.as_encoded_bytes();
    // "@name": an abstract socket (sd_notify(3)).
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(msg.as_bytes(), &addr)?;
    } else {
        sock.send_to(msg.as_bytes(), &path)?;
    }
    Ok(())
}

/// Sockets passed by `.socket` units (`LISTEN_FDS`), told apart by `FileDescriptorName=`
/// (`LISTEN_FDNAMES`): `workload` is the Workload API's, any other name the agent socket's.
#[derive(Default)]
pub struct Inherited {
    pub agent: Option<tokio::net::UnixListener>,
    pub workload: Option<tokio::net::UnixListener>,
    /// `metrics` (tesserad-metrics.socket): TCP or Unix.
    pub metrics: Option<crate::doors::metrics::Listener>,
}

/// The sockets systemd passed, if any.
pub fn inherited_listeners() -> std::io::Result<Inherited> {
    // Read before `ListenFd` takes the environment.
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Inherited::default();
    for i in 0..fds.len() {
        if names.get(i).map(String::as_str) == Some("metrics") {
            if out.metrics.is_none() {
                out.metrics = take_metrics(&mut fds, i)?;
            }
            continue;
        }
        let Some(l) = fds.take_unix_listener(i)? else {
            continue;
        };
        // tokio needs a non-blocking socket; systemd hands over a blocking one.
        l.set_nonblocking(true)?;
        let l = tokio::net::UnixListener::from_std(l)?;
        let slot = if names.get(i).map(String::as_str) == Some("workload") {
            &mut out.workload
        } else {
            &mut out.agent
        };
        if slot.is_none() {
            *slot = Some(l);
        } else {
            tracing::warn!(
                fd = i,
                "ignoring a second socket of the same kind passed by systemd"
            );
        }
    }
    Ok(out)
}

/// The metrics socket: TCP (`ListenStream=127.0.0.1:9464`) or a Unix socket.
fn take_metrics(
    fds: &mut listenfd::ListenFd,
    i: usize,
) -> std::io::Result<Option<crate::doors::metrics::Listener>> {
    use crate::doors::metrics::Listener;
    if let Ok(Some(l)) = fds.take_tcp_listener(i) {
        l.set_nonblocking(true)?;
        return Ok(Some(Listener::Tcp(tokio::net::TcpListener::from_std(l)?)));
    }
    match fds.take_unix_listener(i)? {
        Some(l) => {
            l.set_nonblocking(true)?;
            Ok(Some(Listener::Unix(tokio::net::UnixListener::from_std(l)?)))
        }
        None => Ok(None),
    }
}

/// Ping the watchdog at half its period while the runtime is healthy enough to run tasks.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let period = sd_notify::watchdog_enabled()?;
    let every = (period / 2).max(Duration::from_millis(100));
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            notify(&[NotifyState::Watchdog]);
        }
    }))
}
