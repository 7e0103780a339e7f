"""Clients for the agent socket (`TESSERA_SOCKET`, default `/run/tessera/agent.sock`).

The daemon knows the caller from the kernel (peer credentials of the connection), so nothing
here carries a secret: the agent's key never leaves the TPM/HSM and this process never sees it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import httpx

from .errors import DaemonUnavailable, ProtocolError, problem_from

DEFAULT_SOCKET = "/run/tessera/agent.sock"
DEFAULT_TIMEOUT = 10.0


def default_socket() -> str:
    return os.environ.get("TESSERA_SOCKET") or DEFAULT_SOCKET


@dataclass(frozen=True)
class Token:
    """A token from `POST /v1/token`."""

    token: str
    token_type: str  # "Bearer" or "DPoP"
    expires_at: str  # RFC 3339
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def bound(self) -> bool:
        return self.token_type.lower() == "dpop"


@dataclass(frozen=True)
class Proof:
    """A proof from `POST /v1/proof` (DPoP/WPT: `proof`; RFC 9421: the two header values)."""

    type: str
    jti: str
    proof: str | None = None
    signature_input: str | None = None
    signature: str | None = None


def _token_body(
    audience: str,
    scopes: Iterable[str] | None,
    ttl: str | int | None,
    bind: str | None,
    agent: str | None,
    x5t_s256: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"audience": audience}
    if scopes:
        body["scopes"] = list(scopes)
    if ttl is not None:
        body["ttl"] = f"{ttl}s" if isinstance(ttl, int) else ttl
    if bind:
        body["bind"] = bind
    if agent:
        body["agent"] = agent
    if x5t_s256:
        body["x5t#S256"] = x5t_s256
    return body


def _drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _query(**params: str | None) -> dict[str, str]:
    return {k: v for k, v in params.items() if v is not None}


def _read(resp: httpx.Response, want: str) -> Any:
    if resp.status_code >= 400:
        try:
            body: Any = resp.json()
        except ValueError:
            body = resp.text
        raise problem_from(resp.status_code, body, resp.headers.get("retry-after"))
    if want == "text":
        return resp.text
    try:
        return resp.json()
    except ValueError as e:
        raise ProtocolError(f"tesserad sent no JSON: {e}") from e


def _token(v: Mapping[str, Any]) -> Token:
    try:
        return Token(str(v["token"]), str(v["token_type"]), str(v["expires_at"]), v)
    except KeyError as e:
        raise ProtocolError(f"token answer without {e}") from e


def _proof(v: Mapping[str, Any]) -> Proof:
    return Proof(
        type=str(v.get("type", "")),
        jti=str(v.get("jti", "")),
        proof=v.get("proof"),
        signature_input=v.get("signature_input"),
        signature=v.get("signature"),
    )


def _transport_kwargs(timeout: float) -> dict[str, Any]:
    # One request per connection: the daemon closes after each answer, and an idle
    # connection would count against this uid's share of its connection slots.
    return {
        "base_url": "http://tessera",
        "timeout": timeout,
        "headers": {"connection": "close"},
        "limits": httpx.Limits(max_keepalive_connections=0),
    }


class Client:
    """Synchronous client: `Client().token("https://api.example.com")`."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket = os.fspath(socket) if socket is not None else default_socket()
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=self.socket), **_transport_kwargs(timeout)
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, *, json_body: Any = None, params: Any = None, want: str = "json") -> Any:
        try:
            resp = self._http.request(
                method,
                path,
                params=params,
                content=None if json_body is None else json.dumps(json_body).encode(),
                headers={"content-type": "application/json"} if json_body is not None else None,
            )
        except (httpx.TransportError, OSError) as e:
            raise DaemonUnavailable(self.socket, str(e) or type(e).__name__) from e
        return _read(resp, want)

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/v1/health")

    def whoami(self, agent: str | None = None) -> dict[str, Any]:
        return self._call("GET", "/v1/whoami", params=_query(agent=agent))

    def token(
        self,
        audience: str,
        scopes: Iterable[str] | None = None,
        *,
        ttl: str | int | None = None,
        bind: str | None = None,
        agent: str | None = None,
        x5t_s256: str | None = None,
    ) -> Token:
        """A token for `audience`; `bind="dpop"` binds it to the agent's proof key."""
        return _token(self._call("POST", "/v1/token", json_body=_token_body(audience, scopes, ttl, bind, agent, x5t_s256)))

    def proof(self, type: str, **members: Any) -> Proof:
        """`POST /v1/proof` with the given members (see the daemon's API)."""
        return _proof(self._call("POST", "/v1/proof", json_body={"type": type, **_drop_none(members)}))

    def dpop_proof(
        self,
        htm: str,
        htu: str,
        *,
        access_token: str | None = None,
        ath: str | None = None,
        nonce: str | None = None,
        agent: str | None = None,
    ) -> Proof:
        """A DPoP proof (RFC 9449) for one request, signed by the daemon with the agent's proof key."""
        return self.proof("dpop", htm=htm, htu=htu, access_token=access_token, ath=ath, nonce=nonce, agent=agent)

    def wit(self, agent: str | None = None) -> dict[str, Any]:
        """A WIMSE Workload Identity Token (`wit`, `expires_at`)."""
        return self._call("GET", "/v1/wit", params=_query(agent=agent))

    def wpt(
        self, aud: str, wit: str, *, access_token: str | None = None, ttl: str | None = None, agent: str | None = None
    ) -> Proof:
        """A WIMSE Workload Proof Token for `aud`, going with `wit`."""
        return self.proof("wpt", aud=aud, wit=wit, access_token=access_token, ttl=ttl, agent=agent)

    def http_signature(self, method: str, target_uri: str, **members: Any) -> Proof:
        """An RFC 9421 signature (`Signature-Input`, `Signature`) made by the daemon."""
        return self.proof("http-signature", method=method, target_uri=target_uri, **members)

    def certificate(self, *, ttl: str | None = None, agent: str | None = None) -> str:
        """PEM chain: the agent's short-lived certificate, then the host CA."""
        return self._call("GET", "/v1/certificate", params=_query(ttl=ttl, agent=agent), want="text")

    def bundle(self) -> str:
        """The host CA certificate (PEM)."""
        return self._call("GET", "/v1/bundle", want="text")

    def spiffe_bundle(self) -> dict[str, Any]:
        """The SPIFFE trust bundle (JWT-SVID keys, WIT key, CA certificate)."""
        return self._call("GET", "/v1/bundle", params={"format": "spiffe"})

    def crl(self) -> str:
        return self._call("GET", "/v1/crl", want="text")

    def jwks(self) -> dict[str, Any]:
        """Every active agent's token key (a revoked key is gone at once)."""
        return self._call("GET", "/v1/jwks")

    def attestation(self, nonce: bytes | str, agent: str | None = None) -> dict[str, Any]:
        """Key attestation evidence for the agent's key (`nonce`: bytes or hex)."""
        hexed = nonce.hex() if isinstance(nonce, bytes) else nonce
        return self._call("GET", "/v1/attestation", params=_query(nonce=hexed, agent=agent))


