//! `cargo xtask vm-test`: the kernel-level integration tests inside QEMU on
//! Debian's own kernels (6.1 LTS and 6.12), so the XDP program is known to
//! load, verify and judge the same on the kernels edge hosts run.

mod cpio;
mod initramfs;
mod kernels;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::{build, setup};
use initramfs::Initramfs;
use kernels::{Kernel, KernelSpec, MATRIX};

/// One kernel's outcome, for the summary line.
pub struct VmResult {
    pub version: String,
    pub passed: usize,
    pub failed: usize,
    pub ok: bool,
    /// The guest got as far as running `/init`.
    pub reached_init: bool,
    pub log: PathBuf,
}

impl std::fmt::Display for VmResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vm {}: {} passed", self.version, self.passed)?;
        if self.failed > 0 || !self.ok {
            write!(
                f,
                ", {} failed (console log {})",
                self.failed,
                self.log.display()
            )?;
        }
        Ok(())
    }
}

/// Which integration tests the guest runs, and how often.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// A libtest name filter passed to every test binary; `None`: all tests.
    pub filter: Option<String>,
    /// Run the selection this many times in one boot (flakiness hunts); 0 counts as 1.
    pub repeat: u32,
}

/// Runs the matrix (`which`: `6.1`, `6.12` or `all`); fails if any kernel fails.
/// Test binaries whose consumers (promtool, the Python fail2ban-regex) are
/// userland programs the VM's initramfs does not carry; nothing in them
/// depends on the kernel version, and the host run covers them.
const HOST_ONLY_TESTS: &[&str] = &[
    "observability",
    "postfix_fixture",
    "roaming_users",
    "client_checks",
    "relay_probe",
    "esmtp_extensions",
    // Redis and three daemons: fleet logic, not kernel-dependent; the deny-map
    // drop it ends in is what `fastpath` proves on every kernel.
    "cluster",
];

/// Cargo names test executables `<name>-<hash>`.
fn runs_on_the_host_only(binary: &std::path::Path) -> bool {
    let name = binary
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    HOST_ONLY_TESTS.iter().any(|t| {
        name.strip_prefix(t)
            .is_some_and(|rest| rest.starts_with('-'))
    })
}

pub fn run(which: &str, selection: &Selection) -> Result<Vec<VmResult>> {
    let specs: Vec<&KernelSpec> = MATRIX
        .iter()
        .filter(|k| which == "all" || k.name == which)
        .collect();
    ensure!(
        !specs.is_empty(),
        "--kernel {which}: expected one of {} or all",
        MATRIX.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
    );
    setup::ensure_vm_tools()?;
    let binary = build::run()?;
    let tests: Vec<_> = build::integration_test_binaries()?
        .into_iter()
        .filter(|t| !runs_on_the_host_only(t))
        .collect();
    let work = build::workspace_root().join("target/vm");
    std::fs::create_dir_all(&work)?;
    let initrd = work.join("initramfs.cpio");
    let size = assemble(&binary, &tests, &work, &initrd, selection)?;
    println!(
        "vm: initramfs {} ({} MiB, {} test binaries)",
        initrd.display(),
        size >> 20,
        tests.len()
    );

    let mut accel = Accel::detect();
    let mut results = Vec::new();
    for spec in specs {
        let kernel = kernels::fetch(spec)?;
        // Only the modules differ per kernel: a second cpio archive appended to the shared one.
        let with_module = work.join(format!("initramfs-{}.cpio", spec.name));
        let mut modules = Initramfs::default();
        let mut load_order = String::new();
        for module in &kernel.modules {
            let name = module
                .file_name()
                .and_then(|n| n.to_str())
                .context("module name")?;
            modules.add_file(&format!("lib/modules/{name}"), 0o644, module);
            load_order.push_str(&format!("/lib/modules/{name}\n"));
        }
        modules.add_bytes("lib/modules/load-order", 0o644, load_order.into_bytes());
        modules.write(&work.join("modules.cpio"))?;
        concat(&[&initrd, &work.join("modules.cpio")], &with_module)?;
        println!(
            "vm: booting {} ({}, {accel:?})",
            kernel.version,
            kernel.image.display()
        );
        let log = work.join(format!("console-{}.log", spec.name));
        let mut result = boot(&kernel, &with_module, &log, accel)?;
        if accel == Accel::Kvm && !result.reached_init {
            // /dev/kvm answers but cannot run a guest (e.g. broken nested virtualisation).
            println!("vm: KVM could not run the guest here; falling back to TCG (slower)");
            accel = Accel::Tcg;
            result = boot(&kernel, &with_module, &log, accel)?;
        }
        println!("{result}");
        results.push(result);
    }
    println!();
    for result in &results {
        println!("{result}");
    }
    if results.iter().any(|r| !r.ok) {
        bail!("the VM tests failed");
    }
    Ok(results)
}

