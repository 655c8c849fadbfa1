//! Points `include_bytes_aligned!` at the eBPF object built by `cargo xtask build`.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=GATEKEEPER_XDP_OBJECT");
    let object = std::env::var_os("GATEKEEPER_XDP_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
            manifest.join("../target/bpfel-unknown-none/release/gatekeeper-xdp")
        });
    if !object.exists() {
        panic!(
            "eBPF object {} not found: build with `cargo xtask build`, which compiles it first",
            object.display()
        );
    }
    let object = object.canonicalize().expect("canonical eBPF object path");
    println!("cargo:rerun-if-changed={}", object.display());
    println!("cargo:rustc-env=GATEKEEPER_XDP_OBJECT={}", object.display());
}
