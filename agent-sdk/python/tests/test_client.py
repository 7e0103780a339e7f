"""Client calls against the real daemon; tokens checked with PyJWT against the daemon's JWKS."""

from __future__ import annotations

import hashlib
import os

import anyio
import jwt
import pytest
from cryptography import x509

import tessera_agent as t
from conftest import unique

AUD = "https://api.example.com"


def claims_of(token: str, jwks: dict) -> dict:
    """Verify independently of the SDK's Verifier: PyJWT with the key the kid names."""
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwks["keys"] if k["kid"] == kid)
    return jwt.decode(token, jwt.PyJWK(key).key, algorithms=["ES256"], audience=AUD)


@pytest.fixture
def agent(daemon):
    name = unique("client")
    daemon.enrol(name, f'audiences = ["{AUD}"]\nscopes = ["read", "write"]')
    return name


def test_health_and_whoami(daemon, agent):
    c = t.Client()
    assert c.health() == {"status": "ok", "backend": "pkcs11"}
    who = c.whoami(agent)
    assert who["name"] == agent and who["status"] == "active"
    assert who["id"].endswith(f"/agent/{agent}")
    assert who["policy"]["scopes"] == ["read", "write"]
    assert who["policy"]["require_binding"] is False


def test_token_verifies_with_pyjwt(daemon, agent):
    c = t.Client()
    tok = c.token(AUD, ["read"], ttl="2m", agent=agent)
    assert tok.token_type == "Bearer" and not tok.bound
    claims = claims_of(tok.token, c.jwks())
    assert claims["sub"].endswith(f"/agent/{agent}")
    assert claims["scope"] == "read"
    assert claims["exp"] - claims["iat"] == 120
    assert "cnf" not in claims


def test_bound_token_carries_the_proof_key_thumbprint(daemon, agent):
    c = t.Client()
    tok = c.token(AUD, bind="dpop", agent=agent)
    assert tok.token_type == "DPoP" and tok.bound
    claims = claims_of(tok.token, c.jwks())
    proof = c.dpop_proof("POST", f"{AUD}/v1/x", access_token=tok.token, agent=agent)
    header = jwt.get_unverified_header(proof.proof)
    assert header["typ"] == "dpop+jwt"
    assert t.jwk_thumbprint(header["jwk"]) == claims["cnf"]["jkt"]
    # The SDK's verifier accepts it for exactly that method and URL.
    v = t.Verifier(AUD)
    pc = v.verify_dpop(proof.proof, method="POST", url=f"{AUD}/v1/x", access_token=tok.token, jkt=claims["cnf"]["jkt"])
    assert pc["jti"] == proof.jti


def test_refusals_are_typed(daemon, agent):
    c = t.Client()
    with pytest.raises(t.AudienceNotAllowed) as e:
        c.token("https://elsewhere.example.com", agent=agent)
    assert e.value.status == 403 and e.value.type == "urn:tessera:problem:audience-not-allowed"
    with pytest.raises(t.ScopeNotAllowed):
        c.token(AUD, ["admin"], agent=agent)
    with pytest.raises(t.MalformedRequest) as e:
        c.token(AUD, ttl="soon", agent=agent)
    assert e.value.status == 400 and "duration" in e.value.detail
    with pytest.raises(t.TtlNotAllowed):
        c.token(AUD, ttl="5h", agent=agent)
    with pytest.raises(t.TargetNotAllowed):
        c.dpop_proof("GET", "https://evil.example.net/x", agent=agent)
    with pytest.raises(t.UnknownCaller):
        c.whoami("no-such-agent")


def test_ambiguous_caller_names_the_choice(daemon, agent):
    other = unique("client-other")
    daemon.enrol(other, f'audiences = ["{AUD}"]')
    try:
        with pytest.raises(t.AmbiguousCaller) as e:
            t.Client().token(AUD)
        assert e.value.status == 409
    finally:
        daemon.revoke(other)


