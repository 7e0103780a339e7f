//! Refusals with stable names, shared by the socket (RFC 9457 problem JSON) and D-Bus
//! (`org.tessera.Tessera1.Error.*`).

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
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
}

impl Kind {
    pub fn slug(self) -> &'static str {
        match self {
            Kind::UnknownCaller => "unknown-caller",
            Kind::AmbiguousCaller => "ambiguous-caller",
            Kind::CallerGone => "caller-gone",
            Kind::AudienceNotAllowed => "audience-not-allowed",
            Kind::ScopeNotAllowed => "scope-not-allowed",
            Kind::TtlNotAllowed => "ttl-not-allowed",
            Kind::AgentSuspended => "agent-suspended",
            Kind::AgentRevoked => "agent-revoked",
            Kind::MalformedRequest => "malformed-request",
            Kind::BodyTooLarge => "body-too-large",
            Kind::RateLimited => "rate-limited",
            Kind::BackendUnavailable => "backend-unavailable",
            Kind::AuditUnavailable => "audit-unavailable",
            Kind::NotFound => "not-found",
            Kind::MethodNotAllowed => "method-not-allowed",
            Kind::Internal => "internal",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Kind::UnknownCaller
            | Kind::CallerGone
            | Kind::AudienceNotAllowed
            | Kind::ScopeNotAllowed
            | Kind::TtlNotAllowed
            | Kind::AgentSuspended
            | Kind::AgentRevoked => 403,
            Kind::AmbiguousCaller => 409,
            Kind::MalformedRequest => 400,
            Kind::BodyTooLarge => 413,
            Kind::RateLimited => 429,
            Kind::BackendUnavailable | Kind::AuditUnavailable => 503,
            Kind::NotFound => 404,
            Kind::MethodNotAllowed => 405,
            Kind::Internal => 500,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Kind::UnknownCaller => "Caller is not an enrolled agent",
            Kind::AmbiguousCaller => "Caller matches several agents; name one",
            Kind::CallerGone => "Caller process has exited",
            Kind::AudienceNotAllowed => "Audience not allowed by policy",
            Kind::ScopeNotAllowed => "Scope not allowed by policy",
            Kind::TtlNotAllowed => "TTL not allowed by policy",
            Kind::AgentSuspended => "Agent is suspended",
            Kind::AgentRevoked => "Agent is revoked",
            Kind::MalformedRequest => "Malformed request",
            Kind::BodyTooLarge => "Request body too large",
            Kind::RateLimited => "Rate limit exceeded",
            Kind::BackendUnavailable => "Key store unavailable",
            Kind::AuditUnavailable => "Audit trail unavailable",
            Kind::NotFound => "Not found",
            Kind::MethodNotAllowed => "Method not allowed",
            Kind::Internal => "Internal error",
        }
    }

    /// The problem `type` URI: stable, part of the public contract.
    pub fn type_uri(self) -> String {
        format!("urn:tessera:problem:{}", self.slug())
    }
}

/// A refusal: what kind, why, and when to come back (429/503).
#[derive(Debug, Clone)]
pub struct Problem {
    pub kind: Kind,
    pub detail: String,
    pub retry_after: Option<u64>,
}

impl Problem {
    pub fn new(kind: Kind, detail: impl Into<String>) -> Problem {
        Problem {
            kind,
            detail: detail.into(),
            retry_after: None,
        }
    }
    pub fn retry_after(mut self, secs: u64) -> Problem {
        self.retry_after = Some(secs.max(1));
        self
    }
    pub fn body(&self) -> ProblemBody {
        ProblemBody {
            type_: self.kind.type_uri(),
            title: self.kind.title(),
            status: self.kind.status(),
            detail: self.detail.clone(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.title(), self.detail)
    }
}

#[derive(Debug, Serialize)]
pub struct ProblemBody {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
}
