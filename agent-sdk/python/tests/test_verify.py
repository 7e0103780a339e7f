"""The verifier refuses what it must: other algorithms, other audiences, forged or replayed proofs."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import tessera_agent as t
from conftest import unique

AUD = "https://api.example.com"


def b64(d: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


@pytest.fixture
def agent(daemon):
    name = unique("verify")
    daemon.enrol(name, f'audiences = ["{AUD}", "https://other.example.com"]\nscopes = ["read"]')
    return name


def test_accepts_a_daemon_token_and_refuses_other_audiences(daemon, agent):
    c = t.Client()
    tok = c.token(AUD, ["read"], agent=agent).token
    claims = t.Verifier(AUD).verify_token(tok)
    assert claims["scope"] == "read"
    with pytest.raises(t.VerificationError, match="(?i)audience"):
        t.Verifier("https://other.example.com").verify_token(tok)
    # Keys handed over as a JWKS dict (no socket) work the same.
    assert t.Verifier(AUD, jwks=c.jwks()).verify_token(tok)["jti"] == claims["jti"]
    with pytest.raises(t.VerificationError, match="(?i)issuer"):
        t.Verifier(AUD, issuer="https://someone-else.example").verify_token(tok)


def test_refuses_alg_none_and_hs256_with_the_public_key(daemon, agent):
    c = t.Client()
    tok = c.token(AUD, agent=agent).token
    header = jwt.get_unverified_header(tok)
    body = tok.split(".")[1]
    none = f"{b64({**header, 'alg': 'none'})}.{body}."
    with pytest.raises(t.VerificationError, match="alg"):
        t.Verifier(AUD).verify_token(none)
    # HS256 keyed with the public key's JSON: the classic confusion attack.
    key = next(k for k in c.jwks()["keys"] if k["kid"] == header["kid"])
    forged = jwt.encode(jwt.decode(tok, options={"verify_signature": False}), json.dumps(key), algorithm="HS256",
                        headers={"kid": header["kid"]})
    with pytest.raises(t.VerificationError, match="alg"):
        t.Verifier(AUD).verify_token(forged)


def test_a_token_signed_by_a_stranger_is_refused(daemon, agent):
    c = t.Client()
    real = c.token(AUD, agent=agent).token
    kid = jwt.get_unverified_header(real)["kid"]
    stranger = ec.generate_private_key(ec.SECP256R1())
    claims = jwt.decode(real, options={"verify_signature": False})
    forged = jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": kid})
    with pytest.raises(t.VerificationError, match="Signature"):
        t.Verifier(AUD).verify_token(forged)


def test_dpop_proof_checks(daemon, agent):
    c = t.Client()
    tok = c.token(AUD, bind="dpop", agent=agent).token
    jkt = jwt.decode(tok, options={"verify_signature": False})["cnf"]["jkt"]
    url = f"{AUD}/v1/items"
    v = t.Verifier(AUD)
    p = c.dpop_proof("GET", url, access_token=tok, agent=agent).proof
    with pytest.raises(t.VerificationError, match="htm"):
        v.verify_dpop(p, method="POST", url=url, access_token=tok, jkt=jkt)
    with pytest.raises(t.VerificationError, match="bound to another key"):
        v.verify_dpop(p, method="GET", url=url, access_token=tok, jkt="x" * 43)
    with pytest.raises(t.VerificationError, match="ath"):
        v.verify_dpop(p, method="GET", url=url, access_token=tok + "x", jkt=jkt)
    # Query, fragment, case of scheme and host, default port: not part of htu.
    v.verify_dpop(p, method="GET", url="HTTPS://API.example.com:443/v1/items?page=2", access_token=tok, jkt=jkt)
    # A proof signed by another key claiming the same jwk fails the signature check.
    stranger = ec.generate_private_key(ec.SECP256R1())
    header = jwt.get_unverified_header(p)
    claims = jwt.decode(p, options={"verify_signature": False})
    forged = jwt.encode({**claims, "jti": "new"}, stranger, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": header["jwk"]})
    with pytest.raises(t.VerificationError):
        v.verify_dpop(forged, method="GET", url=url, access_token=tok, jkt=jkt)


def test_replay_cache_forgets_at_window_end_and_fails_closed_when_full():
    cache = t.ReplayCache(max_entries=2)
    now = time.time()
    cache.add("a", now + 10, now)
    with pytest.raises(t.VerificationError, match="replayed"):
        cache.add("a", now + 10, now)
    cache.add("b", now + 20, now)
    with pytest.raises(t.ReplayCacheFull):
        cache.add("c", now + 10, now)
    # Once "a"'s window ends its slot is free again, and "a" itself is forgotten.
    cache.add("c", now + 30, now + 11)
    assert len(cache) == 2


def test_nonces_expire_and_cannot_be_forged():
    n = t.DpopNonces(lifetime=60)
    now = time.time()
    good = n.issue(now)
    assert n.valid(good, now + 30)
    assert not n.valid(good, now + 61)
    assert not t.DpopNonces(lifetime=60).valid(good, now), "another server's secret"
    assert not n.valid(good[:-2] + "AA", now)


def test_malformed_credentials_are_refusals_not_crashes(daemon, agent):
    stranger = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(stranger.public_key()))
    v = t.Verifier(AUD, jwks={"keys": []})
    weird = [
        {"jti": "a", "htm": "GET", "htu": f"{AUD}/x", "iat": float("inf")},
        {"jti": "b", "htm": "GET", "htu": "https://api.example.com:notaport/x", "iat": int(time.time())},
        {"jti": "c", "htm": "GET", "htu": 7, "iat": int(time.time())},
    ]
    for claims in weird:
        proof = jwt.encode(claims, stranger, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": jwk})
        with pytest.raises(t.VerificationError):
            v.verify_dpop(proof, method="GET", url=f"{AUD}/x", access_token=None, jkt=None)
    bad_jwk = {**jwk, "x": 12}
    proof = jwt.encode(weird[0], stranger, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": bad_jwk})
    with pytest.raises(t.VerificationError):
        v.verify_dpop(proof, method="GET", url=f"{AUD}/x", access_token=None, jkt=None)
    with pytest.raises(t.VerificationError):
        v.verify_request("GET", f"{AUD}/x", {"authorization": "DPoP not.a.jwt", "dpop": "x"})


def test_a_token_must_be_typed_jwt(daemon, agent):
    """A proof-shaped JWT signed by an agent key is not a token (typ), whatever its claims."""
    c = t.Client()
    tok = c.token(AUD, agent=agent).token
    h = jwt.get_unverified_header(tok)
    retyped = f"{b64({**h, 'typ': 'dpop+jwt'})}.{tok.split('.', 1)[1]}"
    with pytest.raises(t.VerificationError, match="typ"):
        t.Verifier(AUD).verify_token(retyped)


def test_percent_encoding_and_default_port_do_not_matter(daemon, agent):
    c = t.Client()
    tok = c.token(AUD, bind="dpop", agent=agent).token
    jkt = jwt.decode(tok, options={"verify_signature": False})["cnf"]["jkt"]
    p = c.dpop_proof("GET", f"{AUD}/caf%c3%a9/%7Euser", access_token=tok, agent=agent).proof
    t.Verifier(AUD).verify_dpop(p, method="GET", url=f"{AUD}:443/caf%C3%A9/~user", access_token=tok, jkt=jkt)


def test_htu_and_origin_never_carry_userinfo_query_or_fragment():
    assert t.htu_of("https://user:pw@API.example.com:443/a/b?q=1#f") == "https://API.example.com:443/a/b"
    assert t.origin_of("https://user:pw@API.example.com:443/a") == "https://api.example.com"
    assert t.origin_of("http://127.0.0.1:8080/x") == "http://127.0.0.1:8080"


def test_problem_types_match_the_daemons_list():
    """One list on both sides: the slugs the Rust SDK (the daemon's own list) knows."""
    import re

    from conftest import ROOT

    rust = (ROOT / "agent-sdk/rust/src/error.rs").read_text()
    slugs = set(re.findall(r'ProblemType::\w+ => "([a-z-]+)"', rust))
    assert slugs and set(t.PROBLEMS) == slugs
    assert all(cls.slug == slug for slug, cls in t.PROBLEMS.items())


def test_only_a_resource_servers_nonce_challenge_is_retried():
    """A 400 that carries a nonce may be any error: resending a POST body blindly is wrong."""
    from tessera_agent.auth import nonce_challenge

    challenge = {"dpop-nonce": "n1", "www-authenticate": 'DPoP error="use_dpop_nonce"'}
    assert nonce_challenge(401, challenge) == "n1"
    assert nonce_challenge(400, {"dpop-nonce": "n1"}) is None
    assert nonce_challenge(401, {"dpop-nonce": "n1", "www-authenticate": 'DPoP error="invalid_token"'}) is None
