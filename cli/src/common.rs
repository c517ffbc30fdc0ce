//! Small pieces shared by the subcommands: thread-pool set-up, reading text input, writing
//! standard output, bounds on user-supplied sizes, and the error types for flag values that
//! parse but cannot be used and for inputs the command line reads itself.

use anyhow::Result;
use ggpt_convert::pipeline::OutputError;
use std::io::{Read, StdoutLock, Write};
use std::path::{Path, PathBuf};

/// Upper bound for `-t`: far above any real machine, far below what would exhaust the OS.
pub const MAX_THREADS: usize = 1024;

/// Largest text `-p -`, `-f` or `perplexity -f` reads. Far more than any context window or
/// evaluation set needs, and small enough that an endless input (`-f /dev/zero`, a huge file
/// given by mistake) is refused instead of exhausting memory.
pub const MAX_TEXT_BYTES: u64 = 256 << 20;

/// A flag value that parses but cannot be used: out of range, inconsistent with another flag
/// or with the model. The command line is wrong, so it gets clap's exit code (2), not the
/// generic 1. The message names the flag.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FlagError(pub String);

/// An input the command line reads itself (a prompt or text file, standard input, a GGUF
/// tensor's data for `dump`) that cannot be used: a bad input file, exit code 3, like the
/// library's errors about model files. The message names the input.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

impl InputError {
    /// "`input`: `problem`".
    pub fn new(input: impl AsRef<Path>, problem: impl std::fmt::Display) -> Self {
        InputError(format!("{}: {problem}", input.as_ref().display()))
    }
}

/// A [`FlagError`] as an `anyhow::Error`.
pub fn flag_error(msg: impl Into<String>) -> anyhow::Error {
    FlagError(msg.into()).into()
}

/// `return Err(FlagError(format!(...)))`: the flag counterpart of `anyhow::bail!`.
macro_rules! bail_flag {
    ($($arg:tt)*) => {
        return Err($crate::common::flag_error(format!($($arg)*)))
    };
}
pub(crate) use bail_flag;

/// A line on standard error for the user (progress, banners, timings). Unlike `eprintln!` it
/// does not panic when standard error cannot be written (`2>/dev/full`): the line is lost, the
/// command goes on and its exit code still tells what happened.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
pub(crate) use note;

/// The thread count of `--threads` (1 to [`MAX_THREADS`]), or one per core when not given.
pub fn thread_count(threads: Option<usize>) -> Result<usize> {
    match threads {
        Some(0) => bail_flag!("--threads 0: must be at least 1"),
        Some(t) if t > MAX_THREADS => {
            bail_flag!("--threads {t} is more than the maximum of {MAX_THREADS}")
        }
        Some(t) => Ok(t),
        None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

/// Size rayon's global pool (once per process). `None` = one thread per core.
pub fn init_threads(threads: Option<usize>) -> Result<usize> {
    let n = thread_count(threads)?;
    // A second call (e.g. from tests) keeps the first pool; that is fine.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    Ok(rayon::current_num_threads())
}

/// Read a text argument: `-` means standard input, otherwise the text itself.
pub fn text_arg(text: &str) -> Result<String> {
    if text != "-" {
        return Ok(text.to_string());
    }
    let what = "standard input";
    let mut buf = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_TEXT_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| InputError::new(what, format!("cannot read: {e}")))?;
    utf8_text(buf, Path::new(what), MAX_TEXT_BYTES)
}

/// Read a whole text file as UTF-8, naming the file in every error. Only regular files are
/// read: a named pipe without a writer would block forever and a device like /dev/zero never
/// ends, so both are refused up front rather than hanging or filling memory.
pub fn read_text_file(path: &Path) -> Result<String> {
    let bad = |problem: String| InputError::new(path, problem);
    let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    if meta.is_dir() {
        return Err(bad("is a directory, not a text file".into()).into());
    }
    if !meta.is_file() {
        return Err(bad(
            "is not a regular file (a pipe or device could block or never end); \
             save the text to a file first"
                .into(),
        )
        .into());
    }
    if meta.len() > MAX_TEXT_BYTES {
        return Err(bad(format!(
            "is {} MiB; text inputs are limited to {} MiB",
            meta.len() >> 20,
            MAX_TEXT_BYTES >> 20
        ))
        .into());
    }
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TEXT_BYTES + 1).read_to_end(&mut buf))
        .map_err(|e| bad(format!("cannot read: {e}")))?;
    utf8_text(buf, path, MAX_TEXT_BYTES)
}

