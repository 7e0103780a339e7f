//! Test helper: drives a real key store (from a tesserad config) in its own process, so tests
//! can give each store its own SOFTHSM2_CONF and prove keys survive a process restart.
//! Usage: ksprobe CONFIG OP...   with OP one of create:ID public:ID sign:ID:HEXDIGEST destroy:ID list,
//! `pause` (waits for a line on stdin, so a test can act on the device between two ops) and
//! `on:N` (later ops go to session N: 0 is the store opened, others are its `worker()`s).
//! Prints one JSON line per OP.

use std::path::Path;

use serde_json::json;
use tesserad::keystore::{self, KeyStore};
use tesserad::runtime::config::Config;

fn main() {
    if std::env::args().nth(1).as_deref() == Some("read-value") {
        return read_value();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cfg_path, ops)) = args.split_first() else {
        eprintln!("usage: ksprobe CONFIG OP...");
        std::process::exit(2);
    };
    let cfg = match Config::load(Path::new(cfg_path)) {
        Ok(c) => c,
        Err(e) => {
            println!(
                "{}",
                json!({"op": "open", "error": "config", "message": e.to_string()})
            );
            std::process::exit(1);
        }
    };
    let mut store = match keystore::open(&cfg.backend, &cfg.state_dir) {
        Ok(s) => s,
        Err(e) => {
            println!(
                "{}",
                json!({"op": "open", "error": e.kind(), "message": e.to_string()})
            );
            std::process::exit(1);
        }
    };
    let mut workers: Vec<Box<dyn KeyStore + Send>> = Vec::new();
    let mut current = 0usize;
    for op in ops {
        if op == "pause" {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            println!("{}", json!({"op": op}));
            continue;
        }
        if let Some(n) = op.strip_prefix("on:") {
            let n: usize = n.parse().unwrap_or(0);
            while workers.len() < n {
                match store.worker() {
                    Ok(Some(w)) => workers.push(w),
                    Ok(None) => break,
                    Err(e) => {
                        println!(
                            "{}",
                            json!({"op": op, "error": e.kind(), "message": e.to_string()})
                        );
                        break;
                    }
                }
            }
            if n > workers.len() {
                println!("{}", json!({"op": op, "error": "no-worker"}));
                continue;
            }
            current = n;
            println!("{}", json!({"op": op}));
            continue;
        }
        let target: &mut dyn KeyStore = if current == 0 {
            store.as_mut()
        } else {
            workers[current - 1].as_mut()
        };
        println!("{}", run(target, op));
    }
    // Other sessions close before the store that finalises the module.
    drop(workers);
}

fn run(store: &mut dyn KeyStore, op: &str) -> serde_json::Value {
    let parts: Vec<&str> = op.split(':').collect();
    let res = match parts.as_slice() {
        ["create", id] => store
            .create(id)
            .map(|k| json!({"public": hex::encode(k.public.to_encoded_point(false).as_bytes())})),
        ["public", id] => store
            .public_key(id)
            .map(|k| json!({"public": hex::encode(k.to_encoded_point(false).as_bytes())})),
        ["sign", id, digest] => {
            let mut d = [0u8; 32];
            match hex::decode_to_slice(digest, &mut d) {
                Ok(()) => store
                    .sign(id, &d)
                    .map(|s| json!({"signature": hex::encode(s.to_bytes())})),
                Err(e) => return json!({"op": op, "error": "usage", "message": e.to_string()}),
            }
        }
        ["destroy", id] => store.destroy(id).map(|()| json!({})),
        ["list"] => store.list().map(|ids| json!({"ids": ids})),
        _ => return json!({"op": op, "error": "usage", "message": "unknown op"}),
    };
    match res {
        Ok(mut v) => {
            v["op"] = json!(op);
            v
        }
        Err(e) => json!({"op": op, "error": e.kind(), "message": e.to_string()}),
    }
}

/// `ksprobe read-value MODULE TOKEN PIN LABEL`: asks the token itself, through cryptoki and not
/// through tessera's key store, for CKA_VALUE of the private key labelled LABEL.
fn read_value() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    let a: Vec<String> = std::env::args().skip(2).collect();
    let ctx = Pkcs11::new(&a[0]).expect("module");
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("init");
    let slot = ctx
        .get_slots_with_initialized_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|i| i.label().trim_end() == a[1])
                .unwrap_or(false)
        })
        .expect("token");
    let session = ctx.open_ro_session(slot).expect("session");
    session
        .login(UserType::User, Some(&AuthPin::new(a[2].clone().into())))
        .expect("login");
    let objs = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(a[3].as_bytes().to_vec()),
        ])
        .expect("find");
    let info = session
        .get_attribute_info(objs[0], &[AttributeType::Value])
        .expect("info");
    let value = session
        .get_attributes(objs[0], &[AttributeType::Value])
        .expect("get");
    let info = match info[0] {
        AttributeInfo::Sensitive => "sensitive",
        AttributeInfo::Available(_) => "available",
        AttributeInfo::TypeInvalid => "type-invalid",
        AttributeInfo::Unavailable => "unavailable",
    };
    println!(
        "{}",
        json!({"value_info": info, "values_returned": value.len()})
    );
}
