//! Checks that turn obscure kernel errors into one clear line before we try.

use std::path::Path;

use anyhow::{bail, Context, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// Loading and attaching XDP needs CAP_NET_ADMIN and CAP_BPF (or CAP_SYS_ADMIN on older kernels).
pub fn check_privileges() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")
        .context("cannot read /proc/self/status to check capabilities")?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff line in /proc/self/status")?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !missing.is_empty() {
        bail!(
            "gatekeeper run must run as root or with {} (missing: {})",
            "CAP_BPF and CAP_NET_ADMIN",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Every configured interface must exist before anything is loaded.
pub fn check_interfaces(interfaces: &[String]) -> Result<()> {
    for name in interfaces {
        if nix::net::if_::if_nametoindex(name.as_str()).is_err() {
            bail!("unknown interface '{name}' (from `interfaces` in the config)");
        }
    }
    Ok(())
}

/// `bpffs_dir` must live on a mounted bpf filesystem; creates the directory.
///
/// A fresh host (or a private mount namespace such as `ip netns exec` makes)
/// has nothing at /sys/fs/bpf, so like bpftool we mount it there when needed.
pub fn prepare_bpffs_dir(dir: &Path) -> Result<()> {
    const BPFFS_ROOT: &str = "/sys/fs/bpf";
    if !on_bpffs(dir)? && dir.starts_with(BPFFS_ROOT) && Path::new(BPFFS_ROOT).is_dir() {
        nix::mount::mount(
            Some("bpf"),
            BPFFS_ROOT,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| {
            format!(
                "bpffs_dir {}: mounting bpffs at {BPFFS_ROOT}",
                dir.display()
            )
        })?;
        tracing::info!("mounted bpffs at {BPFFS_ROOT}");
    }
    if !on_bpffs(dir)? {
        bail!(
            "bpffs_dir {} is not on a bpf filesystem (mount one with: mount -t bpf bpf /sys/fs/bpf)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("bpffs_dir {}: cannot create", dir.display()))?;
    Ok(())
}

fn on_bpffs(dir: &Path) -> Result<bool> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let fs = nix::sys::statfs::statfs(existing)
        .with_context(|| format!("bpffs_dir {}: cannot stat", existing.display()))?;
    #[allow(clippy::unnecessary_cast)] // the field's integer type differs between libcs
    Ok(fs.filesystem_type().0 as u64 == BPF_FS_MAGIC)
}
