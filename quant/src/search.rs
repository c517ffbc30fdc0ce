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
//! accumulated in element order (f32 addition is not associative), so instead of
//! vectorising over elements the fast versions put *candidates* in SIMD lanes: lane `c`
//! does exactly the scalar sequence of operations for candidate `c`. The scalar versions
//! are kept as the readable reference and the tests check that both agree bit for bit.

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

/// Running state shared by the scalar and lane-parallel `make_qkx2_quants`.
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

/// Candidates evaluated side by side: one 8-wide vector.
const LANES: usize = 8;

/// One group of up to [`LANES`] candidate scales for one sub-block, ready to evaluate.
#[derive(Clone, Copy)]
struct Qkx2Job<'a> {
    x: &'a [f32; QKX2_N],
    w: &'a [f32; QKX2_N],
    sum_w: f32,
    sum_x: f32,
    /// The search's current min (changes whenever a candidate is accepted).
    min: f32,
    iscale: [f32; LANES],
}

/// The evaluated candidates of a [`Qkx2Job`]. Lane k holds exactly what the scalar loop body
/// computes for candidate k.
struct Qkx2Group {
    /// Levels (as f32) per element and lane.
    lv: [[f32; LANES]; QKX2_N],
    /// The least-squares determinant D > 0 (else the candidate is skipped).
    ok: [bool; LANES],
    scale: [f32; LANES],
    min: [f32; LANES],
    /// Weighted squared error of each candidate's fit.
    mad: [f32; LANES],
}

impl Qkx2Group {
    fn new() -> Self {
        Qkx2Group {
            lv: [[0.0; LANES]; QKX2_N],
            ok: [false; LANES],
            scale: [0.0; LANES],
            min: [0.0; LANES],
            mad: [0.0; LANES],
        }
    }
}

/// Portable evaluator (arrays; the compiler vectorises what it can).
// Lane-wise loops index several arrays in lockstep; iterators would hide that.
#[allow(clippy::needless_range_loop)]
fn qkx2_eval_portable(j: &Qkx2Job, nmax: i32, g: &mut Qkx2Group) {
    let mut sum_l = [0.0f32; LANES];
    let mut sum_l2 = [0.0f32; LANES];
    let mut sum_xl = [0.0f32; LANES];
    for i in 0..QKX2_N {
        let (xi, wi) = (j.x[i], j.w[i]);
        let xm = xi - j.min;
        for k in 0..LANES {
            let q = nearest_int(j.iscale[k] * xm).clamp(0, nmax) as f32;
            g.lv[i][k] = q;
            let wl = wi * q;
            sum_l[k] += wl;
            sum_l2[k] += wl * q;
            sum_xl[k] += wl * xi;
        }
    }
    for k in 0..LANES {
        let d = j.sum_w * sum_l2[k] - sum_l[k] * sum_l[k];
        g.ok[k] = d > 0.0;
        let s = (j.sum_w * sum_xl[k] - j.sum_x * sum_l[k]) / d;
        let m = (sum_l2[k] * j.sum_x - sum_l[k] * sum_xl[k]) / d;
        let clamp = m > 0.0;
        g.min[k] = if clamp { 0.0 } else { m };
        g.scale[k] = if clamp { sum_xl[k] / sum_l2[k] } else { s };
    }
    let mut mad = [0.0f32; LANES];
    for i in 0..QKX2_N {
        let (xi, wi) = (j.x[i], j.w[i]);
        for k in 0..LANES {
            let diff = g.scale[k] * g.lv[i][k] + g.min[k] - xi;
            mad[k] += wi * (diff * diff);
        }
    }
    g.mad = mad;
}

/// The lane-parallel form of one sub-block's `make_qkx2_quants` search.
///
/// The next [`LANES`] candidates are evaluated at once with the current `min`; the first one
/// that beats the best error is accepted exactly as the scalar loop would, and because that
/// changes `min`, evaluation restarts at the candidate after it. A sub-block typically
/// accepts about three candidates, so this costs a few vector passes instead of ~20 scalar
/// ones.
struct Qkx2Search<'a> {
    x: &'a [f32; QKX2_N],
    w: &'a [f32; QKX2_N],
    p: Qkx2Params,
    /// `None` after ggml's early return for a constant block.
    st: Option<Qkx2Start>,
    min: f32,
    scale: f32,
    best_mad: f32,
    /// Next candidate to evaluate.
    base: usize,
}

