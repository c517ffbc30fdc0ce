//! Memory follows the work: after a 5-token run with the model's full default context (1024
//! positions), the resident set must be below the weights + 16 MiB + what those tokens need,
//! for one sequence and for eight (a server's slots). A KV cache allocated for the whole
//! context up front fails this: the bundled model's F16 cache is 6 MiB per sequence at 1024
//! positions, 48 MiB for eight.
//!
//! Each measurement runs in a fresh process (this test binary re-executed with `child`), so
//! the parent's conversion of the bundled checkpoint does not count, and reads VmRSS and
//! VmHWM from `/proc/self/status`. Linux only; elsewhere the test says so and passes.

use std::path::{Path, PathBuf};
use std::process::Command;

use ggpt::model::Model;
use ggpt::session::Session;

const MIB: u64 = 1 << 20;
/// What the process may hold beyond the weights and the tokens' own needs: the tokenizer,
/// the program's code and data, thread stacks, allocator slack.
const OVERHEAD: u64 = 16 * MIB;
const PROMPT: &str = "Hello, my name is";
const PROMPT_TOKENS: usize = 5;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("child") => return child(Path::new(&args[2]), args[3].parse().expect("n_seq")),
        Some("child-long") => return child_long(Path::new(&args[2])),
        _ => {}
    }
    // `cargo test` passes harness flags (`--nocapture`, a filter); a filter that does not
    // match this test's name skips it, like the standard harness.
    if let Some(filter) = args.iter().skip(1).find(|a| !a.starts_with('-')) {
        if !"rss_follows_the_tokens_run".contains(filter.as_str()) {
            return;
        }
    }
    if std::fs::read_to_string("/proc/self/status").is_err() {
        println!("rss: skipped, /proc/self/status is not readable on this system");
        return;
    }
    let model = tiny_q4km();
    for n_seq in [1, 8] {
        let line = measure(&["child", model.to_str().unwrap(), &n_seq.to_string()]);
        let num = |key: &str| field(&line, key);
        let (rss, hwm, file, need, ceiling) = (
            num("rss"),
            num("hwm"),
            num("file"),
            num("need"),
            num("kv_ceiling"),
        );
        let limit = file + OVERHEAD + need;
        let mib = |b: u64| b as f64 / MIB as f64;
        println!(
            "n_seq {n_seq}: VmRSS {:.1} MiB, VmHWM {:.1} MiB; limit {:.1} MiB = file {:.1} + \
             {:.0} + tokens {:.2} (a full-context KV cache would be {:.1} MiB)",
            mib(rss),
            mib(hwm),
            mib(limit),
            mib(file),
            mib(OVERHEAD),
            mib(need),
            mib(ceiling)
        );
        assert!(
            rss <= limit,
            "n_seq {n_seq}: VmRSS {:.1} MiB after a {PROMPT_TOKENS}-token run is above the \
             weights + 16 MiB + the tokens' needs ({:.1} MiB)",
            mib(rss),
            mib(limit)
        );
        assert!(
            hwm <= limit,
            "n_seq {n_seq}: peak RSS {:.1} MiB of a {PROMPT_TOKENS}-token run is above the \
             weights + 16 MiB + the tokens' needs ({:.1} MiB)",
            mib(hwm),
            mib(limit)
        );
    }
    println!("test rss_follows_the_tokens_run ... ok");
    activations_follow_the_micro_batch(&model);
}

/// A micro-batch shorter than the last gives the activation pages of the longer one back, and
/// a prompt that fills the whole context peaks at the weights + its KV cache + 16 MiB (the
/// short last micro-batch runs beside the nearly full cache).
fn activations_follow_the_micro_batch(model: &Path) {
    let line = measure(&["child-long", model.to_str().unwrap()]);
    let num = |key: &str| field(&line, key);
    let (after_prompt, after_token, acts) = (num("anon_prompt"), num("anon_token"), num("acts"));
    let (hwm, file, kv) = (num("hwm"), num("file"), num("kv"));
    let mib = |b: u64| b as f64 / MIB as f64;
    println!(
        "anonymous memory after a {LONG_PROMPT}-token prompt {:.2} MiB, after the next token \
         {:.2} MiB ({:.2} MiB of activations in the prompt's micro-batch); full context: \
         peak {:.1} MiB = file {:.1} + KV {:.1} + {:.1}",
        mib(after_prompt),
        mib(after_token),
        mib(acts),
        mib(hwm),
        mib(file),
        mib(kv),
        mib(hwm.saturating_sub(file + kv))
    );
    // The token's step adds no KV page (the prompt ends inside one) and its own activations
    // are a few KiB, so at least 3/4 of the prompt's activations must be gone.
    assert!(
        after_prompt.saturating_sub(after_token) >= acts / 4 * 3,
        "the anonymous memory fell by {:.2} MiB after a one-token step, expected most of the \
         prompt's {:.2} MiB of activations back",
        mib(after_prompt.saturating_sub(after_token)),
        mib(acts)
    );
    assert!(
        hwm <= file + kv + OVERHEAD,
        "peak RSS {:.1} MiB of a full-context run is above the weights + KV + 16 MiB ({:.1} MiB)",
        mib(hwm),
        mib(file + kv + OVERHEAD)
    );
    println!("test activations_follow_the_micro_batch ... ok");
}

