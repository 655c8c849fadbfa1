//! Sandbox helpers for Gatekeeper's kernel-level tests and the demo:
//! network namespaces joined by veth, the real daemon started inside, and
//! clients that connect (or fail to) from their own namespaces.
//!
//! Every resource is owned by a value whose `Drop` removes it, so a failing
//! test still leaves no namespace, XDP attachment or pinned map behind.

pub mod daemon;
pub mod dnsbl;
pub mod fleet;
pub mod frames;
pub mod haproxy;
pub mod http;
pub mod lab;
pub mod netns;
pub mod postfix;
pub mod privileges;
pub mod probe;
pub mod redis;
pub mod scrape;
pub mod smtp;

pub use daemon::Daemon;
pub use lab::{Lab, PeerSpec};
pub use netns::Netns;
pub use privileges::require_kernel_privileges;

/// Only a failure waits this long (emulated machines are slow).
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

/// Polls `f` until it holds; fails the test after [`PATIENCE`].
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