/// What a search's prologue computes for one sub-block: the range and sums with the first
/// guess's scale and error (its levels go to `l`), or ggml's early return `(scale, the_min)`.
type Qkx2Prologue = Result<(Qkx2Start, f32, f32), (f32, f32)>;

/// The prologues of a super-block's eight sub-blocks side by side, lane j being sub-block j:
/// per lane the operations of [`qkx2_start`] and [`qkx2_first_guess`] in their order, so
/// each lane's results are bit-identical to the scalar ones. Each scalar prologue is two
/// chains of 32 dependent additions; eight of them in the lanes of one vector overlap.
// Element and lane loops index several arrays in lockstep; iterators would hide that.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn qkx2_prologues(
    x: &[f32; 256],
    w: &[f32; 256],
    nmax: i32,
    l: &mut [u8; 256],
) -> [Qkx2Prologue; 8] {
    // xt[i][j] = x[32 j + i]: element i of every sub-block in one row.
    let mut xt = [[0.0f32; 8]; QKX2_N];
    let mut wt = [[0.0f32; 8]; QKX2_N];
    for j in 0..8 {
        for i in 0..QKX2_N {
            xt[i][j] = x[32 * j + i];
            wt[i][j] = w[32 * j + i];
        }
    }
    let (mut min, mut max, mut sum_w) = (xt[0], xt[0], wt[0]);
    let mut sum_x = [0.0f32; 8];
    for j in 0..8 {
        sum_x[j] = sum_w[j] * xt[0][j];
    }
    for i in 1..QKX2_N {
        for j in 0..8 {
            let v = xt[i][j];
            min[j] = if v < min[j] { v } else { min[j] };
            max[j] = if v > max[j] { v } else { max[j] };
            sum_w[j] += wt[i][j];
            sum_x[j] += wt[i][j] * v;
        }
    }
    let (mut iscale, mut scale) = ([0.0f32; 8], [0.0f32; 8]);
    for j in 0..8 {
        min[j] = if min[j] > 0.0 { 0.0 } else { min[j] };
        // Lanes of a constant sub-block divide by zero here; their results are not used.
        iscale[j] = nmax as f32 / (max[j] - min[j]);
        scale[j] = 1.0 / iscale[j];
    }
    let mut best_mad = [0.0f32; 8];
    let mut lt = [[0u8; 8]; QKX2_N];
    for i in 0..QKX2_N {
        for j in 0..8 {
            let q = qkx2_level(iscale[j], xt[i][j], min[j], nmax);
            lt[i][j] = q as u8;
            let diff = scale[j] * q as f32 + min[j] - xt[i][j];
            best_mad[j] += wt[i][j] * (diff * diff);
        }
    }
    std::array::from_fn(|j| {
        let lj = &mut l[32 * j..32 * j + 32];
        if max[j] == min[j] {
            lj.fill(0);
            return Err((0.0, -min[j]));
        }
        for i in 0..QKX2_N {
            lj[i] = lt[i][j];
        }
        let st = Qkx2Start {
            min: min[j],
            max: max[j],
            sum_w: sum_w[j],
            sum_x: sum_x[j],
        };
        Ok((st, scale[j], best_mad[j]))
    })
}

impl<'a> Qkx2Search<'a> {
    /// The scalar prologue: range, sums and the first guess (which sets `l`).
    fn new(
        x: &'a [f32; QKX2_N],
        w: &'a [f32; QKX2_N],
        p: Qkx2Params,
        l: &mut [u8; QKX2_N],
    ) -> Self {
        let pro = qkx2_start(x, w, l).map(|st| {
            let (scale, best_mad) = qkx2_first_guess(x, w, l, p.nmax as i32, st.min, st.max);
            (st, scale, best_mad)
        });
        Self::from_prologue(x, w, p, pro)
    }

