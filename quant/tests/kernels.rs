//! Dot-product kernels, activation quantization and matmul:
//! - activation quantizers reproduce ggml's bytes (tests/fixtures/quant/*.act_quant.bin);
//! - every kernel variant this CPU supports reproduces ggml's dot products (`<t>.dot.f32`);
//! - every SIMD variant equals the scalar reference on random blocks of varied lengths;
//! - matmul equals a naive loop of dot products for ragged shapes, token counts and threads.

use ggpt_quant::act;
use ggpt_quant::cpu::{self, available_isas, Isa, Level};
use ggpt_quant::format::{DotFn, GemmFn, PackFn, PackedGemmFn, Tile, WeightFormat};
use ggpt_quant::matmul::{matmul_at, QMatrix, Scratch};
use ggpt_quant::q4_k::BlockQ4K;
use ggpt_quant::q5_k::BlockQ5K;
use ggpt_quant::q6_k::BlockQ6K;
use ggpt_quant::q8_0::BlockQ8_0;
use ggpt_quant::q8_k::BlockQ8K;
use ggpt_quant::tensor::blocks_as_bytes;
use ggpt_quant::{BlockFormat, GgmlType};
use half::{bf16, f16};

// ---------------------------------------------------------------------------------------------
// fixtures and byte parsing (safe, field by field, little-endian)

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

fn f16_at(b: &[u8], o: usize) -> f16 {
    f16::from_bits(u16::from_le_bytes([b[o], b[o + 1]]))
}

fn parse_q8k(b: &[u8]) -> BlockQ8K {
    assert_eq!(b.len(), 292);
    let mut y = BlockQ8K {
        d: 0.0,
        qs: [0; 256],
        bsums: [0; 16],
    };
    y.d = f32::from_le_bytes(b[0..4].try_into().unwrap());
    for i in 0..256 {
        y.qs[i] = b[4 + i] as i8;
    }
    for i in 0..16 {
        y.bsums[i] = i16::from_le_bytes([b[260 + 2 * i], b[261 + 2 * i]]);
    }
    y
}

fn q8k_bytes(y: &BlockQ8K) -> Vec<u8> {
    let mut v = y.d.to_le_bytes().to_vec();
    v.extend(y.qs.iter().map(|&q| q as u8));
    for s in y.bsums {
        v.extend(s.to_le_bytes());
    }
    v
}

fn parse_q8_0(b: &[u8]) -> BlockQ8_0 {
    assert_eq!(b.len(), 34);
    let mut y = BlockQ8_0 {
        d: f16_at(b, 0),
        qs: [0; 32],
    };
    for i in 0..32 {
        y.qs[i] = b[2 + i] as i8;
    }
    y
}

fn q8_0_bytes(y: &BlockQ8_0) -> Vec<u8> {
    let mut v = y.d.to_bits().to_le_bytes().to_vec();
    v.extend(y.qs.iter().map(|&q| q as u8));
    v
}

fn parse_q4k(b: &[u8]) -> BlockQ4K {
    assert_eq!(b.len(), 144);
    BlockQ4K {
        d: f16_at(b, 0),
        dmin: f16_at(b, 2),
        scales: b[4..16].try_into().unwrap(),
        qs: b[16..144].try_into().unwrap(),
    }
}

fn parse_q5k(b: &[u8]) -> BlockQ5K {
    assert_eq!(b.len(), 176);
    BlockQ5K {
        d: f16_at(b, 0),
        dmin: f16_at(b, 2),
        scales: b[4..16].try_into().unwrap(),
        qh: b[16..48].try_into().unwrap(),
        qs: b[48..176].try_into().unwrap(),
    }
}

fn parse_q6k(b: &[u8]) -> BlockQ6K {
    assert_eq!(b.len(), 210);
    let mut scales = [0i8; 16];
    for i in 0..16 {
        scales[i] = b[192 + i] as i8;
    }
    BlockQ6K {
        ql: b[0..128].try_into().unwrap(),
        qh: b[128..192].try_into().unwrap(),
        scales,
        d: f16_at(b, 208),
    }
}

fn parse_f16s(b: &[u8]) -> Vec<f16> {
    (0..b.len() / 2).map(|i| f16_at(b, 2 * i)).collect()
}

// ---------------------------------------------------------------------------------------------
// deterministic random data (SplitMix64)

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        std::array::from_fn(|_| self.byte())
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn normalish(&mut self) -> f32 {
        (0..4).map(|_| self.unit()).sum::<f32>() * 0.5
    }
    /// Positive f16 scale of varied magnitude.
    fn scale(&mut self) -> f16 {
        f16::from_f32((0.2 + self.unit().abs()) * 10f32.powi((self.next() % 4) as i32 - 3))
    }
}

fn rand_q4k(r: &mut Rng) -> BlockQ4K {
    BlockQ4K {
        d: r.scale(),
        dmin: r.scale(),
        scales: r.bytes(),
        qs: r.bytes(),
    }
}
fn rand_q5k(r: &mut Rng) -> BlockQ5K {
    BlockQ5K {
        d: r.scale(),
        dmin: r.scale(),
        scales: r.bytes(),
        qh: r.bytes(),
        qs: r.bytes(),
    }
}
fn rand_q6k(r: &mut Rng) -> BlockQ6K {
    let s: [u8; 16] = r.bytes();
    BlockQ6K {
        ql: r.bytes(),
        qh: r.bytes(),
        scales: s.map(|b| b as i8),
        d: r.scale(),
    }
}
fn rand_q8_0(r: &mut Rng) -> BlockQ8_0 {
    // ggml's activations stay in −127..=127; weights may hold −128 too.
    let q: [u8; 32] = r.bytes();
    BlockQ8_0 {
        d: r.scale(),
        qs: q.map(|b| b as i8),
    }
}
/// A Q8_K block made by the real quantizer from random activations (so bsums are consistent),
/// with occasional all-±127 extremes that stress saturation in maddubs-style kernels.
fn rand_q8k(r: &mut Rng) -> BlockQ8K {
    let x: Vec<f32> = (0..256).map(|_| r.normalish()).collect();
    let mut y = [BlockQ8K {
        d: 0.0,
        qs: [0; 256],
        bsums: [0; 16],
    }];
    act::quantize_q8k(&x, &mut y);
    if r.next().is_multiple_of(8) {
        let s = if r.next().is_multiple_of(2) {
            127
        } else {
            -127
        };
        y[0].qs = [s; 256];
        y[0].bsums = [16 * s as i16; 16];
    }
    y[0]
}
fn rand_f32s(r: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.normalish()).collect()
}

// ---------------------------------------------------------------------------------------------
// activation quantization against ggml's bytes

#[test]
fn q8k_activation_quantization_matches_ggml_bytes() {
    let x = f32s(&fixture("activations.f32"));
    for t in ["q4_k", "q5_k", "q6_k"] {
        let expect = fixture(&format!("{t}.act_quant.bin"));
        let mut out = vec![
            BlockQ8K {
                d: 0.0,
                qs: [0; 256],
                bsums: [0; 16]
            };
            ROWS * COLS / 256
        ];
        act::quantize_q8k(&x, &mut out);
        let got: Vec<u8> = out.iter().flat_map(q8k_bytes).collect();
        assert_eq!(got.len(), expect.len());
        if let Some(i) = got.iter().zip(&expect).position(|(a, b)| a != b) {
            panic!("{t}: first differing byte {i} (block {})", i / 292);
        }
    }
}