/// The bytes of a text input as a `String`, or an error naming the input. Callers read at
/// most `max + 1` bytes, so a longer buffer means the input went on past the limit.
fn utf8_text(buf: Vec<u8>, what: &Path, max: u64) -> Result<String> {
    if buf.len() as u64 > max {
        return Err(InputError::new(
            what,
            format!("is longer than {max} bytes, the limit for text inputs"),
        )
        .into());
    }
    String::from_utf8(buf).map_err(|e| {
        InputError::new(
            what,
            format!(
                "is not valid UTF-8 (first bad byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
        .into()
    })
}

/// Standard output for a command's results. A write that fails is an unwritable output
/// (exit 4, e.g. `> /dev/full`), except a closed pipe: `ggpt run … | head` stopping early is
/// the reader's choice, so the command just stops writing and succeeds. `println!` would
/// panic in both cases.
pub struct Stdout {
    out: StdoutLock<'static>,
    closed: bool,
}

impl Stdout {
    pub fn new() -> Stdout {
        Stdout {
            out: std::io::stdout().lock(),
            closed: false,
        }
    }

    /// Write and flush `text`. `Ok(false)` once the reader has gone: the caller may stop
    /// producing output.
    pub fn write(&mut self, text: &str) -> Result<bool> {
        if self.closed {
            return Ok(false);
        }
        match self
            .out
            .write_all(text.as_bytes())
            .and_then(|_| self.out.flush())
        {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(false)
            }
            Err(source) => Err(OutputError {
                path: PathBuf::from("standard output"),
                what: "cannot write",
                source,
            }
            .into()),
        }
    }
}

impl Default for Stdout {
    fn default() -> Self {
        Self::new()
    }
}

/// Write `text` to standard output (see [`Stdout`]).
pub fn print_stdout(text: &str) -> Result<()> {
    Stdout::new().write(text).map(|_| ())
}

/// An I/O error while writing `path`, as the typed output error (exit 4).
pub fn output_error(path: &Path, what: &'static str, source: std::io::Error) -> anyhow::Error {
    OutputError {
        path: path.to_path_buf(),
        what,
        source,
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_errors_are_typed_and_keep_the_message() {
        let e = init_threads(Some(0)).unwrap_err();
        assert!(e.is::<FlagError>(), "{e:#}");
        assert!(e.to_string().contains("--threads"), "{e}");
        let e = init_threads(Some(MAX_THREADS + 1)).unwrap_err();
        assert!(e.is::<FlagError>() && e.to_string().contains("1024"), "{e}");
    }

    #[test]
    fn text_files_must_be_regular_utf8_and_bounded() {
        let dir = std::env::temp_dir().join(format!("ggpt-common-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("ok.txt");
        std::fs::write(&good, "héllo").unwrap();
        assert_eq!(read_text_file(&good).unwrap(), "héllo");

        let latin1 = dir.join("latin1.txt");
        std::fs::write(&latin1, b"caf\xe9").unwrap();
        let e = read_text_file(&latin1).unwrap_err();
        assert!(e.is::<InputError>(), "{e:#}");
        assert!(e.to_string().contains("offset 3"), "{e}");

        for (path, want) in [
            (dir.as_path(), "directory"),
            (Path::new("/dev/zero"), "not a regular file"),
            (Path::new("/no/such/file.txt"), "cannot read"),
        ] {
            let e = read_text_file(path).unwrap_err();
            let msg = e.to_string();
            assert!(e.is::<InputError>(), "{msg}");
            assert!(
                msg.contains(want) && msg.contains(&*path.to_string_lossy()),
                "{msg}"
            );
        }
        let e = utf8_text(vec![b'a'; 11], Path::new("stdin"), 10).unwrap_err();
        assert!(
            e.to_string().contains("stdin: is longer than 10 bytes"),
            "{e}"
        );
        assert_eq!(
            utf8_text(vec![b'a'; 10], Path::new("stdin"), 10).unwrap(),
            "a".repeat(10)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
