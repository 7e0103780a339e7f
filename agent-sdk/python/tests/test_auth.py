"""TesseraAuth (httpx sync/async, requests, httpx2) against a service verifying with the SDK's
middleware, both on the real daemon."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest
import requests
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import tessera_agent as t
from tessera_agent.asgi import TesseraMiddleware, agent_of
from tessera_agent.requests_auth import TesseraRequestsAuth
from conftest import free_port, unique


class Service:
    """A service that records what each verified request carried."""

    def __init__(self, serve, daemon, *, nonces: bool = False, dpop_only: bool = False, keys_max_age: float = 30.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen: list[dict] = []
        self.verifier = t.Verifier(
            self.url,
            nonces=t.DpopNonces() if nonces else None,
            require_dpop=dpop_only,
            keys_max_age=keys_max_age,
            keys_min_interval=0.0,
        )

        async def whoami(request: Request) -> JSONResponse:
            a = agent_of(request)
            self.seen.append(
                {
                    "id": a.id,
                    "jti": a.jti,
                    "proof": a.proof,
                    "scopes": sorted(a.scopes),
                    "authorization": request.headers.get("authorization"),
                    "dpop": request.headers.get("dpop"),
                    "body": (await request.body()).decode(),
                }
            )
            return JSONResponse({"agent": a.id, "proof": a.proof})

        app = Starlette(routes=[Route("/whoami", whoami, methods=["GET", "POST"])])
        serve(TesseraMiddleware(app, self.verifier), self.port)


def enrol(daemon, prefix: str, port: int, extra: str = "") -> str:
    name = unique(prefix)
    daemon.enrol(name, f'audiences = ["http://127.0.0.1:{port}"]\nscopes = ["read", "write"]\n{extra}')
    return name


def test_bearer_token_is_attached_and_cached(daemon, serve):
    svc = Service(serve, daemon)
    name = enrol(daemon, "bearer", svc.port)
    with httpx.Client(auth=t.TesseraAuth(agent=name)) as http:
        for _ in range(2):
            r = http.get(f"{svc.url}/whoami")
            assert r.status_code == 200, r.text
    a, b = svc.seen
    assert a["proof"] == "bearer" and a["authorization"].startswith("Bearer ")
    assert a["jti"] == b["jti"], "the token is reused until half its life"
    assert a["scopes"] == ["read", "write"], "by default the token carries the policy's scopes"


def test_token_is_refreshed_after_half_its_life(daemon, serve):
    svc = Service(serve, daemon)
    name = enrol(daemon, "refresh", svc.port)
    with httpx.Client(auth=t.TesseraAuth(agent=name, ttl="2s", scopes=["read"])) as http:
        assert http.get(f"{svc.url}/whoami").status_code == 200
        assert http.get(f"{svc.url}/whoami").status_code == 200
        time.sleep(1.2)
        assert http.get(f"{svc.url}/whoami").status_code == 200
    jtis = [s["jti"] for s in svc.seen]
    assert jtis[0] == jtis[1] != jtis[2]
    assert svc.seen[0]["scopes"] == ["read"]


def test_dpop_proof_per_request_and_replay_refused(daemon, serve):
    svc = Service(serve, daemon, dpop_only=True)
    name = enrol(daemon, "dpop", svc.port, "require_binding = true")
    with httpx.Client(auth=t.TesseraAuth(agent=name)) as http:
        r1 = http.post(f"{svc.url}/whoami", content=b"one")
        r2 = http.post(f"{svc.url}/whoami?q=2", content=b"two")
    assert r1.status_code == r2.status_code == 200, (r1.text, r2.text)
    a, b = svc.seen
    assert a["proof"] == b["proof"] == "dpop"
    assert a["authorization"].startswith("DPoP ") and a["authorization"] == b["authorization"]
    assert a["dpop"] != b["dpop"], "a fresh proof for every request"
    # The same proof again (a captured request replayed) is refused.
    replay = httpx.post(
        f"{svc.url}/whoami", content=b"one", headers={"authorization": a["authorization"], "dpop": a["dpop"]}
    )
    assert replay.status_code == 401
    assert 'error="invalid_dpop_proof"' in replay.headers["www-authenticate"]
    assert replay.headers["content-type"] == "application/problem+json"
    # A bound token without its proof is refused, and so is a bearer token here.
    bare = httpx.get(f"{svc.url}/whoami", headers={"authorization": "Bearer " + a["authorization"][5:]})
    assert bare.status_code == 401 and "DPoP" in bare.headers["www-authenticate"]
    # A proof made for another URL does not open this one.
    other = t.Client().dpop_proof("GET", f"{svc.url}/other", access_token=a["authorization"][5:], agent=name)
    r = httpx.get(f"{svc.url}/whoami", headers={"authorization": a["authorization"], "dpop": other.proof})
    assert r.status_code == 401 and "htu" in r.json()["detail"]


def test_nonce_challenge_is_answered_once(daemon, serve):
    svc = Service(serve, daemon, nonces=True)
    name = enrol(daemon, "nonce", svc.port, "require_binding = true")
    seen_statuses: list[int] = []

    def hook(response: httpx.Response) -> None:
        seen_statuses.append(response.status_code)

    with httpx.Client(auth=t.TesseraAuth(agent=name), event_hooks={"response": [hook]}) as http:
        r = http.post(f"{svc.url}/whoami", content=b"body survives the retry")
        assert r.status_code == 200, r.text
        assert [h.status_code for h in r.history] == [401]
        r2 = http.get(f"{svc.url}/whoami")
        assert r2.status_code == 200, r2.text
    # One challenge, answered once; the remembered nonce serves the next request directly.
    assert seen_statuses == [401, 200, 200]
    assert len(svc.seen) == 2
    assert svc.seen[0]["body"] == "body survives the retry"


def test_requests_adapter(daemon, serve):
    svc = Service(serve, daemon, nonces=True)
    name = enrol(daemon, "requests", svc.port, "require_binding = true")
    s = requests.Session()
    s.auth = TesseraRequestsAuth(agent=name)
    r = s.post(f"{svc.url}/whoami", data=b"payload")
    assert r.status_code == 200, r.text
    assert [h.status_code for h in r.history] == [401]
    assert svc.seen[0]["proof"] == "dpop" and svc.seen[0]["body"] == "payload"
    bearer = enrol(daemon, "requests-bearer", svc.port)
    r = requests.get(f"{svc.url}/whoami", auth=TesseraRequestsAuth(agent=bearer))
    assert r.status_code == 200 and r.json()["proof"] == "bearer"


def test_async_httpx_and_httpx2(daemon, serve):
    import httpx2

    from tessera_agent.httpx2_auth import TesseraAuth as TesseraAuth2

    svc = Service(serve, daemon)
    name = enrol(daemon, "async", svc.port, "require_binding = true")

    async def go():
        async with httpx.AsyncClient(auth=t.TesseraAuth(agent=name)) as http:
            r1 = await http.get(f"{svc.url}/whoami")
        async with httpx2.AsyncClient(auth=TesseraAuth2(agent=name)) as http:
            r2 = await http.get(f"{svc.url}/whoami")
        return r1, r2

    r1, r2 = anyio.run(go)
    assert r1.status_code == r2.status_code == 200
    assert [s["proof"] for s in svc.seen] == ["dpop", "dpop"]


def test_revocation_stops_the_agent(daemon, serve):
    svc = Service(serve, daemon, keys_max_age=0.0)
    bound = enrol(daemon, "revoke-dpop", svc.port, "require_binding = true")
    bearer = enrol(daemon, "revoke-bearer", svc.port)
    with httpx.Client(auth=t.TesseraAuth(agent=bound)) as a, httpx.Client(auth=t.TesseraAuth(agent=bearer)) as b:
        assert a.get(f"{svc.url}/whoami").status_code == 200
        assert b.get(f"{svc.url}/whoami").status_code == 200
        daemon.revoke(bound)
        daemon.revoke(bearer)
        # Bound: the next request needs a proof, and the daemon makes none for a revoked agent.
        with pytest.raises((t.AgentRevoked, t.UnknownCaller)):
            a.get(f"{svc.url}/whoami")
        # Bearer: the cached token still goes out, but its key has left the trust bundle.
        r = b.get(f"{svc.url}/whoami")
        assert r.status_code == 401 and "unknown key" in r.json()["detail"]


def test_unauthenticated_and_forged_requests(daemon, serve):
    svc = Service(serve, daemon)
    r = httpx.get(f"{svc.url}/whoami")
    assert r.status_code == 401
    assert r.headers.get_list("www-authenticate")[0].startswith("DPoP ")
    name = enrol(daemon, "forge", svc.port)
    tok = t.Client().token(svc.url, agent=name).token
    head, body, sig = tok.split(".")
    tampered = f"{head}.{body}.{sig[:-4]}{'AAAA' if sig[-4:] != 'AAAA' else 'BBBB'}"
    assert httpx.get(f"{svc.url}/whoami", headers={"authorization": f"Bearer {tampered}"}).status_code == 401
    assert httpx.get(f"{svc.url}/whoami", headers={"authorization": f"Bearer {tok}"}).status_code == 200


def test_websocket_handshakes_need_an_agent_too(daemon):
    from starlette.routing import WebSocketRoute
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocket, WebSocketDisconnect

    async def echo(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text(agent_of(ws).id)
        await ws.close()

    app = TesseraMiddleware(Starlette(routes=[WebSocketRoute("/ws", echo)]), t.Verifier("http://testserver"))
    name = unique("ws")
    daemon.enrol(name, 'audiences = ["http://testserver"]')
    with TestClient(app) as client:
        with pytest.raises(WebSocketDisconnect) as e:
            with client.websocket_connect("/ws"):
                pass
        assert e.value.code == 1008
        tok = t.Client().token("http://testserver", agent=name).token
        with client.websocket_connect("/ws", headers={"authorization": f"Bearer {tok}"}) as ws:
            assert ws.receive_text().endswith(f"/agent/{name}")


def test_a_host_header_naming_another_service_is_refused(daemon, serve):
    svc = Service(serve, daemon)
    name = enrol(daemon, "host", svc.port)
    tok = t.Client().token(svc.url, agent=name).token
    ok = httpx.get(f"{svc.url}/whoami", headers={"authorization": f"Bearer {tok}"})
    assert ok.status_code == 200
    for host in ("evil.example", f"127.0.0.1:{svc.port}/public#", "x:abc"):
        r = httpx.get(f"{svc.url}/whoami", headers={"authorization": f"Bearer {tok}", "host": host})
        assert r.status_code in (400, 401), (host, r.status_code, r.text)
    assert len(svc.seen) == 1, "nothing but the first request reached the app"
