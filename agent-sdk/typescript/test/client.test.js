// Client against a real tesserad: every call, and the daemon's refusals as typed errors.
// Results are checked with node:crypto and jose rather than with this SDK's own verifier.

import assert from 'node:assert/strict';
import { X509Certificate, createPublicKey, verify as cryptoVerify } from 'node:crypto';
import { after, before, test } from 'node:test';

import { calculateJwkThumbprint, compactVerify, createLocalJWKSet, decodeJwt, decodeProtectedHeader, importJWK, jwtVerify } from 'jose';

import {
  AgentRevoked,
  AmbiguousCaller,
  AudienceNotAllowed,
  BindingRequired,
  Client,
  MalformedRequest,
  RateLimited,
  ScopeNotAllowed,
  TargetNotAllowed,
  TesseraConnectError,
  TesseraProblem,
  TokenNotAccepted,
  TtlNotAllowed,
  UnknownCaller,
  b64Sha256,
  verifyDpop,
} from '../src/index.js';
import { Daemon, describeWithDaemon } from './daemon.js';

const API = 'https://api.example.com';

describeWithDaemon('Client against tesserad', () => {
  /** @type {Daemon} */
  let d;
  /** @type {Client} */
  let c;
  before(async () => {
    d = await Daemon.start();
    c = d.client;
    // Two agents match this process (uid 0): every call names one.
    await d.enrol('bot', { audiences: [API], scopes: ['read'], max_ttl: '1h' });
    await d.enrol('strict', { audiences: [API], require_binding: true, rate: 2 });
  });
  after(async () => {
    await d?.stop();
  });

  test('health', async () => {
    assert.deepEqual(await c.health(), { status: 'ok', backend: 'pkcs11' });
  });

  test('whoami names the agent; without a name two matching agents are ambiguous (409)', async () => {
    const me = await c.whoami({ agent: 'bot' });
    assert.equal(me.name, 'bot');
    assert.match(me.id, /^spiffe:\/\/[^/]+\/host\/[^/]+\/agent\/bot$/);
    assert.equal(me.status, 'active');
    assert.deepEqual(me.policy.audiences, [API]);
    assert.deepEqual(me.policy.scopes, ['read']);
    assert.deepEqual(me.selectors, ['uid']);
    await assert.rejects(c.whoami(), (e) => e instanceof AmbiguousCaller && e.status === 409 && e.slug === 'ambiguous-caller');
  });

  test('token: a JWT that jose verifies against /v1/jwks', async () => {
    const me = await c.whoami({ agent: 'bot' });
    const t = await c.token({ audience: API, scopes: ['read'], ttl: 120, agent: 'bot' });
    assert.equal(t.token_type, 'Bearer');
    const header = decodeProtectedHeader(t.token);
    assert.deepEqual(header, { alg: 'ES256', kid: me.key_id, typ: 'JWT' });
    const { payload } = await jwtVerify(t.token, createLocalJWKSet(await c.jwks()), { audience: API, algorithms: ['ES256'] });
    assert.equal(payload.sub, me.id);
    assert.equal(payload.scope, 'read');
    assert.equal(/** @type {number} */ (payload.exp) - /** @type {number} */ (payload.iat), 120);
    assert.equal(payload.cnf, undefined);
    assert.equal(Date.parse(t.expires_at) / 1000, payload.exp);
  });

  test('token bind "dpop": token_type DPoP, cnf.jkt is the agent key thumbprint', async () => {
    const me = await c.whoami({ agent: 'bot' });
    const t = await c.token({ audience: API, bind: 'dpop', agent: 'bot' });
    assert.equal(t.token_type, 'DPoP');
    assert.deepEqual(decodeJwt(t.token).cnf, { jkt: me.key_id });
  });

  test('jwks: one ES256 signing key per active agent', async () => {
    const keys = (await c.jwks()).keys;
    const bot = await c.whoami({ agent: 'bot' });
    const k = keys.find((x) => x.kid === bot.key_id);
    assert.ok(k, 'bot key published');
    assert.equal(k.alg, 'ES256');
    assert.equal(k.use, 'sig');
    assert.equal(await calculateJwkThumbprint(/** @type {any} */ (k)), bot.key_id);
    assert.equal(keys.length, 2);
  });

  test('certificate, bundle, crl: PEM the host CA signs', async () => {
    const me = await c.whoami({ agent: 'bot' });
    const chain = await c.certificate({ ttl: 600, agent: 'bot' });
    const pems = chain.match(/-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----/g) ?? [];
    assert.equal(pems.length, 2);
    const leaf = new X509Certificate(pems[0]);
    const ca = new X509Certificate(await c.bundle());
    assert.equal(ca.toString(), new X509Certificate(pems[1]).toString());
    assert.ok(leaf.verify(ca.publicKey), 'leaf signed by the host CA');
    assert.match(leaf.subjectAltName ?? '', new RegExp(`URI:${me.id}`));
    const life = (Date.parse(leaf.validTo) - Date.now()) / 1000;
    assert.ok(life <= 600 + 5 && life > 500, `certificate lives ${life} s`);
    const jwk = /** @type {any} */ (leaf.publicKey.export({ format: 'jwk' }));
    assert.equal(await calculateJwkThumbprint(jwk), me.key_id, 'certifies the agent key');
    assert.match(await c.crl(), /^-----BEGIN X509 CRL-----/);
  });

  test('spiffeBundle: jwt-svid, wit-svid and x509-svid entries', async () => {
    const b = await c.spiffeBundle();
    const uses = new Set(b.keys.map((k) => k.use));
    assert.deepEqual([...uses].sort(), ['jwt-svid', 'wit-svid', 'x509-svid']);
  });

  test('attestation over a hex nonce and over bytes', async () => {
    const a = await c.attestation('00112233445566778899aabb', { agent: 'bot' });
    assert.equal(a.nonce, '00112233445566778899aabb');
    assert.equal(a.format, 'pkcs11-attributes');
    const b = await c.attestation(Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8]), { agent: 'bot' });
    assert.equal(b.nonce, '0102030405060708');
    await assert.rejects(c.attestation('xyz', { agent: 'bot' }), MalformedRequest);
  });

  test('wit: a wit+jwt signed by the host CA key, binding the agent key', async () => {
    const me = await c.whoami({ agent: 'bot' });
    const w = await c.wit({ agent: 'bot' });
    const caKey = (await c.spiffeBundle()).keys.find((k) => k.use === 'wit-svid');
    const { payload, protectedHeader } = await jwtVerify(w.wit, await importJWK(/** @type {any} */ (caKey), 'ES256'), { typ: 'wit+jwt' });
    assert.equal(protectedHeader.typ, 'wit+jwt');
    assert.equal(payload.sub, me.id);
    assert.equal(payload.jti, w.jti);
    const { alg, ...jwk } = /** @type {any} */ (payload.cnf).jwk;
    assert.equal(alg, 'ES256');
    assert.equal(await calculateJwkThumbprint(jwk), me.key_id);
  });

  test('proof and dpopProof: DPoP proofs this SDK and jose accept', async () => {
    const me = await c.whoami({ agent: 'bot' });
    const t = await c.token({ audience: API, bind: 'dpop', agent: 'bot' });
    const p = await c.dpopProof({ htm: 'POST', htu: `${API}/v1/items`, accessToken: t.token, nonce: 'n-1', agent: 'bot' });
    assert.equal(p.type, 'dpop');
    const h = decodeProtectedHeader(p.proof);
    assert.equal(h.typ, 'dpop+jwt');
    const { payload } = await compactVerify(p.proof, await importJWK(/** @type {any} */ (h.jwk), 'ES256'));
    const claims = JSON.parse(new TextDecoder().decode(payload));
    assert.equal(claims.jti, p.jti);
    assert.equal(claims.nonce, 'n-1');
    assert.equal(claims.ath, b64Sha256(t.token));
    const ok = await verifyDpop(p.proof, { method: 'POST', url: `${API}/v1/items?x=1`, accessToken: t.token, jkt: me.key_id, nonce: 'n-1' });
    assert.equal(ok.jkt, me.key_id);
    // The raw call: wire member names, no access token (a token endpoint's proof).
    const raw = await c.proof({ type: 'dpop', htm: 'GET', htu: `${API}/token`, agent: 'bot' });
    assert.equal(JSON.parse(Buffer.from(String(raw.proof).split('.')[1], 'base64url').toString()).htu, `${API}/token`);
  });

  test('dpopHeaders: Authorization and DPoP for a URL with a query', async () => {
    const t = await c.token({ audience: API, bind: 'dpop', agent: 'bot' });
    const h = await c.dpopHeaders({ method: 'get', url: `${API}/a/b?c=d#e`, token: t.token, agent: 'bot' });
    assert.equal(h.authorization, `DPoP ${t.token}`);
    const claims = decodeJwt(h.dpop);
    assert.equal(claims.htm, 'GET');
    assert.equal(claims.htu, `${API}/a/b`);
  });

  test('wpt: a wpt+jwt signed by the key the WIT binds', async () => {
    const w = await c.wit({ agent: 'bot' });
    const p = await c.wpt({ aud: `${API}/x`, wit: w.wit, ttl: 30, agent: 'bot' });
    assert.equal(p.type, 'wpt');
    const { alg, ...jwk } = /** @type {any} */ (decodeJwt(w.wit).cnf).jwk;
    const { payload, protectedHeader } = await jwtVerify(p.proof, await importJWK(jwk, alg), { typ: 'wpt+jwt', audience: `${API}/x` });
    assert.equal(protectedHeader.typ, 'wpt+jwt');
    assert.equal(payload.wth, b64Sha256(w.wit));
    assert.ok(/** @type {number} */ (payload.exp) - Date.now() / 1000 <= 31);
  });

  test('httpSignature: an RFC 9421 signature node:crypto verifies over the rebuilt base', async () => {
    const me = await c.whoami({ agent: 'bot' });
    const target = `${API}/v1/items?q=1`;
    const s = await c.httpSignature({ method: 'POST', targetUri: target, headers: { 'Content-Type': 'application/json' }, agent: 'bot' });
    assert.equal(s.type, 'http-signature');
    const params = s.signature_input.replace(/^tessera=/, '');
    assert.match(params, /^\("@method" "@authority" "@target-uri" "content-type"\);/);
    assert.match(params, new RegExp(`keyid="${me.key_id}"`));
    assert.match(params, /alg="ecdsa-p256-sha256"/);
    const base = [
      '"@method": POST',
      '"@authority": api.example.com',
      `"@target-uri": ${target}`,
      '"content-type": application/json',
      `"@signature-params": ${params}`,
    ].join('\n');
    const sig = Buffer.from(/^tessera=:([^:]+):$/.exec(s.signature)?.[1] ?? '', 'base64');
    const jwk = (await c.jwks()).keys.find((k) => k.kid === me.key_id);
    const key = createPublicKey({ key: /** @type {any} */ (jwk), format: 'jwk' });
    assert.ok(cryptoVerify('sha256', Buffer.from(base), { key, dsaEncoding: 'ieee-p1363' }, sig));
  });

  test('refusals are typed problems with status, slug, title and detail', async () => {
    await assert.rejects(c.token({ audience: 'https://elsewhere.example', agent: 'bot' }), (e) => {
      assert.ok(e instanceof AudienceNotAllowed);
      assert.ok(e instanceof TesseraProblem);
      assert.equal(e.status, 403);
      assert.equal(e.slug, 'audience-not-allowed');
      assert.equal(e.type, 'urn:tessera:problem:audience-not-allowed');
      assert.equal(e.title, 'Audience not allowed by policy');
      assert.match(e.detail, /elsewhere\.example/);
      return true;
    });
    await assert.rejects(c.token({ audience: API, scopes: ['write'], agent: 'bot' }), (e) => e instanceof ScopeNotAllowed && e.status === 403);
    await assert.rejects(c.token({ audience: API, ttl: '2h', agent: 'bot' }), (e) => e instanceof TtlNotAllowed && e.status === 403);
    await assert.rejects(c.proof({ type: 'dpop', htm: 'GET', htu: `${API}/`, agent: 'bot', bogus: 1 }), (e) => e instanceof MalformedRequest && e.status === 400);
    await assert.rejects(c.token({ audience: API, agent: 'nobody' }), (e) => e instanceof UnknownCaller && e.status === 403);
    await assert.rejects(c.dpopProof({ htm: 'GET', htu: 'https://elsewhere.example/x', agent: 'bot' }), (e) => e instanceof TargetNotAllowed);
    const bearer = await c.token({ audience: API, agent: 'bot' });
    await assert.rejects(c.dpopProof({ htm: 'GET', htu: `${API}/x`, accessToken: bearer.token, agent: 'bot' }), (e) => e instanceof TokenNotAccepted);
  });

  test('binding required, then rate limited with Retry-After', async () => {
    await assert.rejects(c.token({ audience: API, agent: 'strict' }), (e) => e instanceof BindingRequired && e.status === 403);
    // rate = 2 per minute; the refused request above may or may not count, so ask until refused.
    let refused;
    for (let i = 0; i < 4 && !refused; i++) {
      try {
        await c.token({ audience: API, bind: 'dpop', agent: 'strict' });
      } catch (e) {
        refused = e;
      }
    }
    assert.ok(refused instanceof RateLimited, `refused with ${refused}`);
    assert.equal(refused.status, 429);
    assert.equal(typeof refused.retryAfter, 'number');
    assert.ok(refused.retryAfter > 0 && refused.retryAfter <= 60, `retryAfter ${refused.retryAfter}`);
  });

  test('a revoked agent: AgentRevoked (403), and its key leaves /v1/jwks at once', async () => {
    await d.enrol('doomed', { audiences: [API] });
    const me = await c.whoami({ agent: 'doomed' });
    await c.token({ audience: API, agent: 'doomed' });
    await d.revoke('doomed');
    await assert.rejects(c.token({ audience: API, agent: 'doomed' }), (e) => {
      assert.ok(e instanceof AgentRevoked);
      assert.equal(e.status, 403);
      assert.equal(e.slug, 'agent-revoked');
      return true;
    });
    assert.ok(!(await c.jwks()).keys.some((k) => k.kid === me.key_id));
  });

  test('a missing socket: TesseraConnectError naming the path', async () => {
    const gone = new Client({ socketPath: `${d.stateDir}/no-such.sock` });
    await assert.rejects(gone.health(), (e) => {
      assert.ok(e instanceof TesseraConnectError);
      assert.equal(e.code, 'ENOENT');
      assert.equal(e.socketPath, `${d.stateDir}/no-such.sock`);
      assert.match(e.message, /cannot reach tesserad at .*no-such\.sock: the socket does not exist/);
      return true;
    });
  });
});
