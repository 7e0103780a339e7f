// Relying-party checks, by jose's rules rather than the daemon's word:
// - verify(): an agent token (ES256 against a key set by `kid`, `typ` `JWT`, `iss`, `sub`,
//   `aud`, `exp`, `iat`, `jti`); a sender-constrained token (`cnf`) is refused unless its DPoP
//   proof comes with it.
// - verifyDpop(): a DPoP proof (RFC 9449 §4.3), with a bounded replay cache.
// - verifyRequest(): both from an HTTP request's `Authorization` and `DPoP` headers.
// Every check fails closed: an unknown key, an unexpected type, a full replay cache all refuse.

import { createHash } from 'node:crypto';

import {
  calculateJwkThumbprint,
  compactVerify,
  decodeProtectedHeader,
  errors as joseErrors,
  importJWK,
  jwtVerify,
} from 'jose';

import { Client } from './client.js';
import { ReplayCache } from './replay.js';
import { VerifyError } from './verify-error.js';

export { VerifyError };

/** The one algorithm tessera's P-256 agent keys sign with. */
const ALG = 'ES256';
/** Default clock tolerance, seconds (`exp`, `iat` in the future). */
const DEFAULT_TOLERANCE = 30;
/** Default age a DPoP proof may have, seconds. */
const DEFAULT_MAX_AGE = 60;
/** Members that make a JWK private (or symmetric). */
const PRIVATE_MEMBERS = ['d', 'p', 'q', 'dp', 'dq', 'qi', 'oth', 'k'];

/**
 * base64url(SHA-256(text)): the `ath` of an access token.
 * @param {string} text
 */
export function b64Sha256(text) {
  return createHash('sha256').update(text).digest('base64url');
}

/** @param {number} [t] milliseconds */
const unixNow = (t = Date.now()) => Math.floor(t / 1000);

/**
 * A key published for agent tokens: `use` absent, `sig` or `jwt-svid` (a SPIFFE bundle's
 * `wit-svid` and `x509-svid` keys sign no token).
 * @param {any} k
 */
function usableForTokens(k) {
  return k && typeof k === 'object' && (k.use === undefined || k.use === 'sig' || k.use === 'jwt-svid');
}

/**
 * A P-256 public JWK with nothing private in it, reduced to its public members.
 * @param {unknown} jwk
 * @param {string} what for messages
 * @returns {{kty: 'EC', crv: 'P-256', x: string, y: string}}
 */
function publicP256(jwk, what) {
  if (!jwk || typeof jwk !== 'object' || Array.isArray(jwk)) {
    throw new Error(`${what} is not a JSON object`);
  }
  const k = /** @type {Record<string, unknown>} */ (jwk);
  for (const m of PRIVATE_MEMBERS) {
    if (Object.hasOwn(k, m)) throw new Error(`${what} holds the private member "${m}"`);
  }
  if (k.kty !== 'EC' || k.crv !== 'P-256' || typeof k.x !== 'string' || typeof k.y !== 'string') {
    throw new Error(`${what} is not a P-256 public key (only ES256 is accepted)`);
  }
  return { kty: 'EC', crv: 'P-256', x: k.x, y: k.y };
}

/**
 * An RSA public JWK (an agent with `key = "rsa2048"`, RS256 tokens) reduced to its public members.
 * @param {Record<string, unknown>} k
 * @param {string} what for messages
 * @returns {{kty: 'RSA', n: string, e: string}}
 */
function publicRsa(k, what) {
  for (const m of PRIVATE_MEMBERS) {
    if (Object.hasOwn(k, m)) throw new Error(`${what} holds the private member "${m}"`);
  }
  if (typeof k.n !== 'string' || typeof k.e !== 'string') throw new Error(`${what} is not an RSA public key`);
  return { kty: 'RSA', n: k.n, e: k.e };
}

/** Imported keys by JWK object, so a key set's keys are imported once. */
const importedKeys = new WeakMap();

