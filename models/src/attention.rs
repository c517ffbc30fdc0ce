//! The attention kernel: one query against one head's cached keys and values.
//!
//! K and V of a head are (n, hd) row-major blocks, contiguous in the cache (see
//! [`crate::kv_cache`]), so a decode step streams each head's prefix straight from memory.
//! - scores: s[j] = q·K[j]·scale, computed four keys at a time so the four dot products'
//!   multiply-add chains overlap instead of waiting on each other;
//! - output: o = Σⱼ p[j]·V[j], an axpy of each V row into o (which stays in L1).
//!
//! Two variants, picked once at run time: portable Rust (any head size, any CPU; LLVM
//! vectorises it for the baseline target) and, on x86-64 with AVX2+FMA+F16C, explicit
//! intrinsics specialised for head_dim 32 and 64 (every GPT-2 size uses 64), which keep q and
//! the output in registers and widen f16 with one `vcvtph2ps` per 8 values. (Auto-vectorising
//! the portable loops for AVX2 gave mostly 128-bit code and was 4–5× slower.) Both are
//! deterministic, and prefill and decode run the same kernel, so a query's attention output
//! does not depend on how the tokens were batched.

use half::f16;

use crate::ops;

/// One head's cached keys and values, (positions, hd) row-major (row j of `k` is
/// `k[j * hd..(j + 1) * hd]`), in the cache's element type. F16 rows are widened a few at a
/// time inside the kernel, into a buffer that stays in L1, so a decode step reads the cache
/// exactly once.
#[derive(Clone, Copy, Debug)]
pub enum HeadKv<'a> {
    F32 { k: &'a [f32], v: &'a [f32] },
    F16 { k: &'a [f16], v: &'a [f16] },
}

/// Rows of K or V in some element type, readable as f32.
trait Rows {
    /// `len` values from `start` as f32: borrowed, or widened into `buf` (≥ len).
    fn f32s<'a>(&'a self, start: usize, len: usize, buf: &'a mut [f32]) -> &'a [f32];
}

impl Rows for &[f32] {
    #[inline(always)]
    fn f32s<'a>(&'a self, start: usize, len: usize, _buf: &'a mut [f32]) -> &'a [f32] {
        &self[start..start + len]
    }
}

impl Rows for &[f16] {
    #[inline(always)]
    fn f32s<'a>(&'a self, start: usize, len: usize, buf: &'a mut [f32]) -> &'a [f32] {
        let out = &mut buf[..len];
        f16_to_f32_impl(&self[start..start + len], out);
        out
    }
}

/// Causal attention of one query: out = softmax(q·Kᵀ·scale)·V over positions 0..n.
/// q, out: (hd); scores: scratch of ≥ n + 4·hd (the tail holds widened f16 rows). The rows
/// of `kv` must hold at least n positions.
pub fn attend(
    q: &[f32],
    kv: &HeadKv<'_>,
    n: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && avx2::attend(q, kv, n, scale, scores, out) {
        return;
    }
    attend_impl::<false>(q, kv, n, scale, scores, out)
}

/// Two queries of one sequence over the same K/V (`n[i]` positions each; consecutive prompt
/// positions in practice), each with its own scores scratch (≥ n[i] + 4·hd) and output.
/// Every result is bit-identical to [`attend`] on that query alone — the batch a prompt is
/// split into never changes its output — but K and V are read once for both.
pub fn attend2(
    q: [&[f32]; 2],
    kv: &HeadKv<'_>,
    n: [usize; 2],
    scale: f32,
    scores: [&mut [f32]; 2],
    out: [&mut [f32]; 2],
) {
    let [s0, s1] = scores;
    let [o0, o1] = out;
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && avx2::attend2(q, kv, n, scale, [&mut *s0, &mut *s1], [&mut *o0, &mut *o1]) {
        return;
    }
    attend(q[0], kv, n[0], scale, s0, o0);
    attend(q[1], kv, n[1], scale, s1, o1);
}

