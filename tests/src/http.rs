//! Minimal HTTP/1.1 client over a Unix socket for tests.
