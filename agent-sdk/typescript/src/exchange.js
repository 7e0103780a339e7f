// Federation: trade a fresh tessera assertion for a token service's access token, in this
// process (the daemon makes no outbound calls). RFC 7523 jwt-bearer or RFC 8693 token exchange,
// form-encoded, or the Claude API's JSON body. Every exchange asks the daemon for a new
// assertion (a token service takes each `jti` once); `Exchanger.accessToken()` caches the
// access token and refreshes it ahead of expiry (advisory 120 s: a failed refresh still returns
// the cached token; mandatory 30 s: the failure is thrown).

import https from 'node:https';
import http from 'node:http';

import { Client } from './client.js';
import { TesseraError } from './errors.js';

export const JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
export const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
export const JWT_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:jwt';
export const CLIENT_ASSERTION_TYPE = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';
/** The one audience Microsoft Entra federated identity credentials take. */
export const ENTRA_AUDIENCE = 'api://AzureADTokenExchange';
export const ANTHROPIC_TOKEN_ENDPOINT = 'https://api.anthropic.com/v1/oauth/token';
export const ANTHROPIC_AUDIENCE = 'https://api.anthropic.com';
export const ADVISORY_REFRESH_MS = 120_000;
export const MANDATORY_REFRESH_MS = 30_000;
const MAX_ANSWER_BYTES = 1024 * 1024;
/** The longest `expires_in` believed, seconds. */
const MAX_LIFETIME = 30 * 24 * 3600;

/** The token endpoint refused, could not be reached, or answered something unreadable. */
export class ExchangeError extends TesseraError {
  /**
   * @param {string} message
   * @param {{status?: number, error?: string, description?: string, body?: unknown}} [info]
   */
  constructor(message, info = {}) {
    super(message);
    this.name = 'ExchangeError';
    /** HTTP status of a refusal. */
    this.status = info.status;
    /** RFC 6749 §5.2 `error`. */
    this.error = info.error;
    this.description = info.description;
    this.body = info.body;
  }
}

/**
 * RFC 6749 §5.1 (the token and its lifetime) or §5.2 (the refusal).
 * @param {number} status
 * @param {Buffer} body
 * @param {number} [now] milliseconds since the epoch
 * @returns {{accessToken: string, tokenType?: string, expiresAt?: number, response: Record<string, unknown>}}
 */
export function parseAnswer(status, body, now = Date.now()) {
  /** @type {any} */
  let v;
  try {
    v = JSON.parse(body.toString('utf8'));
  } catch {
    v = undefined;
  }
  if (status < 200 || status >= 300) {
    const error = typeof v?.error === 'string' ? v.error : undefined;
    const description = typeof v?.error_description === 'string' ? v.error_description : undefined;
    throw new ExchangeError(
      `token endpoint refused (${status}): ${error ?? 'no error code'}${description ? `: ${description}` : ''}`,
      { status, error, description, body: v ?? body.toString('utf8').slice(0, 2000) },
    );
  }
  if (!v || typeof v.access_token !== 'string' || v.access_token === '') {
    throw new ExchangeError('token endpoint answered without an access_token', { status, body: v });
  }
  const expiresIn = Number(v.expires_in);
  return {
    accessToken: v.access_token,
    tokenType: typeof v.token_type === 'string' ? v.token_type : undefined,
    expiresAt: v.expires_in !== undefined && Number.isFinite(expiresIn) && expiresIn >= 0
      ? now + Math.min(expiresIn, MAX_LIFETIME) * 1000
      : undefined,
    response: v,
  };
}

/** An access token from one token endpoint, for this process's agent. */
export class Exchanger {
  /**
   * @param {{tokenEndpoint: string, audience?: string,
   *   grant?: 'jwt-bearer' | 'token-exchange' | 'client-assertion',
   *   params?: Record<string, string>, json?: boolean, client?: Client, agent?: string,
   *   ca?: string | Buffer, timeout?: number}} options `audience`: the assertion's `aud`
   *   (default: the token endpoint); `ca`: PEM roots instead of Node's; `timeout` in ms.
   */
  constructor(options) {
    if (!options || typeof options.tokenEndpoint !== 'string') {
      throw new TypeError('Exchanger: tokenEndpoint (a string) is required');
    }
    const url = new URL(options.tokenEndpoint);
    const loopback = ['127.0.0.1', '[::1]', 'localhost'].includes(url.hostname);
    if (url.protocol !== 'https:' && !(url.protocol === 'http:' && loopback)) {
      throw new TypeError('Exchanger: the token endpoint must be https (or http to loopback)');
    }
    this.tokenEndpoint = options.tokenEndpoint;
    this.audience = options.audience ?? options.tokenEndpoint;
    this.grant = options.grant ?? 'jwt-bearer';
    this.params = { ...(options.params ?? {}) };
    this.json = options.json ?? false;
    this.agent = options.agent;
    this.client = options.client ?? new Client();
    this.ca = options.ca;
    this.timeout = options.timeout ?? 30_000;
    /** @type {ReturnType<typeof parseAnswer> | undefined} */
    this.cached = undefined;
    /** @type {Promise<ReturnType<typeof parseAnswer>> | undefined} */
    this.inflight = undefined;
  }

