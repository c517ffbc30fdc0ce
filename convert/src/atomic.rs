//! Every file ggpt writes goes through [`AtomicFile::create`], which first looks at what stands
//! at the output path and never destroys it:
//!
//! | at the path | what happens |
//! |---|---|
//! | nothing | a temporary `.NAME.ggpt-tmp.PID.N` beside it is written, fsynced and renamed into place |
//! | a regular file | the same atomic replace; the old file's permission bits (and, where allowed, owner and group) are kept |
//! | a symbolic link to a regular file | the file it points to is replaced atomically (temporary in *that* file's directory); the link stays a link |
//! | a character device or FIFO | opened and written in place, as `tee` or `cp` do (`--npy /dev/stdout`, a named pipe read by another program) |
//! | a directory, socket or block device | refused: [`UnusableOutput`] |
//! | a dangling symbolic link, a link loop, a name ending in `/` | refused: [`UnusableOutput`] |
//!
//! **Atomic replace.** A converter killed half way (Ctrl-C, out of disk, a bug) must never leave
//! a truncated `model.gguf` that a later run would try to map. Writing to a temporary in the same
//! directory and renaming it over the destination only after an fsync means the destination is
//! either the old file or the complete new one. The rename is atomic only within one file system,
//! which is why the temporary lives in the destination's directory rather than /tmp. A replaced
//! file is a new inode: other hard links to the old one keep the old contents, as after `mv`.
//!
//! **Dangling links are refused**, as GNU `cp` refuses to write through them: creating a file at
//! a place the command line does not name is how symlink attacks in shared directories work, and
//! the fix (create the target, or remove the link) is the user's one command.
//!
//! **Streams** (character devices, FIFOs) are written directly: there is nothing to rename and
//! nothing to take back. Opening a FIFO waits until a reader opens it, as with `tee`. If a write
//! fails half way (the reader exits early: `Broken pipe`; `/dev/full`: `No space left on
//! device`), the reader has received a prefix of the output and then end of file, and ggpt exits
//! with the output error (4) naming the path. A reader must therefore check ggpt's exit status
//! (or the length an `.npy` header promises) before trusting what it read; the same holds if ggpt
//! is interrupted.
//!
//! Live temporary paths are also kept in a process-wide registry so a signal handler can call
//! [`cleanup_temp_files`] and leave no `.ggpt-tmp` litter behind.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{self, File, Metadata, OpenOptions};
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

/// Write buffer of an output file.
const BUFFER: usize = 1 << 20;

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

/// [`cleanup_temp_files`] has run: the process is exiting on a signal. An error the caller
/// meets from then on (a commit whose temporary was removed, a refused create) is the
/// interruption's, and must not race the handler's exit with an exit code of its own.
pub fn shutting_down() -> bool {
    CLOSED.load(Ordering::SeqCst)
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

/// An output path that cannot be used whatever the permissions: it names a directory, a
/// socket, a block device, a dangling symbolic link or a link loop; or, where a command checks
/// it, the command's own input, or one file for several outputs. A bad command line: the CLI
/// exits with 2, also when this error arrives inside the `io::Error` of
/// [`AtomicFile::create`] ([`UnusableOutput::is_in`]).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct UnusableOutput {
    pub path: PathBuf,
    pub problem: String,
    message: String,
}

impl UnusableOutput {
    /// An error that reads "PATH: PROBLEM".
    pub fn new(path: impl Into<PathBuf>, problem: impl Into<String>) -> UnusableOutput {
        let (path, problem) = (path.into(), problem.into());
        let message = format!("{}: {problem}", path.display());
        UnusableOutput {
            path,
            problem,
            message,
        }
    }

    /// The `io::Error` [`AtomicFile::create`] returns: its text is the problem alone, since
    /// every caller already names the destination.
    fn io(path: &Path, problem: impl Into<String>) -> io::Error {
        let problem = problem.into();
        let e = UnusableOutput {
            path: path.to_path_buf(),
            message: problem.clone(),
            problem,
        };
        io::Error::new(io::ErrorKind::InvalidInput, e)
    }

    /// Whether `err` is an `UnusableOutput` or an `io::Error` carrying one. (`io::Error`
    /// reports its inner error's *source*, not the inner error, so an error chain never shows
    /// it by itself.)
    pub fn is_in(err: &(dyn std::error::Error + 'static)) -> bool {
        err.is::<UnusableOutput>()
            || err
                .downcast_ref::<io::Error>()
                .and_then(io::Error::get_ref)
                .is_some_and(|inner| inner.is::<UnusableOutput>())
    }
}

/// What a file type is, for messages: "a directory", "a FIFO (named pipe)", ….
pub fn kind_name(ft: &fs::FileType) -> &'static str {
    if ft.is_file() {
        return "a regular file";
    }
    if ft.is_dir() {
        return "a directory";
    }
    if ft.is_symlink() {
        return "a symbolic link";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    "a special file"
}

/// A character device or a FIFO: written in place, never replaced.
fn is_stream(ft: &fs::FileType) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        ft.is_char_device() || ft.is_fifo()
    }
    #[cfg(not(unix))]
    {
        let _ = ft;
        false
    }
}

