//! `tessera federation jwks` (what relying parties upload) and `tessera exchange` (an agent's
//! assertion traded for a cloud token service's access token, in this process).

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::json;
use tessera::exchange::{self, BodyFormat, ExchangeError, ExchangeOptions, Grant};
use tessera::Client;

use crate::{client_error, print_json, EXIT_REFUSED, EXIT_UNAVAILABLE};

#[derive(Subcommand)]
pub enum FederationSub {
    /// Print the agents' public key set (JWKS) for relying parties that take an uploaded set.
    Jwks {
        /// Only the members the Claude API's inline mode and Google's uploaded JWKS accept.
        #[arg(long)]
        inline: bool,
    },
}

pub async fn federation(client: &Client, cmd: FederationSub) -> ExitCode {
    match cmd {
        FederationSub::Jwks { inline } => match client.jwks().await {
            Ok(set) => {
                let set = if inline {
                    tesserad::credentials::federation::inline_jwks(&set)
                } else {
                    set
                };
                print_json(&set);
                ExitCode::SUCCESS
            }
            Err(e) => client_error(&e),
        },
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GrantArg {
    /// RFC 7523 JWT bearer grant (`assertion`).
    JwtBearer,
    /// RFC 8693 token exchange (`subject_token`).
    TokenExchange,
    /// RFC 7523 §2.2 client authentication: `client_credentials` with `client_assertion`.
    ClientAssertion,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// The Claude API: POST https://api.anthropic.com/v1/oauth/token, audience
    /// https://api.anthropic.com, a JSON jwt-bearer body; give federation_rule_id,
    /// organization_id, service_account_id (and workspace_id) with --param.
    Anthropic,
    /// RFC 8693 token exchange, form-encoded (`audience`, `resource`, `scope` via --param).
    Rfc8693,
    /// Microsoft Entra federated identity credential: client_credentials with the assertion as
    /// client_assertion, audience api://AzureADTokenExchange (an RS256 agent, key = "rsa2048");
    /// give client_id and scope with --param and the tenant's /oauth2/v2.0/token endpoint.
    Entra,
}

#[derive(Args)]
pub struct ExchangeArgs {
    /// The token endpoint (https; http only to loopback). Default with --preset anthropic:
    /// the Claude API's.
    #[arg(long, required_unless_present = "preset")]
    token_endpoint: Option<String>,
    /// The assertion's `aud` (default: the token endpoint URL; the Claude API's with
    /// --preset anthropic). The agent's policy must allow it.
    #[arg(long)]
    audience: Option<String>,
    #[arg(long, value_enum)]
    grant: Option<GrantArg>,
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// A request member, `k=v` (repeat): scope, audience, resource, federation_rule_id…
    #[arg(long = "param", value_name = "K=V")]
    params: Vec<String>,
    /// Scope of the assertion itself (repeat).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// Lifetime of the assertion, e.g. 60s (default: the daemon's).
    #[arg(long)]
    ttl: Option<String>,
    /// A DPoP-bound assertion and a DPoP proof for the token request (agents with
    /// require_binding; the endpoint must accept DPoP).
    #[arg(long)]
    dpop: bool,
    #[arg(long)]
    agent: Option<String>,
}

/// Members the Claude API's token endpoint needs besides the grant.
const ANTHROPIC_REQUIRED: [&str; 3] = [
    "federation_rule_id",
    "organization_id",
    "service_account_id",
];

fn options(a: ExchangeArgs) -> Result<ExchangeOptions, String> {
    let mut params = vec![];
    for p in &a.params {
        let (k, v) = p
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| format!("--param takes K=V, not {p:?}"))?;
        params.push((k.to_string(), v.to_string()));
    }
    let mut o = match a.preset {
        Some(Preset::Anthropic) => {
            for k in ANTHROPIC_REQUIRED {
                if !params.iter().any(|(p, _)| p == k) {
                    return Err(format!("--preset anthropic needs --param {k}=…"));
                }
            }
            let mut o = ExchangeOptions::jwt_bearer(exchange::ANTHROPIC_TOKEN_ENDPOINT);
            o.audience = Some(exchange::ANTHROPIC_AUDIENCE.into());
            o.body = BodyFormat::Json;
            o
        }
        Some(Preset::Rfc8693) => ExchangeOptions::token_exchange(""),
        Some(Preset::Entra) => {
            for k in ["client_id", "scope"] {
                if !params.iter().any(|(p, _)| p == k) {
                    return Err(format!("--preset entra needs --param {k}=…"));
                }
            }
            let mut o = ExchangeOptions::jwt_bearer("");
            o.grant = Grant::ClientAssertion;
            o.audience = Some(exchange::ENTRA_AUDIENCE.into());
            o
        }
        None => ExchangeOptions::jwt_bearer(""),
    };
    match a.token_endpoint {
        Some(e) => o.token_endpoint = e,
        None if o.token_endpoint.is_empty() => {
            return Err(
                "--token-endpoint URL is needed (only --preset anthropic has a default)".into(),
            )
        }
        None => {}
    }
    match a.grant {
        Some(GrantArg::JwtBearer) => o.grant = Grant::JwtBearer,
        Some(GrantArg::TokenExchange) => o.grant = Grant::TokenExchange,
        Some(GrantArg::ClientAssertion) => o.grant = Grant::ClientAssertion,
        None => {}
    }
    if a.audience.is_some() {
        o.audience = a.audience;
    }
    o.params = params;
    o.assertion_scopes = a.scopes;
    o.assertion_ttl = a.ttl;
    o.dpop = a.dpop;
    o.agent = a.agent;
    Ok(o)
}

pub async fn run(client: &Client, args: ExchangeArgs, as_json: bool) -> ExitCode {
    let opts = match options(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("tessera: {e}");
            return ExitCode::from(2);
        }
    };
    let tls = match exchange::system_tls() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tessera: {e}");
            return ExitCode::FAILURE;
        }
    };
    match exchange::exchange(client, &opts, &tls).await {
        Ok(t) if as_json => {
            print_json(&json!({
                "access_token": t.access_token,
                "token_type": t.token_type,
                "expires_at": t.expires_at.map(exchange::unix),
                "response": t.response,
            }));
            ExitCode::SUCCESS
        }
        Ok(t) => {
            println!("{}", t.access_token);
            ExitCode::SUCCESS
        }
        Err(ExchangeError::Assertion(e)) => client_error(&e),
        Err(e @ ExchangeError::Refused { .. }) => {
            eprintln!("tessera: {e}");
            if let ExchangeError::Refused { body, .. } = &e {
                if as_json {
                    println!("{body}");
                }
            }
            ExitCode::from(EXIT_REFUSED)
        }
        Err(e @ ExchangeError::Transport(_)) => {
            eprintln!("tessera: {e}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Err(e) => {
            eprintln!("tessera: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: ExchangeArgs,
    }

    fn opts(args: &[&str]) -> Result<ExchangeOptions, String> {
        let t = T::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        options(t.a)
    }

    #[test]
    fn presets_and_params() {
        let o = opts(&["--token-endpoint", "https://as.example/t"]).unwrap();
        assert_eq!(o.grant, Grant::JwtBearer);
        assert_eq!(o.assertion_audience(), "https://as.example/t");
        let o = opts(&[
            "--preset",
            "rfc8693",
            "--token-endpoint",
            "https://as.example/t",
            "--param",
            "audience=x",
        ])
        .unwrap();
        assert_eq!(o.grant, Grant::TokenExchange);
        assert_eq!(o.params, vec![("audience".into(), "x".into())]);
        let e = opts(&["--preset", "anthropic", "--param", "federation_rule_id=f"]).unwrap_err();
        assert!(e.contains("organization_id"), "{e}");
        let o = opts(&[
            "--preset",
            "anthropic",
            "--param",
            "federation_rule_id=f",
            "--param",
            "organization_id=o",
            "--param",
            "service_account_id=s",
        ])
        .unwrap();
        assert_eq!(o.token_endpoint, exchange::ANTHROPIC_TOKEN_ENDPOINT);
        assert_eq!(o.assertion_audience(), exchange::ANTHROPIC_AUDIENCE);
        assert_eq!(o.body, BodyFormat::Json);
        let o = opts(&[
            "--preset",
            "entra",
            "--token-endpoint",
            "https://login.example/t/oauth2/v2.0/token",
            "--param",
            "client_id=app",
            "--param",
            "scope=https://graph.microsoft.com/.default",
        ])
        .unwrap();
        assert_eq!(o.grant, Grant::ClientAssertion);
        assert_eq!(o.assertion_audience(), exchange::ENTRA_AUDIENCE);
        assert!(opts(&[
            "--preset",
            "entra",
            "--token-endpoint",
            "https://l/t",
            "--param",
            "client_id=a"
        ])
        .is_err());
        assert!(opts(&["--param", "x"]).is_err(), "no endpoint");
        assert!(
            opts(&["--preset", "rfc8693"]).is_err(),
            "no endpoint for rfc8693"
        );
        assert!(opts(&["--token-endpoint", "https://a/t", "--param", "novalue"]).is_err());
    }
}
