//! A NaN or infinite value in a weight — an fp16 scale of a quantized block, or a float
//! weight — makes the output of every row that holds it non-finite, for every token, at every
//! available instruction-set level, through every kernel path (one-token dot and many-rows
//! decode, the row-by-row driver for two or three tokens, the tiles from four on), and leaves
//! the other rows finite. The runtime relies on this instead of checking scales before a
//! matmul reads them: the session's check of the logits finds any bad value the forward pass
//! touched (docs/errors.md).

use ggpt_quant::cpu::available_isas;
use ggpt_quant::format::weight_types;
use ggpt_quant::matmul::{matmul_at, QMatrix, Scratch};
use ggpt_quant::tensor::{self, fp16_scale_fields};
use ggpt_quant::GgmlType;

mod common;
use common::{aligned, as_bytes, values};

/// (byte offset in the row, bytes, label) of each way to poison one block of `ty` with `bad`.
fn poisons(ty: GgmlType, block: usize, bad: f32) -> Vec<(usize, Vec<u8>, String)> {
    let start = block * ty.type_size();
    match ty {
        GgmlType::F32 => vec![(start, bad.to_le_bytes().to_vec(), "value".into())],
        GgmlType::F16 => {
            let h = half::f16::from_f32(bad).to_le_bytes().to_vec();
            vec![(start, h, "value".into())]
        }
        GgmlType::BF16 => {
            let h = half::bf16::from_f32(bad).to_le_bytes().to_vec();
            vec![(start, h, "value".into())]
        }
        _ => fp16_scale_fields(ty)
            .iter()
            .map(|&(off, name)| {
                let h = half::f16::from_f32(bad).to_le_bytes().to_vec();
                (start + off, h, name.to_string())
            })
            .collect(),
    }
}

#[test]
fn a_non_finite_weight_or_scale_poisons_exactly_its_rows_outputs() {
    const ROWS: usize = 37;
    const TOKEN_COUNTS: [usize; 7] = [1, 2, 3, 4, 5, 8, 17];
    let mut failures = Vec::new();
    let mut checked = 0;
    for ty in weight_types() {
        let cols = if ty.block_size() == 256 { 768 } else { 800 };
        let clean = tensor::quantize(ty, &values(ROWS * cols, 3), cols).expect("quantize");
        let row_bytes = clean.len() / ROWS;
        let blocks_per_row = row_bytes / ty.type_size();
        // Token 0 is all zeros (its activation scale is 0: an infinite scale times 0 must
        // still give NaN); the others are ordinary activations.
        let mut x = values(17 * cols, 5);
        x[..cols].fill(0.0);
        // A row inside the first row tile and one near the end; the first and the last
        // block of a row.
        for (row, block) in [(5, 0), (ROWS - 2, blocks_per_row - 1)] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for (at, bytes, field) in poisons(ty, block, bad) {
                    let mut w = clean.clone();
                    let o = row * row_bytes + at;
                    w[o..o + bytes.len()].copy_from_slice(&bytes);
                    let buf = aligned(&w);
                    let m = QMatrix::new(ty, ROWS, cols, as_bytes(&buf, w.len())).expect("matrix");
                    for isa in available_isas() {
                        let level = isa.level().expect("available");
                        let mut s = Scratch::default();
                        for n in TOKEN_COUNTS {
                            let mut y = vec![0.0; n * ROWS];
                            matmul_at(level, &m, &x[..n * cols], n, None, &mut y, &mut s);
                            for t in 0..n {
                                checked += 1;
                                let yt = &y[t * ROWS..(t + 1) * ROWS];
                                let wrong: Vec<usize> = (0..ROWS)
                                    .filter(|&r| yt[r].is_finite() == (r == row))
                                    .collect();
                                if !wrong.is_empty() {
                                    failures.push(format!(
                                        "{ty} {isa}: {bad} in {field} of row {row} block \
                                         {block}, {n} tokens, token {t}: rows {wrong:?} \
                                         wrong (row {row} = {})",
                                        yt[row]
                                    ));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 0);
    assert!(
        failures.is_empty(),
        "{} of {checked} token outputs hide a non-finite weight or poison another row:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The other half of the same guarantee: a NaN or infinite activation (an overflow upstream,
/// or a bad weight of an earlier layer) makes every output of its token non-finite and leaves
/// the other tokens' outputs finite. Quantized formats quantize activations first, which must
/// not round the bad value into a plausible number.
#[test]
fn a_non_finite_activation_poisons_every_output_of_its_token() {
    const ROWS: usize = 37;
    let mut failures = Vec::new();
    let mut checked = 0;
    for ty in weight_types() {
        let cols = if ty.block_size() == 256 { 768 } else { 800 };
        let w = tensor::quantize(ty, &values(ROWS * cols, 3), cols).expect("quantize");
        let buf = aligned(&w);
        let m = QMatrix::new(ty, ROWS, cols, as_bytes(&buf, w.len())).expect("matrix");
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for n in [1, 2, 3, 4, 5, 8, 17] {
                // The last token is poisoned, at the first and at the last column in turn;
                // the first token is all zeros.
                for col in [0, cols - 1] {
                    let mut x = values(n * cols, 5);
                    x[..cols].fill(0.0);
                    x[(n - 1) * cols + col] = bad;
                    for isa in available_isas() {
                        let level = isa.level().expect("available");
                        let mut y = vec![0.0; n * ROWS];
                        matmul_at(level, &m, &x, n, None, &mut y, &mut Scratch::default());
                        for t in 0..n {
                            checked += 1;
                            let yt = &y[t * ROWS..(t + 1) * ROWS];
                            let want_bad = t == n - 1;
                            let wrong =
                                (0..ROWS).filter(|&r| yt[r].is_finite() == want_bad).count();
                            if wrong > 0 {
                                failures.push(format!(
                                    "{ty} {isa}: {bad} at column {col} of token {}, {n} \
                                     tokens: {wrong} rows of token {t} wrong",
                                    n - 1
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 0);
    assert!(
        failures.is_empty(),
        "{} of {checked} token outputs hide a non-finite activation or poison another token:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
