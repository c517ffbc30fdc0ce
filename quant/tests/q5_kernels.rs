//! Q5_0 · Q8_0 and Q5_1 · Q8_1: every kernel variant this CPU runs against ggml's own dot
//! products (tests/fixtures/quant/q5_*.dot.f32) and against the scalar reference on random
//! blocks, and matmul over these formats against a naive loop of scalar dots.

use ggpt_quant::dot::{available_isas, Isa};
use ggpt_quant::matmul::{matmul_at, MatrixError, QMatrix, Scratch};
use ggpt_quant::q5_0::{self, BlockQ5_0};
use ggpt_quant::q5_1::{self, BlockQ5_1};
use ggpt_quant::q8_0::BlockQ8_0;
use ggpt_quant::q8_1::{quantize_q8_1, BlockQ8_1};
use ggpt_quant::tensor::{blocks_as_bytes, blocks_as_bytes_mut};
use ggpt_quant::{act, BlockFormat, GgmlType};
use half::f16;

const ROWS: usize = 32;
const COLS: usize = 1024;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../tests/fixtures/quant/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Blocks from file bytes (copied into a properly aligned block vector).
fn blocks<B: BlockFormat>(bytes: &[u8], zero: B) -> Vec<B> {
    let mut v = vec![zero; bytes.len() / std::mem::size_of::<B>()];
    blocks_as_bytes_mut(&mut v).copy_from_slice(bytes);
    v
}

const Z5_0: BlockQ5_0 = BlockQ5_0 {
    d: f16::ZERO,
    qh: [0; 4],
    qs: [0; 16],
};
const Z5_1: BlockQ5_1 = BlockQ5_1 {
    d: f16::ZERO,
    m: f16::ZERO,
    qh: [0; 4],
    qs: [0; 16],
};
const Z8_0: BlockQ8_0 = BlockQ8_0 {
    d: f16::ZERO,
    qs: [0; 32],
};

fn isas() -> Vec<Isa> {
    let v = available_isas();
    assert!(v.contains(&Isa::Scalar));
    v
}

fn check_close(what: &str, got: f32, want: f32, abs_sum: f32, rel: f32) {
    let tol = rel * abs_sum.max(f32::MIN_POSITIVE);
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, want {want} (|diff| {} > tol {tol})",
        (got - want).abs()
    );
}

/// Σ|w·a| over dequantized values: the scale of the float rounding the variants may differ by.
/// For Q5_1 the min term is added as |m·s| per block.
fn mag5_0(w: &[BlockQ5_0], a: &[BlockQ8_0]) -> f32 {
    let (mut wf, mut af) = (vec![0.0; w.len() * 32], vec![0.0; a.len() * 32]);
    BlockQ5_0::to_float(w, &mut wf);
    BlockQ8_0::to_float(a, &mut af);
    wf.iter().zip(&af).map(|(x, y)| (x * y).abs()).sum()
}
fn mag5_1(w: &[BlockQ5_1], a: &[BlockQ8_1]) -> f32 {
    let mut s = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let d = x.d.to_f32() * y.d.to_f32();
        for (q, &b) in x.quants().iter().zip(&y.qs) {
            s += (d * *q as f32 * b as f32).abs();
        }
        s += (x.m.to_f32() * y.s.to_f32()).abs();
    }
    s
}

#[test]
fn kernels_match_ggml_dot_products() {
    let w0 = blocks(&fixture("q5_0.quant.bin"), Z5_0);
    let a0 = blocks(&fixture("q5_0.act_quant.bin"), Z8_0);
    let d0 = f32s(&fixture("q5_0.dot.f32"));
    let w1 = blocks(&fixture("q5_1.quant.bin"), Z5_1);
    let a1 = blocks(&fixture("q5_1.act_quant.bin"), BlockQ8_1::ZERO);
    let d1 = f32s(&fixture("q5_1.dot.f32"));
    let nb = COLS / 32;
    assert_eq!(
        (w0.len(), a0.len(), w1.len(), a1.len()),
        (ROWS * nb, ROWS * nb, ROWS * nb, ROWS * nb)
    );
    for isa in isas() {
        let (k0, k1) = (q5_0::dot_kernel(isa), q5_1::dot_kernel(isa));
        for r in 0..ROWS {
            let row = r * nb..(r + 1) * nb;
            let (w, a) = (&w0[row.clone()], &a0[row.clone()]);
            check_close(
                &format!("{isa} q5_0 row {r}"),
                k0(w, a),
                d0[r],
                mag5_0(w, a),
                1e-4,
            );
            let (w, a) = (&w1[row.clone()], &a1[row]);
            check_close(
                &format!("{isa} q5_1 row {r}"),
                k1(w, a),
                d1[r],
                mag5_1(w, a),
                1e-4,
            );
        }
    }
}