    /// A search whose prologue is already done.
    fn from_prologue(
        x: &'a [f32; QKX2_N],
        w: &'a [f32; QKX2_N],
        p: Qkx2Params,
        pro: Qkx2Prologue,
    ) -> Self {
        match pro {
            Ok((st, scale, best_mad)) => Qkx2Search {
                x,
                w,
                p,
                min: st.min,
                st: Some(st),
                scale,
                best_mad,
                base: 0,
            },
            Err((scale, the_min)) => Qkx2Search {
                x,
                w,
                p,
                st: None,
                min: -the_min,
                scale,
                best_mad: 0.0,
                base: 0,
            },
        }
    }

    fn ncand(&self) -> usize {
        self.p.nstep as usize + 1
    }

    /// The next group to evaluate, or `None` when the search is over.
    fn job(&self) -> Option<Qkx2Job<'a>> {
        let st = self.st.as_ref()?;
        if self.base >= self.ncand() {
            return None;
        }
        let (p, nmax) = (self.p, self.p.nmax as f32);
        let mut iscale = [0.0f32; LANES];
        for (k, s) in iscale.iter_mut().enumerate() {
            // Lanes past the last candidate repeat it; their results are ignored.
            let is = (self.base + k).min(self.ncand() - 1);
            *s = (p.rmin + p.rdelta * is as f32 + nmax) / (st.max - self.min);
        }
        Some(Qkx2Job {
            x: self.x,
            w: self.w,
            sum_w: st.sum_w,
            sum_x: st.sum_x,
            min: self.min,
            iscale,
        })
    }

    /// Apply the scalar loop's acceptance test to the evaluated group, in candidate order.
    fn take(&mut self, g: &Qkx2Group, l: &mut [u8; QKX2_N]) {
        for k in 0..LANES.min(self.ncand() - self.base) {
            if g.ok[k] && g.mad[k] < self.best_mad {
                for (li, lv) in l.iter_mut().zip(&g.lv) {
                    *li = lv[k] as u8;
                }
                self.best_mad = g.mad[k];
                self.scale = g.scale[k];
                self.min = g.min[k];
                self.base += k + 1;
                return;
            }
        }
        self.base += LANES;
    }

    fn result(&self) -> (f32, f32) {
        (self.scale, -self.min)
    }
}

/// Run the searches of a whole super-block (8 sub-blocks of 32), two at a time so that the
/// two independent chains of ordered f32 sums overlap (each alone is latency-bound).
/// `eval1`/`eval2` evaluate one or two jobs.
#[inline(always)]
fn qkx2_superblock(
    x: &[f32; 256],
    w: &[f32; 256],
    p: Qkx2Params,
    l: &mut [u8; 256],
    mut eval1: impl FnMut(&Qkx2Job, &mut Qkx2Group),
    mut eval2: impl FnMut(&[Qkx2Job; 2], &mut [Qkx2Group; 2]),
) -> [(f32, f32); 8] {
    let mut out = [(0.0, 0.0); 8];
    let mut g2 = [Qkx2Group::new(), Qkx2Group::new()];
    let mut pro = qkx2_prologues(x, w, p.nmax as i32, l).into_iter();
    for pair in 0..4 {
        let (la, lb) = l[64 * pair..64 * pair + 64].split_at_mut(32);
        let la: &mut [u8; QKX2_N] = la.try_into().expect("32 levels");
        let lb: &mut [u8; QKX2_N] = lb.try_into().expect("32 levels");
        let sub = |v: &'_ [f32; 256], j: usize| -> [f32; QKX2_N] {
            v[32 * j..32 * j + 32].try_into().expect("32 values")
        };
        let (xa, xb, wa, wb) = (
            sub(x, 2 * pair),
            sub(x, 2 * pair + 1),
            sub(w, 2 * pair),
            sub(w, 2 * pair + 1),
        );
        let mut a = Qkx2Search::from_prologue(&xa, &wa, p, pro.next().expect("8 prologues"));
        let mut b = Qkx2Search::from_prologue(&xb, &wb, p, pro.next().expect("8 prologues"));
        loop {
            match (a.job(), b.job()) {
                (Some(ja), Some(jb)) => {
                    eval2(&[ja, jb], &mut g2);
                    a.take(&g2[0], la);
                    b.take(&g2[1], lb);
                }
                (Some(ja), None) => {
                    eval1(&ja, &mut g2[0]);
                    a.take(&g2[0], la);
                }
                (None, Some(jb)) => {
                    eval1(&jb, &mut g2[1]);
                    b.take(&g2[1], lb);
                }
                (None, None) => break,
            }
        }
        out[2 * pair] = a.result();
        out[2 * pair + 1] = b.result();
    }
    out
}

