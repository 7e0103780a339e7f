"""tesserad's SPIFFE Workload API, checked with py-spiffe (the PyPI package `spiffe`) and PyJWT.

Input (JSON on stdin): {"socket": path, "audience": allowed, "denied_audience": ...,
"trust_domain": ..., "agent_id": the caller's SPIFFE ID}. Prints one JSON object of results;
exits non-zero when a check fails.
"""
import json
import sys

import grpc
import jwt
from cryptography import x509
from spiffe import JwtSvid, TrustDomain, WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc

args = json.load(sys.stdin)
out = {}
failures = []


def check(name, ok, detail=""):
    out[name] = {"ok": bool(ok), "detail": str(detail)}
    if not ok:
        failures.append(name)


client = WorkloadApiClient(socket_path="unix://" + args["socket"], default_timeout=20)
td = TrustDomain(args["trust_domain"])
aud = args["audience"]

# FetchJWTSVID: one SVID for the caller's agent, claims as the JWT-SVID profile says.
svid = client.fetch_jwt_svid(audience={aud})
check("svid_subject", str(svid.spiffe_id) == args["agent_id"], svid.spiffe_id)
check("svid_audience", svid.audience == {aud}, svid.audience)
header = jwt.get_unverified_header(svid.token)
check("svid_header", set(header) <= {"alg", "kid", "typ"} and header["alg"] == "ES256"
      and header.get("typ") in (None, "JWT", "JOSE"), header)

# FetchJWTBundles: the trust domain's JWKS; py-spiffe validates the SVID with it locally, and
# PyJWT verifies the signature with the key the bundle names.
bundles = client.fetch_jwt_bundles()
bundle = bundles.get_bundle_for_trust_domain(td)
check("jwt_bundle_present", bundle is not None, list(bundles._bundles.keys()) if hasattr(bundles, "_bundles") else "")
validated = JwtSvid.parse_and_validate(svid.token, bundle, {aud})
check("local_validation", str(validated.spiffe_id) == args["agent_id"], validated.spiffe_id)
key = bundle.get_jwt_authority(header["kid"])
claims = jwt.decode(svid.token, key=key, algorithms=["ES256"], audience=aud)
check("pyjwt_claims", claims["sub"] == args["agent_id"] and claims["exp"] > claims["iat"], claims)
out["jti"] = claims["jti"]

# ValidateJWTSVID: the daemon validates, and refuses another audience.
v = client.validate_jwt_svid(svid.token, aud)
check("validate", str(v.spiffe_id) == args["agent_id"], v.spiffe_id)
try:
    client.validate_jwt_svid(svid.token, "https://somewhere.else.example")
    check("validate_wrong_audience_refused", False, "accepted")
except Exception as e:  # py-spiffe wraps the gRPC error
    check("validate_wrong_audience_refused", "InvalidArgument" in repr(e) or "INVALID_ARGUMENT" in repr(e), repr(e))

# A disallowed audience is refused with PermissionDenied.
try:
    client.fetch_jwt_svid(audience={args["denied_audience"]})
    check("denied_audience_refused", False, "an SVID was issued")
except Exception as e:
    check("denied_audience_refused", "PERMISSION_DENIED" in repr(e), repr(e))

# FetchX509Bundles: the host CA certificate through py-spiffe; the CRL through the raw stub.
x509_bundles = client.fetch_x509_bundles()
xb = x509_bundles.get_bundle_for_trust_domain(td)
check("x509_bundle_present", xb is not None and len(xb.x509_authorities) >= 1, xb)
channel = grpc.insecure_channel("unix:" + args["socket"])
stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
md = [("workload.spiffe.io", "true")]
first = next(iter(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=md, timeout=20)))
crl = x509.load_der_x509_crl(first.crl[0])
ca = x509.load_der_x509_certificate(first.bundles["spiffe://" + args["trust_domain"]])
check("crl_signed_by_ca", crl.is_signature_valid(ca.public_key()), crl.issuer)
out["crl_revoked"] = [format(r.serial_number, "x") for r in crl]

# FetchX509SVID: disabled, with a message naming keyless mTLS.
try:
    client.fetch_x509_svid()
    check("x509_svid_refused", False, "an X.509-SVID was handed out")
except Exception as e:
    check("x509_svid_refused", "PERMISSION_DENIED" in repr(e) and "keyless mTLS" in repr(e), repr(e))

# The security header is required.
try:
    stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=[aud]), timeout=20)
    check("header_required", False, "answered without the header")
except grpc.RpcError as e:
    check("header_required", e.code() == grpc.StatusCode.INVALID_ARGUMENT, e)

client.close()
channel.close()
out["failures"] = failures
print(json.dumps(out))
sys.exit(1 if failures else 0)
