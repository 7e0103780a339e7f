// Errors raised by the client: the daemon's refusals (RFC 9457 problem JSON) as one class per
// stable problem type, and the SDK's own failures (socket unreachable, timeout, bad answer).

/** Prefix of every problem `type` URI the daemon sends. */
export const PROBLEM_URI_PREFIX = 'urn:tessera:problem:';

/** Base class of every error the client raises. */
export class TesseraError extends Error {
  /**
   * @param {string} message
   * @param {ErrorOptions} [options]
   */
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The daemon's socket cannot be reached (missing, refused, no permission). */
export class TesseraConnectError extends TesseraError {
  /**
   * @param {string} socketPath
   * @param {NodeJS.ErrnoException} cause
   */
  constructor(socketPath, cause) {
    let why = cause.message;
    if (cause.code === 'ENOENT') {
      why = 'the socket does not exist (is tesserad running? TESSERA_SOCKET names another path)';
    } else if (cause.code === 'ECONNREFUSED') {
      why = 'connection refused (a stale socket: tesserad is not running)';
    } else if (cause.code === 'EACCES') {
      why = 'permission denied on the socket path';
    }
    super(`cannot reach tesserad at ${socketPath}: ${why}`, { cause });
    /** The socket path tried. */
    this.socketPath = socketPath;
    /** The system error code (`ENOENT`, `ECONNREFUSED`, ...). */
    this.code = cause.code;
  }
}

/** The daemon did not answer within the client's timeout. */
export class TesseraTimeoutError extends TesseraError {
  /**
   * @param {string} socketPath
   * @param {number} timeoutMs
   */
  constructor(socketPath, timeoutMs) {
    super(`tesserad at ${socketPath} did not answer within ${timeoutMs} ms`);
    this.socketPath = socketPath;
    this.timeoutMs = timeoutMs;
  }
}

/** An answer the SDK cannot understand (not JSON where JSON was due, a non-problem error). */
export class TesseraProtocolError extends TesseraError {
  /**
   * @param {string} message
   * @param {{status?: number, body?: string}} [details]
   */
  constructor(message, details = {}) {
    super(`unexpected answer from tesserad: ${message}`);
    this.status = details.status;
    this.body = details.body;
  }
}

/**
 * A refusal by the daemon: an RFC 9457 problem. Known types have a subclass each
 * (`instanceof AudienceNotAllowed`); a type this SDK does not know is a plain `TesseraProblem`.
 */
export class TesseraProblem extends TesseraError {
  /**
   * @param {{type?: unknown, title?: unknown, status?: unknown, detail?: unknown}} body
   * @param {{status?: number, retryAfter?: number}} [extra]
   */
  constructor(body, extra = {}) {
    const type = typeof body.type === 'string' ? body.type : 'about:blank';
    const title = typeof body.title === 'string' ? body.title : 'Error';
    const detail = typeof body.detail === 'string' ? body.detail : '';
    super(detail ? `${title}: ${detail}` : title);
    /** The full `type` URI, e.g. `urn:tessera:problem:audience-not-allowed`. */
    this.type = type;
    /** The stable part of the type, e.g. `audience-not-allowed`. */
    this.slug = type.startsWith(PROBLEM_URI_PREFIX) ? type.slice(PROBLEM_URI_PREFIX.length) : type;
    /** HTTP status of the answer. */
    this.status = typeof body.status === 'number' ? body.status : (extra.status ?? 0);
    this.title = title;
    this.detail = detail;
    /** Seconds to wait before asking again (`Retry-After`, on 429 and 503), when sent. */
    this.retryAfter = extra.retryAfter;
  }
}

// One subclass per type the daemon sends (agent-sdk/rust/src/error.rs, ProblemType::KNOWN).
export class UnknownCaller extends TesseraProblem {}
export class AmbiguousCaller extends TesseraProblem {}
export class CallerGone extends TesseraProblem {}
export class AudienceNotAllowed extends TesseraProblem {}
export class ScopeNotAllowed extends TesseraProblem {}
export class TtlNotAllowed extends TesseraProblem {}
export class AgentSuspended extends TesseraProblem {}
export class AgentRevoked extends TesseraProblem {}
export class MalformedRequest extends TesseraProblem {}
export class BodyTooLarge extends TesseraProblem {}
export class RateLimited extends TesseraProblem {}
export class BackendUnavailable extends TesseraProblem {}
export class AuditUnavailable extends TesseraProblem {}
export class NotFound extends TesseraProblem {}
export class MethodNotAllowed extends TesseraProblem {}
export class RequestTimeout extends TesseraProblem {}
export class UseSocket extends TesseraProblem {}
export class BindingRequired extends TesseraProblem {}
export class TargetNotAllowed extends TesseraProblem {}
export class TokenNotAccepted extends TesseraProblem {}
export class TlsRoleNotAllowed extends TesseraProblem {}
export class KeyTypeUnsupported extends TesseraProblem {}
export class InternalError extends TesseraProblem {}

/** Problem slug → class. */
export const PROBLEM_CLASSES = Object.freeze({
  'unknown-caller': UnknownCaller,
  'ambiguous-caller': AmbiguousCaller,
  'caller-gone': CallerGone,
  'audience-not-allowed': AudienceNotAllowed,
  'scope-not-allowed': ScopeNotAllowed,
  'ttl-not-allowed': TtlNotAllowed,
  'agent-suspended': AgentSuspended,
  'agent-revoked': AgentRevoked,
  'malformed-request': MalformedRequest,
  'body-too-large': BodyTooLarge,
  'rate-limited': RateLimited,
  'backend-unavailable': BackendUnavailable,
  'audit-unavailable': AuditUnavailable,
  'not-found': NotFound,
  'method-not-allowed': MethodNotAllowed,
  'request-timeout': RequestTimeout,
  'use-socket': UseSocket,
  'binding-required': BindingRequired,
  'target-not-allowed': TargetNotAllowed,
  'token-not-accepted': TokenNotAccepted,
  'tls-role-not-allowed': TlsRoleNotAllowed,
  'key-type-unsupported': KeyTypeUnsupported,
  internal: InternalError,
});

/**
 * The typed error for a problem body the daemon sent.
 * @param {{type?: unknown, title?: unknown, status?: unknown, detail?: unknown}} body
 * @param {{status?: number, retryAfter?: number}} [extra]
 * @returns {TesseraProblem}
 */
export function problemFrom(body, extra) {
  const type = typeof body.type === 'string' ? body.type : '';
  const slug = type.startsWith(PROBLEM_URI_PREFIX) ? type.slice(PROBLEM_URI_PREFIX.length) : null;
  const Cls = slug !== null && Object.hasOwn(PROBLEM_CLASSES, slug)
    ? PROBLEM_CLASSES[/** @type {keyof typeof PROBLEM_CLASSES} */ (slug)]
    : TesseraProblem;
  return new Cls(body, extra);
}
