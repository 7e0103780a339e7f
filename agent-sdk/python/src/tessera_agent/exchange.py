"""Federation: trade a fresh tessera assertion for a token service's access token, in this
process (the daemon makes no outbound calls).

- RFC 7523 JWT bearer grant (`assertion`), form-encoded: ``Exchanger(token_endpoint)``;
- RFC 8693 token exchange (`subject_token`): ``Exchanger(token_endpoint, grant="token-exchange")``;
- RFC 7523 §2.2 client authentication (`client_credentials` with `client_assertion`, Microsoft
  Entra; an RS256 agent): ``Exchanger(token_endpoint, grant="client-assertion", audience=ENTRA_AUDIENCE)``;
- the Claude API (JSON body with `federation_rule_id`, `organization_id`, `service_account_id`,
  `workspace_id`): ``Exchanger.anthropic(rule, org, service_account)``.

Each exchange asks the daemon for a new assertion (a token service takes each `jti` once). The
access token is cached and refreshed ahead of expiry: from ADVISORY_REFRESH before, a failed
refresh still returns the cached token; from MANDATORY_REFRESH before, the failure is raised.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import httpx

from .client import Client
from .errors import TesseraError

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ENTRA_AUDIENCE = "api://AzureADTokenExchange"
ANTHROPIC_TOKEN_ENDPOINT = "https://api.anthropic.com/v1/oauth/token"
ANTHROPIC_AUDIENCE = "https://api.anthropic.com"
ADVISORY_REFRESH = 120.0
MANDATORY_REFRESH = 30.0
MAX_LIFETIME = 30 * 24 * 3600.0  # the longest `expires_in` believed
MAX_ANSWER = 1 << 20  # the largest token endpoint answer read


class ExchangeError(TesseraError):
    """The token endpoint refused (`error`, `error_description` as RFC 6749 §5.2 says), could
    not be reached, or answered something unreadable."""

    def __init__(self, message: str, *, status: int | None = None, error: str | None = None,
                 description: str | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.description = description
        self.body = body


@dataclass(frozen=True)
class AccessToken:
    access_token: str
    token_type: str | None
    expires_at: float | None  # Unix time, from `expires_in`
    response: Mapping[str, Any] = field(default_factory=dict, repr=False)


class Exchanger:
    """An access token from one token endpoint, for this process's agent."""

    def __init__(
        self,
        token_endpoint: str,
        *,
        audience: str | None = None,
        grant: str = "jwt-bearer",
        params: Mapping[str, str] | None = None,
        json_body: bool = False,
        client: Client | None = None,
        agent: str | None = None,
        verify: Any = True,
        timeout: float = 30.0,
    ) -> None:
        _check_endpoint(token_endpoint)
        if grant not in ("jwt-bearer", "token-exchange", "client-assertion"):
            raise ValueError("grant is 'jwt-bearer', 'token-exchange' or 'client-assertion'")
        self.token_endpoint = token_endpoint
        self.audience = audience or token_endpoint
        self.grant = grant
        self.params = dict(params or {})
        self.json_body = json_body
        self.agent = agent
        self._client = client or Client()
        self._http = httpx.Client(verify=verify, timeout=timeout)
        self._lock = threading.Lock()
        self._cached: AccessToken | None = None

    @classmethod
    def anthropic(
        cls,
        federation_rule_id: str,
        organization_id: str,
        service_account_id: str,
        workspace_id: str | None = None,
        **kw: Any,
    ) -> "Exchanger":
        params = {
            "federation_rule_id": federation_rule_id,
            "organization_id": organization_id,
            "service_account_id": service_account_id,
        }
        if workspace_id:
            params["workspace_id"] = workspace_id
        kw.setdefault("audience", ANTHROPIC_AUDIENCE)
        endpoint = kw.pop("token_endpoint", ANTHROPIC_TOKEN_ENDPOINT)
        return cls(endpoint, params=params, json_body=True, **kw)

    def request_body(self, assertion: str) -> dict[str, str]:
        if self.grant == "jwt-bearer":
            body = {"grant_type": JWT_BEARER, "assertion": assertion}
        elif self.grant == "client-assertion":
            body = {
                "grant_type": "client_credentials",
                "client_assertion_type": CLIENT_ASSERTION_TYPE,
                "client_assertion": assertion,
            }
        else:
            body = {"grant_type": TOKEN_EXCHANGE, "subject_token": assertion, "subject_token_type": JWT_TOKEN_TYPE}
        body.update(self.params)
        return body

    def exchange(self) -> AccessToken:
        """One exchange with a fresh assertion (no cache)."""
        assertion = self._client.token(self.audience, agent=self.agent).token
        body = self.request_body(assertion)
        if self.json_body:
            kw: dict[str, Any] = {"content": json.dumps(body).encode(),
                                  "headers": {"content-type": "application/json", "accept": "application/json"}}
        else:
            kw = {"data": body, "headers": {"accept": "application/json"}}
        try:
            with self._http.stream("POST", self.token_endpoint, **kw) as resp:
                data = b""
                for chunk in resp.iter_bytes():
                    data += chunk
                    if len(data) > MAX_ANSWER:
                        raise ExchangeError(f"token endpoint answer over {MAX_ANSWER} bytes", status=resp.status_code)
                status = resp.status_code
        except httpx.HTTPError as e:
            raise ExchangeError(f"cannot reach the token endpoint: {e}") from e
        return parse_answer(status, data)

    def access_token(self) -> AccessToken:
        """The cached token while it has more than ADVISORY_REFRESH left, else a new one."""
        with self._lock:
            now = time.time()
            t = self._cached
            left = None if t is None or t.expires_at is None else t.expires_at - now
            if t is not None and left is not None and left > ADVISORY_REFRESH:
                return t
            try:
                new = self.exchange()
            except TesseraError:
                if t is not None and left is not None and left > MANDATORY_REFRESH:
                    return t
                raise
            self._cached = new if new.expires_at is not None else None
            return new

    def invalidate(self) -> None:
        with self._lock:
            self._cached = None

    def close(self) -> None:
        self._http.close()


