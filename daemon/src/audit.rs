//! Append-only, hash-chained audit trail.
//!
//! Each record is one JSON line: `seq`, `time`, `event`, `agent`, `caller`, `details`, `prev`
//! and `hash`, where `hash` = hex SHA-256 of the record's canonical form without `hash`, and
//! `prev` = the previous record's `hash` (64 zeros for the first). Canonical form: JSON with
//! object keys sorted by byte order at every level, no insignificant whitespace, serde_json's
//! string escaping. Any edit, removal, reordering or insertion breaks the chain.
//!
//! Durability: [`Audit::record`] returns only after the record is written and `fdatasync`ed;
//! callers hand out nothing before that. One writer thread batches concurrent records into
//! one sync (group commit). A failed write is rolled back (truncate) so the chain never holds
//! a torn record, and the caller gets an error (the API answers 503).
//!
//! Files: `<state>/audit/audit.log` is current; past `rotate_bytes` it is renamed to
//! `audit-<first seq>.log` and the chain carries on in a new `audit.log`. A torn last line
//! found at start (crash mid-write) is moved aside to `torn-<time>.bin` and recorded.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::caller::Caller;

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const CURRENT: &str = "audit.log";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("audit writer has stopped")]
    Stopped,
    #[error("audit log {path} is unreadable at line {line}: {reason}")]
    Corrupt {
        path: String,
        line: usize,
        reason: String,
    },
}