/**
 * @param {any} jwk a public key from a key set: P-256 (ES256), or RSA (RS256, agent tokens only)
 * @returns {Promise<import('jose').CryptoKey>}
 */
async function importKey(jwk) {
  let p = importedKeys.get(jwk);
  if (!p) {
    p = jwk && jwk.kty === 'RSA'
      ? importJWK(publicRsa(jwk, `JWK ${jwk.kid}`), 'RS256')
      : importJWK(publicP256(jwk, `JWK ${jwk.kid}`), ALG);
    importedKeys.set(jwk, p);
    p.catch(() => importedKeys.delete(jwk));
  }
  return p;
}

/**
 * A key set fetched from the daemon (a `Client`: `/v1/jwks` on the local socket), from a URL,
 * or by a function, and kept: fetched again when older than `maxAge`, and when a token names a
 * `kid` it lacks, at most once per `cooldown` (so a stream of tokens with made-up `kid`s cannot
 * make it fetch on every request).
 */
export class JwksCache {
  /** @type {() => Promise<any>} */
  #load;
  #cooldown;
  #maxAge;
  /** @type {{keys: any[]} | undefined} */
  #set;
  #fetchedAt = -Infinity;
  /** @type {Promise<void> | undefined} */
  #pending;

  /**
   * @param {Client | string | URL | (() => Promise<{keys: unknown[]}>)} source
   * @param {{cooldown?: number, maxAge?: number, timeout?: number}} [options] milliseconds:
   *   `cooldown` between fetches for an unknown `kid` (default 30 000), `maxAge` of the set
   *   (default 60 000), `timeout` of a URL fetch (default 10 000).
   */
  constructor(source, options = {}) {
    this.#cooldown = options.cooldown ?? 30_000;
    this.#maxAge = options.maxAge ?? 60_000;
    if (source instanceof Client) {
      this.#load = () => source.jwks();
    } else if (typeof source === 'string' || source instanceof URL) {
      const url = new URL(source);
      const timeout = options.timeout ?? 10_000;
      this.#load = async () => {
        const res = await fetch(url, { signal: AbortSignal.timeout(timeout), headers: { accept: 'application/json' } });
        if (!res.ok) throw new Error(`GET ${url}: HTTP ${res.status}`);
        return res.json();
      };
    } else if (typeof source === 'function') {
      this.#load = source;
    } else {
      throw new TypeError('JwksCache source: a Client, a URL or a function returning a JWKS');
    }
  }

  /** The key set as last fetched (undefined before the first fetch). */
  get jwks() {
    return this.#set;
  }

  /** Fetch the set now (concurrent callers share one fetch). */
  refresh() {
    if (!this.#pending) {
      this.#pending = (async () => {
        try {
          const set = await this.#load();
          if (!set || typeof set !== 'object' || !Array.isArray(set.keys)) {
            throw new Error('the answer is not a JWKS (no "keys" array)');
          }
          this.#set = set;
          this.#fetchedAt = Date.now();
        } finally {
          this.#pending = undefined;
        }
      })();
    }
    return this.#pending;
  }

  /**
   * The token key named `kid`, or undefined.
   * @param {string} kid
   */
  async getKey(kid) {
    const find = () => this.#set?.keys.find((k) => k && k.kid === kid && usableForTokens(k));
    const age = Date.now() - this.#fetchedAt;
    if (!this.#set || age >= this.#maxAge) {
      await this.refresh();
    } else if (!find() && age >= this.#cooldown) {
      await this.refresh();
    }
    return find();
  }
}

/** Caches made for `jwks: client` and `jwks: url` options, so repeated calls share them. */
const clientCaches = new WeakMap();
const urlCaches = new Map();

/**
 * @param {any} jwks the `jwks` option
 * @returns {JwksCache | {keys: any[]} | Function}
 */
