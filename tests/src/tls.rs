//! One-line TLS exchanges for the keyless-TLS tests: a rustls server thread that answers each
//! connection with the SPIFFE ID of the client certificate it verified, and a client that sends
//! a line and reads the answer.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;

use tessera::tls::peer_spiffe_id;
use tessera::tls::rustls;

/// Serve `connections` handshakes on a free loopback port; each accepted connection is answered
/// `hello <client SPIFFE ID or "-">`. The thread returns, per connection, `Ok(client id)` or
/// the handshake's error.
pub fn serve(
    config: Arc<rustls::ServerConfig>,
    connections: usize,
) -> (u16, JoinHandle<Vec<Result<String, String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let port = listener.local_addr().expect("local address").port();
    let handle = std::thread::spawn(move || {
        let mut seen = vec![];
        for _ in 0..connections {
            let Ok((tcp, _)) = listener.accept() else {
                seen.push(Err("accept failed".into()));
                continue;
            };
            let _ = tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)));
            let conn = match rustls::ServerConnection::new(config.clone()) {
                Ok(c) => c,
                Err(e) => {
                    seen.push(Err(e.to_string()));
                    continue;
                }
            };
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut line = String::new();
            match BufReader::new(&mut tls).read_line(&mut line) {
                Ok(_) => {
                    let peer = tls
                        .conn
                        .peer_certificates()
                        .and_then(peer_spiffe_id)
                        .unwrap_or_else(|| "-".into());
                    let _ = tls.write_all(format!("hello {peer}\n").as_bytes());
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                    seen.push(Ok(peer));
                }
                Err(e) => seen.push(Err(e.to_string())),
            }
        }
        seen
    });
    (port, handle)
}

/// Connect to `port` as `server_name`, send a line, return the answer.
pub fn exchange(
    config: Arc<rustls::ClientConfig>,
    port: u16,
    server_name: &str,
) -> Result<String, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let name = server_name
        .to_string()
        .try_into()
        .map_err(|e: rustls::pki_types::InvalidDnsNameError| e.to_string())?;
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"hi\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    tls.read_to_string(&mut out).map_err(|e| e.to_string())?;
    if out.is_empty() {
        return Err("no answer".into());
    }
    Ok(out)
}
