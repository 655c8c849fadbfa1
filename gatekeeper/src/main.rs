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
            match &cli.command {
                // Its exit status is the verdict, so it maps its own errors.
                Command::Probe(args) => return probe_command(args),
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

/// Errors are exit status 2 ("could not test"), never 1: 1 means open.
fn probe_command(args: &gatekeeper::cli::ProbeArgs) -> ExitCode {
    match gatekeeper::probe::cli::run(args) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("gatekeeper probe: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// The config is read first so its `log_format` and `log_level` apply; a bad
/// one is reported on stderr by `main` before any logging exists.
fn run_daemon(cli: &Cli) -> anyhow::Result<()> {
    let (config, warnings) = config::Config::load_with_warnings(&cli.config)?;
    init_logging(config.log_format, config.log_level);
    for warning in warnings {
        tracing::warn!("config: {warning}");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(daemon::run(config, cli.config.clone()))
}

/// `RUST_LOG`, when set and valid, overrides `log_level`. Under systemd
/// (`JOURNAL_STREAM` set) text lines carry no timestamp: journald adds its own.
fn init_logging(format: config::LogFormat, level: config::LogLevel) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level.directive()));
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        config::LogFormat::Json => builder.json().init(),
        config::LogFormat::Text => {
            let builder = builder
                .with_ansi(!under_journald && std::io::IsTerminal::is_terminal(&std::io::stderr()));
            if under_journald {
                builder.without_time().init()
            } else {
                builder.init()
            }
        }
    }
}
