// Compiled (never run) by `tsc --noEmit -p test/tsconfig.json` from `npm test`: it uses the
// whole public API through the package's own name, so the hand-written declarations cannot drift
// from what the README and the tests use. `@ts-expect-error` lines must stay errors.

import { createServer } from 'node:http';
import { createLocalJWKSet } from 'jose';

import {
  AgentRevoked,
  AudienceNotAllowed,
  BackendUnavailable,
  Client,
  DEFAULT_SOCKET,
  ExchangeError,
  Exchanger,
  JwksCache,
  MalformedRequest,
  PROBLEM_CLASSES,
  RateLimited,
  ReplayCache,
  TesseraConnectError,
  TesseraError,
  TesseraProblem,
  TesseraTimeoutError,
  VerifyError,
  b64Sha256,
  createTesseraFetch,
  parseAnswer,
  type AccessToken,
  problemFrom,
  tesseraFetch,
  verify,
  verifyDpop,
  verifyRequest,
  type Jwks,
  type Verified,
  type WhoAmI,
} from 'tessera-agent';

async function clientCalls(): Promise<void> {
  const socket: string = DEFAULT_SOCKET;
  const client = new Client({ socketPath: socket, timeout: 5000 });
  const health: { status: string; backend: string } = await client.health();
  const me: WhoAmI = await client.whoami({ agent: 'bot' });
  const requireBinding: boolean | undefined = me.policy.require_binding;
  const t = await client.token({ audience: 'https://api.example.com', scopes: ['read'], ttl: '5m', bind: 'dpop', agent: 'bot' });
  const jwt: string = t.token;
  const expires: string = t.expires_at;
  await client.token({ audience: 'https://api.example.com', ttl: 300 });
  // @ts-expect-error audience is required
  await client.token({ scopes: ['read'] });
  // @ts-expect-error bind is "dpop" or "mtls"
  await client.token({ audience: 'a', bind: 'bearer' });
  const pem: string = await client.certificate({ ttl: 600, agent: 'bot' });
  const ca: string = await client.bundle();
  const crl: string = await client.crl();
  const spiffe = await client.spiffeBundle();
  const keys: Jwks = await client.jwks();
  const kid: string | undefined = keys.keys[0]?.kid;
  await client.attestation('00112233445566778899', { agent: 'bot' });
  await client.attestation(new Uint8Array(16));
  const wit = await client.wit({ agent: 'bot' });
  const raw = await client.proof({ type: 'dpop', htm: 'GET', htu: 'https://api.example.com/x' });
  const p = await client.dpopProof({ htm: 'GET', htu: 'https://api.example.com/x', accessToken: jwt, nonce: 'n', agent: 'bot' });
  const proofJwt: string = p.proof;
  const h: { authorization: string; dpop: string } = await client.dpopHeaders({ method: 'GET', url: new URL('https://api.example.com/x'), token: jwt });
  const w = await client.wpt({ aud: 'https://api.example.com/x', wit: wit.wit, ttl: 60 });
  const sig = await client.httpSignature({ method: 'POST', targetUri: 'https://api.example.com/x', headers: { 'content-type': 'application/json' } });
  const sigHeaders: [string, string] = [sig.signature_input, sig.signature];
  const r = await client.request('GET', '/v1/health');
  const status: number = r.status;
  void [health, requireBinding, expires, pem, ca, crl, spiffe, kid, raw, proofJwt, h, w, sigHeaders, status];
}

function problems(e: unknown): number | undefined {
  if (e instanceof RateLimited || e instanceof BackendUnavailable) return e.retryAfter;
  if (e instanceof AudienceNotAllowed || e instanceof AgentRevoked || e instanceof MalformedRequest) {
    const s: string = e.slug;
    const uri: string = e.type;
    return e.status + s.length + uri.length + e.detail.length + e.title.length;
  }
  if (e instanceof TesseraProblem) return e.status;
  if (e instanceof TesseraConnectError) return e.code?.length;
  if (e instanceof TesseraTimeoutError) return e.timeoutMs;
  if (e instanceof TesseraError) return 0;
  const p: TesseraProblem = problemFrom({ type: 'urn:tessera:problem:rate-limited', status: 429 }, { retryAfter: 3 });
  const cls: typeof TesseraProblem = PROBLEM_CLASSES['agent-revoked'];
  void cls;
  return p.retryAfter;
}

