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
//! `audit-<first seq>.log` and the chain carries on in a new `audit.log`. An unparsable tail
//! found at start (crash mid-write) is moved aside to `torn-<time>.bin` and recorded. A
//! complete record that does not hold together, or a trail that no longer matches the last
//! signed checkpoint (`checkpoint`), is tampering: start-up refuses it unless the admin
//! accepts it, and then leaves it in place.
//!
//! Retention (`keep_files`, `keep_bytes`): after a rotation the oldest rotated files go, and
//! first an `audit.pruned` record names them with the seq and hash of the last record they
//! held, so the chain verifies from the oldest kept file and a file removed by anyone else
//! is still found.

//!
//! `writer`: the writer thread, rotation and start-up repair; `verify`: reading the chain back;
//! `checkpoint`: the signed head and the start-up check against it.

pub mod checkpoint;
mod verify;
mod writer;

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

pub use checkpoint::{Checkpoint, Head, Tamper};
pub use verify::{files_in_order, verify, verify_anchored, Anchored, Broken, Summary};
use writer::{find_torn, last_record, repair_tail, Writer};

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
    #[error("the audit trail was tampered with at seq {}: {}; start with --accept-audit-tamper to carry on (recorded in the trail)", .0.seq, .0.reason)]
    Tampered(Tamper),
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
    let mut out = Vec::with_capacity(512);
    write_canonical(v, &mut out);
    into_string(out)
}

/// Only JSON text is ever written into these buffers, which is UTF-8.
pub(crate) fn into_string(out: Vec<u8>) -> String {
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A JSON string or scalar, compact, exactly as serde_json writes it.
pub(crate) fn write_json<T: serde::Serialize + ?Sized>(v: &T, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail, and these values are always serialisable.
    let _ = serde_json::to_writer(&mut *out, v);
}

pub(crate) fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            out.push(b'{');
            // serde_json's map is sorted already unless `preserve_order` is on somewhere in
            // the build: sort only when it is not (the hash must never depend on that).
            if m.keys().is_sorted() {
                for (i, (k, x)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_json(k, out);
                    out.push(b':');
                    write_canonical(x, out);
                }
            } else {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_json(*k, out);
                    out.push(b':');
                    write_canonical(&m[k.as_str()], out);
                }
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(x, out);
            }
            out.push(b']');
        }
        other => write_json(other, out),
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

/// Longest client-supplied string kept whole in a record.
pub const MAX_CLIENT_TEXT: usize = 256;

/// Client-supplied text as a record keeps it: whole when short, else its first
/// [`MAX_CLIENT_TEXT`] bytes with its length and SHA-256, so a flood of large requests cannot
/// grow the trail by their size while each one stays identifiable.
pub fn client_text(s: &str) -> Value {
    if s.len() <= MAX_CLIENT_TEXT {
        return Value::String(s.to_string());
    }
    let mut end = MAX_CLIENT_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    json!({
        "prefix": &s[..end],
        "len": s.len(),
        "sha256": hex::encode(Sha256::digest(s.as_bytes())),
    })
}

