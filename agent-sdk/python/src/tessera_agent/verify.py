"""The relying party's side: is this request from an agent, which one, and may it do this?

Signatures are checked by PyJWT; this module only decides which keys, claims and proofs count.
ES256, and RS256 for tokens of agents with RSA keys (the published key decides which): any other
`alg` (`none`, HS256 with a public key as secret, ...) is refused before any key is looked at.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, TypeVar
from urllib.parse import urlsplit

import httpx
import jwt

from .auth import origin_of
from .client import Client, default_socket
from .errors import InsufficientScope, ReplayCacheFull, TesseraError, VerificationError

ALG = "ES256"
_TOKEN_KEY_USES = (None, "sig", "jwt-svid")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of a public EC or RSA JWK."""
    if jwk.get("kty") == "EC":
        members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    elif jwk.get("kty") == "RSA":
        members = {k: jwk[k] for k in ("e", "kty", "n")}
    else:
        raise VerificationError("invalid_dpop_proof", f"unsupported key type {jwk.get('kty')!r}")
    canon = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return b64url(hashlib.sha256(canon).digest())


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _normalize_path(path: str) -> str:
    """RFC 3986 §6.2.2: percent-encodings in upper case, unreserved characters decoded."""

    def fix(m: re.Match[str]) -> str:
        ch = chr(int(m.group(1), 16))
        return ch if ch in _UNRESERVED else "%" + m.group(1).upper()

    return re.sub(r"%([0-9A-Fa-f]{2})", fix, path or "/")


def normalize_url(url: str) -> str:
    """Scheme and host lower-case, default port dropped, path percent-encoding normalised, no
    query, fragment or userinfo: how `htu` and a WPT `aud` are compared with the request's URL.
    A URL that does not parse raises `VerificationError`."""
    if not isinstance(url, str):
        raise VerificationError("invalid_dpop_proof", "URL is not a string")
    try:
        return origin_of(url) + _normalize_path(urlsplit(url).path)
    except ValueError as e:
        raise VerificationError("invalid_dpop_proof", f"URL does not parse: {e}") from e


@dataclass(frozen=True)
class VerifiedAgent:
    """Who called: the agent's SPIFFE ID (`id`), what it may do (`scopes`), and how it proved it."""

    id: str
    scopes: frozenset[str]
    jti: str
    issuer: str
    expires_at: int
    bound: bool
    proof: str  # "bearer", "dpop" or "wpt"
    claims: Mapping[str, Any] = field(repr=False)

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def require(self, scope: str) -> None:
        """Raise `InsufficientScope` (403) unless the agent's token carries `scope`."""
        if scope not in self.scopes:
            raise InsufficientScope(scope)


