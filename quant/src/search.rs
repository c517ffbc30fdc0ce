//! The scale searches of the K-quant reference quantizers (ggml-quants.c): `nearest_int`,
//! `make_qkx2_quants` (Q4_K, Q5_K) and `make_qx_quants` (Q6_K), scalar and lane-parallel.
//!
//! Byte-exactness with ggml depends on doing the same f32 operations in the same order:
//! ggml-quants.c is compiled into ggml-base without `-march` flags, so there is no FMA
//! contraction and every `a*b + c` rounds twice. Rust never contracts either, so the
//! expressions below are written in C's left-to-right evaluation order, e.g. `w*l*x` is
//! `(w*l)*x` with the integer `l` converted to f32 first.
//!
//! The searches try ~20 candidate scales per sub-block. Each candidate's sums must be
//! accumulated in element order (f32 addition is not associative), and a Q4_K/Q5_K
//! candidate depends on which earlier ones were accepted, so instead of vectorising over
//! elements or candidates the fast versions put *sub-blocks* in SIMD lanes: lane `j` does
//! exactly the scalar sequence of operations for sub-block `j` of a super-block (or, at
//! AVX-512, of two). The scalar versions are kept as the readable reference and the tests
//! check that both agree bit for bit.

use crate::cpu::Level;

