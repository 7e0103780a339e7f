//! Protocol adapters and nothing else: each door turns its transport into calls of the
//! [`crate::credentials::Credentials`] pipeline (and, for admins, of
//! [`crate::agents::Agents`]) and their answers back. No business rule lives here; no door
//! touches the key store or the registry.
//!
//! - `socket`: HTTP/1.1 + JSON over the Unix socket; `problem`: RFC 9457 refusals
//! - `dbus`: `org.tessera.Tessera1` (Manager, Agent objects, Credentials)
//! - `spiffe`: the SPIFFE Workload API (gRPC over its own Unix socket)

pub mod dbus;
pub mod limits;
pub mod metrics;
pub mod problem;
pub mod socket;
pub mod spiffe;
pub mod uds_authority;

use std::sync::{Arc, RwLock};
use std::time::Duration;

/// What the doors need from the configuration; the runtime replaces it on reload.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest request body accepted, bytes.
    pub max_body_bytes: usize,
    /// Time a client has to send its request headers.
    pub header_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Time a whole request may take (a slow body cannot hold a connection longer).
    pub request_deadline: Duration,
    /// Connections one uid may hold at once.
    pub per_uid_connections: usize,
    /// Workload API streams one uid may hold at once.
    pub per_uid_streams: usize,
    /// "system", "session", "none" or a bus address.
    pub bus: String,
    /// Members may call the admin methods (root always may).
    pub admin_group: String,
    /// The agent socket, named to D-Bus callers that must use it.
    pub socket: std::path::PathBuf,
}

/// Settings shared between the runtime (which writes them on reload) and the doors.
pub type SharedSettings = Arc<RwLock<Settings>>;

/// The current settings.
pub fn read(s: &SharedSettings) -> Settings {
    with(s, Settings::clone)
}

/// One value of the current settings, without copying the rest (the per-request path).
pub fn with<T>(s: &SharedSettings, f: impl FnOnce(&Settings) -> T) -> T {
    match s.read() {
        Ok(g) => f(&g),
        Err(p) => f(&p.into_inner()),
    }
}
