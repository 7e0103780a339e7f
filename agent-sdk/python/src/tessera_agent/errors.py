"""Errors: the daemon's RFC 9457 problems as typed exceptions, and the relying party's refusals."""

from __future__ import annotations

from typing import Any, Mapping

PROBLEM_URI_PREFIX = "urn:tessera:problem:"


class TesseraError(Exception):
    """Anything this SDK raises."""


class DaemonUnavailable(TesseraError):
    """The agent socket cannot be reached (no daemon, wrong path, timeout)."""

    def __init__(self, socket: str, reason: str) -> None:
        super().__init__(f"tesserad is not reachable at {socket}: {reason}")
        self.socket = socket
        self.reason = reason


class ProtocolError(TesseraError):
    """The daemon answered something this SDK cannot read."""


class Problem(TesseraError):
    """A refusal from tesserad (RFC 9457 problem). Subclasses name each stable `type`."""

    slug: str = ""

    def __init__(
        self,
        type: str,
        title: str,
        status: int,
        detail: str = "",
        retry_after: int | None = None,
        raw: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{title}: {detail}" if detail else title)
        self.type = type
        self.title = title
        self.status = status
        self.detail = detail
        self.retry_after = retry_after
        self.raw = dict(raw or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(type={self.type!r}, status={self.status}, detail={self.detail!r})"


def _problem(name: str, slug: str, doc: str) -> type[Problem]:
    return type(name, (Problem,), {"slug": slug, "__doc__": doc})


UnknownCaller = _problem("UnknownCaller", "unknown-caller", "The caller is not an enrolled agent (403).")
AmbiguousCaller = _problem(
    "AmbiguousCaller", "ambiguous-caller", "The caller matches several agents: name one with `agent` (409)."
)
CallerGone = _problem("CallerGone", "caller-gone", "The calling process exited or exec'd (403).")
AudienceNotAllowed = _problem("AudienceNotAllowed", "audience-not-allowed", "Audience not in the policy (403).")
ScopeNotAllowed = _problem("ScopeNotAllowed", "scope-not-allowed", "Scope not in the policy (403).")
TtlNotAllowed = _problem("TtlNotAllowed", "ttl-not-allowed", "TTL above the policy's max_ttl (403).")
AgentSuspended = _problem("AgentSuspended", "agent-suspended", "The agent is suspended (403).")
AgentRevoked = _problem("AgentRevoked", "agent-revoked", "The agent is revoked: its key is destroyed (403).")
MalformedRequest = _problem("MalformedRequest", "malformed-request", "The daemon could not read the request (400).")
BodyTooLarge = _problem("BodyTooLarge", "body-too-large", "Request body too large (413).")
AuditUnavailable = _problem("AuditUnavailable", "audit-unavailable", "The audit trail cannot be written (503).")
NotFound = _problem("NotFound", "not-found", "No such endpoint (404).")
MethodNotAllowed = _problem("MethodNotAllowed", "method-not-allowed", "Wrong HTTP method (405).")
RequestTimeout = _problem("RequestTimeout", "request-timeout", "Not completed within the daemon's deadline (408).")
UseSocket = _problem("UseSocket", "use-socket", "Ask over the agent socket, not D-Bus (403).")
BindingRequired = _problem(
    "BindingRequired", "binding-required", "The policy requires sender-constrained tokens: use bind='dpop' (403)."
)
TargetNotAllowed = _problem(
    "TargetNotAllowed", "target-not-allowed", "The proof's target is not allowed by the policy's audiences (403)."
)
TokenNotAccepted = _problem(
    "TokenNotAccepted", "token-not-accepted", "The token is not this agent's, bound to its proof key (403)."
)
TlsRoleNotAllowed = _problem("TlsRoleNotAllowed", "tls-role-not-allowed", "The policy does not allow this TLS role (403).")
KeyTypeUnsupported = _problem(
    "KeyTypeUnsupported", "key-type-unsupported",
    "An RSA agent asked for what only P-256 keys do: proofs, WITs, bound tokens, TLS, certificates (403).",
)
Internal = _problem("Internal", "internal", "The daemon failed (500).")


class RateLimited(Problem):
    """The agent's rate is used up (429); `retry_after` says when to try again (seconds)."""

    slug = "rate-limited"


class BackendUnavailable(Problem):
    """The key store is busy or down (503); `retry_after` says when to try again (seconds)."""

    slug = "backend-unavailable"


PROBLEMS: dict[str, type[Problem]] = {
    cls.slug: cls
    for cls in (
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
        RequestTimeout,
        UseSocket,
        BindingRequired,
        TargetNotAllowed,
        TokenNotAccepted,
        TlsRoleNotAllowed,
        KeyTypeUnsupported,
        Internal,
    )
}


def problem_from(status: int, body: Any, retry_after: str | None) -> Problem:
    """The typed exception for a daemon answer with an error status."""
    retry = int(retry_after) if retry_after and retry_after.strip().isdigit() else None
    if not isinstance(body, dict) or not isinstance(body.get("type"), str):
        return Problem("about:blank", f"HTTP {status}", status, str(body)[:200], retry)
    uri = body["type"]
    slug = uri[len(PROBLEM_URI_PREFIX) :] if uri.startswith(PROBLEM_URI_PREFIX) else uri
    cls = PROBLEMS.get(slug, Problem)
    return cls(
        uri,
        str(body.get("title", "")),
        int(body.get("status", status)),
        str(body.get("detail", "")),
        retry,
        body,
    )


class VerificationError(TesseraError):
    """A relying party refuses a credential. `error` is the OAuth error code the answer carries
    (`invalid_token`, `invalid_dpop_proof`, `use_dpop_nonce`, `insufficient_scope`)."""

    def __init__(self, error: str, description: str, *, status: int = 401, nonce: str | None = None) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status
        self.nonce = nonce


class InsufficientScope(VerificationError):
    """A verified agent lacks a scope the resource needs (403)."""

    def __init__(self, needed: str) -> None:
        super().__init__("insufficient_scope", f"this needs scope {needed!r}", status=403)
        self.needed = needed


class ReplayCacheFull(VerificationError):
    """The replay cache is full: new proofs are refused until entries expire (fail closed)."""

    def __init__(self) -> None:
        super().__init__("invalid_dpop_proof", "replay cache full; try again shortly", status=503)
