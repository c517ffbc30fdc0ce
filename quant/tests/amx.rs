//! The AMX level's F16/BF16 prompt path (`dot::amx`) against the arithmetic it claims: each
//! product as `w_hi·a_hi + w_hi·a_lo + w_lo·a_hi` of bf16 parts (BF16 weights: no `w_lo`),
//! summed in f32; and against the exact product within the bound that arithmetic implies.
//! Ragged rows, columns and token counts reach every padded edge of the tiles.

use ggpt_quant::cpu::Isa;
use ggpt_quant::matmul::{matmul_at, QMatrix, Scratch};
use ggpt_quant::{tensor, GgmlType};
use half::{bf16, f16};

mod common;
use common::{aligned, as_bytes, values};

/// `x` rounded to the nearest bf16 (ties to even), as f32: written out here, independently of
/// the kernel's own rounding.
fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    let lsb = (b >> 16) & 1;
    f32::from_bits(b.wrapping_add(0x7FFF + lsb) & 0xFFFF_0000)
}

fn parts(x: f32) -> (f32, f32) {
    let hi = round_bf16(x);
    (hi, round_bf16(x - hi))
}

#[test]
fn amx_matmul_is_its_split_arithmetic() {
    let Some(level) = Isa::Amx.level() else {
        eprintln!("skipped: this CPU or kernel has no AMX-BF16 tiles");
        return;
    };
    for ty in [GgmlType::F16, GgmlType::BF16] {
        for &(rows, cols, tokens) in &[
            (37, 100, 33),
            (37, 100, 21),
            (70, 544, 64),
            (101, 1024, 40),
            (16, 32, 32),
            (5, 23, 47),
            (64, 2080, 97),
        ] {
            let wv = values(rows * cols, 3 + cols as u64);
            let bytes = tensor::quantize(ty, &wv, cols).expect("quantize");
            let buf = aligned(&bytes);
            let m = QMatrix::new(ty, rows, cols, as_bytes(&buf, bytes.len())).expect("matrix");
            // The weights as stored, as f32.
            let w: Vec<f32> = bytes
                .chunks_exact(2)
                .map(|b| {
                    let bits = u16::from_le_bytes([b[0], b[1]]);
                    match ty {
                        GgmlType::F16 => f16::from_bits(bits).to_f32(),
                        _ => bf16::from_bits(bits).to_f32(),
                    }
                })
                .collect();
            let x: Vec<f32> = values(tokens * cols, 5).iter().map(|v| v * 3.0).collect();
            let bias = values(rows, 9);
            let mut y = vec![f32::NAN; tokens * rows];
            let mut s = Scratch::default();
            matmul_at(level, &m, &x, tokens, Some(&bias), &mut y, &mut s);
            for t in 0..tokens {
                for r in 0..rows {
                    let (mut split, mut exact, mut mag) = (0f64, 0f64, 0f64);
                    for c in 0..cols {
                        let (wv, xv) = (w[r * cols + c], x[t * cols + c]);
                        let (wh, wl) = parts(wv);
                        assert_eq!(wh + wl, wv, "{ty}: weight {wv} splits exactly");
                        let (xh, xl) = parts(xv);
                        split += wh as f64 * xh as f64 + wh as f64 * xl as f64;
                        split += wl as f64 * xh as f64;
                        exact += wv as f64 * xv as f64;
                        mag += (wv as f64 * xv as f64).abs();
                    }
                    let got = (y[t * rows + r] - bias[r]) as f64;
                    let what = format!("{ty} {rows}×{cols}, {tokens} tokens: y[{t}, {r}]");
                    // f32 sums of `cols` terms: a few units of 2⁻²⁴ of the magnitude.
                    assert!(
                        (got - split).abs() <= 1e-6 * mag + 1e-30,
                        "{what} = {got}, split arithmetic {split} (magnitude {mag})"
                    );
                    // The split itself: at most 2⁻¹⁵ of each product (`dot::amx`).
                    assert!(
                        (got - exact).abs() <= (2f64.powi(-15) + 1e-6) * mag,
                        "{what} = {got}, exact {exact} (magnitude {mag})"
                    );
                }
            }
        }
    }
}