function keySource(jwks) {
  if (jwks instanceof JwksCache || typeof jwks === 'function') return jwks;
  if (jwks instanceof Client) {
    let c = clientCaches.get(jwks);
    if (!c) clientCaches.set(jwks, (c = new JwksCache(jwks)));
    return c;
  }
  if (typeof jwks === 'string' || jwks instanceof URL) {
    const href = new URL(jwks).href;
    let c = urlCaches.get(href);
    if (!c) urlCaches.set(href, (c = new JwksCache(href)));
    return c;
  }
  if (jwks && typeof jwks === 'object' && Array.isArray(jwks.keys)) return jwks;
  throw new TypeError('jwks: a JWKS object, a jose key set function, a URL, a Client or a JwksCache');
}

/**
 * The verification key for a token header.
 * @param {any} jwks the `jwks` option
 * @param {{kid: string}} header
 * @param {string} token
 * @returns {Promise<import('jose').CryptoKey>}
 */
async function keyFor(jwks, header, token) {
  const src = keySource(jwks);
  if (typeof src === 'function') {
    // A jose key set function (createLocalJWKSet, createRemoteJWKSet, ...): it chooses.
    const parts = token.split('.');
    try {
      return await src(header, { protected: parts[0], payload: parts[1], signature: parts[2] });
    } catch (e) {
      if (e instanceof joseErrors.JWKSNoMatchingKey) {
        throw new VerifyError('unknown-key', `no key ${header.kid} in the key set (unknown, or the agent was revoked)`, { cause: e });
      }
      throw new VerifyError('jwks-unavailable', `key set: ${/** @type {Error} */ (e).message}`, { cause: e });
    }
  }
  let jwk;
  if (src instanceof JwksCache) {
    try {
      jwk = await src.getKey(header.kid);
    } catch (e) {
      throw new VerifyError('jwks-unavailable', `cannot fetch the key set: ${/** @type {Error} */ (e).message}`, { cause: e });
    }
  } else {
    jwk = src.keys.find((k) => k && k.kid === header.kid && usableForTokens(k));
  }
  if (!jwk) {
    throw new VerifyError('unknown-key', `no key ${header.kid} in the key set (unknown, or the agent was revoked)`);
  }
  try {
    return await importKey(jwk);
  } catch (e) {
    throw new VerifyError('rejected', /** @type {Error} */ (e).message, { cause: e });
  }
}

/**
 * A jose failure as a VerifyError.
 * @param {unknown} e
 */
function fromJose(e) {
  if (e instanceof VerifyError) return e;
  const err = /** @type {Error} */ (e);
  if (e instanceof joseErrors.JWTExpired) return new VerifyError('expired', `token expired: ${err.message}`, { cause: e });
  if (e instanceof joseErrors.JWSSignatureVerificationFailed) {
    return new VerifyError('rejected', 'signature verification failed', { cause: e });
  }
  if (e instanceof joseErrors.JWTClaimValidationFailed) {
    return new VerifyError('rejected', `token rejected: ${err.message}`, { cause: e });
  }
  if (e instanceof joseErrors.JWSInvalid || e instanceof joseErrors.JWTInvalid) {
    return new VerifyError('malformed', `malformed token: ${err.message}`, { cause: e });
  }
  return new VerifyError('rejected', `token rejected: ${err.message}`, { cause: e });
}

/**
 * The protected header of a compact JWS.
 * @param {unknown} jws
 * @param {string} what
 * @param {'malformed' | 'proof'} code
 */
function header(jws, what, code) {
  if (typeof jws !== 'string' || jws.split('.').length !== 3) {
    throw new VerifyError(code, `${what} is not a compact JWS`);
  }
  try {
    return /** @type {Record<string, any>} */ (decodeProtectedHeader(jws));
  } catch (e) {
    throw new VerifyError(code, `${what} header: ${/** @type {Error} */ (e).message}`, { cause: e });
  }
}

/**
 * Check an agent token's header, signature and claims; how it may be presented is the
 * caller's decision.
 * @param {string} token
 * @param {any} opts
 * @returns {Promise<Record<string, any>>} the claims
 */
