// A real tesserad for the tests: `--dev` (SoftHSM token under a fresh state dir), no bus.
// TESSERA_TEST_TESSERAD names the binary; without it the daemon suites are skipped.

import { spawn } from 'node:child_process';
import { mkdtemp, rm, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

import { AgentRevoked, Client } from '../src/index.js';

export const TESSERAD = process.env.TESSERA_TEST_TESSERAD;

/** `skip` option for suites that need the daemon: false, or why they are skipped. */
export const skipWithoutDaemon = TESSERAD
  ? false
  : 'TESSERA_TEST_TESSERAD is unset: set it to the path of a tesserad binary to run the tests against a real daemon';

/**
 * A suite that needs the daemon; without TESSERA_TEST_TESSERAD it is reported as one skipped
 * test with the reason (a skipped `describe` would not show in the runner's skipped count).
 * @param {string} name
 * @param {() => void} fn
 */
export function describeWithDaemon(name, fn) {
  if (TESSERAD) describe(name, fn);
  else test(name, { skip: skipWithoutDaemon }, () => {});
}

/**
 * @param {() => Promise<boolean>} ready
 * @param {string} what
 * @param {number} [ms]
 */
async function until(ready, what, ms = 20_000) {
  const end = Date.now() + ms;
  for (;;) {
    if (await ready()) return;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

/**
 * An agent file: `[selectors] uid = 0` (the tests run as root) and the given policy.
 * @param {Record<string, unknown>} policy
 */
export function agentToml(policy) {
  const lines = ['[selectors]', `uid = ${process.getuid?.() ?? 0}`, '[policy]'];
  for (const [k, v] of Object.entries(policy)) lines.push(`${k} = ${JSON.stringify(v)}`);
  return `${lines.join('\n')}\n`;
}

export class Daemon {
  /**
   * @param {import('node:child_process').ChildProcess} child
   * @param {string} stateDir
   * @param {() => string} log
   */
  constructor(child, stateDir, log) {
    this.child = child;
    this.stateDir = stateDir;
    this.socket = join(stateDir, 'agent.sock');
    this.client = new Client({ socketPath: this.socket, timeout: 10_000 });
    this.log = log;
  }

  /** Start a daemon on a fresh state dir; resolves once its socket answers. */
  static async start() {
    if (!TESSERAD) throw new Error(String(skipWithoutDaemon));
    const stateDir = await mkdtemp(join(tmpdir(), 'tessera-ts-test-'));
    const child = spawn(TESSERAD, ['--dev', '--state-dir', stateDir, '--bus', 'none'], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'info' },
    });
    let out = '';
    child.stdout.on('data', (d) => { out += d; });
    child.stderr.on('data', (d) => { out += d; });
    let exited = false;
    // Should the test process end without its after hook, take the daemon along.
    const orphan = () => child.kill('SIGKILL');
    process.once('exit', orphan);
    child.on('exit', () => {
      exited = true;
      process.off('exit', orphan);
    });
    const d = new Daemon(child, stateDir, () => out);
    try {
      await until(async () => {
        if (exited) throw new Error(`tesserad exited at start:\n${out}`);
        if (!out.includes('tesserad ready')) return false;
        try {
          return (await d.client.health()).status === 'ok';
        } catch {
          return false;
        }
      }, 'tesserad ready', 60_000);
    } catch (e) {
      await d.stop();
      throw e;
    }
    return d;
  }

  /** Ask the daemon to reconcile agents.d. */
  reload() {
    this.child.kill('SIGHUP');
  }

  /**
   * Enrol (or update) agent `name` with `policy` and wait until it is active.
   * @param {string} name
   * @param {Record<string, unknown>} policy
   */
  async enrol(name, policy) {
    await writeFile(join(this.stateDir, 'agents.d', `${name}.toml`), agentToml(policy));
    this.reload();
    const want = JSON.stringify(policy.audiences ?? []);
    await until(async () => {
      try {
        const me = await this.client.whoami({ agent: name });
        // An update takes effect when the policy reads back as written.
        return me.status === 'active' && JSON.stringify(me.policy.audiences) === want;
      } catch {
        return false;
      }
    }, `agent ${name} enrolled`);
  }

  /**
   * Revoke agent `name` by removing its file, and wait until the daemon says so.
   * @param {string} name
   */
  async revoke(name) {
    await unlink(join(this.stateDir, 'agents.d', `${name}.toml`));
    this.reload();
    await until(async () => {
      try {
        return (await this.client.whoami({ agent: name })).status === 'revoked';
      } catch (e) {
        return e instanceof AgentRevoked;
      }
    }, `agent ${name} revoked`);
  }

  /** Stop the daemon and remove its state. */
  async stop() {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      const gone = new Promise((resolve) => this.child.once('exit', resolve));
      this.child.kill('SIGTERM');
      const t = setTimeout(() => this.child.kill('SIGKILL'), 10_000);
      await gone;
      clearTimeout(t);
    }
    await rm(this.stateDir, { recursive: true, force: true });
  }
}
