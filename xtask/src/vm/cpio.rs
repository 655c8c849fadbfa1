//! A writer for the newc cpio format the kernel unpacks as its initramfs.

use std::collections::BTreeSet;
use std::io::{self, Write};

pub struct CpioWriter<W: Write> {
    out: W,
    next_inode: u32,
    offset: u64,
    dirs: BTreeSet<String>,
}

const DIR: u32 = 0o040_000;
const FILE: u32 = 0o100_000;
const SYMLINK: u32 = 0o120_000;

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> CpioWriter<W> {
        CpioWriter {
            out,
            next_inode: 1,
            offset: 0,
            dirs: BTreeSet::new(),
        }
    }

    /// A directory and, first, any missing parents. `path` is relative (`usr/bin`).
    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.dirs.insert(path.to_owned());
        self.entry(path, DIR | 0o755, &[])
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let path = path.trim_start_matches('/');
        self.parent_of(path)?;
        self.entry(path, FILE | (mode & 0o7777), data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = path.trim_start_matches('/');
        self.parent_of(path)?;
        self.entry(path, SYMLINK | 0o777, target.as_bytes())
    }

    /// Writes the trailer and returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, &[])?;
        Ok(self.out)
    }

    fn parent_of(&mut self, path: &str) -> io::Result<()> {
        match path.rsplit_once('/') {
            Some((parent, _)) => self.dir(parent),
            None => Ok(()),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let inode = if mode == 0 { 0 } else { self.next_inode };
        self.next_inode += 1;
        let nlink = if mode & DIR == DIR { 2 } else { 1 };
        let header = format!(
            "070701{inode:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0, // uid: root
            0, // gid: root
            0, // mtime: reproducible
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0, // no checksum in newc
        );
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let padding = (4 - (self.offset % 4) as usize) % 4;
        self.write(&[0u8; 3][..padding])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_parents_come_first() {
        let mut cpio = CpioWriter::new(Vec::new());
        cpio.file("usr/bin/tool", 0o755, b"abc").unwrap();
        cpio.symlink("bin/sh", "busybox").unwrap();
        let bytes = cpio.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        let order: Vec<usize> = [
            "usr\0",
            "usr/bin\0",
            "usr/bin/tool\0",
            "bin/sh\0",
            "TRAILER!!!\0",
        ]
        .iter()
        .map(|name| {
            text.find(name)
                .unwrap_or_else(|| panic!("{name:?} missing"))
        })
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        // The file's header: magic, then mode 0100755 and size 3.
        let header = text.find("070701").unwrap();
        assert!(text[text.find("usr/bin/tool").unwrap() - 110..].starts_with("070701"));
        assert!(text[header..].contains("000081ed"));
    }
}
