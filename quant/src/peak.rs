//! The f32 fused multiply-add peak of one core at a [`Level`]: a register-only loop of
//! independent FMAs on the widest float vectors the level has (zmm for the AVX-512 levels, ymm
//! for AVX2, 128-bit on NEON), which is the ceiling of the float gemms (F16/BF16/F32 weights
//! are converted to f32 and multiplied with FMAs). `ggpt bench` runs it on every thread of the
//! pool to relate prefill GFLOP/s to what the cores can do in the same run.

use crate::cpu::Level;

/// Independent accumulators: enough to cover FMA latency (4 cycles) × 2 issue ports.
const ACC: usize = 16;
/// AVX2's: 12 (≥ 4 × 2, and room for 3 ports), so that with the two constants they fit the 16
/// ymm registers; with 16 the loop spilled and moved registers around, and read ~20 % low.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const ACC256: usize = 12;

/// Run `iters` rounds of [`ACC`] (AVX2: [`ACC256`]) independent vector FMAs at `level`;
/// returns the number of floating-point operations done (2 per lane per FMA) and a value that
/// depends on every accumulator (pass it to `std::hint::black_box`).
pub fn fma_burst(level: Level, iters: usize) -> (u64, f32) {
    match level.isa() {
        #[cfg(target_arch = "x86_64")]
        crate::cpu::Isa::Avx512 | crate::cpu::Isa::Avx512Vnni | crate::cpu::Isa::Amx => {
            // SAFETY: `level` is a checked `Level`, so the CPU has AVX-512F.
            let v = unsafe { x86::burst512(iters) };
            ((iters * ACC * 16 * 2) as u64, v)
        }
        #[cfg(target_arch = "x86_64")]
        crate::cpu::Isa::Avx2 => {
            // SAFETY: `level` is a checked `Level`, so the CPU has AVX2 and FMA.
            let v = unsafe { x86::burst256(iters) };
            ((iters * ACC256 * 8 * 2) as u64, v)
        }
        _ => {
            // Portable: the compiler vectorizes the lanes with the baseline vector width
            // (SSE2 on x86-64, NEON on aarch64) and separate multiply/add where there is no
            // FMA instruction in the baseline.
            let mut acc = [[1.0f32; 4]; ACC];
            let (m, c) = (
                std::hint::black_box(0.999_999f32),
                std::hint::black_box(1e-7f32),
            );
            for _ in 0..iters {
                for a in acc.iter_mut() {
                    for v in a.iter_mut() {
                        *v = v.mul_add(m, c);
                    }
                }
            }
            ((iters * ACC * 4 * 2) as u64, acc.iter().flatten().sum())
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ACC, ACC256};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn burst512(iters: usize) -> f32 {
        let m = _mm512_set1_ps(std::hint::black_box(0.999_999));
        let c = _mm512_set1_ps(std::hint::black_box(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); ACC];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, m, c);
            }
        }
        let mut s = _mm512_setzero_ps();
        for a in acc {
            s = _mm512_add_ps(s, a);
        }
        _mm512_reduce_add_ps(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn burst256(iters: usize) -> f32 {
        let m = _mm256_set1_ps(std::hint::black_box(0.999_999));
        let c = _mm256_set1_ps(std::hint::black_box(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); ACC256];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, m, c);
            }
        }
        let mut s = _mm256_setzero_ps();
        for a in acc {
            s = _mm256_add_ps(s, a);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), s);
        lanes.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::available_isas;

    #[test]
    fn burst_counts_flops_and_computes() {
        for isa in available_isas() {
            let level = isa.level().unwrap();
            let (flops, v) = fma_burst(level, 1000);
            assert!(flops >= 1000 * ACC256 as u64 * 8, "{isa:?}: {flops}");
            // Each lane is x ← 0.999999·x + 1e-7 from 1: stays just below 1.
            let lanes = (flops / 2 / 1000) as f32;
            assert!(
                (v / lanes - 0.999).abs() < 0.002,
                "{isa:?}: {v} over {lanes} lanes"
            );
        }
    }
}
