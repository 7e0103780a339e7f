// An RS256 agent token checked by the TypeScript SDK's verify() (jose underneath) against the
// daemon's JWKS. Input JSON on stdin: token, jwks, aud. Prints the verified subject.

import { readFileSync } from 'node:fs';

import { verify } from '../../agent-sdk/typescript/src/index.js';

const a = JSON.parse(readFileSync(0, 'utf8'));
const v = await verify(a.token, { audience: a.aud, jwks: a.jwks });
console.log(JSON.stringify({ sub: v.claims.sub, agent: v.agent ?? null }));
