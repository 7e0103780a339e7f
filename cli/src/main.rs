//! `tessera`: the command line for agents (token, whoami), relying parties (verify) and
//! admins (audit; agent administration over D-Bus).
//!
//! Exit codes: 0 ok; 1 error; 2 usage or not confirmed; 3 refused by the daemon (policy,
//! unknown caller, revoked, access denied) or by a token endpoint (`exchange`); 4 daemon or
//! token endpoint unreachable or unavailable; 5 verification failed; 6 no such agent.

use std::io::{BufRead, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod agent;
mod certs;
mod federation;
mod host;
mod status;
mod tls_proxy;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use tessera::{Client, Error, TokenOptions};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "tessera: hardware-backed identities for local AI agents"
)]
struct Cli {
    /// Agent socket of tesserad.
    #[arg(long, global = true, env = "TESSERA_SOCKET", default_value = tessera::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Bus for admin commands: "system", "session" or an address. Default: the dev daemon's
    /// private bus when the socket is a `tesserad --dev` one (its state dir has a `bus` file),
    /// else the system bus.
    #[arg(long, global = true, env = "TESSERA_BUS")]
    bus: Option<String>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The bus the admin commands use: `--bus`/`TESSERA_BUS`, else the address a dev daemon wrote
/// beside its socket, else the system bus.
fn admin_bus(cli: &Cli) -> String {
    if let Some(b) = &cli.bus {
        return b.clone();
    }
    cli.socket
        .parent()
        .and_then(|dir| std::fs::read_to_string(dir.join("bus")).ok())
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "system".into())
}

