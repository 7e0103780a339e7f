//! `tessera audit verify` on a trail someone may have edited: the lines as given (first byte
//! even) or re-chained here (odd: each line that is a JSON object gets the previous record's
//! hash as `prev` and its own `hash`) so that the sequence, retention and checkpoint checks
//! after the hash check are reached. The trail is checked alone, as a directory, and anchored
//! by a checkpoint signed here over one of its records.

#![no_main]

mod common;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tesserad::audit::{self, checkpoint, Checkpoint};

static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();

fn rechain(lines: &str) -> (String, Vec<(u64, String)>) {
    let mut out = String::new();
    let mut prev = audit::GENESIS.to_string();
    let mut heads = Vec::new();
    for line in lines.lines() {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(mut v) if v.is_object() => {
                v["prev"] = prev.clone().into();
                let h = audit::record_hash(&v);
                v["hash"] = h.clone().into();
                heads.push((v["seq"].as_u64().unwrap_or(0), h.clone()));
                prev = h;
                out.push_str(&v.to_string());
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    (out, heads)
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let dir = DIR.get_or_init(|| common::work_dir("audit"));
    let (trail, heads) = if pick & 1 == 1 {
        rechain(text)
    } else {
        (text.to_string(), Vec::new())
    };
    let file = dir.join("audit.log");
    std::fs::write(&file, &trail).expect("cannot write the trail");
    let alone = audit::verify(&file).expect("the file is there");
    let whole = audit::verify(dir).expect("the directory is there");
    if let Ok(s) = &whole {
        assert!(
            alone.is_ok(),
            "a trail that verifies as a directory fails alone: {s:?}"
        );
    }
    // A checkpoint over the record the input's last byte names.
    let last = rest.last().copied().unwrap_or(0) as usize;
    if let Some((seq, hash)) = heads.get(last % heads.len().max(1)) {
        let key = common::signing_key(5);
        let cp = Checkpoint {
            seq: (*seq).max(1),
            hash: hash.clone(),
            iat: 1_800_000_000,
            first: 1,
        };
        let jws = common::signed(&checkpoint::signing_input("k", &cp), key);
        let anchored = audit::verify_anchored(dir, &jws, key.verifying_key()).expect("readable");
        if anchored.is_ok() {
            assert!(whole.is_ok(), "an anchored trail that does not verify");
        }
    }
    for line in text.lines() {
        let _ = checkpoint::parse_unverified(line);
        let _ = checkpoint::kid(line);
    }
});
