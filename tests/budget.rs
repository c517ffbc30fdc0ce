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
    match cg {
        // The shell joins the group, then becomes ggpt: only ggpt's memory is limited.
        Some(g) => {
            let dir = g.0.to_str().expect("the cgroup path is UTF-8");
            let join = r#"echo $$ > "$0/cgroup.procs" && exec "$@""#;
            run_through(&["sh", "-c", join, dir], model, &[])
        }
        None => run_through(&[], model, &[]),
    }
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

/// `ggpt run` of `model` with `extra` flags, through the wrapper command `prefix` (may be
/// empty): (exit ok, stdout, stderr).
fn run_through(prefix: &[&str], model: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(ggpt());
            c
        }
        None => Command::new(ggpt()),
    };
    cmd.arg("run")
        .arg("-m")
        .arg(model)
        .args(RUN)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let (out_t, err_t) = common::drain(&mut child);
    let (status, timed_out) = wait_timeout(&mut child, Duration::from_secs(120));
    assert!(!timed_out, "ggpt run did not finish in 120 s");
    let ok = status.is_some_and(|s| s.success());
    (ok, out_t.join().unwrap(), err_t.join().unwrap())
}

/// The number before " MiB" after `key` in `text`.
fn mib_after(text: &str, key: &str) -> f64 {
    text.split(key)
        .nth(1)
        .and_then(|t| t.split(" MiB").next())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no '{key}… MiB' in {text}"))
}

#[test]
fn streamed_runs_write_the_same_text_locked_or_copied() {
    let model = tiny_model("Q8_0");
    let (ok, free_text, err) = run_through(&[], &model, &[]);
    assert!(ok, "{err}");
    // The smallest budget that works, from the refusal of an impossible one; then one halfway
    // to full speed, so that some weights are resident and some streamed.
    let (ok, _, err) = run_through(&[], &model, &["--mem-budget", "1M"]);
    assert!(!ok);
    let min = mib_after(&err, "give at least ");
    let (ok, text, err) = run_through(&[], &model, &["--mem-budget", &format!("{}M", min.ceil())]);
    assert!(ok, "{err}");
    // Nothing resident at the minimum: the blocks' matrices go through the reader threads.
    assert!(err.contains("reads into"), "{err}");
    assert_eq!(text, free_text, "streamed at the minimum budget: {err}");
    let full = mib_after(&err, "full speed needs ");
    let mid = format!("{}M", ((min + full) / 2.0).ceil());
    let (ok, text, err) = run_through(&[], &model, &["--mem-budget", &mid]);
    assert!(ok, "{err}");
    assert!(err.contains("streaming"), "{err}");
    assert_eq!(text, free_text, "streamed at {mid}: {err}");
    assert!(
        mib_after(&err, "(given on the command line): ") > 0.0,
        "nothing resident at {mid}: {err}"
    );

    // mlock refused: RLIMIT_MEMLOCK 0, and for root also without CAP_IPC_LOCK (which
    // ignores the limit). The resident weights are then copied once, and the text is the same.
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let mut prefix = Vec::new();
    if root {
        prefix.extend([
            "setpriv",
            "--bounding-set=-ipc_lock",
            "--inh-caps=-ipc_lock",
        ]);
    }
    prefix.extend(["prlimit", "--memlock=0:0"]);
    let programs = prefix.iter().filter(|p| !p.starts_with('-'));
    let usable = programs.into_iter().all(|p| {
        Command::new(p)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !usable {
        println!("skipped the mlock-refused run: {prefix:?} is not available here");
        return;
    }
    let (ok, text, err) = run_through(&prefix, &model, &["--mem-budget", &mid]);
    if !ok && text.is_empty() && !err.contains("ggpt") {
        println!("skipped the mlock-refused run: the wrapper {prefix:?} failed here: {err}");
        return;
    }
    assert!(ok, "{err}");
    assert!(
        err.contains("copied once, mlock: "),
        "mlock was not refused, or the run did not say it copied: {err}"
    );
    assert_eq!(text, free_text, "copies instead of locked pages: {err}");
}

/// A model that streams reads its norms and biases from copies, not from the mapping: there
/// the kernel reclaims their pages between tokens, and each fault on one reads a whole
/// read-around window again (on a disk with 8 MiB read-ahead this doubled the bytes read per
/// token of GPT-2 Medium F16 at a 400 MiB limit). The plan counts the copies.
#[test]
fn a_streaming_plan_copies_the_norms_and_biases_out_of_the_mapping() {
    use ggpt::budget::{apply, plan, Layout, Needs};
    let mut model = ggpt::model::Model::load(&tiny_model("Q8_0")).expect("load");
    let mapped = model.gpt2().weights().mapped_vector_bytes();
    let all_vectors: u64 = model
        .gpt2()
        .weights()
        .vectors()
        .map(|v| 4 * v.len() as u64)
        .sum();
    // The bundled files store every norm and bias as F32: all are read in place.
    assert_eq!(mapped, all_vectors);
    let layout = Layout::of(model.gpt2());
    assert_eq!(layout.copied_when_streaming, mapped);
    let needs = Needs {
        kv: 1 << 20,
        scratch: 1 << 20,
        runtime: 1 << 20,
    };
    let min = needs.total() + mapped + layout.largest_layer();
    assert!(plan(&layout, needs, min - 1).is_err());
    let p = plan(&layout, needs, min).expect("plan at the minimum");
    assert_eq!(p.min_budget, min);
    assert!(!p.in_memory());
    apply(model.gpt2_mut(), &layout, &p).expect("apply");
    assert_eq!(model.gpt2().weights().mapped_vector_bytes(), 0);
    assert!(model.gpt2().weights().vectors().all(|v| !v.is_mapped()));
}
