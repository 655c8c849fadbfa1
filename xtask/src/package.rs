//! `cargo xtask package`: the .deb (cargo-deb, metadata in gatekeeper/Cargo.toml),
//! and `package-test`: install, upgrade and purge it in a throwaway Debian root,
//! with lintian and `systemd-analyze verify`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::{build, setup};

/// Generated man pages and completions plus the /etc tree, staged where the
/// cargo-deb asset list looks (`target/release/...` is its build-products prefix).
fn staging_dir() -> PathBuf {
    build::workspace_root().join("target/release/package-assets")
}

fn packaging(rel: &str) -> PathBuf {
    build::workspace_root().join("packaging").join(rel)
}

/// Files shipped under /etc: the conffile always, the fail2ban filter and
/// jail when the logs work has put them under packaging/fail2ban.
const ETC_FILES: &[(&str, &str, bool)] = &[
    ("gatekeeper.toml", "gatekeeper/gatekeeper.toml", true),
    (
        "fail2ban/filter.d/gatekeeper.conf",
        "fail2ban/filter.d/gatekeeper.conf",
        false,
    ),
    (
        "fail2ban/jail.d/gatekeeper.conf",
        "fail2ban/jail.d/gatekeeper.conf",
        false,
    ),
];

/// Builds everything and the .deb into target/debian; `version` overrides the Debian version.
pub fn run(version: Option<&str>) -> Result<PathBuf> {
    build_deb(version, &build::workspace_root().join("target/debian"))
}

/// cargo-deb removes older builds from its output directory: one directory per build.
fn build_deb(version: Option<&str>, out_dir: &Path) -> Result<PathBuf> {
    setup::ensure_cargo_deb()?;
    let binary = build::run()?;
    let staging = staging_dir();
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    let ok = Command::new(&binary)
        .arg("generate-assets")
        .arg(&staging)
        .status()?
        .success();
    ensure!(ok, "gatekeeper generate-assets failed");
    // Debian policy wants man pages gzipped; cargo-deb skips files under target/release.
    for page in std::fs::read_dir(staging.join("man"))? {
        setup::status(
            "gzip",
            &["-9n", page?.path().to_str().context("non-UTF-8 path")?],
        )?;
    }
    for &(source, target, required) in ETC_FILES {
        let source = packaging(source);
        if !required && !source.exists() {
            println!("package: {} absent, not shipped", source.display());
            continue;
        }
        let target = staging.join("etc").join(target);
        std::fs::create_dir_all(target.parent().unwrap())?;
        std::fs::copy(&source, &target).with_context(|| format!("copying {}", source.display()))?;
    }
    std::fs::create_dir_all(out_dir)?;
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args([
        "deb",
        "--no-build",
        "--strip",
        "-p",
        "gatekeeper",
        "--output",
    ])
    .arg(out_dir)
    .current_dir(build::workspace_root());
    if let Some(version) = version {
        cmd.args(["--deb-version", version]);
    }
    let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
    ensure!(out.status.success(), "cargo deb failed");
    let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    ensure!(
        deb.extension().is_some_and(|e| e == "deb") && deb.is_file(),
        "cargo deb reported no .deb: {}",
        deb.display()
    );
    println!("package: {}", deb.display());
    Ok(deb)
}

/// Packages in the cached root besides minbase: `man gatekeeper` needs man-db,
/// `systemd-analyze verify --root` the targets the unit names.
const ROOT_PACKAGES: &str = "man-db,systemd";

/// A Debian root of the host's release (so the package's libc dependency
/// holds), bootstrapped once and cached; each test works on a copy.
fn cached_root() -> Result<PathBuf> {
    let release = std::fs::read_to_string("/etc/os-release")?
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_owned())
        .context("/etc/os-release names no VERSION_CODENAME")?;
    let cache = build::workspace_root().join("target/package-test");
    let root = cache.join(format!("root-{release}"));
    let complete = cache.join(format!("root-{release}.complete"));
    if std::fs::read_to_string(&complete).is_ok_and(|s| s == ROOT_PACKAGES) {
        return Ok(root);
    }
    let mirror = std::env::var("GATEKEEPER_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    println!("package-test: bootstrapping a {release} root from {mirror} (once; cached)");
    let _ = std::fs::remove_file(&complete);
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::create_dir_all(&cache)?;
    setup::status(
        "debootstrap",
        &[
            "--variant=minbase",
            &format!("--include={ROOT_PACKAGES}"),
            &release,
            root.to_str().context("non-UTF-8 path")?,
            &mirror,
        ],
    )?;
    std::fs::write(&complete, ROOT_PACKAGES)?;
    Ok(root)
}

/// A copy of the cached root, removed when dropped (even when a check fails).
struct Throwaway(PathBuf);

impl Throwaway {
    fn new(cached: &Path) -> Result<Throwaway> {
        let dir = cached.with_file_name(format!("work-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        setup::status(
            "cp",
            &[
                "-a",
                cached.to_str().context("non-UTF-8 path")?,
                dir.to_str().context("non-UTF-8 path")?,
            ],
        )?;
        Ok(Throwaway(dir))
    }

    /// Runs a shell script inside the root; returns its stdout.
    fn sh(&self, script: &str) -> Result<String> {
        let out = Command::new("chroot")
            .arg(&self.0)
            .args(["/bin/sh", "-ec", script])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C.UTF-8")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "in the throwaway root, `{script}` failed: {}\n{stdout}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(stdout)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel.trim_start_matches('/'))
    }

