// The exchange's request bodies and answers (the live exchange runs against a real
// authorization server in tests/tests/federation.rs).

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { ExchangeError, Exchanger, JWT_BEARER, JWT_TOKEN_TYPE, TOKEN_EXCHANGE, parseAnswer } from '../src/index.js';

test('bodies follow the grant', () => {
  const jb = new Exchanger({ tokenEndpoint: 'https://as.example/token', params: { scope: 'a b' } });
  assert.equal(jb.audience, 'https://as.example/token');
  assert.deepEqual(jb.requestBody('A.B.C'), { grant_type: JWT_BEARER, assertion: 'A.B.C', scope: 'a b' });
  const te = new Exchanger({ tokenEndpoint: 'https://as.example/token', grant: 'token-exchange' });
  assert.deepEqual(te.requestBody('A.B.C'), {
    grant_type: TOKEN_EXCHANGE, subject_token: 'A.B.C', subject_token_type: JWT_TOKEN_TYPE,
  });
  const ca = new Exchanger({ tokenEndpoint: 'https://login.example/token', grant: 'client-assertion', params: { client_id: 'app' } });
  assert.deepEqual(ca.requestBody('A.B.C'), {
    grant_type: 'client_credentials',
    client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer',
    client_assertion: 'A.B.C',
    client_id: 'app',
  });
  const c = Exchanger.anthropic({ federationRuleId: 'fdrl_1', organizationId: 'o', serviceAccountId: 'svac_1' });
  assert.equal(c.audience, 'https://api.anthropic.com');
  assert.equal(c.tokenEndpoint, 'https://api.anthropic.com/v1/oauth/token');
  assert.equal(c.requestBody('A.B.C').federation_rule_id, 'fdrl_1');
  assert.throws(() => new Exchanger({ tokenEndpoint: 'http://as.example/token' }), TypeError);
  new Exchanger({ tokenEndpoint: 'http://127.0.0.1:9/token' });
});

test('answers and refusals are read', () => {
  const t = parseAnswer(200, Buffer.from('{"access_token":"at","token_type":"Bearer","expires_in":600}'), 1000);
  assert.equal(t.accessToken, 'at');
  assert.equal(t.expiresAt, 1000 + 600_000);
  assert.throws(
    () => parseAnswer(400, Buffer.from('{"error":"invalid_grant","error_description":"jti replayed"}')),
    (e) => e instanceof ExchangeError && e.error === 'invalid_grant' && e.description === 'jti replayed',
  );
  for (const huge of ['1e308', '1e999']) {
    const h = parseAnswer(200, Buffer.from(`{"access_token":"at","expires_in":${huge}}`), 0);
    assert.ok(h.expiresAt === undefined || h.expiresAt <= 30 * 24 * 3600 * 1000, huge);
  }
  assert.throws(() => parseAnswer(200, Buffer.from('{}')), ExchangeError);
  assert.throws(() => parseAnswer(200, Buffer.from('<html>')), ExchangeError);
});
