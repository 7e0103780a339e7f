// tesseraFetch against a local HTTP server that checks every request with verifyRequest, with
// tokens and proofs from a real tesserad.

import assert from 'node:assert/strict';
import http from 'node:http';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

import { decodeJwt } from 'jose';

import { AudienceNotAllowed, ReplayCache, VerifyError, createTesseraFetch, verifyRequest } from '../src/index.js';
import { Daemon, describeWithDaemon } from './daemon.js';

/**
 * @typedef {{method: string, path: string, headers: http.IncomingHttpHeaders, body: string,
 *   error?: string, id?: string, bound?: boolean}} Seen
 */

describeWithDaemon('tesseraFetch against a verifying server', () => {
  /** @type {Daemon} */
  let d;
  /** @type {http.Server} */
  let server;
  /** @type {string} */
  let origin;
  /** Requests as the server saw them. @type {Seen[]} */
  let seen = [];
  /** The nonce `/nonce/...` requires. */
  let nonce = 'N-1';
  let challenges = 0;

  before(async () => {
    d = await Daemon.start();
    const replay = new ReplayCache();
    server = http.createServer(async (req, res) => {
      let body = '';
      for await (const chunk of req) body += chunk;
      const path = req.url ?? '/';
      /** @type {Seen} */
      const entry = { method: req.method ?? '', path, headers: req.headers, body };
      seen.push(entry);
      if (path.startsWith('/invalid')) {
        // A server that no longer takes the token (its key rotated, it was revoked).
        res.writeHead(401, { 'www-authenticate': 'Bearer error="invalid_token"' }).end();
        return;
      }
      if (path.startsWith('/always')) {
        // A server whose nonce never satisfies: the client must not loop.
        challenges++;
        res.writeHead(401, {
          'www-authenticate': 'DPoP error="use_dpop_nonce"',
          'dpop-nonce': `always-${challenges}`,
        }).end();
        return;
      }
      const want = path.startsWith('/nonce') ? nonce : undefined;
      try {
        const who = await verifyRequest(
          { method: req.method ?? '', url: `${origin}${path}`, headers: req.headers },
          { audience: origin, jwks: d.client, replay, nonce: want },
        );
        entry.id = who.id;
        entry.bound = who.bound;
        res.writeHead(200, { 'content-type': 'application/json', ...(want ? { 'dpop-nonce': want } : {}) });
        res.end(JSON.stringify({ id: who.id, bound: who.bound, body }));
      } catch (e) {
        if (!(e instanceof VerifyError)) {
          res.writeHead(500).end(String(e));
          return;
        }
        entry.error = e.code;
        res.writeHead(e.status, { 'content-type': 'application/json', ...e.challenge({ nonce: want }) });
        res.end(JSON.stringify({ error: e.code, message: e.message }));
      }
    });
    await new Promise((r) => server.listen(0, '127.0.0.1', () => r(undefined)));
    origin = `http://127.0.0.1:${/** @type {import('node:net').AddressInfo} */ (server.address()).port}`;
    // Two agents match this process: every fetch names one.
    await d.enrol('plain', { audiences: [origin], scopes: ['read'] });
    await d.enrol('bound', { audiences: [origin], require_binding: true });
  });
  after(async () => {
    server?.close();
    await d?.stop();
  });

  /** @param {string} authorization */
  const tokenOf = (authorization) => authorization.split(' ')[1];

  test('bearer: Authorization: Bearer, the token cached across requests', async () => {
    seen = [];
    const f = createTesseraFetch({ client: d.client, agent: 'plain', scopes: ['read'] });
    const me = await d.client.whoami({ agent: 'plain' });
    for (const path of ['/a', '/b?x=1']) {
      const res = await f(`${origin}${path}`);
      assert.equal(res.status, 200, await res.clone().text());
      assert.deepEqual(await res.json(), { id: me.id, bound: false, body: '' });
    }
    assert.equal(seen.length, 2);
    for (const s of seen) {
      assert.match(String(s.headers.authorization), /^Bearer ey/);
      assert.equal(s.headers.dpop, undefined);
    }
    const [t1, t2] = seen.map((s) => tokenOf(String(s.headers.authorization)));
    assert.equal(t1, t2, 'one token for both requests');
    assert.equal(decodeJwt(t1).aud, origin, 'default audience: the origin');
    assert.equal(decodeJwt(t1).scope, 'read');
  });

  test('DPoP (auto, the policy requires binding): a fresh proof per request, one token', async () => {
    seen = [];
    const f = createTesseraFetch({ client: d.client, agent: 'bound' });
    const me = await d.client.whoami({ agent: 'bound' });
    for (const [i, path] of ['/items?page=2', '/items/7'].entries()) {
      const res = await f(new URL(`${origin}${path}`), {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'x-extra': 'kept' },
        body: JSON.stringify({ n: i }),
      });
      assert.equal(res.status, 200, await res.clone().text());
      assert.deepEqual(await res.json(), { id: me.id, bound: true, body: JSON.stringify({ n: i }) });
    }
    assert.equal(seen.length, 2);
    for (const s of seen) {
      assert.match(String(s.headers.authorization), /^DPoP ey/);
      assert.match(String(s.headers.dpop), /^ey/);
      assert.equal(s.headers['x-extra'], 'kept');
      assert.equal(s.headers['content-type'], 'application/json');
    }
    const [a, b] = seen;
    assert.equal(tokenOf(String(a.headers.authorization)), tokenOf(String(b.headers.authorization)), 'token cached');
    assert.notEqual(decodeJwt(String(a.headers.dpop)).jti, decodeJwt(String(b.headers.dpop)).jti, 'a new proof each time');
    assert.equal(decodeJwt(String(a.headers.dpop)).htu, `${origin}/items`, 'htu without the query');
    assert.deepEqual(decodeJwt(tokenOf(String(a.headers.authorization))).cnf, { jkt: me.key_id });
  });

  test('a replayed DPoP proof is refused', async () => {
    seen = [];
    const f = createTesseraFetch({ client: d.client, agent: 'plain', bind: 'dpop' });
    const res = await f(`${origin}/once`, { method: 'DELETE' });
    assert.equal(res.status, 200);
    assert.equal(seen[0].bound, true);
    const captured = seen[0].headers;
    const again = await fetch(`${origin}/once`, {
      method: 'DELETE',
      headers: { authorization: String(captured.authorization), dpop: String(captured.dpop) },
    });
    assert.equal(again.status, 401);
    assert.equal((await again.json()).error, 'replay');
    assert.match(String(again.headers.get('www-authenticate')), /^DPoP error="invalid_dpop_proof"/);
  });

  test('a nonce challenge is answered once, the nonce remembered, the body resent', async () => {
    seen = [];
    nonce = 'N-1';
    const f = createTesseraFetch({ client: d.client, agent: 'bound' });
    const body = JSON.stringify({ hello: 'world' });
    let res = await f(`${origin}/nonce/1`, { method: 'POST', body });
    assert.equal(res.status, 200, await res.clone().text());
    assert.equal((await res.json()).body, body);
    assert.deepEqual(seen.map((s) => s.error ?? 'ok'), ['use-nonce', 'ok']);
    assert.equal(decodeJwt(String(seen[0].headers.dpop)).nonce, undefined);
    assert.equal(decodeJwt(String(seen[1].headers.dpop)).nonce, 'N-1');
    assert.equal(seen[1].body, body, 'the body sent again on the retry');
    // The nonce is remembered for the origin: the next request carries it at once.
    seen = [];
    res = await f(`${origin}/nonce/2`);
    assert.equal(res.status, 200);
    assert.equal(seen.length, 1);
    assert.equal(decodeJwt(String(seen[0].headers.dpop)).nonce, 'N-1');
    // A new nonce: one more challenge, answered.
    seen = [];
    nonce = 'N-2';
    res = await f(new Request(`${origin}/nonce/3`, { method: 'PUT', body: 'in a Request' }));
    assert.equal(res.status, 200);
    assert.deepEqual(seen.map((s) => [s.error ?? 'ok', s.body]), [['use-nonce', 'in a Request'], ['ok', 'in a Request']]);
    // A streamed body is kept for the retry too.
    seen = [];
    nonce = 'N-3';
    const stream = new ReadableStream({
      start(c) {
        c.enqueue(new TextEncoder().encode('chunk-1,'));
        c.enqueue(new TextEncoder().encode('chunk-2'));
        c.close();
      },
    });
    res = await f(`${origin}/nonce/4`, { method: 'POST', body: stream, duplex: 'half' });
    assert.equal(res.status, 200);
    assert.deepEqual(seen.map((s) => [s.error ?? 'ok', s.body]), [['use-nonce', 'chunk-1,chunk-2'], ['ok', 'chunk-1,chunk-2']]);
  });

  test('a server that keeps challenging gets exactly one retry', async () => {
    seen = [];
    const f = createTesseraFetch({ client: d.client, agent: 'bound' });
    const res = await f(`${origin}/always`);
    assert.equal(res.status, 401);
    assert.equal(seen.length, 2);
    assert.equal(decodeJwt(String(seen[0].headers.dpop)).nonce, undefined);
    assert.equal(decodeJwt(String(seen[1].headers.dpop)).nonce, 'always-1');
    assert.equal(res.headers.get('dpop-nonce'), 'always-2');
  });

  test('the token is asked for again after half its life', async () => {
    seen = [];
    const f = createTesseraFetch({ client: d.client, agent: 'plain', ttl: 4 });
    await f(`${origin}/t1`);
    await f(`${origin}/t2`);
    await sleep(2200);
    await f(`${origin}/t3`);
    const jtis = seen.map((s) => decodeJwt(tokenOf(String(s.headers.authorization))).jti);
    assert.equal(jtis[0], jtis[1]);
    assert.notEqual(jtis[1], jtis[2]);
  });

  test('a token the server refuses (invalid_token) is not used again', async () => {
    seen = [];
    const f = createTesseraFetch({ client: d.client, agent: 'plain' });
    assert.equal((await f(`${origin}/one`)).status, 200);
    assert.equal((await f(`${origin}/invalid`)).status, 401);
    assert.equal((await f(`${origin}/two`)).status, 200);
    const jtis = seen.map((s) => decodeJwt(tokenOf(String(s.headers.authorization))).jti);
    assert.equal(jtis[0], jtis[1]);
    assert.notEqual(jtis[1], jtis[2]);
  });

  test('audience: a fixed string, a map by origin, a function (null: no credentials)', async () => {
    seen = [];
    const fixed = createTesseraFetch({ client: d.client, agent: 'plain', audience: origin });
    assert.equal((await fixed(`${origin}/f`)).status, 200);
    const byOrigin = createTesseraFetch({ client: d.client, agent: 'plain', audience: { [`${origin}/`]: origin } });
    assert.equal((await byOrigin(`${origin}/m`)).status, 200);
    await assert.rejects(byOrigin('http://127.0.0.2:9/x'), /no audience configured for origin http:\/\/127\.0\.0\.2:9/);
    const none = createTesseraFetch({ client: d.client, agent: 'plain', audience: () => null });
    const res = await none(`${origin}/n`);
    assert.equal(res.status, 401);
    assert.equal(seen.at(-1)?.headers.authorization, undefined);
    const wrong = createTesseraFetch({ client: d.client, agent: 'plain', audience: 'https://not-allowed.example' });
    await assert.rejects(wrong(`${origin}/w`), AudienceNotAllowed);
  });
});
