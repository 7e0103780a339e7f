"""A software X.509-SVID from tesserad's Workload API, checked with py-spiffe and cryptography.

Input (JSON on stdin): {"socket": path, "trust_domain": ..., "agent_id": ...}. Prints a JSON
object of results; exits non-zero when a check fails.
"""
import json
import sys

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import TrustDomain, WorkloadApiClient

args = json.load(sys.stdin)
out = {}
failures = []


def check(name, ok, detail=""):
    out[name] = {"ok": bool(ok), "detail": str(detail)}
    if not ok:
        failures.append(name)


client = WorkloadApiClient(socket_path="unix://" + args["socket"], default_timeout=20)
svid = client.fetch_x509_svid()
check("spiffe_id", str(svid.spiffe_id) == args["agent_id"], svid.spiffe_id)
leaf = svid.leaf
sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
check("uri_san", sans.get_values_for_type(x509.UniformResourceIdentifier) == [args["agent_id"]], sans)

# The key py-spiffe parsed from the PKCS#8 DER is the one the certificate names.
pub_of_key = svid.private_key.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
pub_of_leaf = leaf.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
check("key_matches_certificate", pub_of_key == pub_of_leaf)
# Labelled as a software key (README: key policies), read by cryptography, not our code.
policies = leaf.extensions.get_extension_for_class(x509.CertificatePolicies).value
check("software_key_policy",
      [p.policy_identifier.dotted_string for p in policies] == [args["software_key_oid"]],
      policies)
check("p256", isinstance(svid.private_key, ec.EllipticCurvePrivateKey)
      and svid.private_key.curve.name == "secp256r1", type(svid.private_key))

# The certificate chains to the trust domain's X.509 bundle.
bundle = client.fetch_x509_bundles().get_bundle_for_trust_domain(TrustDomain(args["trust_domain"]))
cas = list(bundle.x509_authorities)
signed = False
for ca in cas:
    try:
        leaf.verify_directly_issued_by(ca)
        signed = True
    except Exception:
        pass
check("chains_to_bundle", signed, [c.subject for c in cas])
check("short_lived", (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() <= 3600,
      leaf.not_valid_after_utc)
out["serial"] = format(leaf.serial_number, "x")
client.close()
out["failures"] = failures
print(json.dumps(out))
sys.exit(1 if failures else 0)
