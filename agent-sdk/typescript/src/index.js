// tessera-agent: the Node SDK of tessera (hardware-backed identity for local AI agents).

export { Client, DEFAULT_SOCKET } from './client.js';
export * from './errors.js';
export { createTesseraFetch, tesseraFetch } from './fetch.js';
export { DEFAULT_REPLAY_CAPACITY, ReplayCache } from './replay.js';
export { JwksCache, VerifyError, b64Sha256, normalHtu, verify, verifyDpop, verifyRequest } from './verify.js';