#[derive(Subcommand)]
enum Cmd {
    /// Is the daemon up, and on which backend?
    Health,
    /// Which agent am I (as the daemon sees this process)?
    Whoami {
        #[arg(long)]
        agent: Option<String>,
    },
    /// Get a token for this process's agent; prints the token (the whole answer with --json).
    Token {
        #[arg(long)]
        audience: String,
        /// Repeat for several scopes.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// e.g. 90s, 5m, 1h
        #[arg(long)]
        ttl: Option<String>,
        /// Which agent, when this process matches several.
        #[arg(long)]
        agent: Option<String>,
        /// "dpop": a token bound to the agent's proof key (RFC 9449); send it with
        /// `tessera proof dpop` proofs. "mtls": bound to the certificate in --cert (RFC 8705);
        /// send it over mutual TLS with that certificate.
        #[arg(long, value_parser = ["dpop", "mtls"])]
        bind: Option<String>,
        /// With --bind mtls: the agent certificate (PEM, from `tessera cert`), first in the file.
        #[arg(long, value_name = "PEM")]
        cert: Option<PathBuf>,
    },
    /// A WIMSE Workload Identity Token for this agent (signed by the host CA, binding the
    /// agent's proof key); prints it (the whole answer with --json).
    Wit {
        #[arg(long)]
        agent: Option<String>,
    },
    /// Per-request proofs made by the daemon with this agent's proof key.
    Proof {
        #[command(subcommand)]
        cmd: ProofSub,
    },
    /// Carry plain bytes from local programs to one upstream over mutual TLS 1.3 as this
    /// agent (certificate from the daemon, every handshake signed by it). Whoever can connect
    /// to the listener acts as the agent: by default a Unix socket (0600, in a 0700 directory)
    /// open only to this uid and systemd unit.
    TlsProxy(tls_proxy::ProxyArgs),
    /// Verify an agent token (relying party); exit 5 when it does not verify. The token is
    /// read from FILE, or from standard input with `-` (a token on the command line is
    /// visible to every local user in /proc/*/cmdline).
    Verify {
        /// File holding the token, or - for standard input.
        #[arg(value_name = "FILE")]
        token: PathBuf,
        #[arg(long)]
        audience: String,
        /// JWKS file; default: fetched from the daemon.
        #[arg(long)]
        jwks: Option<PathBuf>,
        /// Accept a token bound to a key (`cnf`) and show the binding. Without it a bound
        /// token does not verify: it is good only with its proof (a bearer check must fail).
        #[arg(long)]
        bound_ok: bool,
        #[arg(long)]
        issuer: Option<String>,
    },
    /// Get an X.509 certificate for this process's agent; prints the PEM chain (agent, then
    /// host CA).
    Cert {
        /// e.g. 10m, 1h (at most the agent's limit)
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long)]
        agent: Option<String>,
        /// Certify the agent's session key (policy proof_key = "session"), not its hardware
        /// key; the certificate ends with the key.
        #[arg(long)]
        session_key: bool,
    },
    /// Print the host CA certificate relying parties trust (PEM).
    Bundle,
    /// Print the host CA's current CRL (PEM).
    Crl,
    /// Print key attestation evidence for this process's agent key over NONCE (hex).
    Attest {
        #[arg(long)]
        nonce: String,
        #[arg(long)]
        agent: Option<String>,
    },
    /// Verify key attestation evidence (relying party); exit 5 when it does not verify.
    VerifyAttestation {
        /// Evidence JSON file, or - for stdin.
        file: PathBuf,
        /// The nonce you asked with (hex).
        #[arg(long)]
        nonce: String,
        /// The agent's certificate (PEM): its key must be the certified key (this or --jwk
        /// is required).
        #[arg(long, required_unless_present = "jwk")]
        cert: Option<PathBuf>,
        /// The agent's public JWK (JSON): its key must be the certified key.
        #[arg(long)]
        jwk: Option<PathBuf>,
        /// The attestation key you trust (PEM public key, recorded at provisioning).
        #[arg(long)]
        ak: PathBuf,
    },
    /// What federated relying parties trust (the agents' public key set).
    Federation {
        #[command(subcommand)]
        cmd: federation::FederationSub,
    },
    /// Trade a fresh assertion of this agent for an access token at an RFC 7523 / RFC 8693
    /// token endpoint (or the Claude API's); prints the access token (the whole answer with
    /// --json). Server certificates are checked against the system roots (SSL_CERT_FILE).
    Exchange(federation::ExchangeArgs),
    /// The host CA for fleets (admin, over D-Bus).
    Host {
        #[command(subcommand)]
        cmd: host::HostSub,
    },
    /// The audit trail.
    Audit(AuditCmd),
    /// The daemon on one screen: backend and device, agents by status, credentials in the
    /// last hour, audit head, host CA and CRL expiry, warnings (admin, over D-Bus).
    Status,
    /// Administer agents over D-Bus (root or admin_group).
    Agent {
        #[command(subcommand)]
        cmd: agent::AgentSub,
    },
    /// Man pages or shell completions from these very definitions, into DIR (for packagers).
    #[command(hide = true)]
    Generate {
        #[arg(value_enum)]
        what: Generated,
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Generated {
    /// tessera.1 and one page per subcommand (tessera-agent-enroll.1, ...).
    Man,
    /// tessera.bash, _tessera (zsh), tessera.fish.
    Completions,
}

/// `tessera generate`: what the packages ship, written by the binary they ship.
fn generate(what: Generated, dir: &std::path::Path) -> ExitCode {
    use clap::CommandFactory;
    let res = std::fs::create_dir_all(dir).and_then(|()| match what {
        Generated::Man => clap_mangen::generate_to(Cli::command(), dir),
        Generated::Completions => {
            use clap_complete::Shell;
            [Shell::Bash, Shell::Zsh, Shell::Fish]
                .into_iter()
                .try_for_each(|sh| {
                    clap_complete::generate_to(sh, &mut Cli::command(), "tessera", dir).map(|_| ())
                })
        }
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: cannot write into {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

#[derive(Subcommand)]
enum ProofSub {
    /// A DPoP proof (RFC 9449) for one request; prints the proof JWT (the whole answer with
    /// --json). Send it as the `DPoP` header with `Authorization: DPoP <token>`.
    Dpop {
        /// HTTP method of the request.
        #[arg(long)]
        method: String,
        /// Target URI (no query or fragment).
        #[arg(long)]
        url: String,
        /// File holding the bound token the request carries, or - for standard input (the
        /// daemon checks it is this agent's and puts its hash in `ath`).
        #[arg(long, value_name = "FILE")]
        token: Option<PathBuf>,
        /// The server's DPoP-Nonce.
        #[arg(long)]
        nonce: Option<String>,
        #[arg(long)]
        agent: Option<String>,
    },
    /// An RFC 9421 HTTP message signature for one request; prints the `Signature-Input:` and
    /// `Signature:` header lines (the answer with --json).
    SignHttp {
        #[arg(long)]
        method: String,
        /// Target URI (a query is allowed).
        #[arg(long)]
        url: String,
        /// A header to cover, `Name: value` (repeat).
        #[arg(long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
        /// Also cover `@target-uri`, `@path` or `@query` (repeat).
        #[arg(long = "component")]
        components: Vec<String>,
        /// The body: its `Content-Digest` (sha-256) is computed, printed and covered.
        #[arg(long, value_name = "FILE")]
        body_file: Option<PathBuf>,
        #[arg(long)]
        agent: Option<String>,
    },
    /// A WIMSE Workload Proof Token for one request, to send with the WIT; prints the WPT.
    Wpt {
        /// Target URI (no query or fragment).
        #[arg(long)]
        aud: String,
        /// File holding the WIT (`tessera wit`), or - for standard input.
        #[arg(long, value_name = "FILE")]
        wit: PathBuf,
        /// File holding an access token the request carries (its hash goes in `ath`).
        #[arg(long, value_name = "FILE")]
        token: Option<PathBuf>,
        /// Lifetime, default 60s, at most 5m.
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long)]
        agent: Option<String>,
    },
}

/// A proof JWT on standard output (the whole answer with --json).
fn print_proof(res: Result<tessera::ProofResponse, tessera::Error>, as_json: bool) -> ExitCode {
    match res {
        Ok(p) if as_json => {
            print_json(&json!({"proof": p.proof, "type": p.kind, "jti": p.jti}));
            ExitCode::SUCCESS
        }
        Ok(p) => {
            println!("{}", p.proof);
            ExitCode::SUCCESS
        }
        Err(e) => client_error(&e),
    }
}

/// A credential from FILE or standard input (`-`), trimmed.
fn read_secret(f: &std::path::Path) -> Result<String, ExitCode> {
    match certs::read_input(f).map(String::from_utf8) {
        Ok(Ok(t)) => Ok(t.trim().to_string()),
        Ok(Err(_)) => {
            eprintln!("tessera: {}: not text", f.display());
            Err(ExitCode::from(2))
        }
        Err(e) => {
            eprintln!("tessera: {e}");
            Err(ExitCode::from(2))
        }
    }
}

#[derive(Args)]
struct AuditCmd {
    #[command(subcommand)]
    cmd: AuditSub,
}

#[derive(Subcommand)]
enum AuditSub {
    /// Check the hash chain (names the first bad seq) and, with --ca, the signed checkpoint:
    /// records up to it must be as signed; later ones are reported as unanchored.
    Verify {
        /// Audit directory or file.
        #[arg(default_value = "/var/lib/tessera/audit")]
        path: PathBuf,
        /// The host CA certificate (PEM) from a copy you trust, not the host's own file: its
        /// key must have signed the checkpoint.
        #[arg(long, value_name = "PEM")]
        ca: Option<PathBuf>,
        /// The checkpoint to check against (default: checkpoint.jws in the audit directory).
        #[arg(long, value_name = "FILE", requires = "ca")]
        checkpoint: Option<PathBuf>,
    },
    /// Show the last records.
    Tail {
        #[arg(default_value = "/var/lib/tessera/audit")]
        path: PathBuf,
        #[arg(short = 'n', default_value_t = 20)]
        lines: usize,
        #[arg(long, short = 'f')]
        follow: bool,
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        event: Option<String>,
        /// Only records with this jti (answers "which process got token X?"). A jti may
        /// start with '-' (base64url), so values that look like flags are accepted.
        #[arg(long, allow_hyphen_values = true)]
        jti: Option<String>,
    },
}

pub(crate) const EXIT_REFUSED: u8 = 3;
pub(crate) const EXIT_UNAVAILABLE: u8 = 4;
pub(crate) const EXIT_UNVERIFIED: u8 = 5;

pub(crate) fn client_error(e: &Error) -> ExitCode {
    eprintln!("tessera: {e}");
    match e {
        Error::Connect { .. } => ExitCode::from(EXIT_UNAVAILABLE),
        Error::Problem(p) if p.status == 503 => ExitCode::from(EXIT_UNAVAILABLE),
        Error::Problem(_) => ExitCode::from(EXIT_REFUSED),
        Error::Protocol(_) => ExitCode::FAILURE,
    }
}

pub(crate) fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The proxy's TLS signer blocks on the daemon once per handshake: it needs worker threads
    // (block_in_place) so one handshake never stalls the other tunnels.
    let rt = match matches!(cli.cmd, Cmd::TlsProxy(_))
        .then(tokio::runtime::Builder::new_multi_thread)
        .unwrap_or_else(tokio::runtime::Builder::new_current_thread)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tessera: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let client = Client::with_socket(&cli.socket);
    let bus = admin_bus(&cli);
    match cli.cmd {
        Cmd::Federation { cmd } => federation::federation(&client, cmd).await,
        Cmd::Exchange(args) => federation::run(&client, args, cli.json).await,
        Cmd::Health => match client.health().await {
            Ok(h) if cli.json => {
                print_json(&h);
                ExitCode::SUCCESS
            }
            Ok(h) => {
                println!("{} (backend {})", h.status, h.backend);
                ExitCode::SUCCESS
            }
            Err(e) => client_error(&e),
        },
        Cmd::Whoami { agent } => {
            let res = match &agent {
                None => client.whoami().await,
                Some(a) => {
                    let path = format!("/v1/whoami?agent={a}");
                    match client.request(tessera::Method::GET, &path, None).await {
                        Ok((200, _, b)) => {
                            serde_json::from_slice(&b).map_err(|e| Error::Protocol(e.to_string()))
                        }
                        Ok((_, _, b)) => Err(serde_json::from_slice(&b)
                            .map(Error::Problem)
                            .unwrap_or_else(|e| Error::Protocol(e.to_string()))),
                        Err(e) => Err(e),
                    }
                }
            };
            match res {
                Ok(w) if cli.json => {
                    print_json(&w);
                    ExitCode::SUCCESS
                }
                Ok(w) => {
                    println!("name:     {}", w.name);
                    println!("id:       {}", w.id);
                    println!("status:   {}", w.status);
                    println!("key:      {}", w.key_id.unwrap_or_default());
                    println!("policy:   {}", w.policy);
                    ExitCode::SUCCESS
                }
                Err(e) => client_error(&e),
            }
        }
        Cmd::Token {
            audience,
            scopes,
            ttl,
            agent,
            bind,
            cert,
        } => {
            let mut opts = TokenOptions::new(audience);
            opts.scopes = scopes;
            opts.ttl = ttl;
            opts.agent = agent;
            opts.bind = bind;
            match (opts.bind.as_deref(), cert) {
                (Some("mtls"), Some(path)) => match certs::first_cert_der(&path) {
                    Ok(der) => opts.x5t_s256 = Some(tessera::verify::x5t_s256(&der)),
                    Err(e) => {
                        eprintln!("tessera: {e}");
                        return ExitCode::from(2);
                    }
                },
                (Some("mtls"), None) => {
                    eprintln!("tessera: --bind mtls needs --cert PEM (the certificate the token is bound to)");
                    return ExitCode::from(2);
                }
                (_, Some(_)) => {
                    eprintln!("tessera: --cert goes with --bind mtls");
                    return ExitCode::from(2);
                }
                _ => {}
            }
            match client.token(&opts).await {
                Ok(t) if cli.json => {
                    print_json(&t);
                    ExitCode::SUCCESS
                }
                Ok(t) => {
                    println!("{}", t.token);
                    ExitCode::SUCCESS
                }
                Err(e) => client_error(&e),
            }
        }
        Cmd::Proof {
            cmd:
                ProofSub::Dpop {
                    method,
                    url,
                    token,
                    nonce,
                    agent,
                },
        } => {
            let mut opts = tessera::DpopOptions::new(method, url);
            if let Some(f) = token {
                match read_secret(&f) {
                    Ok(t) => opts = opts.access_token(t),
                    Err(code) => return code,
                }
            }
            opts.nonce = nonce;
            opts.agent = agent;
            print_proof(client.dpop_proof(&opts).await, cli.json)
        }
        Cmd::Proof {
            cmd:
                ProofSub::Wpt {
                    aud,
                    wit,
                    token,
                    ttl,
                    agent,
                },
        } => {
            let wit = match read_secret(&wit) {
                Ok(w) => w,
                Err(code) => return code,
            };
            let mut opts = tessera::WptOptions::new(aud, wit);
            if let Some(f) = token {
                match read_secret(&f) {
                    Ok(t) => opts = opts.access_token(t),
                    Err(code) => return code,
                }
            }
            opts.ttl = ttl;
            opts.agent = agent;
            print_proof(client.wpt(&opts).await, cli.json)
        }
        Cmd::Proof {
            cmd:
                ProofSub::SignHttp {
                    method,
                    url,
                    headers,
                    components,
                    body_file,
                    agent,
                },
        } => {
            let mut opts = tessera::HttpSignatureOptions::new(method, url);
            for h in &headers {
                let Some((name, value)) = h.split_once(':') else {
                    eprintln!("tessera: --header takes \"Name: value\", not {h:?}");
                    return ExitCode::from(2);
                };
                opts = opts.header(name.trim(), value.trim());
            }
            for c in components {
                opts = opts.component(c);
            }
            let mut digest = None;
            if let Some(f) = body_file {
                match certs::read_input(&f) {
                    Ok(body) => {
                        use base64::Engine as _;
                        use sha2::Digest as _;
                        let d = format!(
                            "sha-256=:{}:",
                            base64::engine::general_purpose::STANDARD
                                .encode(sha2::Sha256::digest(&body))
                        );
                        opts = opts.content_digest(d.clone());
                        digest = Some(d);
                    }
                    Err(e) => {
                        eprintln!("tessera: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            opts.agent = agent;
            match client.http_signature(&opts).await {
                Ok(sig) if cli.json => {
                    print_json(&json!({
                        "signature_input": sig.signature_input,
                        "signature": sig.signature,
                        "content_digest": digest,
                        "jti": sig.jti,
                    }));
                    ExitCode::SUCCESS
                }
                Ok(sig) => {
                    if let Some(d) = digest {
                        println!("Content-Digest: {d}");
                    }
                    println!("Signature-Input: {}", sig.signature_input);
                    println!("Signature: {}", sig.signature);
                    ExitCode::SUCCESS
                }
                Err(e) => client_error(&e),
            }
        }
        Cmd::Wit { agent } => {
            let res = client.wit(agent.as_deref()).await;
            match res {
                Ok(w) if cli.json => {
                    print_json(&json!({"wit": w.wit, "expires_at": w.expires_at, "jti": w.jti}));
                    ExitCode::SUCCESS
                }
                Ok(w) => {
                    println!("{}", w.wit);
                    ExitCode::SUCCESS
                }
                Err(e) => client_error(&e),
            }
        }
        Cmd::TlsProxy(args) => tls_proxy::run(&client, args).await,
        Cmd::Verify {
            token,
            audience,
            jwks,
            issuer,
            bound_ok,
        } => {
            let set: Value = match jwks {
                Some(p) => match std::fs::read(&p)
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                {
                    Ok(v) => v,
                    Err(e) => {
                        eprintln!("tessera: cannot read JWKS {}: {e}", p.display());
                        return ExitCode::FAILURE;
                    }
                },
                None => match client.jwks().await {
                    Ok(v) => v,
                    Err(e) => return client_error(&e),
                },
            };
            let mut opts = tessera::verify::Options::new(audience);
            opts.issuer = issuer;
            let token = match certs::read_input(&token).map(String::from_utf8) {
                Ok(Ok(t)) => t,
                Ok(Err(_)) => {
                    eprintln!("tessera: the token is not UTF-8 text");
                    return ExitCode::from(2);
                }
                Err(e) => {
                    eprintln!("tessera: {e}");
                    return ExitCode::from(2);
                }
            };
            let checked = if bound_ok {
                tessera::verify::verify_signed(token.trim(), &set, &opts)
            } else {
                tessera::verify::verify(token.trim(), &set, &opts)
            };
            match checked {
                Ok(c) if cli.json => {
                    print_json(&json!({"valid": true, "claims": c}));
                    ExitCode::SUCCESS
                }
                Ok(c) => {
                    let bound = match c.cnf.as_ref().and_then(|b| b.jkt.as_deref()) {
                        Some(jkt) => format!(", bound to key {jkt}: accept only with its proof"),
                        None => String::new(),
                    };
                    println!(
                        "valid: {} for {} (jti {}, expires {}{bound})",
                        c.sub,
                        c.aud,
                        c.jti,
                        tesserad::credentials::rfc3339(c.exp)
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    if cli.json {
                        print_json(&json!({"valid": false, "error": e.to_string()}));
                    }
                    eprintln!("tessera: {e}");
                    ExitCode::from(EXIT_UNVERIFIED)
                }
            }
        }
        Cmd::Cert {
            ttl,
            agent,
            session_key,
        } => {
            let opts = tessera::CertificateOptions {
                ttl,
                agent,
                session_key,
            };
            certs::cert(&client, &opts, cli.json).await
        }
        Cmd::Bundle => certs::text(&client, "bundle", cli.json).await,
        Cmd::Crl => certs::text(&client, "crl", cli.json).await,
        Cmd::Attest { nonce, agent } => certs::attest(&client, &nonce, agent).await,
        Cmd::VerifyAttestation {
            file,
            nonce,
            cert,
            jwk,
            ak,
        } => certs::verify_attestation(
            certs::VerifyArgs {
                file,
                nonce,
                cert,
                jwk,
                ak,
            },
            cli.json,
        ),
        Cmd::Host { cmd } => host::run(cmd, &bus, cli.json).await,
        Cmd::Audit(a) => audit(a.cmd, cli.json).await,
        Cmd::Agent { cmd } => agent::run(cmd, &bus, cli.json).await,
        Cmd::Generate { what, dir } => generate(what, &dir),
        Cmd::Status => status::run(&bus, cli.json).await,
    }
}

fn broken_trail(b: &tesserad::audit::Broken, as_json: bool) -> ExitCode {
    if as_json {
        print_json(&json!({"intact": false, "broken": b}));
    }
    eprintln!(
        "tessera: audit trail broken at seq {} ({}:{}): {}",
        b.seq, b.file, b.line, b.reason
    );
    ExitCode::from(EXIT_UNVERIFIED)
}

/// `audit verify --ca`: the chain, then the checkpoint signed by the CA's key.
fn verify_anchored(
    path: &std::path::Path,
    ca: &std::path::Path,
    checkpoint: Option<&std::path::Path>,
    as_json: bool,
) -> ExitCode {
    let certs = match std::fs::read_to_string(ca)
        .map_err(|e| e.to_string())
        .and_then(|pem| {
            tesserad::credentials::x509::certs_from_pem(&pem).map_err(|e| e.to_string())
        }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tessera: {}: {e}", ca.display());
            return ExitCode::from(2);
        }
    };
    let keys: Vec<p256::ecdsa::VerifyingKey> = certs
        .iter()
        .filter_map(tesserad::credentials::x509::cert_p256_key)
        .collect();
    if keys.is_empty() {
        eprintln!("tessera: {}: no P-256 key in it", ca.display());
        return ExitCode::from(2);
    }
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().map(|p| p.to_path_buf()).unwrap_or_default()
    };
    let jws = match checkpoint {
        Some(f) => std::fs::read_to_string(f)
            .map(Some)
            .map_err(|e| format!("{}: {e}", f.display())),
        None => tesserad::audit::checkpoint::read_file(&dir).map_err(|e| e.to_string()),
    };
    let jws = match jws {
        Ok(Some(j)) => j,
        Ok(None) => {
            eprintln!(
                "tessera: no checkpoint in {} ({}): nothing anchors this trail",
                dir.display(),
                tesserad::audit::checkpoint::FILE
            );
            return ExitCode::from(EXIT_UNVERIFIED);
        }
        Err(e) => {
            eprintln!("tessera: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The key the checkpoint names (a PEM may hold the host CA and its issuers), else the
    // first certificate's.
    let kid = tesserad::audit::checkpoint::kid(&jws);
    let key = keys
        .iter()
        .find(|k| Some(tesserad::keystore::ecdsa::jwk_of(k).0) == kid)
        .unwrap_or(&keys[0]);
    match tesserad::audit::verify_anchored(path, &jws, key) {
        Ok(Ok(a)) => {
            if as_json {
                print_json(&json!({"intact": true, "summary": a.summary, "anchored": a}));
            } else {
                let s = &a.summary;
                println!(
                    "intact: {} records in {} file(s), seq {}..{}, last hash {}",
                    s.records,
                    s.files,
                    s.first_seq.unwrap_or(0),
                    s.last_seq.unwrap_or(0),
                    s.last_hash
                );
                println!(
                    "anchored through seq {} (checkpoint signed at {}); {} record(s) after it unanchored",
                    a.anchored_through,
                    unix_time_text(a.checkpoint_iat),
                    a.unanchored
                );
            }
            ExitCode::SUCCESS
        }
        Ok(Err(b)) => broken_trail(&b, as_json),
        Err(e) => {
            eprintln!("tessera: {e}");
            ExitCode::FAILURE
        }
    }
}

fn unix_time_text(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

async fn audit(cmd: AuditSub, as_json: bool) -> ExitCode {
    match cmd {
        AuditSub::Verify {
            path,
            ca: Some(ca),
            checkpoint,
        } => verify_anchored(&path, &ca, checkpoint.as_deref(), as_json),
        AuditSub::Verify { path, .. } => match tesserad::audit::verify(&path) {
            Ok(Ok(s)) => {
                if as_json {
                    print_json(&json!({"intact": true, "summary": s, "anchored": false}));
                } else {
                    println!(
                        "intact: {} records in {} file(s), seq {}..{}, last hash {}",
                        s.records,
                        s.files,
                        s.first_seq.unwrap_or(0),
                        s.last_seq.unwrap_or(0),
                        s.last_hash
                    );
                    println!("not anchored: give --ca to check the signed checkpoint");
                }
                ExitCode::SUCCESS
            }
            Ok(Err(b)) => broken_trail(&b, as_json),
            Err(e) => {
                eprintln!("tessera: {e}");
                ExitCode::FAILURE
            }
        },
        AuditSub::Tail {
            path,
            lines,
            follow,
            agent,
            event,
            jti,
        } => {
            let keep = |v: &Value| {
                agent
                    .as_ref()
                    .is_none_or(|a| v["agent"]["name"].as_str() == Some(a))
                    && event
                        .as_ref()
                        .is_none_or(|e| v["event"].as_str() == Some(e))
                    && jti
                        .as_ref()
                        .is_none_or(|j| v["details"]["jti"].as_str() == Some(j))
            };
            let show = |v: &Value| {
                if as_json {
                    println!("{v}");
                } else {
                    println!(
                        "{:>6} {} {:<18} {:<16} pid={} uid={} {}",
                        v["seq"],
                        v["time"].as_str().unwrap_or(""),
                        v["event"].as_str().unwrap_or(""),
                        v["agent"]["name"].as_str().unwrap_or("-"),
                        v["caller"]["pid"]
                            .as_i64()
                            .map_or("-".into(), |p| p.to_string()),
                        v["caller"]["uid"]
                            .as_u64()
                            .map_or("-".into(), |u| u.to_string()),
                        v["details"]
                    );
                }
            };
            let files = if path.is_dir() {
                match tesserad::audit::files_in_order(&path) {
                    Ok(f) => f,
                    Err(e) => {
                        eprintln!("tessera: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                vec![path.clone()]
            };
            let mut recent: std::collections::VecDeque<Value> = Default::default();
            for f in &files {
                let Ok(file) = std::fs::File::open(f) else {
                    continue;
                };
                for line in std::io::BufReader::new(file).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if keep(&v) {
                            recent.push_back(v);
                            if recent.len() > lines {
                                recent.pop_front();
                            }
                        }
                    }
                }
            }
            recent.iter().for_each(show);
            if !follow {
                return ExitCode::SUCCESS;
            }
            let current = if path.is_dir() {
                path.join("audit.log")
            } else {
                path
            };
            let mut pos = std::fs::metadata(&current).map(|m| m.len()).unwrap_or(0);
            let mut partial = String::new();
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let Ok(mut f) = std::fs::File::open(&current) else {
                    continue;
                };
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                if len < pos {
                    pos = 0; // rotated
                }
                if f.seek(SeekFrom::Start(pos)).is_err() {
                    continue;
                }
                let mut reader = std::io::BufReader::new(f);
                let mut buf = String::new();
                while let Ok(n) = reader.read_line(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    pos += n as u64;
                    if buf.ends_with('\n') {
                        partial.push_str(&buf);
                        if let Ok(v) = serde_json::from_str::<Value>(&partial) {
                            if keep(&v) {
                                show(&v);
                            }
                        }
                        partial.clear();
                    } else {
                        partial.push_str(&buf);
                    }
                    buf.clear();
                }
            }
        }
    }
}
