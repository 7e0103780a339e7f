// Client of tesserad's agent API: HTTP/1.1 + JSON on a Unix socket. The daemon identifies the
// caller from the kernel (peer credentials of the connection), so nothing here carries identity:
// the process that connects is who asks.

import http from 'node:http';

import {
  TesseraConnectError,
  TesseraError,
  TesseraProtocolError,
  TesseraTimeoutError,
  problemFrom,
} from './errors.js';

/** The socket path when neither the `socketPath` option nor `TESSERA_SOCKET` names one. */
export const DEFAULT_SOCKET = '/run/tessera/agent.sock';

/** Largest answer read from the daemon (PEM chains and key sets are a few KiB). */
const MAX_ANSWER_BYTES = 16 * 1024 * 1024;

/** Errors that mean the socket could not be reached at all. */
const CONNECT_CODES = new Set(['ENOENT', 'ECONNREFUSED', 'EACCES', 'ENOTSOCK', 'EPERM']);

/**
 * A query-string value with everything but RFC 3986 unreserved characters percent-encoded, so
 * no value can add a parameter (`bot&ttl=9h`) or break the request line.
 * @param {string} v
 */
function queryValue(v) {
  return encodeURIComponent(String(v)).replace(
    /[!'()*]/g,
    (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`,
  );
}

/**
 * `path?k=v&...` with the defined parameters only.
 * @param {string} path
 * @param {Record<string, string | undefined | null>} params
 */
function withQuery(path, params) {
  const q = Object.entries(params)
    .filter(([, v]) => v !== undefined && v !== null)
    .map(([k, v]) => `${k}=${queryValue(/** @type {string} */ (v))}`);
  return q.length ? `${path}?${q.join('&')}` : path;
}

/**
 * A lifetime as the daemon reads it: a number is seconds, a string is passed as is ("5m").
 * @param {string | number | undefined} ttl
 */
function ttlText(ttl) {
  if (ttl === undefined || ttl === null) return undefined;
  if (typeof ttl === 'number') {
    if (!Number.isFinite(ttl) || ttl <= 0) throw new TypeError(`ttl must be a positive number of seconds, not ${ttl}`);
    return `${Math.ceil(ttl)}s`;
  }
  return String(ttl);
}

/**
 * `Retry-After` in seconds: delta-seconds or an HTTP date.
 * @param {string | string[] | undefined} v
 */
function retryAfterSeconds(v) {
  if (Array.isArray(v)) v = v[0];
  if (typeof v !== 'string' || v === '') return undefined;
  if (/^\d+$/.test(v.trim())) return Number(v.trim());
  const at = Date.parse(v);
  return Number.isNaN(at) ? undefined : Math.max(0, Math.ceil((at - Date.now()) / 1000));
}

/** Client for the local daemon's agent API. */
export class Client {
  /**
   * @param {{socketPath?: string, timeout?: number}} [options] `socketPath`: default
   *   `TESSERA_SOCKET`, else `/run/tessera/agent.sock`; `timeout`: milliseconds for a whole
   *   request and answer (default 30 000).
   */
  constructor(options = {}) {
    /** The daemon's agent socket. */
    this.socketPath = options.socketPath || process.env.TESSERA_SOCKET || DEFAULT_SOCKET;
    /** Milliseconds a request may take, connect to last byte. */
    this.timeout = options.timeout ?? 30_000;
  }

  /**
   * One raw request: the answer's status, headers and body, whatever the status.
   * @param {string} method
   * @param {string} path path and query, e.g. `/v1/whoami?agent=bot`
   * @param {unknown} [body] sent as JSON when given
   * @returns {Promise<{status: number, headers: http.IncomingHttpHeaders, body: Buffer}>}
   */
  request(method, path, body) {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    /** @type {http.OutgoingHttpHeaders} */
    const headers = {
      host: 'tessera',
      // One request per connection, closed after the answer: an idle kept-alive connection
      // would hold one of this uid's connection slots in the daemon.
      connection: 'close',
    };
    if (payload) {
      headers['content-type'] = 'application/json';
      headers['content-length'] = payload.length;
    }
    return new Promise((resolve, reject) => {
      let connected = false;
      let settled = false;
      /** @param {Error} e */
      const fail = (e) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        reject(e);
      };
      const req = http.request({
        socketPath: this.socketPath,
        method,
        path,
        headers,
        agent: false,
      });
      const timer = setTimeout(() => {
        const e = new TesseraTimeoutError(this.socketPath, this.timeout);
        fail(e);
        req.destroy(e);
      }, this.timeout);
      req.on('socket', (s) => s.once('connect', () => { connected = true; }));
      req.on('error', (/** @type {NodeJS.ErrnoException} */ e) => {
        if (e instanceof TesseraError) return fail(e);
        if (!connected && e.code && CONNECT_CODES.has(e.code)) {
          return fail(new TesseraConnectError(this.socketPath, e));
        }
        fail(new TesseraProtocolError(`connection to ${this.socketPath} failed: ${e.message}`));
      });
      req.on('response', (res) => {
        /** @type {Buffer[]} */
        const chunks = [];
        let size = 0;
        res.on('data', (c) => {
          size += c.length;
          if (size > MAX_ANSWER_BYTES) {
            const e = new TesseraProtocolError(`answer larger than ${MAX_ANSWER_BYTES} bytes`);
            fail(e);
            req.destroy(e);
            return;
          }
          chunks.push(c);
        });
        res.on('error', (e) => fail(new TesseraProtocolError(e.message)));
        res.on('end', () => {
          if (settled) return;
          settled = true;
          clearTimeout(timer);
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) });
        });
      });
      req.end(payload);
    });
  }

  /**
   * The body of a 2xx answer; any other answer raised as its problem type.
   * @param {string} method
   * @param {string} path
   * @param {unknown} [body]
   * @returns {Promise<Buffer>}
   */
  async #checked(method, path, body) {
    const res = await this.request(method, path, body);
    if (res.status >= 200 && res.status < 300) return res.body;
    const text = res.body.toString('utf8');
    /** @type {any} */
    let problem;
    try {
      problem = JSON.parse(text);
    } catch {
      problem = undefined;
    }
    if (problem && typeof problem === 'object' && typeof problem.type === 'string') {
      throw problemFrom(problem, {
        status: res.status,
        retryAfter: retryAfterSeconds(res.headers['retry-after']),
      });
    }
    throw new TesseraProtocolError(`HTTP ${res.status}: ${text.slice(0, 500)}`, {
      status: res.status,
      body: text,
    });
  }

  /**
   * @param {string} method
   * @param {string} path
   * @param {unknown} [body]
   * @returns {Promise<any>}
   */
  async #json(method, path, body) {
    const bytes = await this.#checked(method, path, body);
    try {
      return JSON.parse(bytes.toString('utf8'));
    } catch (e) {
      throw new TesseraProtocolError(`${path}: the answer is not JSON (${/** @type {Error} */ (e).message})`);
    }
  }

  /** @param {string} path */
  async #text(path) {
    return (await this.#checked('GET', path)).toString('utf8');
  }

  /** `GET /v1/health`: `{status: "ok", backend}`. */
  health() {
    return this.#json('GET', '/v1/health');
  }

  /**
   * `GET /v1/whoami`: the calling agent's `name`, `id` (SPIFFE ID), `status`, `policy`,
   * `key_id`, `selectors`.
   * @param {{agent?: string}} [options] `agent`: which one, when this process matches several.
   */
  whoami(options = {}) {
    return this.#json('GET', withQuery('/v1/whoami', { agent: options.agent }));
  }

  /**
   * `POST /v1/token`: a JWT for `audience`, signed by the agent's own key.
   * @param {{audience: string, scopes?: string[], ttl?: string | number, bind?: 'dpop' | 'mtls',
   *   x5tS256?: string, agent?: string}} options `ttl`: "5m" or seconds; `bind: "dpop"` gives a
   *   token bound to the agent's proof key (`cnf.jkt`, `token_type` `DPoP`); `bind: "mtls"` with
   *   `x5tS256` binds it to a certificate the daemon issued to this agent.
   * @returns {Promise<{token: string, token_type: string, expires_at: string}>}
   */
  async token(options) {
    if (!options || typeof options.audience !== 'string') {
      throw new TypeError('token(): audience (a string) is required');
    }
    return this.#json('POST', '/v1/token', {
      audience: options.audience,
      scopes: options.scopes?.length ? [...options.scopes] : undefined,
      ttl: ttlText(options.ttl),
      agent: options.agent,
      bind: options.bind,
      'x5t#S256': options.x5tS256,
    });
  }

  /**
   * `GET /v1/certificate`: PEM, the agent's short-lived certificate then the host CA.
   * @param {{ttl?: string | number, agent?: string}} [options]
   * @returns {Promise<string>}
   */
  certificate(options = {}) {
    return this.#text(withQuery('/v1/certificate', { ttl: ttlText(options.ttl), agent: options.agent }));
  }

  /** `GET /v1/bundle`: the host CA certificate, PEM. */
  bundle() {
    return this.#text('/v1/bundle');
  }

  /**
   * `GET /v1/bundle?format=spiffe`: the SPIFFE trust bundle (agent keys `jwt-svid`, the host CA
   * key `wit-svid`, the CA certificate `x509-svid`).
   */
  spiffeBundle() {
    return this.#json('GET', '/v1/bundle?format=spiffe');
  }

  /** `GET /v1/crl`: the host CA's CRL, PEM. */
  crl() {
    return this.#text('/v1/crl');
  }

  /** `GET /v1/jwks`: every active agent key (RFC 7517). */
  jwks() {
    return this.#json('GET', '/v1/jwks');
  }

  /**
   * `GET /v1/attestation`: key attestation evidence over the relying party's nonce.
   * @param {string | Uint8Array} nonce hex text, or bytes (8 to 64)
   * @param {{agent?: string}} [options]
   */
  attestation(nonce, options = {}) {
    const hex = typeof nonce === 'string' ? nonce : Buffer.from(nonce).toString('hex');
    return this.#json('GET', withQuery('/v1/attestation', { nonce: hex, agent: options.agent }));
  }

  /**
   * `GET /v1/wit`: a WIMSE Workload Identity Token binding the agent's proof key.
   * @param {{agent?: string}} [options]
   * @returns {Promise<{wit: string, expires_at: string, jti: string}>}
   */
  wit(options = {}) {
    return this.#json('GET', withQuery('/v1/wit', { agent: options.agent }));
  }

  /**
   * `POST /v1/proof` with `body` as given (wire member names: `type`, `htm`, `htu`,
   * `access_token`, ...).
   * @param {Record<string, unknown>} body
   */
  proof(body) {
    return this.#json('POST', '/v1/proof', body);
  }

  /**
   * A DPoP proof (RFC 9449) for one request, made by the daemon with the agent's proof key.
   * @param {{htm: string, htu: string, accessToken?: string, ath?: string, nonce?: string,
   *   agent?: string}} options `htu`: the target URI without query and fragment;
   *   `accessToken`: the bound token the request carries (its hash goes in `ath`); `ath`: only
   *   for another issuer's token; `nonce`: the server's `DPoP-Nonce`.
   * @returns {Promise<{proof: string, type: string, jti: string}>}
   */
  dpopProof(options) {
    return this.proof({
      type: 'dpop',
      htm: options.htm,
      htu: options.htu,
      access_token: options.accessToken,
      ath: options.ath,
      nonce: options.nonce,
      agent: options.agent,
    });
  }

  /**
   * The two headers of one request made with a DPoP-bound `token`: `authorization`
   * (`DPoP <token>`) and `dpop` (a fresh proof for `method` and `url`, whose query and fragment
   * are left out as RFC 9449 says).
   * @param {{method: string, url: string | URL, token: string, nonce?: string, agent?: string}} options
   * @returns {Promise<{authorization: string, dpop: string}>}
   */
  async dpopHeaders(options) {
    const u = new URL(options.url);
    const { proof } = await this.dpopProof({
      htm: options.method.toUpperCase(),
      htu: u.origin + u.pathname,
      accessToken: options.token,
      nonce: options.nonce,
      agent: options.agent,
    });
    return { authorization: `DPoP ${options.token}`, dpop: proof };
  }

  /**
   * A WIMSE Workload Proof Token for a request to `aud`, going with `wit` (from `wit()`).
   * @param {{aud: string, wit: string, accessToken?: string, ath?: string, tth?: string,
   *   oth?: Record<string, string>, ttl?: string | number, agent?: string}} options
   * @returns {Promise<{proof: string, type: string, jti: string}>}
   */
  wpt(options) {
    return this.proof({
      type: 'wpt',
      aud: options.aud,
      wit: options.wit,
      access_token: options.accessToken,
      ath: options.ath,
      tth: options.tth,
      oth: options.oth,
      ttl: ttlText(options.ttl),
      agent: options.agent,
    });
  }

  /**
   * An RFC 9421 HTTP message signature for one request. The daemon always covers `@method` and
   * `@authority`, `content-digest` when `contentDigest` is given; `components` defaults to
   * `["@target-uri"]`, and every header in `headers` is covered too.
   * @param {{method: string, targetUri: string, headers?: Record<string, string>,
   *   contentDigest?: string, components?: string[], agent?: string}} options
   * @returns {Promise<{signature_input: string, signature: string, jti: string, type: string}>}
   */
  httpSignature(options) {
    /** @type {Record<string, string>} */
    const headers = {};
    for (const [k, v] of Object.entries(options.headers ?? {})) headers[k.toLowerCase()] = String(v);
    const components = [...(options.components ?? ['@target-uri'])];
    for (const name of Object.keys(headers)) if (!components.includes(name)) components.push(name);
    return this.proof({
      type: 'http-signature',
      method: options.method,
      target_uri: options.targetUri,
      headers: Object.keys(headers).length ? headers : undefined,
      content_digest: options.contentDigest,
      components,
      agent: options.agent,
    });
  }
}
