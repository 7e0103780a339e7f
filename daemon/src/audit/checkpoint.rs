//! The anchored head: signed checkpoints and the start-up check against the last one.
//!
//! A checkpoint is a compact JWS, header `{"alg":"ES256","typ":"tessera-checkpoint+jwt","kid":..}`,
//! payload `{"seq","hash","iat"}`: the host CA key vouches that record `seq` had hash `hash` at
//! `iat`. The chain makes that vouch for every record before it too, so rewriting any record up
//! to `seq` or removing records after it no longer passes unnoticed. The credentials part signs
//! them (this module never signs); the newest is kept in the registry and in
//! `<state>/audit/checkpoint.jws`. Records after it are *unanchored*: intact as a chain, but
//! nothing signed covers them yet.

use std::fs;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use serde_json::{json, Value};

use super::verify::files_in_order;
use super::{io_err, record_hash, AuditError};

pub const TYP: &str = "tessera-checkpoint+jwt";
/// The newest checkpoint, beside the trail.
pub const FILE: &str = "checkpoint.jws";

/// The last record of the trail: its seq and hash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
    /// Seq of the last `audit.pruned` this process wrote (0: none): the signer anchors it
    /// at once, so a verifier never sees retention it cannot vouch for.
    pub pruned_at: u64,
    /// Seq of the oldest record still in the trail (retention moves it).
    pub first: u64,
}

/// What a checkpoint says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    pub iat: i64,
    /// Seq of the oldest record kept when it was signed: removing older ones is retention
    /// only if a checkpoint vouched for it.
    #[serde(default = "one")]
    pub first: u64,
}

fn one() -> u64 {
    1
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("the checkpoint is not a compact JWS of type {TYP}: {0}")]
    Format(String),
    #[error("the checkpoint's signature does not verify with the given key")]
    Signature,
}

/// `base64url(header).base64url(payload)`; the caller signs SHA-256 of it.
pub fn signing_input(kid: &str, cp: &Checkpoint) -> String {
    let header = json!({"alg": "ES256", "typ": TYP, "kid": kid});
    let payload = json!({"seq": cp.seq, "hash": cp.hash, "iat": cp.iat, "first": cp.first});
    format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(payload.to_string())
    )
}

/// The `kid` in a checkpoint's header (which CA key signed it), if readable.
pub fn kid(jws: &str) -> Option<String> {
    let h = jws.trim().split('.').next()?;
    let header: Value = serde_json::from_slice(&B64.decode(h).ok()?).ok()?;
    header["kid"].as_str().map(str::to_string)
}

/// Read a checkpoint without checking its signature (what the daemon does with the copy in its
/// own registry; a relying check uses [`verify`]).
pub fn parse_unverified(jws: &str) -> Result<Checkpoint, CheckpointError> {
    parts(jws).map(|(cp, _, _)| cp)
}

/// Check a checkpoint's type and ES256 signature against `key`.
pub fn verify(jws: &str, key: &VerifyingKey) -> Result<Checkpoint, CheckpointError> {
    let (cp, input, sig) = parts(jws)?;
    key.verify(input.as_bytes(), &sig)
        .map_err(|_| CheckpointError::Signature)?;
    Ok(cp)
}

fn parts(jws: &str) -> Result<(Checkpoint, String, Signature), CheckpointError> {
    let bad = |m: &str| CheckpointError::Format(m.to_string());
    let mut it = jws.trim().split('.');
    let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(bad("expected three dot-separated parts"));
    };
    let decode = |part: &str| B64.decode(part).map_err(|_| bad("a part is not base64url"));
    let header: Value =
        serde_json::from_slice(&decode(h)?).map_err(|_| bad("the header is not JSON"))?;
    if header["alg"] != "ES256" || header["typ"] != TYP {
        return Err(bad("alg must be ES256 and typ tessera-checkpoint+jwt"));
    }
    let cp: Checkpoint = serde_json::from_slice(&decode(p)?)
        .map_err(|_| bad("the payload lacks seq, hash or iat"))?;
    if cp.seq == 0 {
        return Err(bad("seq must be at least 1"));
    }
    let sig = Signature::from_slice(&decode(s)?).map_err(|_| bad("not an ES256 signature"))?;
    Ok((cp, format!("{h}.{p}"), sig))
}

