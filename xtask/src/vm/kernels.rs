//! Debian's own kernels, fetched once into `~/.cache/gatekeeper/vm/` and
//! unpacked there (never installed into the host's /boot).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::setup;

/// A kernel of the test matrix.
pub struct KernelSpec {
    /// What `--kernel` calls it.
    pub name: &'static str,
    pub package: &'static str,
}

pub const MATRIX: &[KernelSpec] = &[
    KernelSpec {
        name: "6.1",
        package: "linux-image-6.1.0-56-amd64",
    },
    KernelSpec {
        name: "6.12",
        package: "linux-image-6.12.117+deb12-amd64",
    },
];

/// Modules the tests need, in load order: veth (required) and, where the
/// kernel ships it, 802.1Q with its dependencies for the VLAN test.
const MODULES: &[(&str, bool)] = &[
    ("veth", true),
    ("llc", false),
    ("stp", false),
    ("mrp", false),
    ("garp", false),
    ("8021q", false),
];

/// An unpacked kernel: its image, its modules (uncompressed, in load order) and its upstream version.
pub struct Kernel {
    pub version: String,
    pub image: PathBuf,
    pub modules: Vec<PathBuf>,
}

pub fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".cache/gatekeeper/vm")
}

pub fn fetch(spec: &KernelSpec) -> Result<Kernel> {
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let deb = match find_deb(&cache, spec.package)? {
        Some(deb) => deb,
        None => {
            download(&cache, spec.package)?;
            find_deb(&cache, spec.package)?.context("apt-get download left no .deb")?
        }
    };
    let unpacked = cache.join(spec.name);
    let stamp = unpacked.join(".unpacked");
    if !stamp.exists() {
        let _ = std::fs::remove_dir_all(&unpacked);
        let (deb_path, dir) = (path_str(&deb)?, path_str(&unpacked)?);
        setup::status("dpkg-deb", &["-x", deb_path, dir])?;
        std::fs::write(&stamp, deb.display().to_string())?;
    }
    let version = deb_version(&deb)?;
    let image = only_match(&unpacked.join("boot"), "vmlinuz-")?;
    let tree = only_match(&unpacked.join("lib/modules"), "")?;
    let plain_dir = unpacked.join("modules");
    std::fs::create_dir_all(&plain_dir)?;
    let mut modules = Vec::new();
    for (name, required) in MODULES {
        match find_module(&tree, name)? {
            Some(found) => {
                modules.push(uncompressed(&found, &plain_dir.join(format!("{name}.ko")))?)
            }
            None if *required => bail!("{} ships no {name}.ko", spec.package),
            None => {}
        }
    }
    Ok(Kernel {
        version,
        image,
        modules,
    })
}

fn find_module(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if let Some(found) = find_module(&path, name)? {
                return Ok(Some(found));
            }
        } else if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n == format!("{name}.ko") || n == format!("{name}.ko.xz"))
        {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// 6.12 ships `.ko.xz`; the initramfs gets plain `.ko` for busybox insmod.
fn uncompressed(module: &Path, plain: &Path) -> Result<PathBuf> {
    if module.extension().is_some_and(|e| e == "ko") {
        return Ok(module.to_owned());
    }
    if !plain.exists() {
        let out = Command::new("xz")
            .args(["--decompress", "--stdout"])
            .arg(module)
            .output()
            .context("running xz")?;
        ensure!(
            out.status.success(),
            "xz could not decompress {}",
            module.display()
        );
        std::fs::write(plain, out.stdout)?;
    }
    Ok(plain.to_owned())
}

fn find_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        }))
}

/// `apt-get download`, refreshing the package index once if it does not know the package.
fn download(dir: &Path, package: &str) -> Result<()> {
    println!("vm: downloading {package} into {}", dir.display());
    let attempt = || {
        Command::new("apt-get")
            .args(["download", package])
            .current_dir(dir)
            .status()
    };
    if attempt()?.success() {
        return Ok(());
    }
    setup::status("apt-get", &["update"])?;
    ensure!(attempt()?.success(), "apt-get download {package} failed");
    Ok(())
}

/// Upstream version from the package version: `6.1.192-2` → `6.1.192`.
fn deb_version(deb: &Path) -> Result<String> {
    let out = Command::new("dpkg-deb")
        .args(["-f"])
        .arg(deb)
        .arg("Version")
        .output()?;
    ensure!(
        out.status.success(),
        "dpkg-deb -f {} Version failed",
        deb.display()
    );
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(version
        .split(['-', '+', '~'])
        .next()
        .unwrap_or(&version)
        .to_owned())
}

fn only_match(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        other => bail!(
            "expected one {prefix}* in {}, found {}",
            dir.display(),
            other.len()
        ),
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}
