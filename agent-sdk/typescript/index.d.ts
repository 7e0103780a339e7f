// Type declarations of tessera-agent (hand-written; the code is plain ESM JavaScript in src/).
// test/types-check.ts uses every export so that `npm test` catches declarations that drift.

import type { JSONWebKeySet, JWTVerifyGetKey } from 'jose';
import type { IncomingHttpHeaders } from 'node:http';

// ---------------------------------------------------------------------------------------------
// Client

/** The socket path when neither `socketPath` nor `TESSERA_SOCKET` names one. */
export declare const DEFAULT_SOCKET: '/run/tessera/agent.sock';

export interface ClientOptions {
  /** The daemon's agent socket; default `TESSERA_SOCKET`, else `/run/tessera/agent.sock`. */
  socketPath?: string;
  /** Milliseconds a whole request may take (default 30 000). */
  timeout?: number;
}

/** Which agent, when the calling process matches several (the daemon answers 409 otherwise). */
export interface AgentOption {
  agent?: string;
}

/** A lifetime: a number of seconds, or the daemon's text form (`"90s"`, `"5m"`, `"1h"`). */
export type Ttl = number | string;

export interface Health {
  status: string;
  backend: string;
}

/** The agent's effective policy as whoami reports it. */
export interface AgentPolicy {
  audiences: string[];
  scopes: string[];
  max_ttl: string;
  rate: number;
  /** Reported by daemons that expose it; `createTesseraFetch` falls back to the daemon's refusal. */
  require_binding?: boolean;
  [member: string]: unknown;
}

export interface WhoAmI {
  name: string;
  /** SPIFFE ID. */
  id: string;
  /** `active`, `suspended`, `revoked`. */
  status: string;
  policy: AgentPolicy;
  key_id?: string;
  /** Kinds of selector that identify the agent (`uid`, `exe`, `unit`, ...). */
  selectors?: string[];
  [member: string]: unknown;
}

export interface TokenOptions extends AgentOption {
  audience: string;
  scopes?: string[];
  ttl?: Ttl;
  /** `"dpop"`: bound to the agent's proof key (`cnf.jkt`); `"mtls"`: to the certificate `x5tS256`. */
  bind?: 'dpop' | 'mtls';
  /** With `bind: "mtls"`: base64url SHA-256 of a certificate the daemon issued to this agent. */
  x5tS256?: string;
}

export interface TokenResponse {
  token: string;
  /** `Bearer`, or `DPoP` for a DPoP-bound token. */
  token_type: string;
  /** RFC 3339. */
  expires_at: string;
}

export interface CertificateOptions extends AgentOption {
  ttl?: Ttl;
}

export interface Jwk {
  kty: string;
  kid?: string;
  alg?: string;
  use?: string;
  crv?: string;
  x?: string;
  y?: string;
  [member: string]: unknown;
}

export interface Jwks {
  keys: Jwk[];
  [member: string]: unknown;
}

export interface WitResponse {
  wit: string;
  expires_at: string;
  jti: string;
}

export interface ProofResponse {
  proof: string;
  /** `dpop`, `wpt`. */
  type: string;
  jti: string;
}

export interface DpopProofOptions extends AgentOption {
  /** The request's method. */
  htm: string;
  /** The target URI without query and fragment. */
  htu: string;
  /** The DPoP-bound token this daemon issued that the request carries (its hash goes in `ath`). */
  accessToken?: string;
  /** `ath` of another issuer's token. */
  ath?: string;
  /** The server's `DPoP-Nonce`. */
  nonce?: string;
}

export interface DpopHeadersOptions extends AgentOption {
  method: string;
  url: string | URL;
  token: string;
  nonce?: string;
}

export interface WptOptions extends AgentOption {
  /** The target URI (no query, no fragment). */
  aud: string;
  /** A WIT from `Client.wit()`. */
  wit: string;
  accessToken?: string;
  ath?: string;
  tth?: string;
  oth?: Record<string, string>;
  /** Default 60 s, at most 5 min. */
  ttl?: Ttl;
}

export interface HttpSignatureOptions extends AgentOption {
  method: string;
  targetUri: string;
  /** Header fields to cover, by name (lower-cased). */
  headers?: Record<string, string>;
  /** The request's `Content-Digest` (RFC 9530), covered when given. */
  contentDigest?: string;
  /** Components besides `@method` and `@authority`; default `["@target-uri"]`. */
  components?: string[];
}

