//! The block formats against vectors produced by ggml itself (tests/fixtures/quant, see its
//! README): quantization must match byte for byte, dequantization bit for bit. Plus ggml's
//! `test-quantize-fns` error bounds on its cosine test data.
//!
//! Activation quantization (`<t>.act_quant.bin`):
//! - K-quants use Q8_K from ggml's reference `quantize_row_q8_K_ref` → `BlockQ8K::from_float`.
//! - F16 uses f16 conversion (round to nearest even) → `f16::from_float`.
//! - Q8_0: ggml's CPU backend on x86 quantizes activations with its SIMD `quantize_row_q8_0`
//!   (`id = 127/amax`, round half to even), not the reference (`id = 1/d`, `roundf`, half away
//!   from zero); `quantize_row_q8_0_nearest_even` reproduces the SIMD one. Which one made the
//!   fixture cannot be told from its bytes: `q8_0_activation_file_fits_both_roundings` shows
//!   that the 32 activation rows contain no exact tie, and although 7483 of the 32768 scaled
//!   values differ in the last bit between `x·(1/d)` and `x·(127/amax)`, none rounds
//!   differently — the file equals both quantizers' output. (A constructed tie where they
//!   differ is tested in `q8_0.rs`.) We test against the SIMD one, what llama.cpp runs.
//! - Q5_0 pairs with that same Q8_0; Q5_1 with Q8_1, made by ggml's CPU `quantize_row_q8_1`
//!   (`id = 127/amax`, round half to even, `s = d·Σq`) → `q8_1::quantize_q8_1`.

use ggpt_quant::q4_k::BlockQ4K;
use ggpt_quant::q5_0::BlockQ5_0;
use ggpt_quant::q5_1::BlockQ5_1;
use ggpt_quant::q5_k::BlockQ5K;
use ggpt_quant::q6_k::BlockQ6K;
use ggpt_quant::q8_0::{quantize_row_q8_0_nearest_even, BlockQ8_0};
use ggpt_quant::q8_1::{quantize_q8_1, BlockQ8_1};
use ggpt_quant::tensor::{self, blocks_as_bytes};
use ggpt_quant::{BlockFormat, GgmlType};
use half::f16;
use std::path::PathBuf;

const ROWS: usize = 32;
const COLS: usize = 1024;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/quant")
}

