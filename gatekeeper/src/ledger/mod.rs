//! What the daemon remembers about clients between sessions: abuse counts
//! and the bans they lead to, relay grants (POP-before-SMTP), greylisting.
//!
//! Each table is pure (time is an argument) and serialisable; the daemon
//! owns them, saves them atomically and wires them to the SMTP front end.

pub mod bans;
pub mod grants;
pub mod greylist;

use std::path::Path;

use anyhow::Context;
use serde::de::DeserializeOwned;

/// Reads a table saved by [`crate::persist::write_json_atomically`]; a
/// missing file is an empty table, a damaged one an error naming it (the
/// daemon refuses to start rather than forget bans or grants silently).
pub fn load_table<T: DeserializeOwned + Default>(path: &Path) -> anyhow::Result<T> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: damaged; move it away to start afresh", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
}
