//! Atomic file output: write to a temporary file beside the destination, then rename.
//!
//! A converter killed half way (Ctrl-C, out of disk, a bug) must never leave a truncated
//! `model.gguf` that a later run would try to map. Writing to a temporary in the same
//! directory and renaming it over the destination only after an fsync means the destination
//! is either the old file or the complete new one. The rename is atomic only within one file
//! system, which is why the temporary lives in the destination's directory rather than /tmp.
//!
//! Live temporary paths are also kept in a process-wide registry so a signal handler can call
//! [`cleanup_temp_files`] and leave no `.ggpt-tmp` litter behind.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

static LIVE: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
static COUNTER: AtomicU64 = AtomicU64::new(0);
/// Set by [`cleanup_temp_files`] (under the `LIVE` lock): the process is shutting down, so no
/// new temporary may be registered. Without it, a temporary created by the main thread just
/// after the signal handler's cleanup would survive the exit that follows.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// The registry survives a panic in another thread: a poisoned lock still holds valid paths.
fn live() -> MutexGuard<'static, Option<HashSet<PathBuf>>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Remove every temporary file that is still being written, and refuse to create new ones
/// from now on. Meant for a Ctrl-C handler that then exits; an [`AtomicFile`] whose temporary
/// was removed fails on commit, and [`AtomicFile::create`] fails with `Interrupted`.
pub fn cleanup_temp_files() {
    {
        let _guard = live();
        CLOSED.store(true, Ordering::SeqCst);
    }
    cleanup_where(|_| true);
}

fn cleanup_where(pred: impl Fn(&Path) -> bool) {
    let victims: Vec<PathBuf> = {
        let mut guard = live();
        let Some(set) = guard.as_mut() else { return };
        let victims: Vec<PathBuf> = set.iter().filter(|p| pred(p)).cloned().collect();
        for v in &victims {
            set.remove(v);
        }
        victims
    };
    for p in victims {
        let _ = fs::remove_file(&p);
    }
}

/// A file that appears at its destination only when [`AtomicFile::commit`] succeeds.
pub struct AtomicFile {
    /// `None` only after commit has taken it.
    out: Option<BufWriter<File>>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl AtomicFile {
    /// Create a uniquely named temporary `.NAME.ggpt-tmp.PID.N` in `dest`'s directory.
    pub fn create(dest: &Path) -> io::Result<AtomicFile> {
        let file_name = dest.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a file path", dest.display()),
            )
        })?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let pid = std::process::id();
        // create_new never clobbers; a stale temporary from a crashed run with a reused PID
        // just moves the counter on.
        for _ in 0..1000 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let mut name = OsString::from(".");
            name.push(file_name);
            name.push(format!(".ggpt-tmp.{pid}.{n}"));
            let tmp = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(f) => {
                    let mut guard = live();
                    if CLOSED.load(Ordering::SeqCst) {
                        drop(guard);
                        drop(f);
                        let _ = fs::remove_file(&tmp);
                        return Err(io::Error::new(
                            io::ErrorKind::Interrupted,
                            format!("{}: not created: the process is exiting", dest.display()),
                        ));
                    }
                    guard.get_or_insert_with(HashSet::new).insert(tmp.clone());
                    drop(guard);
                    return Ok(AtomicFile {
                        out: Some(BufWriter::with_capacity(1 << 20, f)),
                        tmp,
                        dest: dest.to_path_buf(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{}: cannot create temporary file: {e}", tmp.display()),
                    ))
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{}: no free temporary file name", dir.display()),
        ))
    }

    /// Path of the temporary file being written.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Flush, fsync, rename onto the destination, fsync the directory so the rename itself
    /// survives a power cut. On error the temporary is removed and the destination untouched.
    pub fn commit(mut self) -> io::Result<()> {
        let out = self.out.take();
        let result: io::Result<()> = (|| {
            let out = out.ok_or_else(|| io::Error::other("already committed"))?;
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            drop(file);
            fs::rename(&self.tmp, &self.dest)?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.forget();
                sync_dir(&self.dest);
                Ok(())
            }
            Err(e) => {
                // Drop removes the temporary.
                Err(io::Error::new(
                    e.kind(),
                    format!("{}: cannot write: {e}", self.dest.display()),
                ))
            }
        }
    }

    fn forget(&mut self) {
        if let Some(set) = live().as_mut() {
            set.remove(&self.tmp);
        }
        self.tmp = PathBuf::new();
    }

    fn writer(&mut self) -> io::Result<&mut BufWriter<File>> {
        self.out
            .as_mut()
            .ok_or_else(|| io::Error::other("AtomicFile used after commit"))
    }
}

/// Best effort: some file systems refuse to open or fsync a directory, and by now the data is
/// already durable and renamed, so a failure here is not worth failing the command for.
fn sync_dir(dest: &Path) {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer()?.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.writer()?.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer()?.flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.tmp.as_os_str().is_empty() {
            return;
        }
        // Close before unlinking (required on Windows, harmless elsewhere); the buffered tail is
        // discarded rather than flushed since the file is being thrown away.
        if let Some(out) = self.out.take() {
            let (file, _) = out.into_parts();
            drop(file);
        }
        let _ = fs::remove_file(&self.tmp);
        self.forget();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ggpt-atomic-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn commit_replaces_destination_and_leaves_no_temporary() {
        let dir = scratch("commit");
        let dest = dir.join("model.gguf");
        fs::write(&dest, b"old").unwrap();
        let mut f = AtomicFile::create(&dest).unwrap();
        let tmp = f.temp_path().to_path_buf();
        assert!(tmp
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".model.gguf.ggpt-tmp."));
        assert_eq!(tmp.parent(), dest.parent());
        f.write_all(b"new contents").unwrap();
        // Not visible at the destination before commit.
        assert_eq!(fs::read(&dest).unwrap(), b"old");
        f.commit().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"new contents");
        assert_eq!(entries(&dir), ["model.gguf"]);
        assert!(!live().as_ref().is_some_and(|s| s.contains(&tmp)));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn drop_without_commit_removes_temporary_and_keeps_destination() {
        let dir = scratch("drop");
        let dest = dir.join("out.gguf");
        fs::write(&dest, b"keep me").unwrap();
        {
            let mut f = AtomicFile::create(&dest).unwrap();
            f.write_all(&[7; 10_000]).unwrap();
            assert_eq!(entries(&dir).len(), 2);
        }
        assert_eq!(entries(&dir), ["out.gguf"]);
        assert_eq!(fs::read(&dest).unwrap(), b"keep me");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_are_unique_and_cleanup_removes_live_temporaries() {
        let dir = scratch("cleanup");
        let dest = dir.join("x.npy");
        let a = AtomicFile::create(&dest).unwrap();
        let b = AtomicFile::create(&dest).unwrap();
        assert_ne!(a.temp_path(), b.temp_path());
        assert!(a.temp_path().exists() && b.temp_path().exists());
        // Other tests in this process may own live temporaries: remove only this test's.
        cleanup_where(|p| p.starts_with(&dir));
        assert!(!a.temp_path().exists() && !b.temp_path().exists());
        // Committing after cleanup reports the missing temporary instead of succeeding.
        assert!(a.commit().is_err());
        drop(b);
        assert!(!dest.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_destinations_are_errors() {
        assert!(AtomicFile::create(Path::new("/")).is_err());
        let missing = std::env::temp_dir().join("ggpt-no-such-dir-h3/x.gguf");
        let e = AtomicFile::create(&missing).err().unwrap();
        assert!(e.to_string().contains("ggpt-no-such-dir-h3"), "{e}");
    }
}
