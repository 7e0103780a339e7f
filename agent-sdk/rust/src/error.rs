use serde::Deserialize;

/// The daemon's stable refusal types (`urn:tessera:problem:<slug>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemType {
    UnknownCaller,
    AmbiguousCaller,
    CallerGone,
    AudienceNotAllowed,
    ScopeNotAllowed,
    TtlNotAllowed,
    AgentSuspended,
    AgentRevoked,
    MalformedRequest,
    BodyTooLarge,
    RateLimited,
    BackendUnavailable,
    AuditUnavailable,
    NotFound,
    MethodNotAllowed,
    /// The whole request (headers, body, answer) did not finish within the daemon's deadline.
    RequestTimeout,
    /// Asked over D-Bus for an agent whose selectors only the agent socket can check.
    UseSocket,
    /// The agent's policy has `require_binding`: ask for a bound token (`bind`).
    BindingRequired,
    /// A proof's target (DPoP `htu`) is not allowed by the agent's `audiences`.
    TargetNotAllowed,
    /// A proof's `access_token` / `ath` is not a token of this agent bound to its proof key.
    TokenNotAccepted,
    /// `POST /v1/tls/sign` as a TLS server without policy `tls_server = true`.
    TlsRoleNotAllowed,
    /// An RSA agent (`key = "rsa2048"`) asked for something only P-256 keys do: proofs, WITs,
    /// bound tokens, TLS signatures, certificates.
    KeyTypeUnsupported,
    Internal,
    /// A type this SDK version does not know.
    Other(String),
}

/// Prefix of every problem `type` URI.
pub const PROBLEM_URI_PREFIX: &str = "urn:tessera:problem:";

impl ProblemType {
    /// Every type the daemon sends; the one list both sides use.
    pub const KNOWN: [ProblemType; 23] = [
        ProblemType::UnknownCaller,
        ProblemType::AmbiguousCaller,
        ProblemType::CallerGone,
        ProblemType::AudienceNotAllowed,
        ProblemType::ScopeNotAllowed,
        ProblemType::TtlNotAllowed,
        ProblemType::AgentSuspended,
        ProblemType::AgentRevoked,
        ProblemType::MalformedRequest,
        ProblemType::BodyTooLarge,
        ProblemType::RateLimited,
        ProblemType::BackendUnavailable,
        ProblemType::AuditUnavailable,
        ProblemType::NotFound,
        ProblemType::MethodNotAllowed,
        ProblemType::RequestTimeout,
        ProblemType::UseSocket,
        ProblemType::BindingRequired,
        ProblemType::TargetNotAllowed,
        ProblemType::TokenNotAccepted,
        ProblemType::TlsRoleNotAllowed,
        ProblemType::KeyTypeUnsupported,
        ProblemType::Internal,
    ];

    pub fn from_uri(uri: &str) -> ProblemType {
        let slug = uri.strip_prefix(PROBLEM_URI_PREFIX).unwrap_or(uri);
        Self::KNOWN
            .into_iter()
            .find(|k| k.slug() == slug)
            .unwrap_or_else(|| ProblemType::Other(uri.to_string()))
    }

    /// The stable part of the `type` URI.
    pub fn slug(&self) -> &str {
        match self {
            ProblemType::UnknownCaller => "unknown-caller",
            ProblemType::AmbiguousCaller => "ambiguous-caller",
            ProblemType::CallerGone => "caller-gone",
            ProblemType::AudienceNotAllowed => "audience-not-allowed",
            ProblemType::ScopeNotAllowed => "scope-not-allowed",
            ProblemType::TtlNotAllowed => "ttl-not-allowed",
            ProblemType::AgentSuspended => "agent-suspended",
            ProblemType::AgentRevoked => "agent-revoked",
            ProblemType::MalformedRequest => "malformed-request",
            ProblemType::BodyTooLarge => "body-too-large",
            ProblemType::RateLimited => "rate-limited",
            ProblemType::BackendUnavailable => "backend-unavailable",
            ProblemType::AuditUnavailable => "audit-unavailable",
            ProblemType::NotFound => "not-found",
            ProblemType::MethodNotAllowed => "method-not-allowed",
            ProblemType::RequestTimeout => "request-timeout",
            ProblemType::UseSocket => "use-socket",
            ProblemType::BindingRequired => "binding-required",
            ProblemType::TargetNotAllowed => "target-not-allowed",
            ProblemType::TokenNotAccepted => "token-not-accepted",
            ProblemType::TlsRoleNotAllowed => "tls-role-not-allowed",
            ProblemType::KeyTypeUnsupported => "key-type-unsupported",
            ProblemType::Internal => "internal",
            ProblemType::Other(uri) => uri.strip_prefix(PROBLEM_URI_PREFIX).unwrap_or(uri),
        }
    }

