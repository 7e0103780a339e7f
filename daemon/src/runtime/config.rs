//! `tesserad.toml`: parsed strictly (an unknown key is an error naming the key), with
//! defaults that match the packaged layout. `--dev` builds a config in code instead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::agents::{self, Ids};
use crate::audit::AuditConfig;
use crate::credentials;
use crate::credentials::settings::{CertificatesConfig, TokensConfig};
use crate::doors;
use crate::duration::{format_duration, Dur};
use crate::keystore::BackendConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config {path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_agents_dir")]
    pub agents_dir: PathBuf,
    /// Host name used in ids; defaults to the kernel's host name.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "default_id_template")]
    pub id_template: String,
    pub backend: BackendConfig,
    #[serde(default)]
    pub tokens: TokensConfig,
    #[serde(default)]
    pub certificates: CertificatesConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub dbus: DbusConfig,
    #[serde(default)]
    pub spiffe: SpiffeConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub federation: credentials::federation::FederationConfig,
}

/// `[metrics]`: the Prometheus scrape endpoint, off unless `listen` is set (or systemd passes
/// the `metrics` socket of `tesserad-metrics.socket`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `"127.0.0.1:9464"` (TCP) or `"unix:/run/tessera/metrics.sock"`.
    #[serde(default)]
    pub listen: Option<String>,
}

/// Where `[metrics] listen` says to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl MetricsConfig {
    pub fn parsed(&self) -> Result<Option<MetricsListen>, String> {
        let Some(v) = &self.listen else {
            return Ok(None);
        };
        if let Some(p) = v.strip_prefix("unix:") {
            let p = PathBuf::from(p);
            if !p.is_absolute() {
                return Err(format!(
                    "metrics.listen {v:?}: a unix: path must be absolute"
                ));
            }
            return Ok(Some(MetricsListen::Unix(p)));
        }
        v.parse::<std::net::SocketAddr>()
            .map(|a| Some(MetricsListen::Tcp(a)))
            .map_err(|_| {
                format!(
                    "metrics.listen {v:?} is neither HOST:PORT (e.g. \"127.0.0.1:9464\") nor unix:/PATH"
                )
            })
    }
}

/// `[spiffe]`: the SPIFFE Workload API door.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpiffeConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Default: `workload.sock` beside the agent socket (`/run/tessera/workload.sock`).
    #[serde(default)]
    pub socket: Option<PathBuf>,
}

