#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/seeds/ (run with the test venv: target/pyenv/bin/python).

Each seed is a small valid input, so the fuzzer starts past the first checks: requests the
daemon grants, config and agent files from the README, a host CA chain for the fixed CA key
of the install_cert target, TPM evidence certifying the attestation target's fixed key, a
token signed as token_verifier expects, a short audit trail. The fixed keys are the ones in
fuzz_targets/common.rs: scalar 0x11 00..00 <seed>."""
import base64, datetime, hashlib, json, os, pathlib, struct, subprocess, tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

here = pathlib.Path(__file__).parent
root = here.parent.parent


def key(seed):
    return ec.derive_private_key(int.from_bytes(b"\x11" + bytes(30) + bytes([seed]), "big"), ec.SECP256R1())


def put(target, name, data):
    d = here / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


# api_request: route byte (index in ROUTES), then `query \n body`.
for i, (route, text) in enumerate([
    (0, '\n{"audience":"https://api.example/x","scopes":["read"],"ttl":"5m","agent":"plain"}'),
    (0, '\n{"audience":"https://api.example/x","bind":"dpop","agent":"bound"}'),
    (0, '\n{"audience":"https://api.example/x","bind":"mtls","x5t#S256":"AAAA","agent":"bound"}'),
    (1, '\n{"type":"dpop","htm":"GET","htu":"https://api.example/x","agent":"bound"}'),
    (1, '\n{"type":"wpt","aud":"https://api.example/x","agent":"bound"}'),
    (1, '\n{"type":"http-signature","method":"POST","target_uri":"https://api.example/x?q=1",'
        '"headers":{"content-type":"application/json"},"components":["@method","@target-uri"],"agent":"bound"}'),
    (2, '\n{"scheme":"ecdsa_secp256r1_sha256","role":"client","content":"'
        + base64.b64encode(b" " * 64 + b"TLS 1.3, client CertificateVerify\x00" + bytes(32)).decode()
        + '","agent":"bound"}'),
    (3, 'agent=plain&ttl=5m\n'),
    (3, 'agent=bound&key=session\n'),
    (4, 'agent=plain\n'),
    (5, 'agent=bound\n'),
    (6, 'agent=plain&nonce=00112233445566778899aabbccddeeff\n'),
    (7, 'format=spiffe\n'),
    (8, ''), (9, ''), (10, ''),
]):
    put("api_request", f"seed-{i:02}", bytes([route]) + text.encode())

# config_files: even byte + tesserad.toml; odd byte + `name \0 agent file`.
put("config_files", "packaged", b"\x00" + (root / "packaging/tesserad.toml").read_bytes())
put("config_files", "pkcs11", b'\x00[backend]\ntype = "pkcs11"\nmodule = "/usr/lib/softhsm/libsofthsm2.so"\ntoken_label = "tessera"\npin_file = "/etc/tessera/pin"\n')
put("config_files", "agent", b"\x01research-bot\x00" + b'[selectors]\nuid = 1000\nexe = "/usr/bin/research-bot"\n'
    b'[policy]\naudiences = ["https://api.example.com", "https://*.internal.example.com"]\n'
    b'scopes = ["read", "write"]\nmax_ttl = "15m"\nrate = 60\nrequire_binding = true\nproof_key = "session"\n')

# install_cert: `cn \0 PEM chain` for the CA key of seed 1, issued by a root made here.
now = datetime.datetime(2026, 1, 1)
root_key = key(9)
def cert(subject, issuer, pub, signer, ca):
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(pub)
         .serial_number(x509.random_serial_number()).not_valid_before(now)
         .not_valid_after(now + datetime.timedelta(days=3650))
         .add_extension(x509.BasicConstraints(ca=True, path_length=ca), critical=True)
         .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True))
    return b.sign(signer, hashes.SHA256())
rn = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet root")])
hn = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "host-1")])
r = cert(rn, rn, root_key.public_key(), root_key, None)
h = cert(hn, rn, key(1).public_key(), root_key, 0)
pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (h, r))
put("install_cert", "chain", b"host-1\x00" + pem)
put("install_cert", "der", b"host-1\x00" + h.public_bytes(serialization.Encoding.DER))

# TPM structures for the attestation target's key (seed 2), certified with nonce "fuzz-nonce".
def tpm2b(b):
    return struct.pack(">H", len(b)) + b
nums = key(2).public_key().public_numbers()
attrs = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 18)  # fixedTPM fixedParent sensitiveDataOrigin sign
key_public = (struct.pack(">HHI", 0x0023, 0x000B, attrs) + tpm2b(b"")
              + struct.pack(">HHHHH", 0x0010, 0x0018, 0x000B, 0x0003, 0x0010)
              + tpm2b(nums.x.to_bytes(32, "big")) + tpm2b(nums.y.to_bytes(32, "big")))
name = struct.pack(">H", 0x000B) + hashlib.sha256(key_public).digest()
attest = (struct.pack(">IH", 0xFF544347, 0x8017) + tpm2b(b"\x00\x0bsigner") + tpm2b(b"fuzz-nonce")
          + struct.pack(">QIIB", 12345, 1, 0, 1) + struct.pack(">Q", 0x2023)
          + tpm2b(name) + tpm2b(b"\x00\x0bqualified"))
put("attestation", "certify", b"\x01" + attest + b"\x00" + key_public)
put("attestation", "json", b"\x00" + json.dumps({
    "format": "tpm2-certify", "nonce": "66757a7a2d6e6f6e6365", "attest": base64.b64encode(attest).decode(),
    "signature": "MEUCIQ==", "ak_public": "", "key_public": base64.b64encode(key_public).decode(),
    "ek_certificates": [r.public_bytes(serialization.Encoding.PEM).decode()]}).encode())
put("tpm_structures", "attest", attest)
put("tpm_structures", "key_public", key_public)

# token_verifier: odd byte + `header \0 payload`, signed by the target with the key of seed 4.
claims = {"iss": "spiffe://tessera.local", "sub": "spiffe://tessera.local/host/h/agent/a",
          "aud": "https://api.example", "iat": 1700000000, "exp": 4000000000, "jti": "j1", "scope": "read"}
put("token_verifier", "bearer", b"\x01" + b'{"alg":"ES256","typ":"JWT","kid":"k1"}\x00' + json.dumps(claims).encode())
put("token_verifier", "bound", b"\x01" + b'{"alg":"ES256","typ":"JWT","kid":"k1"}\x00'
    + json.dumps(dict(claims, cnf={"jkt": "abc", "x5t#S256": "def"})).encode())
put("token_verifier", "text", b"\x00eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImsxIn0.e30.AAAA")

# audit_verify: odd byte (re-chained by the target) + records as the writer lays them out.
records = [
    {"ts": "2026-01-01T00:00:00Z", "event": "daemon.started", "details": {"backend": "pkcs11"}, "seq": 1},
    {"ts": "2026-01-01T00:00:01Z", "event": "agent.enrolled", "agent": {"name": "a", "id": "spiffe://t/a"}, "details": {}, "seq": 2},
    {"ts": "2026-01-01T00:00:02Z", "event": "audit.pruned", "details": {"through": 1, "prev": "00"}, "seq": 3},
]
put("audit_verify", "trail", b"\x01" + "\n".join(json.dumps(r) for r in records).encode() + b"\n")