/// Why following the symbolic link `path` failed with `e`: a dangling link or a loop, or
/// `None` for any other error (permissions, I/O), which the caller reports as it is.
fn link_problem(path: &Path, e: &io::Error) -> Option<String> {
    if e.kind() == io::ErrorKind::NotFound {
        let to = fs::read_link(path)
            .map(|t| format!(" (to {})", t.display()))
            .unwrap_or_default();
        return Some(format!("is a dangling symbolic link{to}"));
    }
    // Walk the chain by hand: the kernel gives up after 40 links (ELOOP), and so do we.
    let mut p = path.to_path_buf();
    for _ in 0..=40 {
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let Ok(t) = fs::read_link(&p) else {
                    return None;
                };
                p = match p.parent() {
                    Some(dir) if t.is_relative() => dir.join(t),
                    _ => t,
                };
            }
            _ => return None,
        }
    }
    Some("is a symbolic link loop".to_string())
}

/// What stands at `path`, following symbolic links, for messages: "is a regular file", "is a
/// directory", "is a symbolic link to a FIFO (named pipe)", "is a dangling symbolic link (to
/// X)", "is a symbolic link loop", "missing", or "cannot be examined: ERROR".
pub fn describe(path: &Path) -> String {
    let link = fs::symlink_metadata(path);
    match (fs::metadata(path), link) {
        (Ok(m), Ok(l)) => {
            let via = if l.file_type().is_symlink() {
                "a symbolic link to "
            } else {
                ""
            };
            format!("is {via}{}", kind_name(&m.file_type()))
        }
        (Ok(m), Err(_)) => format!("is {}", kind_name(&m.file_type())),
        (Err(_), Err(l)) if l.kind() == io::ErrorKind::NotFound => "missing".to_string(),
        (Err(e), Ok(l)) if l.file_type().is_symlink() => {
            link_problem(path, &e).unwrap_or_else(|| format!("cannot be examined: {e}"))
        }
        (Err(e), _) => format!("cannot be examined: {e}"),
    }
}

/// Why `path` cannot be read as a regular file, for an input file's error message: "missing",
/// "is a directory, not a regular file", "is a symbolic link loop", "is a dangling symbolic
/// link (to X)", "is a FIFO (named pipe), not a regular file", …; `None` when it is a regular
/// file (directly or through links).
pub fn not_a_regular_file(path: &Path) -> Option<String> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => None,
        Ok(_) => Some(format!("{}, not a regular file", describe(path))),
        Err(_) => Some(describe(path)),
    }
}

/// Create the directory `path` and its parents (like `fs::create_dir_all`), with an
/// [`UnusableOutput`] naming what stands there when that is not a directory.
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    fs::create_dir_all(path).map_err(|e| {
        if fs::metadata(path).is_ok_and(|m| !m.is_dir())
            || fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
        {
            UnusableOutput::io(path, format!("{}; give a directory", describe(path)))
        } else {
            e
        }
    })
}

/// Refuse to write `output` when it is one of `inputs`: the same path, or the same file through a
/// symbolic or hard link. `lost` names what the write would destroy ("the input", "the
/// checkpoint").
pub fn refuse_input_as_output<'a>(
    output: &Path,
    inputs: impl IntoIterator<Item = &'a Path>,
    lost: &str,
) -> Result<(), UnusableOutput> {
    let Some(input) = inputs.into_iter().find(|i| same_file(output, i)) else {
        return Ok(());
    };
    let what = if input == output {
        "is also the input".to_string()
    } else {
        format!("is the same file as the input {}", input.display())
    };
    Err(UnusableOutput::new(
        output,
        format!("{what}: the output would overwrite {lost}; choose another path"),
    ))
}

/// Whether `a` and `b` name one existing file, through symbolic or hard links (same device and
/// inode).
fn same_file(a: &Path, b: &Path) -> bool {
    let (Ok(x), Ok(y)) = (fs::metadata(a), fs::metadata(b)) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        x.dev() == y.dev() && x.ino() == y.ino()
    }
    #[cfg(not(unix))]
    {
        let _ = (x, y);
        matches!((a.canonicalize(), b.canonicalize()), (Ok(p), Ok(q)) if p == q)
    }
}

/// A name ending in a separator names a directory (`out/`), never a file.
fn ends_with_separator(path: &Path) -> bool {
    let s = path.as_os_str().as_encoded_bytes();
    s.last()
        .is_some_and(|&c| std::path::is_separator(c as char))
}

