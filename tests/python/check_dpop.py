"""A relying party checking a DPoP-bound request with PyJWT (RFC 9449 §4.3 and §6, §7.1).

Input (stdin, JSON): {"token", "proof", "jwks", "method", "url", "audience", "nonce"?}.
Prints {"ok": true, "token": <claims>, "proof": <claims>, "header": <proof header>} or
exits 1 with {"ok": false, "error": "..."}.
"""
import base64
import hashlib
import json
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import jwt
from jwt.algorithms import ECAlgorithm


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(jwk: dict) -> str:
    # RFC 7638: required members, lexicographic order, no whitespace.
    members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    return b64(hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest())


def normalise(url: str) -> str:
    # RFC 9449 §4.3 point 9: compare without query and fragment, after syntax-based
    # normalisation (scheme and host case, default port, empty path).
    p = urlsplit(url)
    host = (p.hostname or "").lower()
    port = p.port
    if port and not ((p.scheme == "https" and port == 443) or (p.scheme == "http" and port == 80)):
        host = f"{host}:{port}"
    return urlunsplit((p.scheme.lower(), host, p.path or "/", "", ""))


def check(req: dict) -> dict:
    token, proof = req["token"], req["proof"]
    # The token: signature against the daemon's JWKS, audience, typ, and a cnf.jkt.
    theader = jwt.get_unverified_header(token)
    assert theader.get("typ") == "JWT", f"token typ {theader.get('typ')}"
    keys = {k["kid"]: k for k in req["jwks"]["keys"]}
    tkey = ECAlgorithm.from_jwk(json.dumps(keys[theader["kid"]]))
    tclaims = jwt.decode(token, tkey, algorithms=["ES256"], audience=req["audience"],
                         options={"require": ["iss", "sub", "exp", "iat", "jti"]})
    jkt = tclaims.get("cnf", {}).get("jkt")
    assert jkt, "token is not DPoP-bound (no cnf.jkt)"

    # The proof (RFC 9449 §4.3).
    header = jwt.get_unverified_header(proof)
    assert header.get("typ") == "dpop+jwt", f"typ {header.get('typ')}"       # 4
    assert header.get("alg") == "ES256", f"alg {header.get('alg')}"          # 5
    pjwk = header.get("jwk")
    assert isinstance(pjwk, dict), "no jwk header"                           # 3
    assert "d" not in pjwk, "private key in the proof header"                # 7
    pkey = ECAlgorithm.from_jwk(json.dumps(pjwk))
    claims = jwt.decode(proof, pkey, algorithms=["ES256"],                   # 6
                        options={"verify_aud": False, "require": ["jti", "htm", "htu", "iat"]})
    assert len(base64.urlsafe_b64decode(claims["jti"] + "==")) >= 16, "jti under 128 bits"
    assert claims["htm"] == req["method"], f"htm {claims['htm']}"             # 8
    assert normalise(claims["htu"]) == normalise(req["url"]), f"htu {claims['htu']}"  # 9
    assert "?" not in claims["htu"] and "#" not in claims["htu"], "htu has query or fragment"
    if req.get("nonce") is not None:                                          # 10
        assert claims.get("nonce") == req["nonce"], f"nonce {claims.get('nonce')}"
    assert abs(time.time() - claims["iat"]) < 60, "iat outside the window"    # 11
    # 12 and §6/§7.1: the token is bound to this proof key and the proof to this token.
    assert claims.get("ath") == b64(hashlib.sha256(token.encode()).digest()), "ath"
    assert jkt == thumbprint(pjwk), "cnf.jkt is not the proof key's thumbprint"
    return {"ok": True, "token": tclaims, "proof": claims, "header": header}


if __name__ == "__main__":
    try:
        print(json.dumps(check(json.load(sys.stdin))))
    except Exception as e:  # noqa: BLE001 - any failure is a refusal
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
