//! Key stores on real devices (swtpm, SoftHSM), each driven in its own process by `ksprobe`.

use std::path::Path;
use std::process::Command;

use p256::ecdsa::{signature::hazmat::PrehashVerifier, Signature, VerifyingKey};
use rand::seq::SliceRandom;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tessera_e2e::devices::write_config;
use tessera_e2e::{shared_tempdir, Backend};

fn probe(backend: &Backend, cfg: &Path, ops: &[String]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_ksprobe"))
        .arg(cfg)
        .args(ops)
        .envs(backend.envs())
        .output()
        .expect("run ksprobe");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("probe output is JSON"))
        .collect()
}

fn vk(v: &Value) -> VerifyingKey {
    VerifyingKey::from_sec1_bytes(&hex::decode(v["public"].as_str().expect("public")).unwrap())
        .unwrap()
}

fn check_sig(key: &VerifyingKey, digest: &[u8; 32], v: &Value) {
    let sig =
        Signature::from_slice(&hex::decode(v["signature"].as_str().expect("signature")).unwrap())
            .unwrap();
    key.verify_prehash(digest, &sig)
        .expect("signature verifies with p256");
    assert!(sig.normalize_s().is_none(), "signature is low-S");
}

fn ten_keys_sign_shuffled_and_survive_restart(backend: Backend) {
    let state = shared_tempdir();
    let cfg = write_config(&backend, state.path(), "");
    let ids: Vec<String> = (0..10).map(|i| format!("agent-test{i:02}")).collect();
    let created = probe(
        &backend,
        &cfg,
        &ids.iter()
            .map(|i| format!("create:{i}"))
            .collect::<Vec<_>>(),
    );
    assert_eq!(created.len(), 10, "{created:?}");
    let keys: Vec<VerifyingKey> = created.iter().map(vk).collect();

    // Sign in shuffled order, twice over, so the TPM's LRU must load and flush.
    let mut order: Vec<usize> = (0..10).chain(0..10).collect();
    order.shuffle(&mut rand::thread_rng());
    let digests: Vec<[u8; 32]> = order
        .iter()
        .map(|i| Sha256::digest(format!("msg {i}")).into())
        .collect();
    let ops: Vec<String> = order
        .iter()
        .zip(&digests)
        .map(|(i, d)| format!("sign:{}:{}", ids[*i], hex::encode(d)))
        .collect();
    let sigs = probe(&backend, &cfg, &ops);
    assert_eq!(sigs.len(), ops.len(), "{sigs:?}");
    for ((i, d), s) in order.iter().zip(&digests).zip(&sigs) {
        check_sig(&keys[*i], d, s);
    }

    // A fresh process, same state: same public keys, still signing.
    let again = probe(
        &backend,
        &cfg,
        &ids.iter()
            .map(|i| format!("public:{i}"))
            .collect::<Vec<_>>(),
    );
    for (k, v) in keys.iter().zip(&again) {
        assert_eq!(k, &vk(v));
    }
    let d: [u8; 32] = Sha256::digest(b"after restart").into();
    let s = probe(
        &backend,
        &cfg,
        &[format!("sign:{}:{}", ids[7], hex::encode(d))],
    );
    check_sig(&keys[7], &d, &s[0]);
    let listed = probe(&backend, &cfg, &["list".into()]);
    let listed: Vec<String> = serde_json::from_value(listed[0]["ids"].clone()).unwrap();
    assert_eq!(listed, ids);
}

tessera_e2e::both_backends!(ten_keys_sign_shuffled_and_survive_restart);

