//! Memory budgets with the real binary: an impossible budget is refused up front naming the
//! smallest that works, and — where this machine lets the test create a cgroup (root, a
//! cgroup v1 memory controller) — the bundled model runs under a memory limit smaller than its
//! file and writes exactly the greedy text it writes without a limit.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{ggpt, run_ggpt_with, tiny_model, wait_timeout};

const RUN: [&str; 10] = [
    "-p",
    "The history of",
    "-n",
    "24",
    "--temp",
    "0",
    "-t",
    "2",
    "--ignore-eos",
    "--seed=1",
];

#[test]
fn impossible_budget_is_refused_naming_the_minimum() {
    let model = tiny_model("F16");
    let m = model.to_str().unwrap();
    let mut args = vec!["run", "-m", m, "--mem-budget", "1M"];
    args.extend(RUN);
    let out = run_ggpt_with(&args, None, common::TIMEOUT);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    let line = out.error_line();
    assert!(
        line.starts_with("error: --mem-budget: a memory budget of 1.00 MiB cannot run this model"),
        "{line}"
    );
    // The message names a budget that works: running with it succeeds.
    let need = line
        .rsplit("give at least ")
        .next()
        .and_then(|t| t.strip_suffix(" MiB"))
        .unwrap_or_else(|| panic!("no minimum in {line:?}"));
    let need_mib: f64 = need.parse().unwrap();
    assert!(need_mib > 1.0, "{line}");
    assert!(out.stdout.is_empty(), "nothing generated: {}", out.stdout);
    let ok = format!("{}M", need_mib.ceil());
    let mut args = vec!["run", "-m", m, "--mem-budget", &ok];
    args.extend(RUN);
    let out = run_ggpt_with(&args, None, common::TIMEOUT);
    assert!(out.success(), "{}", out.describe());
    assert!(out.stderr.contains("streaming"), "{}", out.stderr);

    // `mem --budget` refuses it the same way, and malformed sizes are usage errors.
    let out = run_ggpt_with(&["mem", m, "--budget", "1M"], None, common::TIMEOUT);
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    assert!(out.error_line().contains("give at least"), "{}", out.stderr);
    for bad in ["12Q", "0", "-3M"] {
        let out = run_ggpt_with(&["mem", m, "--budget", bad], None, common::TIMEOUT);
        assert_eq!(out.code(), Some(2), "--budget {bad}: {}", out.describe());
    }
}

/// A fresh cgroup v1 memory group, removed on drop; `Err` says why one cannot be made here.
struct Cgroup(PathBuf);

impl Cgroup {
    fn create(limit: u64) -> Result<Cgroup, String> {
        let root = Path::new("/sys/fs/cgroup/memory");
        if !root.join("memory.limit_in_bytes").is_file() {
            return Err("no cgroup v1 memory controller at /sys/fs/cgroup/memory".into());
        }
        let dir = root.join(format!("ggpt-test-budget-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let g = Cgroup(dir);
        std::fs::write(g.0.join("memory.limit_in_bytes"), limit.to_string())
            .map_err(|e| format!("cannot set the limit: {e}"))?;
        Ok(g)
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.0.join(file)).unwrap_or_default()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `ggpt run` of `model`, inside `cg` if given: (exit ok, stdout, stderr).
fn run_in(cg: Option<&Cgroup>, model: &Path) -> (bool, String, String) {
    let mut cmd = match cg {
        // The shell joins the group, then becomes ggpt: only ggpt's memory is limited.
        Some(g) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
                .arg(&g.0)
                .arg(ggpt());
            c
        }
        None => Command::new(ggpt()),
    };
    cmd.arg("run")
        .arg("-m")
        .arg(model)
        .args(RUN)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let (out_t, err_t) = common::drain(&mut child);
    let (status, timed_out) = wait_timeout(&mut child, Duration::from_secs(120));
    assert!(
        !timed_out,
        "ggpt run under the limit did not finish in 120 s"
    );
    let ok = status.is_some_and(|s| s.success());
    (ok, out_t.join().unwrap(), err_t.join().unwrap())
}

#[test]
fn runs_under_a_cgroup_limit_smaller_than_its_file() {
    let model = tiny_model("F16");
    let file_len = std::fs::metadata(&model).unwrap().len();
    // 2 MiB below the file: the weights cannot all be resident.
    let limit = file_len - (2 << 20);
    let cg = match Cgroup::create(limit) {
        Ok(g) => g,
        Err(why) => {
            println!("skipped: cannot run under a cgroup memory limit here: {why}");
            return;
        }
    };
    let (ok, free_text, err) = run_in(None, &model);
    assert!(ok, "without a limit: {err}");
    let (ok, limited_text, err) = run_in(Some(&cg), &model);
    let oom = cg.read("memory.oom_control");
    assert!(
        ok,
        "under a {limit}-byte limit ggpt failed: {err}\nmemory.oom_control: {oom}"
    );
    assert!(
        !oom.lines()
            .any(|l| l.starts_with("oom_kill ") && l != "oom_kill 0"),
        "{oom}"
    );
    assert!(
        err.contains("cgroup limit") && err.contains("streaming"),
        "the run did not see its limit and stream: {err}"
    );
    let peak: u64 = cg
        .read("memory.max_usage_in_bytes")
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(peak <= limit, "peak {peak} above the limit {limit}");
    assert_eq!(
        limited_text, free_text,
        "greedy text differs under the limit"
    );
    assert!(limited_text.len() > "The history of".len());
    println!(
        "tiny F16 ({file_len} bytes) under a {limit}-byte limit: same text, peak {peak} bytes"
    );
}
