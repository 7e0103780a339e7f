// A replay cache with bounded memory (port of agent-sdk/rust/src/verify/replay.rs): each proof
// id is kept until the end of the window in which its proof could still be accepted, and when
// the cache holds `capacity` unexpired ids it refuses new proofs (fail closed) rather than
// forgetting one early.
//
// Callers read the clock before slow checks (key look-ups are async), so their `now` values
// may arrive out of order: an id is forgotten only GRACE seconds after the latest `now` seen
// passed its end, and a call whose `now` is older than that latest `now` minus GRACE is refused
// (a stalled check, or the clock stepped back), since it could otherwise find a forgotten id.

import { createHash } from 'node:crypto';

import { VerifyError } from './verify-error.js';

/** Default capacity: ids of unexpired proofs held at most. */
export const DEFAULT_REPLAY_CAPACITY = 100_000;
/** Seconds of disorder tolerated between callers' clock readings. */
const GRACE = 5;

export class ReplayCache {
  /** @type {number} */
  #capacity;
  /** SHA-256 (base64) of the id → until when it is kept (unix seconds). */
  #seen = new Map();
  /** The same entries as [until, key], a binary min-heap by `until`, to drop them in order. */
  /** @type {Array<[number, string]>} */
  #heap = [];
  /** The latest `now` a caller brought. */
  #high = -Infinity;

  /** @param {number} [capacity] unexpired ids held at most (default 100 000). */
  constructor(capacity = DEFAULT_REPLAY_CAPACITY) {
    if (!Number.isInteger(capacity) || capacity < 1) {
      throw new TypeError(`ReplayCache capacity must be a positive integer, not ${capacity}`);
    }
    this.#capacity = capacity;
  }

  /** Most ids held at once. */
  get capacity() {
    return this.#capacity;
  }

  /** Unexpired ids held (as of the last call). */
  get size() {
    return this.#seen.size;
  }

  /**
   * Accept `id` once: it is remembered until `until` (unix seconds). A second use before then
   * throws `VerifyError` `replay`; a full cache throws `replay-cache-full`.
   * @param {string} id
   * @param {number} until
   * @param {number} [now] unix seconds, default the clock
   */
  checkAndInsert(id, until, now = Math.floor(Date.now() / 1000)) {
    if (now < this.#high - GRACE) {
      throw new VerifyError(
        'proof',
        `checked with a clock reading ${this.#high - now} s behind the latest; refused (replay cannot be excluded)`,
      );
    }
    this.#high = Math.max(this.#high, now);
    this.#expire();
    const key = createHash('sha256').update(id).digest('base64');
    if (this.#seen.has(key)) {
      throw new VerifyError('replay', `proof ${id.slice(0, 64)} was seen before (replay)`);
    }
    if (this.#seen.size >= this.#capacity) {
      throw new VerifyError(
        'replay-cache-full',
        `replay cache full (${this.#capacity} unexpired proofs); refusing new proofs until some expire`,
      );
    }
    this.#seen.set(key, until);
    this.#push([until, key]);
  }

  /** Drop the ids whose end passed GRACE seconds before the latest clock reading. */
  #expire() {
    const h = this.#heap;
    while (h.length && h[0][0] + GRACE <= this.#high) {
      const [t, k] = this.#pop();
      if (this.#seen.get(k) === t) this.#seen.delete(k);
    }
  }

  /** @param {[number, string]} e */
  #push(e) {
    const h = this.#heap;
    h.push(e);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (h[p][0] <= h[i][0]) break;
      [h[p], h[i]] = [h[i], h[p]];
      i = p;
    }
  }

  /** @returns {[number, string]} */
  #pop() {
    const h = this.#heap;
    const top = h[0];
    const last = /** @type {[number, string]} */ (h.pop());
    if (h.length) {
      h[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && h[l][0] < h[m][0]) m = l;
        if (r < h.length && h[r][0] < h[m][0]) m = r;
        if (m === i) break;
        [h[m], h[i]] = [h[i], h[m]];
        i = m;
      }
    }
    return top;
  }
}
