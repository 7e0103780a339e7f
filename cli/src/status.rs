//! `tessera status`: the daemon on one screen (admin, over D-Bus `Manager.Status()`).

use std::process::ExitCode;

use serde_json::{Map, Value as Json};

use crate::agent::{fail, manager, value_json};

fn when(unix: i64) -> String {
    if unix <= 0 {
        return "-".into();
    }
    let left = unix - tesserad::credentials::x509::now_unix();
    let stamp = tesserad::credentials::rfc3339(unix);
    match left {
        l if l < 0 => format!("{stamp} (passed)"),
        l if l >= 86_400 => format!("{stamp} (in {} days)", l / 86_400),
        l => format!("{stamp} (in {} min)", l / 60),
    }
}

pub async fn run(bus: &str, as_json: bool) -> ExitCode {
    let (_conn, mgr) = match manager(bus).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let raw = match mgr.status().await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let mut map = Map::new();
    for (k, v) in &raw {
        map.insert(k.clone(), value_json(v));
    }
    let s = Json::Object(map);
    if as_json {
        println!("{s}");
        return ExitCode::SUCCESS;
    }
    let text = |k: &str| s[k].as_str().unwrap_or("-").to_string();
    let num = |k: &str| s[k].as_i64().unwrap_or(0);
    let agents = s["agents"]
        .as_object()
        .map(|m| {
            ["active", "suspended", "revoked", "pending"]
                .iter()
                .map(|st| format!("{} {st}", m.get(*st).and_then(Json::as_u64).unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    println!(
        "tesserad {}  backend {}  device {}",
        text("version"),
        text("backend"),
        text("device")
    );
    println!("agents      {agents}");
    println!(
        "issued      {} credentials in the last hour",
        num("issued_last_hour")
    );
    println!(
        "audit       head seq {}, last checkpoint seq {}",
        num("audit_seq"),
        num("checkpoint_seq")
    );
    println!("host CA     valid until {}", when(num("host_ca_not_after")));
    println!("CRL         next update {}", when(num("crl_next_update")));
    let warnings: Vec<String> = s["warnings"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|w| w.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if warnings.is_empty() {
        println!("warnings    none");
    } else {
        for w in &warnings {
            println!("warning     {w}");
        }
    }
    ExitCode::SUCCESS
}
