//! Hostile command lines, end to end: huge, zero, negative and NaN flag values, empty
//! strings, files that are not what a flag expects (a directory, /dev/null, a FIFO, /dev/zero,
//! text that is not UTF-8), prompts longer than the context, and outputs that cannot be
//! written, across every subcommand. Each case runs the real `ggpt` binary and must end with
//! exactly the exit code docs/errors.md promises:
//!
//! - 2: the command line parses (or not) but cannot be used — out-of-range or inconsistent flags;
//! - 3: an input file is bad — missing, not a regular file, not GGUF/UTF-8;
//! - 4: an output cannot be written;
//! - 0: extreme but valid values, which must simply work.
//!
//! A failure must print one `error:` line first that names the flag or file, never panic,
//! hang or leave a temporary file behind. Cases are cheap (tiny model, `-n` ≤ 2, and every
//! refusal happens before any real work), so the whole file runs in a few seconds.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use common::{
    drain, ggpt, run_ggpt, run_ggpt_io, run_ggpt_with, scratch, tiny_hf, tiny_model, wait_timeout,
    Outcome, TIMEOUT,
};

/// One command line and what it must do.
struct Case {
    args: Vec<String>,
    /// The exit code wanted.
    code: i32,
    /// What the error line must mention (a flag or a path); ignored for code 0.
    names: String,
}

fn case(code: i32, names: &str, args: &[&str]) -> Case {
    Case {
        args: args.iter().map(|s| s.to_string()).collect(),
        code,
        names: names.to_string(),
    }
}

/// Why `o` does not satisfy `want` (exit code `code`, error naming `names`), if it does not.
fn problem(o: &Outcome, code: i32, names: &str) -> Option<String> {
    if let Some(p) = o.problem_if_not_orderly() {
        return Some(p);
    }
    if o.code() != Some(code) {
        return Some(format!("exit code {:?}, wanted {code}", o.code()));
    }
    if code == 0 {
        return None;
    }
    if !o.stderr.starts_with("error:") {
        return Some(format!(
            "stderr does not start with \"error:\" (first line {:?})",
            o.error_line()
        ));
    }
    if !o.error_line().contains(names) {
        return Some(format!("the error line does not name {names:?}"));
    }
    if o.stderr.lines().filter(|l| l.starts_with("error:")).count() != 1 {
        return Some("more than one error line".to_string());
    }
    None
}

