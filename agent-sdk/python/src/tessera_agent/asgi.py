"""ASGI middleware (Starlette, FastAPI, the MCP SDK's servers): every request must come from an
agent; the verified agent is put on the request (`request.state.tessera_agent`).

Refusals are 401 problems (RFC 9457) with `WWW-Authenticate: DPoP ...` (and `Bearer` when bearer
tokens are allowed), as RFC 9449 §7.1 and RFC 6750 §3 describe.
"""

from __future__ import annotations

import json
import re
from typing import Any, Awaitable, Callable, Iterable, MutableMapping
from urllib.parse import quote, urlsplit

import anyio.to_thread

from .auth import origin_of
from .errors import VerificationError
from .verify import VerifiedAgent, Verifier

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

STATE_KEY = "tessera_agent"

# host[:port]: a DNS name or IPv4 address, or a bracketed IPv6 address; nothing else.
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def _is_http_url(s: str) -> bool:
    try:
        parts = urlsplit(s)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def agent_of(request_or_scope: Any) -> VerifiedAgent:
    """The verified agent of a request (Starlette `Request`) or an ASGI scope."""
    scope = getattr(request_or_scope, "scope", request_or_scope)
    agent = (scope.get("state") or {}).get(STATE_KEY)
    if not isinstance(agent, VerifiedAgent):
        raise LookupError("no verified agent on this request (is TesseraMiddleware installed?)")
    return agent


def _quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def challenge_headers(err: VerificationError, *, allow_bearer: bool) -> list[tuple[bytes, bytes]]:
    """`WWW-Authenticate` (and `DPoP-Nonce`) for a refusal; no error code when the request
    carried no credentials (RFC 6750 §3.1)."""
    params = f'error="{_quote(err.error)}", error_description="{_quote(err.description)}", ' if err.error else ""
    out = [(b"www-authenticate", f'DPoP {params}algs="ES256"'.encode())]
    if allow_bearer:
        out.append((b"www-authenticate", f"Bearer {params.rstrip(', ')}".rstrip().encode()))
    if err.nonce:
        out.append((b"dpop-nonce", err.nonce.encode()))
    return out


def problem_body(err: VerificationError) -> bytes:
    titles = {401: "Unauthorized", 403: "Forbidden", 503: "Service Unavailable"}
    return json.dumps(
        {
            "type": f"urn:tessera:rp:{err.error or 'credentials-required'}",
            "title": titles.get(err.status, "Refused"),
            "status": err.status,
            "detail": err.description,
        }
    ).encode()


class TesseraMiddleware:
    """`app = TesseraMiddleware(app, Verifier("https://api.example.com"))`.

    The URL a proof must name is this service's: `public_url` (scheme://host[:port], what
    clients use, e.g. behind a proxy), else the request's scheme and `Host` header, which must
    then be one of `allowed_origins` (default: the origins of the verifier's URL audiences). A
    `Host` that is not one of them is refused: a proof made for another service, or another
    path smuggled in the `Host` header, never opens this one.
    `exempt`: paths served without an agent (health checks).
    """

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        verifier: Verifier,
        *,
        public_url: str | None = None,
        allowed_origins: Iterable[str] | None = None,
        exempt: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.verifier = verifier
        self.public_url = origin_of(public_url) if public_url else None
        if allowed_origins is None:
            allowed_origins = [a for a in verifier.audience if _is_http_url(a)]
        self.allowed_origins = frozenset(origin_of(o) for o in allowed_origins)
        self.exempt = frozenset(exempt)

    def _url(self, scope: Scope) -> str:
        # The path as sent (percent-encoded, mount prefixes included), not the decoded one.
        raw = scope.get("raw_path")
        path = raw.decode("latin-1").split("?", 1)[0] if raw else quote(scope.get("root_path", "") + scope.get("path", "/"))
        if self.public_url:
            return self.public_url + path
        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
        if not _HOST.fullmatch(host):
            raise VerificationError("invalid_request", "Host is not host[:port]", status=400)
        # A WebSocket handshake is an HTTP GET: proofs name its http(s) URL.
        scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
        origin = origin_of(f"{scheme}://{host}")
        if origin not in self.allowed_origins:
            raise VerificationError("invalid_request", f"{origin} is not this service", status=400)
        return origin + path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Lifespan events pass; every HTTP request and WebSocket handshake must be an agent's.
        if scope["type"] not in ("http", "websocket") or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])]
        method = scope.get("method", "GET")
        try:
            url = self._url(scope)
            # Off the event loop: a key refresh may wait on the network or the daemon.
            agent = await anyio.to_thread.run_sync(self.verifier.verify_request, method, url, headers)
        except VerificationError as err:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": err.error})
            else:
                await self._refuse(send, err)
            return
        scope.setdefault("state", {})[STATE_KEY] = agent
        await self.app(scope, receive, send)

    async def _refuse(self, send: Send, err: VerificationError) -> None:
        body = problem_body(err)
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        if err.status == 401:
            headers += challenge_headers(err, allow_bearer=not self.verifier.require_dpop)
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