/// How an output path is written.
enum Target {
    /// Atomically: a temporary beside `path` renamed over it; `keep` is the metadata of the
    /// regular file being replaced.
    Replace {
        path: PathBuf,
        keep: Option<Metadata>,
    },
    /// In place: a character device or FIFO.
    Stream,
}

/// Decide how `dest` is written, or refuse it (see the module documentation).
fn target(dest: &Path) -> io::Result<Target> {
    let lmeta = match fs::symlink_metadata(dest) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        // "out/" where `out` is a regular file: the kernel says ENOTDIR.
        Err(_) if ends_with_separator(dest) => None,
        Err(e) => return Err(e),
    };
    let Some(lmeta) = lmeta else {
        if ends_with_separator(dest) {
            return Err(UnusableOutput::io(
                dest,
                "ends with '/', which names a directory; give the path of a file",
            ));
        }
        return Ok(Target::Replace {
            path: dest.to_path_buf(),
            keep: None,
        });
    };
    let link = lmeta.file_type().is_symlink();
    let meta = if link {
        match fs::metadata(dest) {
            Ok(m) => m,
            Err(e) => {
                return Err(match link_problem(dest, &e) {
                    Some(p) if p.starts_with("is a dangling") => UnusableOutput::io(
                        dest,
                        format!(
                            "{p}; ggpt does not create files through dangling links: create \
                             the target first or remove the link"
                        ),
                    ),
                    Some(p) => UnusableOutput::io(dest, p),
                    None => e,
                })
            }
        }
    } else {
        lmeta
    };
    let ft = meta.file_type();
    let via = if link { "a symbolic link to " } else { "" };
    if ft.is_file() {
        if ends_with_separator(dest) {
            return Err(UnusableOutput::io(
                dest,
                format!("ends with '/' but is {via}a regular file; drop the '/'"),
            ));
        }
        // Resolve the whole chain: the rename must replace the file, not the link.
        let path = if link {
            fs::canonicalize(dest)?
        } else {
            dest.to_path_buf()
        };
        return Ok(Target::Replace {
            path,
            keep: Some(meta),
        });
    }
    if is_stream(&ft) {
        return Ok(Target::Stream);
    }
    let what = kind_name(&ft);
    Err(UnusableOutput::io(
        dest,
        if ft.is_dir() {
            format!("is {via}{what}; give the path of a file")
        } else {
            format!(
                "is {via}{what}; ggpt writes only to regular files, character devices and FIFOs"
            )
        },
    ))
}

/// Give the temporary that replaces `old` the same permission bits, and (where the process may
/// change them: as root, or a group it belongs to) the same owner and group.
fn keep_metadata(f: &File, old: &Metadata) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // Before the mode: changing the owner clears set-user-ID bits.
        let _ = std::os::unix::fs::fchown(f, Some(old.uid()), Some(old.gid()));
    }
    f.set_permissions(old.permissions())
}

enum Sink {
    /// The temporary being written and the file it will replace.
    Replace { tmp: PathBuf, target: PathBuf },
    /// A character device or FIFO, written in place.
    Stream,
}

/// An output file (see the module documentation): a regular file that appears at its
/// destination only when [`AtomicFile::commit`] succeeds, or a stream written in place.
pub struct AtomicFile {
    /// `None` only after commit has taken it.
    out: Option<BufWriter<File>>,
    sink: Sink,
    dest: PathBuf,
    /// Bytes handed to the writer so far, how many of them were already sent to the disk, and
    /// how many of those were written and dropped from the page cache (see
    /// [`AtomicFile::write_back`]).
    written: u64,
    sent: u64,
    dropped: u64,
}

/// A temporary sends its data to the disk every this many bytes, so that `commit`'s fsync
/// finds little left to write (the kernel would otherwise hold a whole conversion's outputs
/// as dirty pages until the end).
const WRITE_BACK: u64 = 32 << 20;

impl AtomicFile {
    /// Open `dest` for writing, after looking at what stands there: a regular file (or
    /// nothing) gets a uniquely named temporary `.NAME.ggpt-tmp.PID.N` in its directory (the
    /// directory of the file a symbolic link points to); a character device or FIFO is opened
    /// in place (a FIFO waits for its reader); anything else is refused with an
    /// [`UnusableOutput`] inside the `io::Error`. Error texts do not repeat `dest`: callers
    /// name it.
    pub fn create(dest: &Path) -> io::Result<AtomicFile> {
        match target(dest)? {
            Target::Stream => {
                let f = OpenOptions::new().write(true).open(dest)?;
                Ok(AtomicFile {
                    out: Some(BufWriter::with_capacity(BUFFER, f)),
                    sink: Sink::Stream,
                    dest: dest.to_path_buf(),
                    written: 0,
                    sent: 0,
                    dropped: 0,
                })
            }
            Target::Replace { path, keep } => Self::create_temp(dest, &path, keep.as_ref()),
        }
    }

