// The client's error handling against stand-in Unix socket servers (no daemon needed): problem
// bodies and Retry-After, unknown types, non-problem answers, a daemon that never answers.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import * as sdk from '../src/index.js';
import {
  BackendUnavailable,
  Client,
  PROBLEM_CLASSES,
  RateLimited,
  TesseraError,
  TesseraProblem,
  TesseraProtocolError,
  TesseraTimeoutError,
  problemFrom,
} from '../src/index.js';

/** Slugs the Rust SDK lists (agent-sdk/rust/src/error.rs), read from the source when present. */
function rustSlugs() {
  try {
    const src = readFileSync(new URL('../../rust/src/error.rs', import.meta.url), 'utf8');
    return [...src.matchAll(/ProblemType::\w+ => "([a-z-]+)",/g)].map((m) => m[1]);
  } catch {
    return undefined;
  }
}

describe('problem types', () => {
  test('one class per slug the daemon sends, named like the Rust SDK\'s variants', () => {
    const slugs = rustSlugs();
    if (slugs) assert.deepEqual(Object.keys(PROBLEM_CLASSES).sort(), [...new Set(slugs)].sort());
    for (const [slug, Cls] of Object.entries(PROBLEM_CLASSES)) {
      const e = problemFrom({ type: `urn:tessera:problem:${slug}`, title: 't', status: 403, detail: 'd' });
      assert.ok(e instanceof Cls && e instanceof TesseraProblem && e instanceof TesseraError, slug);
      assert.equal(e.slug, slug);
      assert.equal(sdk[/** @type {keyof typeof sdk} */ (Cls.name)], Cls, `${Cls.name} is exported`);
    }
  });

  test('an unknown slug is the base class', () => {
    const e = problemFrom({ type: 'urn:tessera:problem:new-thing', title: 'New', status: 418, detail: 'why' });
    assert.equal(e.constructor, TesseraProblem);
    assert.equal(e.slug, 'new-thing');
    assert.equal(e.status, 418);
    assert.equal(e.message, 'New: why');
    assert.equal(problemFrom({ type: 'about:blank', status: 500 }).constructor, TesseraProblem);
    assert.equal(problemFrom({ type: 'urn:tessera:problem:constructor' }).constructor, TesseraProblem);
  });
});

describe('client against stand-in servers', () => {
  /** @type {string} */
  let dir;
  /** @type {Array<http.Server | net.Server>} */
  const servers = [];
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tessera-ts-errors-'));
  });
  after(async () => {
    for (const s of servers) s.close();
    await rm(dir, { recursive: true, force: true });
  });

  /**
   * An HTTP server on a fresh socket answering every request with `handler`.
   * @param {http.RequestListener} handler
   */
  async function serve(handler) {
    const path = join(dir, `s${servers.length}.sock`);
    const s = http.createServer(handler);
    servers.push(s);
    await new Promise((r) => s.listen(path, () => r(undefined)));
    return new Client({ socketPath: path, timeout: 2000 });
  }

  test('429 and 503 carry Retry-After as retryAfter (seconds, or an HTTP date)', async () => {
    const c = await serve((req, res) => {
      const busy = req.url === '/v1/health';
      res.writeHead(busy ? 503 : 429, {
        'content-type': 'application/problem+json',
        'retry-after': busy ? new Date(Date.now() + 7000).toUTCString() : '12',
      });
      res.end(JSON.stringify(busy
        ? { type: 'urn:tessera:problem:backend-unavailable', title: 'Key store unavailable', status: 503, detail: 'busy' }
        : { type: 'urn:tessera:problem:rate-limited', title: 'Rate limit exceeded', status: 429, detail: 'slow down' }));
    });
    await assert.rejects(c.token({ audience: 'a' }), (e) => e instanceof RateLimited && e.retryAfter === 12 && e.status === 429);
    await assert.rejects(c.health(), (e) => {
      assert.ok(e instanceof BackendUnavailable);
      assert.ok(e.retryAfter !== undefined && e.retryAfter >= 5 && e.retryAfter <= 8, `retryAfter ${e.retryAfter}`);
      return true;
    });
  });

  test('the request on the wire: Host, Connection: close, JSON body, encoded query', async () => {
    /** @type {any} */
    let seen;
    const c = await serve((req, res) => {
      let body = '';
      req.on('data', (d) => { body += d; });
      req.on('end', () => {
        seen = { method: req.method, url: req.url, headers: req.headers, body };
        res.writeHead(200, { 'content-type': 'application/json' }).end('{"ok":true}');
      });
    });
    await c.token({ audience: 'https://a', scopes: ['r', 'w'], ttl: 90, agent: 'bot', bind: 'dpop' });
    assert.equal(seen.method, 'POST');
    assert.equal(seen.url, '/v1/token');
    assert.equal(seen.headers.host, 'tessera');
    assert.equal(seen.headers.connection, 'close');
    assert.equal(seen.headers['content-type'], 'application/json');
    assert.deepEqual(JSON.parse(seen.body), { audience: 'https://a', scopes: ['r', 'w'], ttl: '90s', agent: 'bot', bind: 'dpop' });
    await c.certificate({ agent: "bot&ttl=9h'", ttl: '1m 30s' });
    assert.equal(seen.url, '/v1/certificate?ttl=1m%2030s&agent=bot%26ttl%3D9h%27');
    await c.whoami();
    assert.equal(seen.url, '/v1/whoami');
  });

  test('an error answer that is not a problem: TesseraProtocolError with the status', async () => {
    const c = await serve((req, res) => res.writeHead(502).end('bad gateway'));
    await assert.rejects(c.health(), (e) => e instanceof TesseraProtocolError && e.status === 502 && /bad gateway/.test(e.message));
  });

  test('a 200 answer that is not JSON: TesseraProtocolError', async () => {
    const c = await serve((req, res) => res.writeHead(200).end('<html>'));
    await assert.rejects(c.jwks(), TesseraProtocolError);
  });

  test('a daemon that never answers: TesseraTimeoutError after the timeout', async () => {
    const path = join(dir, 'silent.sock');
    const s = net.createServer(() => {});
    servers.push(s);
    await new Promise((r) => s.listen(path, () => r(undefined)));
    const c = new Client({ socketPath: path, timeout: 300 });
    const t0 = Date.now();
    await assert.rejects(c.health(), (e) => e instanceof TesseraTimeoutError && e.timeoutMs === 300);
    const took = Date.now() - t0;
    assert.ok(took >= 290 && took < 2000, `took ${took} ms`);
  });

  test('TESSERA_SOCKET is the default socket path', () => {
    const old = process.env.TESSERA_SOCKET;
    try {
      process.env.TESSERA_SOCKET = '/tmp/elsewhere.sock';
      assert.equal(new Client().socketPath, '/tmp/elsewhere.sock');
      delete process.env.TESSERA_SOCKET;
      assert.equal(new Client().socketPath, '/run/tessera/agent.sock');
      assert.equal(new Client({ socketPath: '/x.sock' }).socketPath, '/x.sock');
    } finally {
      if (old === undefined) delete process.env.TESSERA_SOCKET;
      else process.env.TESSERA_SOCKET = old;
    }
  });
});
