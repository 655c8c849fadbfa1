//! Builds the eBPF object (nightly, bpfel-unknown-none) and the userspace
//! binary that embeds it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

use crate::setup;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn xdp_object() -> PathBuf {
    workspace_root().join("target/bpfel-unknown-none/release/gatekeeper-xdp")
}

pub fn gatekeeper_binary() -> PathBuf {
    workspace_root().join("target/release/gatekeeper")
}

/// A cargo command for the eBPF crate: nightly, its own manifest, no inherited compiler overrides.
fn ebpf_cargo(subcommand: &str) -> Command {
    let root = workspace_root();
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", subcommand])
        .current_dir(root.join("gatekeeper-ebpf"))
        .arg("--release")
        .arg("--target-dir")
        .arg(root.join("target"));
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn workspace_cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args)
        .current_dir(workspace_root())
        .env("GATEKEEPER_XDP_OBJECT", xdp_object());
    cmd
}

pub fn run() -> Result<PathBuf> {
    setup::ensure_build_tools()?;
    if !ebpf_cargo("build").status()?.success() {
        bail!("building the eBPF program failed");
    }
    if !workspace_cargo(&["build", "--release", "-p", "gatekeeper"])
        .status()?
        .success()
    {
        bail!("building gatekeeper failed");
    }
    println!(
        "built {} (embeds {})",
        gatekeeper_binary().display(),
        xdp_object().display()
    );
    Ok(gatekeeper_binary())
}

/// Builds a bench-only example of the gatekeeper crate (after [`run`]); returns its path.
pub fn example(name: &str) -> Result<PathBuf> {
    if !workspace_cargo(&["build", "--release", "-p", "gatekeeper", "--example", name])
        .status()?
        .success()
    {
        bail!("building the {name} example failed");
    }
    Ok(workspace_root().join("target/release/examples").join(name))
}

/// The kernel-level integration test executables (built if needed).
pub fn integration_test_binaries() -> Result<Vec<PathBuf>> {
    let out = workspace_cargo(&[
        "test",
        "--release",
        "-p",
        "gatekeeper-tests",
        "--tests",
        "--no-run",
        "--message-format=json",
    ])
    .stderr(std::process::Stdio::inherit())
    .output()?;
    if !out.status.success() {
        bail!("building the integration tests failed");
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = message["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "test"));
        if let (true, Some(path)) = (is_test, message["executable"].as_str()) {
            binaries.push(PathBuf::from(path));
        }
    }
    if binaries.is_empty() {
        bail!("cargo reported no integration test executables");
    }
    Ok(binaries)
}

pub fn lint() -> Result<()> {
    run()?;
    let checks: Vec<(&str, Command)> = vec![
        (
            "cargo fmt",
            workspace_cargo(&["fmt", "--all", "--", "--check"]),
        ),
        ("eBPF cargo fmt", {
            let mut c = Command::new("rustup");
            c.args(["run", "nightly", "cargo", "fmt", "--", "--check"])
                .current_dir(workspace_root().join("gatekeeper-ebpf"));
            c
        }),
        (
            "cargo clippy",
            workspace_cargo(&[
                "clippy",
                "--release",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        ),
        ("eBPF cargo clippy", {
            let mut c = ebpf_cargo("clippy");
            c.args(["--", "-D", "warnings"]);
            c
        }),
    ];
    for (name, mut cmd) in checks {
        if !cmd.status()?.success() {
            bail!("{name} failed");
        }
    }
    Ok(())
}

pub fn cargo_test(extra: &[String], notes: &Path) -> Result<bool> {
    let mut cmd = workspace_cargo(&["test", "--release", "--workspace"]);
    cmd.env("GATEKEEPER_BIN", gatekeeper_binary())
        .env("GATEKEEPER_TEST_NOTES", notes);
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    Ok(cmd.status()?.success())
}
