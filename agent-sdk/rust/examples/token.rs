//! An agent that asks tesserad for a token and shows who it is.
//! `cargo run -p tessera --example token -- https://api.example.com read`

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), tessera::Error> {
    let mut args = std::env::args().skip(1);
    let audience = args
        .next()
        .unwrap_or_else(|| "https://api.example.com".into());
    let client = tessera::Client::from_env();
    let me = client.whoami().await?;
    println!("I am {} ({})", me.name, me.id);
    let mut opts = tessera::TokenOptions::new(audience);
    for s in args {
        opts = opts.scope(s);
    }
    match client.token(&opts).await {
        Ok(t) => println!(
            "Authorization: Bearer {}\n(expires {})",
            t.token, t.expires_at
        ),
        Err(e) if e.problem() == Some(tessera::ProblemType::RateLimited) => {
            eprintln!("slow down: {e}");
        }
        Err(e) => return Err(e),
    }
    Ok(())
}