export interface HttpSignatureResponse {
  type: string;
  /** The `Signature-Input` header value. */
  signature_input: string;
  /** The `Signature` header value. */
  signature: string;
  /** The signature's `nonce`. */
  jti: string;
}

export interface RawResponse {
  status: number;
  headers: IncomingHttpHeaders;
  body: Buffer;
}

/**
 * Client of the local daemon's agent API (HTTP/1.1 + JSON on a Unix socket). Results are the
 * daemon's JSON as sent (snake_case members); refusals are thrown as `TesseraProblem`
 * subclasses, transport failures as `TesseraConnectError`, `TesseraTimeoutError`,
 * `TesseraProtocolError`.
 */
export declare class Client {
  constructor(options?: ClientOptions);
  readonly socketPath: string;
  readonly timeout: number;
  /** One raw request, any status. */
  request(method: string, path: string, body?: unknown): Promise<RawResponse>;
  health(): Promise<Health>;
  whoami(options?: AgentOption): Promise<WhoAmI>;
  token(options: TokenOptions): Promise<TokenResponse>;
  /** PEM: the agent's certificate, then the host CA. */
  certificate(options?: CertificateOptions): Promise<string>;
  /** The host CA certificate, PEM. */
  bundle(): Promise<string>;
  /** The SPIFFE trust bundle (`/v1/bundle?format=spiffe`). */
  spiffeBundle(): Promise<Jwks & { spiffe_refresh_hint?: number; spiffe_sequence?: number }>;
  /** The host CA's CRL, PEM. */
  crl(): Promise<string>;
  jwks(): Promise<Jwks>;
  /** Key attestation evidence over `nonce` (hex text or 8 to 64 bytes). */
  attestation(nonce: string | Uint8Array, options?: AgentOption): Promise<Record<string, unknown>>;
  wit(options?: AgentOption): Promise<WitResponse>;
  /** `POST /v1/proof` with a body in the wire's member names. */
  proof(body: Record<string, unknown>): Promise<Record<string, unknown>>;
  dpopProof(options: DpopProofOptions): Promise<ProofResponse>;
  /** `authorization` (`DPoP <token>`) and `dpop` header values for one request. */
  dpopHeaders(options: DpopHeadersOptions): Promise<{ authorization: string; dpop: string }>;
  wpt(options: WptOptions): Promise<ProofResponse>;
  httpSignature(options: HttpSignatureOptions): Promise<HttpSignatureResponse>;
}

// ---------------------------------------------------------------------------------------------
// Errors

export declare const PROBLEM_URI_PREFIX: 'urn:tessera:problem:';

/** Base class of every error the client raises. */
export declare class TesseraError extends Error {}

/** The socket cannot be reached (missing, refused, no permission). */
export declare class TesseraConnectError extends TesseraError {
  readonly socketPath: string;
  /** `ENOENT`, `ECONNREFUSED`, `EACCES`, ... */
  readonly code: string | undefined;
}

export declare class TesseraTimeoutError extends TesseraError {
  readonly socketPath: string;
  readonly timeoutMs: number;
}

export declare class TesseraProtocolError extends TesseraError {
  readonly status: number | undefined;
  readonly body: string | undefined;
}

export interface ProblemBody {
  type?: unknown;
  title?: unknown;
  status?: unknown;
  detail?: unknown;
}

/** A refusal by the daemon (RFC 9457 problem). Unknown types are this class itself. */
export declare class TesseraProblem extends TesseraError {
  constructor(body: ProblemBody, extra?: { status?: number; retryAfter?: number });
  /** Full type URI, `urn:tessera:problem:<slug>`. */
  readonly type: string;
  /** E.g. `audience-not-allowed`. */
  readonly slug: string;
  readonly status: number;
  readonly title: string;
  readonly detail: string;
  /** Seconds, from `Retry-After` (429, 503). */
  readonly retryAfter: number | undefined;
}

