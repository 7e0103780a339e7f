"""A relying party verifying an RFC 9421 signed request with the PyPI package
http-message-signatures (and requests to build the request), keys from the daemon's JWKS.

Input (stdin, JSON): {"method", "url", "headers" (incl. Signature-Input, Signature),
"body"? (text), "jwks", "require": [components]}.
Prints {"ok": true, "covered": [...], "params": {...}} or exits 1 with {"ok": false, "error"}.
"""
import json
import sys

import requests
from http_message_signatures import HTTPMessageVerifier, HTTPSignatureKeyResolver, algorithms
from jwt.algorithms import ECAlgorithm


class JwksResolver(HTTPSignatureKeyResolver):
    def __init__(self, jwks):
        self.keys = {k["kid"]: k for k in jwks["keys"]}

    def resolve_public_key(self, key_id):
        jwk = self.keys.get(key_id)
        return ECAlgorithm.from_jwk(json.dumps(jwk)) if jwk else None

    def resolve_private_key(self, key_id):
        raise KeyError(key_id)


def check(req: dict) -> dict:
    body = req.get("body")
    prepared = requests.Request(req["method"], req["url"], headers=req["headers"],
                                data=body.encode() if body is not None else None).prepare()
    verifier = HTTPMessageVerifier(signature_algorithm=algorithms.ECDSA_P256_SHA256,
                                   key_resolver=JwksResolver(req["jwks"]))
    kwargs = {"expect_tag": "tessera", "require_components": tuple(req.get("require", []))}
    if body is not None:
        kwargs["body"] = body.encode()
    results = verifier.verify(prepared, **kwargs)
    assert len(results) == 1, f"{len(results)} signatures"
    r = results[0]
    return {"ok": True, "covered": [str(c) for c in r.covered_components],
            "params": {k: v for k, v in r.parameters.items()}}


if __name__ == "__main__":
    try:
        print(json.dumps(check(json.load(sys.stdin)), default=str))
    except Exception as e:  # noqa: BLE001 - any failure is a refusal
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