#[test]
fn q8_0_activation_quantization_matches_ggml_cpu_path() {
    let x = f32s(&fixture("activations.f32"));
    let expect = fixture("q8_0.act_quant.bin");
    let mut out = vec![
        BlockQ8_0 {
            d: f16::ZERO,
            qs: [0; 32]
        };
        ROWS * COLS / 32
    ];
    act::quantize_q8_0(&x, &mut out);
    let got: Vec<u8> = out.iter().flat_map(q8_0_bytes).collect();
    assert_eq!(
        got, expect,
        "CPU-path (127/amax, round-half-even) Q8_0 differs from ggml"
    );

    // The fixture has no exact ties, so ggml's reference quantizer (the one that writes Q8_0
    // weight files) reproduces it as well...
    BlockQ8_0::from_float(&x, &mut out);
    let reference: Vec<u8> = out.iter().flat_map(q8_0_bytes).collect();
    assert_eq!(reference, expect, "reference Q8_0 differs from ggml");
    // ...but the two differ on ties: with amax = 127 the multiplier is 1 and x.5 values are
    // ties; the CPU path (kept: it is what llama.cpp runs on x86) rounds them to even.
    let mut x = [0.0f32; 32];
    x[..5].copy_from_slice(&[127.0, 0.5, 1.5, 2.5, -0.5]);
    let mut b = [BlockQ8_0 {
        d: f16::ZERO,
        qs: [0; 32],
    }];
    act::quantize_q8_0(&x, &mut b);
    assert_eq!(b[0].qs[..5], [127, 0, 2, 2, 0]);
    BlockQ8_0::from_float(&x, &mut b);
    assert_eq!(b[0].qs[..5], [127, 1, 2, 3, -1]);
}

#[test]
fn q8k_quantizer_edge_cases() {
    // All zeros: d = 0 and everything zero.
    let mut y = [BlockQ8K {
        d: 1.0,
        qs: [5; 256],
        bsums: [3; 16],
    }];
    act::quantize_q8k(&[0.0; 256], &mut y);
    assert_eq!((y[0].d, y[0].qs, y[0].bsums), (0.0, [0; 256], [0; 16]));
    // Ties on magnitude: the first element sets the sign of the scale.
    let mut x = [0.25f32; 256];
    x[3] = -2.0;
    x[200] = 2.0;
    act::quantize_q8k(&x, &mut y);
    // iscale = −127/max maps the kept element to −127, so d = −max/127 carries its sign.
    assert_eq!((y[0].qs[3], y[0].qs[200]), (-127, 127));
    assert!(y[0].d > 0.0);
    x[3] = 2.0;
    x[200] = -2.0;
    act::quantize_q8k(&x, &mut y);
    assert_eq!((y[0].qs[3], y[0].qs[200]), (-127, 127));
    assert!(y[0].d < 0.0);
    assert_eq!(
        y[0].bsums[0],
        y[0].qs[..16].iter().map(|&q| q as i16).sum::<i16>()
    );
}

// ---------------------------------------------------------------------------------------------
// every level's kernels, gathered per level from the per-format tables

/// The dot kernels of every format at one level.
struct Kernels {
    isa: Isa,
    level: Level,
    q4k_q8k: DotFn<BlockQ4K, BlockQ8K>,
    q5k_q8k: DotFn<BlockQ5K, BlockQ8K>,
    q6k_q8k: DotFn<BlockQ6K, BlockQ8K>,
    q8_0_q8_0: DotFn<BlockQ8_0, BlockQ8_0>,
    f16_f32: DotFn<f16, f32>,
    bf16_f32: DotFn<bf16, f32>,
    f32_f32: DotFn<f32, f32>,
    tile: Option<&'static TileKernels>,
}

/// The tile kernels of every format at one level.
struct TileKernels {
    pack_q4k: fn(&[BlockQ4K], &mut [KPacked]),
    pack_q5k: fn(&[BlockQ5K], &mut [KPacked]),
    pack_q6k: fn(&[BlockQ6K], &mut [KPacked]),
    pack_q8_0: fn(&[BlockQ8_0], &mut [Q8_0Packed]),
    kq: GemmFn<KPacked, Q8KTile>,
    q8_0: GemmFn<Q8_0Packed, Q8_0Tile>,
    f16: GemmFn<f16, f32>,
    bf16: GemmFn<bf16, f32>,
    f32: GemmFn<f32, f32>,
}

fn packed<W: WeightFormat>(l: Level) -> Option<(PackFn<W>, PackedGemmFn<W>)> {
    match W::kernels(l).tile? {
        Tile::Packed { pack, gemm } => Some((pack, gemm)),
        Tile::Outer { .. } => panic!("{} tile kernels take packed rows", W::TYPE),
    }
}

fn direct<W: WeightFormat>(l: Level) -> Option<GemmFn<W, W::Act>> {
    match W::kernels(l).tile? {
        // The outer-product tiles' equality with `few` is batch.rs's to check.
        Tile::Outer { few, .. } => Some(few),
        Tile::Packed { .. } => panic!("{} tile kernels take rows as stored", W::TYPE),
    }
}

/// The kernels of `isa`, or `None` if this CPU cannot run it.
fn kernels_for(isa: Isa) -> Option<&'static Kernels> {
    let l = isa.level()?;
    let tile = match (
        packed::<BlockQ4K>(l),
        packed::<BlockQ5K>(l),
        packed::<BlockQ6K>(l),
        packed::<BlockQ8_0>(l),
        direct::<f16>(l),
        direct::<bf16>(l),
        direct::<f32>(l),
    ) {
        (Some(q4), Some(q5), Some(q6), Some(q8), Some(f16), Some(bf16), Some(f32)) => {
            // One K-quant gemm serves all three K formats.
            assert!(q4.1 as usize == q5.1 as usize && q5.1 as usize == q6.1 as usize);
            Some(&*Box::leak(Box::new(TileKernels {
                pack_q4k: q4.0,
                pack_q5k: q5.0,
                pack_q6k: q6.0,
                pack_q8_0: q8.0,
                kq: q4.1,
                q8_0: q8.1,
                f16,
                bf16,
                f32,
            })))
        }
        (None, None, None, None, None, None, None) => None,
        _ => panic!("{isa}: tile kernels for some formats only"),
    };
    Some(Box::leak(Box::new(Kernels {
        isa,
        level: l,
        q4k_q8k: BlockQ4K::kernels(l).dot,
        q5k_q8k: BlockQ5K::kernels(l).dot,
        q6k_q8k: BlockQ6K::kernels(l).dot,
        q8_0_q8_0: BlockQ8_0::kernels(l).dot,
        f16_f32: f16::kernels(l).dot,
        bf16_f32: bf16::kernels(l).dot,
        f32_f32: f32::kernels(l).dot,
        tile,
    })))
}

// ---------------------------------------------------------------------------------------------
// every variant against ggml's dot products

fn all_kernels() -> Vec<&'static Kernels> {
    let v: Vec<_> = available_isas()
        .into_iter()
        .filter_map(kernels_for)
        .collect();
    assert!(v.iter().any(|k| k.isa == Isa::Scalar));
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

