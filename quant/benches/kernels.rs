//! Matmul throughput per weight type and instruction set, on GPT-2-Medium-shaped layers
//! (attn_qkv 3072×1024, attn_output 1024×1024, ffn_up 4096×1024, ffn_down 1024×4096).
//!
//! - `matvec/<isa>/<threads>t/<type>`: one token through `LAYERS` layers' four matmuls, the
//!   decode step. Throughput is weight bytes streamed per second (criterion's "GB/s" is
//!   decimal); the weights (≥ 55 MB even for Q4_K) exceed the 32 MB L3, so this measures the
//!   memory-bound path, like decoding a real model.
//! - `matmat/<isa>/<threads>t/<type>/<tokens>`: one layer for 64..512 tokens (prefill).
//!   Throughput is reported in "elements" = multiply-adds; GFLOP/s = 2 × Melem/s / 1000.
//!
//! Filter with e.g. `cargo bench -p ggpt-quant --bench kernels -- matvec/avx512vnni/2t`.
//! Weights are real quantizations (ggml's reference quantizers) of GPT-2-like random values,
//! one 1 M-weight matrix tiled to the full size (so setup stays fast).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ggpt_quant::cpu::{available_isas, Isa, Level};
use ggpt_quant::matmul::{matmul_at, QMatrix, Scratch};
use ggpt_quant::{tensor, GgmlType};
use std::hint::black_box;
use std::time::Duration;

const LAYERS: usize = 12;
/// (rows, cols) of one layer's matrices.
const SHAPES: [(usize, usize); 4] = [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)];
const TYPES: [GgmlType; 6] = [
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q6K,
    GgmlType::Q5K,
    GgmlType::Q4K,
];

/// `n` values of `store` starting on a cache line, as the model's activations do (the float
/// matmuls would copy unaligned ones first).
fn on_a_line(store: &[f32], n: usize) -> &[f32] {
    let skip = store.as_ptr().align_offset(64).min(16);
    &store[skip..skip + n]
}

fn gpt2_like(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    (0..n).map(|_| (u() + u() + u() + u()) * 0.035).collect()
}

/// Quantized bytes of a `rows × cols` matrix, 64-aligned inside `buf[start..start + len]`.
struct Weights {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Weights {
    fn new(ty: GgmlType, rows: usize, cols: usize) -> Weights {
        // One 64-row tile quantized for real, repeated (keeps setup to seconds).
        let tile_rows = 64.min(rows);
        let src = gpt2_like(tile_rows * cols, (rows * 31 + cols) as u64);
        let tile = tensor::quantize(ty, &src, cols).expect("quantize");
        let len = tile.len() / tile_rows * rows;
        let mut buf = vec![0u8; len + 64];
        let start = buf.as_ptr().align_offset(64);
        for chunk in buf[start..start + len].chunks_mut(tile.len()) {
            let n = chunk.len();
            chunk.copy_from_slice(&tile[..n]);
        }
        Weights { buf, start, len }
    }
    fn matrix(&self, ty: GgmlType, rows: usize, cols: usize) -> QMatrix<'_> {
        QMatrix::new(ty, rows, cols, &self.buf[self.start..self.start + self.len]).expect("matrix")
    }
}

fn layer_weights(ty: GgmlType, layers: usize) -> Vec<(usize, usize, Weights)> {
    (0..layers)
        .flat_map(|_| {
            SHAPES
                .iter()
                .map(move |&(r, c)| (r, c, Weights::new(ty, r, c)))
        })
        .collect()
}

fn run_layers(
    k: Level,
    ty: GgmlType,
    ws: &[(usize, usize, Weights)],
    x: &[f32],
    y: &mut [f32],
    t: usize,
    s: &mut Scratch,
) {
    for (rows, cols, w) in ws {
        let m = w.matrix(ty, *rows, *cols);
        matmul_at(k, &m, &x[..t * cols], t, None, &mut y[..t * rows], s);
    }
    black_box(&y);
}

fn isas() -> Vec<Isa> {
    available_isas()
}

fn pools() -> Vec<(usize, rayon::ThreadPool)> {
    [1, 2]
        .into_iter()
        .map(|n| {
            (
                n,
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .unwrap(),
            )
        })
        .collect()
}

fn matvec(c: &mut Criterion) {
    let mut g = c.benchmark_group("matvec");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let store = gpt2_like(4096 + 16, 7);
    let x = on_a_line(&store, 4096);
    let mut y = vec![0.0; 4096];
    for ty in TYPES {
        let ws = layer_weights(ty, LAYERS);
        let bytes: usize = ws.iter().map(|(_, _, w)| w.len).sum();
        g.throughput(Throughput::Bytes(bytes as u64));
        for isa in isas() {
            let k = isa.level().unwrap();
            for (n, pool) in pools() {
                let mut s = Scratch::default();
                let id = BenchmarkId::new(format!("{isa}/{n}t"), ty.name());
                g.bench_function(id, |b| {
                    pool.install(|| b.iter(|| run_layers(k, ty, &ws, x, &mut y, 1, &mut s)))
                });
            }
        }
    }
    g.finish();
}

fn matmat(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmat");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let store = gpt2_like(512 * 4096 + 16, 9);
    let x = on_a_line(&store, 512 * 4096);
    let mut y = vec![0.0; 512 * 4096];
    let macs_per_token: usize = SHAPES.iter().map(|(r, c)| r * c).sum();
    for ty in TYPES {
        let ws = layer_weights(ty, 1);
        let mut levels: Vec<(String, Level)> = Vec::new();
        for isa in isas() {
            if isa == Isa::Scalar {
                continue; // minutes per sample; the scalar path is the reference, not a target
            }
            levels.push((isa.to_string(), isa.level().unwrap()));
        }
        for (name, k) in levels {
            for (n, pool) in pools() {
                for t in [64usize, 128, 512] {
                    g.throughput(Throughput::Elements((macs_per_token * t) as u64));
                    let mut s = Scratch::default();
                    let id = BenchmarkId::new(format!("{name}/{n}t/{}", ty.name()), t);
                    g.bench_function(id, |b| {
                        pool.install(|| b.iter(|| run_layers(k, ty, &ws, x, &mut y, t, &mut s)))
                    });
                }
            }
        }
    }
    g.finish();
}

criterion_group!(benches, matvec, matmat);
criterion_main!(benches);
