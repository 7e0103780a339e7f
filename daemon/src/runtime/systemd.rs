//! Running under systemd: socket activation, readiness/status/stopping notifications and the
//! watchdog. Every function is a no-op outside systemd (no `LISTEN_FDS`, no `NOTIFY_SOCKET`).

use std::time::Duration;

use sd_notify::NotifyState;

/// Tell the service manager something; failures only matter to systemd, so they are logged.
pub fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// The agent socket passed by a `.socket` unit (`LISTEN_FDS`), if any.
pub fn inherited_listener() -> std::io::Result<Option<tokio::net::UnixListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(None);
    }
    match fds.take_unix_listener(0)? {
        Some(l) => {
            // tokio needs a non-blocking socket; systemd hands over a blocking one.
            l.set_nonblocking(true)?;
            Ok(Some(tokio::net::UnixListener::from_std(l)?))
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
