//! Batch invariance: a token's matmul result is bit-identical whatever the number of tokens
//! in the call and whatever its position among them, for every weight format at every
//! available instruction-set level, once `matmul::set_batch_invariant(true)` is on (float
//! formats are invariant without it, but for F16 and BF16 prompts on the AMX tiles, whose
//! sums differ from the FMA tiles' in the last bits). The server batches sequences and must
//! give a request the same logits alone or beside others.

use ggpt_quant::cpu::{available_isas, Isa};
use ggpt_quant::format::weight_types;
use ggpt_quant::matmul::{matmul_at, set_batch_invariant, QMatrix, Scratch};
use ggpt_quant::{tensor, GgmlType};

mod common;
use common::{aligned, as_bytes, values};

/// Tokens per call, up to: past the packed tiles' threshold (4) for every format, and for
/// the floats past the outer-product tile's threshold (32) by more than a group (12 tokens).
const MAX_TOKENS: usize = 17;
const MAX_FLOAT_TOKENS: usize = 46;

/// Every (format, shape, level, batch) whose batched rows differ from the tokens alone, at the
/// levels `isas` gives for a format.
fn variant_rows(types: &[GgmlType], isas: impl Fn(GgmlType) -> Vec<Isa>) -> Vec<String> {
    let mut failures = Vec::new();
    for &ty in types {
        // A row length with a partial Q8_0 tile (25 blocks) and ragged float tails, and one
        // with several superblocks; 37 rows leaves remainders in every row tiling.
        let shapes: &[(usize, usize)] = if ty.block_size() == 256 {
            &[(37, 512), (19, 1280)]
        } else if ty.block_size() == 1 {
            // Floats also: ragged tails, rows shorter than one step of 16 columns and than
            // 16 steps (lanes with fewer steps than others), partial panels of 32 rows.
            &[(37, 800), (19, 1024), (13, 2100), (33, 23), (70, 5)]
        } else {
            &[(37, 800), (19, 1024)]
        };
        let max_tokens = if ty.block_size() == 1 {
            MAX_FLOAT_TOKENS
        } else {
            MAX_TOKENS
        };
        for &(rows, cols) in shapes {
            let w = tensor::quantize(ty, &values(rows * cols, 7 + cols as u64), cols)
                .expect("quantize weights");
            let buf = aligned(&w);
            let m = QMatrix::new(ty, rows, cols, as_bytes(&buf, w.len())).expect("valid matrix");
            let x = values(max_tokens * cols, 11);
            let bias = values(rows, 13);
            for isa in isas(ty) {
                let level = isa.level().expect("available");
                let mut s = Scratch::default();
                // Each token alone.
                let alone: Vec<Vec<f32>> = (0..max_tokens)
                    .map(|t| {
                        let mut y = vec![0.0; rows];
                        let xt = &x[t * cols..(t + 1) * cols];
                        matmul_at(level, &m, xt, 1, Some(&bias), &mut y, &mut s);
                        y
                    })
                    .collect();
                // Batches of 1..=max_tokens tokens starting at token 0, and at token 1 (so a token
                // also appears at another position).
                for start in [0, 1] {
                    for n in 1..=max_tokens - start {
                        let mut y = vec![0.0; n * rows];
                        let xs = &x[start * cols..(start + n) * cols];
                        matmul_at(level, &m, xs, n, Some(&bias), &mut y, &mut s);
                        for t in 0..n {
                            let got = &y[t * rows..(t + 1) * rows];
                            let want = &alone[start + t];
                            let diff = got
                                .iter()
                                .zip(want)
                                .position(|(a, b)| a.to_bits() != b.to_bits());
                            if let Some(r) = diff {
                                failures.push(format!(
                                    "{ty} {rows}×{cols} {isa}: token {} of {n} (from {start}) \
                                     row {r}: {} batched vs {} alone",
                                    start + t,
                                    got[r],
                                    want[r]
                                ));
                                break;
                            }
                        }
                    }
                }
            }
        }
    }
    failures
}

// One test (this file's only one), because the switch is process-wide.
#[test]
fn matmul_rows_are_bit_identical_for_every_token_count_and_position() {
    let types: Vec<GgmlType> = weight_types().collect();
    assert!(
        types.len() >= 7,
        "every weight format is covered: {types:?}"
    );
    // Float formats: always, but F16/BF16 at the AMX level, whose prompts take the tiles.
    let floats = [GgmlType::F32, GgmlType::F16, GgmlType::BF16];
    let failures = variant_rows(&floats, |ty| {
        let amx = matches!(ty, GgmlType::F16 | GgmlType::BF16);
        available_isas()
            .into_iter()
            .filter(|&i| !(amx && i == Isa::Amx))
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} batched float results differ from the token alone:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Every format with the switch on. One line per failing (format, shape, level, batch) so
    // a regression names its kernel.
    set_batch_invariant(true);
    let failures = variant_rows(&types, |_| available_isas());
    assert!(
        failures.is_empty(),
        "{} batched results differ from the token alone:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
