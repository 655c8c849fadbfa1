//! The control socket: JSON lines between the CLI and the running daemon.

pub mod client;
pub mod protocol;
pub mod server;
