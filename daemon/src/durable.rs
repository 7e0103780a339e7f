//! Files written whole or not at all: temp file, fsync, rename, fsync of the directory.
//! Used for key blobs and the host CA certificate, where a crash must leave the old file or
//! the new one, never a torn mix.

use std::fs;
use std::io::Write;
use std::path::Path;

pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// [`write_atomic`] relative to an open directory: the temp file is made new (`O_EXCL`, no
/// symlink followed) beside `name`, then renamed over it; nothing resolves a path again.
pub fn write_atomic_at(dir: &std::os::fd::OwnedFd, name: &str, data: &[u8]) -> std::io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    let tmp = format!(".{name}.{}.tmp", hex::encode(rand::random::<[u8; 6]>()));
    let fd = rustix::fs::openat(
        dir,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )?;
    // Served by a web server running as someone else: readable whatever the daemon's umask.
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o644))?;
    let mut f = fs::File::from(fd);
    let written = f
        .write_all(data)
        .and_then(|()| f.sync_all())
        .and_then(|()| Ok(rustix::fs::renameat(dir, tmp.as_str(), dir, name)?));
    if let Err(e) = written {
        let _ = rustix::fs::unlinkat(dir, tmp.as_str(), rustix::fs::AtFlags::empty());
        return Err(e);
    }
    rustix::fs::fsync(dir)?;
    Ok(())
}
