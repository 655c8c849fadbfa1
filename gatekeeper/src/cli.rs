//! The command line: one binary for the daemon and the operator's verbs.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::DEFAULT_PATH;

#[derive(Debug, Parser)]
#[command(
    name = "gatekeeper",
    version,
    about = "SMTP edge gatekeeper: XDP fast path and control daemon"
)]
pub struct Cli {
    /// Config file (the CLI verbs read it only to find the control socket).
    #[arg(short = 'c', long = "config", global = true, default_value = DEFAULT_PATH)]
    pub config: PathBuf,
    /// Control socket of the running daemon; overrides the config's `control_socket`.
    #[arg(long = "control", global = true)]
    pub control: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (logs to stderr; RUST_LOG sets the level).
    Run,
    /// Manage the denylist: SYNs to protected ports from these prefixes are dropped.
    Deny {
        #[command(subcommand)]
        action: ListAction,
    },
    /// Manage the allowlist: these prefixes are never dropped, whatever else lists them.
    Allow {
        #[command(subcommand)]
        action: ListAction,
    },
    /// Show the XDP counters and list sizes of the running daemon.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Show what the gatekeeper thinks of an address: map state, per-zone DNSBL answers, score, verdict.
    Check {
        #[arg(value_name = "IP")]
        ip: String,
        /// Ask the DNSBL zones even if a cached verdict exists.
        #[arg(long)]
        fresh: bool,
        #[arg(long)]
        json: bool,
    },
    /// DNSBL verdicts held in the kernel.
    Dnsbl {
        #[command(subcommand)]
        action: DnsblAction,
    },
    /// Make the running daemon re-read its config file and apply it live
    /// (exit 0 applied, 2 refused with every error named, 1 daemon not reachable).
    Reload,
    /// Work with config files without a daemon.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Lists the daemon fetches and refreshes itself (`[[feeds]]` in the config).
    Feeds {
        #[command(subcommand)]
        action: FeedsAction,
    },
    /// Relay grants (POP-before-SMTP): addresses that may relay for a while,
    /// granted from the IMAP/POP server's post-login hook.
    Relay {
        #[command(subcommand)]
        action: RelayAction,
    },
    /// Test an SMTP server (any, with or without a gatekeeper in front) for
    /// third-party relay: exit 0 closed, 1 open, 2 could not test. Never sends DATA
    /// for a relay case; needs no daemon and no root.
    Probe(ProbeArgs),
    /// Auto-bans: clients the SMTP front end banned into the kernel denylist (`[bans]`).
    Bans {
        #[command(subcommand)]
        action: BansAction,
    },
    /// The fleet (`[cluster]`): verdicts shared with the other hosts through Redis.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterAction {
    /// The link: connected, last stream id, lag, verdicts applied/published/skipped, peers.
    Status(ListArgs),
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The server: a name or address, with `:PORT` (IPv6 as `[ADDR]:PORT`).
    #[arg(value_name = "HOST[:PORT]")]
    pub target: String,
    /// A domain the server accepts mail for; default: from the banner's host name.
    #[arg(long, value_name = "D")]
    pub local_domain: Option<String>,
    /// A local user the server must accept (the control recipient).
    #[arg(long, value_name = "U", default_value = "postmaster")]
    pub local_user: String,
    /// An outside domain the server must never relay to (keep it reserved, e.g. under .invalid).
    #[arg(long, value_name = "D", default_value = crate::probe::DEFAULT_VICTIM)]
    pub victim: String,
    /// The envelope sender of the foreign-sender cases; default gatekeeper-probe@VICTIM.
    #[arg(long, value_name = "ADDR")]
    pub sender: Option<String>,
    /// The EHLO name; default probe.VICTIM.
    #[arg(long, value_name = "NAME")]
    pub helo: Option<String>,
    /// Connect from this local address.
    #[arg(long, value_name = "ADDR")]
    pub source: Option<std::net::IpAddr>,
    /// For the connection and for each reply.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    /// Only the cases whose `family/case` contains PATTERN (`*` globs; commas separate patterns).
    #[arg(long, value_name = "PATTERN")]
    pub only: Option<String>,
    /// Use STARTTLS when the server offers it (the certificate is not verified).
    #[arg(long)]
    pub starttls: bool,
    /// Also learn which end-of-data forms the server takes (sends one message to the local user).
    #[arg(long)]
    pub smuggling: bool,
    /// One JSON object with every case and its transcript.
    #[arg(long)]
    pub json: bool,
    /// Print each case's transcript.
    #[arg(short, long)]
    pub verbose: bool,
}

#[derive(Debug, Subcommand)]
pub enum RelayAction {
    /// Let IP relay until the grant runs out (a later grant extends, never shortens it).
    Grant {
        #[arg(value_name = "IP")]
        ip: String,
        /// How long (e.g. `30m`, `2h`; 1s to 10y).
        #[arg(long, default_value = "30m", value_parser = crate::lists::ttl::parse_ttl_arg)]
        ttl: crate::lists::ttl::Ttl,
    },
    /// End IP's grant now.
    Revoke {
        #[arg(value_name = "IP")]
        ip: String,
    },
    /// Live grants with their expiry.
    List(ListArgs),
}

#[derive(Debug, Subcommand)]
pub enum BansAction {
    /// Live bans: client, reason, events, expiry.
    List(ListArgs),
    /// Lift the bans covering IP (or all with --all) and forget their history.
    Clear {
        #[arg(
            value_name = "IP",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        ip: Option<String>,
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Report every error and warning in a config file at once (exit 0 valid, 2 invalid).
    Check {
        /// The file to check; default: the `--config` path.
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum FeedsAction {
    /// Each feed: source, list, interval, entries, last success and error, next refresh, failures.
    List(ListArgs),
    /// Refresh one feed (or all) now and report what changed; exit 1 if a refresh failed.
    Refresh {
        #[arg(value_name = "NAME")]
        name: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DnsblAction {
    /// Live kernel DNSBL entries with their expiry.
    List(ListArgs),
    /// Forget verdicts (kernel entry and cache) for one address, or for all; they are checked afresh.
    Flush {
        #[arg(value_name = "IP")]
        ip: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ListAction {
    /// Add addresses or CIDRs (all or nothing).
    Add {
        #[arg(required = true, value_name = "PREFIX")]
        prefixes: Vec<String>,
        /// Why they are listed; shown by `list`.
        #[arg(long)]
        reason: Option<String>,
        /// Make the entries temporary (e.g. `90s`, `1h`, `7d`; 1s to 10y); they stop matching when it runs out.
        #[arg(long, value_parser = crate::lists::ttl::parse_ttl_arg)]
        ttl: Option<crate::lists::ttl::Ttl>,
        /// Share with the fleet (`[cluster]`): every host lists them.
        #[arg(long)]
        share: bool,
    },
    /// Remove addresses or CIDRs (all or nothing; each must be listed).
    Del {
        #[arg(required = true, value_name = "PREFIX")]
        prefixes: Vec<String>,
        /// Withdraw the fleet's claims on them, here and on every host
        /// (only shared entries go; local ones stay).
        #[arg(long)]
        share: bool,
    },
    /// Print the list.
    List(ListArgs),
    /// Add every prefix of a file (Spamhaus DROP text or JSON, or one per line; `-` for stdin).
    Import {
        file: PathBuf,
        /// Make the list exactly the file's contents instead of adding to it.
        #[arg(long)]
        replace: bool,
    },
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long)]
    pub json: bool,
}