    fn create_temp(dest: &Path, target: &Path, keep: Option<&Metadata>) -> io::Result<AtomicFile> {
        let file_name = target
            .file_name()
            .ok_or_else(|| UnusableOutput::io(dest, "does not name a file"))?;
        let dir = match target.parent() {
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
                            "not created: the process is exiting",
                        ));
                    }
                    guard.get_or_insert_with(HashSet::new).insert(tmp.clone());
                    drop(guard);
                    let file = AtomicFile {
                        out: Some(BufWriter::with_capacity(BUFFER, f)),
                        sink: Sink::Replace {
                            tmp,
                            target: target.to_path_buf(),
                        },
                        dest: dest.to_path_buf(),
                        written: 0,
                        sent: 0,
                        dropped: 0,
                    };
                    if let (Some(old), Some(out)) = (keep, &file.out) {
                        // On failure `file` is dropped, which removes the temporary.
                        keep_metadata(out.get_ref(), old)?;
                    }
                    return Ok(file);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot create a temporary file in {}: {e}", dir.display()),
                    ))
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("no free temporary file name in {}", dir.display()),
        ))
    }

    /// Path of the temporary file being written; `None` for a stream written in place.
    pub fn temp_path(&self) -> Option<&Path> {
        match &self.sink {
            Sink::Replace { tmp, .. } if !tmp.as_os_str().is_empty() => Some(tmp),
            _ => None,
        }
    }

    /// The destination as given to [`AtomicFile::create`].
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Finish the output. A regular file: flush, fsync, rename onto the destination, fsync the
    /// directory so the rename itself survives a power cut; on error the temporary is removed
    /// and the destination untouched. A stream: flush (there is nothing to sync or rename).
    pub fn commit(mut self) -> io::Result<()> {
        let out = self
            .out
            .take()
            .ok_or_else(|| io::Error::other("already committed"))?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        let Sink::Replace { tmp, target } = &self.sink else {
            return Ok(());
        };
        // On any error below, Drop removes the temporary.
        file.sync_all()?;
        drop(file);
        fs::rename(tmp, target)?;
        let target = target.clone();
        self.forget();
        sync_dir(&target);
        Ok(())
    }

    /// Once [`WRITE_BACK`] more bytes reached the temporary file, start writing them to the
    /// disk without waiting (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`; elsewhere
    /// nothing): the disk then writes while the caller computes, instead of all at once in
    /// `commit`. The range sent the time before, whose writing has had a whole range's
    /// computation to finish, is then waited for and dropped from the page cache
    /// (`POSIX_FADV_DONTNEED`): a conversion's output passes through a few tens of MiB of
    /// cache instead of filling it (1.6 GB for `--type all` of GPT-2 Medium) and pushing out
    /// other programs' pages, and the pages it does use are the ones just freed (on a VM, fresh
    /// ones can cost more to touch than the copy into them). Best effort: a file system that
    /// refuses either call just leaves the work to `commit` and the pages to the kernel.
    fn write_back(&mut self, n: usize) {
        self.written += n as u64;
        if !matches!(self.sink, Sink::Replace { .. }) || self.written - self.sent < WRITE_BACK {
            return;
        }
        let Some(out) = &self.out else { return };
        // Bytes still in the BufWriter are not in the file yet.
        let in_file = self.written - out.buffer().len() as u64;
        if in_file <= self.sent {
            return;
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let fd = out.get_ref().as_raw_fd();
            let range = |from: u64, to: u64| (from as libc::off64_t, (to - from) as libc::off64_t);
            let (start, len) = range(self.sent, in_file);
            let (old_start, old_len) = range(self.dropped, self.sent);
            // SAFETY: plain FFI on a descriptor this `File` owns and keeps open; the calls read
            // no memory of ours and only schedule, wait for or uncache writeback of the given
            // byte ranges of that file.
            unsafe {
                libc::sync_file_range(fd, start, len, libc::SYNC_FILE_RANGE_WRITE);
                if old_len > 0
                    && libc::sync_file_range(
                        fd,
                        old_start,
                        old_len,
                        libc::SYNC_FILE_RANGE_WAIT_BEFORE
                            | libc::SYNC_FILE_RANGE_WRITE
                            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                    ) == 0
                {
                    libc::posix_fadvise(fd, old_start, old_len, libc::POSIX_FADV_DONTNEED);
                }
            }
            self.dropped = self.sent;
        }
        self.sent = in_file;
    }

    fn forget(&mut self) {
        if let Sink::Replace { tmp, .. } = &mut self.sink {
            if let Some(set) = live().as_mut() {
                set.remove(tmp.as_path());
            }
            *tmp = PathBuf::new();
        }
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
        let n = self.writer()?.write(buf)?;
        self.write_back(n);
        Ok(n)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.writer()?.write_all(buf)?;
        self.write_back(buf.len());
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer()?.flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        // Close before unlinking (required on Windows, harmless elsewhere); the buffered tail is
        // discarded rather than flushed since the output is being abandoned.
        if let Some(out) = self.out.take() {
            let (file, _) = out.into_parts();
            drop(file);
        }
        let Sink::Replace { tmp, .. } = &self.sink else {
            return;
        };
        if tmp.as_os_str().is_empty() {
            return;
        }
        let _ = fs::remove_file(tmp);
        self.forget();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::process::Command;
    use std::sync::mpsc;
    use std::time::Duration;

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

    fn write_file(dest: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut f = AtomicFile::create(dest)?;
        f.write_all(bytes)?;
        f.commit()
    }

    /// Fraction of the first `len` bytes of `path` that are in the page cache (`mincore`).
    fn cached_fraction(path: &Path, len: usize) -> f64 {
        let f = File::open(path).unwrap();
        // SAFETY: a read-only mapping of a file this test wrote and nothing else changes; it
        // is only passed to mincore, never read.
        let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: `map` is a live mapping at least `len` bytes long and `vec` has one byte per
        // page of it, as mincore requires.
        let rc = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 != 0).count() as f64 / vec.len() as f64
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn written_ranges_leave_the_page_cache() {
        let dir = scratch("uncache");
        let st = statfs_of(&dir);
        // tmpfs and ramfs pages are the file itself: nothing can be dropped.
        if st.f_type == 0x0102_1994 || st.f_type == 0x8584_58f6 {
            eprintln!("skipped: {} is on tmpfs/ramfs", dir.display());
            return;
        }
        let dest = dir.join("big.gguf");
        let mut f = AtomicFile::create(&dest).unwrap();
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let total = 4 * WRITE_BACK as usize;
        for _ in 0..total / chunk.len() {
            f.write_all(&chunk).unwrap();
        }
        f.commit().unwrap();
        // The first two ranges were written and dropped while the last ones were produced.
        let early = cached_fraction(&dest, 2 * WRITE_BACK as usize);
        assert!(
            early < 0.1,
            "{:.0} % of the early pages are still cached",
            early * 100.0
        );
        let back = fs::read(&dest).unwrap();
        assert_eq!(back.len(), total);
        assert!(back.chunks(chunk.len()).all(|c| c == chunk));
        fs::remove_dir_all(&dir).unwrap();
    }

    fn statfs_of(dir: &Path) -> libc::statfs {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: statfs only writes the struct it is given; all-zero bytes are a valid
        // `statfs` to start from.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a NUL-terminated path and `st` a writable statfs.
        let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statfs: {}", io::Error::last_os_error());
        st
    }

    /// The problem text of a refusal, or a panic naming what happened instead.
    fn refusal(dest: &Path) -> String {
        match AtomicFile::create(dest) {
            Ok(_) => panic!("{}: accepted", dest.display()),
            Err(e) => {
                assert!(
                    UnusableOutput::is_in(&e),
                    "{}: not a refusal: {e}",
                    dest.display()
                );
                assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
                e.to_string()
            }
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn mkfifo(p: &Path) {
        let s = Command::new("mkfifo").arg(p).status().expect("run mkfifo");
        assert!(s.success(), "mkfifo {}", p.display());
    }

    /// Read `p` to the end on a thread; the bytes arrive on the returned channel.
    fn reader(p: &Path) -> mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = mpsc::channel();
        let p = p.to_path_buf();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            File::open(&p).unwrap().read_to_end(&mut buf).unwrap();
            let _ = tx.send(buf);
        });
        rx
    }

    #[test]
    fn commit_replaces_destination_and_leaves_no_temporary() {
        let dir = scratch("commit");
        let dest = dir.join("model.gguf");
        fs::write(&dest, b"old").unwrap();
        let mut f = AtomicFile::create(&dest).unwrap();
        let tmp = f.temp_path().unwrap().to_path_buf();
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
        let (ta, tb) = (
            a.temp_path().unwrap().to_path_buf(),
            b.temp_path().unwrap().to_path_buf(),
        );
        assert_ne!(ta, tb);
        assert!(ta.exists() && tb.exists());
        // Other tests in this process may own live temporaries: remove only this test's.
        cleanup_where(|p| p.starts_with(&dir));
        assert!(!ta.exists() && !tb.exists());
        // Committing after cleanup reports the missing temporary instead of succeeding.
        assert!(a.commit().is_err());
        drop(b);
        assert!(!dest.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_directory_is_an_io_error_naming_it() {
        let missing = std::env::temp_dir().join("ggpt-no-such-dir-h3/x.gguf");
        let e = AtomicFile::create(&missing).err().unwrap();
        assert!(!UnusableOutput::is_in(&e), "{e}");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("ggpt-no-such-dir-h3"), "{e}");
    }

    #[test]
    fn permission_bits_are_kept_and_new_files_get_the_default() {
        let dir = scratch("mode");
        for m in [0o600, 0o640, 0o755, 0o444] {
            let dest = dir.join(format!("f{m:o}"));
            fs::write(&dest, b"old").unwrap();
            fs::set_permissions(&dest, fs::Permissions::from_mode(m)).unwrap();
            let ino = fs::metadata(&dest).unwrap().ino();
            write_file(&dest, b"new").unwrap();
            assert_eq!(fs::read(&dest).unwrap(), b"new");
            assert_eq!(mode(&dest), m, "mode of f{m:o}");
            // Replaced, not written in place.
            assert_ne!(fs::metadata(&dest).unwrap().ino(), ino);
        }
        // Owner and group are kept where the process may set them (root).
        let owned = dir.join("owned");
        fs::write(&owned, b"old").unwrap();
        if std::os::unix::fs::chown(&owned, Some(4321), Some(4322)).is_ok() {
            write_file(&owned, b"new").unwrap();
            let m = fs::metadata(&owned).unwrap();
            assert_eq!((m.uid(), m.gid()), (4321, 4322));
        } else {
            println!("skipping the owner check: chown needs root");
        }
        // A new file: what the process's umask gives a plain create.
        let plain = dir.join("plain");
        File::create(&plain).unwrap();
        let new = dir.join("new");
        write_file(&new, b"x").unwrap();
        assert_eq!(mode(&new), mode(&plain));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symlink_stays_a_link_and_its_target_is_replaced_atomically() {
        let dir = scratch("link");
        let real_dir = dir.join("real");
        let link_dir = dir.join("links");
        fs::create_dir_all(&real_dir).unwrap();
        fs::create_dir_all(&link_dir).unwrap();
        let real = real_dir.join("model.gguf");
        fs::write(&real, b"old").unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o604)).unwrap();
        // A chain: links/b -> links/a -> ../real/model.gguf (relative).
        let a = link_dir.join("a");
        let b = link_dir.join("b");
        std::os::unix::fs::symlink("../real/model.gguf", &a).unwrap();
        std::os::unix::fs::symlink("a", &b).unwrap();
        let mut prev = b"old".to_vec();
        for (i, via) in [&a, &b].into_iter().enumerate() {
            let body = format!("new {i}");
            let mut f = AtomicFile::create(via).unwrap();
            // The temporary lives beside the file, not beside the link.
            assert_eq!(
                f.temp_path()
                    .unwrap()
                    .parent()
                    .unwrap()
                    .canonicalize()
                    .unwrap(),
                real_dir.canonicalize().unwrap()
            );
            f.write_all(body.as_bytes()).unwrap();
            // Not visible before commit.
            assert_eq!(fs::read(&real).unwrap(), prev);
            f.commit().unwrap();
            prev = body.clone().into_bytes();
            assert_eq!(fs::read(&real).unwrap(), body.as_bytes());
            assert!(fs::symlink_metadata(&a).unwrap().file_type().is_symlink());
            assert!(fs::symlink_metadata(&b).unwrap().file_type().is_symlink());
            assert_eq!(fs::read_link(&a).unwrap(), Path::new("../real/model.gguf"));
            assert_eq!(fs::read_link(&b).unwrap(), Path::new("a"));
            assert_eq!(mode(&real), 0o604);
        }
        assert_eq!(entries(&real_dir), ["model.gguf"]);
        assert_eq!(entries(&link_dir), ["a", "b"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn directories_sockets_dangling_links_and_loops_are_refused() {
        let dir = scratch("refuse");
        let sub = dir.join("sub");
        fs::create_dir(&sub).unwrap();
        assert!(refusal(&sub).contains("is a directory"));
        assert!(refusal(Path::new("/")).contains("is a directory"));
        let mut slash = sub.clone().into_os_string();
        slash.push("/");
        assert!(refusal(Path::new(&slash)).contains("is a directory"));
        // A name ending in '/' that does not exist, and one under a regular file.
        assert!(refusal(&dir.join("new/")).contains("ends with '/'"));
        let file = dir.join("file");
        fs::write(&file, b"x").unwrap();
        let mut file_slash = file.clone().into_os_string();
        file_slash.push("/");
        assert!(refusal(Path::new(&file_slash)).contains("ends with '/'"));

        let to_dir = dir.join("to-dir");
        std::os::unix::fs::symlink(&sub, &to_dir).unwrap();
        assert!(refusal(&to_dir).contains("is a symbolic link to a directory"));

        let sock = dir.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let msg = refusal(&sock);
        assert!(msg.contains("is a socket"), "{msg}");

        let dangling = dir.join("dangling");
        std::os::unix::fs::symlink("nowhere/x.gguf", &dangling).unwrap();
        let msg = refusal(&dangling);
        assert!(
            msg.contains("dangling symbolic link (to nowhere/x.gguf)"),
            "{msg}"
        );
        let loop_a = dir.join("loop-a");
        let loop_b = dir.join("loop-b");
        std::os::unix::fs::symlink("loop-b", &loop_a).unwrap();
        std::os::unix::fs::symlink("loop-a", &loop_b).unwrap();
        assert_eq!(refusal(&loop_a), "is a symbolic link loop");

        // Nothing was created or changed.
        assert_eq!(
            entries(&dir),
            ["dangling", "file", "loop-a", "loop-b", "sock", "sub", "to-dir"]
        );
        assert!(entries(&sub).is_empty());
        assert!(fs::symlink_metadata(&sock).unwrap().file_type().is_socket());
        assert!(fs::symlink_metadata(&dangling)
            .unwrap()
            .file_type()
            .is_symlink());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fifo_is_written_in_place_and_its_reader_gets_every_byte() {
        let dir = scratch("fifo");
        let fifo = dir.join("out.npy");
        mkfifo(&fifo);
        // Through a symbolic link too: the link is followed to the FIFO.
        let link = dir.join("link.npy");
        std::os::unix::fs::symlink("out.npy", &link).unwrap();
        for dest in [&fifo, &link] {
            let rx = reader(&fifo);
            let body: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
            let mut f = AtomicFile::create(dest).unwrap();
            assert!(f.temp_path().is_none());
            f.write_all(&body).unwrap();
            f.commit().unwrap();
            let got = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("reader finished");
            assert_eq!(got.len(), body.len());
            assert!(got == body, "the reader got different bytes");
            assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
        }
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(entries(&dir), ["link.npy", "out.npy"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fifo_whose_reader_leaves_early_is_a_write_error() {
        let dir = scratch("fifo-early");
        let fifo = dir.join("out.npy");
        mkfifo(&fifo);
        let p = fifo.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 10];
            let n = File::open(&p).unwrap().read(&mut buf).unwrap();
            let _ = tx.send(n);
            // The read end closes here.
        });
        let mut f = AtomicFile::create(&fifo).unwrap();
        let r = (|| {
            for _ in 0..64 {
                f.write_all(&[1u8; 1 << 20])?;
            }
            f.flush()
        })();
        let e = r.expect_err("64 MiB into a pipe whose reader is gone");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
        assert!(rx.recv_timeout(Duration::from_secs(20)).unwrap() > 0);
        drop(f);
        assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Private copies of /dev/null (1,3) and /dev/full (1,7); `None` (with the reason printed)
    /// where device nodes cannot be made (not root, or no CAP_MKNOD).
    fn char_devices(dir: &Path) -> Option<(PathBuf, PathBuf)> {
        let null = dir.join("null.npy");
        let full = dir.join("full.gguf");
        for (p, minor) in [(&null, "3"), (&full, "7")] {
            let out = Command::new("mknod")
                .args(["-m", "666"])
                .arg(p)
                .args(["c", "1", minor])
                .output()
                .ok()?;
            if !out.status.success() {
                println!(
                    "skipping the character-device part: mknod failed ({}); it needs root",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                return None;
            }
        }
        Some((null, full))
    }

    #[test]
    fn character_devices_are_written_in_place_and_never_replaced() {
        let dir = scratch("chardev");
        let Some((null, full)) = char_devices(&dir) else {
            return;
        };
        let rdev = |p: &Path| {
            let m = fs::symlink_metadata(p).unwrap();
            assert!(m.file_type().is_char_device(), "{} replaced", p.display());
            m.rdev()
        };
        let (null_dev, full_dev) = (rdev(&null), rdev(&full));
        write_file(&null, &[5; 3 << 20]).unwrap();
        let e = write_file(&full, &[5; 3 << 20]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(28), "{e}"); // ENOSPC
                                                       // A small write fails only when the buffer is flushed, at commit.
        let e = write_file(&full, b"tiny").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(28), "{e}");
        assert_eq!((rdev(&null), rdev(&full)), (null_dev, full_dev));
        // Through a link, the device stays and so does the link.
        let link = dir.join("link");
        std::os::unix::fs::symlink(&null, &link).unwrap();
        write_file(&link, b"x").unwrap();
        assert_eq!(rdev(&null), null_dev);
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(entries(&dir), ["full.gguf", "link", "null.npy"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn same_file_sees_through_symbolic_and_hard_links() {
        let dir = scratch("same");
        let a = dir.join("a.gguf");
        let b = dir.join("b.gguf");
        fs::write(&a, b"x").unwrap();
        fs::write(&b, b"x").unwrap();
        let hard = dir.join("hard.gguf");
        fs::hard_link(&a, &hard).unwrap();
        let soft = dir.join("soft.gguf");
        std::os::unix::fs::symlink("a.gguf", &soft).unwrap();
        assert!(same_file(&a, &a));
        assert!(same_file(&a, &hard));
        assert!(same_file(&soft, &a));
        assert!(same_file(
            &dir.join("../")
                .join(dir.file_name().unwrap())
                .join("a.gguf"),
            &a
        ));
        assert!(!same_file(&a, &b));
        assert!(!same_file(&a, &dir.join("missing")));
        let refuse = |out: &Path| {
            refuse_input_as_output(out, [b.as_path(), a.as_path()], "the input")
                .map_err(|e| e.problem)
        };
        assert_eq!(
            refuse(&a),
            Err(
                "is also the input: the output would overwrite the input; choose another path"
                    .into()
            )
        );
        let through_link = refuse(&soft).unwrap_err();
        assert!(
            through_link.starts_with(&format!("is the same file as the input {}", a.display())),
            "{through_link}"
        );
        assert_eq!(refuse(&dir.join("new.gguf")), Ok(()));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn input_paths_are_described() {
        let dir = scratch("describe");
        let file = dir.join("config.json");
        fs::write(&file, b"{}").unwrap();
        assert_eq!(not_a_regular_file(&file), None);
        let link = dir.join("link");
        std::os::unix::fs::symlink("config.json", &link).unwrap();
        assert_eq!(not_a_regular_file(&link), None);
        assert_eq!(
            not_a_regular_file(&dir.join("nothing")).as_deref(),
            Some("missing")
        );
        assert_eq!(
            not_a_regular_file(&dir).as_deref(),
            Some("is a directory, not a regular file")
        );
        let fifo = dir.join("fifo");
        mkfifo(&fifo);
        assert_eq!(
            not_a_regular_file(&fifo).as_deref(),
            Some("is a FIFO (named pipe), not a regular file")
        );
        let to_fifo = dir.join("to-fifo");
        std::os::unix::fs::symlink("fifo", &to_fifo).unwrap();
        assert_eq!(
            not_a_regular_file(&to_fifo).as_deref(),
            Some("is a symbolic link to a FIFO (named pipe), not a regular file")
        );
        let self_loop = dir.join("self");
        std::os::unix::fs::symlink("self", &self_loop).unwrap();
        assert_eq!(
            not_a_regular_file(&self_loop).as_deref(),
            Some("is a symbolic link loop")
        );
        let dangling = dir.join("dangling");
        std::os::unix::fs::symlink("gone.json", &dangling).unwrap();
        assert_eq!(
            not_a_regular_file(&dangling).as_deref(),
            Some("is a dangling symbolic link (to gone.json)")
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn output_directories_that_are_something_else_are_refused() {
        let dir = scratch("mkdir");
        let made = dir.join("a/b/c");
        create_dir_all(&made).unwrap();
        assert!(made.is_dir());
        create_dir_all(&made).unwrap();
        let file = dir.join("file");
        fs::write(&file, b"x").unwrap();
        let fifo = dir.join("fifo");
        mkfifo(&fifo);
        let dangling = dir.join("dangling");
        std::os::unix::fs::symlink("gone", &dangling).unwrap();
        for (p, what) in [
            (&file, "is a regular file; give a directory"),
            (&fifo, "is a FIFO (named pipe); give a directory"),
            (
                &dangling,
                "is a dangling symbolic link (to gone); give a directory",
            ),
        ] {
            let e = create_dir_all(p).unwrap_err();
            assert!(UnusableOutput::is_in(&e), "{e}");
            assert_eq!(e.to_string(), what);
        }
        // Under a regular file: an ordinary I/O error (exit 4), not a refusal.
        let e = create_dir_all(&file.join("sub")).unwrap_err();
        assert!(!UnusableOutput::is_in(&e), "{e}");
        assert_eq!(fs::read(&file).unwrap(), b"x");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_refusal_is_found_in_an_error_chain() {
        let e = AtomicFile::create(Path::new("/")).err().unwrap();
        let wrapped = anyhow::Error::from(e).context("/: cannot write");
        assert!(wrapped.chain().any(UnusableOutput::is_in));
        let plain = anyhow::Error::from(io::Error::other("disk on fire")).context("x");
        assert!(!plain.chain().any(UnusableOutput::is_in));
        let direct = anyhow::Error::from(UnusableOutput::new("x.gguf", "is the input"));
        assert!(direct.chain().any(UnusableOutput::is_in));
        assert_eq!(direct.to_string(), "x.gguf: is the input");
    }
}