/** 403: the caller is not an enrolled agent. */
export declare class UnknownCaller extends TesseraProblem {}
/** 409: the caller matches several agents; name one (`agent`). */
export declare class AmbiguousCaller extends TesseraProblem {}
/** 403: the calling process has exited. */
export declare class CallerGone extends TesseraProblem {}
export declare class AudienceNotAllowed extends TesseraProblem {}
export declare class ScopeNotAllowed extends TesseraProblem {}
export declare class TtlNotAllowed extends TesseraProblem {}
export declare class AgentSuspended extends TesseraProblem {}
export declare class AgentRevoked extends TesseraProblem {}
/** 400. */
export declare class MalformedRequest extends TesseraProblem {}
/** 413. */
export declare class BodyTooLarge extends TesseraProblem {}
/** 429, with `retryAfter`. */
export declare class RateLimited extends TesseraProblem {}
/** 503, with `retryAfter`. */
export declare class BackendUnavailable extends TesseraProblem {}
/** 503, with `retryAfter`. */
export declare class AuditUnavailable extends TesseraProblem {}
export declare class NotFound extends TesseraProblem {}
export declare class MethodNotAllowed extends TesseraProblem {}
/** 408: the request did not finish within the daemon's deadline. */
export declare class RequestTimeout extends TesseraProblem {}
export declare class UseSocket extends TesseraProblem {}
/** 403: the agent's policy requires bound tokens (`bind`). */
export declare class BindingRequired extends TesseraProblem {}
/** 403: a proof's target is not allowed by the agent's `audiences`. */
export declare class TargetNotAllowed extends TesseraProblem {}
/** 403: a proof's `access_token`/`ath` is not a token of this agent bound to its proof key. */
export declare class TokenNotAccepted extends TesseraProblem {}
export declare class TlsRoleNotAllowed extends TesseraProblem {}
/** 403: an RSA agent asked for what only P-256 keys do (proofs, WITs, bound tokens, TLS, certificates). */
export declare class KeyTypeUnsupported extends TesseraProblem {}
/** 500. */
export declare class InternalError extends TesseraProblem {}

export type ProblemSlug =
  | 'unknown-caller' | 'ambiguous-caller' | 'caller-gone' | 'audience-not-allowed'
  | 'scope-not-allowed' | 'ttl-not-allowed' | 'agent-suspended' | 'agent-revoked'
  | 'malformed-request' | 'body-too-large' | 'rate-limited' | 'backend-unavailable'
  | 'audit-unavailable' | 'not-found' | 'method-not-allowed' | 'request-timeout' | 'use-socket'
  | 'binding-required' | 'target-not-allowed' | 'token-not-accepted' | 'tls-role-not-allowed'
  | 'key-type-unsupported' | 'internal';

/** Problem slug → class. */
export declare const PROBLEM_CLASSES: Readonly<Record<ProblemSlug, typeof TesseraProblem>>;

/** The typed error for a problem body. */
export declare function problemFrom(
  body: ProblemBody,
  extra?: { status?: number; retryAfter?: number },
): TesseraProblem;

// ---------------------------------------------------------------------------------------------
// fetch

export type FetchLike = (input: string | URL | Request, init?: RequestInit) => Promise<Response>;

export type AudienceOption =
  | string
  | Record<string, string>
  | Map<string, string>
  /** `null`/`undefined`: send the request as is, without credentials. */
  | ((url: URL) => string | null | undefined | Promise<string | null | undefined>);

export interface TesseraFetchOptions extends AgentOption {
  /** Default: a `Client` from `TESSERA_SOCKET`. */
  client?: Client;
  /**
   * A fixed audience, a map origin → audience (an origin missing from it is an error), or a
   * function of the request URL. Default: the request URL's origin.
   */
  audience?: AudienceOption;
  /**
   * `"auto"` (default): DPoP when the agent's policy requires binding (whoami's
   * `require_binding`, or the daemon's `binding-required` refusal), else bearer.
   */
  bind?: 'auto' | 'dpop' | 'bearer';
  /** Scopes to ask for. Default: every scope the agent's policy allows (whoami). */
  scopes?: string[];
  ttl?: Ttl;
  /** The underlying fetch (default `globalThis.fetch`); it is given `Request` objects. */
  fetch?: FetchLike;
}

/** A `fetch` that authenticates every request as the calling agent. */
export declare function createTesseraFetch(options?: TesseraFetchOptions): (
  input: string | URL | Request,
  init?: RequestInit,
) => Promise<Response>;

/** `fetch` as the calling agent with the default options. */
export declare function tesseraFetch(input: string | URL | Request, init?: RequestInit): Promise<Response>;

// ---------------------------------------------------------------------------------------------
// Verification

export declare const DEFAULT_REPLAY_CAPACITY: 100000;

/** Bounded, fail-closed memory of proof ids seen, each kept until its window ends. */
export declare class ReplayCache {
  constructor(capacity?: number);
  readonly capacity: number;
  readonly size: number;
  /** Throws `VerifyError` `replay` or `replay-cache-full`. Times in unix seconds. */
  checkAndInsert(id: string, until: number, now?: number): void;
}