#[test]
fn q8_1_activations_match_ggml_cpu_path() {
    let x = f32s(&fixture("activations.f32"));
    let mut a = vec![BlockQ8_1::ZERO; x.len() / 32];
    quantize_q8_1(&x, &mut a);
    assert!(blocks_as_bytes(&a) == &fixture("q5_1.act_quant.bin")[..]);
    // The reference quantizer (ties away from zero, 1/d) is not what made the file on every
    // value's last bit of `s`/`qs`, but it must agree on d.
    let mut r = vec![BlockQ8_1::ZERO; x.len() / 32];
    BlockQ8_1::from_float(&x, &mut r);
    assert!(r.iter().zip(&a).all(|(r, a)| r.d == a.d));
}

// ---------------------------------------------------------------------------------------------
// SIMD against scalar on random blocks

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        std::array::from_fn(|_| self.next() as u8)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// An f16 scale of either sign and varied magnitude.
    fn scale(&mut self) -> f16 {
        f16::from_f32(self.unit() * 10f32.powi((self.next() % 4) as i32 - 3))
    }
}

fn rand_q5_0(r: &mut Rng) -> BlockQ5_0 {
    BlockQ5_0 {
        d: r.scale(),
        qh: r.bytes(),
        qs: r.bytes(),
    }
}
fn rand_q5_1(r: &mut Rng) -> BlockQ5_1 {
    BlockQ5_1 {
        d: r.scale(),
        m: r.scale(),
        qh: r.bytes(),
        qs: r.bytes(),
    }
}
/// Activation blocks with arbitrary bytes, −128 included (the quantizers never write it, but
/// the kernels must stay exact for any block).
fn rand_q8_0(r: &mut Rng) -> BlockQ8_0 {
    BlockQ8_0 {
        d: r.scale(),
        qs: r.bytes::<32>().map(|b| b as i8),
    }
}
fn rand_q8_1(r: &mut Rng) -> BlockQ8_1 {
    BlockQ8_1 {
        d: r.scale(),
        s: r.scale(),
        qs: r.bytes::<32>().map(|b| b as i8),
    }
}

#[test]
fn simd_equals_scalar_on_random_blocks() {
    let mut r = Rng(7);
    let isas = isas();
    for n in [1usize, 2, 3, 5, 8, 13, 32, 50] {
        for _ in 0..30 {
            let w0: Vec<_> = (0..n).map(|_| rand_q5_0(&mut r)).collect();
            let a0: Vec<_> = (0..n).map(|_| rand_q8_0(&mut r)).collect();
            let w1: Vec<_> = (0..n).map(|_| rand_q5_1(&mut r)).collect();
            let a1: Vec<_> = (0..n).map(|_| rand_q8_1(&mut r)).collect();
            let want0 = q5_0::vec_dot_q8_0(&w0, &a0);
            let want1 = q5_1::vec_dot_q8_1(&w1, &a1);
            for &isa in &isas {
                let got0 = q5_0::dot_kernel(isa)(&w0, &a0);
                check_close(
                    &format!("{isa} q5_0 n={n}"),
                    got0,
                    want0,
                    mag5_0(&w0, &a0),
                    1e-5,
                );
                let got1 = q5_1::dot_kernel(isa)(&w1, &a1);
                check_close(
                    &format!("{isa} q5_1 n={n}"),
                    got1,
                    want1,
                    mag5_1(&w1, &a1),
                    1e-5,
                );
            }
        }
    }
}

