//! tesserad: hardware-backed identities for local AI agents.
//!
//! One folder per part, data flowing one way (checked by `tests/tests/layout.rs`):
//!
//! ```text
//! bin -> runtime -> doors -> credentials -> agents, caller -> keystore, audit
//! ```
//!
//! - `runtime`: config, dev mode, systemd, logging, the wiring, signals and stop
//! - `doors`: protocol adapters (socket HTTP/JSON, D-Bus, RFC 9457 problems)
//! - `credentials`: the pipeline every door calls (identify, match, policy, build, sign, audit)
//! - `agents`: registry, lifecycle (enrol/revoke/suspend + repair), agents_dir, policy
//! - `caller`: kernel facts about the process at the other end; knows no agent
//! - `keystore`: the devices and their owner threads; `audit`: the hash-chained trail
//! - `durable`, `duration`, `fault`: small shared helpers

pub mod agents;
pub mod audit;
pub mod caller;
pub mod credentials;
pub mod doors;
pub mod durable;
pub mod duration;
pub mod fault;
pub mod keystore;
pub mod metrics;
pub mod runtime;