async function checkToken(token, opts) {
  const aud = opts?.audience;
  if (!(typeof aud === 'string' && aud) && !(Array.isArray(aud) && aud.length && aud.every((a) => typeof a === 'string'))) {
    throw new TypeError('verify: audience (a string, or an array of strings) is required');
  }
  if (opts.jwks === undefined) throw new TypeError('verify: jwks is required');
  const h = header(token, 'token', 'malformed');
  // Only agent tokens: a DPoP proof, WIT or checkpoint signed by a key in the set is not a
  // token (explicit typing, RFC 8725 §3.11).
  if (h.typ !== 'JWT') throw new VerifyError('rejected', `typ ${JSON.stringify(h.typ ?? null)} is not JWT`);
  // Refused before any key is looked up: `none` and HMAC would turn a public key into a secret.
  // ES256, or RS256 from an agent with an RSA key: the key found by kid must be of that kind
  // (jose refuses a key of the other type for the algorithm).
  if (h.alg !== ALG && h.alg !== 'RS256') {
    throw new VerifyError('rejected', `alg ${JSON.stringify(h.alg ?? null)} is not ${ALG} or RS256`);
  }
  if (typeof h.kid !== 'string' || !h.kid) throw new VerifyError('no-kid', 'token has no kid');
  const key = await keyFor(opts.jwks, /** @type {{kid: string}} */ (h), token);
  const tolerance = opts.clockTolerance ?? DEFAULT_TOLERANCE;
  let payload;
  try {
    ({ payload } = await jwtVerify(token, key, {
      algorithms: [/** @type {string} */ (h.alg)],
      typ: 'JWT',
      audience: opts.audience,
      issuer: opts.issuer,
      clockTolerance: tolerance,
      requiredClaims: ['iss', 'sub', 'aud', 'exp', 'iat', 'jti'],
    }));
  } catch (e) {
    throw fromJose(e);
  }
  const now = unixNow();
  if (typeof payload.iat !== 'number' || payload.iat > now + tolerance) {
    throw new VerifyError('issued-in-future', `token issued in the future (iat ${payload.iat}, now ${now})`);
  }
  if (typeof payload.sub !== 'string' || typeof payload.iss !== 'string' || typeof payload.jti !== 'string') {
    throw new VerifyError('rejected', 'sub, iss and jti must be strings');
  }
  return payload;
}

/**
 * What a verified token says.
 * @param {Record<string, any>} claims
 * @param {boolean} bound
 * @param {any} [proof]
 */
function result(claims, bound, proof) {
  const scopes = typeof claims.scope === 'string' && claims.scope ? claims.scope.split(' ') : [];
  /** @type {any} */
  const r = { id: claims.sub, scopes, jti: claims.jti, claims, bound };
  if (proof) r.proof = proof;
  return r;
}

/**
 * Verify an agent token.
 *
 * Without `dpop`, the token must be a bearer token: one bound to a key (`cnf`) is refused, since
 * it is worth nothing without its proof. With `dpop` (the request's proof, method and URL), the
 * token must be DPoP-bound and the proof must check out (`verifyDpop`); `bound` is then true.
 * @param {string} token
 * @param {any} opts
 */
export async function verify(token, opts) {
  const claims = await checkToken(token, opts);
  if (opts.dpop === undefined) {
    if (claims.cnf !== undefined) {
      throw new VerifyError('bound', 'the token is bound to a key (cnf); accept it only with its proof (DPoP)');
    }
    return result(claims, false);
  }
  const jkt = claims.cnf && typeof claims.cnf === 'object' ? claims.cnf.jkt : undefined;
  if (typeof jkt !== 'string') {
    throw new VerifyError('proof', 'the token is not bound to a key (no cnf.jkt)');
  }
  const proof = await verifyDpop(opts.dpop.proof, {
    method: opts.dpop.method,
    url: opts.dpop.url,
    accessToken: token,
    jkt,
    nonce: opts.nonce,
    replay: opts.replay,
    maxAge: opts.maxAge,
    clockTolerance: opts.clockTolerance,
  });
  return result(claims, true, proof);
}

