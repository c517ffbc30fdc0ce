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
