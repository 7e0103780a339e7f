//! tesserad: hardware-backed identities for local AI agents.
//!
//! Data flows one way: `api` (socket) → `caller` (who is this process?) → `registry`
//! (which agent, what policy?) → `issuer` (build the credential) → `keystore` (sign in
//! hardware) → `audit` (record) → reply.

pub mod agents_dir;
pub mod api;
pub mod audit;
pub mod caller;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod dbus;
pub mod dev;
pub mod durable;
pub mod fault;
pub mod hostca;
pub mod issuer;
pub mod keystore;
pub mod lifecycle;
pub mod logging;
pub mod policy;
pub mod problem;
pub mod registry;
pub mod service;
pub mod systemd;
pub mod x509;