/**
 * An absolute http(s) URI in its normal form (WHATWG URL parsing: scheme and host lower case,
 * default port dropped, dot segments resolved), without query and fragment.
 * @param {unknown} u
 * @param {string} what
 */
export function normalHtu(u, what = 'URI') {
  let url;
  try {
    url = new URL(String(u));
  } catch {
    throw new VerifyError('proof', `${what} ${JSON.stringify(u)} is not an absolute URI`);
  }
  if ((url.protocol !== 'https:' && url.protocol !== 'http:') || !url.hostname) {
    throw new VerifyError('proof', `${what} ${JSON.stringify(u)} is not http(s)`);
  }
  url.search = '';
  url.hash = '';
  return url.href;
}

/** The process-wide replay cache used when no `replay` option is given. */
let defaultReplay;
/** @returns {ReplayCache} */
function defaultReplayCache() {
  return (defaultReplay ??= new ReplayCache());
}

/**
 * Check a DPoP proof (RFC 9449 §4.3) for one request. Throws VerifyError; returns the proof
 * key's thumbprint and the proof's claims.
 * @param {string} proof
 * @param {any} opts
 */
export async function verifyDpop(proof, opts) {
  if (!opts || typeof opts.method !== 'string' || opts.url === undefined) {
    throw new TypeError('verifyDpop: method and url are required');
  }
  const maxAge = opts.maxAge ?? DEFAULT_MAX_AGE;
  const tolerance = opts.clockTolerance ?? DEFAULT_TOLERANCE;
  const now = unixNow();
  const bad = (/** @type {string} */ m) => new VerifyError('proof', m);
  // (2)-(5) a typed, asymmetric JWS with the key in its header.
  const h = header(proof, 'DPoP proof', 'proof');
  if (h.typ !== 'dpop+jwt') throw bad(`typ ${JSON.stringify(h.typ ?? null)} is not dpop+jwt`);
  if (h.alg !== ALG) throw bad(`alg ${JSON.stringify(h.alg ?? null)} is not ${ALG}`);
  // (7) a public key only.
  let jwk;
  try {
    jwk = publicP256(h.jwk, 'jwk');
  } catch (e) {
    throw bad(/** @type {Error} */ (e).message);
  }
  // (6) the signature, by that key.
  let claims;
  try {
    const key = await importJWK(jwk, ALG);
    const { payload } = await compactVerify(proof, key, { algorithms: [ALG] });
    claims = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(payload));
  } catch (e) {
    if (e instanceof joseErrors.JWSSignatureVerificationFailed) throw bad('signature verification failed');
    throw bad(`proof: ${/** @type {Error} */ (e).message}`);
  }
  if (!claims || typeof claims !== 'object' || Array.isArray(claims)) throw bad('claims are not a JSON object');
  if (typeof claims.jti !== 'string' || claims.jti.length < 1 || claims.jti.length > 256) {
    throw bad('jti is 1 to 256 characters');
  }
  // (8) method, (9) URI without query and fragment.
  if (claims.htm !== opts.method) {
    throw bad(`htm ${JSON.stringify(claims.htm)} is not the method ${JSON.stringify(opts.method)}`);
  }
  if (typeof claims.htu !== 'string' || normalHtu(claims.htu, 'htu') !== normalHtu(opts.url, 'request URL')) {
    throw bad(`htu ${JSON.stringify(claims.htu)} is not this request's URI`);
  }
  // (10) the server's nonce.
  if (opts.nonce !== undefined) {
    const accepted = Array.isArray(opts.nonce) ? opts.nonce : [opts.nonce];
    if (typeof claims.nonce !== 'string' || !accepted.includes(claims.nonce)) {
      throw new VerifyError('use-nonce', 'the proof does not carry the server\'s current nonce');
    }
  }
  // (11) fresh.
  if (typeof claims.iat !== 'number' || claims.iat > now + tolerance || claims.iat < now - maxAge) {
    throw bad(`iat ${claims.iat} is outside [${now - maxAge}, ${now + tolerance}]`);
  }
  // (12) the token's hash; a proof without a token (token endpoint) has no ath.
  if (opts.accessToken !== undefined) {
    if (claims.ath !== b64Sha256(opts.accessToken)) throw bad('ath is not the hash of the access token');
  } else if (claims.ath !== undefined) {
    throw bad('ath given but no access token presented');
  }
  const jkt = await calculateJwkThumbprint(jwk, 'sha256');
  if (opts.jkt !== undefined && opts.jkt !== jkt) {
    throw bad('the token\'s cnf.jkt is not the proof key\'s thumbprint');
  }
  // Last, so a refused proof does not take a place: kept until no window accepts it.
  const replay = opts.replay ?? defaultReplayCache();
  replay.checkAndInsert(`${jkt}.${claims.jti}`, claims.iat + Math.max(maxAge, tolerance) + 1, now);
  return { jkt, jti: claims.jti, iat: claims.iat, claims };
}

