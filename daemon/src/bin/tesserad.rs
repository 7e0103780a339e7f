//! `tesserad`: the tessera daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tesserad::runtime::config::{Config, DEFAULT_CONFIG_PATH};
use tesserad::runtime::dev::{self, DevBackend};

/// jemalloc rather than glibc's malloc for the daemon's own allocations. Under load requests
/// hop across a hundred blocking-pool threads; with glibc's per-thread arenas RSS kept
/// creeping through a 10-minute soak while the live heap stayed under 10 MiB (heaptrack),
/// and `MALLOC_ARENA_MAX=2` did not stop it. With jemalloc (freed pages handed back by its
/// background thread) RSS levelled off and the soak's throughput rose by a fifth
/// (BENCHMARKS.md, soak). The PKCS#11 module, SQLite and the TSS still use glibc's malloc.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "tesserad",
    version,
    about = "Hardware-backed identities for local AI agents"
)]
struct Args {
    /// Config file.
    #[arg(long, default_value = DEFAULT_CONFIG_PATH, conflicts_with = "dev")]
    config: PathBuf,
    /// Validate a config file and exit.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// Run on an embedded default: a SoftHSM token (or a private swtpm) under --state-dir.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "pkcs11")]
    dev: Option<DevBackend>,
    /// State directory for --dev.
    #[arg(long, default_value = ".tessera-dev", requires = "dev")]
    state_dir: PathBuf,
    /// D-Bus for --dev: "none", "session", "system" or an address.
    #[arg(long, requires = "dev")]
    bus: Option<String>,
    /// Start even though the audit trail fails its start-up check (records removed or
    /// rewritten since the last signed checkpoint, an edited record at its end). The trail is
    /// left as found and `audit.tamper_accepted` is recorded; `tessera audit verify` still
    /// reports the damage.
    #[arg(long)]
    accept_audit_tamper: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tesserad::runtime::logging::init();
    // Everything we create (state, keys, audit) is ours alone; the socket is opened up explicitly.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // No core dumps or ptrace by other processes of our uid: session proof keys live in memory.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("tesserad: cannot clear the dumpable flag: {e}");
    }
    if let Some(path) = &args.check_config {
        return match Config::load(path) {
            Ok(_) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tesserad: {e}");
                ExitCode::from(2)
            }
        };
    }
    // Dev setup sets SOFTHSM2_CONF: do it before the runtime starts any thread.
    let (cfg, dev_env, config_path) = match args.dev {
        Some(kind) => match dev::prepare(kind, &args.state_dir, args.bus.as_deref()) {
            Ok(env) => (env.config.clone(), Some(env), None),
            Err(e) => {
                eprintln!("tesserad: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        None => match Config::load(&args.config) {
            Ok(c) => (c, None, Some(args.config.clone())),
            Err(e) => {
                eprintln!("tesserad: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tesserad: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = tesserad::runtime::StartOptions {
        accept_audit_tamper: args.accept_audit_tamper,
    };
    let res = rt.block_on(tesserad::runtime::run(cfg, config_path.as_deref(), opts));
    drop(dev_env);
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "tesserad failed");
            eprintln!("tesserad: {e:#}");
            ExitCode::FAILURE
        }
    }
}
