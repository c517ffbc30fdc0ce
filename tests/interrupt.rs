//! Interrupted writes: `ggpt convert` of the tiny model is killed at varied points with
//! SIGKILL, SIGINT and SIGTERM. Whatever the moment, every destination file either does not
//! exist or is complete — byte for byte the file an uninterrupted run writes — and after
//! SIGINT/SIGTERM no temporary file is left in the directory. After SIGKILL nothing can clean
//! up, so temporaries (`.NAME.ggpt-tmp.PID.N`) may remain, but nothing else.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{drain, ggpt, scratch, send_signal, tiny_hf, wait_timeout, Rng, TIMEOUT};
use ggpt_gguf::GgufFile;

/// Output files of `convert --type <types>` into a directory, for the tiny model.
fn dest_names(types: &str) -> Vec<String> {
    let labels: &[&str] = match types {
        "all" => &["F16", "Q8_0", "Q6_K", "Q4_K_M"],
        "q8_0" => &["Q8_0"],
        other => panic!("no labels for {other}"),
    };
    labels
        .iter()
        .map(|l| format!("tiny-gpt2-{l}.gguf"))
        .collect()
}

fn convert_cmd(types: &str, out: &Path) -> Command {
    let mut cmd = Command::new(ggpt());
    cmd.arg("convert")
        .arg(tiny_hf())
        .args(["--type", types, "-o"])
        .arg(out)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// One uninterrupted conversion: the reference bytes of every output, and how long it took.
fn reference(types: &str, dir: &Path) -> (Vec<(String, Vec<u8>)>, Duration) {
    std::fs::create_dir_all(dir).unwrap();
    let t = Instant::now();
    let out = convert_cmd(types, dir).output().expect("run ggpt convert");
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "reference convert failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = dest_names(types)
        .into_iter()
        .map(|n| {
            let bytes = std::fs::read(dir.join(&n)).expect("reference output");
            (n, bytes)
        })
        .collect();
    (files, took)
}

fn is_temp_name(name: &str, dests: &[String]) -> bool {
    // `.NAME.ggpt-tmp.PID.N`, the pattern convert/src/atomic.rs uses.
    dests.iter().any(|d| {
        name.strip_prefix(&format!(".{d}.ggpt-tmp."))
            .is_some_and(|rest| {
                let mut parts = rest.split('.');
                let ok = |p: Option<&str>| {
                    p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                };
                ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
            })
    })
}

struct Trial {
    types: &'static str,
    signal: &'static str,
    delay: Duration,
}

/// What happened in one trial, for the summary.
struct Seen {
    interrupted: bool,
    complete_files: usize,
    temps_left: usize,
}

fn run_trial(i: usize, t: &Trial, refs: &[(String, Vec<u8>)], root: &Path) -> Seen {
    let dir: PathBuf = root.join(format!("trial-{i:02}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = convert_cmd(t.types, &dir)
        .spawn()
        .expect("spawn ggpt convert");
    let (out_t, err_t) = drain(&mut child);
    std::thread::sleep(t.delay);
    send_signal(child.id(), t.signal);
    let (status, timed_out) = wait_timeout(&mut child, TIMEOUT);
    let stderr = err_t.join().unwrap_or_default();
    let _ = out_t.join();
    let ctx = format!(
        "trial {i}: convert --type {} killed with SIG{} after {:?}: status {status:?}\nstderr:\n{stderr}",
        t.types, t.signal, t.delay
    );
    assert!(!timed_out, "{ctx}: hang");
    let status = status.expect("exit status");
    assert!(!stderr.contains("panicked"), "{ctx}");

    use std::os::unix::process::ExitStatusExt;
    let finished = status.code() == Some(0);
    let interrupted = !finished;
    match (t.signal, status.code(), status.signal()) {
        (_, Some(0), _) => {}
        ("KILL", None, Some(9)) => {}
        // The handler removes the temporaries and exits with 130.
        ("INT" | "TERM", Some(130), _) => {}
        _ => panic!("{ctx}: unexpected exit status"),
    }

    let dests: Vec<String> = refs.iter().map(|(n, _)| n.clone()).collect();
    let mut complete_files = 0;
    let mut temps_left = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some((_, want)) = refs.iter().find(|(n, _)| *n == name) {
            // A destination exists only complete: identical to the uninterrupted output, and
            // it opens with the reader with every tensor present.
            let path = dir.join(&name);
            let got = std::fs::read(&path).unwrap();
            assert!(
                got == *want,
                "{ctx}: {name} exists but differs from the complete file ({} vs {} bytes)",
                got.len(),
                want.len()
            );
            let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            assert_eq!(f.tensors().len(), 76, "{ctx}: {name}");
            complete_files += 1;
        } else if is_temp_name(&name, &dests) {
            assert_eq!(
                t.signal, "KILL",
                "{ctx}: temporary {name} left behind after SIG{}",
                t.signal
            );
            temps_left += 1;
        } else {
            panic!("{ctx}: unexpected file {name}");
        }
    }
    if finished {
        assert_eq!(
            complete_files,
            refs.len(),
            "{ctx}: finished but files missing"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Seen {
        interrupted,
        complete_files,
        temps_left,
    }
}

#[test]
fn interrupted_convert_leaves_complete_files_or_none() {
    let root = scratch("interrupt");
    let (refs_all, t_all) = reference("all", &root.join("ref-all"));
    let (refs_q8, t_q8) = reference("q8_0", &root.join("ref-q8"));
    eprintln!("uninterrupted: --type all {t_all:?}, --type q8_0 {t_q8:?}");

    // Delays spread over the whole run (as timed uncontended), jittered, never below 30 ms so
    // the signal handler is installed (before that, SIGINT would just kill the process, which
    // is also safe: nothing has been created yet).
    let mut rng = Rng(0x5eed_1234_abcd_0042);
    let signals = ["KILL", "INT", "TERM"];
    let mut trials = Vec::new();
    for (types, took, n) in [("all", t_all, 6usize), ("q8_0", t_q8, 9)] {
        for k in 0..n {
            let frac = (k as f64 + 0.2 + 0.6 * (rng.below(1000) as f64 / 1000.0)) / n as f64;
            let delay = took.mul_f64(frac * 0.95).max(Duration::from_millis(30));
            trials.push(Trial {
                types,
                signal: signals[(k + trials.len()) % 3],
                delay,
            });
        }
    }
    let mut interrupted = 0;
    let mut partial = 0;
    let mut temps = 0;
    for (i, t) in trials.iter().enumerate() {
        let refs = if t.types == "all" {
            &refs_all
        } else {
            &refs_q8
        };
        let seen = run_trial(i, t, refs, &root);
        eprintln!(
            "trial {i:2}: --type {:<4} SIG{:<4} after {:>5} ms: {}, {} complete file(s), {} temporary file(s) left",
            t.types,
            t.signal,
            t.delay.as_millis(),
            if seen.interrupted { "interrupted" } else { "finished" },
            seen.complete_files,
            seen.temps_left
        );
        interrupted += usize::from(seen.interrupted);
        partial += usize::from(seen.interrupted && seen.complete_files > 0);
        temps += seen.temps_left;
    }
    eprintln!(
        "{} trials: {interrupted} interrupted ({partial} with some outputs already complete), {temps} temporaries left by SIGKILL",
        trials.len()
    );
    // The test only means something if most signals landed mid-conversion.
    assert!(
        interrupted >= 9,
        "only {interrupted} of {} trials were interrupted before finishing",
        trials.len()
    );
    let _ = std::fs::remove_dir_all(&root);
}
