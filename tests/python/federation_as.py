"""A federated relying party for the end-to-end tests: an OAuth 2.0 authorization server built
on authlib's RFC 7523 JWT bearer grant (joserfc underneath), on loopback HTTPS, that trusts one
tessera host the way a cloud token service does: it fetches the issuer's OIDC discovery document
and JWKS over HTTPS from a static server that serves the daemon's `publish_dir`.

    federation_as.py --publish-dir DIR --issuer URL --subject-prefix P --dir OUT

Writes OUT/ca.pem (the test CA both servers' certificates chain to), then prints one JSON line
`{"static": PORT, "as": PORT}` and serves until killed. The issuer's host name is resolved to the
static server (as DNS would), so the issuer URL keeps the contract's shape (https, no port).

Endpoints (on the AS):
- POST /token: RFC 7523 jwt-bearer and RFC 8693 token exchange (form-encoded);
- POST /v1/oauth/token: the Claude API's shape (JSON jwt-bearer with federation_rule_id,
  organization_id, service_account_id);
- GET /introspect?token=AT: whom an access token was issued to.

Policy beyond authlib's checks: `typ` JWT, `kid` present, `iat` not in the future, `exp - iat`
at most 1 h, `jti` single-use, `sub` under the subject prefix.
"""

import argparse
import datetime
import http.server
import io
import json
import os
import socket
import ssl
import sys
import threading
import time
import urllib.parse

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import InvalidGrantError, InvalidRequestError, UnauthorizedClientError
from authlib.oauth2.rfc6749.grants import BaseGrant
from authlib.oauth2.rfc7523 import JWTBearerGrant
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flask import Flask, jsonify, request
from joserfc.jwk import KeySet
from werkzeug.serving import make_server

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
CLAUDE_AUDIENCE = "https://api.anthropic.com"


def make_pki(out):
    """A test CA and one server certificate for localhost, 127.0.0.1 and the issuer's host."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tessera federation test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    names = [x509.DNSName("localhost"), x509.DNSName(ISSUER_HOST), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)
    with open(os.path.join(out, "ca.pem"), "wb") as f:
        f.write(pem(ca))
    with open(os.path.join(out, "server.pem"), "wb") as f:
        f.write(pem(leaf))
    with open(os.path.join(out, "server.key"), "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def server_context(out):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(os.path.join(out, "server.pem"), os.path.join(out, "server.key"))
    return ctx


def fetch_json(url):
    """GET `url` over HTTPS, checking the server against the test CA; the issuer's host name
    resolves to the static server (our stand-in for DNS)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "https":
        raise InvalidGrantError(description=f"{url} is not https")
    port = STATIC_PORT if u.hostname == ISSUER_HOST else (u.port or 443)
    ctx = ssl.create_default_context(cafile=CA_FILE)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=u.hostname) as s:
            s.sendall(
                f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.hostname}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        raise InvalidGrantError(description=f"{url}: HTTP {status}")
    return json.loads(body)


class Client:
    """The one trusted issuer, as an OAuth client of this server."""

    def __init__(self, issuer):
        self.client_id = issuer

    def check_grant_type(self, grant_type):
        return grant_type in (JWTBearerGrant.GRANT_TYPE, TOKEN_EXCHANGE)

    def get_allowed_scope(self, scope):
        return scope or ""

    def check_endpoint_auth_method(self, method, endpoint):
        return True

    def get_client_id(self):
        return self.client_id


SEEN_JTI = {}
TOKENS = {}
LOCK = threading.Lock()


class TesseraAssertion(JWTBearerGrant):
    """authlib's RFC 7523 grant with the federation profile's policy on top."""

    def get_audiences(self):
        return AUDIENCES

    def resolve_issuer_client(self, issuer):
        return Client(issuer) if issuer == ISSUER else None

    def resolve_client_public_key(self, client):
        # Discovery every time (a cloud service caches; the test wants revocation seen now).
        doc = fetch_json(client.client_id + "/.well-known/openid-configuration")
        if doc.get("issuer") != client.client_id:
            raise InvalidGrantError(description="discovery document names another issuer")
        keys = fetch_json(doc["jwks_uri"])
        if not keys.get("keys"):
            raise InvalidGrantError(description="the issuer publishes no keys")
        return KeySet.import_key_set(keys)

    def process_assertion_claims(self, assertion):
        headers, _ = self.extract_assertion(assertion)
        if headers.get("typ") != "JWT" or not headers.get("kid"):
            raise InvalidGrantError(description="assertion must be typ JWT with a kid")
        claims = super().process_assertion_claims(assertion)
        now = int(time.time())
        iat, exp, jti = claims.get("iat"), claims.get("exp"), claims.get("jti")
        if not isinstance(iat, int) or iat > now + 30:
            raise InvalidGrantError(description="iat missing or in the future")
        if exp - iat > 3600:
            raise InvalidGrantError(description="exp - iat is over 1 h")
        if not jti:
            raise InvalidGrantError(description="no jti")
        with LOCK:
            if jti in SEEN_JTI:
                raise InvalidGrantError(description="jti replayed")
            SEEN_JTI[jti] = exp
        return claims

    def authenticate_user(self, subject):
        return subject if subject.startswith(SUBJECT_PREFIX) else None

    def has_granted_permission(self, client, user):
        return True

    def create_token_response(self):
        status, token, headers = super().create_token_response()
        # Not a standard member: lets the test see whom the token was issued to.
        token["subject"] = self.request.user
        return status, token, headers


