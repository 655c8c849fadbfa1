//! Idempotent machine setup: nightly + rust-src, bpf-linker built against the
//! nightly's own LLVM, Debian packages for the tests, bpffs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Debian packages the tests, demo and benchmarks drive.
const PACKAGES: &[&str] = &[
    "iproute2",
    "util-linux",
    "ethtool",
    "nftables",
    "bpftool",
    "xdp-tools",
    "rbldnsd",
    "postfix",
    // saslpasswd2: the Postfix fixture's Cyrus SASL users (sasldb).
    "sasl2-bin",
    // FCrDNS tests: PTR and A records for the clients.
    "dnsmasq-base",
    "swaks",
    "hping3",
    "netsniff-ng",
    // PROXY protocol tests: a real balancer in front of the daemon.
    "haproxy",
    // `promtool check metrics` and `fail2ban-regex` judge the daemon's output.
    "prometheus",
    "fail2ban",
    // The fleet tests and bench: a private Redis the hosts share verdicts through.
    "redis-server",
    // The VM matrix: QEMU, busybox for its /init, xz for 6.12's modules, strip.
    "qemu-system-x86",
    "busybox-static",
    "xz-utils",
    "binutils",
];

/// What `cargo xtask package-test` drives: a throwaway Debian root, lintian,
/// systemd-analyze.
const PACKAGING_PACKAGES: &[&str] = &["debootstrap", "lintian", "systemd"];

/// cargo-deb builds the .deb; this release builds on rustc 1.85 and later.
const CARGO_DEB_VERSION: &str = "3.8.0";

pub fn run() -> Result<()> {
    ensure_nightly()?;
    ensure_bpf_linker()?;
    ensure_cargo_deb()?;
    ensure_packages(PACKAGES)?;
    ensure_packages(PACKAGING_PACKAGES)?;
    ensure_bpffs()?;
    println!("setup: all present");
    Ok(())
}

/// Runs setup only for the parts that are missing; build/test/demo call this.
pub fn ensure_build_tools() -> Result<()> {
    ensure_nightly()?;
    ensure_bpf_linker()
}

fn ensure_nightly() -> Result<()> {
    let has_nightly = output("rustup", &["toolchain", "list"])?
        .lines()
        .any(|l| l.starts_with("nightly"));
    if !has_nightly {
        status(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    let sysroot = nightly_sysroot()?;
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        status(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    Ok(PathBuf::from(
        output("rustc", &["+nightly", "--print", "sysroot"])?.trim(),
    ))
}

fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/gatekeeper")
}

/// bpf-linker must link against the same LLVM as the nightly that emits the
/// bitcode; a stamp records which libLLVM it was built for.
fn ensure_bpf_linker() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    let libllvm = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        })
        .context("nightly toolchain ships no libLLVM.so.*")?;
    let prefix = cache_dir().join("llvm");
    let stamp = prefix.join("stamp");
    let wanted = libllvm.display().to_string();
    let works = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if works && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == wanted) {
        return Ok(());
    }
    let version = output("rustc", &["+nightly", "-vV"])?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV reports no LLVM version")?
        .to_owned();
    println!("setup: building bpf-linker against {wanted} (LLVM {major}), about a minute");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    for link in [
        lib.join("libLLVM.so"),
        lib.join(libllvm.file_name().unwrap()),
    ] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)?;
    }
    let ok = Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "--force",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .status()?
        .success();
    if !ok {
        bail!("installing bpf-linker failed");
    }
    std::fs::write(&stamp, wanted)?;
    Ok(())
}

/// Installs cargo-deb unless that version is already there.
pub fn ensure_cargo_deb() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION));
    if installed {
        return Ok(());
    }
    println!("setup: installing cargo-deb {CARGO_DEB_VERSION}");
    status(
        "cargo",
        &[
            "install",
            "cargo-deb",
            "--locked",
            "--version",
            CARGO_DEB_VERSION,
        ],
    )
}

/// What `package-test` needs besides the build tools.
pub fn ensure_packaging_tools() -> Result<()> {
    ensure_cargo_deb()?;
    ensure_packages(PACKAGING_PACKAGES)
}

fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    // Postfix must not configure (or start) a system mail server: tests run their own.
    let mut debconf = Command::new("debconf-set-selections")
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(
        debconf.stdin.as_mut().unwrap(),
        b"postfix postfix/main_mailer_type select No configuration\n",
    )?;
    debconf.wait()?;
    status("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    let ok = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?
        .success();
    if !ok {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

fn ensure_bpffs() -> Result<()> {
    let dir = Path::new("/sys/fs/bpf");
    let fs_type = output("stat", &["-f", "-c", "%T", "/sys/fs/bpf"]).unwrap_or_default();
    if fs_type.trim() == "bpf_fs" {
        return Ok(());
    }
    std::fs::create_dir_all(dir).ok();
    status("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])
}

pub fn status(program: &str, args: &[&str]) -> Result<()> {
    let ok = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("spawning {program}"))?
        .success();
    if !ok {
        bail!("{program} {} failed", args.join(" "));
    }
    Ok(())
}

pub fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("spawning {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    output("id", &["-u"]).is_ok_and(|s| s.trim() == "0")
}

/// What `vm-test` needs besides the build tools: QEMU and friends.
pub fn ensure_vm_tools() -> Result<()> {
    if !is_root() {
        bail!("vm-test installs QEMU and runs the kernel-level tests: run it as root");
    }
    ensure_packages(PACKAGES)
}

/// Full setup when something a test or the demo needs is missing.
pub fn ensure_runtime() -> Result<()> {
    if is_root() {
        ensure_packages(PACKAGES)?;
        ensure_bpffs()?;
    } else {
        println!("setup: not root, skipping Debian packages and bpffs");
    }
    Ok(())
}
