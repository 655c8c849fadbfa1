//! Crash-safe JSON files: a reader sees the old file or the new one, never half of one.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::Serialize;

/// Temp file beside `path`, fsync, rename over `path`, fsync the directory.
/// Temp files are named `.NAME.XXXX.tmp`, which `remove_stale_temp_files` cleans up.
pub fn write_json_atomically(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut temp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    {
        let mut writer = BufWriter::with_capacity(1 << 20, temp.as_file_mut());
        serde_json::to_writer(&mut writer, value).map_err(std::io::Error::other)?;
        writer.write_all(b"\n")?;
        writer.flush()?;
    }
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}
