// examples/mcp/client.mjs against a small MCP server (the MCP SDK's McpServer and
// StreamableHTTPServerTransport) that admits only requests verifyRequest accepts.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import http from 'node:http';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import * as z from 'zod/v4';

import { ReplayCache, VerifyError, verifyRequest } from '../src/index.js';
import { Daemon, describeWithDaemon } from './daemon.js';

const CLIENT = fileURLToPath(new URL('../examples/mcp/client.mjs', import.meta.url));

/**
 * A fresh MCP server with three tools: `whoami` (the caller's agent id, from the verified
 * token), `add`, and `fail` (a tool error).
 */
function mcpServer() {
  const server = new McpServer({ name: 'tessera-test-server', version: '0.0.1' });
  server.registerTool('whoami', { description: 'The calling agent' }, async (extra) => ({
    content: [{ type: 'text', text: String(extra.authInfo?.clientId) }],
  }));
  server.registerTool(
    'add',
    { description: 'a + b', inputSchema: { a: z.number(), b: z.number() } },
    async ({ a, b }) => ({ content: [{ type: 'text', text: String(a + b) }] }),
  );
  server.registerTool('fail', { description: 'Always fails' }, async () => ({
    content: [{ type: 'text', text: 'boom' }],
    isError: true,
  }));
  return server;
}

/**
 * @param {string[]} args
 * @param {string} socket
 * @returns {Promise<{code: number, stdout: string, stderr: string}>}
 */
function runClient(args, socket) {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLIENT, ...args], { env: { ...process.env, TESSERA_SOCKET: socket }, timeout: 30_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? Number(/** @type {any} */ (err).code ?? 1) : 0, stdout, stderr });
    });
  });
}

describeWithDaemon('MCP client example', () => {
  /** @type {Daemon} */
  let d;
  /** @type {http.Server} */
  let server;
  /** @type {string} */
  let origin;
  /** Every request: method, and how it was authenticated (or why refused). */
  /** @type {Array<{method: string, bound?: boolean, id?: string, error?: string}>} */
  let log = [];

  before(async () => {
    d = await Daemon.start();
    const replay = new ReplayCache();
    server = http.createServer(async (req, res) => {
      /** @type {{method: string, bound?: boolean, id?: string, error?: string}} */
      const entry = { method: req.method ?? '' };
      log.push(entry);
      let who;
      try {
        who = await verifyRequest(
          { method: req.method ?? '', url: `${origin}${req.url}`, headers: req.headers },
          { audience: origin, jwks: d.client, replay },
        );
      } catch (e) {
        if (!(e instanceof VerifyError)) throw e;
        entry.error = e.code;
        res.writeHead(e.status, e.challenge()).end();
        return;
      }
      entry.bound = who.bound;
      entry.id = who.id;
      // Stateless: a server and transport per request, the verified identity handed to tools.
      const mcp = mcpServer();
      const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined, enableJsonResponse: true });
      res.on('close', () => {
        transport.close();
        mcp.close();
      });
      await mcp.connect(transport);
      const authed = Object.assign(req, {
        auth: { token: '', clientId: who.id, scopes: who.scopes, expiresAt: who.claims.exp },
      });
      await transport.handleRequest(authed, res);
    });
    await new Promise((r) => server.listen(0, '127.0.0.1', () => r(undefined)));
    origin = `http://127.0.0.1:${/** @type {import('node:net').AddressInfo} */ (server.address()).port}`;
    await d.enrol('bound', { audiences: [origin], require_binding: true });
    await d.enrol('plain', { audiences: [origin, 'urn:tessera-test:other'] });
    await d.enrol('elsewhere', { audiences: ['https://api.example.com'] });
  });
  after(async () => {
    server?.close();
    await d?.stop();
  });

  test('a DPoP-bound agent calls a tool: result on stdout, exit 0, every request verified', async () => {
    log = [];
    const r = await runClient([`${origin}/mcp`, 'add', '{"a": 2, "b": 40}', '--agent', 'bound'], d.socket);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(JSON.parse(r.stdout), 42);
    assert.ok(log.length >= 3, `initialize, initialized, tools/call: ${JSON.stringify(log)}`);
    const me = await d.client.whoami({ agent: 'bound' });
    for (const e of log) {
      assert.equal(e.error, undefined, JSON.stringify(log));
      assert.equal(e.bound, true);
      assert.equal(e.id, me.id);
    }
  });

  test('the tool sees the verified agent; a bearer agent works too', async () => {
    log = [];
    const r = await runClient([`${origin}/mcp`, 'whoami', '{}', '--agent', 'plain'], d.socket);
    assert.equal(r.code, 0, r.stderr);
    const me = await d.client.whoami({ agent: 'plain' });
    assert.equal(JSON.parse(r.stdout), me.id);
    assert.ok(log.every((e) => e.bound === false && e.id === me.id), JSON.stringify(log));
  });

  test('a tool error (isError): exit 1, the error on stderr', async () => {
    const r = await runClient([`${origin}/mcp`, 'fail', '{}', '--agent', 'bound'], d.socket);
    assert.equal(r.code, 1);
    assert.equal(r.stdout, '');
    assert.match(r.stderr, /tool fail failed: boom/);
  });

  test('an agent the daemon will not give a token for this server: exit 1, the refusal on stderr', async () => {
    log = [];
    const r = await runClient([`${origin}/mcp`, 'add', '{"a": 1, "b": 1}', '--agent', 'elsewhere'], d.socket);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /Audience not allowed by policy/);
    assert.equal(r.stdout, '');
    assert.equal(log.length, 0, 'nothing reached the server');
  });

  test('a server that refuses the credentials: exit 1', async () => {
    log = [];
    // A token for another audience than the server checks for.
    const r = await runClient([`${origin}/mcp`, 'add', '{"a": 1, "b": 1}', '--agent', 'plain', '--audience', 'urn:tessera-test:other'], d.socket);
    assert.equal(r.code, 1, r.stdout);
    assert.match(r.stderr, /server answered HTTP 401, WWW-Authenticate: Bearer error="invalid_token"/);
    assert.deepEqual(log.map((e) => e.error), ['rejected']);
  });

  test('usage errors: exit 2', async () => {
    assert.equal((await runClient([`${origin}/mcp`], d.socket)).code, 2);
    assert.equal((await runClient([`${origin}/mcp`, 'add', 'not json'], d.socket)).code, 2);
  });
});
