//! Test helper: an "agent" process that asks tesserad for a token (or whoami) and prints
//! `{"status": <http status>, "body": <json>}`. Tests run copies of it under other uids and
//! as different executables.
//! Usage: agentcall SOCKET token AUDIENCE [SCOPE...] | agentcall SOCKET whoami |
//! agentcall SOCKET get PATH |
//! agentcall SOCKET drop-then-whoami UID (connect as who we are, then setuid(UID), then ask)

use std::io::{Read, Write};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a[1] == "drop-then-whoami" {
        drop_then_whoami(&a[0], a[2].parse().unwrap());
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = tessera::Client::with_socket(&a[0]);
    let (method, path, body) = match a[1].as_str() {
        "token" => {
            let body = serde_json::json!({"audience": a[2], "scopes": &a[3..]});
            (
                hyper_method("POST"),
                "/v1/token",
                Some(body.to_string().into_bytes()),
            )
        }
        "get" => (hyper_method("GET"), a[2].as_str(), None),
        _ => (hyper_method("GET"), "/v1/whoami", None),
    };
    match rt.block_on(client.request(method, path, body)) {
        Ok((status, _, bytes)) => {
            let body: serde_json::Value =
                serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            println!("{}", serde_json::json!({"status": status, "body": body}));
        }
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({"status": 0, "error": e.to_string()})
            );
            std::process::exit(1);
        }
    }
}

fn hyper_method(m: &str) -> tessera::Method {
    m.parse().unwrap()
}

/// Connect first, then change uid, then send the request on the connected socket: the
/// kernel's peer credentials still name the connector.
fn drop_then_whoami(socket: &str, uid: u32) {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    nix::unistd::setgid(nix::unistd::Gid::from_raw(uid)).unwrap();
    nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).unwrap();
    s.write_all(b"GET /v1/whoami HTTP/1.1\r\nHost: tessera\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status: u16 = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    let body: serde_json::Value = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    println!("{}", serde_json::json!({"status": status, "body": body}));
}