async function fetching(): Promise<void> {
  const client = new Client();
  const res: Response = await tesseraFetch('https://api.example.com/x', { method: 'POST', body: '{}' });
  const f = createTesseraFetch({
    client,
    audience: { 'https://api.example.com': 'https://api.example.com' },
    bind: 'auto',
    scopes: ['read'],
    agent: 'bot',
    ttl: '10m',
    fetch: globalThis.fetch,
  });
  await f(new URL('https://api.example.com/x'));
  await f(new Request('https://api.example.com/x'));
  createTesseraFetch({ audience: (url: URL) => (url.hostname === 'localhost' ? null : url.origin) });
  createTesseraFetch({ audience: 'https://api.example.com', bind: 'dpop' });
  // @ts-expect-error bind is "auto", "dpop" or "bearer"
  createTesseraFetch({ bind: 'mtls' });
  void res;
}

async function verifying(token: string): Promise<void> {
  const client = new Client();
  const replay = new ReplayCache(1000);
  const size: number = replay.size;
  replay.checkAndInsert('jti', 1_800_000_000, 1_700_000_000);
  const v: Verified = await verify(token, { audience: 'https://api.example.com', jwks: client, issuer: 'spiffe://x/host/h', clockTolerance: 5 });
  const id: string = v.id;
  const scopes: string[] = v.scopes;
  const bound: boolean = v.bound;
  const exp: number = v.claims.exp;
  const jkt: string | undefined = v.claims.cnf?.jkt;
  await verify(token, { audience: 'a', jwks: await client.jwks() });
  await verify(token, { audience: 'a', jwks: createLocalJWKSet({ keys: [] }) });
  await verify(token, { audience: 'a', jwks: 'https://issuer.example/jwks.json' });
  await verify(token, { audience: 'a', jwks: new JwksCache(client, { cooldown: 30_000, maxAge: 60_000 }) });
  // @ts-expect-error audience is required
  await verify(token, { jwks: client });
  const d = await verifyDpop('proof', {
    method: 'GET',
    url: 'https://api.example.com/x',
    accessToken: token,
    jkt: 'thumb',
    nonce: ['n1', 'n2'],
    replay,
    maxAge: 60,
  });
  const proofJkt: string = d.jkt;
  const htu: string = d.claims.htu;
  const ath: string = b64Sha256(token);
  createServer(async (req, res) => {
    try {
      const who = await verifyRequest(
        { method: req.method ?? 'GET', url: `http://127.0.0.1${req.url}`, headers: req.headers },
        { audience: 'http://127.0.0.1', jwks: client, nonce: 'n1', replay },
      );
      res.end(who.id);
    } catch (e) {
      if (!(e instanceof VerifyError)) throw e;
      const code: string = e.code;
      res.writeHead(e.status, e.challenge({ nonce: 'n1' })).end(code);
    }
  });
  await verifyRequest({ method: 'GET', url: new URL('https://a/x'), headers: new Headers() }, { audience: 'a', jwks: client });
  void [size, id, scopes, bound, exp, jkt, proofJkt, htu, ath];
}

void [clientCalls, problems, fetching, verifying];

async function exchangeCalls(client: Client): Promise<void> {
  const x = new Exchanger({ tokenEndpoint: 'https://as.example/token', client, params: { scope: 'a' } });
  const t: AccessToken = await x.accessToken();
  const left: number | undefined = t.expiresAt;
  const claude = Exchanger.anthropic({ federationRuleId: 'f', organizationId: 'o', serviceAccountId: 's' });
  const body: Record<string, string> = claude.requestBody('a.b.c');
  const parsed: AccessToken = parseAnswer(200, Buffer.from('{"access_token":"x"}'));
  void [left, body, parsed];
  try {
    await x.exchange();
  } catch (e) {
    if (e instanceof ExchangeError) {
      const code: string | undefined = e.error;
      void code;
    }
  }
  // @ts-expect-error tokenEndpoint is required
  new Exchanger({});
}
void exchangeCalls;
