//! The `teams-router` command: `serve` (default) and `check-config`.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use teams_router::config::Config;

const DEFAULT_CONFIG: &str = "config/router.toml";

/// jemalloc's background threads return freed pages to the system, so resident memory falls back
/// after idle conversations are passivated (glibc and mimalloc kept most of it mapped).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(version, about = "Routes Microsoft Teams activities to many bots")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file (TOML); keys can be overridden by TEAMS_ROUTER__SECTION__KEY.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the router (the default).
    Serve,
    /// Validate the configuration and print it with secrets masked.
    CheckConfig,
}

fn main() -> ExitCode {
    // One crypto provider for every TLS user in the process, before anything builds a config.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "teams-router: invalid configuration {}: {e}",
                cli.config.display()
            );
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            print!("{}", config.to_masked_toml());
            eprintln!(
                "teams-router: configuration {} is valid",
                cli.config.display()
            );
            ExitCode::SUCCESS
        }
        Command::Serve => {
            teams_router::app::init_logging();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("teams-router: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(teams_router::app::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("teams-router: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
