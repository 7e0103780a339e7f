//! What the credentials pipeline needs from the configuration: `[tokens]` and
//! `[certificates]` (their TOML shape is defined here, next to their use), the default rate
//! and the host's ids. Built and replaced by the runtime.

use std::time::Duration;

use serde::Deserialize;

use crate::agents::Ids;
use crate::duration::Dur;

#[derive(Debug, Clone)]
pub struct Settings {
    pub ids: Ids,
    pub tokens: TokensConfig,
    pub certificates: CertificatesConfig,
    /// Per-agent rate (credentials per minute) when an agent's policy sets none.
    pub default_rate: u32,
    /// Refusals recorded one by one per uid and minute; the excess is counted.
    pub refusal_audit_per_uid: u32,
    /// Largest executable hashed for `exe_sha256` selectors.
    pub max_exe_bytes: u64,
    /// Executables hashed at once for one uid.
    pub identify_per_uid: usize,
    /// Time identifying a caller (hashing its executable) may take.
    pub identify_deadline: Duration,
    /// A signed audit checkpoint after this many records or this long, whichever is first.
    pub checkpoint_every: u64,
    pub checkpoint_interval: Duration,
    /// `[federation] issuer` with `{host}` filled in: `iss` of agent tokens when set.
    pub federation_issuer: Option<String>,
}

impl Settings {
    /// `iss` of agent tokens: the federation issuer when configured, else the host's SPIFFE ID.
    pub fn token_issuer(&self) -> String {
        self.federation_issuer
            .clone()
            .unwrap_or_else(|| self.ids.host_id())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensConfig {
    #[serde(default = "default_ttl")]
    pub default_ttl: Dur,
    #[serde(default = "default_max_ttl")]
    pub max_ttl: Dur,
}

impl Default for TokensConfig {
    fn default() -> Self {
        TokensConfig {
            default_ttl: default_ttl(),
            max_ttl: default_max_ttl(),
        }
    }
}

/// X.509 agent certificates from the host CA.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificatesConfig {
    /// Lifetime of an agent certificate when the caller asks for none (clamped to the agent's
    /// limit: its policy `max_cert_ttl`, else its token `max_ttl`).
    #[serde(default = "default_cert_ttl")]
    pub default_ttl: Dur,
    /// Ceiling for any agent's `max_cert_ttl`.
    #[serde(default = "default_cert_max_ttl")]
    pub max_ttl: Dur,
    /// How long a CRL is valid (`nextUpdate`); it is re-signed at half this age and at every
    /// revocation.
    #[serde(default = "default_crl_validity")]
    pub crl_validity: Dur,
    /// Validity of the self-signed host CA certificate.
    #[serde(default = "default_ca_validity")]
    pub ca_validity: Dur,
}

impl Default for CertificatesConfig {
    fn default() -> Self {
        CertificatesConfig {
            default_ttl: default_cert_ttl(),
            max_ttl: default_cert_max_ttl(),
            crl_validity: default_crl_validity(),
            ca_validity: default_ca_validity(),
        }
    }
}

fn default_cert_ttl() -> Dur {
    Dur(Duration::from_secs(3600))
}
fn default_cert_max_ttl() -> Dur {
    Dur(Duration::from_secs(24 * 3600))
}
fn default_crl_validity() -> Dur {
    Dur(Duration::from_secs(24 * 3600))
}
fn default_ca_validity() -> Dur {
    Dur(Duration::from_secs(10 * 365 * 24 * 3600))
}

fn default_ttl() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_max_ttl() -> Dur {
    Dur(Duration::from_secs(3600))
}