/// [`client_text`] applied to every string in a client-supplied JSON value (and at most
/// [`MAX_CLIENT_TEXT`] array items or object members, the rest counted).
pub fn client_value(v: &Value) -> Value {
    match v {
        Value::String(s) => client_text(s),
        Value::Array(a) => {
            let mut out: Vec<Value> = a
                .iter()
                .take(MAX_CLIENT_TEXT / 8)
                .map(client_value)
                .collect();
            if a.len() > MAX_CLIENT_TEXT / 8 {
                out.push(json!({"more_items": a.len() - MAX_CLIENT_TEXT / 8}));
            }
            Value::Array(out)
        }
        Value::Object(m) => Value::Object(
            m.iter()
                .take(MAX_CLIENT_TEXT / 8)
                .map(|(k, v)| {
                    let k = match client_text(k) {
                        Value::String(k) => k,
                        other => other.to_string(),
                    };
                    (k, client_value(v))
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Who an event is about.
#[derive(Debug, Clone)]
pub struct AgentRef {
    pub name: String,
    pub id: String,
}

/// `[audit]` settings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Rotate the audit file once it grows past this many bytes.
    #[serde(default = "default_rotate_bytes")]
    pub rotate_bytes: u64,
    /// Rotated files kept at most; the oldest go first (unlimited when unset).
    #[serde(default)]
    pub keep_files: Option<usize>,
    /// Bytes of audit files kept at most, the current file included; the oldest rotated files
    /// go first (unlimited when unset).
    #[serde(default)]
    pub keep_bytes: Option<u64>,
    /// A signed checkpoint after this many records ...
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// ... or this long after the last one, whichever comes first (and at every stop).
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: crate::duration::Dur,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            rotate_bytes: default_rotate_bytes(),
            keep_files: None,
            keep_bytes: None,
            checkpoint_every: default_checkpoint_every(),
            checkpoint_interval: default_checkpoint_interval(),
        }
    }
}

fn default_checkpoint_every() -> u64 {
    1000
}

fn default_checkpoint_interval() -> crate::duration::Dur {
    crate::duration::Dur(std::time::Duration::from_secs(300))
}

fn default_rotate_bytes() -> u64 {
    64 * 1024 * 1024
}

/// The process a record is about, as the kernel described it (the audit's own plain type:
/// it knows nothing of how callers are identified).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CallerRecord {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub exe: Option<String>,
    pub exe_sha256: Option<String>,
    pub unit: Option<String>,
    pub cgroup: Option<String>,
}

/// One event to record.
#[derive(Debug, Clone)]
pub struct Event {
    pub event: &'static str,
    pub agent: Option<AgentRef>,
    pub caller: Option<CallerRecord>,
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
    pub fn caller(mut self, c: CallerRecord) -> Event {
        self.caller = Some(c);
        self
    }
    pub fn details(mut self, d: Value) -> Event {
        self.details = d;
        self
    }
}

type Job = (Event, oneshot::Sender<Result<u64, AuditError>>);

// Records are moved through the channel as before; boxing them would add an allocation per
// record to spare the rare `Close` some bytes.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Record(Job),
    /// Write nothing more: the writer syncs, closes its file and ends.
    Close,
}

#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Msg>,
    head: tokio::sync::watch::Receiver<Head>,
    /// Seq of the newest signed checkpoint (retention keeps it).
    anchored: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The writer thread, joined once by [`Audit::close`].
    thread: std::sync::Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// What start-up found at the end of the log after a crash.
#[derive(Debug, Clone)]
pub struct TornTail {
    pub bytes: u64,
    pub saved_to: PathBuf,
}

/// What opening the trail found, for the runtime to record once the writer runs.
#[derive(Debug, Default)]
pub struct Opened {
    /// An unparsable tail left by a crash, set aside.
    pub torn: Option<TornTail>,
    /// Tampering an admin accepted with `--accept-audit-tamper`.
    pub tamper_accepted: Option<Tamper>,
}

impl Audit {
    /// Open (or create) the audit trail in `dir` and start the writer thread.
    pub fn open(dir: &Path, rotate_bytes: u64) -> Result<(Audit, Option<TornTail>), AuditError> {
        let cfg = AuditConfig {
            rotate_bytes,
            ..AuditConfig::default()
        };
        Self::open_with(dir, &cfg, None, false).map(|(a, o)| (a, o.torn))
    }