def _check_endpoint(url: str) -> None:
    """https, or http to a loopback address (local test servers): the assertion is a bearer
    credential for up to an hour and must not cross a network in the clear."""
    u = httpx.URL(url)
    loopback = u.host in ("127.0.0.1", "::1", "localhost")
    if u.scheme != "https" and not (u.scheme == "http" and loopback):
        raise ValueError(f"token endpoint {url!r} must be https (or http to loopback)")
    if u.userinfo or u.fragment:
        raise ValueError(f"token endpoint {url!r} must not carry user info or a fragment")


def parse_answer(status: int, body: bytes, now: float | None = None) -> AccessToken:
    """RFC 6749 §5.1 (the token and its lifetime) or §5.2 (the refusal)."""
    try:
        v = json.loads(body)
    except ValueError:
        v = None
    if not 200 <= status < 300:
        err = v.get("error") if isinstance(v, dict) else None
        desc = v.get("error_description") if isinstance(v, dict) else None
        raise ExchangeError(
            f"token endpoint refused ({status}): {err or 'no error code'}" + (f": {desc}" if desc else ""),
            status=status, error=err, description=desc, body=v if v is not None else body[:2000],
        )
    if not isinstance(v, dict) or not isinstance(v.get("access_token"), str) or not v["access_token"]:
        raise ExchangeError("token endpoint answered without an access_token", status=status, body=v)
    expires_in = v.get("expires_in")
    try:
        secs = float(expires_in) if expires_in is not None else None
    except (TypeError, ValueError):
        secs = None
    if secs is not None and not (secs >= 0 and secs != float("inf")):
        secs = None  # negative, NaN or infinite: not a lifetime
    expires_at = None if secs is None else (now if now is not None else time.time()) + min(secs, MAX_LIFETIME)
    return AccessToken(v["access_token"], v.get("token_type"), expires_at, v)
