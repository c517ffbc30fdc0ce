//! Quantizer throughput per type, in M weights/s (criterion's "Melem/s").
//! Input: 64 rows × 4096 pseudo-normal weights with σ = 0.02 (GPT-2-like).
//! Run: `cargo bench -p ggpt-quant --bench quantize`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ggpt_quant::{tensor, GgmlType};

fn gpt2_like(n: usize) -> Vec<f32> {
    // Sum of 4 uniforms ≈ normal; xorshift keeps it dependency-free and deterministic.
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    (0..n)
        .map(|_| (u() + u() + u() + u()) * 0.02 * 3.0f32.sqrt())
        .collect()
}

fn bench(c: &mut Criterion) {
    let (rows, cols) = (64, 4096);
    let src = gpt2_like(rows * cols);
    let mut g = c.benchmark_group("quantize");
    g.throughput(Throughput::Elements((rows * cols) as u64));
    g.sample_size(10);
    for ty in [
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ] {
        let mut out = vec![0u8; tensor::quantize(ty, &src, cols).unwrap().len()];
        g.bench_function(ty.name(), |b| {
            b.iter(|| tensor::quantize_into(ty, black_box(&src), cols, &mut out).unwrap())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("dequantize");
    g.throughput(Throughput::Elements((rows * cols) as u64));
    g.sample_size(10);
    for ty in [
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ] {
        let q = tensor::quantize(ty, &src, cols).unwrap();
        let mut y = vec![0.0f32; src.len()];
        g.bench_function(ty.name(), |b| {
            b.iter(|| tensor::dequantize(ty, black_box(&q), &mut y).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
