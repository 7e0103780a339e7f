// A drop-in `fetch` that authenticates every request as the calling agent: a token from the
// local daemon for the request's audience (cached until half its life), presented as a bearer
// token or, DPoP-bound, with a fresh proof per request (RFC 9449), answering a server's nonce
// challenge once.

import { Client } from './client.js';
import { BindingRequired } from './errors.js';

/**
 * The lifetime of a token in milliseconds since the epoch: `exp` from its claims, else the
 * daemon's `expires_at`.
 * @param {{token: string, expires_at: string}} t
 */
function expiryMs(t) {
  try {
    const claims = JSON.parse(Buffer.from(t.token.split('.')[1], 'base64url').toString('utf8'));
    if (typeof claims.exp === 'number') return claims.exp * 1000;
  } catch {
    // fall through to expires_at
  }
  const at = Date.parse(t.expires_at);
  return Number.isNaN(at) ? Date.now() : at;
}

/**
 * Whether an answer is a resource server's DPoP nonce challenge (RFC 9449 §9): 401, a
 * `DPoP-Nonce` header and `error="use_dpop_nonce"` in `WWW-Authenticate`.
 * @param {Response} res
 */
function isNonceChallenge(res) {
  return (
    res.status === 401 &&
    res.headers.has('dpop-nonce') &&
    /use_dpop_nonce/.test(res.headers.get('www-authenticate') ?? '')
  );
}

/**
 * @param {any} audience the `audience` option
 * @returns {(url: URL) => Promise<string | null | undefined> | string | null | undefined}
 */
function audienceResolver(audience) {
  if (audience === undefined) return (url) => url.origin;
  if (typeof audience === 'string') return () => audience;
  if (typeof audience === 'function') return audience;
  if (audience && typeof audience === 'object') {
    // Keys are origins; normalise them the way `URL.origin` prints them ("https://a/" and
    // "https://a:443" both become "https://a").
    /** @type {Map<string, string>} */
    const byOrigin = new Map();
    const entries = audience instanceof Map ? [...audience.entries()] : Object.entries(audience);
    for (const [origin, aud] of entries) byOrigin.set(new URL(origin).origin, aud);
    return (url) => {
      const aud = byOrigin.get(url.origin);
      if (aud === undefined) {
        throw new TypeError(`tesseraFetch: no audience configured for origin ${url.origin}`);
      }
      return aud;
    };
  }
  throw new TypeError('audience: a string, a map origin → audience, or a function (url) → audience');
}

/**
 * A `fetch` that authenticates every request as the calling agent.
 * @param {any} [options]
 * @returns {(input: string | URL | Request, init?: RequestInit) => Promise<Response>}
 */