class ReplayCache:
    """Proof `jti`s seen, each kept until its acceptance window ends. Bounded: when full of
    unexpired entries it refuses new proofs (fail closed) rather than forgetting old ones."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._until: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._until)

    def add(self, jti: str, until: float, now: float | None = None) -> None:
        """Record `jti` until `until`; raise if it was seen (replay) or the cache is full."""
        now = time.time() if now is None else now
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                t, old = heapq.heappop(self._heap)
                if self._until.get(old) == t:
                    del self._until[old]
            if jti in self._until:
                raise VerificationError("invalid_dpop_proof", "proof replayed (jti seen before)")
            if len(self._until) >= self.max_entries:
                raise ReplayCacheFull()
            self._until[jti] = until
            heapq.heappush(self._heap, (until, jti))


class DpopNonces:
    """Server nonces (RFC 9449 §9) that need no storage: a timestamp and its HMAC."""

    def __init__(self, lifetime: float = 300.0, secret: bytes | None = None) -> None:
        self.lifetime = lifetime
        self._secret = secret or secrets.token_bytes(32)

    def issue(self, now: float | None = None) -> str:
        ts = int(time.time() if now is None else now).to_bytes(8, "big")
        return b64url(ts + hmac.new(self._secret, ts, hashlib.sha256).digest()[:16])

    def valid(self, nonce: str | None, now: float | None = None) -> bool:
        if not nonce or len(nonce) > 64:
            return False
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except ValueError:
            return False
        if len(raw) != 24:
            return False
        ts, mac = raw[:8], raw[8:]
        if not hmac.compare_digest(mac, hmac.new(self._secret, ts, hashlib.sha256).digest()[:16]):
            return False
        age = (time.time() if now is None else now) - int.from_bytes(ts, "big")
        return -5 <= age <= self.lifetime


class _KeySource:
    """Public keys by `kid`, from a JWKS URL, a SPIFFE bundle URL or the local agent socket.

    Re-fetched when older than `max_age`, and (at most every `min_interval`) for an unknown
    `kid`, so a revoked agent's key stops counting soon after it leaves the set. One fetch at a
    time, outside the lock readers take; a failed fetch is not retried before `min_interval`,
    and the keys already held keep serving until they are `2 * max_age` old (then: 503)."""

    MAX_BYTES = 1 << 20

    def __init__(
        self,
        *,
        jwks: Mapping[str, Any] | None,
        jwks_url: str | None,
        bundle_url: str | None,
        socket: str | None,
        max_age: float,
        min_interval: float,
    ) -> None:
        self._static = jwks
        self._jwks_url = jwks_url
        self._bundle_url = bundle_url
        self._socket = socket
        self._max_age = max_age
        self._min_interval = min_interval
        self._keys: list[Mapping[str, Any]] = list(jwks.get("keys", [])) if jwks else []
        self._fetched = float("-inf")
        self._attempted = float("-inf")
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()

    def _fetch(self) -> list[Mapping[str, Any]]:
        keys: list[Mapping[str, Any]] = []
        try:
            if self._jwks_url or self._bundle_url:
                for url in (self._jwks_url, self._bundle_url):
                    if url:
                        r = httpx.get(url, timeout=10.0)
                        r.raise_for_status()
                        if len(r.content) > self.MAX_BYTES:
                            raise ValueError(f"{url}: key set over {self.MAX_BYTES} bytes")
                        keys.extend(r.json().get("keys", []))
            elif self._socket is not None:
                # The SPIFFE bundle has both: agent keys (`jwt-svid`) and the WIT key (`wit-svid`).
                with Client(self._socket) as c:
                    keys.extend(c.spiffe_bundle().get("keys", []))
        except (httpx.HTTPError, TesseraError, ValueError, AttributeError) as e:
            raise VerificationError("temporarily_unavailable", f"cannot fetch keys: {e}", status=503) from e
        return [k for k in keys if isinstance(k, Mapping)]

    def _refresh(self) -> None:
        with self._fetch_lock:
            started = time.monotonic()
            if started - self._attempted >= self._min_interval:
                self._attempted = started
                try:
                    keys = self._fetch()
                except VerificationError:
                    keys = None
                if keys is not None:
                    with self._lock:
                        self._keys, self._fetched = keys, started
                    return
            # No fresh set: the keys held serve unless the last fetch failed and they are
            # too old to trust.
            with self._lock:
                failed = self._fetched < self._attempted
                too_old = time.monotonic() - self._fetched > 2 * self._max_age
            if failed and too_old:
                raise VerificationError("temporarily_unavailable", "cannot fetch keys", status=503)

    def find(self, kid: str, uses: Iterable[str | None]) -> Mapping[str, Any] | None:
        uses = tuple(uses)
        if self._static is not None:
            return self._match(self._keys, kid, uses)
        with self._lock:
            keys, age = self._keys, time.monotonic() - self._fetched
        hit = self._match(keys, kid, uses)
        if age > self._max_age or hit is None:
            self._refresh()
            with self._lock:
                keys = self._keys
            hit = self._match(keys, kid, uses)
        return hit

    @staticmethod
    def _match(keys: list[Mapping[str, Any]], kid: str, uses: tuple[str | None, ...]) -> Mapping[str, Any] | None:
        for k in keys:
            if k.get("kid") == kid and k.get("use") in uses:
                return k
        return None


_F = TypeVar("_F", bound=Callable[..., Any])


def _refusing(error: str) -> Callable[[_F], _F]:
    """Whatever a hostile credential makes the parsing raise is a refusal, never a crash (a 500
    where a 401 belongs)."""

    def wrap(f: _F) -> _F:
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return f(*args, **kwargs)
            except VerificationError:
                raise
            except (ValueError, TypeError, OverflowError, AttributeError, KeyError, IndexError) as e:
                raise VerificationError(error, f"malformed credential ({type(e).__name__})") from e

        inner.__doc__ = f.__doc__
        inner.__name__ = f.__name__
        return inner  # type: ignore[return-value]

    return wrap


def _header(token: str, what: str, error: str, algs: tuple[str, ...] = (ALG,)) -> dict[str, Any]:
    try:
        h = jwt.get_unverified_header(token)
    except jwt.PyJWTError as e:
        raise VerificationError(error, f"{what} is not a JWT: {e}") from e
    if h.get("alg") not in algs:
        raise VerificationError(error, f"{what} alg {h.get('alg')!r} is not {' or '.join(algs)}")
    return h


def _alg_of(jwk: Mapping[str, Any]) -> str:
    """The algorithm a published key is used with: RS256 for RSA agent keys, else ES256."""
    return "RS256" if jwk.get("kty") == "RSA" else ALG


def _public_key(jwk: Mapping[str, Any], error: str, alg: str = ALG) -> Any:
    private = any(m in jwk for m in ("d", "p", "q", "dp", "dq", "qi"))
    if alg == "RS256":
        if jwk.get("kty") != "RSA" or private:
            raise VerificationError(error, "key is not a public RSA key")
    elif jwk.get("kty") != "EC" or jwk.get("crv") != "P-256" or private:
        raise VerificationError(error, "key is not a public P-256 key")
    try:
        return jwt.PyJWK(dict(jwk), algorithm=alg).key
    except (jwt.PyJWTError, ValueError, TypeError) as e:
        raise VerificationError(error, f"unusable key: {e}") from e


def _decode(token: str, key: Any, error: str, alg: str = ALG, **kwargs: Any) -> dict[str, Any]:
    try:
        return jwt.decode(token, key, algorithms=[alg], **kwargs)
    except jwt.PyJWTError as e:
        raise VerificationError(error, str(e)) from e


def _headers_of(headers: Any) -> dict[str, list[str]]:
    """Header name (lower-case) → every value, from a mapping or a list of pairs."""
    out: dict[str, list[str]] = {}
    items = headers.multi_items() if hasattr(headers, "multi_items") else (
        headers.items() if isinstance(headers, Mapping) else headers
    )
    for k, v in items:
        k = k.decode("latin-1") if isinstance(k, bytes) else k
        v = v.decode("latin-1") if isinstance(v, bytes) else v
        out.setdefault(k.lower(), []).append(v)
    return out


class Verifier:
    """Checks agent tokens, DPoP proofs and WIMSE WIT+WPT pairs.

    Keys: `jwks` (a JWKS dict), `jwks_url` (+ `bundle_url`, a SPIFFE bundle with the WIT key),
    or by default the local daemon's SPIFFE bundle over `socket`/`TESSERA_SOCKET`.
    """

    def __init__(
        self,
        audience: str | Iterable[str],
        *,
        issuer: str | None = None,
        jwks: Mapping[str, Any] | None = None,
        jwks_url: str | None = None,
        bundle_url: str | None = None,
        socket: str | os.PathLike[str] | None = None,
        leeway: float = 5.0,
        proof_max_age: float = 60.0,
        require_dpop: bool = False,
        nonces: DpopNonces | None = None,
        replay: ReplayCache | None = None,
        keys_max_age: float = 30.0,
        keys_min_interval: float = 5.0,
    ) -> None:
        self.audience = [audience] if isinstance(audience, str) else list(audience)
        self.issuer = issuer
        self.leeway = leeway
        self.proof_max_age = proof_max_age
        self.require_dpop = require_dpop
        self.nonces = nonces
        self.replay = replay or ReplayCache()
        sock = None
        if jwks is None and jwks_url is None and bundle_url is None:
            sock = os.fspath(socket) if socket is not None else default_socket()
        self._keys = _KeySource(
            jwks=jwks,
            jwks_url=jwks_url,
            bundle_url=bundle_url,
            socket=sock,
            max_age=keys_max_age,
            min_interval=keys_min_interval,
        )

    # -- tokens -----------------------------------------------------------------------------
    @_refusing("invalid_token")
    def verify_token(self, token: str) -> dict[str, Any]:
        """The claims of an agent token, or `VerificationError("invalid_token", ...)`."""
        # Agent tokens are ES256, or RS256 from agents with RSA keys (the key decides).
        h = _header(token, "token", "invalid_token", (ALG, "RS256"))
        # Typed: a DPoP proof, WIT or WPT signed by a key this trusts is not a token.
        if h.get("typ") != "JWT":
            raise VerificationError("invalid_token", f"typ {h.get('typ')!r} is not JWT")
        kid = h.get("kid")
        if not isinstance(kid, str):
            raise VerificationError("invalid_token", "token has no kid")
        jwk = self._keys.find(kid, _TOKEN_KEY_USES)
        if jwk is None:
            raise VerificationError("invalid_token", "unknown key (agent revoked or not of this trust domain)")
        alg = _alg_of(jwk)
        if h.get("alg") != alg:
            raise VerificationError("invalid_token", f"alg {h.get('alg')!r} does not match the key ({alg})")
        require = ["exp", "iat", "iss", "sub", "aud", "jti"]
        claims = _decode(
            token,
            _public_key(jwk, "invalid_token", alg),
            "invalid_token",
            alg,
            audience=self.audience,
            issuer=self.issuer,
            leeway=self.leeway,
            options={"require": require, "verify_iss": self.issuer is not None},
        )
        return claims

    # -- DPoP -------------------------------------------------------------------------------
    @_refusing("invalid_dpop_proof")
    def verify_dpop(
        self, proof: str, *, method: str, url: str, access_token: str | None, jkt: str | None
    ) -> dict[str, Any]:
        """RFC 9449 §4.3 checks of one proof; returns its claims."""
        err = "invalid_dpop_proof"
        h = _header(proof, "DPoP proof", err)
        if h.get("typ") != "dpop+jwt":
            raise VerificationError(err, f"typ {h.get('typ')!r} is not dpop+jwt")
        jwk = h.get("jwk")
        if not isinstance(jwk, dict):
            raise VerificationError(err, "no jwk in the proof header")
        # Before any signature work: a proof by a key other than the token's is refused cheaply.
        if jkt is not None and jwk_thumbprint(jwk) != jkt:
            raise VerificationError("invalid_token", "token is bound to another key (cnf.jkt)")
        key = _public_key(jwk, err)
        claims = _decode(
            proof, key, err, leeway=self.leeway, options={"require": ["jti", "htm", "htu", "iat"], "verify_aud": False}
        )
        now = time.time()
        iat = claims["iat"]
        if not isinstance(iat, (int, float)) or iat < now - self.proof_max_age - self.leeway:
            raise VerificationError(err, "proof too old")
        if claims["htm"] != method.upper():
            raise VerificationError(err, f"htm {claims['htm']!r} is not {method.upper()!r}")
        if not isinstance(claims["htu"], str) or normalize_url(claims["htu"]) != normalize_url(url):
            raise VerificationError(err, f"htu {claims['htu']!r} is not this request's URL")
        if access_token is not None:
            want = b64url(hashlib.sha256(access_token.encode()).digest())
            if claims.get("ath") != want:
                raise VerificationError(err, "ath is not the hash of the access token")
        nonce = claims.get("nonce")
        if self.nonces is not None and not (isinstance(nonce, str) and self.nonces.valid(nonce)):
            raise VerificationError("use_dpop_nonce", "use the server's DPoP nonce", nonce=self.nonces.issue())
        # Last: only a proof that passed every check uses up a cache slot.
        self.replay.add(f"dpop:{claims['jti']}", iat + self.proof_max_age + 2 * self.leeway, now)
        return claims

    # -- WIMSE ------------------------------------------------------------------------------
    @_refusing("invalid_token")
    def verify_wimse(self, wit: str, wpt: str, *, url: str, access_token: str | None = None) -> dict[str, Any]:
        """A WIT (signed by the trust domain's WIT key) and a WPT (signed by the key the WIT
        binds) for this URL; returns the WIT's claims."""
        err = "invalid_token"
        h = _header(wit, "WIT", err)
        if h.get("typ") != "wit+jwt" or not isinstance(h.get("kid"), str):
            raise VerificationError(err, "not a WIT (typ wit+jwt with a kid)")
        jwk = self._keys.find(h["kid"], ("wit-svid",))
        if jwk is None:
            raise VerificationError(err, "WIT key not in the trust bundle")
        # A WIT's issuer is the host's SPIFFE ID whatever `issuer` tokens carry (federation).
        wc = _decode(
            wit,
            _public_key(jwk, err),
            err,
            leeway=self.leeway,
            options={"require": ["iss", "sub", "exp", "jti"], "verify_aud": False},
        )
        if not str(wc["iss"]).startswith("spiffe://") or not str(wc["sub"]).startswith("spiffe://"):
            raise VerificationError(err, "WIT iss and sub are SPIFFE IDs")
        cnf_claim = wc.get("cnf")
        cnf = cnf_claim.get("jwk") if isinstance(cnf_claim, dict) else None
        if not isinstance(cnf, dict):
            raise VerificationError(err, "WIT without cnf.jwk")
        ph = _header(wpt, "WPT", "invalid_token")
        if ph.get("typ") != "wpt+jwt":
            raise VerificationError(err, "not a WPT (typ wpt+jwt)")
        pc = _decode(
            wpt,
            _public_key(cnf, err),
            err,
            leeway=self.leeway,
            options={"require": ["aud", "exp", "jti", "wth"], "verify_aud": False},
        )
        if not isinstance(pc["aud"], str) or normalize_url(pc["aud"]) != normalize_url(url):
            raise VerificationError(err, "WPT aud is not this request's URL")
        now = time.time()
        if float(pc["exp"]) - now > 300 + self.leeway:
            raise VerificationError(err, "WPT lives over 5 minutes")
        if pc["wth"] != b64url(hashlib.sha256(wit.encode()).digest()):
            raise VerificationError(err, "wth is not the WIT's hash")
        if access_token is not None and pc.get("ath") != b64url(hashlib.sha256(access_token.encode()).digest()):
            raise VerificationError(err, "ath is not the hash of the access token")
        self.replay.add(f"wpt:{pc['jti']}", float(pc["exp"]) + self.leeway, now)
        return wc

    # -- a whole request --------------------------------------------------------------------
    @_refusing("invalid_token")
    def verify_request(self, method: str, url: str, headers: Any) -> VerifiedAgent:
        """Authorization (`Bearer`/`DPoP`) with its `DPoP` proof, or `Workload-Identity-Token` +
        `Workload-Proof-Token`. Raises `VerificationError` with the OAuth error to answer."""
        hs = _headers_of(headers)
        wits = hs.get("workload-identity-token", [])
        if wits:
            wpts = hs.get("workload-proof-token", [])
            if len(wits) != 1 or len(wpts) != 1:
                raise VerificationError("invalid_token", "exactly one WIT and one WPT")
            wc = self.verify_wimse(wits[0], wpts[0], url=url)
            return VerifiedAgent(
                id=wc["sub"], scopes=frozenset(), jti=wc["jti"], issuer=wc["iss"],
                expires_at=int(wc["exp"]), bound=True, proof="wpt", claims=wc,
            )
        auths = hs.get("authorization", [])
        if not auths:
            # No credentials at all: a challenge without an error code (RFC 6750 §3.1).
            raise VerificationError("", "this resource needs an agent's credentials")
        if len(auths) != 1:
            raise VerificationError("invalid_request", "one Authorization header")
        scheme, _, token = auths[0].partition(" ")
        token = token.strip()
        scheme = scheme.lower()
        if scheme not in ("dpop", "bearer") or not token:
            raise VerificationError("invalid_token", "Authorization is not DPoP or Bearer")
        claims = self.verify_token(token)
        cnf = claims.get("cnf")
        if cnf is not None and not isinstance(cnf, dict):
            raise VerificationError("invalid_token", "cnf is not an object")
        jkt = cnf.get("jkt") if cnf else None
        if scheme == "bearer":
            if cnf:
                raise VerificationError("invalid_token", "a bound token needs its proof (Authorization: DPoP)")
            if self.require_dpop:
                raise VerificationError("invalid_token", "this resource accepts DPoP-bound tokens only")
            proof = "bearer"
        else:
            proofs = hs.get("dpop", [])
            if len(proofs) != 1:
                raise VerificationError("invalid_dpop_proof", "exactly one DPoP header")
            if not isinstance(jkt, str):
                raise VerificationError("invalid_token", "DPoP with a token that is not DPoP-bound")
            self.verify_dpop(proofs[0], method=method, url=url, access_token=token, jkt=jkt)
            proof = "dpop"
        scope = claims.get("scope", "")
        return VerifiedAgent(
            id=claims["sub"],
            scopes=frozenset(scope.split()) if isinstance(scope, str) else frozenset(),
            jti=claims["jti"],
            issuer=claims["iss"],
            expires_at=int(claims["exp"]),
            bound=jkt is not None,
            proof=proof,
            claims=claims,
        )
