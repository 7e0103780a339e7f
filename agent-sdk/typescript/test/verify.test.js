// The relying-party checks: every rule with tokens and proofs made here (jose signs them), then
// with the real daemon's tokens, revocation included.

import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import http from 'node:http';
import { after, before, describe, test } from 'node:test';

import { SignJWT, base64url, calculateJwkThumbprint, createLocalJWKSet, decodeJwt, exportJWK, generateKeyPair } from 'jose';

import { JwksCache, ReplayCache, VerifyError, b64Sha256, verify, verifyDpop, verifyRequest } from '../src/index.js';
import { Daemon, describeWithDaemon } from './daemon.js';

const AUD = 'https://api.example.com';
const URL_ = 'https://api.example.com/v1/x';
const now = () => Math.floor(Date.now() / 1000);

/**
 * A P-256 key pair with its public JWK and RFC 7638 thumbprint.
 */
async function key() {
  const { privateKey, publicKey } = await generateKeyPair('ES256', { extractable: true });
  const jwk = await exportJWK(publicKey);
  const priv = await exportJWK(privateKey);
  return { privateKey, publicKey, jwk, priv, kid: await calculateJwkThumbprint(jwk) };
}

/**
 * A compact JWS over `header` and `claims`, signed by `k` (the header is used as given).
 * @param {any} k
 * @param {Record<string, any>} header
 * @param {Record<string, any>} claims
 */
function jws(k, header, claims) {
  return new SignJWT(claims).setProtectedHeader(/** @type {any} */ (header)).sign(k.privateKey);
}

/**
 * An unsigned or otherwise hand-made token: base64url(header).base64url(claims).signature.
 * @param {Record<string, any>} header
 * @param {Record<string, any>} claims
 * @param {string} [sig]
 */
function raw(header, claims, sig = '') {
  return `${base64url.encode(JSON.stringify(header))}.${base64url.encode(JSON.stringify(claims))}.${sig}`;
}

/**
 * @param {Promise<unknown>} p
 * @param {string} code
 * @param {RegExp} [message]
 */
async function refused(p, code, message) {
  await assert.rejects(p, (e) => {
    assert.ok(e instanceof VerifyError, `not a VerifyError: ${e}`);
    assert.equal(e.code, code, `${e.code}: ${e.message}`);
    if (message) assert.match(e.message, message);
    return true;
  });
}