/// ggml's `make_qkx2_quants` (see [`make_qkx2_quants_scalar`]) for one sub-block, in the
/// portable lane-parallel form. Bit-identical to the scalar reference. The quantizers use
/// [`make_qkx2_quants_superblock`], which is faster.
pub fn make_qkx2_quants(
    x: &[f32; QKX2_N],
    w: &[f32; QKX2_N],
    p: Qkx2Params,
    l: &mut [u8; QKX2_N],
) -> (f32, f32) {
    let nmax = p.nmax as i32;
    let mut s = Qkx2Search::new(x, w, p, l);
    let mut g = Qkx2Group::new();
    while let Some(j) = s.job() {
        qkx2_eval_portable(&j, nmax, &mut g);
        s.take(&g, l);
    }
    s.result()
}

/// `make_qkx2_quants` for the 8 sub-blocks of a 256-value super-block: `w` holds each value's
/// weight, `l` receives the levels; returns each sub-block's `(scale, the_min)`. Uses the
/// fastest variant this CPU supports; bit-identical to calling [`make_qkx2_quants_scalar`]
/// on each sub-block.
pub fn make_qkx2_quants_superblock(
    x: &[f32; 256],
    w: &[f32; 256],
    p: Qkx2Params,
    l: &mut [u8; 256],
) -> [(f32, f32); 8] {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::avx2() {
            return x86::make_qkx2_quants_superblock(x, w, p, l);
        }
    }
    let nmax = p.nmax as i32;
    qkx2_superblock(
        x,
        w,
        p,
        l,
        |j, g| qkx2_eval_portable(j, nmax, g),
        |j, g| {
            qkx2_eval_portable(&j[0], nmax, &mut g[0]);
            qkx2_eval_portable(&j[1], nmax, &mut g[1]);
        },
    )
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

#[inline(always)]
fn qx_sums(x: &[f32; QX_N], iscale: f32, nmax: i32) -> (f32, f32) {
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for &xi in x {
        let q = nearest_int(iscale * xi).clamp(-nmax, nmax - 1) as f32;
        let w = xi * xi;
        sumlx += w * xi * q;
        suml2 += w * q * q;
    }
    (sumlx, suml2)
}

#[inline(always)]
fn qx_levels(x: &[f32; QX_N], iscale: f32, nmax: i32, l: &mut [u8; QX_N]) {
    for (o, &xi) in l.iter_mut().zip(x) {
        *o = (nmax + nearest_int(iscale * xi).clamp(-nmax, nmax - 1)) as u8;
    }
}

/// Candidate count of `make_qx_quants`: the first guess plus is = −9..=−1, 1..=9.
const QX_NC: usize = 19;
/// Rounded up to whole 8-lane vectors.
const QX_NC_PAD: usize = 24;

/// Sums Σ(w·x)·l and Σ(w·l)·l per candidate, each in element order.
fn qx_sums_portable(
    x: &[f32; QX_N],
    nmax: i32,
    iscale: &[f32; QX_NC_PAD],
    sumlx: &mut [f32; QX_NC_PAD],
    suml2: &mut [f32; QX_NC_PAD],
) {
    for &xi in x {
        let w = xi * xi;
        let wx = w * xi;
        for c in 0..QX_NC_PAD {
            let q = nearest_int(iscale[c] * xi).clamp(-nmax, nmax - 1) as f32;
            sumlx[c] += wx * q;
            suml2[c] += w * q * q;
        }
    }
}