class TesseraTokenExchange(TesseraAssertion):
    """RFC 8693 with a tessera assertion as the subject token, checked as above."""

    GRANT_TYPE = TOKEN_EXCHANGE

    def validate_token_request(self):
        form = self.request.form
        if form.get("subject_token_type") != JWT_TYPE:
            raise InvalidRequestError("subject_token_type must be " + JWT_TYPE)
        token = form.get("subject_token")
        if not token:
            raise InvalidRequestError("Missing 'subject_token'")
        claims = self.process_assertion_claims(token)
        client = self.resolve_issuer_client(claims["iss"])
        if not client.check_grant_type(self.GRANT_TYPE):
            raise UnauthorizedClientError("grant not allowed")
        self.request.client = client
        user = self.authenticate_user(claims.get("sub") or "")
        if not user:
            raise InvalidGrantError(description="Invalid 'sub' value in assertion")
        self.request.user = user

    def create_token_response(self):
        status, token, headers = super().create_token_response()
        token["issued_token_type"] = "urn:ietf:params:oauth:token-type:access_token"
        return status, token, headers


def save_token(token, req):
    with LOCK:
        TOKENS[token["access_token"]] = {"sub": req.user, "iss": req.client.client_id}


def claude_json_to_form(app):
    """The Claude API takes a JSON body with its own members; turn it into the RFC 7523 form
    the grant reads, after checking those members are there."""

    def wsgi(environ, start_response):
        if environ.get("PATH_INFO") == "/v1/oauth/token":
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            bad = None
            if not environ.get("CONTENT_TYPE", "").startswith("application/json"):
                bad = "content type must be application/json"
            else:
                try:
                    doc = json.loads(body)
                except ValueError:
                    doc, bad = {}, "body is not JSON"
                for k in ("federation_rule_id", "organization_id", "service_account_id"):
                    if not bad and not doc.get(k):
                        bad = f"missing {k}"
            if bad:
                out = json.dumps({"error": "invalid_request", "error_description": bad}).encode()
                start_response("400 Bad Request", [("Content-Type", "application/json")])
                return [out]
            form = urllib.parse.urlencode(
                {"grant_type": doc.get("grant_type", ""), "assertion": doc.get("assertion", "")}
            ).encode()
            environ["wsgi.input"] = io.BytesIO(form)
            environ["CONTENT_LENGTH"] = str(len(form))
            environ["CONTENT_TYPE"] = "application/x-www-form-urlencoded"
        return app(environ, start_response)

    return wsgi


def main():
    global ISSUER, ISSUER_HOST, STATIC_PORT, CA_FILE, SUBJECT_PREFIX, AUDIENCES
    ap = argparse.ArgumentParser()
    ap.add_argument("--publish-dir", required=True)
    ap.add_argument("--issuer", required=True)
    ap.add_argument("--subject-prefix", required=True)
    ap.add_argument("--dir", required=True)
    a = ap.parse_args()
    ISSUER = a.issuer
    ISSUER_HOST = urllib.parse.urlsplit(a.issuer).hostname
    SUBJECT_PREFIX = a.subject_prefix
    CA_FILE = os.path.join(a.dir, "ca.pem")
    make_pki(a.dir)
    ctx = server_context(a.dir)

    # The static web server in front of publish_dir (what an admin's nginx or bucket does):
    # the issuer's path prefix maps onto the directory.
    prefix = urllib.parse.urlsplit(a.issuer).path

    class Static(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kw):
            super().__init__(*args, directory=a.publish_dir, **kw)

        def translate_path(self, path):
            if not path.startswith(prefix + "/"):
                return "/nonexistent"
            return super().translate_path(path[len(prefix):])

        def log_message(self, *args):
            pass

    static = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Static)
    static.socket = ctx.wrap_socket(static.socket, server_side=True)
    STATIC_PORT = static.server_address[1]
    threading.Thread(target=static.serve_forever, daemon=True).start()

    app = Flask("federation-as")
    server = AuthorizationServer(app, query_client=lambda cid: None, save_token=save_token)
    server.register_grant(TesseraAssertion)
    server.register_grant(TesseraTokenExchange)

    @app.post("/token")
    def token():
        return server.create_token_response()

    @app.post("/v1/oauth/token")
    def claude_token():
        return server.create_token_response()

    @app.get("/introspect")
    def introspect():
        with LOCK:
            t = TOKENS.get(request.args.get("token", ""))
        return jsonify({"active": t is not None, **(t or {})})

    http_srv = make_server("127.0.0.1", 0, claude_json_to_form(app), threaded=True, ssl_context=ctx)
    as_port = http_srv.server_port
    AUDIENCES = [f"https://localhost:{as_port}/token", CLAUDE_AUDIENCE]
    print(json.dumps({"static": STATIC_PORT, "as": as_port}), flush=True)
    http_srv.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
