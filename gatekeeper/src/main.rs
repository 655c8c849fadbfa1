//! Gatekeeper: an SMTP edge gatekeeper. One binary: `gatekeeper run` is the
//! daemon, every other verb talks to it over the control socket.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use gatekeeper::cli::{Cli, Command};
use gatekeeper::commands::{self, UsageError};
use gatekeeper::{assets, config, daemon};

fn main() -> ExitCode {
    // The packaging verb is added here, not in `Cli`, so the man pages and
    // completions generated from `Cli` do not show it.
    let matches = Cli::command().subcommand(assets::command()).get_matches();
    let result = match matches.subcommand() {
        Some((assets::VERB, args)) => assets::run(args),
        _ => {
            let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
            match cli.command {
                Command::Run => run_daemon(&cli),
                _ => commands::dispatch(&cli),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gatekeeper: {error:#}");
            if error.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run_daemon(cli: &Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = config::Config::load(&cli.config)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(daemon::run(config))
}