/// ggml's `nearest_int`: add 1.5·2²³ so the FPU's round-to-nearest-even puts the integer in
/// the low mantissa bits, then read them. Reproduces ggml's result bit for bit, also for
/// inputs outside ±2²² (where it is meaningless but deterministic).
#[inline(always)]
pub fn nearest_int(f: f32) -> i32 {
    let v = f + 12_582_912.0;
    (v.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// Parameters of ggml's `make_qkx2_quants` search (`use_mad` is always false for Q4_K/Q5_K).
#[derive(Clone, Copy, Debug)]
pub struct Qkx2Params {
    /// Largest quant value (15 for Q4_K, 31 for Q5_K).
    pub nmax: u8,
    /// First candidate: `iscale = (nmax + rmin)/(max − min)`.
    pub rmin: f32,
    /// Step between candidates.
    pub rdelta: f32,
    /// Candidates are `is = 0..=nstep`.
    pub nstep: u32,
}

/// Q4_K: `make_qkx2_quants(32, 15, …, -1.0, 0.1, 20, false)`.
pub const QKX2_Q4K: Qkx2Params = Qkx2Params {
    nmax: 15,
    rmin: -1.0,
    rdelta: 0.1,
    nstep: 20,
};
/// Q5_K: `make_qkx2_quants(32, 31, …, -0.5, 0.1, 15, false)`.
pub const QKX2_Q5K: Qkx2Params = Qkx2Params {
    nmax: 31,
    rmin: -0.5,
    rdelta: 0.1,
    nstep: 15,
};

/// Sub-block length for Q4_K/Q5_K.
pub const QKX2_N: usize = 32;

/// The scalar `make_qkx2_quants`'s range and weighted sums, from its prologue.
struct Qkx2Start {
    min: f32,
    max: f32,
    sum_w: f32,
    sum_x: f32,
}

/// The parts of `make_qkx2_quants` before the search. Returns `Err((scale, the_min))` when
/// the block is constant (ggml's early return), with `l` zeroed.
#[inline(always)]
fn qkx2_start(
    x: &[f32; QKX2_N],
    w: &[f32; QKX2_N],
    l: &mut [u8; QKX2_N],
) -> Result<Qkx2Start, (f32, f32)> {
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..QKX2_N {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        *l = [0; QKX2_N];
        return Err((0.0, -min));
    }
    Ok(Qkx2Start {
        min,
        max,
        sum_w,
        sum_x,
    })
}

/// Quantize `v` = `iscale*(x − min)` to 0..=nmax.
#[inline(always)]
fn qkx2_level(iscale: f32, x: f32, min: f32, nmax: i32) -> i32 {
    nearest_int(iscale * (x - min)).clamp(0, nmax)
}

/// Weighted squared error of the first guess `scale = 1/iscale` (which also sets `l`).
#[inline(always)]
fn qkx2_first_guess(
    x: &[f32; QKX2_N],
    w: &[f32; QKX2_N],
    l: &mut [u8; QKX2_N],
    nmax: i32,
    min: f32,
    max: f32,
) -> (f32, f32) {
    let iscale = nmax as f32 / (max - min);
    let scale = 1.0 / iscale;
    let mut best_mad = 0.0f32;
    for i in 0..QKX2_N {
        let q = qkx2_level(iscale, x[i], min, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_mad += w[i] * (diff * diff);
    }
    (scale, best_mad)
}

/// ggml's `make_qkx2_quants` for one 32-value sub-block, scalar reference.
///
/// Fits `x ≈ scale·l − the_min` with `l` in 0..=nmax, minimising Σ w·(error)². Returns
/// `(scale, the_min)`; the levels go to `l`. Note that accepting a candidate changes `min`,
/// which the following candidates then use — the search is sequential.
pub fn make_qkx2_quants_scalar(
    x: &[f32; QKX2_N],
    w: &[f32; QKX2_N],
    p: Qkx2Params,
    l: &mut [u8; QKX2_N],
) -> (f32, f32) {
    let st = match qkx2_start(x, w, l) {
        Ok(st) => st,
        Err(r) => return r,
    };
    let nmax = p.nmax as i32;
    let (mut min, max) = (st.min, st.max);
    let (mut scale, mut best_mad) = qkx2_first_guess(x, w, l, nmax, min, max);
    let mut laux = [0u8; QKX2_N];
    for is in 0..=p.nstep {
        let iscale = (p.rmin + p.rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..QKX2_N {
            let q = qkx2_level(iscale, x[i], min, nmax);
            laux[i] = q as u8;
            let wl = w[i] * q as f32;
            sum_l += wl;
            sum_l2 += wl * q as f32;
            sum_xl += wl * x[i];
        }
        let d = st.sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (st.sum_w * sum_xl - st.sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * st.sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut mad = 0.0f32;
            for i in 0..QKX2_N {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                mad += w[i] * (diff * diff);
            }
            if mad < best_mad {
                *l = laux;
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Sub-blocks of a Q4_K/Q5_K super-block.
const KX_SUBS: usize = 8;

/// `make_qkx2_quants` for `L` sub-blocks side by side, lane `j` being sub-block `j`:
/// `xt[i][j]` and `wt[i][j]` are element `i` of sub-block `j`, and the levels go to `lt` in the
/// same layout. Each lane runs exactly the scalar reference's sequence of operations
/// ([`qkx2_start`], [`qkx2_first_guess`], then every candidate in order, accepting one only
/// where it beats that lane's best error), so the results are bit-identical to it. A lane
/// whose sub-block is constant takes ggml's early return. Written as plain lane loops that the
/// compiler turns into vector operations (16 lanes: one AVX-512 vector or two AVX2 ones; see
/// [`KX_GROUP`]).
// Element and lane loops index several arrays in lockstep; iterators would hide that.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn qkx2_lanes<const L: usize>(
    xt: &[[f32; L]; QKX2_N],
    wt: &[[f32; L]; QKX2_N],
    p: Qkx2Params,
    lt: &mut [[u8; L]; QKX2_N],
) -> [(f32, f32); L] {
    let nmax = p.nmax as i32;
    let nmaxf = nmax as f32;
    let level = |iscale: f32, x: f32, min: f32| qkx2_level(iscale, x, min, nmax) as f32;

    // qkx2_start: range and weighted sums, element by element.
    let (mut min, mut max, mut sum_w) = (xt[0], xt[0], wt[0]);
    let mut sum_x = [0.0f32; L];
    for j in 0..L {
        sum_x[j] = sum_w[j] * xt[0][j];
    }
    for i in 1..QKX2_N {
        for j in 0..L {
            let v = xt[i][j];
            min[j] = if v < min[j] { v } else { min[j] };
            max[j] = if v > max[j] { v } else { max[j] };
            sum_w[j] += wt[i][j];
            sum_x[j] += wt[i][j] * v;
        }
    }
    // A constant sub-block (max == min after clamping min to ≤ 0) returns early in ggml; its
    // lane computes along (dividing by zero) but never accepts a candidate.
    let mut active = [false; L];
    let mut iscale = [0.0f32; L];
    let mut scale = [0.0f32; L];
    for j in 0..L {
        min[j] = if min[j] > 0.0 { 0.0 } else { min[j] };
        active[j] = max[j] != min[j];
        iscale[j] = nmaxf / (max[j] - min[j]);
        scale[j] = 1.0 / iscale[j];
    }

    // qkx2_first_guess.
    let mut best = [[0.0f32; L]; QKX2_N];
    let mut best_mad = [0.0f32; L];
    for i in 0..QKX2_N {
        for j in 0..L {
            let q = level(iscale[j], xt[i][j], min[j]);
            best[i][j] = q;
            let diff = scale[j] * q + min[j] - xt[i][j];
            best_mad[j] += wt[i][j] * (diff * diff);
        }
    }

    // The candidates, in order; accepting one changes that lane's `min` for the next.
    let mut laux = [[0.0f32; L]; QKX2_N];
    for is in 0..=p.nstep {
        let step = p.rmin + p.rdelta * is as f32 + nmaxf;
        for j in 0..L {
            iscale[j] = step / (max[j] - min[j]);
        }
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([0.0f32; L], [0.0f32; L], [0.0f32; L]);
        for i in 0..QKX2_N {
            for j in 0..L {
                let q = level(iscale[j], xt[i][j], min[j]);
                laux[i][j] = q;
                let wl = wt[i][j] * q;
                sum_l[j] += wl;
                sum_l2[j] += wl * q;
                sum_xl[j] += wl * xt[i][j];
            }
        }
        let (mut ok, mut this_scale, mut this_min) = ([false; L], [0.0f32; L], [0.0f32; L]);
        for j in 0..L {
            let d = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j];
            ok[j] = active[j] & (d > 0.0);
            let s = (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / d;
            let m = (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / d;
            // A positive fitted min is replaced by 0, the scale refitted through the origin.
            let clamp = m > 0.0;
            this_min[j] = if clamp { 0.0 } else { m };
            this_scale[j] = if clamp { sum_xl[j] / sum_l2[j] } else { s };
        }
        let mut mad = [0.0f32; L];
        for i in 0..QKX2_N {
            for j in 0..L {
                let diff = this_scale[j] * laux[i][j] + this_min[j] - xt[i][j];
                mad[j] += wt[i][j] * (diff * diff);
            }
        }
        let mut take = [false; L];
        for j in 0..L {
            take[j] = ok[j] & (mad[j] < best_mad[j]);
            best_mad[j] = if take[j] { mad[j] } else { best_mad[j] };
            scale[j] = if take[j] { this_scale[j] } else { scale[j] };
            min[j] = if take[j] { this_min[j] } else { min[j] };
        }
        for i in 0..QKX2_N {
            for j in 0..L {
                best[i][j] = if take[j] { laux[i][j] } else { best[i][j] };
            }
        }
    }

    for i in 0..QKX2_N {
        for j in 0..L {
            lt[i][j] = if active[j] { best[i][j] as u8 } else { 0 };
        }
    }
    std::array::from_fn(|j| {
        if active[j] {
            (scale[j], -min[j])
        } else {
            (0.0, -min[j])
        }
    })
}

/// `xt[i][j] = x[N j + i]` for the `N`-value sub-blocks `j` of `x`, which fill lanes `lane0..`.
#[inline(always)]
fn transpose_in<const L: usize, const N: usize>(x: &[f32], lane0: usize, xt: &mut [[f32; L]; N]) {
    for (j, sub) in x.chunks_exact(N).enumerate() {
        for (i, &v) in sub.iter().enumerate() {
            xt[i][lane0 + j] = v;
        }
    }
}

/// The inverse of [`transpose_in`] for levels.
#[inline(always)]
fn transpose_out<const L: usize, const N: usize>(lt: &[[u8; L]; N], lane0: usize, l: &mut [u8]) {
    for (j, sub) in l.chunks_exact_mut(N).enumerate() {
        for (i, o) in sub.iter_mut().enumerate() {
            *o = lt[i][lane0 + j];
        }
    }
}

/// `make_qkx2_quants` for the sub-blocks of [`KX_GROUP`] super-blocks at once, one lane each.
#[inline(always)]
fn qkx2_superblocks(
    x: [&[f32; 256]; KX_GROUP],
    w: [&[f32; 256]; KX_GROUP],
    p: Qkx2Params,
    l: [&mut [u8; 256]; KX_GROUP],
) -> [[(f32, f32); KX_SUBS]; KX_GROUP] {
    let mut xt = [[0.0f32; KX_LANES]; QKX2_N];
    let mut wt = [[0.0f32; KX_LANES]; QKX2_N];
    for s in 0..KX_GROUP {
        transpose_in(x[s], KX_SUBS * s, &mut xt);
        transpose_in(w[s], KX_SUBS * s, &mut wt);
    }
    let mut lt = [[0u8; KX_LANES]; QKX2_N];
    let fits = qkx2_lanes(&xt, &wt, p, &mut lt);
    for (s, l) in l.into_iter().enumerate() {
        transpose_out(&lt, KX_SUBS * s, l);
    }
    std::array::from_fn(|s| std::array::from_fn(|j| fits[KX_SUBS * s + j]))
}

/// Super-blocks whose Q4_K/Q5_K searches run side by side, 8 lanes each. Two fill one AVX-512
/// vector or two AVX2 ones. Measured (`cargo bench --bench quantize`, Q4_K): one super-block
/// at a time ran 44 Melem/s at AVX2 (the compiler left much of the 8-lane search scalar),
/// two 88 at AVX2 and 120 at AVX-512, four 82 and 84 (register spills).
pub const KX_GROUP: usize = 2;
const KX_LANES: usize = KX_SUBS * KX_GROUP;

/// `make_qkx2_quants` for the 8 sub-blocks of each of [`KX_GROUP`] 256-value super-blocks:
/// `w` holds each value's weight, `l` receives the levels; returns each sub-block's
/// `(scale, the_min)`. Uses the widest vectors this CPU supports; bit-identical to calling
/// [`make_qkx2_quants_scalar`] on each sub-block. (Pad a short group with zeros: an
/// all-zero super-block takes ggml's early return in every sub-block.)
pub fn make_qkx2_quants_superblocks(
    x: [&[f32; 256]; KX_GROUP],
    w: [&[f32; 256]; KX_GROUP],
    p: Qkx2Params,
    l: [&mut [u8; 256]; KX_GROUP],
) -> [[(f32, f32); KX_SUBS]; KX_GROUP] {
    qkx2_superblocks_at(crate::cpu::level(), x, w, p, l)
}

fn qkx2_superblocks_at(
    level: Level,
    x: [&[f32; 256]; KX_GROUP],
    w: [&[f32; 256]; KX_GROUP],
    p: Qkx2Params,
    l: [&mut [u8; 256]; KX_GROUP],
) -> [[(f32, f32); KX_SUBS]; KX_GROUP] {
    #[cfg(target_arch = "x86_64")]
    {
        if level.isa().has_avx512() {
            return x86::qkx2_superblocks_avx512(level, x, w, p, l);
        }
        if level.isa().has_avx2() {
            return x86::qkx2_superblocks_avx2(level, x, w, p, l);
        }
    }
    let _ = level;
    qkx2_superblocks(x, w, p, l)
}

/// Sub-block length for Q6_K.
pub const QX_N: usize = 16;

/// ggml's `make_qx_quants(16, nmax, x, L, rmse_type = 1, NULL)` (used by Q6_K with nmax = 32),
/// scalar reference. Returns the signed scale; `l` gets `level + nmax` in 0..2·nmax.
///
/// Weights are `x²`; candidates `iscale = −(nmax + 0.1·is)/max` for is = −9..=9 are tried
/// after the first guess `−nmax/max`, keeping the one with the largest `(Σwxl)²/Σwl²`.
pub fn make_qx_quants_scalar(x: &[f32; QX_N], nmax: i32, l: &mut [u8; QX_N]) -> f32 {
    let Some(max) = qx_signed_max(x) else {
        *l = [0; QX_N];
        return 0.0;
    };
    let (mut sumlx, mut suml2) = qx_sums(x, -(nmax as f32) / max, nmax);
    let mut best_iscale = -(nmax as f32) / max;
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (slx, sl2) = qx_sums(x, iscale, nmax);
        (sumlx, suml2) = (slx, sl2);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            best_iscale = iscale;
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    qx_levels(x, best_iscale, nmax, l);
    scale
}

/// The signed element of largest magnitude (first one on ties), or `None` if the group is
/// all (nearly) zero — ggml's `GROUP_MAX_EPS` test.
#[inline(always)]
fn qx_signed_max(x: &[f32; QX_N]) -> Option<f32> {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < 1e-15 {
        None
    } else {
        Some(max)
    }
}

/// Quantize `iscale*x` to −nmax..nmax (a level before the `+ nmax` offset).
#[inline(always)]
fn qx_level(iscale: f32, x: f32, nmax: i32) -> i32 {
    nearest_int(iscale * x).clamp(-nmax, nmax - 1)
}

#[inline(always)]
fn qx_sums(x: &[f32; QX_N], iscale: f32, nmax: i32) -> (f32, f32) {
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for &xi in x {
        let q = qx_level(iscale, xi, nmax) as f32;
        let w = xi * xi;
        sumlx += w * xi * q;
        suml2 += w * q * q;
    }
    (sumlx, suml2)
}

#[inline(always)]
fn qx_levels(x: &[f32; QX_N], iscale: f32, nmax: i32, l: &mut [u8; QX_N]) {
    for (o, &xi) in l.iter_mut().zip(x) {
        *o = (nmax + qx_level(iscale, xi, nmax)) as u8;
    }
}

/// Sub-blocks of a Q6_K super-block.
const QX_SUBS: usize = 16;

/// `make_qx_quants` (rmse_type 1) for `L` sub-blocks side by side, lane `j` being sub-block
/// `j` (`xt[i][j]` is its element `i`; levels go to `lt` in the same layout). Each lane runs
/// the scalar reference's operations in its order — the first guess, then is = −9..=−1,
/// 1..=9, the comparison included — so the results are bit-identical to it.
// Element and lane loops index several arrays in lockstep; iterators would hide that.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn qx_lanes<const L: usize>(
    xt: &[[f32; L]; QX_N],
    nmax: i32,
    lt: &mut [[u8; L]; QX_N],
) -> [f32; L] {
    let nmaxf = nmax as f32;
    // qx_signed_max: the first element of largest magnitude.
    let (mut max, mut amax) = ([0.0f32; L], [0.0f32; L]);
    for i in 0..QX_N {
        for j in 0..L {
            let v = xt[i][j];
            let gt = v.abs() > amax[j];
            amax[j] = if gt { v.abs() } else { amax[j] };
            max[j] = if gt { v } else { max[j] };
        }
    }
    let sums = |iscale: &[f32; L]| {
        let (mut sumlx, mut suml2) = ([0.0f32; L], [0.0f32; L]);
        for i in 0..QX_N {
            for j in 0..L {
                let xi = xt[i][j];
                let q = qx_level(iscale[j], xi, nmax) as f32;
                let w = xi * xi;
                sumlx[j] += w * xi * q;
                suml2[j] += w * q * q;
            }
        }
        (sumlx, suml2)
    };
    let mut best_iscale = [0.0f32; L];
    for j in 0..L {
        best_iscale[j] = -nmaxf / max[j];
    }
    let (sumlx, suml2) = sums(&best_iscale);
    let (mut scale, mut best) = ([0.0f32; L], [0.0f32; L]);
    for j in 0..L {
        scale[j] = if suml2[j] != 0.0 {
            sumlx[j] / suml2[j]
        } else {
            0.0
        };
        best[j] = scale[j] * sumlx[j];
    }
    let mut iscale = [0.0f32; L];
    for is in (-9i32..=9).filter(|&is| is != 0) {
        let num = -(nmaxf + 0.1 * is as f32);
        for j in 0..L {
            iscale[j] = num / max[j];
        }
        let (sumlx, suml2) = sums(&iscale);
        for j in 0..L {
            // `&`, not `&&`: no branch per lane, so the loop stays one vector.
            let take = (suml2[j] > 0.0) & (sumlx[j] * sumlx[j] > best[j] * suml2[j]);
            let s = sumlx[j] / suml2[j];
            best_iscale[j] = if take { iscale[j] } else { best_iscale[j] };
            scale[j] = if take { s } else { scale[j] };
            best[j] = if take { s * sumlx[j] } else { best[j] };
        }
    }
    // An all-(nearly-)zero sub-block (ggml's GROUP_MAX_EPS) gets scale 0 and levels 0.
    let mut zero = [false; L];
    for j in 0..L {
        zero[j] = amax[j] < 1e-15;
    }
    for i in 0..QX_N {
        for j in 0..L {
            let q = nmax + qx_level(best_iscale[j], xt[i][j], nmax);
            lt[i][j] = if zero[j] { 0 } else { q as u8 };
        }
    }
    std::array::from_fn(|j| if zero[j] { 0.0 } else { scale[j] })
}

/// `make_qx_quants` for the 16 sub-blocks of a super-block, all lanes at once.
#[inline(always)]
fn qx_superblock(x: &[f32; 256], nmax: i32, l: &mut [u8; 256]) -> [f32; QX_SUBS] {
    let mut xt = [[0.0f32; QX_SUBS]; QX_N];
    transpose_in(x, 0, &mut xt);
    let mut lt = [[0u8; QX_SUBS]; QX_N];
    let scales = qx_lanes(&xt, nmax, &mut lt);
    transpose_out(&lt, 0, l);
    scales
}

/// ggml's `make_qx_quants` with rmse_type 1 (see [`make_qx_quants_scalar`]) for the 16
/// sub-blocks of a 256-value super-block: returns each sub-block's signed scale, `l` gets
/// the levels. Uses the widest vectors this CPU supports; bit-identical to the scalar
/// reference.
pub fn make_qx_quants_superblock(x: &[f32; 256], nmax: i32, l: &mut [u8; 256]) -> [f32; QX_SUBS] {
    qx_superblock_at(crate::cpu::level(), x, nmax, l)
}

fn qx_superblock_at(level: Level, x: &[f32; 256], nmax: i32, l: &mut [u8; 256]) -> [f32; QX_SUBS] {
    #[cfg(target_arch = "x86_64")]
    {
        if level.isa().has_avx512() {
            return x86::qx_superblock_avx512(level, x, nmax, l);
        }
        if level.isa().has_avx2() {
            return x86::qx_superblock_avx2(level, x, nmax, l);
        }
    }
    let _ = level;
    qx_superblock(x, nmax, l)
}

/// The lane loops compiled for AVX2 and AVX-512. Only mul/add/sub/div, compares, selects,
/// integer min/max and exact conversions appear in them: Rust never contracts `a*b + c` into
/// an FMA, whose single rounding would change the results.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{qkx2_superblocks, qx_superblock, Qkx2Params, KX_GROUP, KX_SUBS, QX_SUBS};
    use crate::cpu::Level;

    /// One wrapper per level: `$name(level, args…)` checks that `level` includes `$features`
    /// and runs `$search(args…)` compiled with them.
    macro_rules! at_level {
        ($(fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $search:expr, $features:literal, $has:ident;)*) => {$(
            pub(super) fn $name(level: Level, $($arg: $ty),*) -> $ret {
                #[target_feature(enable = $features)]
                fn go($($arg: $ty),*) -> $ret {
                    $search($($arg),*)
                }
                assert!(level.isa().$has());
                // SAFETY: a `Level` is supported by this CPU, and the check above says this one
                // includes `go`'s features.
                unsafe { go($($arg),*) }
            }
        )*};
    }

    at_level! {
        fn qkx2_superblocks_avx2(
            x: [&[f32; 256]; KX_GROUP],
            w: [&[f32; 256]; KX_GROUP],
            p: Qkx2Params,
            l: [&mut [u8; 256]; KX_GROUP]
        ) -> [[(f32, f32); KX_SUBS]; KX_GROUP] =
            qkx2_superblocks, "avx2,fma,f16c", has_avx2;
        fn qkx2_superblocks_avx512(
            x: [&[f32; 256]; KX_GROUP],
            w: [&[f32; 256]; KX_GROUP],
            p: Qkx2Params,
            l: [&mut [u8; 256]; KX_GROUP]
        ) -> [[(f32, f32); KX_SUBS]; KX_GROUP] =
            qkx2_superblocks,
            "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c", has_avx512;
        fn qx_superblock_avx2(x: &[f32; 256], nmax: i32, l: &mut [u8; 256]) -> [f32; QX_SUBS] =
            qx_superblock, "avx2,fma,f16c", has_avx2;
        fn qx_superblock_avx512(x: &[f32; 256], nmax: i32, l: &mut [u8; 256]) -> [f32; QX_SUBS] =
            qx_superblock, "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c", has_avx512;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random f32s (xorshift), with a spread of magnitudes and shapes.
    fn rng(seed: &mut u64) -> f32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn sample(seed: &mut u64, kind: u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let u = rng(seed);
                match kind % 6 {
                    0 => u * 0.02,
                    1 => u * u * u * 5.0,
                    2 => u.abs() + 0.1,
                    3 => -(u.abs()) * 1e-3,
                    4 => (u * 8.0).round() * 0.25,
                    _ => {
                        if i % 7 == 0 {
                            u * 30.0
                        } else {
                            u * 0.1
                        }
                    }
                }
            })
            .collect()
    }

    #[test]
    fn nearest_int_is_round_half_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-0.5), 0);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(-2.49), -2);
        assert_eq!(nearest_int(15.51), 16);
        assert_eq!(nearest_int(4_194_303.0), 4_194_303);
        assert_eq!(nearest_int(-4_194_303.0), -4_194_303);
    }

    /// Levels to test: every one this CPU supports.
    fn levels() -> Vec<Level> {
        crate::cpu::available_isas()
            .into_iter()
            .filter_map(|i| i.level())
            .collect()
    }

    /// A super-block whose 8 sub-blocks of 32 mix distributions, sometimes with an all-zero
    /// and a constant sub-block, and ggml's K-quant weights for it.
    fn kx_superblock(seed: &mut u64, t: u64) -> ([f32; 256], [f32; 256]) {
        let mut x = [0.0f32; 256];
        for j in 0..8 {
            let v = sample(seed, t + j as u64, QKX2_N);
            x[32 * j..32 * j + 32].copy_from_slice(&v);
        }
        if t.is_multiple_of(5) {
            x[64..96].fill(0.0);
            x[160..192].fill(-0.25);
        }
        if t % 7 == 3 {
            x[0..32].fill(0.5);
        }
        let mut w = [0.0f32; 256];
        for j in 0..8 {
            let s = &x[32 * j..32 * j + 32];
            let av = (s.iter().map(|a| a * a).sum::<f32>() / 32.0).sqrt();
            for i in 0..QKX2_N {
                w[32 * j + i] = av + s[i].abs();
            }
        }
        (x, w)
    }

    #[test]
    fn qkx2_lanes_equal_scalar_at_every_level() {
        let bits = |r: (f32, f32)| (r.0.to_bits(), r.1.to_bits());
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for t in 0..300u64 {
            let blocks: Vec<([f32; 256], [f32; 256])> = (0..KX_GROUP as u64)
                .map(|k| kx_superblock(&mut seed, t + 3 * k))
                .collect();
            for p in [QKX2_Q4K, QKX2_Q5K] {
                // The scalar reference, sub-block by sub-block.
                let mut want = Vec::new();
                for (x, w) in &blocks {
                    for j in 0..8 {
                        let xs: [f32; 32] = x[32 * j..32 * j + 32].try_into().unwrap();
                        let ws: [f32; 32] = w[32 * j..32 * j + 32].try_into().unwrap();
                        let mut l = [9u8; 32];
                        let r = make_qkx2_quants_scalar(&xs, &ws, p, &mut l);
                        assert!(l.iter().all(|&q| q <= p.nmax));
                        want.push((bits(r), l));
                    }
                }
                for level in levels() {
                    let mut ls = [[3u8; 256]; KX_GROUP];
                    let fits = qkx2_superblocks_at(
                        level,
                        std::array::from_fn(|s| &blocks[s].0),
                        std::array::from_fn(|s| &blocks[s].1),
                        p,
                        ls.each_mut(),
                    );
                    for (k, (r, l)) in want.iter().enumerate() {
                        let (s, j) = (k / 8, k % 8);
                        let msg = format!("{level} t {t} nmax {} superblock {s} sub {j}", p.nmax);
                        assert_eq!(*r, bits(fits[s][j]), "{msg}");
                        assert_eq!(l[..], ls[s][32 * j..32 * j + 32], "{msg}");
                    }
                }
            }
        }
    }

    #[test]
    fn qx_lanes_equal_scalar_at_every_level() {
        let mut seed = 0x1234_5678_9ABC_DEF1u64;
        for t in 0..500u64 {
            let mut x = [0.0f32; 256];
            for j in 0..16 {
                let v = sample(&mut seed, t + j as u64, QX_N);
                x[16 * j..16 * j + 16].copy_from_slice(&v);
            }
            if t % 4 == 1 {
                x[48..64].fill(0.0);
                x[96..112].fill(1e-16);
            }
            let mut want = Vec::new();
            for j in 0..16 {
                let xs: [f32; QX_N] = x[16 * j..16 * j + 16].try_into().unwrap();
                let mut l = [9u8; 16];
                let r = make_qx_quants_scalar(&xs, 32, &mut l);
                assert!(l.iter().all(|&q| q < 64));
                want.push((r.to_bits(), l));
            }
            for level in levels() {
                let mut l = [7u8; 256];
                let scales = qx_superblock_at(level, &x, 32, &mut l);
                for (j, (r, lj)) in want.iter().enumerate() {
                    assert_eq!(*r, scales[j].to_bits(), "{level} t {t} sub {j}");
                    assert_eq!(lj[..], l[16 * j..16 * j + 16], "{level} t {t} sub {j}");
                }
            }
        }
    }

    #[test]
    fn constant_and_zero_groups() {
        let w = [1.0f32; 32];
        let mut l = [3u8; 32];
        // All equal positive: min is clamped to 0, so max ≠ min and a real fit happens.
        let (s, m) = make_qkx2_quants_scalar(&[0.5; 32], &w, QKX2_Q4K, &mut l);
        assert!(s > 0.0 && m == 0.0);
        // All zero: ggml's early return.
        let (s, m) = make_qkx2_quants_scalar(&[0.0; 32], &w, QKX2_Q4K, &mut l);
        assert_eq!((s, m), (0.0, 0.0));
        assert_eq!(l, [0; 32]);
        let mut l16 = [3u8; 16];
        assert_eq!(make_qx_quants_scalar(&[0.0; 16], 32, &mut l16), 0.0);
        assert_eq!(l16, [0; 16]);
        // The same through the lanes: every sub-block of a zero super-block.
        for level in levels() {
            let mut ls = [[3u8; 256]; KX_GROUP];
            let (x, w) = ([0.0; 256], [1.0; 256]);
            let fits = qkx2_superblocks_at(
                level,
                [&x; KX_GROUP],
                [&w; KX_GROUP],
                QKX2_Q4K,
                ls.each_mut(),
            );
            assert!(
                fits.iter().flatten().all(|&(s, m)| s == 0.0 && m == 0.0),
                "{level}"
            );
            assert_eq!(ls, [[0; 256]; KX_GROUP], "{level}");
            let mut l = [3u8; 256];
            let scales = qx_superblock_at(level, &[0.0; 256], 32, &mut l);
            assert_eq!(scales, [0.0; 16], "{level}");
            assert_eq!(l, [0; 256], "{level}");
        }
    }
}