fn io_err(path: &Path, source: std::io::Error) -> AuditError {
    AuditError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// JSON with keys sorted at every level, compact.
pub fn canonical(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                write_canonical(&m[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Hash of a record (the `hash` field, if present, is left out).
pub fn record_hash(record: &Value) -> String {
    let mut r = record.clone();
    if let Value::Object(m) = &mut r {
        m.remove("hash");
    }
    hex::encode(Sha256::digest(canonical(&r).as_bytes()))
}

/// Who an event is about.
#[derive(Debug, Clone)]
pub struct AgentRef {
    pub name: String,
    pub id: String,
}

/// One event to record.
#[derive(Debug, Clone)]
pub struct Event {
    pub event: &'static str,
    pub agent: Option<AgentRef>,
    pub caller: Option<Caller>,
    pub details: Value,
}

impl Event {
    pub fn new(event: &'static str) -> Event {
        Event {
            event,
            agent: None,
            caller: None,
            details: json!({}),
        }
    }
    pub fn agent(mut self, name: &str, id: &str) -> Event {
        self.agent = Some(AgentRef {
            name: name.into(),
            id: id.into(),
        });
        self
    }
    pub fn caller(mut self, c: &Caller) -> Event {
        self.caller = Some(c.clone());
        self
    }
    pub fn details(mut self, d: Value) -> Event {
        self.details = d;
        self
    }
}

type Job = (Event, oneshot::Sender<Result<u64, AuditError>>);

enum Msg {
    Record(Job),
    /// Write nothing more: the writer syncs, closes its file and ends.
    Close,
}

#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Msg>,
    /// The writer thread, joined once by [`Audit::close`].
    thread: std::sync::Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

struct Writer {
    dir: PathBuf,
    file: Option<File>,
    size: u64,
    seq: u64,
    prev: String,
    rotate_bytes: u64,
}

/// What start-up found at the end of the log after a crash.
#[derive(Debug, Clone)]
pub struct TornTail {
    pub bytes: u64,
    pub saved_to: PathBuf,
}

impl Audit {
    /// Open (or create) the audit trail in `dir` and start the writer thread.
    pub fn open(dir: &Path, rotate_bytes: u64) -> Result<(Audit, Option<TornTail>), AuditError> {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let torn = repair_tail(dir)?;
        let (seq, prev) = last_record(dir)?;
        let mut w = Writer {
            dir: dir.to_path_buf(),
            file: None,
            size: 0,
            seq,
            prev,
            rotate_bytes,
        };
        w.open_file()?;
        let (tx, mut rx) = mpsc::channel::<Msg>(4096);
        let thread = std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || {
                let mut closing = false;
                while let Some(Msg::Record(first)) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < 512 {
                        match rx.try_recv() {
                            Ok(Msg::Record(j)) => batch.push(j),
                            Ok(Msg::Close) => {
                                closing = true;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    w.write_batch(batch);
                    if closing {
                        break;
                    }
                }
                // Records sent after Close get `Stopped` when their reply senders drop.
                rx.close();
                if let Some(f) = w.file.take() {
                    let _ = f.sync_all();
                }
            })
            .map_err(|e| io_err(dir, e))?;
        let thread = std::sync::Arc::new(std::sync::Mutex::new(Some(thread)));
        Ok((Audit { tx, thread }, torn))
    }

    /// Record an event durably; returns its `seq` once it is on disk.
    pub async fn record(&self, ev: Event) -> Result<u64, AuditError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Record((ev, reply)))
            .await
            .map_err(|_| AuditError::Stopped)?;
        rx.await.map_err(|_| AuditError::Stopped)?
    }

    /// Write what is queued, close the file and join the writer thread. Later records fail
    /// with `Stopped`. Idempotent.
    pub async fn close(&self) {
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(handle) = handle else { return };
        let _ = self.tx.send(Msg::Close).await;
        let _ = tokio::task::spawn_blocking(move || handle.join()).await;
    }
}

impl Writer {
    fn current(&self) -> PathBuf {
        self.dir.join(CURRENT)
    }

    fn open_file(&mut self) -> Result<(), AuditError> {
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

    fn build(&self, ev: &Event, seq: u64, prev: &str) -> (Value, String) {
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut rec = Map::new();
        rec.insert("seq".into(), json!(seq));
        rec.insert("time".into(), json!(time));
        rec.insert("event".into(), json!(ev.event));
        rec.insert(
            "agent".into(),
            ev.agent
                .as_ref()
                .map(|a| json!({"name": a.name, "id": a.id}))
                .unwrap_or(Value::Null),
        );
        rec.insert(
            "caller".into(),
            ev.caller
                .as_ref()
                .and_then(|c| serde_json::to_value(c).ok())
                .unwrap_or(Value::Null),
        );
        rec.insert("details".into(), ev.details.clone());
        rec.insert("prev".into(), json!(prev));
        let mut rec = Value::Object(rec);
        let hash = record_hash(&rec);
        rec["hash"] = json!(hash);
        (rec, hash)
    }

    fn write_batch(&mut self, batch: Vec<Job>) {
        let mut buf = String::new();
        let mut seq = self.seq;
        let mut prev = self.prev.clone();
        let mut built = Vec::with_capacity(batch.len());
        for (ev, _) in &batch {
            seq += 1;
            let (rec, hash) = self.build(ev, seq, &prev);
            buf.push_str(&canonical(&rec));
            buf.push('\n');
            built.push(rec);
            prev = hash;
        }
        match self.append(buf.as_bytes()) {
            Ok(()) => {
                self.seq = seq;
                self.prev = prev;
                for rec in &built {
                    emit_trace(rec);
                }
                let first = self.seq + 1 - batch.len() as u64;
                for (i, (_, reply)) in batch.into_iter().enumerate() {
                    let _ = reply.send(Ok(first + i as u64));
                }
                if self.size >= self.rotate_bytes {
                    if let Err(e) = self.rotate() {
                        tracing::error!(error = %e, "audit rotation failed; continuing in the current file");
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
    fn append(&mut self, data: &[u8]) -> Result<(), AuditError> {
        if self.file.is_none() {
            self.open_file()?;
        }
        let path = self.current();
        let before = self.size;
        let f = self.file.as_mut().ok_or(AuditError::Stopped)?;
        let res = f.write_all(data).and_then(|()| f.sync_data());
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

    fn rotate(&mut self) -> Result<(), AuditError> {
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

fn emit_trace(rec: &Value) {
    tracing::info!(
        target: "tessera::audit",
        seq = rec["seq"].as_u64().unwrap_or(0),
        event = rec["event"].as_str().unwrap_or(""),
        agent = rec["agent"]["name"].as_str().unwrap_or(""),
        pid = rec["caller"]["pid"].as_i64().unwrap_or(0),
        uid = rec["caller"]["uid"].as_u64().unwrap_or(0),
        exe_sha256 = rec["caller"]["exe_sha256"].as_str().unwrap_or(""),
        jti = rec["details"]["jti"].as_str().unwrap_or(""),
        details = %rec["details"],
        "audit"
    );
}

fn first_seq(path: &Path) -> Result<Option<u64>, AuditError> {
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

/// Move a torn last line (no trailing newline, or not JSON) aside and truncate.
fn repair_tail(dir: &Path) -> Result<Option<TornTail>, AuditError> {
    let path = dir.join(CURRENT);
    let mut f = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path, e)),
    };
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(|e| io_err(&path, e))?;
    let mut good = data.len();
    loop {
        let body = &data[..good];
        if body.is_empty() {
            break;
        }
        if body.last() != Some(&b'\n') {
            good = body.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
            continue;
        }
        let start = body[..body.len() - 1]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |p| p + 1);
        let last = &body[start..body.len() - 1];
        match serde_json::from_slice::<Value>(last) {
            Ok(v) if v["hash"].as_str() == Some(record_hash(&v).as_str()) => break,
            // A complete-looking last line that does not hold together: torn too.
            _ => good = start,
        }
    }
    if good == data.len() {
        return Ok(None);
    }
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    let saved_to = dir.join(format!("torn-{stamp}.bin"));
    fs::write(&saved_to, &data[good..]).map_err(|e| io_err(&saved_to, e))?;
    f.set_len(good as u64).map_err(|e| io_err(&path, e))?;
    f.seek(SeekFrom::End(0)).map_err(|e| io_err(&path, e))?;
    f.sync_all().map_err(|e| io_err(&path, e))?;
    Ok(Some(TornTail {
        bytes: (data.len() - good) as u64,
        saved_to,
    }))
}

/// `(seq, hash)` of the last record in the chain, or `(0, GENESIS)`.
fn last_record(dir: &Path) -> Result<(u64, String), AuditError> {
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
    let files = if path.is_dir() {
        files_in_order(path)?
    } else {
        vec![path.to_path_buf()]
    };
    let mut prev: Option<String> = None;
    let mut expected_seq: Option<u64> = None;
    let mut records = 0u64;
    let mut first_seq = None;
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
                return Ok(Err(broken(
                    1,
                    format!("chain starts at seq {seq}, not 1 (records removed)"),
                )));
            }
            if v["prev"].as_str() != Some(want_prev.as_str()) && !first_of_partial {
                return Ok(Err(broken(
                    seq,
                    "prev does not match the previous record's hash (records removed, reordered or inserted)".into(),
                )));
            }
            first_seq.get_or_insert(seq);
            prev = v["hash"].as_str().map(str::to_string);
            expected_seq = Some(seq + 1);
            records += 1;
        }
    }
    Ok(Ok(Summary {
        files: files.len(),
        records,
        first_seq,
        last_seq: expected_seq.map(|s| s - 1),
        last_hash: prev.unwrap_or_else(|| GENESIS.to_string()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_sorts_keys_at_every_level() {
        let v = json!({"b": 1, "a": {"d": [2, {"z": 1, "y": "é\n"}], "c": null}});
        assert_eq!(
            canonical(&v),
            r#"{"a":{"c":null,"d":[2,{"y":"é\n","z":1}]},"b":1}"#
        );
    }

    #[tokio::test]
    async fn chain_survives_restart_and_rotation_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (a, torn) = Audit::open(dir.path(), 600).unwrap();
            assert!(torn.is_none());
            for i in 0..5 {
                assert_eq!(
                    a.record(Event::new("token.issued").details(json!({"i": i})))
                        .await
                        .unwrap(),
                    i + 1
                );
            }
        }
        assert!(files_in_order(dir.path()).unwrap().len() > 1, "rotated");
        // A torn tail as after a crash mid-write.
        let cur = dir.path().join(CURRENT);
        let mut f = OpenOptions::new().append(true).open(&cur).unwrap();
        f.write_all(b"{\"seq\":6,\"tim").unwrap();
        drop(f);
        let (a, torn) = Audit::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(torn.unwrap().bytes, 13);
        assert_eq!(a.record(Event::new("daemon.started")).await.unwrap(), 6);
        let s = verify(dir.path()).unwrap().unwrap();
        assert_eq!(s.records, 6);
        assert_eq!(s.last_seq, Some(6));
    }
}
