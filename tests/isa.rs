//! The instruction set must not change what ggpt says: greedy generation with every kernel
//! level this CPU has (`GGPT_ISA=scalar`, `avx2`, `avx512`, …) prints the same text as the
//! level ggpt picks by itself, for every format. The SIMD kernels differ from the scalar
//! reference only in float summation order, far below the gap between a greedy choice and the
//! runner-up on these prompts.

mod common;

use std::process::Command;

use common::{ggpt, tiny_model};
use ggpt_quant::dot::{available_isas, Isa};

const PROMPTS: [&str; 2] = [
    "The history of the city",
    "In 1998, the band released their second album,",
];

/// A prompt of 35 tokens. Float weights multiply prompts this long on their prompt tiles (the
/// AMX tiles at `amx` from 20 tokens, the outer-product FMA tiles from 32), which the short
/// prompts above never reach; quantized weights take their tiles from 4 tokens, so the short
/// prompts already cover theirs.
const LONG_PROMPT: &str = "The river runs through the old town, past the market and the church, \
    and under the stone bridge that was built in the eleventh century by the monks of the abbey";

/// Greedy continuation of `prompt` with the kernels of `isa` (`None`: ggpt's own choice).
fn generate(model: &std::path::Path, prompt: &str, isa: Option<Isa>) -> String {
    let mut cmd = Command::new(ggpt());
    cmd.args(["run", "-m"]).arg(model).args([
        "-p",
        prompt,
        "-n",
        "40",
        "--temp",
        "0",
        "--ignore-eos",
        "-t",
        "2",
    ]);
    match isa {
        Some(i) => cmd.env("GGPT_ISA", i.name()),
        None => cmd.env_remove("GGPT_ISA"),
    };
    let out = cmd.output().expect("spawn ggpt");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ggpt run with GGPT_ISA={isa:?} failed: {stderr}"
    );
    // A level that is not available would make ggpt warn and fall back: the comparison would
    // then test nothing.
    assert!(
        !stderr.contains("is not available"),
        "GGPT_ISA={isa:?} was refused: {stderr}"
    );
    String::from_utf8(out.stdout).expect("ggpt prints UTF-8")
}

#[test]
fn every_kernel_level_generates_the_same_greedy_text() {
    let levels = available_isas();
    assert!(levels.contains(&Isa::Scalar));
    for label in ["F16", "Q8_0", "Q6_K", "Q4_K_M"] {
        let model = tiny_model(label);
        for prompt in PROMPTS {
            let chosen = generate(&model, prompt, None);
            assert!(
                chosen.len() > prompt.len() + 20,
                "{label}: too little text generated: {chosen:?}"
            );
            for &isa in &levels {
                let text = generate(&model, prompt, Some(isa));
                assert_eq!(
                    text, chosen,
                    "{label}, prompt {prompt:?}: GGPT_ISA={isa} differs from the default level"
                );
            }
        }
    }
}

#[test]
fn every_kernel_level_generates_the_same_greedy_text_after_a_long_f16_prompt() {
    let model = tiny_model("F16");
    // The prompt must stay long enough to reach both float tile paths.
    let out = Command::new(ggpt())
        .args(["tokenize", "-m"])
        .arg(&model)
        .arg(LONG_PROMPT)
        .output()
        .expect("spawn ggpt tokenize");
    assert!(out.status.success(), "ggpt tokenize failed");
    let ids = String::from_utf8_lossy(&out.stdout);
    let n = ids
        .split(|c: char| !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .count();
    assert!(n >= 32, "the long prompt is {n} tokens: {ids}");
    let chosen = generate(&model, LONG_PROMPT, None);
    assert!(
        chosen.len() > LONG_PROMPT.len() + 20,
        "too little text: {chosen:?}"
    );
    for isa in available_isas() {
        let text = generate(&model, LONG_PROMPT, Some(isa));
        assert_eq!(
            text, chosen,
            "F16, the long prompt: GGPT_ISA={isa} differs from the default level"
        );
    }
}