describe('verify and verifyDpop (tokens and proofs made here)', () => {
  /** @type {any} */ let issuer;
  /** @type {any} */ let agent;
  /** @type {any} */ let other;
  /** @type {{keys: any[]}} */ let jwks;
  /** @type {Record<string, any>} */ let claims;
  /** @type {string} */ let token;
  /** @type {string} */ let bound;

  before(async () => {
    issuer = await key();
    agent = await key();
    other = await key();
    jwks = { keys: [{ ...issuer.jwk, kid: issuer.kid, alg: 'ES256', use: 'sig' }] };
    const t = now();
    claims = { iss: 'spiffe://td/host/h', sub: 'spiffe://td/host/h/agent/a', aud: AUD, iat: t, exp: t + 300, jti: 't1', scope: 'read write' };
    token = await jws(issuer, { alg: 'ES256', typ: 'JWT', kid: issuer.kid }, claims);
    bound = await jws(issuer, { alg: 'ES256', typ: 'JWT', kid: issuer.kid }, { ...claims, jti: 't2', cnf: { jkt: agent.kid } });
  });

  /** @param {Record<string, any>} c @param {Record<string, any>} [h] */
  const mint = (c, h = {}) => jws(issuer, { alg: 'ES256', typ: 'JWT', kid: issuer.kid, ...h }, c);

  test('a good token: id, scopes, jti, claims, not bound', async () => {
    const v = await verify(token, { audience: AUD, jwks, issuer: 'spiffe://td/host/h' });
    assert.equal(v.id, claims.sub);
    assert.deepEqual(v.scopes, ['read', 'write']);
    assert.equal(v.jti, 't1');
    assert.equal(v.bound, false);
    assert.equal(v.claims.exp, claims.exp);
  });

  test('every token rule refuses', async () => {
    const t = now();
    await refused(verify(token, { audience: 'https://other.example', jwks }), 'rejected', /aud/);
    await refused(verify(token, { audience: AUD, jwks, issuer: 'spiffe://elsewhere' }), 'rejected', /iss/);
    await refused(verify(await mint({ ...claims, iat: t - 600, exp: t - 100 }), { audience: AUD, jwks }), 'expired');
    await refused(verify(await mint({ ...claims, iat: t + 600, exp: t + 900 }), { audience: AUD, jwks }), 'issued-in-future');
    for (const missing of ['exp', 'iat', 'iss', 'sub', 'jti', 'aud']) {
      const { [missing]: _, ...rest } = claims;
      await refused(verify(await mint(rest), { audience: AUD, jwks }), 'rejected', new RegExp(missing));
    }
    await refused(verify(await mint(claims, { typ: 'dpop+jwt' }), { audience: AUD, jwks }), 'rejected', /typ/);
    await refused(verify(await mint(claims, { typ: undefined }), { audience: AUD, jwks }), 'rejected', /typ/);
    await refused(verify(await jws(issuer, { alg: 'ES256', typ: 'JWT' }, claims), { audience: AUD, jwks }), 'no-kid');
    await refused(verify(await mint(claims, { kid: 'nope' }), { audience: AUD, jwks }), 'unknown-key');
    // A key the set publishes for something else (a WIT key in a SPIFFE bundle) signs no token.
    const witOnly = { keys: [{ ...jwks.keys[0], use: 'wit-svid' }] };
    await refused(verify(token, { audience: AUD, jwks: witOnly }), 'unknown-key');
    await refused(verify('not.a.jwt', { audience: AUD, jwks }), 'malformed');
    await refused(verify('abc', { audience: AUD, jwks }), 'malformed');
  });

  test('alg none, HS256 with the public key as secret, a tampered signature or payload', async () => {
    const h = { typ: 'JWT', kid: issuer.kid };
    await refused(verify(raw({ ...h, alg: 'none' }, claims), { audience: AUD, jwks }), 'rejected', /alg/);
    // The classic confusion: HMAC keyed with the public key's bytes.
    const input = raw({ ...h, alg: 'HS256' }, claims).slice(0, -1);
    const mac = createHmac('sha256', JSON.stringify(jwks.keys[0])).update(input).digest('base64url');
    await refused(verify(`${input}.${mac}`, { audience: AUD, jwks }), 'rejected', /alg/);
    const [hh, pp, ss] = token.split('.');
    const flipped = ss.slice(0, 10) + (ss[10] === 'A' ? 'B' : 'A') + ss.slice(11);
    await refused(verify(`${hh}.${pp}.${flipped}`, { audience: AUD, jwks }), 'rejected', /signature/);
    const forged = base64url.encode(JSON.stringify({ ...claims, scope: 'admin' }));
    await refused(verify(`${hh}.${forged}.${ss}`, { audience: AUD, jwks }), 'rejected', /signature/);
  });

  test('a bound token without its proof is refused', async () => {
    await refused(verify(bound, { audience: AUD, jwks }), 'bound');
  });

  test('jwks as a jose key set function, a URL and a JwksCache', async () => {
    const v = await verify(token, { audience: AUD, jwks: createLocalJWKSet(/** @type {any} */ (jwks)) });
    assert.equal(v.id, claims.sub);
    await refused(verify(await mint(claims, { kid: 'nope' }), { audience: AUD, jwks: createLocalJWKSet(/** @type {any} */ (jwks)) }), 'unknown-key');
    let served = 0;
    const server = http.createServer((req, res) => {
      served++;
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(jwks));
    });
    await new Promise((r) => server.listen(0, '127.0.0.1', () => r(undefined)));
    try {
      const url = `http://127.0.0.1:${/** @type {any} */ (server.address()).port}/jwks.json`;
      assert.equal((await verify(token, { audience: AUD, jwks: url })).id, claims.sub);
      assert.equal((await verify(token, { audience: AUD, jwks: new URL(url) })).id, claims.sub);
      assert.equal(served, 1, 'one fetch for both calls (cached per URL)');
    } finally {
      server.close();
    }
  });

  test('JwksCache: refetches for an unknown kid at most once per cooldown, and when old', async () => {
    let loads = 0;
    const cache = new JwksCache(async () => { loads++; return jwks; }, { cooldown: 200, maxAge: 60_000 });
    const unknown = await mint(claims, { kid: 'later' });
    await verify(token, { audience: AUD, jwks: cache });
    assert.equal(loads, 1);
    await refused(verify(unknown, { audience: AUD, jwks: cache }), 'unknown-key');
    await refused(verify(unknown, { audience: AUD, jwks: cache }), 'unknown-key');
    assert.equal(loads, 1, 'within the cooldown: no fetch');
    await new Promise((r) => setTimeout(r, 220));
    await refused(verify(unknown, { audience: AUD, jwks: cache }), 'unknown-key');
    assert.equal(loads, 2, 'after the cooldown: one fetch');
    const stale = new JwksCache(async () => { loads++; return jwks; }, { maxAge: 0 });
    await verify(token, { audience: AUD, jwks: stale });
    await verify(token, { audience: AUD, jwks: stale });
    assert.equal(loads, 4);
    const broken = new JwksCache(async () => { throw new Error('down'); });
    await refused(verify(token, { audience: AUD, jwks: broken }), 'jwks-unavailable');
  });

  /** @param {any} k @param {Record<string, any>} c @param {Record<string, any>} [h] */
  const proof = (k, c, h = {}) => jws(k, { typ: 'dpop+jwt', alg: 'ES256', jwk: k.jwk, ...h }, c);

  test('a good proof; the same proof again is a replay', async () => {
    const replay = new ReplayCache();
    const ath = b64Sha256(bound);
    const p = await proof(agent, { jti: 'p1', htm: 'GET', htu: URL_, iat: now(), ath });
    const ok = await verifyDpop(p, { method: 'GET', url: 'https://API.example.com:443/v1/x?q=1#f', accessToken: bound, jkt: agent.kid, replay });
    assert.equal(ok.jkt, agent.kid);
    assert.equal(ok.jti, 'p1');
    await refused(verifyDpop(p, { method: 'GET', url: URL_, accessToken: bound, jkt: agent.kid, replay }), 'replay');
  });

  test('every RFC 9449 proof rule refuses', async () => {
    const replay = new ReplayCache();
    const t = now();
    const ath = b64Sha256(bound);
    const opts = { method: 'GET', url: URL_, accessToken: bound, jkt: agent.kid, replay };
    const withPrivate = { ...agent.jwk, d: agent.priv.d };
    /** @type {Array<[string, Promise<string>, RegExp, Record<string, any>?]>} */
    const cases = [
      ['wrong method', proof(agent, { jti: 'a', htm: 'POST', htu: URL_, iat: t, ath }), /htm/],
      ['wrong uri', proof(agent, { jti: 'b', htm: 'GET', htu: 'https://api.example.com/v1/y', iat: t, ath }), /htu/],
      ['old', proof(agent, { jti: 'c', htm: 'GET', htu: URL_, iat: t - 120, ath }), /iat/],
      ['future', proof(agent, { jti: 'd', htm: 'GET', htu: URL_, iat: t + 120, ath }), /iat/],
      ['no ath', proof(agent, { jti: 'e', htm: 'GET', htu: URL_, iat: t }), /ath/],
      ['wrong ath', proof(agent, { jti: 'f', htm: 'GET', htu: URL_, iat: t, ath: b64Sha256('x') }), /ath/],
      ['other key', proof(other, { jti: 'g', htm: 'GET', htu: URL_, iat: t, ath }), /cnf\.jkt/],
      ['typ', jws(agent, { typ: 'JWT', alg: 'ES256', jwk: agent.jwk }, { jti: 'h', htm: 'GET', htu: URL_, iat: t, ath }), /typ/],
      ['no jwk', jws(agent, { typ: 'dpop+jwt', alg: 'ES256' }, { jti: 'i', htm: 'GET', htu: URL_, iat: t, ath }), /jwk/],
      ['private jwk', jws(agent, { typ: 'dpop+jwt', alg: 'ES256', jwk: withPrivate }, { jti: 'j', htm: 'GET', htu: URL_, iat: t, ath }), /private member/],
      ['missing jti', proof(agent, { htm: 'GET', htu: URL_, iat: t, ath }), /jti/],
      ['alg none', Promise.resolve(raw({ typ: 'dpop+jwt', alg: 'none', jwk: agent.jwk }, { jti: 'k', htm: 'GET', htu: URL_, iat: t, ath })), /alg/],
      ['alg RS256', Promise.resolve(raw({ typ: 'dpop+jwt', alg: 'RS256', jwk: agent.jwk }, { jti: 'l', htm: 'GET', htu: URL_, iat: t, ath }, 'AAAA')), /alg/],
      ['ath without token', proof(agent, { jti: 'm', htm: 'GET', htu: URL_, iat: t, ath }), /ath given/, { accessToken: undefined }],
      ['not http', proof(agent, { jti: 'n', htm: 'GET', htu: 'ftp://api.example.com/v1/x', iat: t, ath }), /http/],
    ];
    for (const [what, p, why, extra] of cases) {
      await refused(verifyDpop(await p, { ...opts, ...extra }), 'proof', why).catch((e) => {
        throw new Error(`${what}: ${e.message}`);
      });
    }
    const good = await proof(agent, { jti: 'o', htm: 'GET', htu: URL_, iat: t, ath });
    const [h, pl, s] = good.split('.');
    await refused(verifyDpop(`${h}.${pl}.${s.slice(0, -4)}AAAA`, opts), 'proof', /signature/);
    // None of the refused proofs took a place in the replay cache.
    assert.equal(replay.size, 0);
  });

  test('the server nonce: missing or wrong is use-nonce, right passes', async () => {
    const replay = new ReplayCache();
    const ath = b64Sha256(bound);
    const opts = { method: 'GET', url: URL_, accessToken: bound, replay, nonce: 'N1' };
    await refused(verifyDpop(await proof(agent, { jti: 'a', htm: 'GET', htu: URL_, iat: now(), ath }), opts), 'use-nonce');
    await refused(verifyDpop(await proof(agent, { jti: 'b', htm: 'GET', htu: URL_, iat: now(), ath, nonce: 'N0' }), opts), 'use-nonce');
    await verifyDpop(await proof(agent, { jti: 'c', htm: 'GET', htu: URL_, iat: now(), ath, nonce: 'N1' }), opts);
    await verifyDpop(await proof(agent, { jti: 'd', htm: 'GET', htu: URL_, iat: now(), ath, nonce: 'N0' }), { ...opts, nonce: ['N0', 'N1'] });
  });

  test('the window: a proof younger than maxAge passes, an older one does not', async () => {
    const replay = new ReplayCache();
    const ath = b64Sha256(bound);
    const opts = { method: 'GET', url: URL_, accessToken: bound, replay, maxAge: 30 };
    await verifyDpop(await proof(agent, { jti: 'a', htm: 'GET', htu: URL_, iat: now() - 29, ath }), opts);
    await refused(verifyDpop(await proof(agent, { jti: 'b', htm: 'GET', htu: URL_, iat: now() - 32, ath }), opts), 'proof', /iat/);
  });

  test('a token endpoint proof: no access token, no ath', async () => {
    const p = await proof(agent, { jti: 'te', htm: 'POST', htu: `${AUD}/token`, iat: now() });
    const ok = await verifyDpop(p, { method: 'POST', url: `${AUD}/token`, replay: new ReplayCache() });
    assert.equal(ok.jkt, agent.kid);
  });

  test('verifyRequest: header forms, schemes, challenges', async () => {
    const replay = new ReplayCache();
    const ath = b64Sha256(bound);
    const opts = { audience: AUD, jwks, replay };
    // Node's IncomingHttpHeaders.
    const p1 = await proof(agent, { jti: 'r1', htm: 'POST', htu: URL_, iat: now(), ath });
    const v = await verifyRequest({ method: 'POST', url: `${URL_}?a=1`, headers: { authorization: `DPoP ${bound}`, dpop: p1 } }, opts);
    assert.equal(v.bound, true);
    assert.equal(v.proof?.jti, 'r1');
    assert.equal(v.id, claims.sub);
    // fetch Headers, bearer.
    const b = await verifyRequest({ method: 'GET', url: URL_, headers: new Headers({ Authorization: `Bearer ${token}` }) }, opts);
    assert.equal(b.bound, false);
    // A bound token as bearer.
    await refused(verifyRequest({ method: 'GET', url: URL_, headers: { authorization: `Bearer ${bound}` } }, opts), 'bound');
    // An unbound token as DPoP.
    const p2 = await proof(agent, { jti: 'r2', htm: 'GET', htu: URL_, iat: now(), ath: b64Sha256(token) });
    await refused(verifyRequest({ method: 'GET', url: URL_, headers: { authorization: `DPoP ${token}`, dpop: p2 } }, opts), 'proof', /not bound/);
    // Two DPoP headers (array, or joined by a proxy).
    const p3 = await proof(agent, { jti: 'r3', htm: 'GET', htu: URL_, iat: now(), ath });
    await refused(verifyRequest({ method: 'GET', url: URL_, headers: { authorization: `DPoP ${bound}`, dpop: [p3, p3] } }, opts), 'proof', /more than one/);
    await refused(verifyRequest({ method: 'GET', url: URL_, headers: new Headers([['authorization', `DPoP ${bound}`], ['dpop', p3], ['dpop', p3]]) }, opts), 'proof', /more than one/);
    await refused(verifyRequest({ method: 'GET', url: URL_, headers: { authorization: `DPoP ${bound}` } }, opts), 'proof', /no DPoP/);
    await refused(verifyRequest({ method: 'GET', url: URL_, headers: { authorization: `Basic dXNlcjpwdw==` } }, opts), 'malformed');
    // Challenges.
    await assert.rejects(verifyRequest({ method: 'GET', url: URL_, headers: {} }, opts), (e) => {
      assert.ok(e instanceof VerifyError);
      assert.equal(e.code, 'missing');
      assert.equal(e.status, 401);
      assert.deepEqual(e.challenge(), { 'www-authenticate': 'Bearer, DPoP algs="ES256"' });
      return true;
    });
    await assert.rejects(verifyRequest({ method: 'GET', url: URL_, headers: { authorization: `DPoP ${bound}`, dpop: p3 } }, { ...opts, nonce: 'N9' }), (e) => {
      assert.ok(e instanceof VerifyError);
      assert.equal(e.code, 'use-nonce');
      const h = e.challenge({ nonce: 'N9' });
      assert.match(h['www-authenticate'], /^DPoP error="use_dpop_nonce"/);
      assert.equal(h['dpop-nonce'], 'N9');
      return true;
    });
    await assert.rejects(verifyRequest({ method: 'GET', url: URL_, headers: { authorization: `Bearer ${token}x` } }, opts), (e) => {
      assert.ok(e instanceof VerifyError);
      assert.match(e.challenge()['www-authenticate'], /^Bearer error="invalid_token"/);
      return true;
    });
  });
});

