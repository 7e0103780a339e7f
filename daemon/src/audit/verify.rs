//! Reading the chain back: the files in order and the check `tessera audit verify` runs.

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{io_err, record_hash, AuditError, CURRENT, GENESIS};

pub(super) fn first_seq(path: &Path) -> Result<Option<u64>, AuditError> {
    let f = File::open(path).map_err(|e| io_err(path, e))?;
    let mut line = String::new();
    BufReader::new(f)
        .read_line(&mut line)
        .map_err(|e| io_err(path, e))?;
    Ok(serde_json::from_str::<Value>(&line)
        .ok()
        .and_then(|v| v["seq"].as_u64()))
}

/// Audit files in chain order: rotated ones by first seq, then the current one.
pub fn files_in_order(dir: &Path) -> Result<Vec<PathBuf>, AuditError> {
    let mut rotated: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| io_err(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit-") && n.ends_with(".log"))
        })
        .collect();
    rotated.sort();
    let current = dir.join(CURRENT);
    if current.exists() {
        rotated.push(current);
    }
    Ok(rotated)
}

/// Result of checking a trail.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub files: usize,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub last_hash: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Broken {
    pub seq: u64,
    pub file: String,
    pub line: usize,
    pub reason: String,
}

/// Check the whole chain under `path` (a directory, or a single file).
pub fn verify(path: &Path) -> Result<Result<Summary, Broken>, AuditError> {
    Ok(walk(path, None)?.map(|(s, _, _)| s))
}

/// A chain that verifies and what its newest checkpoint covers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Anchored {
    pub summary: Summary,
    /// Every record up to this seq is vouched for by the signed checkpoint.
    pub anchored_through: u64,
    /// When the checkpoint was signed (Unix seconds).
    pub checkpoint_iat: i64,
    /// Records after the checkpoint: chained, but nothing signed covers them yet.
    pub unanchored: u64,
}

/// [`verify`], then check the signed checkpoint `jws` with the host CA key `key`: its
/// record must be in the trail with the hash it signed. Rewriting any record up to it, or
/// removing records after it, is reported as broken.
pub fn verify_anchored(
    path: &Path,
    jws: &str,
    key: &p256::ecdsa::VerifyingKey,
) -> Result<Result<Anchored, Broken>, AuditError> {
    let broken = |seq: u64, reason: String| Broken {
        seq,
        file: "checkpoint".to_string(),
        line: 1,
        reason,
    };
    let cp = match super::checkpoint::verify(jws, key) {
        Ok(cp) => cp,
        Err(e) => return Ok(Err(broken(0, e.to_string()))),
    };
    let (summary, hash, pruned_by) = match walk(path, Some(cp.seq))? {
        Ok(x) => x,
        Err(b) => return Ok(Err(b)),
    };
    // Only retention the checkpoint vouches for explains a trail that starts late: an
    // `audit.pruned` record after it could have been written by anyone.
    if let Some(p) = pruned_by.filter(|p| *p > cp.seq) {
        return Ok(Err(broken(
            p,
            format!("the trail starts at seq {} and only audit.pruned record seq {p}, after the signed checkpoint (seq {}), accounts for that: records removed", summary.first_seq.unwrap_or(0), cp.seq),
        )));
    }
    let last = summary.last_seq.unwrap_or(0);
    if last < cp.seq {
        return Ok(Err(broken(
            cp.seq,
            format!("the trail ends at seq {last} but the signed checkpoint covers seq {}: records were removed", cp.seq),
        )));
    }
    match hash {
        Some(h) if h == cp.hash => {}
        Some(_) => {
            return Ok(Err(broken(
                cp.seq,
                format!(
                    "record seq {} is not the one the checkpoint signed: the trail was rewritten",
                    cp.seq
                ),
            )))
        }
        None => {
            return Ok(Err(broken(
                cp.seq,
                format!(
                    "record seq {} of the checkpoint is not in the trail (it starts at seq {})",
                    cp.seq,
                    summary.first_seq.unwrap_or(0)
                ),
            )))
        }
    }
    Ok(Ok(Anchored {
        unanchored: last - cp.seq,
        anchored_through: cp.seq,
        checkpoint_iat: cp.iat,
        summary,
    }))
}