def test_binding_required_and_rate_limited(daemon):
    name = unique("strict")
    daemon.enrol(name, f'audiences = ["{AUD}"]\nrequire_binding = true\nrate = 2')
    c = t.Client()
    with pytest.raises(t.BindingRequired):
        c.token(AUD, agent=name)
    c.token(AUD, bind="dpop", agent=name)
    with pytest.raises(t.RateLimited) as e:
        for _ in range(5):
            c.token(AUD, bind="dpop", agent=name)
    assert e.value.status == 429 and e.value.retry_after is not None and e.value.retry_after >= 1


def test_revoked_agent_is_refused(daemon):
    name = unique("gone")
    daemon.enrol(name, f'audiences = ["{AUD}"]')
    c = t.Client()
    kid = jwt.get_unverified_header(c.token(AUD, agent=name).token)["kid"]
    daemon.revoke(name)
    with pytest.raises((t.AgentRevoked, t.UnknownCaller)):
        c.token(AUD, agent=name)
    assert kid not in {k["kid"] for k in c.jwks()["keys"]}


def test_missing_socket_is_a_clear_error(tmp_path):
    c = t.Client(tmp_path / "nothing.sock")
    with pytest.raises(t.DaemonUnavailable) as e:
        c.health()
    assert str(tmp_path / "nothing.sock") in str(e.value)


def test_certificate_bundle_crl_and_attestation(daemon, agent):
    c = t.Client()
    chain = c.certificate(agent=agent, ttl="10m")
    certs = x509.load_pem_x509_certificates(chain.encode())
    san = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [c.whoami(agent)["id"]]
    ca = x509.load_pem_x509_certificate(c.bundle().encode())
    certs[0].verify_directly_issued_by(ca)
    crl = x509.load_pem_x509_crl(c.crl().encode())
    assert crl.is_signature_valid(ca.public_key())
    bundle = c.spiffe_bundle()
    assert {k.get("use") for k in bundle["keys"]} >= {"jwt-svid", "wit-svid", "x509-svid"}
    nonce = os.urandom(16)
    ev = c.attestation(nonce, agent=agent)
    assert ev["nonce"] == nonce.hex() and ev["attributes"]["CKA_EXTRACTABLE"] is False


def test_wit_and_wpt_pass_the_verifier(daemon, agent):
    c = t.Client()
    wit = c.wit(agent)["wit"]
    url = f"{AUD}/v1/items"
    wpt = c.wpt(url, wit, agent=agent).proof
    v = t.Verifier(AUD)
    who = v.verify_request("GET", url, {"Workload-Identity-Token": wit, "Workload-Proof-Token": wpt})
    assert who.proof == "wpt" and who.id == c.whoami(agent)["id"]
    with pytest.raises(t.VerificationError, match="replayed"):
        v.verify_request("GET", url, {"Workload-Identity-Token": wit, "Workload-Proof-Token": wpt})
    other = c.wpt(url, wit, agent=agent).proof
    with pytest.raises(t.VerificationError):
        v.verify_request("GET", f"{AUD}/v1/other", {"Workload-Identity-Token": wit, "Workload-Proof-Token": other})


def test_http_signature(daemon, agent):
    body = b'{"x": 1}'
    import base64

    digest = "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"
    sig = t.Client().http_signature("POST", f"{AUD}/v1/items", content_digest=digest, agent=agent)
    assert sig.signature_input and sig.signature_input.startswith("tessera=")
    assert sig.signature and sig.signature.startswith("tessera=:")


def test_async_client(daemon, agent):
    async def go():
        async with t.AsyncClient() as c:
            assert (await c.health())["status"] == "ok"
            tok = await c.token(AUD, ["write"], agent=agent)
            return tok, await c.jwks()

    tok, jwks = anyio.run(go)
    assert claims_of(tok.token, jwks)["scope"] == "write"