fn read(name: &str) -> Vec<u8> {
    let p = fixture_dir().join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn read_f32(name: &str) -> Vec<f32> {
    let b = read(name);
    assert_eq!(b.len() % 4, 0, "{name}: length not a multiple of 4");
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

struct Manifest {
    distributions: Vec<String>,
    json: serde_json::Value,
}

fn manifest() -> Manifest {
    let json: serde_json::Value =
        serde_json::from_slice(&read("manifest.json")).expect("manifest.json is JSON");
    assert_eq!(json["rows"], ROWS);
    assert_eq!(json["n_per_row"], COLS);
    let distributions = json["row_distributions"]
        .as_array()
        .expect("row_distributions")
        .iter()
        .map(|v| v.as_str().expect("distribution name").to_string())
        .collect::<Vec<_>>();
    assert_eq!(distributions.len(), ROWS);
    Manifest {
        distributions,
        json,
    }
}

/// (fixture name, weight type, activation type).
const TYPES: [(&str, GgmlType, GgmlType); 7] = [
    ("q8_0", GgmlType::Q8_0, GgmlType::Q8_0),
    ("q5_0", GgmlType::Q5_0, GgmlType::Q8_0),
    ("q5_1", GgmlType::Q5_1, GgmlType::Q8_1),
    ("q4_k", GgmlType::Q4K, GgmlType::Q8K),
    ("q5_k", GgmlType::Q5K, GgmlType::Q8K),
    ("q6_k", GgmlType::Q6K, GgmlType::Q8K),
    ("f16", GgmlType::F16, GgmlType::F16),
];

/// Rows where `got` and `want` differ, as "row r (distribution): first differing byte at k".
fn differing_rows(got: &[u8], want: &[u8], ty: GgmlType, m: &Manifest) -> Vec<String> {
    let row_bytes = want.len() / ROWS;
    assert_eq!(got.len(), want.len());
    got.chunks(row_bytes)
        .zip(want.chunks(row_bytes))
        .enumerate()
        .filter_map(|(r, (g, w))| {
            let k = g.iter().zip(w).position(|(a, b)| a != b)?;
            Some(format!(
                "row {r} ({}): first differing byte {k} (block {}), got {:#04x} want {:#04x}",
                m.distributions[r],
                k / ty.type_size(),
                g[k],
                w[k]
            ))
        })
        .collect()
}

#[test]
fn manifest_row_sizes_match_types() {
    let m = manifest();
    for (name, ty, act) in TYPES {
        let t = &m.json["types"][name];
        assert_eq!(t["ggml_type"], ty as u32, "{name}");
        assert_eq!(t["row_bytes"], ty.row_bytes(COLS as u64).unwrap(), "{name}");
        assert_eq!(
            t["act_row_bytes"],
            act.row_bytes(COLS as u64).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn quantize_weights_byte_exact() {
    let m = manifest();
    let w = read_f32("weights.f32");
    assert_eq!(w.len(), ROWS * COLS);
    let mut failures = Vec::new();
    for (name, ty, _) in TYPES {
        let want = read(&format!("{name}.quant.bin"));
        let got = tensor::quantize(ty, &w, COLS).unwrap();
        assert_eq!(got.len(), want.len(), "{name}: size");
        for d in differing_rows(&got, &want, ty, &m) {
            failures.push(format!("{name}: {d}"));
        }
    }
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
}

/// The same through each BlockFormat directly (one call over the whole matrix, as ggml's
/// `quantize_row_*_ref` is called), so the trait impls are covered without tensor.rs.
#[test]
fn block_from_float_byte_exact() {
    fn check<B: BlockFormat>(name: &str, w: &[f32]) {
        let want = read(&format!("{name}.quant.bin"));
        let mut blocks = vec![zero_block::<B>(); w.len() / B::BLOCK];
        B::from_float(w, &mut blocks);
        assert!(
            blocks_as_bytes(&blocks) == &want[..],
            "{name}: blocks differ"
        );
    }
    let w = read_f32("weights.f32");
    check::<BlockQ8_0>("q8_0", &w);
    check::<BlockQ5_0>("q5_0", &w);
    check::<BlockQ5_1>("q5_1", &w);
    check::<BlockQ4K>("q4_k", &w);
    check::<BlockQ5K>("q5_k", &w);
    check::<BlockQ6K>("q6_k", &w);
    check::<f16>("f16", &w);
}

/// Q4_K/Q5_K search two super-blocks at a time: calls over an odd number of super-blocks
/// (pairs plus a single one) and over one at a time give ggml's bytes too.
#[test]
fn k_quants_byte_exact_in_pairs_and_alone() {
    fn check<B: BlockFormat>(name: &str, w: &[f32]) {
        let want = read(&format!("{name}.quant.bin"));
        let bytes = std::mem::size_of::<B>();
        for n in [1usize, 3, 5] {
            for start in 0..4 {
                let x = &w[start * B::BLOCK..(start + n) * B::BLOCK];
                let mut blocks = vec![zero_block::<B>(); n];
                B::from_float(x, &mut blocks);
                assert!(
                    blocks_as_bytes(&blocks) == &want[start * bytes..(start + n) * bytes],
                    "{name}: {n} super-blocks from {start} differ"
                );
            }
        }
    }
    let w = read_f32("weights.f32");
    check::<BlockQ4K>("q4_k", &w);
    check::<BlockQ5K>("q5_k", &w);
    check::<BlockQ6K>("q6_k", &w);
}

/// An all-zero block, built from zero bytes through `cast_blocks` (no `unsafe` in tests).
fn zero_block<B: BlockFormat>() -> B {
    let bytes = vec![0u8; std::mem::size_of::<B>() + 8];
    // Find an offset aligned for B inside the buffer.
    let off = (0..8)
        .find(|&o| tensor::cast_blocks::<B>(&bytes[o..o + std::mem::size_of::<B>()]).is_some())
        .expect("an aligned offset");
    tensor::cast_blocks::<B>(&bytes[off..off + std::mem::size_of::<B>()]).unwrap()[0]
}

#[test]
fn dequantize_bit_exact() {
    let m = manifest();
    let mut failures = Vec::new();
    for (name, ty, _) in TYPES {
        let q = read(&format!("{name}.quant.bin"));
        let want = read_f32(&format!("{name}.dequant.f32"));
        let mut got = vec![0.0f32; ROWS * COLS];
        tensor::dequantize(ty, &q, &mut got).unwrap();
        for r in 0..ROWS {
            let row = r * COLS..(r + 1) * COLS;
            if let Some(k) = got[row.clone()]
                .iter()
                .zip(&want[row.clone()])
                .position(|(a, b)| a.to_bits() != b.to_bits())
            {
                failures.push(format!(
                    "{name}: row {r} ({}): value {k}: got {:e} want {:e}",
                    m.distributions[r],
                    got[r * COLS + k],
                    want[r * COLS + k]
                ));
            }
        }
        // ggml-quants dequantizes Q8_K too; exercise it on the activation file.
        if ty == GgmlType::Q4K {
            let act = read("q4_k.act_quant.bin");
            let mut y = vec![0.0f32; ROWS * COLS];
            tensor::dequantize(GgmlType::Q8K, &act, &mut y).unwrap();
            let x = read_f32("activations.f32");
            let err = rms_like(&x, &y);
            assert!(err < 0.0005, "Q8_K round trip error {err}");
        }
    }
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
}

#[test]
fn quantize_activations_byte_exact() {
    let m = manifest();
    let a = read_f32("activations.f32");
    let mut failures = Vec::new();
    for (name, _, act) in TYPES {
        let want = read(&format!("{name}.act_quant.bin"));
        let got = match act {
            // The ggml CPU path for Q8_0 activations (see the module docs).
            GgmlType::Q8_0 => {
                let mut b = vec![zero_block::<BlockQ8_0>(); a.len() / 32];
                quantize_row_q8_0_nearest_even(&a, &mut b);
                blocks_as_bytes(&b).to_vec()
            }
            GgmlType::Q8_1 => {
                let mut b = vec![BlockQ8_1::ZERO; a.len() / 32];
                quantize_q8_1(&a, &mut b);
                blocks_as_bytes(&b).to_vec()
            }
            _ => tensor::quantize(act, &a, COLS).unwrap(),
        };
        assert_eq!(got.len(), want.len(), "{name}: size");
        for d in differing_rows(&got, &want, act, &m) {
            failures.push(format!("{name} activations: {d}"));
        }
    }
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
}

#[test]
fn q8_0_activation_file_fits_both_roundings() {
    let a = read_f32("activations.f32");
    let want = read("q8_0.act_quant.bin");
    let reference = tensor::quantize(GgmlType::Q8_0, &a, COLS).unwrap();
    let mut simd = vec![zero_block::<BlockQ8_0>(); a.len() / 32];
    quantize_row_q8_0_nearest_even(&a, &mut simd);
    assert!(blocks_as_bytes(&simd) == &want[..]);
    // How many values could the two roundings treat differently: a different scaled value
    // (1/d vs 127/amax) or an exact .5 tie.
    let (mut scaled_differ, mut ties) = (0, 0);
    for x in a.chunks(32) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let (id_ref, id_simd) = (1.0 / (amax / 127.0), 127.0 / amax);
        for &v in x {
            let (r, s) = (v * id_ref, v * id_simd);
            scaled_differ += (r != s) as usize;
            ties += ((r - r.trunc()).abs() == 0.5 || (s - s.trunc()).abs() == 0.5) as usize;
        }
    }
    let differ = reference.iter().zip(&want).filter(|(a, b)| a != b).count();
    eprintln!(
        "q8_0 activations: {scaled_differ} values scaled differently, {ties} exact ties, \
         {differ} bytes differ between the reference quantizer and the file"
    );
    // Both roundings agree wherever the scaled values agree and are not ties, so the
    // reference can differ from the file only at those positions, by one step. On this
    // fixture it does not differ at all.
    assert!(differ <= scaled_differ + ties);
    assert_eq!((ties, differ), (0, 0));
    assert!(scaled_differ > 0);
    for (r, w) in reference.chunks(34).zip(want.chunks(34)) {
        assert_eq!(r[..2], w[..2], "d must agree");
        for (x, y) in r[2..].iter().zip(&w[2..]) {
            assert!((*x as i8 as i32 - *y as i8 as i32).abs() <= 1);
        }
    }
}

/// ggml's "RMSE": sqrt(Σ d²)/n (not the usual RMSE), accumulated in f64.
fn rms_like(a: &[f32], b: &[f32]) -> f32 {
    let sum: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = (x - y) as f64;
            d * d
        })
        .sum();
    (sum.sqrt() / a.len() as f64) as f32
}

/// ggml's test-quantize-fns data: 0.1 + 2·cos(i + offset), 4096 values (0.1 is a double in C).
fn cos_data(offset: f32) -> Vec<f32> {
    (0..32 * 128)
        .map(|i| (0.1f64 + (2.0 * (i as f32 + offset).cos()) as f64) as f32)
        .collect()
}

fn round_trip(ty: GgmlType, x: &[f32]) -> Vec<f32> {
    let q = tensor::quantize(ty, x, x.len()).unwrap();
    let mut y = vec![0.0; x.len()];
    tensor::dequantize(ty, &q, &mut y).unwrap();
    y
}

#[test]
fn ggml_test_quantize_fns_thresholds() {
    let x = cos_data(0.0);
    let x2 = cos_data(1.0);
    let n = x.len();
    let dot_ref: f64 = x.iter().zip(&x2).map(|(&a, &b)| (a * b) as f64).sum();
    let mut report = Vec::new();
    for (name, ty, act) in TYPES {
        // Total quantization error < 0.002.
        let y = round_trip(ty, &x);
        let total = rms_like(&x, &y);
        assert!(total < 0.002, "{name}: total quantization error {total}");
        // A quantizer must do better than the trivial one: rounding to 0 gives ~0.022.
        assert!(total < rms_like(&x, &vec![0.0; n]) / 10.0);
        // Dot product of the quantized weight with the quantized activation (through their
        // dequantized values, which is what the integer kernels compute) vs the f32 dot.
        let yq = match act {
            GgmlType::Q8_0 => {
                let mut b = vec![zero_block::<BlockQ8_0>(); n / 32];
                quantize_row_q8_0_nearest_even(&x2, &mut b);
                let mut v = vec![0.0; n];
                BlockQ8_0::to_float(&b, &mut v);
                v
            }
            GgmlType::Q8_1 => {
                let mut b = vec![BlockQ8_1::ZERO; n / 32];
                quantize_q8_1(&x2, &mut b);
                let mut v = vec![0.0; n];
                BlockQ8_1::to_float(&b, &mut v);
                v
            }
            _ => round_trip(act, &x2),
        };
        let dot: f64 = y.iter().zip(&yq).map(|(&a, &b)| (a * b) as f64).sum();
        let dot_err = ((dot - dot_ref).abs() / n as f64) as f32;
        assert!(dot_err < 0.02, "{name}: dot product error {dot_err}");
        report.push(format!("{name}: total {total:.6} dot {dot_err:.6}"));
    }
    // Reference vs optimized quantizer (ggml compares its SIMD quantize_row_q8_0 with the
    // reference one): < 0.0001.
    let r = round_trip(GgmlType::Q8_0, &x);
    let mut b = vec![zero_block::<BlockQ8_0>(); x.len() / 32];
    quantize_row_q8_0_nearest_even(&x, &mut b);
    let mut s = vec![0.0; x.len()];
    BlockQ8_0::to_float(&b, &mut s);
    let ref_err = rms_like(&r, &s);
    assert!(
        ref_err < 0.0001,
        "q8_0 reference vs SIMD rounding error {ref_err}"
    );
    eprintln!("{}\nq8_0 ref vs simd {ref_err:.6}", report.join("\n"));
}

#[test]
fn bf16_round_trip_on_fixture() {
    // BF16 keeps the top 16 bits with round-to-nearest-even: relative error ≤ 2⁻⁹.
    let w = read_f32("weights.f32");
    let q = tensor::quantize(GgmlType::BF16, &w, COLS).unwrap();
    let mut y = vec![0.0; w.len()];
    tensor::dequantize(GgmlType::BF16, &q, &mut y).unwrap();
    for (a, b) in w.iter().zip(&y) {
        assert!((a - b).abs() <= a.abs() / 256.0, "{a} → {b}");
    }
}

#[test]
fn hostile_inputs_do_not_panic_and_bad_scales_are_caught() {
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        -f32::MAX,
        f32::MIN_POSITIVE,
        1e-45,
        -0.0,
        1e30,
        -3e-39,
    ];
    let mut x = vec![0.0f32; 4 * 256];
    for (i, v) in x.iter_mut().enumerate() {
        *v = specials[(i * 7 + i / 13) % specials.len()];
    }
    // Super-blocks without NaN/inf but with huge values: scales overflow fp16.
    let huge: Vec<f32> = (0..256)
        .map(|i| if i % 3 == 0 { 1e30 } else { -2e29 })
        .collect();
    x.extend_from_slice(&huge);
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8K,
    ] {
        let q = tensor::quantize(ty, &x, 256).unwrap();
        assert_eq!(q.len(), 5 * ty.row_bytes(256).unwrap() as usize);
        let mut y = vec![0.0; x.len()];
        tensor::dequantize(ty, &q, &mut y).unwrap();
        // ggml_validate_row_data is how llama.cpp rejects such tensors; the huge-but-finite
        // last row must be caught for every format whose scale is fp16 (Q8_K's is f32 and
        // f32 values are stored as they are).
        let last = &q[4 * q.len() / 5..];
        let verdict = tensor::validate_row_data(ty, last);
        match ty {
            GgmlType::F32 | GgmlType::Q8K | GgmlType::BF16 => assert!(verdict.is_ok(), "{ty}"),
            // Q6_K weights its fit by x², and x³ overflows f32 for |x| ≳ 7e12: every sum is
            // inf/NaN, no scale survives, and ggml's arithmetic zeroes the block silently.
            GgmlType::Q6K => {
                assert!(verdict.is_ok());
                assert!(y[4 * 256..].iter().all(|&v| v == 0.0));
            }
            _ => assert!(
                verdict
                    .as_ref()
                    .is_err_and(|e| e.to_string().contains("inf")),
                "{ty}: {verdict:?}"
            ),
        }
    }
}