/// Temporary files (`.NAME.ggpt-tmp.PID.N`) left in `dir`.
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".ggpt-tmp."))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn hostile_command_lines() {
    let dir = scratch("flags");
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    let m = s(tiny_model("Q4_K_M"));
    let f16 = s(tiny_model("F16"));
    let hf = s(tiny_hf());
    let text = s(tiny_hf().join("val.txt"));
    let d = s(dir.clone());
    let missing = s(dir.join("no-such-file"));
    let no_dir = s(dir.join("no/such/dir/"));
    let latin1 = dir.join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait\n").unwrap();
    let latin1 = s(latin1);
    let short = dir.join("short.txt");
    std::fs::write(&short, "Hello there.\n").unwrap();
    let short = s(short);
    let long = dir.join("long.txt");
    std::fs::write(
        &long,
        "the quick brown fox jumps over the lazy dog. ".repeat(250),
    )
    .unwrap();
    let long = s(long);
    // A named pipe nobody writes to: opening it for reading would block forever.
    let fifo = dir.join("fifo");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|st| st.success());
    assert!(made, "mkfifo {} failed", fifo.display());
    let fifo = s(fifo);
    // A regular file where a directory is expected, to write "under".
    let file = dir.join("a-regular-file");
    std::fs::write(&file, b"x").unwrap();
    let under_file = s(file.join("out"));
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = |name: &str| s(out_dir.join(name));

    let max = "18446744073709551615";
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        // --- run: sizes.
        case(2, "-n", &["run", "-m", &m, "-p", "Hi", "-n", max]),
        case(2, "-n", &["run", "-m", &m, "-p", "Hi", "-n", "1024"]),
        case(2, "-n", &["run", "-m", &m, "-p", "Hi", "--ctx", "8", "-n", "8"]),
        case(2, "--ctx", &["run", "-m", &m, "-p", "Hi", "--ctx", "0"]),
        case(2, "--ctx", &["run", "-m", &m, "-p", "Hi", "--ctx", "1025"]),
        case(2, "--ctx", &["run", "-m", &m, "-p", "Hi", "--ctx", max]),
        case(2, "context", &["run", "-m", &m, "-f", &long, "-n", "1"]),
        case(2, "context", &["run", "-m", &m, "-f", &short, "--ctx", "4", "-n", "1"]),
        case(2, "--threads", &["run", "-m", &m, "-p", "Hi", "-t", "0"]),
        case(2, "--threads", &["run", "-m", &m, "-p", "Hi", "-t", "100000"]),
        case(2, "--threads", &["run", "-m", &m, "-p", "Hi", "-t", max]),
        case(2, "--num-return-sequences", &["run", "-m", &m, "-p", "Hi", "--num-return-sequences", "0"]),
        case(2, "--num-return-sequences", &["run", "-m", &m, "-p", "Hi", "--num-return-sequences", "100"]),
        // --- run: sampling values.
        case(2, "--temp", &["run", "-m", &m, "-p", "Hi", "--temp", "nan"]),
        case(2, "--temp", &["run", "-m", &m, "-p", "Hi", "--temp", "-1"]),
        case(2, "--temp", &["run", "-m", &m, "-p", "Hi", "--temp", "inf"]),
        case(2, "--top-p", &["run", "-m", &m, "-p", "Hi", "--top-p", "2"]),
        case(2, "--top-p", &["run", "-m", &m, "-p", "Hi", "--top-p", "0"]),
        case(2, "--top-p", &["run", "-m", &m, "-p", "Hi", "--top-p", "NaN"]),
        case(2, "--min-p", &["run", "-m", &m, "-p", "Hi", "--min-p", "-0.5"]),
        case(2, "--min-p", &["run", "-m", &m, "-p", "Hi", "--min-p", "nan"]),
        case(2, "--repeat-penalty", &["run", "-m", &m, "-p", "Hi", "--repeat-penalty", "0"]),
        case(2, "--repeat-penalty", &["run", "-m", &m, "-p", "Hi", "--repeat-penalty=-inf"]),
        // --- run: what clap itself refuses.
        case(2, "-1", &["run", "-m", &m, "-p", "Hi", "-n", "-1"]),
        case(2, "-1", &["run", "-m", &m, "-p", "Hi", "--seed", "-1"]),
        case(2, "--n-predict", &["run", "-m", &m, "-p", "Hi", "-n", "18446744073709551616"]),
        case(2, "--temp", &["run", "-m", &m, "-p", "Hi", "--temp", "warm"]),
        case(2, "--model", &["run", "-m", "", "-p", "Hi"]),
        case(2, "--file", &["run", "-m", &m, "-f", ""]),
        // --- run: files.
        case(3, &d, &["run", "-m", &d, "-p", "Hi"]),
        case(3, "/dev/null", &["run", "-m", "/dev/null", "-p", "Hi"]),
        case(3, &fifo, &["run", "-m", &fifo, "-p", "Hi"]),
        case(3, &missing, &["run", "-m", &missing, "-p", "Hi"]),
        case(3, &latin1, &["run", "-m", &latin1, "-p", "Hi"]),
        case(3, &latin1, &["run", "-m", &m, "-f", &latin1]),
        case(3, &fifo, &["run", "-m", &m, "-f", &fifo]),
        case(3, "/dev/zero", &["run", "-m", &m, "-f", "/dev/zero"]),
        case(3, &d, &["run", "-m", &m, "-f", &d]),
        case(3, &missing, &["run", "-m", &m, "-f", &missing]),
        // --- run: extreme but valid values must just work.
        case(0, "", &["run", "-m", &m, "-p", "Hi", "-n", "2", "--top-k", max, "--repeat-last-n", max, "--seed", max]),
        case(0, "", &["run", "-m", &m, "-p", "Hi", "-n", "2", "--num-return-sequences", "3", "--seed", max]),
        case(0, "", &["run", "-m", &m, "-p", "", "-n", "1", "--temp", "0", "--top-p", "1e-30", "--min-p", "1"]),
        case(0, "", &["run", "-m", &m, "-f", &short, "--ctx", "5", "-n", "1"]),
        // --- inspect.
        case(3, &missing, &["inspect", &missing]),
        case(3, &d, &["inspect", &d]),
        case(3, "/dev/null", &["inspect", "/dev/null"]),
        case(3, &fifo, &["inspect", &fifo]),
        case(3, &latin1, &["inspect", "--json", &latin1]),
        case(2, "<FILE>", &["inspect", ""]),
        // --- mem.
        case(2, "--ctx", &["mem", &m, "--ctx", "0"]),
        case(2, "--ctx", &["mem", &m, "--ctx", max]),
        case(2, "--batch", &["mem", &m, "--batch", "0"]),
        case(2, "--seqs", &["mem", &m, "--seqs", "0"]),
        case(2, "--seqs", &["mem", &m, "--seqs", "257"]),
        case(2, "--kv", &["mem", &m, "--kv", "q4_0"]),
        case(2, "--kv", &["mem", &m, "--kv", ""]),
        case(2, "--ctx", &["mem", &hf, "--ctx", "0"]),
        case(2, "--ctx", &["mem", &hf, "--ctx", "100000"]),
        case(2, "--batch", &["mem", &hf, "--batch", "0"]),
        case(2, "--type", &["mem", &hf, "--type", "q3_k"]),
        case(3, &fifo, &["mem", &fifo]),
        case(0, "", &["mem", &m, "--batch", max, "--seqs", "256"]),
        // --- convert.
        case(2, "--name", &["convert", &hf, "--name", "", "-o", &d]),
        case(2, "--name", &["convert", &hf, "--name", "../x", "-o", &d]),
        case(2, "q3_k", &["convert", &hf, "--type", "q3_k"]),
        case(2, "--type", &["convert", &hf, "--type", ""]),
        case(3, &missing, &["convert", &missing]),
        case(3, "/dev/null", &["convert", "/dev/null"]),
        case(3, &m, &["convert", &m]),
        case(4, "/proc/ggpt-flags.gguf", &["convert", &hf, "--type", "q8_0", "-o", "/proc/ggpt-flags.gguf"]),
        case(4, &no_dir, &["convert", &hf, "--type", "all", "-o", &no_dir]),
        case(4, &under_file, &["quantize", &f16, &under_file, "--type", "q8_0"]),
        // --- perplexity.
        case(2, "--ctx", &["perplexity", "-m", &m, "-f", &text, "-c", "0"]),
        case(2, "--ctx", &["perplexity", "-m", &m, "-f", &text, "-c", "1"]),
        case(2, "--ctx", &["perplexity", "-m", &m, "-f", &text, "-c", "2"]),
        case(2, "--ctx", &["perplexity", "-m", &m, "-f", &text, "-c", "1025"]),
        case(2, "--ctx", &["perplexity", "-m", &m, "-f", &text, "-c", max]),
        case(2, "--chunks", &["perplexity", "-m", &m, "-f", &text, "--chunks", "0"]),
        case(2, "--ctx", &["perplexity", "-m", &m, "-f", &short, "-c", "512"]),
        case(3, &fifo, &["perplexity", "-m", &m, "-f", &fifo]),
        case(3, &latin1, &["perplexity", "-m", &m, "-f", &latin1]),
        case(3, &missing, &["perplexity", "-m", &m, "-f", &text, "--kl-base", &missing]),
        case(0, "", &["perplexity", "-m", &m, "-f", &text, "-c", "16", "--chunks", "1", "--score-all", "--kl-base", &m]),
        // --- bench (its own range checks live in cli/src/bench.rs; files and threads here).
        case(3, &d, &["bench", "-m", &d]),
        case(3, &missing, &["bench", "-m", &missing]),
        case(3, &fifo, &["bench", "-m", &fifo]),
        case(2, "--threads", &["bench", "-m", &m, "-t", "0"]),
        case(2, "-5", &["bench", "-m", &m, "-r", "-5"]),
        case(2, "-r 0", &["bench", "-m", &m, "-r", "0"]),
        case(2, "-r 1000000", &["bench", "-m", &m, "-r", "1000000"]),
        case(2, "-p 5000", &["bench", "-m", &m, "-p", "5000", "-n", "0"]),
        case(2, "-p 5000", &["bench", "-m", &m, "-p", "16,5000", "-n", "0"]),
        case(2, "invalid digit", &["bench", "-m", &m, "-p", "16,x"]),
        case(2, "--threads 0", &["bench", "-m", &m, "-t", "2,0"]),
        case(2, "-d 5000", &["bench", "-m", &m, "-d", "5000", "-p", "0", "-n", "2"]),
        case(2, "-d 18446744073709551615", &["bench", "-m", &m, "-d", "18446744073709551615", "-p", "0"]),
        case(2, "nothing to bench", &["bench"]),
        case(2, "--synthetic", &["bench", "--synthetic", "gpt5"]),
        case(2, "--type", &["bench", "--synthetic", "tiny", "--type", "q3_k"]),
        case(2, "--shape", &["synth", "--shape", "gpt5", "-o", &out("synth")]),
        case(2, "--dtype", &["synth", "--shape", "tiny", "--dtype", "f8", "-o", &out("synth")]),
        // --- tokenize.
        case(3, &missing, &["tokenize", "-m", &missing, "Hi"]),
        case(3, "/dev/null", &["tokenize", "-m", "/dev/null", "Hi"]),
        case(0, "", &["tokenize", "-m", &m, ""]),
        // --- features and dump.
        case(2, "empty", &["features", "-m", &m, ""]),
        case(2, "context", &["features", "-m", &m, &"a ".repeat(1100)]),
        case(4, "/proc/ggpt-flags.npy", &["features", "-m", &m, "Hi", "--npy", "/proc/ggpt-flags.npy"]),
        case(4, &no_dir, &["features", "-m", &m, "Hi", "--npy", &format!("{no_dir}x.npy")]),
        case(4, &under_file, &["dump", &m, &under_file]),
        case(2, "--tensor", &["dump", &m, &out("dump"), "--tensor", "no.such.tensor"]),
        // --- compare: every refusal before the conversion starts.
        case(3, &missing, &["compare", &missing, "-o", &out("cmp")]),
        case(3, "/dev/null", &["compare", "/dev/null", "-o", &out("cmp")]),
        case(2, "--ctx", &["compare", &hf, "--ctx", "0", "-o", &out("cmp")]),
        case(2, "--ctx", &["compare", &hf, "--ctx", "100000", "-o", &out("cmp")]),
        case(2, "--chunks", &["compare", &hf, "--chunks", "0", "-o", &out("cmp")]),
        case(2, "--bench-prompt", &["compare", &hf, "--bench-prompt", "0", "-o", &out("cmp")]),
        case(2, "--threads", &["compare", &hf, "-t", "0", "-o", &out("cmp")]),
        case(3, &fifo, &["compare", &hf, "--text", &fifo, "-o", &out("cmp")]),
        case(3, &latin1, &["compare", &hf, "--text", &latin1, "-o", &out("cmp")]),
        case(4, "/proc/ggpt-flags", &["compare", &hf, "-o", "/proc/ggpt-flags"]),
    ];

    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for _ in 0..2 {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(c) = cases.get(i) else { break };
                let o = run_ggpt(&c.args);
                if let Some(p) = problem(&o, c.code, &c.names) {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{p}\n{}", o.describe()));
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap();

    // Text on standard input that is not UTF-8.
    for args in [
        vec!["run", "-m", &m, "-p", "-", "-n", "1"],
        vec!["tokenize", "-m", &m, "-"],
        vec!["features", "-m", &m, "-"],
    ] {
        let o = run_ggpt_with(&args, Some(b"caf\xe9\xff"), TIMEOUT);
        if let Some(p) = problem(&o, 3, "standard input") {
            failures.push(format!("{p}\n{}", o.describe()));
        }
    }

    // Standard output that cannot be written: exit 4 (println! would panic). The error comes
    // after the model loaded, so `run`'s banner may precede it: check the last line.
    for args in [
        vec!["run", "-m", &m, "-p", "Hi", "-n", "2", "--seed", "1"],
        vec!["tokenize", "-m", &m, "Hello"],
        vec!["inspect", &m],
        vec!["mem", &m],
        vec!["features", "-m", &m, "Hi"],
        vec!["bench", "-m", &m, "-p", "0", "-n", "2", "-r", "1"],
    ] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("open /dev/full");
        let o = run_ggpt_io(&args, None, Stdio::from(full), TIMEOUT);
        let last = o.stderr.lines().last().unwrap_or("");
        let p = o.problem_if_not_orderly().or_else(|| {
            (o.code() != Some(4) || !last.starts_with("error: standard output"))
                .then(|| format!("exit {:?}, last stderr line {last:?}", o.code()))
        });
        if let Some(p) = p {
            failures.push(format!("{p}\n{}", o.describe()));
        }
    }

    // Nothing half-written anywhere an output was refused.
    for d in [&dir, &out_dir, Path::new("/proc")] {
        let left = temporaries(d);
        if !left.is_empty() {
            failures.push(format!("temporaries left in {}: {left:?}", d.display()));
        }
    }
    if out_dir.join("cmp").exists() {
        failures.push("compare created its output directory before refusing its flags".into());
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"x");

    assert!(
        failures.is_empty(),
        "{} of {} hostile command lines broke the error contract:\n\n{}",
        failures.len(),
        cases.len() + 8,
        failures.join("\n\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ggpt run | head` closes the pipe early: generation stops, the command succeeds quietly
/// (no panic from a failed print, no "error: Broken pipe").
#[test]
fn closed_stdout_pipe_is_not_an_error() {
    let m = tiny_model("Q4_K_M");
    let mut child = Command::new(ggpt())
        .args(["run", "-m"])
        .arg(&m)
        // Far longer than the time it takes to close the pipe below, so later writes fail.
        .args([
            "-p",
            "Once upon a time",
            "-n",
            "1000",
            "--ignore-eos",
            "-t",
            "1",
        ])
        .args(["--seed", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ggpt");
    // Read a little, then close our end.
    let mut first = [0u8; 8];
    {
        use std::io::Read;
        let mut pipe = child.stdout.take().expect("stdout");
        pipe.read_exact(&mut first)
            .expect("read the start of the output");
    }
    let (_, err_t) = drain(&mut child);
    let (status, timed_out) = wait_timeout(&mut child, TIMEOUT);
    let stderr = err_t.join().unwrap_or_default();
    assert!(!timed_out, "hang after the pipe closed\n{stderr}");
    assert_eq!(&first, b"Once upo");
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("error:"),
        "{stderr}"
    );
}

/// `ggpt serve`: a model file that cannot be loaded exits 3, a context the model cannot take 2
/// (the server has bound its port and logged by then, so the `error:` line comes last).
#[test]
fn serve_exit_codes() {
    let dir = scratch("flags-serve");
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    let m = s(tiny_model("Q8_0"));
    let missing = s(dir.join("no-such-model.gguf"));
    let text = dir.join("notes.gguf");
    std::fs::write(&text, "not a model\n").unwrap();
    let text = s(text);
    let d = s(dir.clone());
    let cases = [
        (3, missing.clone(), vec!["-m", &missing]),
        (3, text.clone(), vec!["-m", &text]),
        (3, d.clone(), vec!["-m", &m, "-m", &d]),
        (2, "--ctx 5000".to_string(), vec!["-m", &m, "--ctx", "5000"]),
    ];
    for (code, names, args) in cases {
        let mut argv = vec!["serve", "--port", "0", "-t", "1"];
        argv.extend(args);
        let o = run_ggpt(&argv);
        assert_eq!(o.code(), Some(code), "ggpt {argv:?}: {}", o.stderr);
        let last = o.stderr.lines().last().unwrap_or("");
        assert!(
            last.starts_with("error:") && last.contains(&names),
            "ggpt {argv:?}: the last line {last:?} does not name {names}"
        );
        assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    }
}
