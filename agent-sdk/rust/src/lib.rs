//! tessera agent SDK.
//!
//! - [`Client`]: ask the local `tesserad` for credentials over its Unix socket
//!   (`TESSERA_SOCKET`, default `/run/tessera/agent.sock`). The daemon identifies the caller
//!   from the kernel; nothing here claims an identity.
//! - [`verify`]: relying-party checks: bearer tokens, DPoP-bound tokens with their proofs,
//!   WIMSE WIT+WPT pairs and RFC 9421 signatures.
//! - `reqwest` (feature `reqwest`): send a request with a DPoP-bound token and a fresh proof.
//! - `exchange` (feature `exchange`): trade a fresh assertion for a cloud token service's access
//!   token (RFC 7523 / RFC 8693, the Claude API), cached and refreshed ahead of expiry.
//! - [`attestation`]: check key attestation evidence (the agent key was made inside a TPM).
//! - [`key_policy`]: whether a tessera certificate certifies a hardware or a software key.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tessera::Error> {
//! let client = tessera::Client::from_env();
//! let t = client.token(&tessera::TokenOptions::new("https://api.example.com").scope("read")).await?;
//! println!("Authorization: Bearer {}", t.token);
//! # Ok(()) }
//! ```

pub mod attestation;
mod client;
mod error;
#[cfg(feature = "exchange")]
pub mod exchange;
pub mod key_policy;
pub mod pem;
#[cfg(feature = "reqwest")]
pub mod reqwest;
#[cfg(feature = "rustls")]
pub mod tls;
pub mod verify;

pub use client::{
    CertificateOptions, Client, DpopOptions, Health, HttpSignature, HttpSignatureOptions,
    ProofResponse, TokenOptions, TokenResponse, WhoAmI, WitResponse, WptOptions, DEFAULT_SOCKET,
};
pub use error::{Error, Problem, ProblemType};
pub use hyper::Method;