/// The portable variant, whatever the CPU (tests compare the two).
pub fn attend_portable(
    q: &[f32],
    kv: &HeadKv<'_>,
    n: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_impl::<false>(q, kv, n, scale, scores, out)
}

/// Whether the AVX2 kernels may run: the level ggpt-quant's `cpu` module chose (CPU
/// features and `GGPT_ISA`, the switch the matmul kernels honour too) includes AVX2 + FMA + F16C.
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    ggpt_quant::cpu::avx2()
}

/// a·b + c, fused when the variant is compiled with FMA (an unfused `mul_add` would be a
/// libm call on the baseline target).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn attend_impl<const FMA: bool>(
    q: &[f32],
    kv: &HeadKv<'_>,
    n: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    match *kv {
        HeadKv::F32 { k, v } => attend_rows::<FMA, _>(q, k, v, n, scale, scores, out),
        HeadKv::F16 { k, v } => attend_rows::<FMA, _>(q, k, v, n, scale, scores, out),
    }
}

#[inline(always)]
fn attend_rows<const FMA: bool, R: Rows>(
    q: &[f32],
    k: R,
    v: R,
    n: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    let (s, wide) = scores.split_at_mut(n);
    // Scores, four keys per step.
    let n4 = n / 4 * 4;
    for j in (0..n4).step_by(4) {
        let d4 = dot4::<FMA>(q, k.f32s(j * hd, 4 * hd, wide));
        for (i, dj) in d4.into_iter().enumerate() {
            s[j + i] = dj * scale;
        }
    }
    for (j, sj) in s.iter_mut().enumerate().skip(n4) {
        *sj = dot_impl::<FMA>(q, k.f32s(j * hd, hd, wide)) * scale;
    }
    softmax_impl::<FMA>(s);
    // Output: o = Σ p[j]·V[j].
    out.fill(0.0);
    for (j, &p) in s.iter().enumerate() {
        let vr = v.f32s(j * hd, hd, wide);
        for (o, &x) in out.iter_mut().zip(vr) {
            *o = madd::<FMA>(p, x, *o);
        }
    }
}

/// q·K[j] for the four rows of `k4` (4·hd values), with independent accumulators.
#[inline(always)]
fn dot4<const FMA: bool>(q: &[f32], k4: &[f32]) -> [f32; 4] {
    let hd = q.len();
    let (k0, k1, k2, k3) = (
        &k4[..hd],
        &k4[hd..2 * hd],
        &k4[2 * hd..3 * hd],
        &k4[3 * hd..],
    );
    let mut acc = [[0.0f32; 8]; 4];
    let chunks = hd / 8 * 8;
    for c in (0..chunks).step_by(8) {
        for l in 0..8 {
            let x = q[c + l];
            acc[0][l] = madd::<FMA>(x, k0[c + l], acc[0][l]);
            acc[1][l] = madd::<FMA>(x, k1[c + l], acc[1][l]);
            acc[2][l] = madd::<FMA>(x, k2[c + l], acc[2][l]);
            acc[3][l] = madd::<FMA>(x, k3[c + l], acc[3][l]);
        }
    }
    let mut out = [0.0f32; 4];
    for (r, (o, a)) in out.iter_mut().zip(&acc).enumerate() {
        let row = &k4[r * hd..(r + 1) * hd];
        let mut tail = 0.0f32;
        for i in chunks..hd {
            tail = madd::<FMA>(q[i], row[i], tail);
        }
        *o = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])) + tail;
    }
    out
}

/// f16 → f32 for a whole slice (`dst.len() == src.len()`), exact.
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    ggpt_quant::f16::f16_to_f32_row(src, dst)
}

/// f16 → f32 inlined into the caller (so it vectorises with the caller's instruction set).
#[inline(always)]
fn f16_to_f32_impl(src: &[f16], dst: &mut [f32]) {
    ggpt_quant::f16::f16_to_f32_portable(src, dst)
}

