//! `cargo xtask`: toolchain setup, builds, tests and the demo, so a fresh
//! machine needs nothing but the README's two commands.

mod bench;
mod build;
mod demo;
mod package;
mod setup;
mod test;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what builds and tests need (idempotent, quick when all is present).
    Setup,
    /// Build the eBPF object and the gatekeeper binary that embeds it.
    Build,
    /// Build, then run every test (unit and kernel-level integration).
    Test {
        /// Skip the VM matrix (quick local runs); CI runs it.
        #[arg(long)]
        no_vm: bool,
        /// Extra arguments for `cargo test` after `--` (e.g. a test name filter).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// The kernel-level integration tests inside QEMU on Debian's 6.1 and 6.12 kernels.
    VmTest {
        /// 6.1, 6.12 or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Only the integration tests whose names contain this (libtest filter).
        #[arg(long)]
        filter: Option<String>,
        /// Run the selection this many times in one boot (e.g. 20 for a flakiness check).
        #[arg(long, default_value_t = 1)]
        repeat: u32,
    },
    /// Build, then show the gatekeeper at work in a sandbox of network namespaces.
    Demo,
    /// Benchmarks (not tests): figures as ratios against a same-run baseline, into BENCHMARKS.md.
    Bench {
        /// Seconds-long smoke run with small inputs; BENCHMARKS.md is left alone.
        #[arg(long)]
        quick: bool,
        /// Run one section only (verdict, import, smtp, idle, dnsbl); BENCHMARKS.md is left alone.
        #[arg(long)]
        only: Option<String>,
    },
    /// cargo fmt --check and cargo clippy on every crate, eBPF included.
    Lint,
    /// Build, then the Debian package (target/debian/gatekeeper_VERSION_ARCH.deb).
    Package {
        /// Debian version instead of the crate's (e.g. 0.1.0+local1).
        #[arg(long)]
        deb_version: Option<String>,
    },
    /// Install, upgrade and purge the package in a throwaway Debian root; lintian; unit verify.
    PackageTest,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Build => build::run().map(|_| ()),
        Command::Test {
            no_vm,
            cargo_test_args,
        } => test::run(&cargo_test_args, !no_vm),
        Command::VmTest {
            kernel,
            filter,
            repeat,
        } => vm::run(&kernel, &vm::Selection { filter, repeat }).map(|_| ()),
        Command::Demo => demo::run(),
        Command::Bench { quick, only } => bench::run(quick, only.as_deref()),
        Command::Lint => build::lint(),
        Command::Package { deb_version } => package::run(deb_version.as_deref()).map(|_| ()),
        Command::PackageTest => package::test(),
    }
}