/// The newest checkpoint beside the trail in `dir`, if any.
pub fn read_file(dir: &Path) -> Result<Option<String>, AuditError> {
    let path = dir.join(FILE);
    match fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path, e)),
    }
}

/// Replace the checkpoint file whole (never a torn mix of two).
pub fn write_file(dir: &Path, jws: &str) -> Result<(), AuditError> {
    let path = dir.join(FILE);
    crate::durable::write_atomic(&path, format!("{jws}\n").as_bytes()).map_err(|e| io_err(&path, e))
}

/// Why start-up will not carry on writing the trail as it is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Tamper {
    /// First seq found wrong (or the checkpoint's seq when records are missing).
    pub seq: u64,
    pub reason: String,
}

/// Check the end of the trail in `dir` against the last checkpoint `anchor`: the record it
/// names is there with its hash, and every record after it is whole and chained. Without an
/// anchor only the last record and its link are checked. Reads back from the end, so the work
/// is the records since the anchor, not the trail. A complete record with a wrong hash is
/// tampering (a crash leaves an unparsable tail, which is left out via `current_len`); so is a
/// trail that ends before the anchor or lacks the anchored record (retention keeps it).
///
/// `current_len`: how much of the current file to consider (the rest is a torn tail about to
/// be set aside), so nothing is changed before the verdict.
pub fn check_tail(
    dir: &Path,
    anchor: Option<&Checkpoint>,
    current_len: Option<u64>,
) -> Result<Option<Tamper>, AuditError> {
    let tamper = |seq: u64, reason: String| Ok(Some(Tamper { seq, reason }));
    let files = files_in_order(dir)?;
    // Newest first, back to the anchor (or two records without one).
    let mut tail: Vec<Value> = Vec::new();
    'files: for path in files.iter().rev() {
        let mut data = fs::read(path).map_err(|e| io_err(path, e))?;
        if path.file_name() == Some(std::ffi::OsStr::new(super::CURRENT)) {
            if let Some(len) = current_len {
                data.truncate(len as usize);
            }
        }
        for line in data.split(|b| *b == b'\n').rev() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let Ok(v) = serde_json::from_slice::<Value>(line) else {
                let after = tail.last().and_then(|v| v["seq"].as_u64()).unwrap_or(0);
                return tamper(
                    after.saturating_sub(1),
                    format!(
                        "{}: a line before seq {after} is not a record",
                        path.display()
                    ),
                );
            };
            let seq = v["seq"].as_u64().unwrap_or(0);
            tail.push(v);
            match anchor {
                Some(a) if seq <= a.seq => break 'files,
                None if tail.len() >= 2 => break 'files,
                _ => {}
            }
        }
    }
    tail.reverse();
    let last_seq = tail.last().and_then(|v| v["seq"].as_u64()).unwrap_or(0);
    if let Some(a) = anchor {
        // The oldest record is where the checkpoint left it, or older: records removed
        // from the start since are not retention anyone vouched for.
        let oldest = match files.first() {
            Some(f) => super::verify::first_seq(f)?.unwrap_or(0),
            None => 0,
        };
        if oldest > a.first {
            return tamper(
                a.first,
                format!(
                    "the trail starts at seq {oldest} but the last checkpoint saw it start at seq {}: records were removed",
                    a.first
                ),
            );
        }
        if last_seq < a.seq {
            return tamper(
                a.seq,
                format!(
                    "the trail ends at seq {last_seq} but the last checkpoint covers seq {}: records were removed",
                    a.seq
                ),
            );
        }
        // Retention never removes the anchored record, so it must be here.
        match tail.first() {
            Some(first) if first["seq"].as_u64() == Some(a.seq) => {
                if first["hash"].as_str() != Some(a.hash.as_str()) {
                    return tamper(
                        a.seq,
                        format!(
                            "record seq {} is not the one the last checkpoint signed: the trail was rewritten",
                            a.seq
                        ),
                    );
                }
            }
            _ => {
                return tamper(
                    a.seq,
                    format!("record seq {} of the last checkpoint is missing", a.seq),
                )
            }
        }
    }
    for (i, v) in tail.iter().enumerate() {
        let seq = v["seq"].as_u64().unwrap_or(0);
        if v["hash"].as_str() != Some(record_hash(v).as_str()) {
            return tamper(
                seq,
                format!("record seq {seq} does not match its hash (edited)"),
            );
        }
        if let Some(prev) = i.checked_sub(1).map(|j| &tail[j]) {
            let before = prev["seq"].as_u64().unwrap_or(0);
            if before.checked_add(1) != Some(seq) || v["prev"] != prev["hash"] {
                return tamper(
                    seq,
                    format!("record seq {seq} does not follow seq {before} (records removed, reordered or inserted)"),
                );
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Audit, Event};
    use p256::ecdsa::signature::Signer;
    use p256::ecdsa::SigningKey;

    fn sign(sk: &SigningKey, cp: &Checkpoint) -> String {
        let input = signing_input("k", cp);
        let sig: Signature = sk.sign(input.as_bytes());
        format!("{input}.{}", B64.encode(sig.to_bytes()))
    }

    #[test]
    fn checkpoints_verify_only_with_their_key_and_type() {
        let sk = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let other = SigningKey::from_slice(&[8u8; 32]).unwrap();
        let cp = Checkpoint {
            seq: 9,
            hash: "ab".repeat(32),
            iat: 1,
            first: 1,
        };
        let jws = sign(&sk, &cp);
        assert_eq!(verify(&jws, sk.verifying_key()).unwrap(), cp);
        assert!(matches!(
            verify(&jws, other.verifying_key()),
            Err(CheckpointError::Signature)
        ));
        // Same signature over another type is not a checkpoint.
        let jwt = jws.replacen(
            &B64.encode(json!({"alg": "ES256", "typ": TYP, "kid": "k"}).to_string()),
            &B64.encode(json!({"alg": "ES256", "typ": "JWT", "kid": "k"}).to_string()),
            1,
        );
        assert!(matches!(
            parse_unverified(&jwt),
            Err(CheckpointError::Format(_))
        ));
        assert!(parse_unverified("a.b").is_err());
    }

    #[tokio::test]
    async fn tail_check_tells_a_crash_from_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = Audit::open(dir.path(), 1 << 20).unwrap();
        for i in 0..5 {
            a.record(Event::new("token.issued").details(json!({ "i": i })))
                .await
                .unwrap();
        }
        let head = a.head();
        a.close().await;
        let anchor = Checkpoint {
            seq: 3,
            hash: String::new(),
            iat: 0,
            first: 1,
        };
        let log = dir.path().join("audit.log");
        let text = fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let rec3: Value = serde_json::from_str(lines[2]).unwrap();
        let anchor = Checkpoint {
            hash: rec3["hash"].as_str().unwrap().to_string(),
            ..anchor
        };
        assert!(check_tail(dir.path(), Some(&anchor), None)
            .unwrap()
            .is_none());
        assert!(check_tail(dir.path(), None, None).unwrap().is_none());
        assert_eq!(head.seq, 5);
        // Cut after the anchor: still fine (a crash before the next checkpoint looks so).
        fs::write(&log, lines[..4].join("\n") + "\n").unwrap();
        assert!(check_tail(dir.path(), Some(&anchor), None)
            .unwrap()
            .is_none());
        // Cut before it: records removed.
        fs::write(&log, lines[..2].join("\n") + "\n").unwrap();
        let t = check_tail(dir.path(), Some(&anchor), None)
            .unwrap()
            .unwrap();
        assert!(t.reason.contains("removed"), "{}", t.reason);
        // An edited complete last line is tampering even without an anchor.
        let edited = lines[4].replace("\"i\":4", "\"i\":5");
        let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
        l[4] = edited;
        fs::write(&log, l.join("\n") + "\n").unwrap();
        let t = check_tail(dir.path(), None, None).unwrap().unwrap();
        assert_eq!(t.seq, 5);
        // Opening refuses it and leaves the file as it was; accepting leaves it too.
        let before = fs::read(&log).unwrap();
        let cfg = crate::audit::AuditConfig::default();
        assert!(matches!(
            Audit::open_with(dir.path(), &cfg, None, false),
            Err(AuditError::Tampered(_))
        ));
        assert_eq!(fs::read(&log).unwrap(), before);
        let (a, opened) = Audit::open_with(dir.path(), &cfg, None, true).unwrap();
        assert_eq!(opened.tamper_accepted.unwrap().seq, 5);
        assert!(opened.torn.is_none());
        a.close().await;
        assert_eq!(fs::read(&log).unwrap(), before);
    }
}