fn destroy_is_final(backend: Backend) -> (tempfile::TempDir, Backend) {
    let state = shared_tempdir();
    let cfg = write_config(&backend, state.path(), "");
    let created = probe(
        &backend,
        &cfg,
        &["create:agent-a".into(), "create:agent-b".into()],
    );
    let b = vk(&created[1]);
    let d: [u8; 32] = Sha256::digest(b"x").into();
    let out = probe(
        &backend,
        &cfg,
        &[
            "destroy:agent-a".into(),
            format!("sign:agent-a:{}", hex::encode(d)),
            format!("sign:agent-b:{}", hex::encode(d)),
            "destroy:agent-a".into(),
            "list".into(),
        ],
    );
    assert!(out[0].get("error").is_none(), "{out:?}");
    assert_eq!(out[1]["error"], "key-not-found", "{out:?}");
    check_sig(&b, &d, &out[2]);
    assert_eq!(out[3]["error"], "key-not-found", "destroy twice: {out:?}");
    assert_eq!(out[4]["ids"], serde_json::json!(["agent-b"]));
    // Creating an id that exists is refused, never overwritten.
    let dup = probe(&backend, &cfg, &["create:agent-b".into()]);
    assert_eq!(dup[0]["error"], "key-exists");
    (state, backend)
}

#[test]
fn tpm_destroy_removes_blob_and_other_keys_still_sign() {
    let (state, _b) = destroy_is_final(Backend::tpm());
    let keys = state.path().join("tpm/keys");
    assert!(!keys.join("agent-a.priv").exists() && !keys.join("agent-a.pub").exists());
    assert!(keys.join("agent-b.priv").exists());
}

