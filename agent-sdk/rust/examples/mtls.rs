//! Two agents on one host speak mutual TLS 1.3 with certificates whose keys never leave the
//! TPM/HSM; each checks the other's SPIFFE ID from the URI SAN.
//!
//! ```sh
//! # beta's policy has tls_server = true
//! cargo run -p tessera --features rustls --example mtls -- serve beta 127.0.0.1:8443 &
//! cargo run -p tessera --features rustls --example mtls -- call alpha 127.0.0.1:8443 spiffe://…/agent/beta
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use tessera::tls::rustls;
use tessera::tls::{client_config, peer_spiffe_id, server_config, TlsOptions};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let agent = tessera::Client::from_env();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve", name, addr] => {
            let opts = TlsOptions {
                agent: Some(name.into()),
                ..Default::default()
            };
            let config = Arc::new(server_config(&agent, &opts).await?);
            let listener = TcpListener::bind(addr)?;
            println!("{name} serving mTLS on {addr}");
            for tcp in listener.incoming() {
                let conn = rustls::ServerConnection::new(config.clone())?;
                let mut tls = rustls::StreamOwned::new(conn, tcp?);
                let mut line = String::new();
                // The handshake happens on first read; a client without a host CA
                // certificate (or revoked) never gets here.
                if BufReader::new(&mut tls).read_line(&mut line).is_err() {
                    continue;
                }
                let peer = tls
                    .conn
                    .peer_certificates()
                    .and_then(peer_spiffe_id)
                    .unwrap_or_default();
                println!("request from {peer}: {}", line.trim());
                tls.write_all(format!("hello {peer}\n").as_bytes())?;
                tls.conn.send_close_notify();
                tls.flush()?;
            }
            Ok(())
        }
        ["call", name, addr, server_id] => {
            let opts = TlsOptions {
                agent: Some(name.into()),
                server_spiffe_id: Some(server_id.into()),
                ..Default::default()
            };
            let config = Arc::new(client_config(&agent, &opts).await?);
            // The name is not used for verification (the SPIFFE ID is), only for SNI.
            let conn = rustls::ClientConnection::new(config, "agent.invalid".try_into()?)?;
            let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(addr)?);
            tls.write_all(b"ping\n")?;
            let mut answer = String::new();
            tls.read_to_string(&mut answer)?;
            print!("{answer}");
            Ok(())
        }
        _ => Err("usage: mtls serve AGENT ADDR | mtls call AGENT ADDR SERVER_SPIFFE_ID".into()),
    }
}