/**
 * Every value of header `name`; comma-joined duplicates are not split (the caller decides).
 * @param {any} headers
 * @param {string} name lower case
 * @returns {string[]}
 */
function headerValues(headers, name) {
  if (!headers) return [];
  if (typeof headers.get === 'function' && typeof headers.has === 'function') {
    const v = headers.get(name);
    return v === null || v === undefined ? [] : [v];
  }
  /** @type {string[]} */
  const out = [];
  for (const [k, v] of Object.entries(headers)) {
    if (k.toLowerCase() !== name || v === undefined || v === null) continue;
    if (Array.isArray(v)) out.push(...v.map(String));
    else out.push(String(v));
  }
  return out;
}

/**
 * Check an HTTP request's credentials: `Authorization: Bearer <token>` (an unbound token), or
 * `Authorization: DPoP <token>` with exactly one `DPoP` proof header for this method and URL.
 * `url` is the absolute URL the request was made to, as this server is reached.
 * @param {{method: string, url: string | URL, headers: any}} request
 * @param {any} opts
 */
export async function verifyRequest(request, opts) {
  const auth = headerValues(request.headers, 'authorization');
  if (auth.length === 0) throw new VerifyError('missing', 'no Authorization header');
  if (auth.length > 1) throw new VerifyError('malformed', 'more than one Authorization header');
  const m = /^([A-Za-z][A-Za-z0-9-]*) +(\S+)\s*$/.exec(auth[0]);
  if (!m) throw new VerifyError('malformed', 'Authorization is not "<scheme> <token>"');
  const scheme = m[1].toLowerCase();
  const token = m[2];
  try {
    if (scheme === 'bearer') {
      return await verify(token, { ...opts, dpop: undefined });
    }
    if (scheme === 'dpop') {
      const proofs = headerValues(request.headers, 'dpop');
      // Duplicate header lines arrive joined by ", " (Node, fetch Headers): a compact JWS has
      // no comma, so a comma means more than one proof.
      if (proofs.length !== 1 || proofs[0].includes(',')) {
        throw new VerifyError('proof', `${proofs.length === 0 ? 'no' : 'more than one'} DPoP header; exactly one is accepted`);
      }
      return await verify(token, {
        ...opts,
        dpop: { proof: proofs[0].trim(), method: request.method, url: String(request.url) },
      });
    }
    throw new VerifyError('malformed', `Authorization scheme ${JSON.stringify(m[1])}: Bearer or DPoP`);
  } catch (e) {
    if (e instanceof VerifyError) e.scheme = scheme === 'dpop' ? 'DPoP' : 'Bearer';
    throw e;
  }
}
