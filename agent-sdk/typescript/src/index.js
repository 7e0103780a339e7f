// tessera-agent: the Node SDK of tessera (hardware-backed identity for local AI agents).

export { Client, DEFAULT_SOCKET } from './client.js';
export * from './errors.js';
export { createTesseraFetch, tesseraFetch } from './fetch.js';
export { DEFAULT_REPLAY_CAPACITY, ReplayCache } from './replay.js';
export { JwksCache, VerifyError, b64Sha256, normalHtu, verify, verifyDpop, verifyRequest } from './verify.js';
export {
  ADVISORY_REFRESH_MS,
  ANTHROPIC_AUDIENCE,
  ANTHROPIC_TOKEN_ENDPOINT,
  CLIENT_ASSERTION_TYPE,
  ENTRA_AUDIENCE,
  ExchangeError,
  Exchanger,
  JWT_BEARER,
  JWT_TOKEN_TYPE,
  MANDATORY_REFRESH_MS,
  TOKEN_EXCHANGE,
  parseAnswer,
} from './exchange.js';
