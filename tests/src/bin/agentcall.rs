//! Test helper: an "agent" process that asks tesserad for a token (or whoami) and prints
//! `{"status": <http status>, "body": <json>}`. Tests run copies of it under other uids and
//! as different executables.
//! Usage: agentcall SOCKET token AUDIENCE [SCOPE...] | agentcall SOCKET whoami |
//! agentcall SOCKET get PATH

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
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