export type VerifyErrorCode =
  | 'missing' | 'malformed' | 'no-kid' | 'unknown-key' | 'rejected' | 'expired'
  | 'issued-in-future' | 'bound' | 'proof' | 'use-nonce' | 'replay' | 'replay-cache-full'
  | 'jwks-unavailable';

export declare class VerifyError extends Error {
  constructor(code: VerifyErrorCode, message: string, options?: ErrorOptions);
  readonly code: VerifyErrorCode;
  /** The scheme the credentials came with, when known. */
  scheme: 'Bearer' | 'DPoP' | undefined;
  /** 401, or 503 when the verifier cannot decide (`replay-cache-full`, `jwks-unavailable`). */
  readonly status: 401 | 503;
  /** Headers to answer with: `www-authenticate`, `dpop-nonce` (when `nonce` is given). */
  challenge(options?: { nonce?: string }): Record<string, string>;
}

/** A jose key set function (`createLocalJWKSet`, `createRemoteJWKSet`, ...). */
export type JoseKeySet = JWTVerifyGetKey;

export interface JwksCacheOptions {
  /** Milliseconds between fetches caused by an unknown `kid` (default 30 000). */
  cooldown?: number;
  /** Milliseconds a fetched set is used before it is fetched again (default 60 000). */
  maxAge?: number;
  /** Milliseconds for a URL fetch (default 10 000). */
  timeout?: number;
}

/** A key set fetched from the daemon, a URL or a function, and kept. */
export declare class JwksCache {
  constructor(source: Client | string | URL | (() => Promise<Jwks | JSONWebKeySet>), options?: JwksCacheOptions);
  /** The set as last fetched. */
  readonly jwks: Jwks | undefined;
  refresh(): Promise<void>;
  getKey(kid: string): Promise<Jwk | undefined>;
}

/**
 * Where token keys come from: a JWKS object, a jose key set function, the URL of a JWKS, a
 * `Client` (its `/v1/jwks`, cached per client) or a `JwksCache`.
 */
export type JwksOption = Jwks | JSONWebKeySet | JoseKeySet | string | URL | Client | JwksCache;

export interface VerifyOptions {
  audience: string | string[];
  jwks: JwksOption;
  /** Required `iss`, when given. */
  issuer?: string | string[];
  /** Seconds of clock skew allowed (default 30). */
  clockTolerance?: number;
  /** With a DPoP-bound token: the proof presented with it. */
  dpop?: { proof: string; method: string; url: string | URL };
  /** The server's accepted DPoP nonce(s), when it requires one. */
  nonce?: string | string[];
  /** Default: one process-wide cache. */
  replay?: ReplayCache;
  /** Seconds a DPoP proof may be old (default 60). */
  maxAge?: number;
}

export interface TokenClaims {
  iss: string;
  sub: string;
  aud: string | string[];
  exp: number;
  iat: number;
  jti: string;
  scope?: string;
  nbf?: number;
  cnf?: { jkt?: string; 'x5t#S256'?: string };
  [claim: string]: unknown;
}

export interface DpopProofClaims {
  jti: string;
  htm: string;
  htu: string;
  iat: number;
  ath?: string;
  nonce?: string;
  [claim: string]: unknown;
}

export interface DpopVerified {
  /** RFC 7638 thumbprint of the proof key. */
  jkt: string;
  jti: string;
  iat: number;
  claims: DpopProofClaims;
}

export interface Verified {
  /** The agent's SPIFFE ID (`sub`). */
  id: string;
  scopes: string[];
  jti: string;
  claims: TokenClaims;
  /** True when the token is DPoP-bound and its proof was checked. */
  bound: boolean;
  /** The proof, when `bound`. */
  proof?: DpopVerified;
}

/** Verify an agent token; a bound token is refused unless `dpop` brings its proof. */
export declare function verify(token: string, options: VerifyOptions): Promise<Verified>;

export interface VerifyDpopOptions {
  method: string;
  /** The absolute request URL (query and fragment are ignored). */
  url: string | URL;
  /** The access token presented with the proof (absent at a token endpoint). */
  accessToken?: string;
  /** The token's `cnf.jkt`: the proof key's thumbprint must equal it. */
  jkt?: string;
  nonce?: string | string[];
  replay?: ReplayCache;
  /** Seconds (default 60). */
  maxAge?: number;
  /** Seconds `iat` may be ahead (default 30). */
  clockTolerance?: number;
}

