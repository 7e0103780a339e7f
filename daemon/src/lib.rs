//! tesserad: hardware-backed identities for local AI agents.
//!
//! Data flows one way: `api` (socket) → `caller` (who is this process?) → `registry`
//! (which agent, what policy?) → `issuer` (build the credential) → `keystore` (sign in
//! hardware) → `audit` (record) → reply.

pub mod config;
pub mod keystore;
