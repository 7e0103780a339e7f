//! Declarative agents: one `<name>.toml` per agent in `agents_dir`, reconciled at start, on
//! SIGHUP and on D-Bus `Reload()`. A new file enrols, a changed file updates (same key), a
//! removed file revokes. A file that does not parse is reported by name and line and leaves
//! that agent exactly as it was (it is neither updated nor revoked).
//!
//! A revocation sticks: when an admin revoked a file-declared agent (or pulled the kill
//! switch), the revoked record keeps the file's SHA-256, and that same file is reported
//! (`held`, log and audit `agent.file_held`), never enrolled again. Changing the file's content
//! is the admin's deliberate act that enrols it anew. (An agent revoked because its file was
//! removed keeps no hash: adding the file back enrols it.)

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::agents::{validate_name, AdminError, Agent, Agents, Policy, Selectors, Source, Status};
use crate::audit::Event;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    selectors: Selectors,
    policy: Policy,
}

/// Outcome of one reconcile, for logs and for `Reload()`'s caller.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ReconcileReport {
    pub enrolled: Vec<String>,
    pub updated: Vec<String>,
    pub revoked: Vec<String>,
    /// `file: why` for files of agents an admin revoked (not enrolled again until changed).
    pub held: Vec<String>,
    /// `file: problem` for every file that was not applied.
    pub errors: Vec<String>,
}

/// A file that parsed: selectors, policy and the hex SHA-256 of its bytes (`None`: it did
/// not parse and was reported).
struct Spec {
    selectors: Selectors,
    policy: Policy,
    hash: String,
}

type Parsed = Option<Spec>;

fn parse_file(path: &Path, report: &mut ReconcileReport) -> Parsed {
    let shown = path.display();
    match std::fs::read_to_string(path) {
        Ok(text) => parse_text(&text, &shown.to_string(), report),
        Err(e) => {
            report.errors.push(format!("{shown}: cannot read: {e}"));
            None
        }
    }
}

fn parse_text(text: &str, shown: &str, report: &mut ReconcileReport) -> Parsed {
    match toml::from_str::<AgentFile>(text) {
        Ok(f) => Some(Spec {
            selectors: f.selectors,
            policy: f.policy,
            hash: hex::encode(Sha256::digest(text.as_bytes())),
        }),
        Err(e) => {
            let line = e
                .span()
                .map(|s| {
                    text.as_bytes()[..s.start.min(text.len())]
                        .iter()
                        .filter(|b| **b == b'\n')
                        .count()
                        + 1
                })
                .unwrap_or(1);
            report
                .errors
                .push(format!("{shown}:{line}: {}", e.message().trim_end()));
            None
        }
    }
}

/// Check one agent file as a reconcile would before applying it (file name, TOML, selectors,
/// policy against the daemon's ceilings), with no daemon: for `tessera agent check` in
/// configuration-management hooks. `as_name` checks the content as that agent's file (a hook
/// validates a temporary copy whose name says nothing). `Err` holds `file[:line]: problem`
/// lines.
pub fn check_file(
    path: &Path,
    as_name: Option<&str>,
    max_token_ttl: std::time::Duration,
    max_cert_ttl: std::time::Duration,
) -> Result<(), Vec<String>> {
    let shown = path.display();
    let Some(name) = as_name.or_else(|| {
        path.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".toml"))
    }) else {
        return Err(vec![format!(
            "{shown}: an agent file is named <agent>.toml (agents_dir ignores other names)"
        )]);
    };
    // The name first: a file agents_dir would ignore is not even opened (it may be a FIFO).
    if let Err(e) = validate_name(name) {
        return Err(vec![format!("{shown}: {e}")]);
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| vec![format!("{shown}: cannot read: {e}")])?;
    check_text(&text, name, &shown.to_string(), max_token_ttl, max_cert_ttl)
}

/// [`check_file`] on text already read: the agent `name`, `shown` as the file in messages.
pub fn check_text(
    text: &str,
    name: &str,
    shown: &str,
    max_token_ttl: std::time::Duration,
    max_cert_ttl: std::time::Duration,
) -> Result<(), Vec<String>> {
    if let Err(e) = validate_name(name) {
        return Err(vec![format!("{shown}: {e}")]);
    }
    let mut report = ReconcileReport::default();
    let Some(spec) = parse_text(text, shown, &mut report) else {
        return Err(report.errors);
    };
    crate::agents::lifecycle::spec_problem(
        name,
        &spec.selectors,
        &spec.policy,
        max_token_ttl,
        max_cert_ttl,
    )
    .map_err(|e| vec![format!("{shown}: {e}")])
}

