//! Declarative agents: one `<name>.toml` per agent in `agents_dir`, reconciled at start, on
//! SIGHUP and on D-Bus `Reload()`. A new file enrols, a changed file updates (same key), a
//! removed file revokes. A file that does not parse is reported by name and line and leaves
//! that agent exactly as it was (it is neither updated nor revoked).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::lifecycle::AdminError;
use crate::registry::{validate_name, Policy, Selectors, Source};
use crate::service::Service;

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
    /// `file: problem` for every file that was not applied.
    pub errors: Vec<String>,
}

enum Parsed {
    Ok(Selectors, Policy),
    Bad,
}

fn parse_file(path: &Path, report: &mut ReconcileReport) -> Parsed {
    let shown = path.display();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            report.errors.push(format!("{shown}: cannot read: {e}"));
            return Parsed::Bad;
        }
    };
    match toml::from_str::<AgentFile>(&text) {
        Ok(f) => Parsed::Ok(f.selectors, f.policy),
        Err(e) => {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(1);
            report
                .errors
                .push(format!("{shown}:{line}: {}", e.message().trim_end()));
            Parsed::Bad
        }
    }
}

impl Service {
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

        for (name, parsed) in &files {
            let Parsed::Ok(selectors, policy) = parsed else {
                continue;
            };
            let existing = self.with_registry(|r| r.get_live(name))?;
            let res = match existing {
                None => self
                    .enroll(
                        name,
                        selectors.clone(),
                        policy.clone(),
                        Source::File,
                        "agents_dir",
                    )
                    .await
                    .map(|_| report.enrolled.push(name.clone())),
                Some(a) if a.source != Source::File => Err(AdminError::AlreadyExists(format!(
                    "agent {name} was enrolled over D-Bus; the file is ignored"
                ))),
                Some(a) if a.selectors == *selectors && a.policy == *policy => Ok(()),
                Some(_) => self
                    .update(name, selectors.clone(), policy.clone(), "agents_dir")
                    .await
                    .map(|()| report.updated.push(name.clone())),
            };
            if let Err(e) = res {
                report.errors.push(format!(
                    "{}: {e}",
                    dir.join(format!("{name}.toml")).display()
                ));
            }
        }

        for a in self.with_registry(|r| r.live())? {
            if a.source == Source::File && !files.contains_key(&a.name) {
                match self
                    .revoke(&a.name, "agent file removed", "agents_dir")
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
