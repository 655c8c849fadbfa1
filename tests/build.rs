//! Decides at build time whether the kernel-level tests can run here, so a
//! machine without root or the tools reports them as *ignored*, not `ok`.
//! Under `CI=true` they must run: a build that could not run them fails.

fn main() {
    println!("cargo:rustc-check-cfg=cfg(kernel_tests)");
    println!("cargo:rerun-if-env-changed=CI");
    println!("cargo:rerun-if-env-changed=PATH");
    let missing = if !nix::unistd::geteuid().is_root() {
        Some("not running as root")
    } else if !["ip", "nsenter"].iter().all(|tool| on_path(tool)) {
        Some("iproute2 `ip` or util-linux `nsenter` not installed")
    } else {
        None
    };
    match missing {
        None => println!("cargo:rustc-cfg=kernel_tests"),
        Some(reason) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but the kernel-level tests cannot run: {reason}")
        }
        Some(reason) => {
            println!("cargo:warning=kernel-level tests will be reported as ignored: {reason}")
        }
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}