/// The chain check, also returning the hash of record `want` if the trail holds it and the
/// seq of the `audit.pruned` record that accounts for a trail starting after seq 1.
#[allow(clippy::type_complexity)]
fn walk(
    path: &Path,
    want: Option<u64>,
) -> Result<Result<(Summary, Option<String>, Option<u64>), Broken>, AuditError> {
    let mut wanted_hash = None;
    let files = if path.is_dir() {
        files_in_order(path)?
    } else {
        vec![path.to_path_buf()]
    };
    let mut prev: Option<String> = None;
    let mut expected_seq: Option<u64> = None;
    let mut records = 0u64;
    let mut first_seq = None;
    // (seq, prev, file, line) of a first record other than seq 1, and whether an
    // `audit.pruned` record accounts for what came before it.
    let mut pruned_before: Option<(u64, String, String, usize)> = None;
    let mut pruned_justified: Option<u64> = None;
    for file in &files {
        let f = File::open(file).map_err(|e| io_err(file, e))?;
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|e| io_err(file, e))?;
            let broken = |seq: u64, reason: String| Broken {
                seq,
                file: file.display().to_string(),
                line: i + 1,
                reason,
            };
            let next = expected_seq.unwrap_or(1);
            let v: Value = match serde_json::from_str(&line) {
                Ok(v) => v,
                Err(e) => return Ok(Err(broken(next, format!("not a JSON record: {e}")))),
            };
            let seq = v["seq"].as_u64().unwrap_or(0);
            if record_hash(&v) != v["hash"].as_str().unwrap_or("") {
                return Ok(Err(broken(
                    seq,
                    "record content does not match its hash (edited)".into(),
                )));
            }
            let want_prev = prev.clone().unwrap_or_else(|| GENESIS.to_string());
            let first_of_partial = prev.is_none() && !path.is_dir();
            if let Some(exp) = expected_seq {
                if seq != exp {
                    return Ok(Err(broken(
                        exp,
                        format!("expected seq {exp}, found {seq} (records removed, reordered or inserted)"),
                    )));
                }
            } else if seq != 1 && !first_of_partial {
                // Retention removed the files before this one: an `audit.pruned` record later
                // in the chain must name this record's predecessor, or records were removed.
                pruned_before = Some((
                    seq,
                    v["prev"].as_str().unwrap_or_default().to_string(),
                    file.display().to_string(),
                    i + 1,
                ));
            }
            if v["event"] == "audit.pruned" {
                if let Some((s0, p0, _, _)) = &pruned_before {
                    if s0.checked_sub(1).is_some()
                        && v["details"]["through_seq"].as_u64() == s0.checked_sub(1)
                        && v["details"]["last_hash"].as_str() == Some(p0.as_str())
                    {
                        pruned_justified.get_or_insert(seq);
                    }
                }
            }
            let starts_pruned = prev.is_none() && pruned_before.is_some();
            if v["prev"].as_str() != Some(want_prev.as_str()) && !first_of_partial && !starts_pruned
            {
                return Ok(Err(broken(
                    seq,
                    "prev does not match the previous record's hash (records removed, reordered or inserted)".into(),
                )));
            }
            first_seq.get_or_insert(seq);
            if want == Some(seq) {
                wanted_hash = v["hash"].as_str().map(str::to_string);
            }
            prev = v["hash"].as_str().map(str::to_string);
            expected_seq = Some(seq + 1);
            records += 1;
        }
    }
    if let Some((seq, _, file, line)) = pruned_before {
        if pruned_justified.is_none() {
            return Ok(Err(Broken {
                seq: 1,
                file,
                line,
                reason: format!(
                    "chain starts at seq {seq}, not 1, and no audit.pruned record accounts for the records before it (records removed)"
                ),
            }));
        }
    }
    Ok(Ok((
        Summary {
            files: files.len(),
            records,
            first_seq,
            last_seq: expected_seq.map(|s| s - 1),
            last_hash: prev.unwrap_or_else(|| GENESIS.to_string()),
        },
        wanted_hash,
        pruned_justified,
    )))
}
