//! `tessera host …`: the host CA for fleets (admin, over D-Bus): a PKCS#10 request for the
//! host CA key, and installing the certificate a fleet CA issued for it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use crate::agent::{fail, manager};

#[derive(Subcommand)]
pub enum HostSub {
    /// Write a PKCS#10 request for the host CA key (PEM) for your fleet CA to sign.
    Csr {
        /// Common name to ask for; default: the host id.
        #[arg(long)]
        cn: Option<String>,
        /// Write here instead of stdout.
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
    },
    /// Install the host CA certificate your fleet CA issued: FILE holds it first, then the
    /// issuing CA certificates up to the root. Refused unless it is for this host's CA key
    /// and the chain verifies.
    InstallCert { file: PathBuf },
}

pub async fn run(cmd: HostSub, bus: &str, as_json: bool) -> ExitCode {
    // Read input before touching the bus, so a typo is a plain usage error.
    let pem = match &cmd {
        HostSub::InstallCert { file } => match std::fs::read_to_string(file) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("tessera: cannot read {}: {e}", file.display());
                return ExitCode::FAILURE;
            }
        },
        HostSub::Csr { .. } => None,
    };
    let (_conn, mgr) = match manager(bus).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    match cmd {
        HostSub::Csr { cn, out } => {
            let csr = match mgr
                .host_certificate_request(cn.as_deref().unwrap_or(""))
                .await
            {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            match out {
                Some(path) => {
                    if let Err(e) = std::fs::write(&path, &csr) {
                        eprintln!("tessera: cannot write {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                    if as_json {
                        println!("{}", json!({"csr": path}));
                    } else {
                        eprintln!("wrote {}", path.display());
                    }
                }
                None if as_json => println!("{}", json!({"csr": csr})),
                None => print!("{csr}"),
            }
            ExitCode::SUCCESS
        }
        HostSub::InstallCert { file } => {
            match mgr
                .install_host_certificate(pem.as_deref().unwrap_or_default())
                .await
            {
                Ok(()) => {
                    if as_json {
                        println!("{}", json!({"installed": file}));
                    } else {
                        println!("installed the host CA certificate from {}", file.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
    }
}