class AsyncClient:
    """The same calls for asyncio/anyio code: `await AsyncClient().token(...)`."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket = os.fspath(socket) if socket is not None else default_socket()
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=self.socket), **_transport_kwargs(timeout)
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(
        self, method: str, path: str, *, json_body: Any = None, params: Any = None, want: str = "json"
    ) -> Any:
        try:
            resp = await self._http.request(
                method,
                path,
                params=params,
                content=None if json_body is None else json.dumps(json_body).encode(),
                headers={"content-type": "application/json"} if json_body is not None else None,
            )
        except (httpx.TransportError, OSError) as e:
            raise DaemonUnavailable(self.socket, str(e) or type(e).__name__) from e
        return _read(resp, want)

    async def health(self) -> dict[str, Any]:
        return await self._call("GET", "/v1/health")

    async def whoami(self, agent: str | None = None) -> dict[str, Any]:
        return await self._call("GET", "/v1/whoami", params=_query(agent=agent))

    async def token(
        self,
        audience: str,
        scopes: Iterable[str] | None = None,
        *,
        ttl: str | int | None = None,
        bind: str | None = None,
        agent: str | None = None,
        x5t_s256: str | None = None,
    ) -> Token:
        body = _token_body(audience, scopes, ttl, bind, agent, x5t_s256)
        return _token(await self._call("POST", "/v1/token", json_body=body))

    async def proof(self, type: str, **members: Any) -> Proof:
        return _proof(await self._call("POST", "/v1/proof", json_body={"type": type, **_drop_none(members)}))

    async def dpop_proof(
        self,
        htm: str,
        htu: str,
        *,
        access_token: str | None = None,
        ath: str | None = None,
        nonce: str | None = None,
        agent: str | None = None,
    ) -> Proof:
        return await self.proof("dpop", htm=htm, htu=htu, access_token=access_token, ath=ath, nonce=nonce, agent=agent)

    async def wit(self, agent: str | None = None) -> dict[str, Any]:
        return await self._call("GET", "/v1/wit", params=_query(agent=agent))

    async def wpt(
        self, aud: str, wit: str, *, access_token: str | None = None, ttl: str | None = None, agent: str | None = None
    ) -> Proof:
        return await self.proof("wpt", aud=aud, wit=wit, access_token=access_token, ttl=ttl, agent=agent)

    async def http_signature(self, method: str, target_uri: str, **members: Any) -> Proof:
        return await self.proof("http-signature", method=method, target_uri=target_uri, **members)

    async def certificate(self, *, ttl: str | None = None, agent: str | None = None) -> str:
        return await self._call("GET", "/v1/certificate", params=_query(ttl=ttl, agent=agent), want="text")

    async def bundle(self) -> str:
        return await self._call("GET", "/v1/bundle", want="text")

    async def spiffe_bundle(self) -> dict[str, Any]:
        return await self._call("GET", "/v1/bundle", params={"format": "spiffe"})

    async def crl(self) -> str:
        return await self._call("GET", "/v1/crl", want="text")

    async def jwks(self) -> dict[str, Any]:
        return await self._call("GET", "/v1/jwks")

    async def attestation(self, nonce: bytes | str, agent: str | None = None) -> dict[str, Any]:
        hexed = nonce.hex() if isinstance(nonce, bytes) else nonce
        return await self._call("GET", "/v1/attestation", params=_query(nonce=hexed, agent=agent))
