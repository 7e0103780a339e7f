//! The writer thread's side: group commit with `fdatasync`, rollback of a failed write,
//! rotation, and the repair of a torn tail at start.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::checkpoint::Head;
use super::verify::{files_in_order, first_seq};
use super::{
    into_string, io_err, write_canonical, write_json, AuditError, Event, Job, TornTail, CURRENT,
    GENESIS,
};

pub(super) struct Writer {
    pub(super) dir: PathBuf,
    pub(super) file: Option<File>,
    pub(super) size: u64,
    pub(super) seq: u64,
    pub(super) prev: String,
    pub(super) rotate_bytes: u64,
    pub(super) keep_files: Option<usize>,
    pub(super) keep_bytes: Option<u64>,
    /// Published after every durable write, for whoever signs checkpoints.
    pub(super) head: tokio::sync::watch::Sender<Head>,
    /// Seq of the newest signed checkpoint: retention never removes it or anything after it.
    pub(super) anchored: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Seq of the last `audit.pruned` written by this writer (0: none).
    pub(super) pruned_at: u64,
    /// Seq of the oldest record kept.
    pub(super) first: u64,
}

impl Writer {
    pub(super) fn current(&self) -> PathBuf {
        self.dir.join(CURRENT)
    }

    fn publish_head(&self) {
        self.head.send_replace(Head {
            seq: self.seq,
            hash: self.prev.clone(),
            pruned_at: self.pruned_at,
            first: self.first,
        });
    }

    pub(super) fn open_file(&mut self) -> Result<(), AuditError> {
        let path = self.current();
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        self.size = f.metadata().map_err(|e| io_err(&path, e))?.len();
        self.file = Some(f);
        Ok(())
    }

