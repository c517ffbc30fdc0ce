//! Several processes and one model file.
//!
//! - A running `ggpt run` keeps working when `ggpt convert` replaces its model file: the
//!   converter renames a new file over the old name, so the running process keeps its mapping
//!   of the old inode and produces exactly the text it would have produced undisturbed.
//! - Two processes running the same file share its pages in the page cache: each one's
//!   proportional share (Pss) of the mapping is about half of its resident size (Rss).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{ggpt, scratch, send_signal, tiny_hf, tiny_model, wait_timeout, TIMEOUT};

fn run_cmd(model: &Path, n: &str) -> Command {
    let mut cmd = Command::new(ggpt());
    cmd.arg("run")
        .arg("-m")
        .arg(model)
        .args([
            "-p",
            "The kernel",
            "-n",
            n,
            "--temp",
            "0",
            "-t",
            "1",
            "--seed",
            "7",
            "--ignore-eos",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Forward the child's stderr lines to a channel (and keep them), and collect its stdout.
struct Watched {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::thread::JoinHandle<Vec<String>>,
    stdout: std::thread::JoinHandle<Vec<u8>>,
    /// Bytes of stdout so far.
    progress: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn watch(mut child: Child) -> Watched {
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push(line);
        }
        all
    });
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let p = progress.clone();
    let mut out = child.stdout.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            p.store(all.len(), std::sync::atomic::Ordering::SeqCst);
        }
        all
    });
    Watched {
        child,
        lines: rx,
        stderr,
        stdout,
        progress,
    }
}

impl Watched {
    /// Block until a stderr line starting with `prefix` appears.
    fn wait_line(&self, prefix: &str) -> String {
        loop {
            match self.lines.recv_timeout(TIMEOUT) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => continue,
                Err(e) => panic!("no stderr line starting with {prefix:?}: {e}"),
            }
        }
    }

    fn finish(mut self) -> (std::process::ExitStatus, String, String) {
        let (status, timed_out) = wait_timeout(&mut self.child, TIMEOUT);
        assert!(!timed_out, "ggpt run hung");
        let out = String::from_utf8_lossy(&self.stdout.join().unwrap()).into_owned();
        let err = self.stderr.join().unwrap().join("\n");
        (status.expect("exit status"), out, err)
    }
}

#[test]
fn replacing_the_model_file_does_not_disturb_a_running_process() {
    let dir = scratch("concurrency-replace");
    let model = dir.join("model.gguf");
    std::fs::copy(tiny_model("F16"), &model).unwrap();

    // Undisturbed reference (greedy, one thread: deterministic).
    let reference = run_cmd(&model, "200").output().unwrap();
    assert!(reference.status.success(), "{reference:?}");
    let reference = String::from_utf8(reference.stdout).unwrap();
    assert!(reference.len() > "The kernel".len() + 100, "{reference:?}");

    // The same run, frozen right after loading (the banner line comes after the model is
    // mapped and validated, before any token is evaluated), while the file is replaced.
    let w = watch(run_cmd(&model, "200").spawn().unwrap());
    w.wait_line("ggpt:");
    send_signal(w.child.id(), "STOP");
    // Make sure it is frozen mid-run, not already finished. SIGSTOP is delivered
    // asynchronously, so poll the state for a moment before concluding.
    let mut stat = String::new();
    for _ in 0..200 {
        stat = std::fs::read_to_string(format!("/proc/{}/stat", w.child.id())).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("");
        if state == "T" || state == "t" {
            break;
        }
        assert!(
            state == "R" || state == "S" || state == "D",
            "ggpt run was not stopped mid-run: {stat}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        stat.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('T')),
        "ggpt run did not stop within 2 s: {stat}"
    );
    let conv = Command::new(ggpt())
        .arg("convert")
        .arg(tiny_hf())
        .args(["--type", "q4_k_m", "-o"])
        .arg(&model)
        .output()
        .unwrap();
    send_signal(w.child.id(), "CONT");
    assert!(
        conv.status.success(),
        "convert: {}",
        String::from_utf8_lossy(&conv.stderr)
    );
    // The name now holds the new file.
    assert_eq!(
        std::fs::read(&model).unwrap(),
        std::fs::read(tiny_model("Q4_K_M")).unwrap()
    );
    let (status, out, err) = w.finish();
    assert!(
        status.success(),
        "run failed after the replacement: {status:?}\n{err}"
    );
    assert_eq!(out, reference, "the running process saw the new file");

    // And a new process picks up the new file.
    let after = run_cmd(&model, "200").output().unwrap();
    assert!(after.status.success());
    assert_ne!(
        String::from_utf8(after.stdout).unwrap(),
        reference,
        "Q4_K_M and F16 gave the same 200 greedy tokens: the replacement did not happen?"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// (Rss, Pss) in bytes of process `pid`'s mappings of `path`, from /proc/PID/smaps.
fn mapping_rss_pss(pid: u32, path: &Path) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let target = path.to_str().unwrap();
    let (mut rss, mut pss, mut inside) = (0, 0, false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().next().is_some_and(|c| c.is_ascii_hexdigit()) {
            inside = line.ends_with(target);
        } else if inside {
            let kb = |l: &str| -> u64 {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
                    * 1024
            };
            if line.starts_with("Rss:") {
                rss += kb(line);
            } else if line.starts_with("Pss:") {
                pss += kb(line);
            }
        }
    }
    (rss, pss)
}

fn status_field(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

#[test]
fn two_processes_share_the_mapped_file() {
    let dir = scratch("concurrency-share");
    let model = dir.join("model.gguf");
    std::fs::copy(tiny_model("Q8_0"), &model).unwrap();
    let size = std::fs::metadata(&model).unwrap().len();

    // Two long generations; once each has produced some tokens it has read every weight
    // (every layer and the whole tied output matrix run for each token). Freeze both, measure.
    let a = watch(run_cmd(&model, "1000").spawn().unwrap());
    let b = watch(run_cmd(&model, "1000").spawn().unwrap());
    for w in [&a, &b] {
        w.wait_line("ggpt:");
        let t0 = std::time::Instant::now();
        while w.progress.load(std::sync::atomic::Ordering::SeqCst) < "The kernel".len() + 40 {
            assert!(t0.elapsed() < TIMEOUT, "no tokens generated");
            std::thread::sleep(Duration::from_millis(2));
        }
        send_signal(w.child.id(), "STOP");
    }
    // Still running (stopped, not exited), so both mappings exist now.
    let measured: Vec<(u64, u64, u64)> = [&a, &b]
        .iter()
        .map(|w| {
            let (rss, pss) = mapping_rss_pss(w.child.id(), &model);
            (rss, pss, status_field(w.child.id(), "RssFile:"))
        })
        .collect();
    for w in [&a, &b] {
        send_signal(w.child.id(), "KILL");
    }
    for w in [a, b] {
        let _ = w.finish();
    }
    let mib = |x: u64| x as f64 / (1 << 20) as f64;
    for (i, &(rss, pss, rss_file)) in measured.iter().enumerate() {
        eprintln!(
            "process {i}: model file {:.2} MiB; its mapping Rss {:.2} MiB, Pss {:.2} MiB; RssFile {:.2} MiB",
            mib(size),
            mib(rss),
            mib(pss),
            mib(rss_file)
        );
        // Generation touched (almost) the whole file...
        assert!(
            rss > size / 2,
            "process {i}: Rss {rss} of a {size}-byte file"
        );
        // ...and the pages are shared: each process is charged about half of them.
        assert!(
            (pss as f64) < 0.6 * rss as f64,
            "process {i}: Pss {pss} is not about half of Rss {rss}: pages not shared"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
