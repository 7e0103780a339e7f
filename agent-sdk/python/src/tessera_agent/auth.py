"""Attach the agent's identity to outgoing HTTP requests: `httpx.Client(auth=TesseraAuth())`.

Per request: a token for the target's audience (cached until half its life), and when the token
is bound (DPoP), a fresh proof made by the daemon for exactly this method and URL. A `DPoP-Nonce`
challenge (RFC 9449 §8/§9) is answered once.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any, AsyncGenerator, Callable, Generator, Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

import httpx

from .client import AsyncClient, Client, Token

AudienceSpec = str | Mapping[str, str] | Callable[[str], str] | None

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> str:
    """`scheme://host[:port]` of a URL, the port only when it is not the scheme's default."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is None or _DEFAULT_PORTS.get(scheme) == port:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def htu_of(url: str) -> str:
    """The DPoP `htu`: the request URL without query, fragment (RFC 9449 §4.2) and userinfo
    (a password in the URL must not end up in a proof)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path or "/", "", ""))


def nonce_challenge(status: int, headers: Mapping[str, str]) -> str | None:
    """The nonce a server asks the next proof to carry, or None."""
    nonce = headers.get("dpop-nonce")
    if not nonce:
        return None
    # A resource server's challenge (RFC 9449 §9). An authorization server's 400 is not
    # retried: its body would have to be read to know it is a nonce error, and a blind retry
    # would resend a POST body for any 400 that carries a nonce.
    if status == 401 and "use_dpop_nonce" in headers.get("www-authenticate", ""):
        return nonce
    return None


def _expiry(tok: Token) -> float:
    try:
        return datetime.fromisoformat(tok.expires_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


class _Flow:
    """What every adapter shares: audience choice, token cache, proofs, nonces."""

    def __init__(
        self,
        *,
        audience: AudienceSpec = None,
        scopes: Iterable[str] | None = None,
        ttl: str | int | None = None,
        bind: str = "auto",
        agent: str | None = None,
        socket: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        if bind not in ("auto", "dpop", "bearer"):
            raise ValueError("bind is 'auto', 'dpop' or 'bearer'")
        self.audience = audience
        # None: every scope the agent's policy allows (read from whoami once).
        self.scopes: tuple[str, ...] | None = None if scopes is None else tuple(scopes)
        self.ttl = ttl
        self.bind = bind
        self.agent = agent
        self.socket = socket
        self.timeout = timeout
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[Token, float]] = {}
        self._nonces: dict[str, str] = {}
        self._binding: str | None = None if bind == "auto" else bind
        self._client: Client | None = None

    # -- decisions --------------------------------------------------------------------------
    def audience_for(self, url: str) -> str:
        origin = origin_of(url)
        spec = self.audience
        if spec is None:
            return origin
        if isinstance(spec, str):
            return spec
        if callable(spec):
            return spec(url)
        aud = spec.get(origin)
        if aud is None:
            raise ValueError(f"no audience configured for {origin}")
        return aud

    def _learn(self, whoami: Mapping[str, Any]) -> None:
        """Fill in what was left to the policy: binding and scopes."""
        policy = whoami.get("policy") or {}
        if self._binding is None:
            self._binding = "dpop" if policy.get("require_binding") else "bearer"
        if self.scopes is None:
            self.scopes = tuple(policy.get("scopes") or ())

    def _needs_whoami(self) -> bool:
        return self._binding is None or self.scopes is None

    def _cached(self, aud: str) -> Token | None:
        with self._lock:
            hit = self._tokens.get(aud)
            if hit and time.time() < hit[1]:
                return hit[0]
            return None

    def _store(self, aud: str, tok: Token) -> None:
        now = time.time()
        refresh_at = now + max(0.0, _expiry(tok) - now) / 2
        with self._lock:
            self._tokens[aud] = (tok, refresh_at)

    def forget(self) -> None:
        """Drop cached tokens (the next request asks the daemon again)."""
        with self._lock:
            self._tokens.clear()

    @staticmethod
    def _headers(tok: Token, proof: str | None) -> dict[str, str]:
        if proof is not None:
            return {"authorization": f"DPoP {tok.token}", "dpop": proof}
        return {"authorization": f"Bearer {tok.token}"}

    # -- sync -------------------------------------------------------------------------------
    def _sync_client(self) -> Client:
        if self._client is None:
            self._client = Client(self.socket, timeout=self.timeout)
        return self._client

    def headers_sync(self, method: str, url: str, nonce: str | None = None) -> dict[str, str]:
        """The headers one request needs (asks the daemon for a token and proof as needed)."""
        c = self._sync_client()
        if self._needs_whoami():
            self._learn(c.whoami(self.agent))
        aud = self.audience_for(url)
        tok = self._cached(aud)
        if tok is None:
            bind = "dpop" if self._binding == "dpop" else None
            tok = c.token(aud, self.scopes, ttl=self.ttl, bind=bind, agent=self.agent)
            self._store(aud, tok)
        if not tok.bound:
            return self._headers(tok, None)
        nonce = nonce or self._nonces.get(origin_of(url))
        proof = c.dpop_proof(method.upper(), htu_of(url), access_token=tok.token, nonce=nonce, agent=self.agent)
        return self._headers(tok, proof.proof)

    # -- async ------------------------------------------------------------------------------
    async def headers_async(self, method: str, url: str, nonce: str | None = None) -> dict[str, str]:
        # A client per call: an httpx AsyncClient belongs to one event loop, and this auth
        # object may be shared by several.
        async with AsyncClient(self.socket, timeout=self.timeout) as c:
            if self._needs_whoami():
                self._learn(await c.whoami(self.agent))
            aud = self.audience_for(url)
            tok = self._cached(aud)
            if tok is None:
                bind = "dpop" if self._binding == "dpop" else None
                tok = await c.token(aud, self.scopes, ttl=self.ttl, bind=bind, agent=self.agent)
                self._store(aud, tok)
            if not tok.bound:
                return self._headers(tok, None)
            nonce = nonce or self._nonces.get(origin_of(url))
            proof = await c.dpop_proof(
                method.upper(), htu_of(url), access_token=tok.token, nonce=nonce, agent=self.agent
            )
            return self._headers(tok, proof.proof)

    def _note_nonce(self, url: str, status: int, headers: Mapping[str, str]) -> str | None:
        """Remember a server's nonce for later proofs; the challenge nonce when it asks for one."""
        fresh = headers.get("dpop-nonce")
        if fresh:
            with self._lock:
                self._nonces[origin_of(url)] = fresh
        return nonce_challenge(status, headers)

    # -- the httpx-style flows (httpx and httpx2 share this protocol) -----------------------
    requires_request_body = True  # so a nonce retry can resend the body

    def sync_auth_flow(self, request: Any) -> Generator[Any, Any, None]:
        request.read()
        url = str(request.url)
        request.headers.update(self.headers_sync(request.method, url))
        response = yield request
        # Only a challenge from the origin these credentials were made for is answered (with
        # redirects on, the response may come from elsewhere).
        nonce = self._note_nonce(str(response.request.url), response.status_code, response.headers)
        if nonce is not None and self._binding == "dpop" and origin_of(str(response.request.url)) == origin_of(url):
            request.headers.update(self.headers_sync(request.method, url, nonce))
            yield request

    async def async_auth_flow(self, request: Any) -> AsyncGenerator[Any, Any]:
        await request.aread()
        url = str(request.url)
        request.headers.update(await self.headers_async(request.method, url))
        response = yield request
        nonce = self._note_nonce(str(response.request.url), response.status_code, response.headers)
        if nonce is not None and self._binding == "dpop" and origin_of(str(response.request.url)) == origin_of(url):
            request.headers.update(await self.headers_async(request.method, url, nonce))
            yield request


class TesseraAuth(_Flow, httpx.Auth):
    """httpx auth (sync and async clients): `httpx.Client(auth=TesseraAuth())`.

    - `audience`: None (the request's origin), a string, a mapping origin → audience, or a
      function of the URL. A fixed string sends that one token to every origin the client
      calls: with bearer tokens, prefer the default or a mapping.

    Redirects (off by default in httpx) are not re-signed: a proof names one URL, so a
    redirected request fails at its new target rather than carrying credentials there.
    - `bind`: "auto" (DPoP when the agent's policy requires binding), "dpop" or "bearer".
    - `scopes`: None (every scope the agent's policy allows) or the scopes to ask for.
    - `ttl`, `agent` (when the process matches several agents), `socket`.
    """