/// All-extreme blocks: the integer sums must be exact (a saturating or overflowing pair sum
/// would be off by thousands).
#[test]
fn simd_integer_sums_are_exact_at_the_extremes() {
    let one = f16::from_f32(1.0);
    for isa in isas() {
        for (qs, qh, a) in [
            ([0xffu8; 16], [0xffu8; 4], -128i8),
            ([0xff; 16], [0xff; 4], 127),
            ([0; 16], [0; 4], -128),
            ([0; 16], [0; 4], 127),
            ([0x5a; 16], [0x0f, 0xf0, 0x33, 0xcc], -128),
        ] {
            let w0 = [BlockQ5_0 { d: one, qh, qs }; 4];
            let a0 = [BlockQ8_0 {
                d: one,
                qs: [a; 32],
            }; 4];
            let q = w0[0].quants();
            let want: i32 = q.iter().map(|&q| (q as i32 - 16) * a as i32).sum::<i32>() * 4;
            assert_eq!(q5_0::dot_kernel(isa)(&w0, &a0), want as f32, "{isa} q5_0");
            let w1 = [BlockQ5_1 {
                d: one,
                m: f16::ZERO,
                qh,
                qs,
            }; 4];
            let a1 = [BlockQ8_1 {
                d: one,
                s: f16::ZERO,
                qs: [a; 32],
            }; 4];
            let want: i32 = q.iter().map(|&q| q as i32 * a as i32).sum::<i32>() * 4;
            assert_eq!(q5_1::dot_kernel(isa)(&w1, &a1), want as f32, "{isa} q5_1");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// matmul against a naive loop of scalar dots

fn f32_rows(r: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.unit() * 2.0).collect()
}

/// matmul over `data` (rows × cols of `ty`) with every kernel table and both pools equals
/// `naive` (token-major scalar dots) plus the bias, within float rounding of `mag`.
#[allow(clippy::too_many_arguments)]
fn check_matmul(
    ty: GgmlType,
    (rows, cols, n_tokens): (usize, usize, usize),
    data: &[u8],
    x: &[f32],
    bias: &[f32],
    naive: &[f32],
    mag: &[f32],
    pools: &[rayon::ThreadPool],
) {
    let w = QMatrix::new(ty, rows, cols, data).expect("valid matrix");
    for pool in pools {
        for isa in isas() {
            let level = isa.level().expect("available level");
            let mut y = vec![f32::NAN; n_tokens * rows];
            let mut scratch = Scratch::default();
            pool.install(|| matmul_at(level, &w, x, n_tokens, Some(bias), &mut y, &mut scratch));
            for (i, &got) in y.iter().enumerate() {
                let want = naive[i] + bias[i % rows];
                let tol = 1e-5 * (mag[i] + bias[i % rows].abs());
                assert!(
                    (got - want).abs() <= tol,
                    "{ty} {isa} {rows}×{cols} T={n_tokens}: y[{i}] = {got}, naive {want}"
                );
            }
        }
    }
}

#[test]
fn matmul_equals_naive_loop() {
    let mut r = Rng(9);
    let pools: Vec<_> = [1, 3]
        .into_iter()
        .map(|n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
        })
        .collect();
    // Row lengths of 1 block, GPT-2 XL's 1600 (50 blocks) and a few in between; token counts
    // below and above the point where other formats switch to tile kernels.
    for &(rows, cols) in &[(1usize, 32usize), (7, 96), (37, 1600), (70, 256)] {
        for n_tokens in [1usize, 2, 4, 9] {
            let nb = cols / 32;
            let shape = (rows, cols, n_tokens);
            let x = f32_rows(&mut r, n_tokens * cols);
            let bias = f32_rows(&mut r, rows);
            // Weights from the real quantizers, activations quantized token by token as
            // matmul must do it.
            let wf = f32_rows(&mut r, rows * cols);

            let mut w = vec![Z5_0; rows * nb];
            BlockQ5_0::from_float(&wf, &mut w);
            let mut a = vec![Z8_0; n_tokens * nb];
            for (xt, at) in x.chunks(cols).zip(a.chunks_mut(nb)) {
                act::quantize_q8_0(xt, at);
            }
            let pairs = a
                .chunks(nb)
                .flat_map(|at| w.chunks(nb).map(move |wr| (wr, at)));
            let naive: Vec<f32> = pairs
                .clone()
                .map(|(wr, at)| q5_0::vec_dot_q8_0(wr, at))
                .collect();
            let mag: Vec<f32> = pairs.map(|(wr, at)| mag5_0(wr, at)).collect();
            let data = blocks_as_bytes(&w);
            check_matmul(GgmlType::Q5_0, shape, data, &x, &bias, &naive, &mag, &pools);

            let mut w = vec![Z5_1; rows * nb];
            BlockQ5_1::from_float(&wf, &mut w);
            let mut a = vec![BlockQ8_1::ZERO; n_tokens * nb];
            for (xt, at) in x.chunks(cols).zip(a.chunks_mut(nb)) {
                quantize_q8_1(xt, at);
            }
            let pairs = a
                .chunks(nb)
                .flat_map(|at| w.chunks(nb).map(move |wr| (wr, at)));
            let naive: Vec<f32> = pairs
                .clone()
                .map(|(wr, at)| q5_1::vec_dot_q8_1(wr, at))
                .collect();
            let mag: Vec<f32> = pairs.map(|(wr, at)| mag5_1(wr, at)).collect();
            let data = blocks_as_bytes(&w);
            check_matmul(GgmlType::Q5_1, shape, data, &x, &bias, &naive, &mag, &pools);
        }
    }
}

#[test]
fn matrix_checks_apply_to_q5() {
    let buf = [Z5_1; 4];
    let bytes = blocks_as_bytes(&buf);
    for ty in [GgmlType::Q5_0, GgmlType::Q5_1] {
        assert!(ggpt_quant::types::is_supported_weight(ty));
        // One row of 96 values = 3 blocks.
        let n = ty.type_size() * 3;
        assert!(QMatrix::new(ty, 1, 96, &bytes[..n]).is_ok());
        assert!(matches!(
            QMatrix::new(ty, 1, 100, &bytes[..n]),
            Err(MatrixError::RaggedRow { .. })
        ));
        assert!(matches!(
            QMatrix::new(ty, 2, 96, &bytes[..n]),
            Err(MatrixError::WrongSize { .. })
        ));
        assert!(matches!(
            QMatrix::new(ty, 1, 96, &bytes[1..n + 1]),
            Err(MatrixError::Misaligned { .. })
        ));
    }
}