/** Check a DPoP proof (RFC 9449 §4.3). */
export declare function verifyDpop(proof: string, options: VerifyDpopOptions): Promise<DpopVerified>;

export interface HttpRequestLike {
  method: string;
  /** The absolute URL the request was made to. */
  url: string | URL;
  /** A fetch `Headers` or Node's `IncomingHttpHeaders` (or any name → value record). */
  headers: Headers | IncomingHttpHeaders | Record<string, string | string[] | undefined>;
}

/** Check a request's `Authorization` (Bearer or DPoP) and `DPoP` headers. */
export declare function verifyRequest(request: HttpRequestLike, options: Omit<VerifyOptions, 'dpop'>): Promise<Verified>;

/** base64url(SHA-256(text)). */
export declare function b64Sha256(text: string): string;

/** A URI as DPoP compares it: normalised, without query and fragment. */
export declare function normalHtu(uri: string | URL, what?: string): string;

// ---------------------------------------------------------------------------------------------
// Federation: a fresh assertion traded for a token service's access token (RFC 7523 / 8693)

export declare const JWT_BEARER: 'urn:ietf:params:oauth:grant-type:jwt-bearer';
export declare const TOKEN_EXCHANGE: 'urn:ietf:params:oauth:grant-type:token-exchange';
export declare const JWT_TOKEN_TYPE: 'urn:ietf:params:oauth:token-type:jwt';
export declare const CLIENT_ASSERTION_TYPE: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';
/** The one audience Microsoft Entra federated identity credentials take. */
export declare const ENTRA_AUDIENCE: 'api://AzureADTokenExchange';
export declare const ANTHROPIC_TOKEN_ENDPOINT: 'https://api.anthropic.com/v1/oauth/token';
export declare const ANTHROPIC_AUDIENCE: 'https://api.anthropic.com';
/** A cached token is refreshed this long before it expires; a failure then returns it still. */
export declare const ADVISORY_REFRESH_MS: 120000;
/** From this long before expiry a failed refresh is thrown. */
export declare const MANDATORY_REFRESH_MS: 30000;

/** The token endpoint refused (RFC 6749 §5.2), could not be reached, or answered nonsense. */
export declare class ExchangeError extends TesseraError {
  status?: number;
  error?: string;
  description?: string;
  body?: unknown;
}

export interface AccessToken {
  accessToken: string;
  tokenType?: string;
  /** Milliseconds since the epoch, from `expires_in`. */
  expiresAt?: number;
  response: Record<string, unknown>;
}

export interface ExchangerOptions extends AgentOption {
  /** https (or http to loopback). */
  tokenEndpoint: string;
  /** The assertion's `aud` (default: the token endpoint); the agent's policy must allow it. */
  audience?: string;
  /** `client-assertion`: client_credentials with the assertion as `client_assertion` (Entra). */
  grant?: 'jwt-bearer' | 'token-exchange' | 'client-assertion';
  /** Extra request members: scope, audience, resource, federation_rule_id... */
  params?: Record<string, string>;
  /** A JSON body (the Claude API) instead of a form. */
  json?: boolean;
  client?: Client;
  /** PEM roots instead of Node's. */
  ca?: string | Buffer;
  /** Milliseconds. */
  timeout?: number;
}

export interface AnthropicExchangerOptions extends AgentOption {
  federationRuleId: string;
  organizationId: string;
  serviceAccountId: string;
  workspaceId?: string;
  tokenEndpoint?: string;
  client?: Client;
  ca?: string | Buffer;
}

/** An access token for this process's agent from one token endpoint, cached and refreshed. */
export declare class Exchanger {
  constructor(options: ExchangerOptions);
  static anthropic(options: AnthropicExchangerOptions): Exchanger;
  readonly tokenEndpoint: string;
  readonly audience: string;
  requestBody(assertion: string): Record<string, string>;
  /** One exchange with a fresh assertion (no cache). */
  exchange(): Promise<AccessToken>;
  /** The cached token while it has more than 120 s left, else a new one. */
  accessToken(): Promise<AccessToken>;
  invalidate(): void;
}

/** RFC 6749 §5.1 / §5.2: the token endpoint's answer read, or its refusal thrown. */
export declare function parseAnswer(status: number, body: Buffer, now?: number): AccessToken;
