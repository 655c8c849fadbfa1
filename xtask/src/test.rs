//! `cargo xtask test`: every test, with kernel-level ones run for real, on
//! the host and then in VMs on the kernels edge hosts run.

use anyhow::{bail, Result};

use crate::{bench, build, package, setup, vm};

pub fn run(extra: &[String], with_vm: bool) -> Result<()> {
    setup::ensure_runtime()?;
    build::run()?;
    if !setup::is_root() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            bail!("CI=true but not running as root: the kernel-level tests cannot run");
        }
        println!("\n*** not root: kernel-level tests will SKIP (loudly); run as root for the full suite ***\n");
    }
    let notes = build::workspace_root().join("target/test-notes.txt");
    let _ = std::fs::remove_file(&notes);
    let passed = build::cargo_test(extra, &notes)?;
    if let Ok(text) = std::fs::read_to_string(&notes) {
        println!("\nNotes from the kernel-level tests:\n{text}");
    }
    if !passed {
        bail!("tests failed");
    }
    if setup::is_root() {
        println!("\n== cargo xtask package-test (install, upgrade, purge in a throwaway root)");
        package::test()?;
        // The benchmarks are not tests, but their smoke run keeps them from rotting.
        println!("\n== cargo xtask bench --quick (smoke run; figures not recorded)");
        bench::run(true, None)?;
    }
    if !with_vm {
        println!("\n*** --no-vm: the VM matrix (Debian 6.1 and 6.12 kernels) did NOT run ***");
        return Ok(());
    }
    if !extra.is_empty() {
        println!("\n*** test filter given: the VM matrix runs the whole integration suite regardless ***");
    }
    let results = vm::run("all", &vm::Selection::default())?;
    let summary: Vec<String> = results.iter().map(ToString::to_string).collect();
    println!("\nhost: all tests passed; {}", summary.join("; "));
    Ok(())
}
