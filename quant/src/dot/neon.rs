//! aarch64 NEON kernels, in two builds from one source (`neon_family!`): `plain` multiplies
//! bytes with `smull` + pairwise accumulate, `dot` uses the dot-product extension (`sdot`,
//! 16 multiply-adds per instruction) when the CPU reports `dotprod`.
//!
//! `sdot`'s intrinsic (`vdotq_s32`) is not stable in Rust yet, so the `dot` build issues the
//! instruction with `asm!`. K-quant values are small enough to be used as signed bytes directly
//! (Q6_K subtracts its 32 offset before multiplying), so no unsigned×signed trick is needed.
//! Integer sums are exact (same bounds as the scalar reference); scales are applied per group.
//!
//! Tested on x86 hosts under qemu user-mode emulation (tests/neon.sh): quant/tests/kernels.rs
//! compares both builds with the scalar reference and ggml's fixtures.

use crate::kscale::scales_mins_bytes;
use crate::q4_k::BlockQ4K;
use crate::q5_k::BlockQ5K;
use crate::q6_k::BlockQ6K;
use crate::q8_0::BlockQ8_0;
use crate::q8_k::BlockQ8K;
use half::f16;

macro_rules! neon_family {
    ($name:ident, $features:literal, $dot16:item) => {
        pub(crate) mod $name {
            use super::*;
            use half::bf16;
            use std::arch::aarch64::*;

            /// `acc` + Σ of 4 adjacent i8·i8 products per i32 lane.
            $dot16

            /// Σ of 32 products (two 16-byte halves) as 4 i32 lanes.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn dot32(w0: int8x16_t, w1: int8x16_t, a: *const i8) -> int32x4_t {
                let z = vdupq_n_s32(0);
                dot16(dot16(z, w0, vld1q_s8(a)), w1, vld1q_s8(a.add(16)))
            }

            #[inline]
            fn f16_to_f32(h: f16) -> f32 {
                h.to_f32()
            }

            /// Four f16 to f32 with `fcvtl` (the f16 vector intrinsics need Rust 1.94).
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn cvt_f16x4(p: *const u16) -> float32x4_t {
                let h = vld1_u16(p);
                let out: float32x4_t;
                // SAFETY: a register-to-register conversion, base NEON.
                unsafe {
                    std::arch::asm!(
                        "fcvtl {o:v}.4s, {i:v}.4h",
                        o = out(vreg) out,
                        i = in(vreg) h,
                        options(pure, nomem, nostack)
                    );
                }
                out
            }

            /// Σ_j m_j·(bsums[2j] + bsums[2j+1]) for the 8 sub-block mins (bytes 8..16 of `b`).
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn min_term(b: &[u8; 16], bsums: &[i16; 16]) -> i32 {
                let p = bsums.as_ptr();
                let pairs = vpaddq_s16(vld1q_s16(p), vld1q_s16(p.add(8)));
                let m = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(b.as_ptr().add(8))));
                let lo = vmull_s16(vget_low_s16(pairs), vget_low_s16(m));
                let hi = vmull_high_s16(pairs, m);
                vaddvq_s32(vaddq_s32(lo, hi))
            }

            /// Q4_K/Q5_K body; `hi_bits(c)` gives the 5th bits (0 or 16) of chunk c's
            /// low-nibble and high-nibble runs as two 16-byte halves each.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn k4_block(
                x_d: f16,
                x_dmin: f16,
                scales: &[u8; 12],
                qs: &[u8; 128],
                y: &BlockQ8K,
                hi_bits: impl Fn(usize) -> [uint8x16_t; 4],
            ) -> f32 {
                let b = scales_mins_bytes(scales);
                let m4 = vdupq_n_u8(0x0f);
                let mut isum = vdupq_n_s32(0);
                for c in 0..4 {
                    let q0 = vld1q_u8(qs.as_ptr().add(32 * c));
                    let q1 = vld1q_u8(qs.as_ptr().add(32 * c + 16));
                    let [h0, h1, h2, h3] = hi_bits(c);
                    let lo0 = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(q0, m4), h0));
                    let lo1 = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(q1, m4), h1));
                    let hi0 = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8::<4>(q0), h2));
                    let hi1 = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8::<4>(q1), h3));
                    let a = y.qs.as_ptr().add(64 * c);
                    isum = vmlaq_n_s32(isum, dot32(lo0, lo1, a), b[2 * c] as i32);
                    isum = vmlaq_n_s32(isum, dot32(hi0, hi1, a.add(32)), b[2 * c + 1] as i32);
                }
                let d = y.d * f16_to_f32(x_d);
                let dmin = y.d * f16_to_f32(x_dmin);
                d * vaddvq_s32(isum) as f32 - dmin * min_term(&b, &y.bsums) as f32
            }

            #[target_feature(enable = $features)]
            unsafe fn q4k_q8k_impl(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
                let z = vdupq_n_u8(0);
                let mut sum = 0.0;
                for (x, y) in w.iter().zip(a) {
                    sum += k4_block(x.d, x.dmin, &x.scales, &x.qs, y, |_| [z; 4]);
                }
                sum
            }

            #[target_feature(enable = $features)]
            unsafe fn q5k_q8k_impl(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
                let m16 = vdupq_n_u8(16);
                let mut sum = 0.0;
                for (x, y) in w.iter().zip(a) {
                    let h0 = vld1q_u8(x.qh.as_ptr());
                    let h1 = vld1q_u8(x.qh.as_ptr().add(16));
                    // Move bit `bit` of every qh byte to bit 4 (a signed shift: right when
                    // negative), then keep only that bit.
                    let at4 = |h: uint8x16_t, bit: i32| vandq_u8(vshlq_u8(h, vdupq_n_s8((4 - bit) as i8)), m16);
                    sum += k4_block(x.d, x.dmin, &x.scales, &x.qs, y, |c| {
                        let (lo, hi) = (2 * c as i32, 2 * c as i32 + 1);
                        [at4(h0, lo), at4(h1, lo), at4(h0, hi), at4(h1, hi)]
                    });
                }
                sum
            }

            #[target_feature(enable = $features)]
            unsafe fn q6k_q8k_impl(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
                let m4 = vdupq_n_u8(0x0f);
                let m3 = vdupq_n_u8(0x03);
                let off = vdupq_n_s8(32);
                let mut sum = 0.0;
                for (x, y) in w.iter().zip(a) {
                    let mut isum = vdupq_n_s32(0);
                    for h in 0..2 {
                        for l in [0usize, 16] {
                            let ql0 = vld1q_u8(x.ql.as_ptr().add(64 * h + l));
                            let ql1 = vld1q_u8(x.ql.as_ptr().add(64 * h + 32 + l));
                            let qh = vld1q_u8(x.qh.as_ptr().add(32 * h + l));
                            // Elements l, l+32, l+64, l+96 of this half.
                            let q = [
                                vorrq_u8(vandq_u8(ql0, m4), vshlq_n_u8::<4>(vandq_u8(qh, m3))),
                                vorrq_u8(vandq_u8(ql1, m4), vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<2>(qh), m3))),
                                vorrq_u8(vshrq_n_u8::<4>(ql0), vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<4>(qh), m3))),
                                vorrq_u8(vshrq_n_u8::<4>(ql1), vshlq_n_u8::<4>(vshrq_n_u8::<6>(qh))),
                            ];
                            for (r, qr) in q.into_iter().enumerate() {
                                let e = 128 * h + 32 * r + l; // first element of this 16-run
                                let v = vsubq_s8(vreinterpretq_s8_u8(qr), off);
                                let p = dot16(vdupq_n_s32(0), v, vld1q_s8(y.qs.as_ptr().add(e)));
                                isum = vmlaq_n_s32(isum, p, x.scales[e / 16] as i32);
                            }
                        }
                    }
                    sum += y.d * f16_to_f32(x.d) * vaddvq_s32(isum) as f32;
                }
                sum
            }

            #[target_feature(enable = $features)]
            unsafe fn q8_0_q8_0_impl(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
                let mut acc = vdupq_n_f32(0.0);
                for (x, y) in w.iter().zip(a) {
                    let p = x.qs.as_ptr();
                    let s = dot32(vld1q_s8(p), vld1q_s8(p.add(16)), y.qs.as_ptr());
                    let d = f16_to_f32(x.d) * f16_to_f32(y.d);
                    acc = vfmaq_n_f32(acc, vcvtq_f32_s32(s), d);
                }
                vaddvq_f32(acc)
            }

            /// Σ w·a with `wload(i)` giving 4 f32 weights from index i; scalar tail.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn float_dot(
                n: usize,
                a: &[f32],
                wload: impl Fn(usize) -> float32x4_t,
                wscalar: impl Fn(usize) -> f32,
            ) -> f32 {
                let mut acc = [vdupq_n_f32(0.0); 4];
                let mut i = 0;
                while i + 16 <= n {
                    for (j, s) in acc.iter_mut().enumerate() {
                        let k = i + 4 * j;
                        *s = vfmaq_f32(*s, wload(k), vld1q_f32(a.as_ptr().add(k)));
                    }
                    i += 16;
                }
                while i + 4 <= n {
                    acc[0] = vfmaq_f32(acc[0], wload(i), vld1q_f32(a.as_ptr().add(i)));
                    i += 4;
                }
                let mut sum = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
                while i < n {
                    sum += wscalar(i) * a[i];
                    i += 1;
                }
                sum
            }

            #[target_feature(enable = $features)]
            unsafe fn f16_f32_impl(w: &[f16], a: &[f32]) -> f32 {
                let n = w.len().min(a.len());
                let p = w.as_ptr().cast::<u16>();
                float_dot(n, a, |i| cvt_f16x4(p.add(i)), |i| w[i].to_f32())
            }

            #[target_feature(enable = $features)]
            unsafe fn bf16_f32_impl(w: &[bf16], a: &[f32]) -> f32 {
                let n = w.len().min(a.len());
                let p = w.as_ptr().cast::<u16>();
                float_dot(
                    n,
                    a,
                    |i| vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p.add(i)))),
                    |i| w[i].to_f32(),
                )
            }

            #[target_feature(enable = $features)]
            unsafe fn f32_f32_impl(w: &[f32], a: &[f32]) -> f32 {
                let n = w.len().min(a.len());
                float_dot(n, a, |i| vld1q_f32(w.as_ptr().add(i)), |i| w[i])
            }

            // The safe entry points (`dot::entry_points` states why they are sound).
            crate::dot::entry_points! { $features;
                dot q4k_q8k = q4k_q8k_impl(BlockQ4K, BlockQ8K);
                dot q5k_q8k = q5k_q8k_impl(BlockQ5K, BlockQ8K);
                dot q6k_q8k = q6k_q8k_impl(BlockQ6K, BlockQ8K);
                dot q8_0_q8_0 = q8_0_q8_0_impl(BlockQ8_0, BlockQ8_0);
                dot f16_f32 = f16_f32_impl(f16, f32);
                dot bf16_f32 = bf16_f32_impl(bf16, f32);
                dot f32_f32 = f32_f32_impl(f32, f32);
            }
        }
    };
}

neon_family!(
    plain,
    "neon",
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn dot16(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // i8·i8 fits i16 (|−128·−128| = 16384); pairwise-add into the i32 lanes.
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let hi = vmull_high_s8(a, b);
        vpadalq_s16(vpadalq_s16(acc, lo), hi)
    }
);

neon_family!(
    dot,
    "neon,dotprod",
    #[target_feature(enable = "neon,dotprod")]
    #[inline]
    unsafe fn dot16(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: `sdot` only reads the three registers; the enclosing function requires
        // `dotprod`, which `cpu::Level` checked before this build is reachable.
        unsafe {
            std::arch::asm!(
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack)
            );
        }
        acc
    }
);
