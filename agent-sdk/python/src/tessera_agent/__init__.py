"""tessera for Python agents and the services they call.

Agent side::

    import httpx
    from tessera_agent import TesseraAuth
    httpx.get("https://api.example.com/v1/x", auth=TesseraAuth())

Service side::

    from tessera_agent import Verifier
    from tessera_agent.asgi import TesseraMiddleware
    app = TesseraMiddleware(app, Verifier("https://api.example.com"))
"""

from .auth import TesseraAuth, htu_of, origin_of
from .client import AsyncClient, Client, Proof, Token, default_socket
from .errors import (
    PROBLEMS,
    AgentRevoked,
    AgentSuspended,
    AmbiguousCaller,
    AudienceNotAllowed,
    BackendUnavailable,
    BindingRequired,
    DaemonUnavailable,
    InsufficientScope,
    MalformedRequest,
    Problem,
    ProtocolError,
    RateLimited,
    ReplayCacheFull,
    ScopeNotAllowed,
    TargetNotAllowed,
    TesseraError,
    TokenNotAccepted,
    TtlNotAllowed,
    UnknownCaller,
    VerificationError,
)
from .exchange import AccessToken, ExchangeError, Exchanger
from .verify import DpopNonces, ReplayCache, VerifiedAgent, Verifier, jwk_thumbprint

__all__ = [
    "PROBLEMS",
    "AccessToken",
    "ExchangeError",
    "Exchanger",
    "AgentRevoked",
    "AgentSuspended",
    "AmbiguousCaller",
    "AsyncClient",
    "AudienceNotAllowed",
    "BackendUnavailable",
    "BindingRequired",
    "Client",
    "DaemonUnavailable",
    "DpopNonces",
    "InsufficientScope",
    "MalformedRequest",
    "Problem",
    "Proof",
    "ProtocolError",
    "RateLimited",
    "ReplayCache",
    "ReplayCacheFull",
    "ScopeNotAllowed",
    "TargetNotAllowed",
    "TesseraAuth",
    "TesseraError",
    "Token",
    "TokenNotAccepted",
    "TtlNotAllowed",
    "UnknownCaller",
    "VerificationError",
    "VerifiedAgent",
    "Verifier",
    "default_socket",
    "htu_of",
    "jwk_thumbprint",
    "origin_of",
]
