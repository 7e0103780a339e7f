#!/usr/bin/env node
// Call one tool of an MCP server (Streamable HTTP) as the local tessera agent: every HTTP request
// the MCP SDK makes carries the agent's token (and, for an agent whose policy requires binding, a
// fresh DPoP proof made by tesserad).
//
//   node examples/mcp/client.mjs <server-url> <tool> '<json-args>' [--agent NAME] [--audience AUD]
//
// Prints the tool's (structured) result as JSON on stdout. Exit 0 on success; 1 when the call fails or the tool
// reports an error (`isError`), with the error on stderr; 2 on a usage error.

import { parseArgs } from 'node:util';

import { Client as McpClient } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { createTesseraFetch } from 'tessera-agent';

const USAGE = "usage: node examples/mcp/client.mjs <server-url> <tool> '<json-args>' [--agent NAME] [--audience AUD]";

/**
 * @param {string} text
 * @param {NodeJS.WriteStream} stream
 */
function write(text, stream) {
  return new Promise((resolve) => stream.write(text, () => resolve(undefined)));
}

/** @param {unknown} e */
function describe(e) {
  if (e instanceof Error) return e.message;
  return String(e);
}

async function main() {
  let parsed;
  try {
    parsed = parseArgs({
      allowPositionals: true,
      options: { agent: { type: 'string' }, audience: { type: 'string' }, help: { type: 'boolean', short: 'h' } },
    });
  } catch (e) {
    await write(`${describe(e)}\n${USAGE}\n`, process.stderr);
    return 2;
  }
  const { values, positionals } = parsed;
  if (values.help) {
    await write(`${USAGE}\n`, process.stdout);
    return 0;
  }
  if (positionals.length < 2 || positionals.length > 3) {
    await write(`${USAGE}\n`, process.stderr);
    return 2;
  }
  const [serverUrl, tool, argsJson = '{}'] = positionals;
  let url;
  let args;
  try {
    url = new URL(serverUrl);
    args = JSON.parse(argsJson);
    if (!args || typeof args !== 'object' || Array.isArray(args)) throw new Error('the tool arguments must be a JSON object');
  } catch (e) {
    await write(`${describe(e)}\n${USAGE}\n`, process.stderr);
    return 2;
  }

  // Audience: the server's origin unless --audience names another; bind: "auto" (DPoP when the
  // agent's policy requires sender-constrained tokens).
  const agentFetch = createTesseraFetch({ agent: values.agent, audience: values.audience });
  // The server's refusal of our credentials, to say why when the MCP SDK reports a bare status.
  let refusal = '';
  /** @type {typeof agentFetch} */
  const fetch = async (input, init) => {
    const res = await agentFetch(input, init);
    if (res.status === 401 || res.status === 403) {
      refusal = `HTTP ${res.status}${res.headers.has('www-authenticate') ? `, WWW-Authenticate: ${res.headers.get('www-authenticate')}` : ''}`;
    }
    return res;
  };
  const transport = new StreamableHTTPClientTransport(url, { fetch });
  const mcp = new McpClient({ name: 'tessera-mcp-client', version: '0.1.0' });
  try {
    await mcp.connect(transport);
    const result = await mcp.callTool({ name: tool, arguments: args });
    const content = Array.isArray(result.content) ? result.content : [];
    const text = content.filter((c) => c.type === 'text').map((c) => c.text).join('\n');
    if (result.isError) {
      await write(`tool ${tool} failed: ${text || 'isError without text'}\n`, process.stderr);
      return 1;
    }
    // The tool's structured result when it has one (the Python example's agent prints the same).
    let out = result.structuredContent;
    if (out === undefined) {
      try {
        out = JSON.parse(text);
      } catch {
        out = text;
      }
    }
    await write(`${JSON.stringify(out)}\n`, process.stdout);
    return 0;
  } catch (e) {
    await write(`${tool}: ${describe(e)}${refusal ? ` (server answered ${refusal})` : ''}\n`, process.stderr);
    return 1;
  } finally {
    await mcp.close().catch(() => {});
  }
}

// Exit explicitly: an MCP transport may leave a stream or timer behind after close().
process.exit(await main());
