// The hand-written declarations and the code export the same names, and the package resolves
// by its own name (as the examples import it).

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import * as byPath from '../src/index.js';

test('index.d.ts declares exactly the values src/index.js exports', () => {
  const dts = readFileSync(new URL('../index.d.ts', import.meta.url), 'utf8');
  const declared = [...dts.matchAll(/^export declare (?:class|function|const) (\w+)/gm)].map((m) => m[1]);
  assert.deepEqual([...new Set(declared)].sort(), Object.keys(byPath).sort());
});

test('the package resolves by its name to src/index.js', async () => {
  const byName = await import('tessera-agent');
  assert.equal(byName.Client, byPath.Client);
  assert.equal(byName.verifyRequest, byPath.verifyRequest);
});