describe('ReplayCache', () => {
  test('once per window, and fail closed when full', () => {
    const c = new ReplayCache(2);
    c.checkAndInsert('a', 100, 0);
    assert.throws(() => c.checkAndInsert('a', 100, 50), { code: 'replay' });
    c.checkAndInsert('b', 120, 50);
    // Full: a new id is refused...
    assert.throws(() => c.checkAndInsert('c', 130, 60), { code: 'replay-cache-full' });
    // ... and one seen before is still a replay: nothing is forgotten early.
    assert.throws(() => c.checkAndInsert('a', 100, 99), { code: 'replay' });
    // "a" is kept 5 s (the grace) past its end by the latest clock reading.
    assert.throws(() => c.checkAndInsert('c', 130, 103), { code: 'replay-cache-full' });
    // Once it is gone it leaves room.
    c.checkAndInsert('c', 130, 105);
    assert.equal(c.size, 2);
    c.checkAndInsert('d', 200, 135);
    assert.equal(c.size, 1);
  });

  test('a stale clock reading cannot find a forgotten id', () => {
    const c = new ReplayCache(10);
    c.checkAndInsert('p', 1001, 940);
    c.checkAndInsert('q', 1100, 1006);
    assert.throws(() => c.checkAndInsert('p', 1001, 1000), { code: 'proof' });
    c.checkAndInsert('r', 1100, 1002);
  });

  test('default capacity 100 000; expiry in order of end, whatever the insertion order', () => {
    assert.equal(new ReplayCache().capacity, 100_000);
    const c = new ReplayCache(1000);
    const ends = Array.from({ length: 200 }, (_, i) => 1000 + ((i * 37) % 200));
    ends.forEach((end, i) => c.checkAndInsert(`id${i}`, end, 900));
    c.checkAndInsert('probe', 5000, 1000 + 100 + 5);
    // Ends 1000..1100 (101 of them) are forgotten; 99 remain, plus the probe.
    assert.equal(c.size, 100);
  });
});

