// The TypeScript SDK's exchange against the federation test's authorization server, as the
// agent (this process's uid matches the agent's selectors). Input JSON on stdin: socket,
// endpoint, claude, ca. Prints what each exchange got.

import { readFileSync } from 'node:fs';

import { Client, Exchanger } from '../../agent-sdk/typescript/src/index.js';

const a = JSON.parse(readFileSync(0, 'utf8'));
const ca = readFileSync(a.ca);
const client = new Client({ socketPath: a.socket });
const x = new Exchanger({ tokenEndpoint: a.endpoint, client, ca });
const first = await x.accessToken();
const second = await x.accessToken();
const te = new Exchanger({
  tokenEndpoint: a.endpoint, grant: 'token-exchange', params: { audience: 'https://rs.example' }, client, ca,
});
const claude = Exchanger.anthropic({
  federationRuleId: 'fdrl_01', organizationId: 'org-1', serviceAccountId: 'svac_01',
  tokenEndpoint: a.claude, client, ca,
});
let refused = null;
try {
  // A form body where the Claude-shaped endpoint takes JSON: the endpoint's own refusal.
  await new Exchanger({ tokenEndpoint: a.claude, audience: 'https://api.anthropic.com', client, ca }).exchange();
} catch (e) {
  refused = e.error ?? e.name;
}
console.log(JSON.stringify({
  first: first.accessToken,
  second: second.accessToken,
  subject: first.response.subject,
  expires_at: first.expiresAt,
  token_exchange: (await te.exchange()).response.issued_token_type,
  claude: (await claude.exchange()).response.subject,
  refused,
}));