#[test]
fn pkcs11_destroy_removes_object_and_other_keys_still_sign() {
    let (_state, backend) = destroy_is_final(Backend::pkcs11());
    let Backend::Pkcs11(hsm) = &backend else {
        unreachable!()
    };
    let out = hsm.pkcs11_tool(&["-O"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{listing}");
    assert!(!listing.contains("tessera:agent-a"), "{listing}");
    assert!(listing.contains("tessera:agent-b"), "{listing}");
}

#[test]
fn tpm_keys_are_fixed_and_sign_only_per_tpm2_print() {
    let backend = Backend::tpm();
    let state = shared_tempdir();
    let cfg = write_config(&backend, state.path(), "");
    probe(&backend, &cfg, &["create:agent-attrs".into()]);
    let blob = state.path().join("tpm/keys/agent-attrs.pub");
    let out = Command::new("tpm2_print")
        .args(["-t", "TPM2B_PUBLIC"])
        .arg(&blob)
        .output()
        .expect("tpm2_print (tpm2-tools)");
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "attributes:\n  value: fixedtpm|fixedparent|..."
    let attrs_line = text
        .lines()
        .skip_while(|l| !l.starts_with("attributes:"))
        .nth(1)
        .expect("attributes in tpm2_print output");
    let attrs: Vec<&str> = attrs_line
        .trim()
        .trim_start_matches("value:")
        .trim()
        .split('|')
        .collect();
    for attr in ["fixedtpm", "fixedparent", "sensitivedataorigin", "sign"] {
        assert!(attrs.contains(&attr), "{attr} missing in: {attrs_line}");
    }
    assert!(
        !attrs.contains(&"decrypt"),
        "key must not decrypt: {attrs_line}"
    );
    assert!(!attrs.contains(&"restricted"), "{attrs_line}");
    assert!(text.contains("nist p256"), "{text}");

    // And loaded in the TPM itself: tpm2_loadexternal is not enough; read back through tss-esapi
    // in a fresh process (the probe) that must report the same public key.
    let again = probe(&backend, &cfg, &["public:agent-attrs".into()]);
    assert!(again[0].get("public").is_some(), "{again:?}");
}

#[test]
fn pkcs11_keys_are_sensitive_and_never_extractable_per_pkcs11_tool() {
    let backend = Backend::pkcs11();
    let state = shared_tempdir();
    let cfg = write_config(&backend, state.path(), "");
    probe(&backend, &cfg, &["create:agent-attrs".into()]);
    let Backend::Pkcs11(hsm) = &backend else {
        unreachable!()
    };
    let out = hsm.pkcs11_tool(&["-O", "--type", "privkey"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(listing.contains("tessera:agent-attrs"), "{listing}");
    let block = listing
        .split("Private Key Object")
        .find(|b| b.contains("tessera:agent-attrs"))
        .unwrap();
    assert!(block.contains("sensitive"), "{block}");
    assert!(block.contains("never extractable"), "{block}");
    assert!(block.contains("sign"), "{block}");
    assert!(!block.contains("decrypt"), "{block}");
    // Reading the private value (CKA_VALUE) is refused by the token itself.
    let out = Command::new(env!("CARGO_BIN_EXE_ksprobe"))
        .args([
            "read-value",
            tessera_e2e::devices::SOFTHSM_MODULE,
            "tessera",
            tessera_e2e::devices::USER_PIN,
        ])
        .arg("tessera:agent-attrs")
        .envs(backend.envs())
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).expect("read-value output");
    assert_eq!(v["value_info"], "sensitive", "{v}");
    assert_eq!(v["values_returned"], 0, "CKA_VALUE came back: {v}");
}

fn open_error(backend: &Backend, cfg: &Path) -> Value {
    let out = probe(backend, cfg, &["list".into()]);
    out.into_iter().next().expect("probe printed something")
}

#[test]
fn bad_setup_gives_typed_errors() {
    // Wrong PIN.
    let backend = Backend::pkcs11();
    let state = shared_tempdir();
    let cfg = write_config(&backend, state.path(), "");
    let Backend::Pkcs11(hsm) = &backend else {
        unreachable!()
    };
    std::fs::write(&hsm.pin_file, "00000000").unwrap();
    assert_eq!(open_error(&backend, &cfg)["error"], "wrong-pin");
    // Unknown token label.
    std::fs::write(&hsm.pin_file, tessera_e2e::devices::USER_PIN).unwrap();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("token_label = \"tessera\"", "token_label = \"nope\"");
    std::fs::write(&cfg, text).unwrap();
    let e = open_error(&backend, &cfg);
    assert_eq!(e["error"], "token-not-found");
    assert!(e["message"].as_str().unwrap().contains("nope"));
    // A TCTI that points nowhere.
    let text = format!(
        "state_dir = \"{}\"\n[backend]\nkind = \"tpm\"\ntcti = \"swtpm:host=127.0.0.1,port=1\"\n",
        state.path().display()
    );
    std::fs::write(&cfg, text).unwrap();
    assert_eq!(open_error(&backend, &cfg)["error"], "device-unavailable");
}

/// The TPM holds few objects (swtpm: three, one of them the primary): fifty keys signed in
/// random order, twice over, all through an LRU of two loaded keys, each signature checked.
#[test]
fn tpm_fifty_keys_sign_correctly_through_two_loaded_slots() {
    let backend = Backend::tpm();
    let state = shared_tempdir();
    let cfg = write_config(&backend, state.path(), "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("kind = \"tpm\"\n", "kind = \"tpm\"\nmax_loaded_keys = 2\n"),
    )
    .unwrap();
    let ids: Vec<String> = (0..50).map(|i| format!("agent-lru{i:02}")).collect();
    let mut ops: Vec<String> = ids.iter().map(|i| format!("create:{i}")).collect();
    let mut order: Vec<usize> = (0..50).chain(0..50).collect();
    order.shuffle(&mut rand::thread_rng());
    let digests: Vec<[u8; 32]> = order
        .iter()
        .enumerate()
        .map(|(n, i)| Sha256::digest(format!("msg {n} {i}")).into())
        .collect();
    ops.extend(
        order
            .iter()
            .zip(&digests)
            .map(|(i, d)| format!("sign:{}:{}", ids[*i], hex::encode(d))),
    );
    // Keys evicted are kept as saved contexts: destroying one must leave nothing that signs.
    let victim = order
        .iter()
        .find(|i| !order[order.len() - 3..].contains(i))
        .copied()
        .unwrap();
    let d: [u8; 32] = Sha256::digest(b"after destroy").into();
    ops.push(format!("destroy:{}", ids[victim]));
    ops.push(format!("sign:{}:{}", ids[victim], hex::encode(d)));
    // One process: creations and signatures share one LRU.
    let out = probe(&backend, &cfg, &ops);
    assert_eq!(out.len(), ops.len(), "{:?}", out.last());
    let keys: Vec<VerifyingKey> = out[..50].iter().map(vk).collect();
    for ((i, d), s) in order.iter().zip(&digests).zip(&out[50..150]) {
        check_sig(&keys[*i], d, s);
    }
    assert!(out[150].get("error").is_none(), "{:?}", out[150]);
    assert_eq!(out[151]["error"], "key-not-found", "{:?}", out[151]);
}

/// Handles cached per key (PKCS#11) or loaded (TPM) are forgotten on destroy: a key made
/// again under the same id signs with the new key, never the old handle's.
fn destroyed_then_recreated_key_signs_with_the_new_key(backend: Backend) {
    let state = shared_tempdir();
    let cfg = write_config(&backend, state.path(), "");
    let d: [u8; 32] = Sha256::digest(b"again").into();
    // Twice: searching the token, then with a store that enumerated it first (`list`, as the
    // daemon does at start) and answers from what it knows.
    for (round, first) in [(0, None), (1, Some("list"))] {
        let id = format!("agent-again{round}");
        let sign = format!("sign:{id}:{}", hex::encode(d));
        let mut ops: Vec<String> = first.into_iter().map(String::from).collect();
        ops.extend([
            format!("create:{id}"),
            sign.clone(),
            format!("destroy:{id}"),
            sign.clone(),
            format!("public:{id}"),
            format!("destroy:{id}"),
            format!("create:{id}"),
            sign.clone(),
            format!("create:{id}"),
            format!("public:{id}"),
        ]);
        let out = probe(&backend, &cfg, &ops);
        let out = &out[first.is_some() as usize..];
        assert_eq!(out.len(), 10, "{out:?}");
        check_sig(&vk(&out[0]), &d, &out[1]);
        assert!(out[2].get("error").is_none(), "{out:?}");
        assert_eq!(out[3]["error"], "key-not-found", "{out:?}");
        assert_eq!(out[4]["error"], "key-not-found", "{out:?}");
        assert_eq!(out[5]["error"], "key-not-found", "{out:?}");
        let new = vk(&out[6]);
        assert_ne!(new, vk(&out[0]));
        check_sig(&new, &d, &out[7]);
        assert_eq!(out[8]["error"], "key-exists", "{out:?}");
        assert_eq!(vk(&out[9]), new);
    }
}

tessera_e2e::both_backends!(destroyed_then_recreated_key_signs_with_the_new_key);

/// Another application (pkcs11-tool) deletes a key the store has a cached handle for: the
/// next signature is refused as key-not-found, never made with the stale handle.
#[test]
fn pkcs11_key_destroyed_behind_the_stores_back_is_reported() {
    use std::io::{BufRead, BufReader, Write};
    let backend = Backend::pkcs11();
    let state = shared_tempdir();
    let cfg = write_config(&backend, state.path(), "");
    let d: [u8; 32] = Sha256::digest(b"stale").into();
    let sign = format!("sign:agent-stale:{}", hex::encode(d));
    let mut child = Command::new(env!("CARGO_BIN_EXE_ksprobe"))
        .arg(&cfg)
        .args([
            "create:agent-stale",
            "create:agent-other",
            &sign,
            "on:1",
            &sign,
            "on:0",
            "pause",
            &sign,
            "on:1",
            &sign,
            "list",
        ])
        .envs(backend.envs())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run ksprobe");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || -> Value {
        serde_json::from_str(&lines.next().expect("a line").expect("read")).expect("JSON")
    };
    let key = vk(&next());
    next();
    check_sig(&key, &d, &next());
    next();
    // The second session signs with the handle the first one cached.
    check_sig(&key, &d, &next());
    next();
    let Backend::Pkcs11(hsm) = &backend else {
        unreachable!()
    };
    let out = hsm.pkcs11_tool(&[
        "--delete-object",
        "--type",
        "privkey",
        "--label",
        "tessera:agent-stale",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(next()["op"], "pause");
    let after = next();
    assert_eq!(after["error"], "key-not-found", "{after}");
    next();
    let after = next();
    assert_eq!(after["error"], "key-not-found", "{after}");
    // The public half is still there (only the private key was deleted), the other key too.
    let listed = next();
    assert_eq!(
        listed["ids"],
        serde_json::json!(["agent-other", "agent-stale"])
    );
    assert!(child.wait().unwrap().success());
}

/// Sessions of one store share the handle cache: a key destroyed through one session is
/// gone for every other.
#[test]
fn pkcs11_sessions_share_one_handle_cache() {
    let backend = Backend::pkcs11();
    let state = shared_tempdir();
    let cfg = write_config(&backend, state.path(), "");
    let d: [u8; 32] = Sha256::digest(b"shared").into();
    let sign = format!("sign:agent-shared:{}", hex::encode(d));
    let out = probe(
        &backend,
        &cfg,
        &[
            "create:agent-shared".into(),
            "on:2".into(),
            sign.clone(),
            "on:0".into(),
            "destroy:agent-shared".into(),
            "on:2".into(),
            sign.clone(),
            "on:1".into(),
            sign.clone(),
        ],
    );
    assert_eq!(out.len(), 9, "{out:?}");
    check_sig(&vk(&out[0]), &d, &out[2]);
    assert!(out[4].get("error").is_none(), "{out:?}");
    assert_eq!(out[6]["error"], "key-not-found", "{out:?}");
    assert_eq!(out[8]["error"], "key-not-found", "{out:?}");
}

/// A key whose blobs vanished behind the store's back while it was loaded: destroy reports it
/// not found, and it must not sign afterwards from the TPM object still loaded.
#[test]
fn tpm_key_with_vanished_blobs_cannot_sign_after_destroy() {
    use std::io::{BufRead, BufReader, Write};
    let backend = Backend::tpm();
    let state = shared_tempdir();
    let cfg = write_config(&backend, state.path(), "");
    let d: [u8; 32] = Sha256::digest(b"vanished").into();
    let sign = format!("sign:agent-vanish:{}", hex::encode(d));
    let mut child = Command::new(env!("CARGO_BIN_EXE_ksprobe"))
        .arg(&cfg)
        .args([
            "create:agent-vanish",
            &sign,
            "pause",
            "destroy:agent-vanish",
            &sign,
        ])
        .envs(backend.envs())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run ksprobe");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || -> Value {
        serde_json::from_str(&lines.next().expect("a line").expect("read")).expect("JSON")
    };
    let key = vk(&next());
    check_sig(&key, &d, &next());
    let keys = state.path().join("tpm").join("keys");
    for ext in ["pub", "priv"] {
        std::fs::remove_file(keys.join(format!("agent-vanish.{ext}"))).unwrap();
    }
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(next()["op"], "pause");
    assert_eq!(next()["error"], "key-not-found");
    let after = next();
    assert_eq!(
        after["error"], "key-not-found",
        "signed after destroy: {after}"
    );
    assert!(child.wait().unwrap().success());
}

/// After a stale handle the store must not take the key for absent: its other half is still on
/// the token, and destroy removes it instead of answering "not found" from memory.
#[test]
fn pkcs11_destroy_after_a_stale_handle_removes_what_is_left() {
    use std::io::{BufRead, BufReader, Write};
    let backend = Backend::pkcs11();
    let state = shared_tempdir();
    let cfg = write_config(&backend, state.path(), "");
    let d: [u8; 32] = Sha256::digest(b"half").into();
    let sign = format!("sign:agent-half:{}", hex::encode(d));
    let mut child = Command::new(env!("CARGO_BIN_EXE_ksprobe"))
        .arg(&cfg)
        .args([
            "list",
            "create:agent-half",
            &sign,
            "pause",
            &sign,
            "destroy:agent-half",
            "list",
        ])
        .envs(backend.envs())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run ksprobe");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || -> Value {
        serde_json::from_str(&lines.next().expect("a line").expect("read")).expect("JSON")
    };
    next();
    let key = vk(&next());
    check_sig(&key, &d, &next());
    let Backend::Pkcs11(hsm) = &backend else {
        unreachable!()
    };
    let out = hsm.pkcs11_tool(&[
        "--delete-object",
        "--type",
        "privkey",
        "--label",
        "tessera:agent-half",
    ]);
    assert!(out.status.success());
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(next()["op"], "pause");
    assert_eq!(next()["error"], "key-not-found");
    let destroyed = next();
    assert!(destroyed.get("error").is_none(), "{destroyed}");
    assert_eq!(next()["ids"], serde_json::json!([]));
    assert!(child.wait().unwrap().success());
}
