//! Helpers shared by the hardening tests (malformed.rs, interrupt.rs, concurrency.rs): run the
//! real `ggpt` binary under a timeout and classify how it ended, and convert the bundled tiny
//! model once per test binary.
//!
//! Each test binary compiles this module separately and uses only part of it.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ggpt_convert::pipeline::{convert_hf, ConvertOptions, NoProgress};
use ggpt_convert::policy::FileType;

/// A run that takes longer than this is treated as a hang. Every command in these tests
/// finishes in well under a second on the tiny model; the margin is for a loaded CI machine.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// The `ggpt` binary under test (built by cargo for integration tests).
pub fn ggpt() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ggpt"))
}

/// The repository root (these tests belong to the `ggpt-cli` package in cli/).
pub fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The bundled Hugging Face checkpoint.
pub fn tiny_hf() -> PathBuf {
    repo().join("models/tiny-gpt2")
}

/// An empty directory for one test, under cargo's per-target temporary directory. The process
/// id keeps concurrent runs of the suite apart.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("hardening")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch directory");
    dir
}

/// models/tiny-gpt2 converted to every type (`tiny-gpt2-<TYPE>.gguf`), once per test binary.
/// The directory is per test binary but not per process, so repeated runs reuse (and
/// atomically overwrite) the same ~90 MB instead of leaving a copy each time.
pub fn tiny_models() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("hardening")
            .join(format!("tiny-models-{}", env!("CARGO_CRATE_NAME")));
        std::fs::create_dir_all(&dir).expect("create model directory");
        let opts = ConvertOptions {
            hf_dir: tiny_hf(),
            types: FileType::ALL.to_vec(),
            output: Some(dir.clone()),
            name: Some("tiny-gpt2".to_string()),
        };
        convert_hf(&opts, &NoProgress).expect("convert models/tiny-gpt2");
        dir
    })
}

/// Path of the converted tiny model of type `label` ("F16", "Q8_0", "Q6_K", "Q4_K_M").
pub fn tiny_model(label: &str) -> PathBuf {
    tiny_models().join(format!("tiny-gpt2-{label}.gguf"))
}

/// How one `ggpt` process ended.
#[derive(Debug)]
pub struct Outcome {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub elapsed: Duration,
    /// The command line, for messages.
    pub cmd: String,
}

impl Outcome {
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    pub fn signal(&self) -> Option<i32> {
        self.status.and_then(|s| s.signal())
    }

    pub fn success(&self) -> bool {
        self.code() == Some(0)
    }

    /// Everything needed to understand a failed assertion.
    pub fn describe(&self) -> String {
        format!(
            "`{}`: status {:?} (signal {:?}, timed out {}) after {:.2?}\n--- stderr ---\n{}\n--- stdout (first 2000 bytes) ---\n{}",
            self.cmd,
            self.code(),
            self.signal(),
            self.timed_out,
            self.elapsed,
            self.stderr,
            self.stdout.chars().take(2000).collect::<String>()
        )
    }

    /// The process ended by itself: no hang, no signal, no panic (exit 101 / "panicked").
    pub fn problem_if_not_orderly(&self) -> Option<String> {
        if self.timed_out {
            return Some(format!("hang (killed after {TIMEOUT:?})"));
        }
        if let Some(sig) = self.signal() {
            return Some(format!("killed by signal {sig}"));
        }
        if self.code() == Some(101) || self.stderr.contains("panicked") {
            return Some("panic".to_string());
        }
        None
    }

    /// The error contract (docs/errors.md): a non-zero exit code, and stderr whose first line
    /// starts with "error:" and names `must_name` (a file or a flag). `None` if it holds.
    pub fn problem_if_not_clean_error(&self, must_name: &str) -> Option<String> {
        if let Some(p) = self.problem_if_not_orderly() {
            return Some(p);
        }
        if self.success() {
            return Some("exit code 0 for bad input".to_string());
        }
        let line = self.error_line();
        if !line.starts_with("error:") {
            return Some(format!(
                "stderr does not start with \"error:\" (first line {line:?})"
            ));
        }
        if !self.stderr.contains(must_name) {
            return Some(format!("the error does not name {must_name:?}"));
        }
        None
    }

    /// The first line of stderr (where the error contract puts the message).
    pub fn error_line(&self) -> &str {
        self.stderr.lines().next().unwrap_or("")
    }
}

/// Run `ggpt` with `args`, feeding `stdin` (or nothing), killing it after `timeout`.
pub fn run_ggpt_with<S: AsRef<OsStr>>(
    args: &[S],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Outcome {
    run_ggpt_io(args, stdin, Stdio::piped(), timeout)
}

/// [`run_ggpt_with`] with standard output connected to `stdout` (captured only if piped; e.g.
/// /dev/full to test write failures).
pub fn run_ggpt_io<S: AsRef<OsStr>>(
    args: &[S],
    stdin: Option<&[u8]>,
    stdout: Stdio,
    timeout: Duration,
) -> Outcome {
    let mut cmd = Command::new(ggpt());
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(stdout)
        .stderr(Stdio::piped());
    let line = std::iter::once("ggpt".to_string())
        .chain(
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned()),
        )
        .collect::<Vec<_>>()
        .join(" ");
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn ggpt");
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let input = input.to_vec();
        std::thread::spawn(move || {
            // The process may exit before reading everything; that is its business.
            let _ = pipe.write_all(&input);
        });
    }
    let (out_t, err_t) = drain(&mut child);
    let (status, timed_out) = wait_timeout(&mut child, timeout);
    Outcome {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
        timed_out,
        elapsed: start.elapsed(),
        cmd: line,
    }
}

pub fn run_ggpt<S: AsRef<OsStr>>(args: &[S]) -> Outcome {
    run_ggpt_with(args, None, TIMEOUT)
}

type Reader = std::thread::JoinHandle<String>;

/// Read the child's stdout and stderr on threads so a chatty child never blocks on a full pipe.
pub fn drain(child: &mut Child) -> (Reader, Reader) {
    fn reader<R: Read + Send + 'static>(r: Option<R>) -> Reader {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    }
    (reader(child.stdout.take()), reader(child.stderr.take()))
}

/// Wait for `child` up to `timeout`; kill it (SIGKILL) if it is still running then.
/// Returns the status and whether it had to be killed.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> (Option<ExitStatus>, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return (Some(s), false),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                return (child.wait().ok(), true);
            }
            Err(_) => return (None, false),
        }
    }
}

/// Send `signal` (a name `kill` understands: INT, TERM, KILL, STOP, CONT) to process `pid`.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run kill");
    // The process may already have exited; that is not an error for the callers.
    let _ = status;
}

/// A tiny deterministic generator (xorshift64*) so "random" test inputs are reproducible.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