impl Default for SpiffeConfig {
    fn default() -> Self {
        SpiffeConfig {
            enabled: true,
            socket: None,
        }
    }
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body accepted, bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Time a client has to send its request headers.
    #[serde(default = "default_header_timeout")]
    pub header_read_timeout: Dur,
    /// Open connections served at once; more wait in the kernel backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Default per-agent rate (tokens per minute) when an agent's policy sets none.
    #[serde(default = "default_rate")]
    pub default_rate: u32,
    /// Time a whole request (headers, body, answer) may take.
    #[serde(default = "default_request_deadline")]
    pub request_deadline: Dur,
    /// Connections one uid may hold open at once; more are closed at once.
    #[serde(default = "default_per_uid_connections")]
    pub per_uid_connections: usize,
    /// Refusals audited one by one per uid and minute; the excess is counted in one record.
    #[serde(default = "default_refusal_audit_per_uid")]
    pub refusal_audit_per_uid: u32,
    /// Largest executable hashed for `exe_sha256` selectors (bytes).
    #[serde(default = "default_max_exe_bytes")]
    pub max_exe_bytes: u64,
    /// Executables hashed at once for one uid.
    #[serde(default = "default_identify_per_uid")]
    pub identify_per_uid: usize,
    /// Workload API streams one uid may hold open at once.
    #[serde(default = "default_per_uid_streams")]
    pub per_uid_streams: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body_bytes: default_max_body(),
            header_read_timeout: default_header_timeout(),
            max_connections: default_max_connections(),
            request_deadline: default_request_deadline(),
            per_uid_connections: default_per_uid_connections(),
            refusal_audit_per_uid: default_refusal_audit_per_uid(),
            max_exe_bytes: default_max_exe_bytes(),
            identify_per_uid: default_identify_per_uid(),
            per_uid_streams: default_per_uid_streams(),
            default_rate: default_rate(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbusConfig {
    #[serde(default = "default_bus")]
    pub bus: String,
    #[serde(default = "default_admin_group")]
    pub admin_group: String,
}

impl Default for DbusConfig {
    fn default() -> Self {
        DbusConfig {
            bus: default_bus(),
            admin_group: default_admin_group(),
        }
    }
}

fn default_trust_domain() -> String {
    "tessera.local".into()
}
fn default_state_dir() -> PathBuf {
    "/var/lib/tessera".into()
}
fn default_socket() -> PathBuf {
    "/run/tessera/agent.sock".into()
}
fn default_agents_dir() -> PathBuf {
    "/etc/tessera/agents.d".into()
}
fn default_id_template() -> String {
    "spiffe://{trust_domain}/host/{host}/agent/{name}".into()
}
fn default_max_body() -> usize {
    16 * 1024
}
fn default_header_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_max_connections() -> usize {
    512
}
fn default_request_deadline() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_per_uid_connections() -> usize {
    32
}
fn default_per_uid_streams() -> usize {
    64
}
fn default_max_exe_bytes() -> u64 {
    512 * 1024 * 1024
}
fn default_identify_per_uid() -> usize {
    4
}
fn default_refusal_audit_per_uid() -> u32 {
    60
}
fn default_rate() -> u32 {
    600
}
fn default_bus() -> String {
    "system".into()
}
fn default_admin_group() -> String {
    "tessera-admin".into()
}

pub const DEFAULT_CONFIG_PATH: &str = "/etc/tessera/tesserad.toml";

/// A CRL relying parties may cache longer than this would hide revocations for too long.
const MAX_CRL_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Far enough for any host; beyond it dates stop being meaningful (and X.509 time ends in 9999).
const MAX_CA_VALIDITY: Duration = Duration::from_secs(50 * 366 * 24 * 3600);

/// The SPIFFE trust domain name rules: 1-255 characters of lower-case letters, digits, `.`,
/// `-` and `_` (so no upper case, port, userinfo or path).
fn check_trust_domain(td: &str) -> Result<(), &'static str> {
    if td.is_empty() || td.len() > 255 {
        return Err("it must be 1 to 255 characters");
    }
    if td.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("it must be lower case");
    }
    if td.contains(':') {
        return Err("it must not have a port");
    }
    if !td.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
    }) {
        return Err("only a-z, 0-9, '.', '-' and '_' are allowed");
    }
    Ok(())
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: origin.to_string(),
            message,
        };
        self.metrics.parsed().map_err(invalid)?;
        if self.tokens.default_ttl.0 > self.tokens.max_ttl.0 {
            return Err(invalid(format!(
                "tokens.default_ttl ({}) is above tokens.max_ttl ({})",
                format_duration(self.tokens.default_ttl.0),
                format_duration(self.tokens.max_ttl.0)
            )));
        }
        if let BackendConfig::Pkcs11 {
            sessions: Some(n), ..
        } = self.backend
        {
            if !(1..=crate::keystore::MAX_SESSIONS).contains(&n) {
                return Err(invalid(format!(
                    "backend.sessions must be 1 to {} (it is {n})",
                    crate::keystore::MAX_SESSIONS
                )));
            }
        }
        if self.audit.checkpoint_every == 0
            || self.audit.checkpoint_interval.0 < Duration::from_secs(1)
        {
            return Err(invalid(
                "audit.checkpoint_every must be at least 1 and audit.checkpoint_interval at least 1s"
                    .into(),
            ));
        }
        // The federation token profile (and every relying party's limit): exp - iat <= 1 h.
        if self.tokens.max_ttl.0 > Duration::from_secs(3600) {
            return Err(invalid(format!(
                "tokens.max_ttl ({}) must be at most 1h",
                format_duration(self.tokens.max_ttl.0)
            )));
        }
        self.federation
            .issuer_for(&self.host_name())
            .map_err(invalid)?;
        if self.tokens.default_ttl.0 < Duration::from_secs(1) {
            return Err(invalid("tokens.default_ttl must be at least 1s".into()));
        }
        let c = &self.certificates;
        if c.default_ttl.0 < Duration::from_secs(60) || c.default_ttl.0 > c.max_ttl.0 {
            return Err(invalid(format!(
                "certificates.default_ttl ({}) must be at least 1m and at most certificates.max_ttl ({})",
                format_duration(c.default_ttl.0),
                format_duration(c.max_ttl.0)
            )));
        }
        if c.crl_validity.0 < Duration::from_secs(60) {
            return Err(invalid(
                "certificates.crl_validity must be at least 1m".into(),
            ));
        }
        if c.ca_validity.0 < c.max_ttl.0 {
            return Err(invalid(
                "certificates.ca_validity must be at least certificates.max_ttl".into(),
            ));
        }
        if !self.id_template.contains("{name}") {
            return Err(invalid("id_template must contain {name}".into()));
        }
        if let Err(why) = check_trust_domain(&self.trust_domain) {
            return Err(invalid(format!(
                "trust_domain {:?} is not a valid SPIFFE trust domain: {why}",
                self.trust_domain
            )));
        }
        if c.crl_validity.0 > MAX_CRL_VALIDITY {
            return Err(invalid(format!(
                "certificates.crl_validity must be at most {}",
                format_duration(MAX_CRL_VALIDITY)
            )));
        }
        if c.ca_validity.0 > MAX_CA_VALIDITY {
            return Err(invalid(format!(
                "certificates.ca_validity must be at most {}",
                format_duration(MAX_CA_VALIDITY)
            )));
        }
        if self.limits.max_connections == 0
            || self.limits.per_uid_connections == 0
            || self.limits.per_uid_streams == 0
        {
            return Err(invalid(
                "limits.max_connections, limits.per_uid_connections and limits.per_uid_streams must be at least 1".into(),
            ));
        }
        if self.spiffe.enabled && self.workload_socket() == self.socket {
            return Err(invalid("spiffe.socket must not be the agent socket".into()));
        }
        if self.limits.request_deadline.0 < Duration::from_secs(1) {
            return Err(invalid(
                "limits.request_deadline must be at least 1s".into(),
            ));
        }
        Ok(())
    }

    /// Where the Workload API listens: `[spiffe] socket`, else `workload.sock` in the agent
    /// socket's directory (so `--dev` and the packaged layout need nothing set).
    pub fn workload_socket(&self) -> PathBuf {
        match &self.spiffe.socket {
            Some(p) => p.clone(),
            None => self
                .socket
                .parent()
                .map(|d| d.join("workload.sock"))
                .unwrap_or_else(|| PathBuf::from("workload.sock")),
        }
    }

    /// The host name used in ids.
    pub fn host_name(&self) -> String {
        self.host.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        })
    }

    pub fn ids(&self) -> Ids {
        Ids {
            trust_domain: self.trust_domain.clone(),
            host_name: self.host_name(),
            id_template: self.id_template.clone(),
        }
    }

    /// The issuer (`iss`) of every token from this host.
    pub fn host_id(&self) -> String {
        self.ids().host_id()
    }

    /// What the agents part needs.
    pub fn agents_settings(&self) -> agents::Settings {
        agents::Settings {
            ids: self.ids(),
            max_token_ttl: self.tokens.max_ttl.0,
            max_cert_ttl: self.certificates.max_ttl.0,
        }
    }

    /// What the credentials pipeline needs.
    pub fn credentials_settings(&self) -> credentials::Settings {
        credentials::Settings {
            ids: self.ids(),
            tokens: self.tokens.clone(),
            certificates: self.certificates.clone(),
            default_rate: self.limits.default_rate,
            refusal_audit_per_uid: self.limits.refusal_audit_per_uid,
            max_exe_bytes: self.limits.max_exe_bytes,
            identify_per_uid: self.limits.identify_per_uid.max(1),
            identify_deadline: self.limits.request_deadline.0,
            checkpoint_every: self.audit.checkpoint_every,
            checkpoint_interval: self.audit.checkpoint_interval.0,
            // Checked by `validate`: an invalid issuer never gets this far.
            federation_issuer: self.federation.issuer_for(&self.host_name()).ok().flatten(),
        }
    }

    /// What the doors need.
    pub fn door_settings(&self) -> doors::Settings {
        doors::Settings {
            max_body_bytes: self.limits.max_body_bytes,
            header_read_timeout: self.limits.header_read_timeout.0,
            max_connections: self.limits.max_connections,
            request_deadline: self.limits.request_deadline.0,
            per_uid_connections: self.limits.per_uid_connections,
            per_uid_streams: self.limits.per_uid_streams,
            bus: self.dbus.bus.clone(),
            admin_group: self.dbus.admin_group.clone(),
            socket: self.socket.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::parse(
            "trust_domain = \"x\"\nsokcet = \"/tmp/s\"\n[backend]\nkind = \"tpm\"\n",
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sokcet"), "{err}");
        let err = Config::parse("[backend]\nkind = \"tpm\"\ntcit = \"x\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tcit"), "{err}");
    }

    #[test]
    fn trust_domains_follow_spiffe() {
        for ok in ["example.org", "agents.example-1.org", "a_b"] {
            assert!(check_trust_domain(ok).is_ok(), "{ok}");
        }
        for bad in [
            "Example.org",
            "example.org:8443",
            "",
            "a/b",
            "u@example.org",
            "é.org",
        ] {
            assert!(check_trust_domain(bad).is_err(), "{bad}");
        }
        assert!(check_trust_domain(&"a".repeat(256)).is_err());
    }

    #[test]
    fn defaults_and_durations() {
        let c = Config::parse(
            "[backend]\nkind = \"pkcs11\"\npin_file = \"/p\"\n[tokens]\ndefault_ttl = \"2m\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.tokens.default_ttl.0, Duration::from_secs(120));
        assert_eq!(c.tokens.max_ttl.0, Duration::from_secs(3600));
        assert_eq!(c.socket, PathBuf::from("/run/tessera/agent.sock"));
        assert!(c.spiffe.enabled);
        assert_eq!(
            c.workload_socket(),
            PathBuf::from("/run/tessera/workload.sock")
        );
        assert_eq!(c.limits.per_uid_streams, 64);
        let c = Config::parse(
            "socket = \"/s/a.sock\"\n[backend]\nkind = \"tpm\"\n[spiffe]\nsocket = \"/w/x.sock\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.workload_socket(), PathBuf::from("/w/x.sock"));
        assert!(Config::parse(
            "socket = \"/s/a.sock\"\n[backend]\nkind = \"tpm\"\n[spiffe]\nsocket = \"/s/a.sock\"\n",
            "t"
        )
        .is_err());
        assert!(Config::parse(
            "[backend]\nkind = \"tpm\"\n[tokens]\ndefault_ttl = \"2h\"\n",
            "t"
        )
        .is_err());
        assert!(Config::parse(
            "[backend]\nkind = \"tpm\"\n[tokens]\nmax_ttl = \"soon\"\n",
            "t"
        )
        .is_err());
    }
}