    /// The record's line (canonical JSON, no newline), its hash, and where its `details`
    /// are in the line. One serialisation: the top-level members are written in their sorted
    /// order (agent, caller, details, event, [hash], prev, seq, time), the hash taken over the
    /// line without `hash` (what [`record_hash`] computes) and then put in its place.
    pub(super) fn build(&self, ev: &Event, seq: u64, prev: &str) -> Built {
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut out = Vec::with_capacity(768);
        out.extend_from_slice(br#"{"agent":"#);
        match &ev.agent {
            Some(a) => {
                out.extend_from_slice(br#"{"id":"#);
                write_json(&a.id, &mut out);
                out.extend_from_slice(br#","name":"#);
                write_json(&a.name, &mut out);
                out.push(b'}');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(br#","caller":"#);
        match ev
            .caller
            .as_ref()
            .and_then(|c| serde_json::to_value(c).ok())
        {
            Some(c) => write_canonical(&c, &mut out),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(br#","details":"#);
        let details_at = out.len();
        write_canonical(&ev.details, &mut out);
        let details = details_at..out.len();
        out.extend_from_slice(br#","event":"#);
        write_json(ev.event, &mut out);
        let hash_at = out.len();
        out.extend_from_slice(br#","prev":"#);
        write_json(prev, &mut out);
        out.extend_from_slice(br#","seq":"#);
        write_json(&seq, &mut out);
        out.extend_from_slice(br#","time":"#);
        write_json(&time, &mut out);
        out.push(b'}');
        let hash = hex::encode(Sha256::digest(&out));
        let member = format!(r#","hash":"{hash}""#);
        out.splice(hash_at..hash_at, member.into_bytes());
        Built {
            line: into_string(out),
            hash,
            details,
        }
    }

    pub(super) fn write_batch(&mut self, batch: Vec<Job>) {
        let mut buf = String::new();
        let mut seq = self.seq;
        let mut prev = self.prev.clone();
        let mut built = Vec::with_capacity(batch.len());
        for (ev, _) in &batch {
            seq += 1;
            let b = self.build(ev, seq, &prev);
            buf.push_str(&b.line);
            buf.push('\n');
            prev = b.hash.clone();
            built.push(b);
        }
        match self.append(buf.as_bytes()) {
            Ok(()) => {
                self.seq = seq;
                self.prev = prev;
                self.publish_head();
                let first = self.seq + 1 - batch.len() as u64;
                // Durable: the waiting callers go first, the log lines after.
                let mut events = Vec::with_capacity(batch.len());
                for (i, (ev, reply)) in batch.into_iter().enumerate() {
                    let _ = reply.send(Ok(first + i as u64));
                    events.push(ev);
                }
                for (i, (ev, b)) in events.iter().zip(&built).enumerate() {
                    emit_trace(first + i as u64, ev, &b.line[b.details.clone()]);
                }
                if self.size >= self.rotate_bytes {
                    if let Err(e) = self.rotate() {
                        tracing::error!(error = %e, "audit rotation failed; continuing in the current file");
                    } else if let Err(e) = self.prune() {
                        tracing::error!(error = %e, "audit retention failed; keeping the old files");
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "audit write failed; refusing credentials until it works");
                for (_, reply) in batch {
                    let _ = reply.send(Err(AuditError::Io {
                        path: self.current().display().to_string(),
                        source: std::io::Error::other(e.to_string()),
                    }));
                }
            }
        }
    }

    /// Write and sync, or leave the file as it was.
    pub(super) fn append(&mut self, data: &[u8]) -> Result<(), AuditError> {
        if self.file.is_none() {
            self.open_file()?;
        }
        let path = self.current();
        let before = self.size;
        let f = self.file.as_mut().ok_or(AuditError::Stopped)?;
        let t = std::time::Instant::now();
        let res = f.write_all(data).and_then(|()| f.sync_data());
        crate::metrics::audit_sync(t.elapsed());
        match res {
            Ok(()) => {
                self.size += data.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Roll back a partial write so the chain never holds a torn record; reopen
                // the file on the next batch (it may have been replaced or fixed meanwhile).
                let _ = f.set_len(before);
                self.file = None;
                Err(io_err(&path, e))
            }
        }
    }

    /// Remove the oldest rotated files beyond `keep_files`/`keep_bytes`. The `audit.pruned`
    /// record naming them (and the seq and hash of their last record) is durable before any
    /// file goes: a crash in between leaves extra files, never an unexplained gap.
    pub(super) fn prune(&mut self) -> Result<(), AuditError> {
        if self.keep_files.is_none() && self.keep_bytes.is_none() {
            return Ok(());
        }
        let files = files_in_order(&self.dir)?;
        let Some((_current, rotated)) = files.split_last() else {
            return Ok(());
        };
        let size = |p: &PathBuf| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut total: u64 = files.iter().map(size).sum();
        let mut doomed = Vec::new();
        let anchored = self.anchored.load(std::sync::atomic::Ordering::SeqCst);
        for (i, f) in rotated.iter().enumerate() {
            // The file after this one starts one past this one's last record: a file that
            // holds the newest checkpoint's record (or anything after it) stays, so the
            // anchor can always be checked.
            // (0: no checkpoint yet, nothing to keep for it.)
            let next_first = first_seq(&files[i + 1])?.unwrap_or(u64::MAX);
            if anchored > 0 && next_first > anchored {
                break;
            }
            let kept = rotated.len() - doomed.len();
            let over_files = self.keep_files.is_some_and(|k| kept > k);
            let over_bytes = self.keep_bytes.is_some_and(|k| total > k);
            if !(over_files || over_bytes) {
                break;
            }
            total = total.saturating_sub(size(f));
            doomed.push(f.clone());
        }
        let Some(last_file) = doomed.last() else {
            return Ok(());
        };
        let (through_seq, last_hash) = last_record_of(last_file)?;
        let names: Vec<String> = doomed
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        let ev = Event::new("audit.pruned").details(json!({
            "files": names,
            "through_seq": through_seq,
            "last_hash": last_hash,
        }));
        let seq = self.seq + 1;
        let b = self.build(&ev, seq, &self.prev.clone());
        let mut line = b.line.clone();
        line.push('\n');
        self.append(line.as_bytes())?;
        self.seq = seq;
        self.prev = b.hash.clone();
        self.pruned_at = seq;
        self.first = through_seq + 1;
        self.publish_head();
        emit_trace(seq, &ev, &b.line[b.details.clone()]);
        for f in &doomed {
            fs::remove_file(f).map_err(|e| io_err(f, e))?;
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(&self.dir, e))
    }

    pub(super) fn rotate(&mut self) -> Result<(), AuditError> {
        let first = first_seq(&self.current())?.unwrap_or(self.seq);
        let to = self.dir.join(format!("audit-{first:020}.log"));
        fs::rename(self.current(), &to).map_err(|e| io_err(&to, e))?;
        self.file = None;
        self.open_file()?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(&self.dir, e))
    }
}

fn emit_trace(seq: u64, ev: &Event, details: &str) {
    let caller = ev.caller.as_ref();
    tracing::info!(
        target: "tessera::audit",
        seq,
        event = ev.event,
        agent = ev.agent.as_ref().map_or("", |a| a.name.as_str()),
        pid = caller.map_or(0, |c| c.pid as i64),
        uid = caller.map_or(0, |c| c.uid as u64),
        exe_sha256 = caller.and_then(|c| c.exe_sha256.as_deref()).unwrap_or(""),
        jti = ev.details["jti"].as_str().unwrap_or(""),
        details = details,
        "audit"
    );
}

/// One record as written: its line, hash, and the byte range of its `details` in the line.
pub(super) struct Built {
    pub(super) line: String,
    pub(super) hash: String,
    pub(super) details: std::ops::Range<usize>,
}

/// Where a crash left the current file torn: the offset of its first line that is not a JSON
/// record (or of a last line without its newline), and the file's length. `None` when whole.
/// Everything from there on is an unsynced batch: batches are written only after the one
/// before was synced, so a later complete line after a garbled one was never acknowledged.
pub(super) fn find_torn(dir: &Path) -> Result<Option<(u64, u64)>, AuditError> {
    let path = dir.join(CURRENT);
    let data = match fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path, e)),
    };
    let mut at = 0usize;
    while at < data.len() {
        let Some(nl) = data[at..].iter().position(|b| *b == b'\n') else {
            break; // a last line without its newline
        };
        let line = &data[at..at + nl];
        let whole = line.iter().all(u8::is_ascii_whitespace)
            || serde_json::from_slice::<Value>(line).is_ok_and(|v| v.is_object());
        if !whole {
            break;
        }
        at += nl + 1;
    }
    Ok((at < data.len()).then_some((at as u64, data.len() as u64)))
}

/// Move the torn part [`find_torn`] found aside to `torn-<time>.bin` and truncate there.
pub(super) fn repair_tail(dir: &Path, good: u64) -> Result<TornTail, AuditError> {
    let path = dir.join(CURRENT);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(|e| io_err(&path, e))?;
    let good = (good as usize).min(data.len());
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    let saved_to = dir.join(format!("torn-{stamp}.bin"));
    fs::write(&saved_to, &data[good..]).map_err(|e| io_err(&saved_to, e))?;
    f.set_len(good as u64).map_err(|e| io_err(&path, e))?;
    f.seek(SeekFrom::End(0)).map_err(|e| io_err(&path, e))?;
    f.sync_all().map_err(|e| io_err(&path, e))?;
    Ok(TornTail {
        bytes: (data.len() - good) as u64,
        saved_to,
    })
}

/// `(seq, hash)` of the last record in the chain, or `(0, GENESIS)`.
pub(super) fn last_record(dir: &Path) -> Result<(u64, String), AuditError> {
    for path in files_in_order(dir)?.iter().rev() {
        let f = File::open(path).map_err(|e| io_err(path, e))?;
        let mut last = None;
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|e| io_err(path, e))?;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| AuditError::Corrupt {
                path: path.display().to_string(),
                line: i + 1,
                reason: e.to_string(),
            })?;
            last = Some(v);
        }
        if let Some(v) = last {
            let seq = v["seq"].as_u64().unwrap_or(0);
            let hash = v["hash"].as_str().unwrap_or(GENESIS).to_string();
            return Ok((seq, hash));
        }
    }
    Ok((0, GENESIS.to_string()))
}

/// (seq, hash) of the last record in one file.
fn last_record_of(path: &Path) -> Result<(u64, String), AuditError> {
    let f = File::open(path).map_err(|e| io_err(path, e))?;
    let mut last = None;
    for line in BufReader::new(f).lines() {
        let line = line.map_err(|e| io_err(path, e))?;
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            last = Some((
                v["seq"].as_u64().unwrap_or(0),
                v["hash"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    last.ok_or_else(|| io_err(path, std::io::Error::other("no record in a rotated file")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{canonical, record_hash, AgentRef, CallerRecord};

    /// The one-pass line is exactly the canonical form of the record, and its hash is what
    /// `record_hash` (the verifier's) computes from the parsed line.
    #[test]
    fn built_line_is_canonical_and_hash_matches_the_verifier() {
        let dir = tempfile::tempdir().unwrap();
        let (head, _) = tokio::sync::watch::channel(Head {
            seq: 0,
            hash: GENESIS.into(),
            pruned_at: 0,
            first: 1,
        });
        let w = Writer {
            dir: dir.path().into(),
            file: None,
            size: 0,
            seq: 0,
            prev: GENESIS.into(),
            rotate_bytes: 1 << 20,
            keep_files: None,
            keep_bytes: None,
            head,
            anchored: Default::default(),
            pruned_at: 0,
            first: 1,
        };
        let events = [
            Event::new("daemon.started"),
            Event {
                event: "token.issued",
                agent: Some(AgentRef {
                    name: "a\"b\u{e9}".into(),
                    id: "spiffe://x/y".into(),
                }),
                caller: Some(CallerRecord {
                    pid: 7,
                    uid: 1000,
                    gid: 1000,
                    exe: Some("/usr/bin/\n".into()),
                    exe_sha256: None,
                    unit: Some("x.service".into()),
                    cgroup: None,
                }),
                details: json!({"z": [1, {"b": null, "a": "\u{1}"}], "jti": "j", "aud": 1.5}),
            },
        ];
        for ev in &events {
            let b = w.build(ev, 42, "prevhash");
            let parsed: Value = serde_json::from_str(&b.line).unwrap();
            assert_eq!(canonical(&parsed), b.line);
            assert_eq!(record_hash(&parsed), b.hash);
            assert_eq!(parsed["hash"], json!(b.hash));
            assert_eq!(parsed["seq"], json!(42));
            assert_eq!(canonical(&ev.details), b.line[b.details.clone()]);
        }
    }
}