describeWithDaemon('verify with tesserad tokens', () => {
  /** @type {Daemon} */
  let d;
  before(async () => {
    d = await Daemon.start();
    await d.enrol('bot', { audiences: [AUD], scopes: ['read'] });
  });
  after(async () => {
    await d?.stop();
  });

  test('a daemon token verifies (jwks: the Client); wrong audience, tampering, alg none, HS256 refused', async () => {
    const c = d.client;
    const me = await c.whoami({ agent: 'bot' });
    const { token } = await c.token({ audience: AUD, scopes: ['read'], agent: 'bot' });
    const iss = String(decodeJwt(token).iss);
    const v = await verify(token, { audience: AUD, jwks: c, issuer: iss });
    assert.equal(v.id, me.id);
    assert.deepEqual(v.scopes, ['read']);
    assert.equal(v.bound, false);
    await refused(verify(token, { audience: 'https://other.example', jwks: c }), 'rejected', /aud/);
    const [h, p, s] = token.split('.');
    const flipped = s.slice(0, 20) + (s[20] === 'A' ? 'B' : 'A') + s.slice(21);
    await refused(verify(`${h}.${p}.${flipped}`, { audience: AUD, jwks: c }), 'rejected', /signature/);
    const header = JSON.parse(Buffer.from(h, 'base64url').toString());
    const payload = JSON.parse(Buffer.from(p, 'base64url').toString());
    await refused(verify(raw({ ...header, alg: 'none' }, payload), { audience: AUD, jwks: c }), 'rejected', /alg/);
    const input = raw({ ...header, alg: 'HS256' }, payload).slice(0, -1);
    const jwk = (await c.jwks()).keys.find((k) => k.kid === me.key_id);
    const mac = createHmac('sha256', JSON.stringify(jwk)).update(input).digest('base64url');
    await refused(verify(`${input}.${mac}`, { audience: AUD, jwks: c }), 'rejected', /alg/);
  });

  test('a DPoP-bound daemon token: refused alone, accepted with a daemon proof', async () => {
    const c = d.client;
    const { token } = await c.token({ audience: AUD, bind: 'dpop', agent: 'bot' });
    await refused(verify(token, { audience: AUD, jwks: c }), 'bound');
    const headers = await c.dpopHeaders({ method: 'PUT', url: `${AUD}/v1/items/7?x=1`, token, agent: 'bot' });
    const v = await verifyRequest({ method: 'PUT', url: `${AUD}/v1/items/7?x=2`, headers }, { audience: AUD, jwks: c });
    assert.equal(v.bound, true);
    assert.equal(v.proof?.jkt, (await c.whoami({ agent: 'bot' })).key_id);
  });

  test('a revoked agent\'s token is refused once the key set is refreshed', async () => {
    const c = d.client;
    await d.enrol('doomed', { audiences: [AUD] });
    const { token } = await c.token({ audience: AUD, agent: 'doomed' });
    const cache = new JwksCache(c);
    assert.equal((await verify(token, { audience: AUD, jwks: cache })).id, (await c.whoami({ agent: 'doomed' })).id);
    await d.revoke('doomed');
    // The key has left /v1/jwks at once ...
    await refused(verify(token, { audience: AUD, jwks: await c.jwks() }), 'unknown-key');
    // ... and a cache that still holds it refuses from its next refresh on.
    await cache.refresh();
    await refused(verify(token, { audience: AUD, jwks: cache }), 'unknown-key');
  });
});