  /**
   * The Claude API: JSON jwt-bearer body naming the federation rule, organisation and service
   * account (and workspace), audience `https://api.anthropic.com`.
   * @param {{federationRuleId: string, organizationId: string, serviceAccountId: string,
   *   workspaceId?: string, tokenEndpoint?: string, client?: Client, agent?: string,
   *   ca?: string | Buffer}} o
   */
  static anthropic(o) {
    /** @type {Record<string, string>} */
    const params = {
      federation_rule_id: o.federationRuleId,
      organization_id: o.organizationId,
      service_account_id: o.serviceAccountId,
    };
    if (o.workspaceId) params.workspace_id = o.workspaceId;
    return new Exchanger({
      tokenEndpoint: o.tokenEndpoint ?? ANTHROPIC_TOKEN_ENDPOINT,
      audience: ANTHROPIC_AUDIENCE,
      params,
      json: true,
      client: o.client,
      agent: o.agent,
      ca: o.ca,
    });
  }

  /**
   * The request members for `assertion`.
   * @param {string} assertion
   * @returns {Record<string, string>}
   */
  requestBody(assertion) {
    /** @type {Record<string, string>} */
    let body;
    if (this.grant === 'token-exchange') {
      body = { grant_type: TOKEN_EXCHANGE, subject_token: assertion, subject_token_type: JWT_TOKEN_TYPE };
    } else if (this.grant === 'client-assertion') {
      body = { grant_type: 'client_credentials', client_assertion_type: CLIENT_ASSERTION_TYPE, client_assertion: assertion };
    } else {
      body = { grant_type: JWT_BEARER, assertion };
    }
    return { ...body, ...this.params };
  }

  /** One exchange with a fresh assertion (no cache). */
  async exchange() {
    const { token } = await this.client.token({ audience: this.audience, agent: this.agent });
    const members = this.requestBody(token);
    const payload = this.json
      ? Buffer.from(JSON.stringify(members))
      : Buffer.from(new URLSearchParams(members).toString());
    const { status, body } = await this.#post(payload);
    return parseAnswer(status, body);
  }

  /** The cached token while it has more than 120 s left, else a new one. */
  async accessToken() {
    const t = this.cached;
    const left = t?.expiresAt === undefined ? undefined : t.expiresAt - Date.now();
    if (t && left !== undefined && left > ADVISORY_REFRESH_MS) return t;
    // One refresh at a time: callers arriving meanwhile share it.
    this.inflight ??= this.exchange().finally(() => { this.inflight = undefined; });
    try {
      const fresh = await this.inflight;
      this.cached = fresh.expiresAt !== undefined ? fresh : undefined;
      return fresh;
    } catch (e) {
      if (t && left !== undefined && left > MANDATORY_REFRESH_MS) return t;
      throw e;
    }
  }

  /** Forget the cached token (the relying party refused it). */
  invalidate() {
    this.cached = undefined;
  }

  /**
   * @param {Buffer} payload
   * @returns {Promise<{status: number, body: Buffer}>}
   */
  #post(payload) {
    const url = new URL(this.tokenEndpoint);
    const lib = url.protocol === 'https:' ? https : http;
    return new Promise((resolve, reject) => {
      const req = lib.request(url, {
        method: 'POST',
        headers: {
          'content-type': this.json ? 'application/json' : 'application/x-www-form-urlencoded',
          'content-length': payload.length,
          accept: 'application/json',
        },
        ...(this.ca ? { ca: this.ca } : {}),
        timeout: this.timeout,
      });
      req.on('timeout', () => req.destroy(new ExchangeError(`no answer from the token endpoint within ${this.timeout} ms`)));
      req.on('error', (e) => reject(e instanceof ExchangeError ? e : new ExchangeError(`cannot reach the token endpoint: ${e.message}`)));
      req.on('response', (res) => {
        /** @type {Buffer[]} */
        const chunks = [];
        let size = 0;
        res.on('data', (/** @type {Buffer} */ c) => {
          size += c.length;
          if (size > MAX_ANSWER_BYTES) {
            req.destroy(new ExchangeError('token endpoint answer too large'));
            return;
          }
          chunks.push(c);
        });
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
        res.on('error', (e) => reject(new ExchangeError(`reading the token endpoint's answer: ${e.message}`)));
      });
      req.end(payload);
    });
  }
}