fn assemble(
    binary: &Path,
    tests: &[PathBuf],
    work: &Path,
    out: &Path,
    selection: &Selection,
) -> Result<u64> {
    let stripped_dir = work.join("stripped");
    std::fs::create_dir_all(&stripped_dir)?;
    let mut fs = Initramfs::default();
    fs.add_bytes("init", 0o755, init_script(selection).into_bytes());
    fs.add_file(
        "bin/busybox",
        0o755,
        &initramfs::which("busybox").context("busybox-static is not installed")?,
    );
    fs.add_program(
        "usr/bin/gatekeeper",
        &initramfs::stripped(binary, &stripped_dir)?,
    )?;
    for test in tests {
        let name = test
            .file_name()
            .and_then(|n| n.to_str())
            .context("test binary name")?;
        // cargo names them `fastpath-<hash>`: keep the test's own name.
        let short = name.rsplit_once('-').map_or(name, |(n, _)| n);
        fs.add_program(
            &format!("tests/{short}"),
            &initramfs::stripped(test, &stripped_dir)?,
        )?;
    }
    for tool in initramfs::TOOLS {
        fs.add_tool(tool)?;
    }
    for (path, host) in [
        ("etc/postfix/main.cf", "/etc/postfix/main.cf"),
        ("etc/services", "/etc/services"),
    ] {
        if Path::new(host).exists() {
            fs.add_file(path, 0o644, Path::new(host));
        }
    }
    fs.add_bytes(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\nrbldns:x:101:101:rbldns:/nonexistent:/bin/false\n".to_vec(),
    );
    fs.add_bytes(
        "etc/group",
        0o644,
        b"root:x:0:\nnogroup:x:65534:\nrbldns:x:101:\n".to_vec(),
    );
    fs.write(out)
}

/// `/init`: busybox applets by absolute path, since they would win over `$PATH` otherwise.
fn init_script(selection: &Selection) -> String {
    let ip = initramfs::which("ip")
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "/usr/bin/ip".into());
    // Test names are Rust identifiers: nothing here needs shell quoting beyond the quotes.
    let filter = selection
        .filter
        .as_deref()
        .map(|f| format!(" '{}'", f.replace('\'', "")))
        .unwrap_or_default();
    let repeat = selection.repeat.max(1);
    format!(
        r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t bpf bpf /sys/fs/bpf
$B mount -t debugfs debugfs /sys/kernel/debug
$B mount -t tmpfs tmpfs /run
$B mount -t tmpfs tmpfs /tmp
for module in $($B cat /lib/modules/load-order); do
  $B insmod "$module" || echo "VMTEST: module $module did not load"
done
{ip} link set lo up
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root CI=true
export GATEKEEPER_BIN=/usr/bin/gatekeeper GATEKEEPER_TEST_NOTES=/tmp/notes RUST_BACKTRACE=1
echo "VMTEST: kernel $($B uname -r)"
rc=0
for round in $($B seq {repeat}); do
  for t in /tests/*; do
    echo "VMTEST: RUN ${{t##*/}} (round $round of {repeat})"
    "$t" --test-threads=2{filter} || rc=$?
  done