#[test]
fn kernels_match_ggml_dot_products() {
    let kq = |t: &str| {
        (
            fixture(&format!("{t}.quant.bin")),
            fixture(&format!("{t}.act_quant.bin")),
            f32s(&fixture(&format!("{t}.dot.f32"))),
            f32s(&fixture(&format!("{t}.dequant.f32"))),
        )
    };
    for k in all_kernels() {
        for t in ["q4_k", "q5_k", "q6_k", "q8_0", "f16"] {
            let (wq, aq, dots, deq) = kq(t);
            let (wrb, arb) = (wq.len() / ROWS, aq.len() / ROWS);
            for r in 0..ROWS {
                let (wr, ar) = (&wq[r * wrb..(r + 1) * wrb], &aq[r * arb..(r + 1) * arb]);
                // Σ|w·a| with the dequantized weights and activations, for the tolerance.
                let (got, a_deq): (f32, Vec<f32>) = match t {
                    "q4_k" | "q5_k" | "q6_k" => {
                        let a: Vec<BlockQ8K> = ar.chunks_exact(292).map(parse_q8k).collect();
                        let a_deq = a
                            .iter()
                            .flat_map(|b| b.qs.map(|q| q as f32 * b.d))
                            .collect::<Vec<_>>();
                        let got = match t {
                            "q4_k" => {
                                let w: Vec<_> = wr.chunks_exact(144).map(parse_q4k).collect();
                                (k.q4k_q8k)(&w, &a)
                            }
                            "q5_k" => {
                                let w: Vec<_> = wr.chunks_exact(176).map(parse_q5k).collect();
                                (k.q5k_q8k)(&w, &a)
                            }
                            _ => {
                                let w: Vec<_> = wr.chunks_exact(210).map(parse_q6k).collect();
                                (k.q6k_q8k)(&w, &a)
                            }
                        };
                        (got, a_deq)
                    }
                    "q8_0" => {
                        let w: Vec<_> = wr.chunks_exact(34).map(parse_q8_0).collect();
                        let a: Vec<_> = ar.chunks_exact(34).map(parse_q8_0).collect();
                        let a_deq = a
                            .iter()
                            .flat_map(|b| b.qs.map(|q| q as f32 * b.d.to_f32()))
                            .collect();
                        ((k.q8_0_q8_0)(&w, &a), a_deq)
                    }
                    _ => {
                        // ggml multiplied f16 activations; feed them to F16·F32 as f32.
                        let w = parse_f16s(wr);
                        let a: Vec<f32> = parse_f16s(ar).iter().map(|v| v.to_f32()).collect();
                        ((k.f16_f32)(&w, &a), a)
                    }
                };
                let wd = &deq[r * COLS..(r + 1) * COLS];
                let abs_sum: f32 = wd.iter().zip(&a_deq).map(|(w, a)| (w * a).abs()).sum();
                check_close(
                    &format!("{} {t} row {r}", k.isa),
                    got,
                    dots[r],
                    abs_sum,
                    1e-4,
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SIMD variants against the scalar reference on random data

/// Σ|terms| the kernels add up for one row pair: Σ_l (|scaled part_l| + |min part_l|)·|a_l|,
/// from the dequantizers (`to_float`) applied to the blocks with the min (or the scale) zeroed.
/// Variants may differ by float summation order, i.e. by a few ulps of this magnitude, not of
/// the (possibly much smaller, cancelled) result.
fn mag_kq<B: BlockFormat>(w: &[B], a: &[BlockQ8K], split: impl Fn(&B) -> (B, Option<B>)) -> f32 {
    let mut s = 0.0f32;
    for (x, y) in w.iter().zip(a) {
        let (scaled, min) = split(x);
        let mut v = [0.0f32; 256];
        let mut m = [0.0f32; 256];
        B::to_float(&[scaled], &mut v);
        if let Some(min) = min {
            B::to_float(&[min], &mut m);
        }
        for l in 0..256 {
            s += (v[l].abs() + m[l].abs()) * (y.qs[l] as f32 * y.d).abs();
        }
    }
    s
}
fn mag_q4k(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    let split = |x: &BlockQ4K| {
        (
            BlockQ4K {
                dmin: f16::ZERO,
                ..*x
            },
            Some(BlockQ4K { d: f16::ZERO, ..*x }),
        )
    };
    mag_kq(w, a, split)
}
fn mag_q5k(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
    let split = |x: &BlockQ5K| {
        (
            BlockQ5K {
                dmin: f16::ZERO,
                ..*x
            },
            Some(BlockQ5K { d: f16::ZERO, ..*x }),
        )
    };
    mag_kq(w, a, split)
}
fn mag_q6k(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    mag_kq(w, a, |x| (*x, None))
}
fn mag_q8_0(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
    let block = |x: &BlockQ8_0, y: &BlockQ8_0| {
        let s: i32 =
            x.qs.iter()
                .zip(&y.qs)
                .map(|(&p, &q)| (p as i32 * q as i32).abs())
                .sum();
        (x.d.to_f32() * y.d.to_f32()).abs() * s as f32
    };
    w.iter().zip(a).map(|(x, y)| block(x, y)).sum()
}
fn mag_float(w: impl Iterator<Item = f32>, a: &[f32]) -> f32 {
    w.zip(a).map(|(w, a)| (w * a).abs()).sum()
}

/// Block counts covering 1, odd counts and tails of unrolled loops.
const NBLOCKS: [usize; 9] = [1, 2, 3, 4, 5, 7, 8, 13, 16];

fn scalar() -> &'static Kernels {
    kernels_for(Isa::Scalar).unwrap()
}

/// The integer part of every K-quant kernel is exact, so variants differ only in how the
/// per-superblock float terms are summed.
#[test]
fn simd_kquants_equal_scalar_on_random_blocks() {
    let mut r = Rng(1);
    let s = scalar();
    for k in all_kernels() {
        for &n in &NBLOCKS {
            for _ in 0..20 {
                let a: Vec<_> = (0..n).map(|_| rand_q8k(&mut r)).collect();
                let w4: Vec<_> = (0..n).map(|_| rand_q4k(&mut r)).collect();
                let w5: Vec<_> = (0..n).map(|_| rand_q5k(&mut r)).collect();
                let w6: Vec<_> = (0..n).map(|_| rand_q6k(&mut r)).collect();
                let cases = [
                    (
                        "q4k",
                        (k.q4k_q8k)(&w4, &a),
                        (s.q4k_q8k)(&w4, &a),
                        mag_q4k(&w4, &a),
                    ),
                    (
                        "q5k",
                        (k.q5k_q8k)(&w5, &a),
                        (s.q5k_q8k)(&w5, &a),
                        mag_q5k(&w5, &a),
                    ),
                    (
                        "q6k",
                        (k.q6k_q8k)(&w6, &a),
                        (s.q6k_q8k)(&w6, &a),
                        mag_q6k(&w6, &a),
                    ),
                ];
                for (name, got, want, mag) in cases {
                    check_close(&format!("{} {name} n={n}", k.isa), got, want, mag, 1e-5);
                }
            }
        }
    }
}

/// `rows` (a level's many-rows kernel) against `dot` row by row: the same bits for every row.
fn check_rows<W: WeightFormat>(
    l: Level,
    what: &str,
    r: &mut Rng,
    rand: fn(&mut Rng) -> W,
    rand_act: fn(&mut Rng) -> W::Act,
) -> bool {
    let Some(rows) = W::rows_kernel(l) else {
        return false;
    };
    let dot = W::kernels(l).dot;
    // 65 blocks: longer than the AVX-512 K-quant row kernels keep on the stack. Up to 8 rows:
    // those kernels sum four rows a step, then the rest one by one.
    for &n in NBLOCKS.iter().chain(&[65]) {
        for nrows in [1, 2, 3, 4, 7, 8] {
            let a: Vec<_> = (0..n).map(|_| rand_act(r)).collect();
            let w: Vec<_> = (0..n * nrows).map(|_| rand(r)).collect();
            let mut out = vec![f32::NAN; nrows];
            rows(&w, &a, &mut out);
            for (i, (got, row)) in out.iter().zip(w.chunks_exact(n)).enumerate() {
                let want = dot(row, &a);
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{what}: row {i} of {nrows}, {n} blocks: rows kernel {got}, dot {want}"
                );
            }
        }
    }
    true
}

/// The many-rows kernels (decode: K-quants and Q8_0) give every row exactly the bits of the row dot, so
/// the matrix-vector path may use either.
#[test]
fn rows_kernels_equal_the_row_dot_bit_for_bit() {
    let mut r = Rng(5);
    for isa in available_isas() {
        let l = isa.level().unwrap();
        let have = [
            check_rows::<BlockQ4K>(l, &format!("{isa} q4k"), &mut r, rand_q4k, rand_q8k),
            check_rows::<BlockQ5K>(l, &format!("{isa} q5k"), &mut r, rand_q5k, rand_q8k),
            check_rows::<BlockQ6K>(l, &format!("{isa} q6k"), &mut r, rand_q6k, rand_q8k),
            check_rows::<BlockQ8_0>(l, &format!("{isa} q8_0"), &mut r, rand_q8_0, rand_q8_0),
        ];
        // The AVX-512 levels have them for all four formats, AVX2 for Q8_0 (so this test is
        // not vacuous there).
        let k = isa.has_avx512();
        let q8 = k || isa == Isa::Avx2;
        assert_eq!(
            have,
            [k, k, k, q8],
            "{isa}: which formats have a rows kernel"
        );
    }
}

#[test]
fn simd_q8_0_and_float_equal_scalar_on_random_data() {
    let mut r = Rng(2);
    let s = scalar();
    for k in all_kernels() {
        for &n in &NBLOCKS {
            for _ in 0..20 {
                let w: Vec<_> = (0..n).map(|_| rand_q8_0(&mut r)).collect();
                let x = rand_f32s(&mut r, n * 32);
                let mut a = vec![
                    BlockQ8_0 {
                        d: f16::ZERO,
                        qs: [0; 32]
                    };
                    n
                ];
                act::quantize_q8_0(&x, &mut a);
                let (got, want) = ((k.q8_0_q8_0)(&w, &a), (s.q8_0_q8_0)(&w, &a));
                let what = format!("{} q8_0 n={n}", k.isa);
                check_close(&what, got, want, mag_q8_0(&w, &a), 1e-5);
            }
            // Float kernels over lengths that are not multiples of any vector width.
            for len in [n, n * 16 + 1, n * 37 + 5, n * 64] {
                let wf = rand_f32s(&mut r, len);
                let a = rand_f32s(&mut r, len);
                let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
                let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
                let name = |t: &str| format!("{} {t} len={len}", k.isa);
                let mag = mag_float(wf.iter().copied(), &a);
                let (got, want) = ((k.f16_f32)(&wh, &a), (s.f16_f32)(&wh, &a));
                check_close(&name("f16"), got, want, mag, 1e-5);
                let (got, want) = ((k.bf16_f32)(&wb, &a), (s.bf16_f32)(&wb, &a));
                check_close(&name("bf16"), got, want, mag, 1e-5);
                let (got, want) = ((k.f32_f32)(&wf, &a), (s.f32_f32)(&wf, &a));
                check_close(&name("f32"), got, want, mag, 1e-5);
            }
        }
    }
}

#[test]
fn dispatch_is_one_of_the_available_levels() {
    let avail = available_isas();
    assert!(avail.contains(&cpu::isa()));
    assert_eq!(cpu::level().isa(), cpu::isa());
    for i in Isa::ALL {
        assert_eq!(Isa::from_name(i.name()), Some(i));
        assert_eq!(kernels_for(i).is_some(), avail.contains(&i));
    }
    assert_eq!(Isa::from_name("AVX2"), Some(Isa::Avx2));
    assert_eq!(Isa::from_name("sse9"), None);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512vnni") {
        // The machine this project targets: make sure the fast path is really exercised.
        assert!(avail.contains(&Isa::Avx512Vnni) && avail.contains(&Isa::Avx2));
    }
}

// ---------------------------------------------------------------------------------------------
// matmul against a naive loop

/// `bytes` copied to a 4-aligned position inside `buf` (safe: the offset is chosen).
fn aligned(buf: &mut Vec<u8>, bytes: &[u8]) -> std::ops::Range<usize> {
    buf.clear();
    buf.resize(bytes.len() + 4, 0);
    let off = buf.as_ptr().align_offset(4);
    buf[off..off + bytes.len()].copy_from_slice(bytes);
    off..off + bytes.len()
}

/// A random matmul problem and its naive answer.
struct Case {
    bytes: Vec<u8>,
    x: Vec<f32>,
    bias: Vec<f32>,
    /// `dot(W[r], quantized x[t])` by the scalar kernel, one call per (t, r), without bias.
    naive: Vec<f32>,
    /// The magnitude of the terms behind each naive value (see `mag_kq`).
    mag: Vec<f32>,
}

fn random_case(ty: GgmlType, rows: usize, cols: usize, n_tokens: usize, r: &mut Rng) -> Case {
    let x = rand_f32s(r, n_tokens * cols);
    let bias = rand_f32s(r, rows);
    let s = scalar();
    let nb = cols / ty.block_size();
    // Activations quantized the way matmul must do it: each token row on its own.
    let q8k: Vec<Vec<BlockQ8K>> = x
        .chunks(cols)
        .map(|xt| {
            let mut a = vec![
                BlockQ8K {
                    d: 0.0,
                    qs: [0; 256],
                    bsums: [0; 16]
                };
                cols / 256
            ];
            if ty.block_size() == 256 {
                act::quantize_q8k(xt, &mut a);
            }
            a
        })
        .collect();
    let q8_0: Vec<Vec<BlockQ8_0>> = x
        .chunks(cols)
        .map(|xt| {
            let mut a = vec![
                BlockQ8_0 {
                    d: f16::ZERO,
                    qs: [0; 32]
                };
                cols / 32
            ];
            if ty == GgmlType::Q8_0 {
                act::quantize_q8_0(xt, &mut a);
            }
            a
        })
        .collect();
    let mut c = Case {
        bytes: Vec::new(),
        x,
        bias,
        naive: vec![0.0; n_tokens * rows],
        mag: vec![0.0; n_tokens * rows],
    };
    for row in 0..rows {
        // (dot, magnitude) per token for this row.
        let res: Vec<(f32, f32)> = match ty {
            GgmlType::Q4K => {
                let w: Vec<_> = (0..nb).map(|_| rand_q4k(r)).collect();
                c.bytes.extend(blocks_as_bytes(&w));
                q8k.iter()
                    .map(|a| ((s.q4k_q8k)(&w, a), mag_q4k(&w, a)))
                    .collect()
            }
            GgmlType::Q5K => {
                let w: Vec<_> = (0..nb).map(|_| rand_q5k(r)).collect();
                c.bytes.extend(blocks_as_bytes(&w));
                q8k.iter()
                    .map(|a| ((s.q5k_q8k)(&w, a), mag_q5k(&w, a)))
                    .collect()
            }
            GgmlType::Q6K => {
                let w: Vec<_> = (0..nb).map(|_| rand_q6k(r)).collect();
                c.bytes.extend(blocks_as_bytes(&w));
                q8k.iter()
                    .map(|a| ((s.q6k_q8k)(&w, a), mag_q6k(&w, a)))
                    .collect()
            }
            GgmlType::Q8_0 => {
                let w: Vec<_> = (0..nb).map(|_| rand_q8_0(r)).collect();
                c.bytes.extend(blocks_as_bytes(&w));
                q8_0.iter()
                    .map(|a| ((s.q8_0_q8_0)(&w, a), mag_q8_0(&w, a)))
                    .collect()
            }
            GgmlType::F16 => {
                let w: Vec<f16> = rand_f32s(r, cols)
                    .iter()
                    .map(|&v| f16::from_f32(v))
                    .collect();
                c.bytes
                    .extend(w.iter().flat_map(|v| v.to_bits().to_le_bytes()));
                let m = |xt: &[f32]| mag_float(w.iter().map(|v| v.to_f32()), xt);
                c.x.chunks(cols)
                    .map(|xt| ((s.f16_f32)(&w, xt), m(xt)))
                    .collect()
            }
            GgmlType::BF16 => {
                let w: Vec<bf16> = rand_f32s(r, cols)
                    .iter()
                    .map(|&v| bf16::from_f32(v))
                    .collect();
                c.bytes
                    .extend(w.iter().flat_map(|v| v.to_bits().to_le_bytes()));
                let m = |xt: &[f32]| mag_float(w.iter().map(|v| v.to_f32()), xt);
                c.x.chunks(cols)
                    .map(|xt| ((s.bf16_f32)(&w, xt), m(xt)))
                    .collect()
            }
            GgmlType::F32 => {
                let w = rand_f32s(r, cols);
                c.bytes.extend(w.iter().flat_map(|v| v.to_le_bytes()));
                let m = |xt: &[f32]| mag_float(w.iter().copied(), xt);
                c.x.chunks(cols)
                    .map(|xt| ((s.f32_f32)(&w, xt), m(xt)))
                    .collect()
            }
            t => unreachable!("{t}"),
        };
        for (t, (d, m)) in res.into_iter().enumerate() {
            c.naive[t * rows + row] = d;
            c.mag[t * rows + row] = m;
        }
    }
    c
}

const MATMUL_TYPES: [GgmlType; 7] = [
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::Q8_0,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::F32,
];

#[test]
fn matmul_equals_naive_loop_for_ragged_shapes_and_thread_counts() {
    let mut r = Rng(3);
    let mut buf = Vec::new();
    let pools: Vec<_> = (1..=4)
        .map(|n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
        })
        .collect();
    for ty in MATMUL_TYPES {
        // Rows that are not multiples of any chunk or tile; 1..3 superblocks per row.
        for &(rows, cols) in &[(1usize, 256usize), (7, 512), (37, 256), (70, 768)] {
            for n_tokens in 1..=9 {
                let c = random_case(ty, rows, cols, n_tokens, &mut r);
                let range = aligned(&mut buf, &c.bytes);
                let w = QMatrix::new(ty, rows, cols, &buf[range]).expect("valid matrix");
                let use_bias = n_tokens % 2 == 1;
                for (threads, pool) in (1..).zip(&pools) {
                    for k in all_kernels() {
                        let mut y = vec![f32::NAN; n_tokens * rows];
                        let mut scratch = Scratch::default();
                        let bias = use_bias.then_some(&c.bias[..]);
                        pool.install(|| {
                            matmul_at(k.level, &w, &c.x, n_tokens, bias, &mut y, &mut scratch)
                        });
                        for (i, (&got, &want)) in y.iter().zip(&c.naive).enumerate() {
                            let b = if use_bias { c.bias[i % rows] } else { 0.0 };
                            let tol = 1e-5 * (c.mag[i] + b.abs()) + 1e-30;
                            assert!(
                                (got - (want + b)).abs() <= tol,
                                "{ty} {} rows={rows} cols={cols} T={n_tokens} threads={threads} y[{}, {}] = {got}, naive {}",
                                k.isa,
                                i / rows,
                                i % rows,
                                want + b
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A larger shape through the default (dispatched) path, with scratch reused across calls of
/// different shapes, as the model does.
#[test]
fn matmul_reuses_scratch_across_shapes() {
    let mut r = Rng(4);
    let mut buf = Vec::new();
    let mut scratch = Scratch::default();
    for (ty, rows, cols, n_tokens) in [
        (GgmlType::Q4K, 300, 1024, 17),
        (GgmlType::Q6K, 129, 512, 1),
        (GgmlType::Q8_0, 200, 1024, 33),
        (GgmlType::F16, 96, 1024, 12),
        (GgmlType::Q5K, 64, 2048, 3),
        // Enough tokens for the widened float path and long token loops.
        (GgmlType::F16, 101, 1024, 40),
        (GgmlType::BF16, 37, 544, 35),
        (GgmlType::F32, 18, 100, 33),
        (GgmlType::Q6K, 33, 256, 64),
        (GgmlType::Q8_0, 21, 800, 37),
        // Float rows longer than one column pass of the tile kernel, with a ragged tail.
        (GgmlType::F16, 20, 2080, 9),
        (GgmlType::F32, 9, 1500, 5),
    ] {
        let c = random_case(ty, rows, cols, n_tokens, &mut r);
        let range = aligned(&mut buf, &c.bytes);
        let w = QMatrix::new(ty, rows, cols, &buf[range]).unwrap();
        let mut y = vec![0.0; n_tokens * rows];
        ggpt_quant::matmul::matmul(&w, &c.x, n_tokens, Some(&c.bias), &mut y, &mut scratch);
        for (i, (&got, &want)) in y.iter().zip(&c.naive).enumerate() {
            let want = want + c.bias[i % rows];
            let tol = 1e-5 * (c.mag[i] + c.bias[i % rows].abs());
            assert!(
                (got - want).abs() <= tol,
                "{ty} y[{i}] = {got}, naive {want}"
            );
        }
    }
}

#[test]
fn q8k_quantizer_equals_the_reference_from_float() {
    // The dispatched activation quantizer against the format's reference `from_float`.
    let mut r = Rng(5);
    let mut x: Vec<f32> = (0..256 * 40).map(|_| r.normalish() * 3.0).collect();
    x[256..512].fill(0.0); // an all-zero block
    x[600] = 1e30; // one huge value
    for (i, v) in x[1024..1280].iter_mut().enumerate() {
        *v = (i % 7) as f32 * 0.5 - 1.5; // many exact ties
    }
    let mut ours = vec![
        BlockQ8K {
            d: 0.0,
            qs: [0; 256],
            bsums: [0; 16]
        };
        40
    ];
    let mut reference = ours.clone();
    act::quantize_q8k(&x, &mut ours);
    BlockQ8K::from_float(&x, &mut reference);
    for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
        assert_eq!((a.d.to_bits(), a.qs), (b.d.to_bits(), b.qs), "block {i}");
        if a.d != 0.0 {
            assert_eq!(a.bsums, b.bsums, "block {i}");
        }
    }
}

#[test]
fn qmatrix_rejects_bad_shapes() {
    let buf = vec![0u8; 4096];
    let off = buf.as_ptr().align_offset(4);
    let d = &buf[off..off + 144 * 2];
    assert!(QMatrix::new(GgmlType::Q4K, 2, 256, d).is_ok());
    assert!(QMatrix::new(GgmlType::Q4K, 3, 256, d).is_err());
    assert!(QMatrix::new(GgmlType::Q4K, 2, 255, d).is_err());
    assert!(QMatrix::new(GgmlType::Q4_0, 2, 256, d).is_err());
    assert!(QMatrix::new(GgmlType::Q4K, 0, 256, &d[..0]).is_err());
    let d = &buf[off + 1..off + 1 + 144 * 2];
    assert!(
        QMatrix::new(GgmlType::Q4K, 2, 256, d).is_err(),
        "misaligned data accepted"
    );
}

#[test]
fn scalar_f16_conversion_is_exact_for_every_bit_pattern() {
    for b in 0..=u16::MAX {
        let want = f16::from_bits(b).to_f32();
        let got = ggpt_quant::dot::scalar::f16_bits_to_f32(b);
        if want.is_nan() {
            assert!(got.is_nan(), "{b:#06x}");
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "{b:#06x}");
        }
    }
}

/// `GGPT_ISA` is read once per process, so each level is checked in a child process running
/// just this test.
#[test]
fn ggpt_isa_env_forces_an_available_level() {
    if let Ok(want) = std::env::var("GGPT_ISA_EXPECT") {
        assert_eq!(cpu::isa().name(), want);
        assert_eq!(cpu::level().isa().name(), want);
        return;
    }
    let best = *available_isas().last().unwrap();
    let mut cases: Vec<(String, Isa)> = available_isas()
        .into_iter()
        .map(|i| (i.name().to_string(), i))
        .collect();
    cases.push(("no-such-isa".into(), best)); // unknown names keep the best level
    cases.push((
        "AVX2 ".into(),
        if available_isas().contains(&Isa::Avx2) {
            Isa::Avx2
        } else {
            best
        },
    ));
    // Under user-mode emulation (tests/neon.sh runs the aarch64 build with qemu-aarch64) the
    // host cannot exec this binary itself, so the child goes through the same emulator.
    let runner = std::env::var("GGPT_TEST_RUNNER").unwrap_or_default();
    let runner: Vec<&str> = runner.split_whitespace().collect();
    for (env, want) in cases {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = match runner.split_first() {
            Some((prog, args)) => {
                let mut c = std::process::Command::new(prog);
                c.args(args).arg(exe);
                c
            }
            None => std::process::Command::new(exe),
        };
        let out = cmd
            .args([
                "--exact",
                "ggpt_isa_env_forces_an_available_level",
                "--test-threads=1",
            ])
            .env("GGPT_ISA", &env)
            .env("GGPT_ISA_EXPECT", want.name())
            .output()
            .expect("run child test");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "GGPT_ISA={env:?} did not select {want}: {stdout}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Prefill tile kernels (`TileKernels`) of every level that has them, called directly.

use ggpt_quant::act::{Q8KTile, Q8_0Tile};
use ggpt_quant::dot::{KPacked, Q8_0Packed};

/// (level, its tile kernels) for every available level that has tile kernels.
fn tile_levels() -> Vec<(Isa, &'static TileKernels)> {
    let v: Vec<_> = all_kernels()
        .into_iter()
        .filter_map(|k| k.tile.map(|t| (k.isa, t)))
        .collect();
    #[cfg(target_arch = "x86_64")]
    if available_isas().contains(&Isa::Avx2) {
        // Prefill on AVX2-only CPUs must not fall back to row-by-row dots.
        assert!(
            v.iter().any(|(i, _)| *i == Isa::Avx2),
            "AVX2 has no tile kernels"
        );
    }
    v
}

/// `rows` (each `n` blocks) packed with `pack` and multiplied by `tokens` (each `n` Q8_K
/// blocks) with the K-quant tile kernel; result `[token][row]`.
fn tile_kq<B>(
    tk: &TileKernels,
    pack: fn(&[B], &mut [KPacked]),
    rows: &[Vec<B>],
    tokens: &[Vec<BlockQ8K>],
    bias: Option<&[f32]>,
) -> Vec<Vec<f32>> {
    let n = tokens[0].len();
    let mut w = vec![KPacked::ZERO; rows.len() * n];
    for (row, p) in rows.iter().zip(w.chunks_exact_mut(n)) {
        pack(row, p);
    }
    let a: Vec<Q8KTile> = tokens.iter().flatten().map(Q8KTile::from_block).collect();
    let mut out = vec![vec![f32::NAN; rows.len()]; tokens.len()];
    let mut outs: Vec<&mut [f32]> = out.iter_mut().map(|o| o.as_mut_slice()).collect();
    (tk.kq)(&w, &a, n, bias, &mut outs);
    out
}

/// Q8_0 rows × token rows `x` (quantized with `act::quantize_q8_0_tile`); `[token][row]`.
fn tile_q8_0(
    tk: &TileKernels,
    rows: &[Vec<BlockQ8_0>],
    x: &[Vec<f32>],
    bias: Option<&[f32]>,
) -> Vec<Vec<f32>> {
    let nt = act::q8_0_tiles(rows[0].len());
    let mut w = vec![Q8_0Packed::ZERO; rows.len() * nt];
    for (row, p) in rows.iter().zip(w.chunks_exact_mut(nt)) {
        (tk.pack_q8_0)(row, p);
    }
    let mut a = vec![Q8_0Tile::ZERO; x.len() * nt];
    for (xt, at) in x.iter().zip(a.chunks_exact_mut(nt)) {
        act::quantize_q8_0_tile(xt, at);
    }
    let mut out = vec![vec![f32::NAN; rows.len()]; x.len()];
    let mut outs: Vec<&mut [f32]> = out.iter_mut().map(|o| o.as_mut_slice()).collect();
    (tk.q8_0)(&w, &a, nt, bias, &mut outs);
    out
}

/// A float gemm over `rows` weight rows and `x` token rows; `[token][row]`.
fn tile_float<E: Copy>(
    gemm: GemmFn<E, f32>,
    rows: &[Vec<E>],
    x: &[Vec<f32>],
    bias: Option<&[f32]>,
) -> Vec<Vec<f32>> {
    let n = x[0].len();
    let w: Vec<E> = rows.iter().flatten().copied().collect();
    let a: Vec<f32> = x.iter().flatten().copied().collect();
    let mut out = vec![vec![f32::NAN; rows.len()]; x.len()];
    let mut outs: Vec<&mut [f32]> = out.iter_mut().map(|o| o.as_mut_slice()).collect();
    gemm(&w, &a, n, bias, &mut outs);
    out
}

/// Q8_K activations with d = 1 and values in `lo..=hi` (bsums consistent).
fn q8k_ints(r: &mut Rng, lo: i32, hi: i32) -> BlockQ8K {
    let span = (hi - lo + 1) as u64;
    let qs: [i8; 256] = std::array::from_fn(|_| (lo + (r.next() % span) as i32) as i8);
    let bsums = std::array::from_fn(|g| qs[16 * g..16 * g + 16].iter().map(|&q| q as i16).sum());
    BlockQ8K { d: 1.0, qs, bsums }
}

/// Q4_K/Q5_K scale bytes whose eight 6-bit scales and mins are all 1.
const UNIT_K4_SCALES: [u8; 12] = [1, 1, 1, 1, 1, 1, 1, 1, 0x11, 0x11, 0x11, 0x11];

/// With every scale a power of two (weights d = dmin = 1, activations d = 1) and sums below
/// 2²⁴, every partial sum is an integer that f32 holds exactly, whatever the summation order:
/// the tile kernels must then give the scalar reference's result bit for bit. This pins the
/// integer parts (no saturated `vpmaddubsw` pair, no dropped lane or group), including the
/// extremes: weights at their largest value with activations of −128 and 127.
#[test]
fn tile_kernels_integer_parts_are_exact() {
    let one = f16::from_f32(1.0);
    let mut r = Rng(21);
    let s = scalar();
    for (isa, tk) in tile_levels() {
        for n in 1..=3usize {
            for n_rows in [1usize, 2, 5, 7] {
                let n_tok = 1 + (r.next() % 9) as usize;
                // Random case: full-range weight bytes, scales ≤ 63 (Q6_K |sc| ≤ 32),
                // activations in −8..=8: |Σ| ≤ 3·63·31·8·256 < 2²⁴.
                // Extreme case: every weight at its maximum, unit scales, activations all −128
                // or all 127 (|Σ| ≤ 3·63·128·256 < 2²⁴).
                for extreme in [false, true] {
                    let tokens: Vec<Vec<BlockQ8K>> = (0..n_tok)
                        .map(|t| {
                            (0..n)
                                .map(|_| match (extreme, t % 2) {
                                    (false, _) => q8k_ints(&mut r, -8, 8),
                                    (true, 0) => q8k_ints(&mut r, -128, -128),
                                    (true, _) => q8k_ints(&mut r, 127, 127),
                                })
                                .collect()
                        })
                        .collect();
                    let bias: Vec<f32> = (0..n_rows).map(|i| i as f32 - 2.0).collect();
                    let k4 = |r: &mut Rng| BlockQ4K {
                        d: one,
                        dmin: one,
                        scales: if extreme { UNIT_K4_SCALES } else { r.bytes() },
                        qs: if extreme { [0xff; 128] } else { r.bytes() },
                    };
                    let w4: Vec<Vec<_>> = (0..n_rows)
                        .map(|_| (0..n).map(|_| k4(&mut r)).collect())
                        .collect();
                    let w5: Vec<Vec<_>> = (0..n_rows)
                        .map(|_| {
                            (0..n)
                                .map(|_| {
                                    let b = k4(&mut r);
                                    BlockQ5K {
                                        d: b.d,
                                        dmin: b.dmin,
                                        scales: b.scales,
                                        qh: if extreme { [0xff; 32] } else { r.bytes() },
                                        qs: b.qs,
                                    }
                                })
                                .collect()
                        })
                        .collect();
                    let w6: Vec<Vec<_>> = (0..n_rows)
                        .map(|_| {
                            (0..n)
                                .map(|_| {
                                    let sc: [u8; 16] = r.bytes();
                                    BlockQ6K {
                                        ql: if extreme { [0xff; 128] } else { r.bytes() },
                                        qh: if extreme { [0xff; 64] } else { r.bytes() },
                                        scales: if extreme {
                                            [1; 16] // one sign: uniform errors must not cancel
                                        } else {
                                            sc.map(|b| (b as i8) >> 2)
                                        },
                                        d: one,
                                    }
                                })
                                .collect()
                        })
                        .collect();
                    let got = [
                        tile_kq(tk, tk.pack_q4k, &w4, &tokens, Some(&bias)),
                        tile_kq(tk, tk.pack_q5k, &w5, &tokens, Some(&bias)),
                        tile_kq(tk, tk.pack_q6k, &w6, &tokens, Some(&bias)),
                    ];
                    for (t, a) in tokens.iter().enumerate() {
                        for row in 0..n_rows {
                            let want = [
                                (s.q4k_q8k)(&w4[row], a),
                                (s.q5k_q8k)(&w5[row], a),
                                (s.q6k_q8k)(&w6[row], a),
                            ];
                            for (f, name) in ["q4k", "q5k", "q6k"].iter().enumerate() {
                                assert_eq!(
                                    got[f][t][row],
                                    want[f] + bias[row],
                                    "{isa} {name} extreme={extreme} n={n} rows={n_rows} token {t} row {row}"
                                );
                            }
                        }
                    }
                }
            }
        }
        // Q8_0: weights over the full i8 range (with −128), activations that quantize to
        // themselves (integers with a ±127 in every block, so d = 1): |Σ| ≤ 32·32·128·127
        // < 2²⁴. Block counts around the 16-block tile (padding lanes, two tiles).
        for nb in [1usize, 15, 16, 17, 32] {
            let n_rows = 1 + (r.next() % 7) as usize;
            let n_tok = 1 + (r.next() % 9) as usize;
            let rows: Vec<Vec<BlockQ8_0>> = (0..n_rows)
                .map(|i| {
                    (0..nb)
                        .map(|_| {
                            let mut b = rand_q8_0(&mut r);
                            b.d = one;
                            if i == 0 {
                                b.qs = [-128; 32]; // the largest |w|
                            }
                            b
                        })
                        .collect()
                })
                .collect();
            let x: Vec<Vec<f32>> = (0..n_tok)
                .map(|_| {
                    let mut v: Vec<f32> = (0..nb * 32)
                        .map(|_| (r.next() % 255) as f32 - 127.0)
                        .collect();
                    for blk in v.chunks_mut(32) {
                        blk[(r.next() % 32) as usize] = if r.next().is_multiple_of(2) {
                            127.0
                        } else {
                            -127.0
                        };
                    }
                    v
                })
                .collect();
            let bias: Vec<f32> = (0..n_rows).map(|i| 3.0 * i as f32).collect();
            let got = tile_q8_0(tk, &rows, &x, Some(&bias));
            for (t, xt) in x.iter().enumerate() {
                let mut a = vec![
                    BlockQ8_0 {
                        d: f16::ZERO,
                        qs: [0; 32]
                    };
                    nb
                ];
                act::quantize_q8_0(xt, &mut a);
                assert!(
                    a.iter().all(|b| b.d == one),
                    "test activations must have d = 1"
                );
                for (row, w) in rows.iter().enumerate() {
                    let want = (s.q8_0_q8_0)(w, &a) + bias[row];
                    assert_eq!(got[t][row], want, "{isa} q8_0 nb={nb} token {t} row {row}");
                }
            }
        }
        // Float gemms with small integers: exact sums, over column counts with every tail
        // length of an 8- or 16-wide loop.
        for cols in [1usize, 7, 8, 9, 15, 16, 17, 31, 100, 257] {
            let n_rows = 1 + (r.next() % 8) as usize;
            let n_tok = 1 + (r.next() % 9) as usize;
            let int = |r: &mut Rng| (r.next() % 17) as f32 - 8.0;
            let wf: Vec<Vec<f32>> = (0..n_rows)
                .map(|_| (0..cols).map(|_| int(&mut r)).collect())
                .collect();
            let x: Vec<Vec<f32>> = (0..n_tok)
                .map(|_| (0..cols).map(|_| int(&mut r)).collect())
                .collect();
            let wh: Vec<Vec<f16>> = wf
                .iter()
                .map(|w| w.iter().map(|&v| f16::from_f32(v)).collect())
                .collect();
            let wb: Vec<Vec<bf16>> = wf
                .iter()
                .map(|w| w.iter().map(|&v| bf16::from_f32(v)).collect())
                .collect();
            let got = [
                tile_float(tk.f16, &wh, &x, None),
                tile_float(tk.bf16, &wb, &x, None),
                tile_float(tk.f32, &wf, &x, None),
            ];
            for (t, xt) in x.iter().enumerate() {
                for row in 0..n_rows {
                    let want = (s.f32_f32)(&wf[row], xt);
                    for (g, name) in got.iter().zip(["f16", "bf16", "f32"]) {
                        assert_eq!(
                            g[t][row], want,
                            "{isa} {name} cols={cols} token {t} row {row}"
                        );
                    }
                }
            }
        }
    }
}

/// Realistic scales: the tile kernels equal the scalar dots (plus bias) up to float summation
/// order, i.e. within 1e-5 of the magnitude of the summed terms.
#[test]
fn tile_kernels_equal_scalar_dots_on_random_data() {
    let mut r = Rng(22);
    let s = scalar();
    for (isa, tk) in tile_levels() {
        for n in 1..=3usize {
            for n_tok in 1..=9usize {
                let n_rows = 1 + (r.next() % 9) as usize;
                let tokens: Vec<Vec<BlockQ8K>> = (0..n_tok)
                    .map(|_| (0..n).map(|_| rand_q8k(&mut r)).collect())
                    .collect();
                let bias = rand_f32s(&mut r, n_rows);
                let w4: Vec<Vec<_>> = (0..n_rows)
                    .map(|_| (0..n).map(|_| rand_q4k(&mut r)).collect())
                    .collect();
                let w5: Vec<Vec<_>> = (0..n_rows)
                    .map(|_| (0..n).map(|_| rand_q5k(&mut r)).collect())
                    .collect();
                let w6: Vec<Vec<_>> = (0..n_rows)
                    .map(|_| (0..n).map(|_| rand_q6k(&mut r)).collect())
                    .collect();
                let got4 = tile_kq(tk, tk.pack_q4k, &w4, &tokens, Some(&bias));
                let got5 = tile_kq(tk, tk.pack_q5k, &w5, &tokens, Some(&bias));
                let got6 = tile_kq(tk, tk.pack_q6k, &w6, &tokens, None);
                for (t, a) in tokens.iter().enumerate() {
                    for row in 0..n_rows {
                        let b = bias[row];
                        let what =
                            |f: &str| format!("{isa} {f} n={n} T={n_tok} token {t} row {row}");
                        let mag4 = mag_q4k(&w4[row], a) + b.abs();
                        check_close(
                            &what("q4k"),
                            got4[t][row],
                            (s.q4k_q8k)(&w4[row], a) + b,
                            mag4,
                            1e-5,
                        );
                        let mag5 = mag_q5k(&w5[row], a) + b.abs();
                        check_close(
                            &what("q5k"),
                            got5[t][row],
                            (s.q5k_q8k)(&w5[row], a) + b,
                            mag5,
                            1e-5,
                        );
                        let mag6 = mag_q6k(&w6[row], a);
                        check_close(
                            &what("q6k"),
                            got6[t][row],
                            (s.q6k_q8k)(&w6[row], a),
                            mag6,
                            1e-5,
                        );
                    }
                }
            }
        }
        for nb in [1usize, 5, 16, 17, 40] {
            for n_tok in [1usize, 4, 6, 9] {
                let n_rows = 1 + (r.next() % 9) as usize;
                let rows: Vec<Vec<BlockQ8_0>> = (0..n_rows)
                    .map(|_| (0..nb).map(|_| rand_q8_0(&mut r)).collect())
                    .collect();
                let x: Vec<Vec<f32>> = (0..n_tok).map(|_| rand_f32s(&mut r, nb * 32)).collect();
                let got = tile_q8_0(tk, &rows, &x, None);
                for (t, xt) in x.iter().enumerate() {
                    let mut a = vec![
                        BlockQ8_0 {
                            d: f16::ZERO,
                            qs: [0; 32]
                        };
                        nb
                    ];
                    act::quantize_q8_0(xt, &mut a);
                    for (row, w) in rows.iter().enumerate() {
                        let what = format!("{isa} q8_0 nb={nb} T={n_tok} token {t} row {row}");
                        check_close(
                            &what,
                            got[t][row],
                            (s.q8_0_q8_0)(w, &a),
                            mag_q8_0(w, &a),
                            1e-5,
                        );
                    }
                }
            }
        }
        for cols in [3usize, 64, 100, 1031] {
            for n_tok in [1usize, 3, 4, 5, 9] {
                let n_rows = 1 + (r.next() % 10) as usize;
                let wf: Vec<Vec<f32>> = (0..n_rows).map(|_| rand_f32s(&mut r, cols)).collect();
                let x: Vec<Vec<f32>> = (0..n_tok).map(|_| rand_f32s(&mut r, cols)).collect();
                let bias = rand_f32s(&mut r, n_rows);
                let wh: Vec<Vec<f16>> = wf
                    .iter()
                    .map(|w| w.iter().map(|&v| f16::from_f32(v)).collect())
                    .collect();
                let wb: Vec<Vec<bf16>> = wf
                    .iter()
                    .map(|w| w.iter().map(|&v| bf16::from_f32(v)).collect())
                    .collect();
                let gh = tile_float(tk.f16, &wh, &x, Some(&bias));
                let gb = tile_float(tk.bf16, &wb, &x, Some(&bias));
                let gf = tile_float(tk.f32, &wf, &x, Some(&bias));
                for (t, xt) in x.iter().enumerate() {
                    for row in 0..n_rows {
                        let b = bias[row];
                        let what = |f: &str| {
                            format!("{isa} {f} cols={cols} T={n_tok} token {t} row {row}")
                        };
                        let mag = mag_float(wf[row].iter().copied(), xt) + b.abs();
                        check_close(
                            &what("f16"),
                            gh[t][row],
                            (s.f16_f32)(&wh[row], xt) + b,
                            mag,
                            1e-5,
                        );
                        check_close(
                            &what("bf16"),
                            gb[t][row],
                            (s.bf16_f32)(&wb[row], xt) + b,
                            mag,
                            1e-5,
                        );
                        check_close(
                            &what("f32"),
                            gf[t][row],
                            (s.f32_f32)(&wf[row], xt) + b,
                            mag,
                            1e-5,
                        );
                    }
                }
            }
        }
    }
}

/// Every level packs weights into the layout documented on `KPacked` / `Q8_0Packed`, derived
/// here independently: the unsigned values from the dequantizer (with unit scales, d = 1 and
/// no min, `to_float` returns the quantized value itself; Q6_K's is offset by −32), the
/// factors from the scalar scale unpacking.
#[test]
fn tile_packing_matches_the_documented_layout() {
    let one = f16::from_f32(1.0);
    let mut r = Rng(23);
    // qs[64k + 4g + j] must be value 16g + 4k + j.
    let check_qs = |what: &str, p: &KPacked, vals: &[f32; 256]| {
        for g in 0..16 {
            for k in 0..4 {
                for j in 0..4 {
                    let want = vals[16 * g + 4 * k + j];
                    assert_eq!(
                        p.qs[64 * k + 4 * g + j] as f32,
                        want,
                        "{what}: group {g} dword {k} byte {j}"
                    );
                }
            }
        }
    };
    for (isa, tk) in tile_levels() {
        for _ in 0..20 {
            let x4 = [rand_q4k(&mut r), rand_q4k(&mut r)];
            let x5 = [rand_q5k(&mut r), rand_q5k(&mut r)];
            let x6 = [rand_q6k(&mut r), rand_q6k(&mut r)];
            let mut p = [KPacked::ZERO; 2];
            let mut vals = [0.0f32; 256];
            (tk.pack_q4k)(&x4, &mut p);
            for (x, p) in x4.iter().zip(&p) {
                BlockQ4K::to_float(
                    &[BlockQ4K {
                        d: one,
                        dmin: f16::ZERO,
                        scales: UNIT_K4_SCALES,
                        ..*x
                    }],
                    &mut vals,
                );
                check_qs(&format!("{isa} q4k"), p, &vals);
                let (sc, mn) = ggpt_quant::kscale::unpack_scales_mins(&x.scales);
                for g in 0..16 {
                    assert_eq!(
                        p.ws[g],
                        x.d.to_f32() * sc[g / 2] as f32,
                        "{isa} q4k ws[{g}]"
                    );
                    assert_eq!(
                        p.wm[g],
                        x.dmin.to_f32() * mn[g / 2] as f32,
                        "{isa} q4k wm[{g}]"
                    );
                }
            }
            (tk.pack_q5k)(&x5, &mut p);
            for (x, p) in x5.iter().zip(&p) {
                BlockQ5K::to_float(
                    &[BlockQ5K {
                        d: one,
                        dmin: f16::ZERO,
                        scales: UNIT_K4_SCALES,
                        ..*x
                    }],
                    &mut vals,
                );
                check_qs(&format!("{isa} q5k"), p, &vals);
                let (sc, mn) = ggpt_quant::kscale::unpack_scales_mins(&x.scales);
                for g in 0..16 {
                    assert_eq!(
                        p.ws[g],
                        x.d.to_f32() * sc[g / 2] as f32,
                        "{isa} q5k ws[{g}]"
                    );
                    assert_eq!(
                        p.wm[g],
                        x.dmin.to_f32() * mn[g / 2] as f32,
                        "{isa} q5k wm[{g}]"
                    );
                }
            }
            (tk.pack_q6k)(&x6, &mut p);
            for (x, p) in x6.iter().zip(&p) {
                BlockQ6K::to_float(
                    &[BlockQ6K {
                        d: one,
                        scales: [1; 16],
                        ..*x
                    }],
                    &mut vals,
                );
                check_qs(&format!("{isa} q6k"), p, &vals.map(|v| v + 32.0));
                for g in 0..16 {
                    let ws = x.d.to_f32() * x.scales[g] as f32;
                    assert_eq!(
                        (p.ws[g], p.wm[g]),
                        (ws, 32.0 * ws),
                        "{isa} q6k factors [{g}]"
                    );
                }
            }
        }
        // Q8_0: `w + 128` per block b in lane b, padding lanes w = 0 with d = 0.
        for nb in [1usize, 16, 21] {
            let row: Vec<BlockQ8_0> = (0..nb).map(|_| rand_q8_0(&mut r)).collect();
            let mut p = vec![Q8_0Packed::ZERO; act::q8_0_tiles(nb)];
            (tk.pack_q8_0)(&row, &mut p);
            for (i, tile) in p.iter().enumerate() {
                for b in 0..16 {
                    let blk = row.get(16 * i + b);
                    assert_eq!(tile.d[b], blk.map_or(0.0, |x| x.d.to_f32()), "{isa} q8_0 d");
                    for k in 0..8 {
                        for j in 0..4 {
                            let w = blk.map_or(0, |x| x.qs[4 * k + j] as i32);
                            assert_eq!(
                                tile.qs[64 * k + 4 * b + j] as i32,
                                w + 128,
                                "{isa} q8_0 nb={nb} tile {i} block {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Float matmuls copy activations that do not start on a cache line into aligned scratch
/// (`WeightFormat::activations`); the result must not depend on where the caller's `x` sits.
#[test]
fn float_matmul_bits_do_not_depend_on_activation_alignment() {
    let (rows, cols, tokens) = (21, 1040, 6);
    let w32: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 997.0)
        .collect();
    // 16 spare floats, so every offset within a cache line is available.
    let store: Vec<f32> = (0..tokens * cols + 16)
        .map(|i| ((i * 104_729 % 4001) as f32 - 2000.0) / 1999.0)
        .collect();
    let bias: Vec<f32> = (0..rows).map(|r| r as f32 * 0.25 - 2.0).collect();
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        let bytes = ggpt_quant::tensor::quantize(ty, &w32, cols).expect("float weights");
        let mut buf = Vec::new();
        let range = aligned(&mut buf, &bytes);
        let m = QMatrix::new(ty, rows, cols, &buf[range]).expect("valid matrix");
        for isa in available_isas() {
            let level = isa.level().expect("available");
            let mut s = Scratch::default();
            let run = |off: usize, s: &mut Scratch| {
                // The same values at every offset: copy them to `off` floats into a buffer.
                let mut at = vec![0.0f32; tokens * cols + 16];
                at[off..off + tokens * cols].copy_from_slice(&store[..tokens * cols]);
                let mut y = vec![0.0f32; tokens * rows];
                matmul_at(
                    level,
                    &m,
                    &at[off..off + tokens * cols],
                    tokens,
                    Some(&bias),
                    &mut y,
                    s,
                );
                (y, (at[off..].as_ptr() as usize) % 64)
            };
            let mut seen = std::collections::BTreeMap::new();
            for off in 0..16 {
                let (y, misalign) = run(off, &mut s);
                seen.entry(misalign).or_insert(y);
            }
            assert!(
                seen.len() >= 4,
                "offsets 0..16 cover several alignments: {:?}",
                seen.keys()
            );
            let first = seen.values().next().expect("one alignment").clone();
            for (misalign, y) in &seen {
                let diff = y
                    .iter()
                    .zip(&first)
                    .position(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!(
                    diff, None,
                    "{ty} {isa}: x {misalign} bytes past a cache line differs"
                );
            }
        }
    }
}