    /// [`Audit::open`] with retention, checked against the last checkpoint `anchor`: an
    /// unparsable tail (a crash mid-write) is set aside; tampering found at the end of the
    /// trail or against the anchor is refused ([`AuditError::Tampered`], nothing written)
    /// unless `accept_tamper`, in which case the trail is left as found and the caller
    /// records what was accepted.
    pub fn open_with(
        dir: &Path,
        cfg: &AuditConfig,
        anchor: Option<&Checkpoint>,
        accept_tamper: bool,
    ) -> Result<(Audit, Opened), AuditError> {
        let rotate_bytes = cfg.rotate_bytes;
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        // The verdict first, on the trail as it would be without its torn tail; nothing is
        // changed when start-up is refused.
        let torn = find_torn(dir)?;
        let tamper = checkpoint::check_tail(dir, anchor, torn.map(|(good, _)| good))?;
        let tamper_accepted = match tamper {
            Some(t) if !accept_tamper => return Err(AuditError::Tampered(t)),
            t => t,
        };
        let torn = match torn {
            Some((good, _)) => Some(repair_tail(dir, good)?),
            None => None,
        };
        let (seq, prev) = last_record(dir)?;
        let first = match files_in_order(dir)?.first() {
            Some(f) => verify::first_seq(f)?.unwrap_or(1),
            None => 1,
        };
        let (head_tx, head) = tokio::sync::watch::channel(Head {
            seq,
            hash: prev.clone(),
            pruned_at: 0,
            first,
        });
        let anchored = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
            anchor.map_or(0, |a| a.seq),
        ));
        let mut w = Writer {
            dir: dir.to_path_buf(),
            file: None,
            size: 0,
            seq,
            prev,
            rotate_bytes,
            keep_files: cfg.keep_files,
            keep_bytes: cfg.keep_bytes,
            head: head_tx,
            anchored: anchored.clone(),
            pruned_at: 0,
            first,
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
        Ok((
            Audit {
                tx,
                head,
                anchored,
                thread,
            },
            Opened {
                torn,
                tamper_accepted,
            },
        ))
    }

    /// The last durable record.
    pub fn head(&self) -> Head {
        self.head.borrow().clone()
    }

    /// A checkpoint now covers `seq`: retention keeps the file that holds it.
    pub fn set_anchored(&self, seq: u64) {
        self.anchored
            .store(seq, std::sync::atomic::Ordering::SeqCst);
    }

    /// Changes of [`Audit::head`], for the checkpoint signer.
    pub fn watch_head(&self) -> tokio::sync::watch::Receiver<Head> {
        self.head.clone()
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

    /// Record an event whose action has already happened: a failure to record is logged,
    /// not returned (hiding the action would be worse than a gap, which verify reports).
    pub async fn record_or_log(&self, ev: Event, what: &str) {
        if let Err(e) = self.record(ev).await {
            tracing::error!(error = %e, "could not audit {what}");
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::io::Write;

    #[test]
    fn canonical_sorts_keys_at_every_level() {
        let v = json!({"b": 1, "a": {"d": [2, {"z": 1, "y": "é\n"}], "c": null}});
        assert_eq!(
            canonical(&v),
            r#"{"a":{"c":null,"d":[2,{"y":"é\n","z":1}]},"b":1}"#
        );
    }

    #[tokio::test]
    async fn retention_keeps_a_verifiable_chain_and_removal_is_still_caught() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig {
            rotate_bytes: 600,
            keep_files: Some(2),
            ..AuditConfig::default()
        };
        let (a, _) = Audit::open_with(dir.path(), &cfg, None, false).unwrap();
        for i in 0..40 {
            a.record(Event::new("token.issued").details(json!({"i": i})))
                .await
                .unwrap();
        }
        a.close().await;
        let files = files_in_order(dir.path()).unwrap();
        assert!(files.len() <= 3, "{files:?}");
        let s = verify(dir.path())
            .unwrap()
            .expect("verifies from the oldest kept file");
        assert!(s.first_seq.unwrap() > 1);
        assert_eq!(s.last_seq, Some(s.first_seq.unwrap() + s.records - 1));
        // Someone else removing the oldest kept file is not retention.
        fs::remove_file(&files[0]).unwrap();
        let broken = verify(dir.path())
            .unwrap()
            .expect_err("a removed file is found");
        assert!(
            broken.reason.contains("records removed"),
            "{}",
            broken.reason
        );
    }

    #[test]
    fn client_text_is_capped_with_length_and_hash() {
        assert_eq!(client_text("short"), json!("short"));
        let long = "é".repeat(1000);
        let v = client_text(&long);
        assert_eq!(v["len"], 2000);
        assert!(v["prefix"].as_str().unwrap().len() <= MAX_CLIENT_TEXT);
        assert_eq!(v["sha256"].as_str().unwrap().len(), 64);
        let big = json!({"audience": "x".repeat(5000), "scopes": vec!["s"; 500]});
        assert!(canonical(&client_value(&big)).len() < 2000);
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