/// Softmax with the exponential inlined, so it vectorises in each variant.
#[inline(always)]
fn softmax_impl<const FMA: bool>(x: &mut [f32]) {
    let mut m = f32::NEG_INFINITY;
    for &v in x.iter() {
        m = m.max(v);
    }
    let mut acc = [0.0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for l in 0..8 {
            c[l] = ops::exp(c[l] - m);
            acc[l] += c[l];
        }
    }
    let mut total = 0.0f32;
    for v in chunks.into_remainder() {
        *v = ops::exp(*v - m);
        total += *v;
    }
    let total =
        (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + total;
    let inv = 1.0 / total;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[inline(always)]
fn dot_impl<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] = madd::<FMA>(x[l], y[l], acc[l]);
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ar.iter().zip(br) {
        tail = madd::<FMA>(*x, *y, tail);
    }
    let mut s8 = [0.0f32; 8];
    for l in 0..8 {
        s8[l] = acc[l] + acc[l + 8];
    }
    ((s8[0] + s8[4]) + (s8[1] + s8[5])) + ((s8[2] + s8[6]) + (s8[3] + s8[7])) + tail
}

/// Explicit AVX2/FMA/F16C kernels. Every function here is only called after [`has_avx2`]
/// returned true, and checks slice lengths before any pointer arithmetic.
///
/// The building blocks (a 4-key score block, a single key, the p·V sum) are shared by the
/// one-query and the two-query kernels, so that a query's result is bit-identical whichever
/// kernel computed it: the two-query kernel only interleaves two queries' independent
/// multiply-add chains (which doubles the chains in flight: one query's four score chains
/// leave the FMA units half idle on their 4-cycle latency) and loads each K and V row once for
/// both.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::HeadKv;

    /// An element type of cached K/V rows, read 8 at a time as f32.
    pub(super) trait Elem: Copy {
        /// # Safety
        /// AVX2/F16C available; 8 elements readable at `p`.
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Elem for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
    }

    impl Elem for f16 {
        /// Widened exactly with one `vcvtph2ps`.
        #[inline(always)]
        unsafe fn load8(p: *const f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<__m128i>()))
        }
    }

    /// Whether the kernels handle this call: head size 32 or 64 and every slice long enough.
    fn fits(hd: usize, kv: &HeadKv<'_>, n: usize, scores: usize, out: usize) -> bool {
        let (klen, vlen) = match kv {
            HeadKv::F32 { k, v } => (k.len(), v.len()),
            HeadKv::F16 { k, v } => (k.len(), v.len()),
        };
        (hd == 32 || hd == 64) && out == hd && scores >= n && klen >= n * hd && vlen >= n * hd
    }

    /// The AVX2 kernel when it supports the head size (32 or 64); `false` otherwise, or if a
    /// slice is too short (then the caller's portable path handles, or reports, it).
    pub(super) fn attend(
        q: &[f32],
        kv: &HeadKv<'_>,
        n: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) -> bool {
        let hd = q.len();
        if !fits(hd, kv, n, scores.len(), out.len()) {
            return false;
        }
        let s = &mut scores[..n];
        // SAFETY: has_avx2() confirmed AVX2, FMA and F16C before we were called; the
        // lengths the kernels read (n rows of hd for K and V, hd for q and out, n scores)
        // were checked by `fits`.
        unsafe {
            match (*kv, hd) {
                (HeadKv::F32 { k, v }, 64) => one::<f32, 64>(q, k, v, n, scale, s, out),
                (HeadKv::F32 { k, v }, _) => one::<f32, 32>(q, k, v, n, scale, s, out),
                (HeadKv::F16 { k, v }, 64) => one::<f16, 64>(q, k, v, n, scale, s, out),
                (HeadKv::F16 { k, v }, _) => one::<f16, 32>(q, k, v, n, scale, s, out),
            }
        }
        true
    }

    /// Two queries over the same K/V (`n[i]` positions each); `false` if not handled.
    pub(super) fn attend2(
        q: [&[f32]; 2],
        kv: &HeadKv<'_>,
        n: [usize; 2],
        scale: f32,
        scores: [&mut [f32]; 2],
        out: [&mut [f32]; 2],
    ) -> bool {
        let hd = q[0].len();
        let ok = q[1].len() == hd
            && fits(hd, kv, n[0], scores[0].len(), out[0].len())
            && fits(hd, kv, n[1], scores[1].len(), out[1].len());
        if !ok {
            return false;
        }
        let [s0, s1] = scores;
        let s = [&mut s0[..n[0]], &mut s1[..n[1]]];
        // SAFETY: as in `attend`; `fits` checked both queries' lengths.
        unsafe {
            match (*kv, hd) {
                (HeadKv::F32 { k, v }, 64) => two::<f32, 64>(q, k, v, n, scale, s, out),
                (HeadKv::F32 { k, v }, _) => two::<f32, 32>(q, k, v, n, scale, s, out),
                (HeadKv::F16 { k, v }, 64) => two::<f16, 64>(q, k, v, n, scale, s, out),
                (HeadKv::F16 { k, v }, _) => two::<f16, 32>(q, k, v, n, scale, s, out),
            }
        }
        true
    }

    /// [`crate::ops::exp`] on 8 lanes, operation for operation (separate multiplies and adds,
    /// as the scalar code is compiled), so the results are bit-identical to it.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        use crate::ops::exp_consts::*;
        let set = _mm256_set1_ps;
        let (mul, add) = (_mm256_mul_ps, _mm256_add_ps);
        // Operand order matters: `max_ps`/`min_ps` return the second operand when one is NaN,
        // so a NaN score stays NaN (as `f32::clamp` keeps it) instead of becoming e^X_MIN.
        let x = _mm256_min_ps(set(X_MAX), _mm256_max_ps(set(X_MIN), x));
        let t = add(mul(x, set(LOG2E)), set(SHIFTER));
        let n = _mm256_sub_epi32(
            _mm256_castps_si256(t),
            _mm256_set1_epi32(SHIFTER.to_bits() as i32),
        );
        let nf = _mm256_sub_ps(t, set(SHIFTER));
        let r = _mm256_sub_ps(_mm256_sub_ps(x, mul(nf, set(LN2_HI))), mul(nf, set(LN2_LO)));
        let mut p = set(P[0]);
        for c in &P[1..] {
            p = add(mul(p, r), set(*c));
        }
        let er = add(add(mul(mul(p, r), r), r), set(1.0));
        let two_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            n,
            _mm256_set1_epi32(127),
        )));
        mul(er, two_n)
    }

    /// [`super::softmax_impl`] with explicit 8-lane max and exp (LLVM keeps the portable
    /// max loop scalar: `f32::max` is not associative for NaN): bit-identical results.
    #[inline(always)]
    unsafe fn softmax(x: &mut [f32]) {
        let n8 = x.len() / 8 * 8;
        let p = x.as_mut_ptr();
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        for i in (0..n8).step_by(8) {
            mv = _mm256_max_ps(mv, _mm256_loadu_ps(p.add(i)));
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
        let mut m = f32::NEG_INFINITY;
        for &v in lanes.iter().chain(&x[n8..]) {
            m = m.max(v);
        }
        let (mb, mut acc) = (_mm256_set1_ps(m), _mm256_setzero_ps());
        for i in (0..n8).step_by(8) {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mb));
            _mm256_storeu_ps(p.add(i), e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut total = 0.0f32;
        for v in x[n8..].iter_mut() {
            *v = crate::ops::exp(*v - m);
            total += *v;
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let a = lanes;
        let total = (a[0] + a[4]) + (a[1] + a[5]) + ((a[2] + a[6]) + (a[3] + a[7])) + total;
        let inv = _mm256_set1_ps(1.0 / total);
        for i in (0..n8).step_by(8) {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv));
        }
        let inv = 1.0 / total;
        for v in x[n8..].iter_mut() {
            *v *= inv;
        }
    }

    /// The AVX2 softmax, for tests (callers check [`super::has_avx2`] first).
    #[cfg(test)]
    pub(super) fn softmax_checked(x: &mut [f32]) {
        assert!(super::has_avx2());
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn run(x: &mut [f32]) {
            softmax(x)
        }
        // SAFETY: AVX2/FMA/F16C asserted above.
        unsafe { run(x) }
    }

    /// Sum of the 8 lanes.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        let x = _mm_add_ss(x, _mm_movehdup_ps(x));
        _mm_cvtss_f32(x)
    }

    /// q·scale in registers (HD/8 vectors used).
    #[inline(always)]
    unsafe fn scaled_q<const HD: usize>(q: &[f32], scale: f32) -> [__m256; 8] {
        let mut qv = [_mm256_setzero_ps(); 8];
        for (i, r) in qv.iter_mut().enumerate().take(HD / 8) {
            *r = _mm256_mul_ps(
                _mm256_loadu_ps(q.as_ptr().add(8 * i)),
                _mm256_set1_ps(scale),
            );
        }
        qv
    }

    /// The four dot products of one 4-key block, reduced: hadd twice leaves, per 128-bit
    /// half, [Σa0, Σa1, Σa2, Σa3] partial sums.
    #[inline(always)]
    unsafe fn reduce4(a: [__m256; 4]) -> __m128 {
        let t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t))
    }

    /// Cache rows (positions) read ahead of the one being used: 8 KiB of an F16 head.
    const AHEAD_ROWS: usize = 64;

    /// Request into L2 the `rows` cache rows `AHEAD_ROWS` after row `j` (of `HD` elements at
    /// `p`): a head's keys and values stream from memory at depth, like the weights (callers
    /// skip it when those rows are past the keys in use).
    #[inline(always)]
    fn ahead<E: Elem, const HD: usize>(p: *const E, j: usize, rows: usize) {
        let base = p.wrapping_add((j + AHEAD_ROWS) * HD).cast::<u8>();
        ggpt_quant::dot::prefetch_l2(base, rows * HD * std::mem::size_of::<E>());
    }

    /// Scores of keys j..n for one query, from key `j` on: 4-key blocks with independent FMA
    /// chains, then single keys.
    #[inline(always)]
    unsafe fn scores_from<E: Elem, const HD: usize>(
        qv: &[__m256; 8],
        kp: *const E,
        mut j: usize,
        n: usize,
        sp: *mut f32,
    ) {
        while j + 4 <= n {
            if j + AHEAD_ROWS < n {
                ahead::<E, HD>(kp, j, 4);
            }
            let mut a = [_mm256_setzero_ps(); 4];
            for (i, qi) in qv.iter().enumerate().take(HD / 8) {
                for (r, acc) in a.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(*qi, E::load8(kp.add((j + r) * HD + 8 * i)), *acc);
                }
            }
            _mm_storeu_ps(sp.add(j), reduce4(a));
            j += 4;
        }
        while j < n {
            let mut acc = _mm256_setzero_ps();
            for (i, qi) in qv.iter().enumerate().take(HD / 8) {
                acc = _mm256_fmadd_ps(*qi, E::load8(kp.add(j * HD + 8 * i)), acc);
            }
            *sp.add(j) = hsum(acc);
            j += 1;
        }
    }

    /// Add Σ p[j]·V[j] for j in `from..p.len()` to the output vectors `o` (chunks `i0..` of
    /// the head): each output lane is one FMA chain over j in order.
    #[inline(always)]
    unsafe fn pv_from<E: Elem, const HD: usize, const W: usize>(
        p: &[f32],
        vp: *const E,
        from: usize,
        i0: usize,
        o: &mut [__m256; W],
    ) {
        for (j, &pj) in p.iter().enumerate().skip(from) {
            if i0 == 0 && j + AHEAD_ROWS < p.len() {
                ahead::<E, HD>(vp, j, 1);
            }
            let pv = _mm256_set1_ps(pj);
            for (i, oi) in o.iter_mut().enumerate() {
                *oi = _mm256_fmadd_ps(pv, E::load8(vp.add(j * HD + 8 * (i0 + i))), *oi);
            }
        }
    }

    /// One query.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `k` and `v` must hold ≥ n·HD values, `q` and
    /// `out` HD, `s` n; HD is 32 or 64.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn one<E: Elem, const HD: usize>(
        q: &[f32],
        k: &[E],
        v: &[E],
        n: usize,
        scale: f32,
        s: &mut [f32],
        out: &mut [f32],
    ) {
        let qv = scaled_q::<HD>(q, scale);
        scores_from::<E, HD>(&qv, k.as_ptr(), 0, n, s.as_mut_ptr());
        softmax(s);
        // o in registers.
        let op = out.as_mut_ptr();
        if HD == 64 {
            let mut o = [_mm256_setzero_ps(); 8];
            pv_from::<E, HD, 8>(s, v.as_ptr(), 0, 0, &mut o);
            for (i, oi) in o.iter().enumerate() {
                _mm256_storeu_ps(op.add(8 * i), *oi);
            }
        } else {
            let mut o = [_mm256_setzero_ps(); 4];
            pv_from::<E, HD, 4>(s, v.as_ptr(), 0, 0, &mut o);
            for (i, oi) in o.iter().enumerate() {
                _mm256_storeu_ps(op.add(8 * i), *oi);
            }
        }
    }

    /// Two queries; each result is bit-identical to [`one`]'s for that query.
    ///
    /// # Safety
    /// As [`one`], for each query: `s[i]` has n[i] scores.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn two<E: Elem, const HD: usize>(
        q: [&[f32]; 2],
        k: &[E],
        v: &[E],
        n: [usize; 2],
        scale: f32,
        s: [&mut [f32]; 2],
        out: [&mut [f32]; 2],
    ) {
        let (kp, vp) = (k.as_ptr(), v.as_ptr());
        let qa = scaled_q::<HD>(q[0], scale);
        let qb = scaled_q::<HD>(q[1], scale);
        let [s0, s1] = s;
        // Scores: the 4-key blocks both queries have, with K loaded once for both (eight
        // chains in flight), then each query's own remainder.
        let common = n[0].min(n[1]) / 4 * 4;
        let mut j = 0;
        while j < common {
            let (mut a, mut b) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
            for i in 0..HD / 8 {
                for r in 0..4 {
                    let kx = E::load8(kp.add((j + r) * HD + 8 * i));
                    a[r] = _mm256_fmadd_ps(qa[i], kx, a[r]);
                    b[r] = _mm256_fmadd_ps(qb[i], kx, b[r]);
                }
            }
            _mm_storeu_ps(s0.as_mut_ptr().add(j), reduce4(a));
            _mm_storeu_ps(s1.as_mut_ptr().add(j), reduce4(b));
            j += 4;
        }
        scores_from::<E, HD>(&qa, kp, j, n[0], s0.as_mut_ptr());
        scores_from::<E, HD>(&qb, kp, j, n[1], s1.as_mut_ptr());
        softmax(s0);
        softmax(s1);
        // Output, four vectors (32 lanes) of both queries at a time so the accumulators fit
        // the 16 registers: V loaded once for the positions both queries see.
        let both = n[0].min(n[1]);
        let [o0, o1] = out;
        for i0 in (0..HD / 8).step_by(4) {
            let (mut a, mut b) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
            for j in 0..both {
                let (pa, pb) = (_mm256_set1_ps(s0[j]), _mm256_set1_ps(s1[j]));
                for i in 0..4 {
                    let vx = E::load8(vp.add(j * HD + 8 * (i0 + i)));
                    a[i] = _mm256_fmadd_ps(pa, vx, a[i]);
                    b[i] = _mm256_fmadd_ps(pb, vx, b[i]);
                }
            }
            pv_from::<E, HD, 4>(s0, vp, both, i0, &mut a);
            pv_from::<E, HD, 4>(s1, vp, both, i0, &mut b);
            for i in 0..4 {
                _mm256_storeu_ps(o0.as_mut_ptr().add(8 * (i0 + i)), a[i]);
                _mm256_storeu_ps(o1.as_mut_ptr().add(8 * (i0 + i)), b[i]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// Naive attention in f64 from K and V in (pos, hd) layout.
    fn reference(q: &[f32], k: &[f32], v: &[f32], n: usize, scale: f32) -> Vec<f64> {
        let hd = q.len();
        let s: Vec<f64> = (0..n)
            .map(|j| {
                (0..hd)
                    .map(|d| q[d] as f64 * k[j * hd + d] as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        (0..hd)
            .map(|d| {
                (0..n)
                    .map(|j| (s[j] - m).exp() / z * v[j * hd + d] as f64)
                    .sum()
            })
            .collect()
    }

    #[test]
    fn two_queries_give_bit_identical_results_to_one() {
        // Equal lengths, consecutive positions, lengths on both sides of a 4-key block, tiny
        // prefixes, and head sizes the AVX2 kernels do not take (portable fallback).
        let pairs = [
            (1, 2),
            (4, 5),
            (7, 8),
            (8, 9),
            (37, 38),
            (40, 40),
            (3, 100),
            (100, 3),
        ];
        for hd in [64, 32, 16] {
            for (n0, n1) in pairs {
                let nmax = n0.max(n1);
                let q0: Vec<f32> = values(hd, 11).iter().map(|x| x * 3.0).collect();
                let q1: Vec<f32> = values(hd, 12).iter().map(|x| x * 3.0).collect();
                let k = values(nmax * hd, 13);
                let v = values(nmax * hd, 14);
                let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
                let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
                let scale = 1.0 / (hd as f32).sqrt();
                for kv in [
                    HeadKv::F32 { k: &k, v: &v },
                    HeadKv::F16 { k: &k16, v: &v16 },
                ] {
                    let mut s = vec![0.0; nmax + 4 * hd];
                    let (mut w0, mut w1) = (vec![0.0; hd], vec![0.0; hd]);
                    attend(&q0, &kv, n0, scale, &mut s, &mut w0);
                    attend(&q1, &kv, n1, scale, &mut s, &mut w1);
                    let (mut sa, mut sb) = (vec![0.0; nmax + 4 * hd], vec![0.0; nmax + 4 * hd]);
                    let (mut g0, mut g1) = (vec![7.0; hd], vec![7.0; hd]);
                    attend2(
                        [&q0, &q1],
                        &kv,
                        [n0, n1],
                        scale,
                        [&mut sa, &mut sb],
                        [&mut g0, &mut g1],
                    );
                    for d in 0..hd {
                        assert_eq!(
                            g0[d].to_bits(),
                            w0[d].to_bits(),
                            "hd {hd} n {n0}/{n1} q0[{d}]"
                        );
                        assert_eq!(
                            g1[d].to_bits(),
                            w1[d].to_bits(),
                            "hd {hd} n {n0}/{n1} q1[{d}]"
                        );
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_softmax_is_bit_identical_to_the_portable_one() {
        if !has_avx2() {
            return;
        }
        for n in [1, 3, 8, 9, 31, 64, 200, 1023] {
            // Scores with a wide range, so the exponent clamps and underflow are hit too.
            let x: Vec<f32> = values(n, n as u64).iter().map(|v| v * 120.0).collect();
            let (mut a, mut b) = (x.clone(), x.clone());
            softmax_impl::<true>(&mut a);
            avx2::softmax_checked(&mut b);
            for i in 0..n {
                assert_eq!(
                    a[i].to_bits(),
                    b[i].to_bits(),
                    "n {n}, i {i}: {} vs {}",
                    a[i],
                    b[i]
                );
            }
        }
    }

    /// A NaN score (a NaN key or query: bad weights upstream) makes the whole row NaN on
    /// every path, so it reaches the logits, where the session reports it.
    #[test]
    fn a_non_finite_score_makes_the_whole_softmax_row_nan() {
        for n in [3, 9, 64, 200] {
            for (at, bad) in [(0, f32::NAN), (n - 1, f32::NAN), (n / 2, f32::INFINITY)] {
                let mut x: Vec<f32> = values(n, 7).iter().map(|v| v * 10.0).collect();
                x[at] = bad;
                // Only x86-64 adds a second path.
                #[cfg_attr(not(target_arch = "x86_64"), allow(clippy::useless_vec))]
                let mut rows = vec![x.clone()];
                softmax_impl::<true>(&mut rows[0]);
                #[cfg(target_arch = "x86_64")]
                if has_avx2() {
                    let mut b = x.clone();
                    avx2::softmax_checked(&mut b);
                    rows.push(b);
                }
                for (path, r) in rows.iter().enumerate() {
                    let finite = r.iter().filter(|v| v.is_finite()).count();
                    assert_eq!(finite, 0, "n {n}, {bad} at {at}, path {path}: {r:?}");
                }
            }
        }
    }

    #[test]
    fn f16_conversion_is_exact_for_every_bit_pattern() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut got = vec![0.0f32; all.len()];
        f16_to_f32(&all, &mut got);
        let mut portable = vec![0.0f32; all.len()];
        f16_to_f32_impl(&all, &mut portable);
        for (i, h) in all.iter().enumerate() {
            let want = h.to_f32();
            for g in [got[i], portable[i]] {
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "{:#06x}: {g} vs {want}",
                    h.to_bits()
                );
            }
        }
    }

    #[test]
    fn both_variants_match_naive_attention() {
        let shapes = [
            (64, 1),
            (64, 37),
            (32, 300),
            (16, 17),
            (6, 9),
            (64, 4),
            (12, 7),
        ];
        for (hd, n) in shapes {
            let q: Vec<f32> = values(hd, 1).iter().map(|x| x * 4.0).collect();
            // Rows beyond n hold garbage the kernel must not read into the result.
            let k = values((n + 3) * hd, 2);
            let v = values((n + 3) * hd, 3);
            let scale = 1.0 / (hd as f32).sqrt();
            let mut scores = vec![0.0; n + 4 * hd];
            // f32 rows, and the same values stored as f16 (reference computed from those).
            let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
            let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            let k16f: Vec<f32> = k16.iter().map(|x| x.to_f32()).collect();
            let v16f: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
            let cases = [
                (HeadKv::F32 { k: &k, v: &v }, &k, &v),
                (HeadKv::F16 { k: &k16, v: &v16 }, &k16f, &v16f),
            ];
            for (kv, kr, vr) in cases {
                let want = reference(&q, kr, vr, n, scale);
                let (mut a, mut b) = (vec![9.0; hd], vec![9.0; hd]);
                attend(&q, &kv, n, scale, &mut scores, &mut a);
                attend_portable(&q, &kv, n, scale, &mut scores, &mut b);
                for d in 0..hd {
                    let (x, y, w) = (a[d] as f64, b[d] as f64, want[d]);
                    assert!((x - w).abs() < 1e-5, "hd {hd} n {n}: {x} vs {w}");
                    assert!((y - w).abs() < 1e-5, "hd {hd} n {n}: {y} vs {w}");
                }
            }
        }
    }
}