/// Tokens of the first prompt of `child_long`: one micro-batch, ending inside a KV page (a
/// 32-wide f16 head row is 64 bytes, 64 rows to a page), so that the next token's step
/// allocates no KV.
const LONG_PROMPT: usize = 250;

/// A `LONG_PROMPT`-token prompt, one token, then the rest of the context as one prompt and a
/// few tokens; prints the anonymous memory after the first prompt and after the token, the
/// first prompt's activation bytes, and the peak against the file and the full KV cache.
fn child_long(path: &Path) {
    let model = Model::load(path).expect("load");
    let hp = model.hparams().clone();
    let n_ctx = hp.n_ctx as usize;
    let n_vocab = hp.n_vocab;
    let ids = |from: usize, n: usize| -> Vec<u32> {
        (from..from + n)
            .map(|i| (i as u64 * 7919 % n_vocab) as u32)
            .collect()
    };
    let anon = || {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        status_field(&status, "RssAnon:")
    };
    let mut session = Session::new(&model, n_ctx, 1).expect("session");
    session.prefill(&ids(0, LONG_PROMPT)).expect("prefill");
    let acts = session.scratch_bytes() as u64;
    let after_prompt = anon();
    session.decode(1).expect("decode");
    let after_token = anon();
    let rest = n_ctx - LONG_PROMPT - 1 - 8;
    session
        .prefill(&ids(LONG_PROMPT + 1, rest))
        .expect("prefill the rest");
    for i in 0..8 {
        session.decode(i).expect("decode");
    }
    assert_eq!(session.n_past(), n_ctx);
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    println!(
        "measured anon_prompt={after_prompt} anon_token={after_token} acts={acts} hwm={} \
         file={} kv={} ",
        status_field(&status, "VmHWM:"),
        model.file().file_len(),
        session.kv_bytes()
    );
}

/// Run this test binary with `args` (a child mode) and return its `measured …` line.
fn measure(args: &[&str]) -> String {
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args(args)
        .output()
        .expect("run the measuring child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find(|l| l.starts_with("measured"))
        .unwrap_or_else(|| panic!("no measurement in {stdout:?}"))
        .to_string()
}

/// The number after ` key=` in a `measured …` line.
fn field(line: &str, key: &str) -> u64 {
    let i = line.find(&format!(" {key}=")).expect(key) + key.len() + 2;
    line[i..].split(' ').next().unwrap().parse().expect(key)
}

/// A `/proc/self/status` field in bytes.
fn status_field(status: &str, name: &str) -> u64 {
    let l = status.lines().find(|l| l.starts_with(name)).expect(name);
    let kb: u64 = l[name.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .expect(name);
    kb * 1024
}

/// Load, run the prompt and one generated token in each of `n_seq` sequences at the model's
/// default context, and print this process's resident set and what the run needed.
fn child(path: &Path, n_seq: usize) {
    let model = Model::load(path).expect("load");
    let hp = model.hparams().clone();
    let n_ctx = hp.n_ctx as usize;
    let mut session = Session::new(&model, n_ctx, n_seq).expect("session");
    let prompt = model.tokenizer().encode(PROMPT);
    assert_eq!(prompt.len(), PROMPT_TOKENS, "{prompt:?}");
    let argmax = |l: &[f32]| (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as u32;
    let next = argmax(session.prefill(&prompt).expect("prefill"));
    if n_seq > 1 {
        session.fork_prompt();
        session.decode_batch(&vec![next; n_seq]).expect("decode");
    } else {
        session.decode(next).expect("decode");
    }
    let positions = (PROMPT_TOKENS + 1) as u64;
    let (c, f, v) = (hp.n_embd, hp.n_ff, hp.n_vocab);
    // K and V (f16) of every position in every layer and sequence; the activations of the
    // prompt's micro-batch (f32: residual, norm, QKV, attention, projections, MLP hidden);
    // the logits of every sequence.
    let kv = 2 * hp.n_layer * c * 2 * positions * n_seq as u64;
    let activations = 4 * PROMPT_TOKENS as u64 * (8 * c + f);
    let logits = 4 * v * n_seq as u64;
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| status_field(&status, name);
    println!(
        "measured rss={} hwm={} file={} need={} kv_ceiling={} ",
        field("VmRSS:"),
        field("VmHWM:"),
        model.file().file_len(),
        kv + activations + logits,
        session.kv_bytes()
    );
}

/// The bundled checkpoint converted to Q4_K_M, once per build.
fn tiny_q4km() -> PathBuf {
    use ggpt_convert::pipeline::{convert_hf, ConvertOptions, NoProgress};
    use ggpt_convert::policy::FileType;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rss-models");
    let path = dir.join(format!("tiny-gpt2-{}.gguf", FileType::Q4KM.label()));
    std::fs::create_dir_all(&dir).expect("create test model dir");
    let opts = ConvertOptions {
        hf_dir: repo.join("models/tiny-gpt2"),
        types: vec![FileType::Q4KM],
        output: Some(dir),
        name: Some("tiny-gpt2".to_string()),
    };
    convert_hf(&opts, &NoProgress).expect("convert models/tiny-gpt2");
    path
}
