"""The exchange's request bodies and answers (the live exchange runs against a real
authorization server in tests/tests/federation.rs)."""

import pytest

from tessera_agent import ExchangeError, Exchanger
from tessera_agent.exchange import JWT_BEARER, JWT_TOKEN_TYPE, TOKEN_EXCHANGE, parse_answer


def test_bodies_follow_the_grant():
    jb = Exchanger("https://as.example/token", params={"scope": "a b"}, client=object())
    assert jb.audience == "https://as.example/token"
    assert jb.request_body("A.B.C") == {"grant_type": JWT_BEARER, "assertion": "A.B.C", "scope": "a b"}
    te = Exchanger("https://as.example/token", grant="token-exchange", client=object())
    assert te.request_body("A.B.C") == {
        "grant_type": TOKEN_EXCHANGE, "subject_token": "A.B.C", "subject_token_type": JWT_TOKEN_TYPE,
    }
    ca = Exchanger("https://login.example/token", grant="client-assertion", params={"client_id": "app"}, client=object())
    assert ca.request_body("A.B.C") == {
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": "A.B.C",
        "client_id": "app",
    }
    c = Exchanger.anthropic("fdrl_1", "org", "svac_1", client=object())
    assert c.audience == "https://api.anthropic.com"
    assert c.token_endpoint == "https://api.anthropic.com/v1/oauth/token"
    assert c.json_body and c.request_body("A.B.C")["federation_rule_id"] == "fdrl_1"
    with pytest.raises(ValueError):
        Exchanger("https://as.example/token", grant="password", client=object())
    with pytest.raises(ValueError):
        Exchanger("http://as.example/token", client=object())
    Exchanger("http://127.0.0.1:9/token", client=object())


def test_answers_and_refusals_are_read():
    t = parse_answer(200, b'{"access_token":"at","token_type":"Bearer","expires_in":600}', now=1000.0)
    assert (t.access_token, t.expires_at) == ("at", 1600.0)
    with pytest.raises(ExchangeError) as e:
        parse_answer(400, b'{"error":"invalid_grant","error_description":"jti replayed"}')
    assert (e.value.error, e.value.description, e.value.status) == ("invalid_grant", "jti replayed", 400)
    for huge in (b"1e999", b"1e300", b"-5"):
        t = parse_answer(200, b'{"access_token":"at","expires_in":' + huge + b"}", now=0.0)
        assert t.expires_at is None or t.expires_at <= 30 * 24 * 3600.0, huge
    for bad in (b"{}", b"<html>"):
        with pytest.raises(ExchangeError):
            parse_answer(200, bad)