/// Lane-parallel `make_qx_quants` (rmse_type 1): the 19 candidates have independent sums
/// (only the comparison is sequential), so they are computed side by side, then compared in
/// ggml's order.
#[inline(always)]
fn make_qx_quants_lanes(
    x: &[f32; QX_N],
    nmax: i32,
    l: &mut [u8; QX_N],
    mut sums: impl FnMut(&[f32; QX_NC_PAD], &mut [f32; QX_NC_PAD], &mut [f32; QX_NC_PAD]),
) -> f32 {
    let Some(max) = qx_signed_max(x) else {
        *l = [0; QX_N];
        return 0.0;
    };
    // Lane 0: the first guess; lanes 1..=18: is = −9..=−1, 1..=9; the rest repeat lane 18.
    let mut iscale = [0.0f32; QX_NC_PAD];
    iscale[0] = -(nmax as f32) / max;
    for (c, s) in iscale.iter_mut().enumerate().skip(1) {
        let c = c.min(QX_NC - 1) as i32;
        let is = if c <= 9 { c - 10 } else { c - 9 };
        *s = -(nmax as f32 + 0.1 * is as f32) / max;
    }
    let mut sumlx = [0.0f32; QX_NC_PAD];
    let mut suml2 = [0.0f32; QX_NC_PAD];
    sums(&iscale, &mut sumlx, &mut suml2);
    let mut best_c = 0;
    let mut scale = if suml2[0] != 0.0 {
        sumlx[0] / suml2[0]
    } else {
        0.0
    };
    let mut best = scale * sumlx[0];
    for c in 1..QX_NC {
        if suml2[c] > 0.0 && sumlx[c] * sumlx[c] > best * suml2[c] {
            best_c = c;
            scale = sumlx[c] / suml2[c];
            best = scale * sumlx[c];
        }
    }
    qx_levels(x, iscale[best_c], nmax, l);
    scale
}

/// ggml's `make_qx_quants` with rmse_type 1 (see [`make_qx_quants_scalar`]), using the fastest
/// lane-parallel variant this CPU supports. Bit-identical to the scalar reference.
pub fn make_qx_quants(x: &[f32; QX_N], nmax: i32, l: &mut [u8; QX_N]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::avx2() {
            return x86::make_qx_quants(x, nmax, l);
        }
    }
    make_qx_quants_lanes(x, nmax, l, |iscale, sumlx, suml2| {
        qx_sums_portable(x, nmax, iscale, sumlx, suml2)
    })
}

