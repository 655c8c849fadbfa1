//! The VM's root filesystem: busybox for `/init`, the gatekeeper binary, the
//! integration test binaries, the tools the tests drive, each with its ldd
//! closure, and `veth.ko`.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::cpio::CpioWriter;

/// Tools the integration tests run, found on the host's PATH and copied to the same path.
pub const TOOLS: &[&str] = &[
    "ip",
    "nsenter",
    "setpriv",
    "ethtool",
    "smtp-sink",
    "rbldnsd",
    "haproxy",
    "ss",
    "xz",
    "bpftool",
];

enum Content {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

/// Files by their path inside the VM.
#[derive(Default)]
pub struct Initramfs {
    files: BTreeMap<String, (u32, Content)>,
}

impl Initramfs {
    pub fn add_bytes(&mut self, path: &str, mode: u32, bytes: Vec<u8>) {
        self.files
            .insert(path.into(), (mode, Content::Bytes(bytes)));
    }

    pub fn add_file(&mut self, path: &str, mode: u32, host: &Path) {
        self.files
            .insert(path.into(), (mode, Content::Host(host.to_owned())));
    }

    /// A dynamically linked program and every shared library `ldd` says it loads.
    pub fn add_program(&mut self, path: &str, host: &Path) -> Result<()> {
        self.add_file(path, 0o755, host);
        for library in shared_libraries(host)? {
            let inside = library.display().to_string();
            self.add_file(&inside, 0o755, &library);
        }
        Ok(())
    }

    /// A host tool at the path the host has it, so `$PATH` lookups find it.
    pub fn add_tool(&mut self, name: &str) -> Result<()> {
        let host = which(name).with_context(|| format!("{name} is not installed on the host"))?;
        self.add_program(&host.display().to_string(), &host)
    }

    pub fn write(&self, out: &Path) -> Result<u64> {
        let file =
            std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut cpio = CpioWriter::new(BufWriter::new(file));
        for dir in ["dev", "proc", "sys", "run", "tmp", "root", "var"] {
            cpio.dir(dir)?;
        }
        // `ip netns` keeps its mounts under /var/run/netns.
        cpio.symlink("var/run", "/run")?;
        for (path, (mode, content)) in &self.files {
            let bytes = match content {
                Content::Bytes(bytes) => bytes.clone(),
                Content::Host(host) => {
                    std::fs::read(host).with_context(|| format!("reading {}", host.display()))?
                }
            };
            cpio.file(path, *mode, &bytes)?;
        }
        let mut writer = cpio.finish()?;
        std::io::Write::flush(&mut writer)?;
        Ok(std::fs::metadata(out)?.len())
    }
}

/// Libraries (and the dynamic loader) from `ldd`; none for a static binary.
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    let mut libraries = Vec::new();
    for line in text.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libraries.push(PathBuf::from(path));
        } else if line.contains("not found") {
            bail!("{}: {}", program.display(), line.trim());
        }
    }
    Ok(libraries)
}

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A copy without debug info (test binaries are hundreds of MB with it).
pub fn stripped(binary: &Path, dir: &Path) -> Result<PathBuf> {
    let out = dir.join(binary.file_name().context("binary name")?);
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(binary)
        .status()
        .context("running strip (binutils)")?;
    if !status.success() {
        bail!("strip {} failed", binary.display());
    }
    Ok(out)
}
