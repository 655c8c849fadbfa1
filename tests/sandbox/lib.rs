//! Sandbox helpers for Gatekeeper's kernel-level tests and the demo:
//! network namespaces joined by veth, the real daemon started inside, and
//! clients that connect (or fail to) from their own namespaces.
//!
//! Every resource is owned by a value whose `Drop` removes it, so a failing
//! test still leaves no namespace, XDP attachment or pinned map behind.

pub mod daemon;
pub mod dnsbl;
pub mod frames;
pub mod haproxy;
pub mod http;
pub mod lab;
pub mod netns;
pub mod postfix;
pub mod privileges;
pub mod probe;
pub mod smtp;

pub use daemon::Daemon;
pub use lab::{Lab, PeerSpec};
pub use netns::Netns;
pub use privileges::require_kernel_privileges;