export function createTesseraFetch(options = {}) {
  /** @type {Client} */
  const client = options.client ?? new Client();
  const baseFetch = options.fetch ?? globalThis.fetch;
  const bind = options.bind ?? 'auto';
  if (!['auto', 'dpop', 'bearer'].includes(bind)) {
    throw new TypeError(`bind: "auto", "dpop" or "bearer", not ${JSON.stringify(bind)}`);
  }
  /** The scopes asked for; unset: every scope the agent's policy allows (from whoami). */
  /** @type {string[] | undefined} */
  let scopes = options.scopes ? [...options.scopes] : undefined;
  const agent = options.agent;
  const ttl = options.ttl;
  const resolveAudience = audienceResolver(options.audience);

  /** Token cache: key → the token (or its pending request) and when to ask again. */
  /** @type {Map<string, {promise: Promise<{token: string, expires_at: string}>, refreshAt: number, token?: string}>} */
  const tokens = new Map();
  /** The last `DPoP-Nonce` each origin sent. */
  /** @type {Map<string, string>} */
  const nonces = new Map();
  /** With `bind: "auto"`, the decision once made. */
  /** @type {Promise<'dpop' | 'bearer'> | undefined} */
  let autoBind;
  /** The agent's policy as whoami reports it, asked once (and again after a failure). */
  /** @type {Promise<any> | undefined} */
  let policy;

  function learnPolicy() {
    policy ??= client.whoami({ agent }).then(
      (/** @type {any} */ me) => me?.policy ?? {},
      (/** @type {unknown} */ e) => {
        policy = undefined;
        throw e;
      },
    );
    return policy;
  }

  /** @returns {Promise<string[]>} */
  async function scopesToUse() {
    scopes ??= [...((await learnPolicy()).scopes ?? [])];
    return /** @type {string[]} */ (scopes);
  }

  /** @returns {Promise<'dpop' | 'bearer'>} */
  function bindToUse() {
    if (bind !== 'auto') return Promise.resolve(bind);
    if (!autoBind) {
      autoBind = learnPolicy().then(
        (/** @type {any} */ p) => (p.require_binding === true ? 'dpop' : 'bearer'),
        (/** @type {unknown} */ e) => {
          autoBind = undefined;
          throw e;
        },
      );
    }
    return /** @type {Promise<'dpop' | 'bearer'>} */ (autoBind);
  }

  /**
   * @param {string} audience
   * @param {'dpop' | 'bearer'} how
   */
  const cacheKey = (audience, how) => JSON.stringify([audience, scopes, agent ?? null, how]);

  /**
   * A server that refuses the token itself (`error="invalid_token"`: the key rotated, the token
   * was revoked) gets a new one on the next request rather than the cached one again.
   * @param {Response} res
   * @param {string} audience
   * @param {'dpop' | 'bearer'} how
   * @param {string} token the token the request carried
   */
  function forgetIfRefused(res, audience, how, token) {
    if (res.status === 401 && /invalid_token/.test(res.headers.get('www-authenticate') ?? '')) {
      const key = cacheKey(audience, how);
      // Only that token: a newer one fetched meanwhile stays.
      if (tokens.get(key)?.token === token) tokens.delete(key);
    }
    return res;
  }

  /**
   * @param {string} audience
   * @param {'dpop' | 'bearer'} how
   */
  function tokenFor(audience, how) {
    const key = cacheKey(audience, how);
    const hit = tokens.get(key);
    if (hit && Date.now() < hit.refreshAt) return hit.promise;
    const asked = Date.now();
    /** @type {{promise: Promise<{token: string, expires_at: string}>, refreshAt: number, token?: string}} */
    const entry = {
      promise: client.token({ audience, scopes, ttl, agent, bind: how === 'dpop' ? 'dpop' : undefined }),
      // Shared by concurrent requests until it resolves.
      refreshAt: Infinity,
    };
    // Tokens for audiences no longer asked for are dropped once past their refresh time.
    if (tokens.size >= 64) {
      for (const [k, e] of tokens) if (e.refreshAt <= asked) tokens.delete(k);
    }
    tokens.set(key, entry);
    entry.promise.then(
      (t) => {
        // Asked again once half its life has passed.
        entry.refreshAt = asked + (expiryMs(t) - asked) / 2;
        entry.token = t.token;
      },
      () => {
        if (tokens.get(key) === entry) tokens.delete(key);
      },
    );
    return entry.promise;
  }

  /**
   * The token and how to present it. With `bind: "auto"`, an agent whose policy requires
   * binding is found out either from whoami or from the daemon's refusal of a bearer token.
   * @param {string} audience
   * @returns {Promise<{token: string, how: 'dpop' | 'bearer'}>}
   */
  async function credentials(audience) {
    await scopesToUse();
    const how = await bindToUse();
    try {
      return { token: (await tokenFor(audience, how)).token, how };
    } catch (e) {
      if (bind === 'auto' && how === 'bearer' && e instanceof BindingRequired) {
        autoBind = Promise.resolve('dpop');
        return { token: (await tokenFor(audience, 'dpop')).token, how: 'dpop' };
      }
      throw e;
    }
  }

  return async function tesseraFetch(input, init) {
    // One Request to read the method, URL and headers from, whatever form the input has.
    const request = new Request(input, init);
    const url = new URL(request.url);
    const audience = await resolveAudience(url);
    if (audience === null || audience === undefined) return baseFetch(request);
    const { token, how } = await credentials(audience);

    if (how === 'bearer') {
      const headers = new Headers(request.headers);
      headers.set('authorization', `Bearer ${token}`);
      return forgetIfRefused(await baseFetch(new Request(request, { headers })), audience, how, token);
    }

    const htu = url.origin + url.pathname;
    /**
     * @param {Request} req
     * @param {string | undefined} nonce
     */
    const send = async (req, nonce) => {
      const { proof } = await client.dpopProof({ htm: request.method, htu, accessToken: token, nonce, agent });
      const headers = new Headers(req.headers);
      headers.set('authorization', `DPoP ${token}`);
      headers.set('dpop', proof);
      const res = await baseFetch(new Request(req, { headers }));
      // A server may hand out its next nonce on any answer (RFC 9449 §8.2).
      const next = res.headers.get('dpop-nonce');
      if (next) nonces.set(url.origin, next);
      return res;
    };
    // A spare copy of the request for the one retry a nonce challenge allows: a body is read
    // once, so it is teed (and held in memory until the first answer comes).
    const spare = request.body ? request.clone() : request;
    const res = await send(request, nonces.get(url.origin));
    if (isNonceChallenge(res)) {
      await res.body?.cancel();
      return forgetIfRefused(await send(spare, /** @type {string} */ (res.headers.get('dpop-nonce'))), audience, how, token);
    }
    if (spare !== request) await spare.body?.cancel();
    return forgetIfRefused(res, audience, how, token);
  };
}

/** @type {ReturnType<typeof createTesseraFetch> | undefined} */
let defaultFetch;

/**
 * `fetch` as the calling agent, with a default client (`TESSERA_SOCKET`), the request's origin
 * as audience and `bind: "auto"`.
 * @param {string | URL | Request} input
 * @param {RequestInit} [init]
 */
export function tesseraFetch(input, init) {
  defaultFetch ??= createTesseraFetch();
  return defaultFetch(input, init);
}
