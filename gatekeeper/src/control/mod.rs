//! The control socket: JSON lines between the CLI and the running daemon.

pub mod client;
mod framing;
mod peer;
pub mod protocol;
pub mod server;
