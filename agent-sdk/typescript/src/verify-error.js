// Why a relying-party check refused, and the answer to give the client (RFC 6750 §3,
// RFC 9449 §7.1 and §8).

/**
 * Refusal codes:
 * - `missing`: no credentials on the request (no `Authorization`);
 * - `malformed`: not a compact JWS / JWT, bad header JSON;
 * - `no-kid`: the token names no key;
 * - `unknown-key`: no key with that `kid` in the key set (unknown, or its agent was revoked);
 * - `rejected`: signature, algorithm, type or a claim (`aud`, `iss`, `iat`, ...) is wrong;
 * - `expired`: past `exp`;
 * - `issued-in-future`: `iat` ahead of the clock beyond the tolerance;
 * - `bound`: a sender-constrained token (`cnf`) presented without its proof;
 * - `proof`: the DPoP proof is wrong (type, key, signature, `htm`, `htu`, `iat`, `ath`, ...);
 * - `use-nonce`: the proof lacks the server's current nonce (answer with `DPoP-Nonce`);
 * - `replay`: the proof was seen before;
 * - `replay-cache-full`: fail closed, too many unexpired proofs held;
 * - `jwks-unavailable`: the key set could not be fetched.
 * @typedef {'missing' | 'malformed' | 'no-kid' | 'unknown-key' | 'rejected' | 'expired'
 *   | 'issued-in-future' | 'bound' | 'proof' | 'use-nonce' | 'replay' | 'replay-cache-full'
 *   | 'jwks-unavailable'} VerifyErrorCode
 */

/** Errors of the token check, as opposed to the proof check (for the `error` code sent back). */
const TOKEN_CODES = new Set(['malformed', 'no-kid', 'unknown-key', 'rejected', 'expired', 'issued-in-future', 'bound']);

/**
 * A quoted-string value for a `WWW-Authenticate` parameter (no quotes, backslashes or controls).
 * @param {string} s
 */
function quoted(s) {
  // eslint-disable-next-line no-control-regex
  return `"${s.replace(/["\\\u0000-\u001f\u007f]/g, ' ').slice(0, 200)}"`;
}

export class VerifyError extends Error {
  /**
   * @param {VerifyErrorCode} code
   * @param {string} message
   * @param {ErrorOptions} [options]
   */
  constructor(code, message, options) {
    super(message, options);
    this.name = 'VerifyError';
    /** Why, as a stable code. */
    this.code = code;
    /**
     * The scheme the credentials came with (`Bearer` or `DPoP`), when known: the challenge uses
     * it.
     * @type {'Bearer' | 'DPoP' | undefined}
     */
    this.scheme = undefined;
  }

  /** The HTTP status to answer with: 503 when the verifier itself cannot decide, else 401. */
  get status() {
    return this.code === 'replay-cache-full' || this.code === 'jwks-unavailable' ? 503 : 401;
  }

  /**
   * The answer's headers: `WWW-Authenticate` (and `DPoP-Nonce` for a nonce challenge, or when a
   * `nonce` is given, as RFC 9449 §8.2 allows on any answer).
   * @param {{nonce?: string}} [options] `nonce`: the server's current DPoP nonce.
   * @returns {Record<string, string>}
   */
  challenge(options = {}) {
    /** @type {Record<string, string>} */
    const headers = {};
    const desc = `error_description=${quoted(this.message)}`;
    if (this.status === 503) {
      headers['retry-after'] = '1';
      return headers;
    }
    if (this.code === 'missing') {
      headers['www-authenticate'] = 'Bearer, DPoP algs="ES256"';
    } else if (this.code === 'use-nonce') {
      headers['www-authenticate'] = `DPoP error="use_dpop_nonce", ${desc}, algs="ES256"`;
    } else if (this.scheme === 'DPoP' || !TOKEN_CODES.has(this.code)) {
      const error = TOKEN_CODES.has(this.code) ? 'invalid_token' : 'invalid_dpop_proof';
      headers['www-authenticate'] = `DPoP error="${error}", ${desc}, algs="ES256"`;
    } else {
      headers['www-authenticate'] = `Bearer error="invalid_token", ${desc}`;
    }
    if (options.nonce !== undefined) headers['dpop-nonce'] = options.nonce;
    return headers;
  }
}
