"""An RS256 agent token checked with PyJWT against the daemon's JWKS. Input JSON: token, jwks,
aud. Prints the claims and the key's algorithm; exits 1 when PyJWT refuses."""

import json
import sys

import jwt

a = json.load(sys.stdin)
try:
    header = jwt.get_unverified_header(a["token"])
    keys = jwt.PyJWKSet.from_dict(a["jwks"])
    key = next(k for k in keys.keys if k.key_id == header["kid"])
    claims = jwt.decode(
        a["token"],
        key.key,
        algorithms=["RS256"],
        audience=a["aud"],
        options={"require": ["exp", "iat", "iss", "sub", "jti"]},
    )
    # And the SDK's own relying-party verifier (PyJWT underneath), which takes the algorithm
    # from the published key.
    from tessera_agent import Verifier

    sdk = Verifier(a["aud"], jwks=a["jwks"]).verify_token(a["token"])
    print(json.dumps({"claims": claims, "sdk_sub": sdk["sub"], "alg": header["alg"], "key_type": type(key.key).__name__}))
except Exception as e:  # noqa: BLE001 - the refusal is the answer
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
    sys.exit(1)
