//! Embeds the XDP object: the one `GATEKEEPER_XDP_OBJECT` names (`cargo xtask
//! build` compiles it first and sets it), or else one built here with
//! aya-build, as aya's own template does, so that plain `cargo build` and
//! `cargo test` work from a fresh clone.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=GATEKEEPER_XDP_OBJECT");
    let object = match std::env::var_os("GATEKEEPER_XDP_OBJECT") {
        Some(object) => {
            let object = PathBuf::from(object);
            if !object.exists() {
                panic!(
                    "eBPF object {} (GATEKEEPER_XDP_OBJECT) not found: unset it to build the object here, or build with `cargo xtask build`",
                    object.display()
                );
            }
            let object = object.canonicalize().expect("canonical eBPF object path");
            println!("cargo:rerun-if-changed={}", object.display());
            object
        }
        // Not rerun-if-changed: written during this run, it would look newer
        // than the run and rerun the build every time.
        None => build_ebpf(),
    };
    println!("cargo:rustc-env=GATEKEEPER_XDP_OBJECT={}", object.display());
}

/// Builds gatekeeper-ebpf (nightly, bpfel-unknown-none) into `OUT_DIR`. aya-build
/// gives the nested cargo its own target dir there (no lock on ours), and
/// reruns only when the eBPF crate or gatekeeper-common change.
fn build_ebpf() -> PathBuf {
    let manifest =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().expect("workspace root");
    let ebpf = root.join("gatekeeper-ebpf");
    if let Err(missing) = check_tools() {
        panic!("cannot build the eBPF program: {missing}; run `cargo xtask setup` (it installs nightly, rust-src and bpf-linker)");
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("gatekeeper-common").display()
    );
    // aya-build runs cargo in the current directory; the eBPF crate is a
    // workspace of its own (excluded from ours), so run it from there.
    std::env::set_current_dir(&ebpf).expect("entering gatekeeper-ebpf");
    let package = aya_build::Package {
        name: "gatekeeper-ebpf",
        root_dir: ebpf.to_str().expect("UTF-8 path to gatekeeper-ebpf"),
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::Nightly) {
        panic!("building the eBPF program failed: {e:#}");
    }
    PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("gatekeeper-xdp")
}

/// What the eBPF build needs beyond stable Rust.
fn check_tools() -> Result<(), String> {
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env_remove("RUSTC")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .ok_or("the nightly toolchain is not installed")?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout);
    if !Path::new(sysroot.trim())
        .join("lib/rustlib/src/rust/library/core")
        .is_dir()
    {
        return Err("nightly has no rust-src component".into());
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|out| out.status.success()) {
        return Err("bpf-linker is not installed".into());
    }
    Ok(())
}