    /// The problem `type` URI: stable, part of the public contract.
    pub fn type_uri(&self) -> String {
        format!("{PROBLEM_URI_PREFIX}{}", self.slug())
    }

    /// The HTTP status the daemon answers with.
    pub fn status(&self) -> u16 {
        match self {
            ProblemType::UnknownCaller
            | ProblemType::CallerGone
            | ProblemType::AudienceNotAllowed
            | ProblemType::ScopeNotAllowed
            | ProblemType::TtlNotAllowed
            | ProblemType::AgentSuspended
            | ProblemType::AgentRevoked
            | ProblemType::UseSocket
            | ProblemType::BindingRequired
            | ProblemType::TargetNotAllowed
            | ProblemType::TokenNotAccepted
            | ProblemType::TlsRoleNotAllowed
            | ProblemType::KeyTypeUnsupported => 403,
            ProblemType::AmbiguousCaller => 409,
            ProblemType::MalformedRequest => 400,
            ProblemType::BodyTooLarge => 413,
            ProblemType::RateLimited => 429,
            ProblemType::BackendUnavailable | ProblemType::AuditUnavailable => 503,
            ProblemType::NotFound => 404,
            ProblemType::MethodNotAllowed => 405,
            ProblemType::RequestTimeout => 408,
            ProblemType::Internal | ProblemType::Other(_) => 500,
        }
    }

    pub fn title(&self) -> &'static str {
        match self {
            ProblemType::UnknownCaller => "Caller is not an enrolled agent",
            ProblemType::AmbiguousCaller => "Caller matches several agents; name one",
            ProblemType::CallerGone => "Caller process has exited",
            ProblemType::AudienceNotAllowed => "Audience not allowed by policy",
            ProblemType::ScopeNotAllowed => "Scope not allowed by policy",
            ProblemType::TtlNotAllowed => "TTL not allowed by policy",
            ProblemType::AgentSuspended => "Agent is suspended",
            ProblemType::AgentRevoked => "Agent is revoked",
            ProblemType::MalformedRequest => "Malformed request",
            ProblemType::BodyTooLarge => "Request body too large",
            ProblemType::RateLimited => "Rate limit exceeded",
            ProblemType::BackendUnavailable => "Key store unavailable",
            ProblemType::AuditUnavailable => "Audit trail unavailable",
            ProblemType::NotFound => "Not found",
            ProblemType::MethodNotAllowed => "Method not allowed",
            ProblemType::RequestTimeout => "Request not completed within the deadline",
            ProblemType::UseSocket => "Use the agent socket",
            ProblemType::BindingRequired => "Agent policy requires sender-constrained tokens",
            ProblemType::TargetNotAllowed => "Proof target not allowed by policy",
            ProblemType::TokenNotAccepted => "Token not bound to this agent's proof key",
            ProblemType::TlsRoleNotAllowed => "Agent policy does not allow this TLS role",
            ProblemType::KeyTypeUnsupported => "Not available for this agent's key type",
            ProblemType::Internal | ProblemType::Other(_) => "Internal error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_type_round_trips_through_its_uri() {
        for k in ProblemType::KNOWN {
            assert_eq!(ProblemType::from_uri(&k.type_uri()), k);
        }
        assert_eq!(
            ProblemType::from_uri("urn:tessera:problem:new-thing"),
            ProblemType::Other("urn:tessera:problem:new-thing".into())
        );
    }
}

/// An RFC 9457 problem as the daemon sent it.
#[derive(Debug, Clone, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    #[serde(default)]
    pub detail: String,
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl Problem {
    pub fn kind(&self) -> ProblemType {
        ProblemType::from_uri(&self.type_uri)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach tesserad at {socket}: {source}")]
    Connect {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {}", .0.title, .0.detail)]
    Problem(Problem),
    #[error("unexpected answer from tesserad: {0}")]
    Protocol(String),
}

impl Error {
    /// The problem type, when the daemon refused.
    pub fn problem(&self) -> Option<ProblemType> {
        match self {
            Error::Problem(p) => Some(p.kind()),
            _ => None,
        }
    }
}
