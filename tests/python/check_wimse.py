"""A relying party checking a WIMSE WIT + WPT pair with PyJWT (draft-ietf-wimse-workload-creds,
draft-ietf-wimse-wpt).

Input (stdin, JSON): {"wit", "wpt", "bundle" (SPIFFE bundle JSON), "aud", "token"?}.
Prints {"ok": true, "wit": <claims>, "wpt": <claims>} or exits 1 with {"ok": false, "error"}.
"""
import base64
import hashlib
import json
import sys
import time

import jwt
from jwt.algorithms import ECAlgorithm


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def check(req: dict) -> dict:
    wit, wpt = req["wit"], req["wpt"]
    # The WIT: typed, signed by the trust domain's WIT key (use "wit-svid" in the bundle).
    h = jwt.get_unverified_header(wit)
    assert h.get("typ") == "wit+jwt", f"WIT typ {h.get('typ')}"
    assert h.get("alg") == "ES256", f"WIT alg {h.get('alg')}"
    keys = [k for k in req["bundle"]["keys"] if k.get("use") == "wit-svid" and k.get("kid") == h.get("kid")]
    assert len(keys) == 1, "WIT key not in the bundle as wit-svid"
    wkey = ECAlgorithm.from_jwk(json.dumps(keys[0]))
    wc = jwt.decode(wit, wkey, algorithms=["ES256"],
                    options={"verify_aud": False, "require": ["iss", "sub", "exp", "iat", "jti"]})
    assert "aud" not in wc, "a WIT has no aud"
    assert wc["sub"].startswith("spiffe://"), f"sub {wc['sub']}"
    assert wc["iss"].startswith("spiffe://") and "/host/" in wc["iss"], f"iss {wc['iss']}"
    cnf = wc.get("cnf", {}).get("jwk")
    assert isinstance(cnf, dict) and cnf.get("alg") == "ES256", "cnf.jwk with alg ES256"
    assert "d" not in cnf, "private key in cnf.jwk"
    assert wc["exp"] - wc["iat"] <= 3600, "WIT lives over 1 h"

    # The WPT: typed, signed by the key the WIT binds, for this audience, short-lived.
    ph = jwt.get_unverified_header(wpt)
    assert ph.get("typ") == "wpt+jwt", f"WPT typ {ph.get('typ')}"
    assert ph.get("alg") == "ES256", f"WPT alg {ph.get('alg')}"
    pkey = ECAlgorithm.from_jwk(json.dumps(cnf))
    pc = jwt.decode(wpt, pkey, algorithms=["ES256"], audience=req["aud"],
                    options={"require": ["aud", "exp", "jti"]})
    assert pc["exp"] - time.time() <= 300, "WPT lives over 5 min"
    assert pc["wth"] == b64(hashlib.sha256(wit.encode()).digest()), "wth is not the WIT's hash"
    if req.get("token") is not None:
        assert pc.get("ath") == b64(hashlib.sha256(req["token"].encode()).digest()), "ath"
    return {"ok": True, "wit": wc, "wpt": pc, "wit_header": h}


if __name__ == "__main__":
    try:
        print(json.dumps(check(json.load(sys.stdin))))
    except Exception as e:  # noqa: BLE001 - any failure is a refusal
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
