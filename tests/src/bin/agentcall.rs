//! Test helper: an "agent" process that asks tesserad for a token (or whoami) and prints
//! `{"status": <http status>, "body": <json>}`. Tests run copies of it under other uids and
//! as different executables.
//! Usage: agentcall SOCKET token AUDIENCE [SCOPE...] | agentcall SOCKET whoami |
//! agentcall SOCKET get PATH | agentcall SOCKET post PATH JSON |
//! agentcall SOCKET drop-then-whoami UID (connect as who we are, then setuid(UID), then ask) |
//! agentcall SOCKET hold N SECONDS (N requests announcing a body that never comes) |
//! agentcall SOCKET fork-then-exec EXE (connect, fork; the parent becomes EXE, the child asks) |
//! agentcall SOCKET exec-self EXE (connect, then exec EXE, which asks on the inherited socket)

use std::io::{Read, Write};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a[1] == "sleep" {
        std::thread::sleep(std::time::Duration::from_secs(a[2].parse().unwrap()));
        return;
    }
    if a[1] == "fork-then-exec" {
        fork_then_exec(&a[0], &a[2]);
        return;
    }
    if a[1] == "exec-self" {
        exec_self(&a[0], &a[2]);
        return;
    }
    if a[1] == "send-on-fd" {
        use std::os::fd::FromRawFd;
        // SAFETY: the fd was inherited on purpose from the process that exec'd us.
        let s = unsafe { std::os::unix::net::UnixStream::from_raw_fd(a[2].parse().unwrap()) };
        whoami_on(s);
        return;
    }
    if a[1] == "hold" {
        hold(&a[0], a[2].parse().unwrap(), a[3].parse().unwrap());
        return;
    }
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
        "post" => (
            hyper_method("POST"),
            a[2].as_str(),
            Some(a[3].clone().into_bytes()),
        ),
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
    let s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    nix::unistd::setgid(nix::unistd::Gid::from_raw(uid)).unwrap();
    nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).unwrap();
    whoami_on(s);
}

/// Ask whoami on a connected socket and print `{"status", "body"}` (status 0: the daemon
/// closed the connection without an answer).
fn whoami_on(mut s: std::os::unix::net::UnixStream) {
    let _ = s.write_all(b"GET /v1/whoami HTTP/1.1\r\nHost: tessera\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status: u16 = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    let body: serde_json::Value = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    println!("{}", serde_json::json!({"status": status, "body": body}));
}

/// Open `n` connections that each announce a 100-byte body and never send it, wait
/// `secs`, and report how many the daemon has closed by then.
fn hold(socket: &str, n: usize, secs: u64) {
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..n {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(mut s) => {
                let _ = s.write_all(
                    b"POST /v1/token HTTP/1.1\r\nHost: tessera\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
                );
                held.push(s);
            }
            Err(_) => refused += 1,
        }
    }
    println!(
        "{}",
        serde_json::json!({"event": "holding", "opened": held.len(), "refused": refused})
    );
    std::thread::sleep(std::time::Duration::from_secs(secs));
    let mut closed = 0;
    for s in &mut held {
        s.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        let mut ended = false;
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    ended = true;
                    break;
                }
            }
        }
        if ended {
            closed += 1;
        }
    }
    println!(
        "{}",
        serde_json::json!({"event": "done", "opened": held.len(), "closed": closed})
    );
}

/// Connect, fork; the parent execs the enrolled `exe` (which sleeps) while the child, still
/// this program, sends a request on the connection the parent made.
fn fork_then_exec(socket: &str, exe: &str) {
    use std::os::unix::process::CommandExt;
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    // The daemon has accepted (and taken its snapshot) once it answers on this connection.
    health_on(&mut s);
    let parent = std::process::id();
    let me = std::fs::read_link("/proc/self/exe").unwrap();
    // SAFETY: this process has one thread (no runtime was built in this mode).
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            // Speak only once the connector really is the enrolled program.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::fs::read_link(format!("/proc/{parent}/exe"))
                .ok()
                .as_ref()
                == Some(&me)
            {
                assert!(std::time::Instant::now() < deadline, "parent did not exec");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            whoami_on(s);
        }
        nix::unistd::ForkResult::Parent { .. } => {
            drop(s);
            let e = std::process::Command::new(exe)
                .args([socket, "sleep", "3"])
                .exec();
            panic!("exec {exe}: {e}");
        }
    }
}

/// Connect as this program, then exec the enrolled `exe`, which asks on the inherited socket.
fn exec_self(socket: &str, exe: &str) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    // The daemon has accepted (and taken its snapshot) once it answers on this connection.
    health_on(&mut s);
    let fd = s.as_raw_fd();
    nix::fcntl::fcntl(
        &s,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let e = std::process::Command::new(exe)
        .args([socket, "send-on-fd", &fd.to_string()])
        .exec();
    panic!("exec {exe}: {e}");
}

/// One keep-alive `GET /v1/health` on `s`, read to the end of its answer.
fn health_on(s: &mut std::os::unix::net::UnixStream) {
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: tessera\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "daemon closed the connection");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return;
            }
        }
    }
}