done
[ -f /tmp/notes ] && $B cat /tmp/notes
if [ "$rc" -eq 0 ]; then echo "VMTEST: PASS"; code='\020'; else echo "VMTEST: FAIL rc=$rc"; code='\021'; fi
$B printf "$code" | $B dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
$B poweroff -f
"#
    )
}

fn concat(parts: &[&Path], out: &Path) -> Result<()> {
    let mut file = std::fs::File::create(out)?;
    for part in parts {
        std::io::copy(&mut std::fs::File::open(part)?, &mut file)?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM only where `/dev/kvm` really answers (and, see `run`, really boots a
    /// guest); TCG (slow, but always there) otherwise. `GATEKEEPER_VM_ACCEL=tcg` forces TCG.
    fn detect() -> Accel {
        if std::env::var("GATEKEEPER_VM_ACCEL").is_ok_and(|v| v == "tcg") {
            return Accel::Tcg;
        }
        use std::os::fd::AsRawFd;
        let Ok(kvm) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        else {
            return Accel::Tcg;
        };
        const KVM_GET_API_VERSION: u64 = 0xAE00;
        // SAFETY: KVM_GET_API_VERSION takes no argument and only reads the open descriptor.
        let version = unsafe { nix::libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
        if version == 12 {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    fn timeout(self) -> Duration {
        match self {
            Accel::Kvm => Duration::from_secs(20 * 60),
            Accel::Tcg => Duration::from_secs(90 * 60),
        }
    }
}

/// Boots one kernel; the verdict comes from isa-debug-exit (33 pass, 35 fail),
/// anything else (panic, timeout, QEMU error) is a failure.
fn boot(kernel: &Kernel, initrd: &Path, log: &Path, accel: Accel) -> Result<VmResult> {
    let _ = std::fs::remove_file(log);
    let (accel_arg, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        // One host thread for both vCPUs: under multi-threaded TCG a vCPU
        // can run a stale translation of kernel text another vCPU just
        // live-patched (the BPF dispatcher's int3 patching on XDP attach),
        // an Oops seen once on 6.12 with no fault of the program's.
        Accel::Tcg => ("tcg,thread=single", "max"),
    };
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", accel_arg, "-cpu", cpu, "-m", "3072", "-smp", "2"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 rdinit=/init loglevel=4"])
        .stdin(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let deadline = Instant::now() + accel.timeout();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let console = std::fs::read_to_string(log).unwrap_or_default();
    let (passed, failed) = test_counts(&console);
    let ok = status.and_then(|s| s.code()) == Some(33) && console.contains("VMTEST: PASS");
    let reached_init = console.contains("VMTEST: kernel");
    // A KVM guest that never reached /init is retried under TCG by the caller: no alarm yet.
    if !ok && (reached_init || accel == Accel::Tcg) {
        let why = match status {
            None => format!("timed out after {:?}", accel.timeout()),
            Some(s) if s.code() == Some(35) => "tests failed".into(),
            Some(s) => format!("QEMU exited with {s} (kernel panic or QEMU error)"),
        };
        eprintln!(
            "vm {}: {why}; console tail ({}):",
            kernel.version,
            log.display()
        );
        let lines: Vec<&str> = console.lines().collect();
        for line in &lines[lines.len().saturating_sub(60)..] {
            eprintln!("  | {line}");
        }
    }
    Ok(VmResult {
        version: kernel.version.clone(),
        passed,
        failed,
        ok,
        reached_init,
        log: log.to_owned(),
    })
}

/// Sums libtest's `test result:` lines.
fn test_counts(console: &str) -> (usize, usize) {
    let count = |line: &str, what: &str| -> usize {
        line.split(';')
            .find_map(|part| part.trim().strip_suffix(what))
            .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    console
        .lines()
        .filter(|l| l.contains("test result:"))
        .fold((0, 0), |(p, f), line| {
            (p + count(line, "passed"), f + count(line, "failed"))
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_libtest_summaries() {
        let console = "test result: ok. 6 passed; 0 failed; 0 ignored\nnoise\ntest result: FAILED. 3 passed; 1 failed; 0 ignored\n";
        assert_eq!(super::test_counts(console), (9, 1));
    }
}