    fn install(&self, deb: &Path) -> Result<()> {
        let name = deb.file_name().unwrap().to_string_lossy().into_owned();
        std::fs::copy(deb, self.path("tmp").join(&name))?;
        self.sh(&format!("dpkg -i /tmp/{name}"))?;
        Ok(())
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The bumped version the upgrade installs over the current build.
fn upgrade_version(deb: &Path) -> Result<String> {
    let version = setup::output(
        "dpkg-deb",
        &["-f", deb.to_str().context("non-UTF-8 path")?, "Version"],
    )?;
    Ok(format!("{}+upgradetest1", version.trim()))
}

pub fn test() -> Result<()> {
    ensure!(
        setup::is_root(),
        "package-test installs into a chroot: run it as root"
    );
    setup::ensure_packaging_tools()?;
    let debs = build::workspace_root().join("target/package-test/debs");
    let first = build_deb(None, &debs.join("current"))?;
    let second = build_deb(Some(&upgrade_version(&first)?), &debs.join("upgrade"))?;
    lintian(&first)?;
    let root = Throwaway::new(&cached_root()?)?;

    println!("package-test: install {}", first.display());
    root.install(&first)?;
    let version = root.sh("gatekeeper --version")?;
    ensure!(
        version.starts_with("gatekeeper "),
        "--version said {version:?}"
    );
    let man = root.sh("MANWIDTH=80 man -P cat gatekeeper")?;
    ensure!(
        man.contains("SMTP edge gatekeeper") && man.contains("gatekeeper-deny(8)"),
        "man gatekeeper:\n{man}"
    );
    let man5 = root.sh("MANWIDTH=80 man -P cat 5 gatekeeper.toml")?;
    ensure!(
        man5.contains("protected_ports") && man5.contains("max_upstream_sessions"),
        "man 5 gatekeeper.toml:\n{man5}"
    );
    root.sh("man -w gatekeeper-deny-add")?;
    let conffiles = root.sh("dpkg-query -W -f='${Conffiles}' gatekeeper")?;
    ensure!(
        conffiles.contains("/etc/gatekeeper/gatekeeper.toml"),
        "conffiles: {conffiles}"
    );
    ensure!(
        std::fs::read(root.path("/etc/gatekeeper/gatekeeper.toml"))?
            == std::fs::read(packaging("gatekeeper.toml"))?,
        "installed conffile differs from packaging/gatekeeper.toml"
    );
    ensure!(
        std::fs::read(root.path("/usr/lib/systemd/system/gatekeeper.service"))?
            == std::fs::read(packaging("gatekeeper.service"))?,
        "installed unit differs from packaging/gatekeeper.service"
    );
    verify_unit(&root)?;
    let completion = root.sh(
        "bash -c '. /usr/share/bash-completion/completions/gatekeeper && complete -p gatekeeper'",
    )?;
    ensure!(completion.contains("gatekeeper"), "bash: {completion}");
    for file in [
        "/usr/share/zsh/vendor-completions/_gatekeeper",
        "/usr/share/fish/vendor_completions.d/gatekeeper.fish",
    ] {
        ensure!(
            std::fs::read_to_string(root.path(file))?.contains("gatekeeper"),
            "{file} is empty"
        );
    }
    let mode = root.sh("stat -c %a /var/lib/gatekeeper")?;
    ensure!(mode.trim() == "700", "/var/lib/gatekeeper has mode {mode}");

    println!("package-test: upgrade to {}", second.display());
    root.sh("echo '# edited by the package test' >> /etc/gatekeeper/gatekeeper.toml")?;
    root.sh("echo state > /var/lib/gatekeeper/deny.snapshot")?;
    root.install(&second)?;
    let installed = root.sh("dpkg-query -W -f='${Version}' gatekeeper")?;
    ensure!(
        installed == upgrade_version(&first)?,
        "after the upgrade dpkg has {installed}"
    );
    ensure!(
        std::fs::read_to_string(root.path("/etc/gatekeeper/gatekeeper.toml"))?
            .contains("# edited by the package test"),
        "the upgrade lost the local edit of the conffile"
    );
    ensure!(
        root.path("/var/lib/gatekeeper/deny.snapshot").is_file(),
        "the upgrade lost the state"
    );

    println!("package-test: purge");
    root.sh("dpkg --purge gatekeeper")?;
    for gone in [
        "/etc/gatekeeper",
        "/var/lib/gatekeeper",
        "/usr/sbin/gatekeeper",
        "/usr/lib/systemd/system/gatekeeper.service",
    ] {
        ensure!(!root.path(gone).exists(), "{gone} is left after purge");
    }
    println!("package-test: install, upgrade and purge passed");
    Ok(())
}

/// lintian must report no errors; its warnings are printed for the record.
fn lintian(deb: &Path) -> Result<()> {
    let out = Command::new("lintian")
        .args(["--allow-root", "--fail-on", "error", "--info"])
        .arg(deb)
        .output()
        .context("spawning lintian")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    ensure!(
        out.status.success(),
        "lintian reports errors on {}: {}",
        deb.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// `systemd-analyze verify` against the installed root, where the binary and
/// the targets the unit names resolve; any output is a finding. It would look
/// the unit's `Documentation=` man pages up on the host, so they are looked
/// up in the root instead.
fn verify_unit(root: &Throwaway) -> Result<()> {
    root.sh("man -w 8 gatekeeper && man -w 5 gatekeeper.toml")?;
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.0.display()))
        .arg("gatekeeper.service")
        .output()
        .context("spawning systemd-analyze")?;
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && findings.trim().is_empty(),
        "systemd-analyze verify gatekeeper.service:\n{findings}"
    );
    Ok(())
}