impl Agents {
    /// Make the registry match `dir` (start, SIGHUP, D-Bus `Reload()`).
    pub async fn reconcile_agents_dir(&self, dir: &Path) -> Result<ReconcileReport, AdminError> {
        let mut report = ReconcileReport::default();
        let mut files: BTreeMap<String, Parsed> = BTreeMap::new();
        match std::fs::read_dir(dir) {
            Ok(rd) => {
                for entry in rd.flatten() {
                    let path = entry.path();
                    let Some(name) = path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_suffix(".toml"))
                    else {
                        continue;
                    };
                    if let Err(e) = validate_name(name) {
                        report.errors.push(format!("{}: {e}", path.display()));
                        // Cannot name an agent, so it cannot shield one either.
                        continue;
                    }
                    let parsed = parse_file(&path, &mut report);
                    files.insert(name.to_string(), parsed);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(AdminError::InvalidArgs(format!(
                    "cannot read agents_dir {}: {e}",
                    dir.display()
                )))
            }
        }

        // One read of the live agents rather than a lookup per file (10,000 files at start).
        // A concurrent enrolment of the same name still meets the registry's unique index.
        let live: std::collections::HashMap<String, Agent> = self
            .with_registry(|r| r.live())?
            .into_iter()
            .map(|a| (a.name.clone(), a))
            .collect();
        for (name, parsed) in &files {
            let Some(Spec {
                selectors,
                policy,
                hash,
            }) = parsed
            else {
                continue;
            };
            let file = dir.join(format!("{name}.toml"));
            let existing = live.get(name);
            if existing.is_none() {
                let latest = self.with_registry(|r| r.get_latest(name))?;
                if let Some(prev) = latest.filter(|p| {
                    p.status == Status::Revoked
                        && p.source == Source::File
                        && p.file_hash.as_deref() == Some(hash.as_str())
                }) {
                    let why = format!(
                        "agent {name} was revoked ({}); it stays revoked until this file changes",
                        prev.revoke_reason.as_deref().unwrap_or("no reason given")
                    );
                    tracing::warn!(file = %file.display(), "{why}");
                    self.audit
                        .record_or_log(
                            Event::new("agent.file_held")
                                .agent(&prev.name, &prev.id)
                                .details(json!({"file": file, "file_sha256": hash})),
                            "a held agent file",
                        )
                        .await;
                    report.held.push(format!("{}: {why}", file.display()));
                    continue;
                }
            }
            let res = match existing {
                None => self
                    .enroll_from(
                        name,
                        selectors.clone(),
                        policy.clone(),
                        Source::File,
                        Some(hash),
                        "agents_dir",
                    )
                    .await
                    .map(|_| report.enrolled.push(name.clone())),
                Some(a) if a.source != Source::File => Err(AdminError::AlreadyExists(format!(
                    "agent {name} was enrolled over D-Bus; the file is ignored"
                ))),
                Some(a)
                    if a.selectors == *selectors
                        && a.policy == *policy
                        && a.file_hash.as_deref() == Some(hash.as_str()) =>
                {
                    Ok(())
                }
                Some(a) if a.selectors == *selectors && a.policy == *policy => {
                    // Same meaning, other bytes (a comment): remember the new file's hash.
                    self.update(
                        name,
                        selectors.clone(),
                        policy.clone(),
                        Some(hash),
                        "agents_dir",
                    )
                    .await
                }
                Some(_) => self
                    .update(
                        name,
                        selectors.clone(),
                        policy.clone(),
                        Some(hash),
                        "agents_dir",
                    )
                    .await
                    .map(|()| report.updated.push(name.clone())),
            };
            if let Err(e) = res {
                report.errors.push(format!("{}: {e}", file.display()));
            }
        }

        for a in self.with_registry(|r| r.live())? {
            if a.source == Source::File && !files.contains_key(&a.name) {
                match self
                    // Not held: adding the file back is the admin's act and enrols it again.
                    .revoke_with(&a.name, "agent file removed", "agents_dir", false)
                    .await
                {
                    Ok(()) => report.revoked.push(a.name),
                    Err(e) => report.errors.push(format!("revoke {}: {e}", a.name)),
                }
            }
        }
        for e in &report.errors {
            tracing::error!(problem = %e, "agents_dir: file not applied");
        }
        Ok(report)
    }
}
