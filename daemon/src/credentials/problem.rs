//! Refusals with stable names, shared by the socket (RFC 9457 problem JSON) and D-Bus
//! (`org.tessera.Tessera1.Error.*`).

use serde::Serialize;

/// The refusal kinds are the SDK's list (slug, status, title), so daemon and clients cannot
/// disagree about the contract.
pub use tessera::ProblemType as Kind;

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