/// AVX2 evaluators: the portable loops written with 8-lane intrinsics. Only mul/add/sub/div,
/// integer ops and exact conversions are used — no FMA, whose single rounding would change
/// the results.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{make_qx_quants_lanes, qkx2_superblock, Qkx2Group, Qkx2Job, Qkx2Params};
    use super::{QKX2_N, QX_N, QX_NC_PAD};
    use std::arch::x86_64::*;

    /// `make_qkx2_quants_superblock` with the whole search compiled for AVX2.
    /// Callers must have checked that the CPU has AVX2 (`cpu::avx2()`).
    pub(super) fn make_qkx2_quants_superblock(
        x: &[f32; 256],
        w: &[f32; 256],
        p: Qkx2Params,
        l: &mut [u8; 256],
    ) -> [(f32, f32); 8] {
        debug_assert!(std::arch::is_x86_feature_detected!("avx2"));
        // SAFETY: only called after `cpu::avx2()` confirmed AVX2.
        unsafe { qkx2_superblock_avx2(x, w, p, l) }
    }

    /// `make_qx_quants` with the whole search compiled for AVX2 (same precondition).
    pub(super) fn make_qx_quants(x: &[f32; QX_N], nmax: i32, l: &mut [u8; QX_N]) -> f32 {
        debug_assert!(std::arch::is_x86_feature_detected!("avx2"));
        // SAFETY: only called after `cpu::avx2()` confirmed AVX2.
        unsafe { make_qx_quants_avx2(x, nmax, l) }
    }

    #[target_feature(enable = "avx2")]
    fn qkx2_superblock_avx2(
        x: &[f32; 256],
        w: &[f32; 256],
        p: Qkx2Params,
        l: &mut [u8; 256],
    ) -> [(f32, f32); 8] {
        let nmax = p.nmax as i32;
        qkx2_superblock(
            x,
            w,
            p,
            l,
            |j, g| qkx2_eval_avx2::<1>(std::array::from_ref(j), nmax, std::array::from_mut(g)),
            |j, g| qkx2_eval_avx2::<2>(j, nmax, g),
        )
    }

    #[target_feature(enable = "avx2")]
    fn make_qx_quants_avx2(x: &[f32; QX_N], nmax: i32, l: &mut [u8; QX_N]) -> f32 {
        make_qx_quants_lanes(x, nmax, l, |iscale, sumlx, suml2| {
            qx_sums_avx2(x, nmax, iscale, sumlx, suml2)
        })
    }

    /// ggml's `nearest_int` on 8 lanes, clamped to lo..=hi.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn nearest_int_clamped(v: __m256, lo: __m256i, hi: __m256i) -> __m256 {
        let t = _mm256_add_ps(v, _mm256_set1_ps(12_582_912.0));
        let i = _mm256_sub_epi32(
            _mm256_and_si256(_mm256_castps_si256(t), _mm256_set1_epi32(0x007f_ffff)),
            _mm256_set1_epi32(0x0040_0000),
        );
        _mm256_cvtepi32_ps(_mm256_min_epi32(_mm256_max_epi32(i, lo), hi))
    }

    #[target_feature(enable = "avx2")]
    fn to_array(v: __m256) -> [f32; 8] {
        let mut a = [0.0f32; 8];
        // SAFETY: `a` has room for 8 f32; storeu has no alignment requirement.
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
        a
    }

    /// Evaluate N independent jobs with interleaved instruction streams.
    // Element and job loops index several arrays in lockstep; iterators would hide that.
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx2")]
    fn qkx2_eval_avx2<const N: usize>(j: &[Qkx2Job; N], nmax: i32, g: &mut [Qkx2Group; N]) {
        let z = _mm256_setzero_ps();
        let mut vis = [z; N];
        for n in 0..N {
            // SAFETY: `iscale` holds 8 f32; loadu has no alignment requirement.
            vis[n] = unsafe { _mm256_loadu_ps(j[n].iscale.as_ptr()) };
        }
        let (lo, hi) = (_mm256_setzero_si256(), _mm256_set1_epi32(nmax));
        let mut lv = [[z; N]; QKX2_N];
        let (mut sl, mut sl2, mut sxl) = ([z; N], [z; N], [z; N]);
        for i in 0..QKX2_N {
            for n in 0..N {
                let xi = _mm256_set1_ps(j[n].x[i]);
                let xm = _mm256_set1_ps(j[n].x[i] - j[n].min);
                let q = nearest_int_clamped(_mm256_mul_ps(vis[n], xm), lo, hi);
                lv[i][n] = q;
                let wl = _mm256_mul_ps(_mm256_set1_ps(j[n].w[i]), q);
                sl[n] = _mm256_add_ps(sl[n], wl);
                sl2[n] = _mm256_add_ps(sl2[n], _mm256_mul_ps(wl, q));
                sxl[n] = _mm256_add_ps(sxl[n], _mm256_mul_ps(wl, xi));
            }
        }
        let (mut t_scale, mut t_min, mut d) = ([z; N], [z; N], [z; N]);
        for n in 0..N {
            let (sum_w, sum_x) = (_mm256_set1_ps(j[n].sum_w), _mm256_set1_ps(j[n].sum_x));
            d[n] = _mm256_sub_ps(_mm256_mul_ps(sum_w, sl2[n]), _mm256_mul_ps(sl[n], sl[n]));
            let s = _mm256_div_ps(
                _mm256_sub_ps(_mm256_mul_ps(sum_w, sxl[n]), _mm256_mul_ps(sum_x, sl[n])),
                d[n],
            );
            let m = _mm256_div_ps(
                _mm256_sub_ps(_mm256_mul_ps(sl2[n], sum_x), _mm256_mul_ps(sl[n], sxl[n])),
                d[n],
            );
            // A positive fitted min is replaced by 0, the scale refitted through the origin.
            let clamp = _mm256_cmp_ps::<_CMP_GT_OQ>(m, z);
            t_min[n] = _mm256_blendv_ps(m, z, clamp);
            t_scale[n] = _mm256_blendv_ps(s, _mm256_div_ps(sxl[n], sl2[n]), clamp);
        }
        let mut mad = [z; N];
        for i in 0..QKX2_N {
            for n in 0..N {
                let xi = _mm256_set1_ps(j[n].x[i]);
                let wi = _mm256_set1_ps(j[n].w[i]);
                let diff = _mm256_sub_ps(
                    _mm256_add_ps(_mm256_mul_ps(t_scale[n], lv[i][n]), t_min[n]),
                    xi,
                );
                mad[n] = _mm256_add_ps(mad[n], _mm256_mul_ps(wi, _mm256_mul_ps(diff, diff)));
            }
        }
        for n in 0..N {
            let ok = to_array(_mm256_cmp_ps::<_CMP_GT_OQ>(d[n], z));
            for (o, b) in g[n].ok.iter_mut().zip(ok) {
                *o = b.to_bits() != 0;
            }
            g[n].scale = to_array(t_scale[n]);
            g[n].min = to_array(t_min[n]);
            g[n].mad = to_array(mad[n]);
            for (dst, src) in g[n].lv.iter_mut().zip(&lv) {
                *dst = to_array(src[n]);
            }
        }
    }

    #[target_feature(enable = "avx2")]
    fn qx_sums_avx2(
        x: &[f32; QX_N],
        nmax: i32,
        iscale: &[f32; QX_NC_PAD],
        sumlx: &mut [f32; QX_NC_PAD],
        suml2: &mut [f32; QX_NC_PAD],
    ) {
        const V: usize = QX_NC_PAD / 8;
        let mut vis = [_mm256_setzero_ps(); V];
        for (v, c) in vis.iter_mut().zip(iscale.chunks_exact(8)) {
            // SAFETY: each chunk holds 8 f32; loadu has no alignment requirement.
            *v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        }
        let (lo, hi) = (_mm256_set1_epi32(-nmax), _mm256_set1_epi32(nmax - 1));
        let mut slx = [_mm256_setzero_ps(); V];
        let mut sl2 = [_mm256_setzero_ps(); V];
        for &xi in x {
            let w = xi * xi;
            let (vw, vwx, vx) = (
                _mm256_set1_ps(w),
                _mm256_set1_ps(w * xi),
                _mm256_set1_ps(xi),
            );
            for v in 0..V {
                let q = nearest_int_clamped(_mm256_mul_ps(vis[v], vx), lo, hi);
                slx[v] = _mm256_add_ps(slx[v], _mm256_mul_ps(vwx, q));
                sl2[v] = _mm256_add_ps(sl2[v], _mm256_mul_ps(_mm256_mul_ps(vw, q), q));
            }
        }
        for v in 0..V {
            sumlx[8 * v..8 * v + 8].copy_from_slice(&to_array(slx[v]));
            suml2[8 * v..8 * v + 8].copy_from_slice(&to_array(sl2[v]));
        }
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

    #[test]
    fn qkx2_lanes_equal_scalar() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for t in 0..1000u64 {
            // A super-block whose 8 sub-blocks mix distributions (so paired searches end at
            // different times), including an all-zero and a constant sub-block.
            let mut x = [0.0f32; 256];
            for j in 0..8 {
                let v = sample(&mut seed, t + j as u64, QKX2_N);
                x[32 * j..32 * j + 32].copy_from_slice(&v);
            }
            if t % 5 == 0 {
                x[64..96].fill(0.0);
                x[160..192].fill(-0.25);
            }
            let mut w = [0.0f32; 256];
            for j in 0..8 {
                let s = &x[32 * j..32 * j + 32];
                let av = (s.iter().map(|a| a * a).sum::<f32>() / 32.0).sqrt();
                for i in 0..QKX2_N {
                    w[32 * j + i] = av + s[i].abs();
                }
            }
            for p in [QKX2_Q4K, QKX2_Q5K] {
                let mut lsb = [3u8; 256];
                let fits = make_qkx2_quants_superblock(&x, &w, p, &mut lsb);
                let mut lport = [4u8; 256];
                let fits_port = qkx2_superblock(
                    &x,
                    &w,
                    p,
                    &mut lport,
                    |j, g| qkx2_eval_portable(j, p.nmax as i32, g),
                    |j, g| {
                        qkx2_eval_portable(&j[0], p.nmax as i32, &mut g[0]);
                        qkx2_eval_portable(&j[1], p.nmax as i32, &mut g[1]);
                    },
                );
                for j in 0..8 {
                    let xs: [f32; 32] = x[32 * j..32 * j + 32].try_into().unwrap();
                    let ws: [f32; 32] = w[32 * j..32 * j + 32].try_into().unwrap();
                    let (mut l1, mut l2) = ([9u8; 32], [7u8; 32]);
                    let r1 = make_qkx2_quants_scalar(&xs, &ws, p, &mut l1);
                    let r2 = make_qkx2_quants(&xs, &ws, p, &mut l2);
                    let bits = |r: (f32, f32)| (r.0.to_bits(), r.1.to_bits());
                    assert_eq!(bits(r1), bits(r2), "t {t} j {j}");
                    assert_eq!(bits(r1), bits(fits[j]), "t {t} j {j}");
                    assert_eq!(bits(r1), bits(fits_port[j]), "t {t} j {j}");
                    assert_eq!(l1, l2);
                    assert_eq!(l1[..], lsb[32 * j..32 * j + 32]);
                    assert_eq!(l1[..], lport[32 * j..32 * j + 32]);
                    assert!(l1.iter().all(|&q| q <= p.nmax));
                }
            }
        }
    }

    #[test]
    fn qx_lanes_equal_scalar() {
        let mut seed = 0x1234_5678_9ABC_DEF1u64;
        for t in 0..8000u64 {
            let v = sample(&mut seed, t, QX_N);
            let x: [f32; QX_N] = v.try_into().unwrap();
            let (mut l1, mut l2, mut l3) = ([9u8; 16], [7u8; 16], [5u8; 16]);
            let r1 = make_qx_quants_scalar(&x, 32, &mut l1);
            let r2 = make_qx_quants_lanes(&x, 32, &mut l2, |is, a, b| {
                qx_sums_portable(&x, 32, is, a, b)
            });
            let r3 = make_qx_quants(&x, 32, &mut l3);
            assert_eq!(r1.to_bits(), r2.to_bits());
            assert_eq!(r1.to_bits(), r3.to_bits());
            assert_eq!(l1, l2);
            assert_eq!(l1, l3);
            assert!(l1.iter().all(|&q| q < 64));
        }
    }

    #[test]
    fn constant_and_zero_groups() {
        let w = [1.0f32; 32];
        let mut l = [3u8; 32];
        // All equal positive: min is clamped to 0, so max ≠ min and a real fit happens.
        let (s, m) = make_qkx2_quants(&[0.5; 32], &w, QKX2_Q4K, &mut l);
        assert!(s > 0.0 && m == 0.0);
        // All zero: ggml's early return.
        let (s, m) = make_qkx2_quants(&[0.0; 32], &w, QKX2_Q4K, &mut l);
        assert_eq!((s, m), (0.0, 0.0));
        assert_eq!(l, [0; 32]);
        let mut l16 = [3u8; 16];
        assert_eq!(make_qx_quants(&[0.0; 16], 32, &mut l16), 0.0);
        assert_eq!(l16, [0; 16]);
    }
}
