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
    Internal,
    /// A type this SDK version does not know.
    Other(String),
}

impl ProblemType {
    pub fn from_uri(uri: &str) -> ProblemType {
        match uri.strip_prefix("urn:tessera:problem:").unwrap_or(uri) {
            "unknown-caller" => ProblemType::UnknownCaller,
            "ambiguous-caller" => ProblemType::AmbiguousCaller,
            "caller-gone" => ProblemType::CallerGone,
            "audience-not-allowed" => ProblemType::AudienceNotAllowed,
            "scope-not-allowed" => ProblemType::ScopeNotAllowed,
            "ttl-not-allowed" => ProblemType::TtlNotAllowed,
            "agent-suspended" => ProblemType::AgentSuspended,
            "agent-revoked" => ProblemType::AgentRevoked,
            "malformed-request" => ProblemType::MalformedRequest,
            "body-too-large" => ProblemType::BodyTooLarge,
            "rate-limited" => ProblemType::RateLimited,
            "backend-unavailable" => ProblemType::BackendUnavailable,
            "audit-unavailable" => ProblemType::AuditUnavailable,
            "not-found" => ProblemType::NotFound,
            "method-not-allowed" => ProblemType::MethodNotAllowed,
            "internal" => ProblemType::Internal,
            _ => ProblemType::Other(uri.to_string()),
        }
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
