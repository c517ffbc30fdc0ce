//! The activation layout of the outer-product float tiles (prompts with F16, BF16 and F32
//! weights at the AVX-512 and AVX2 levels).
//!
//! The register tile of a float row dot (`float_micro`) gives each (row, token) pair one sum
//! per vector lane, `L_j = Σ_s w[Ls + j]·a[Ls + j]` (L = 16 lanes for AVX-512, 8 for AVX2; FMAs
//! in ascending `s` from +0), and adds them in a fixed tree. The outer-product tile computes
//! the same `L_j` for L rows at once: the weights of a panel of rows are converted once and
//! stored per lane (column `Ls + j` of L rows is one vector), each FMA multiplies such a vector
//! by one broadcast activation, and the tree becomes L − 1 vertical additions. Per (row, token) the operations are the same, so the
//! bits are the same, and float matmuls stay batch-invariant. The broadcasts read the
//! activations in the order laid out here, once per call, so the tile's loads are sequential
//! (rows of a prompt are 4 KiB apart at 1024 columns, and a tile's tokens read in place would
//! all fall into one set of the L1 cache).

/// From this many tokens on, float matmuls use the outer-product tile: converting the rows once
/// per call costs about what it saves at 32 tokens (GPT-2-Medium-shaped F16 pp16 12 % slower
/// than the register tile, pp32 even, pp64 15 % faster; docs/performance.md).
pub(crate) const MIN_TOKENS: usize = 32;

/// A level's activation layout: `lanes` f32 per vector, `group` tokens per register tile.
/// Weight panels are two vectors of rows (`2 · lanes`). `group_fn` lays out one group (see
/// [`Layout::lay_out`]); a level with a faster one than [`scalar_group`] sets its own.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub(crate) lanes: usize,
    pub(crate) group: usize,
    pub(crate) group_fn: GroupFn,
}

/// Lays out one group: `x` is `T` token rows of `n` columns (`T ≤ group`), `out` their
/// `T · lanes · ⌈n / lanes⌉` floats in the order [`Layout::lay_out`] gives.
pub(crate) type GroupFn = fn(lanes: usize, x: &[f32], n: usize, out: &mut [f32]);

/// AVX-512: 16 lanes, 2 × 14 accumulators of 32 rows × 14 tokens (28 of the 32 zmm registers,
/// two for the weights, one for the broadcast).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const AVX512: Layout = Layout {
    lanes: 16,
    group: 14,
    group_fn: scalar_group,
};
/// AVX2: 8 lanes, 2 × 6 accumulators of 16 rows × 6 tokens (of the 16 ymm registers).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const AVX2: Layout = Layout {
    lanes: 8,
    group: 6,
    group_fn: scalar_group,
};

/// The reference [`GroupFn`]: element by element.
pub(crate) fn scalar_group(lanes: usize, x: &[f32], n: usize, out: &mut [f32]) {
    let t_n = x.len() / n;
    let steps = n.div_ceil(lanes);
    assert_eq!(out.len(), t_n * lanes * steps, "lay_out: group length");
    for j in 0..lanes {
        for s in 0..steps {
            let c = lanes * s + j;
            let dst = &mut out[(j * steps + s) * t_n..][..t_n];
            if c < n {
                for (t, d) in dst.iter_mut().enumerate() {
                    *d = x[t * n + c];
                }
            } else {
                dst.fill(0.0);
            }
        }
    }
}

impl Layout {
    /// Weight rows per packed panel; row blocks of the work split are multiples of it.
    pub(crate) fn panel_rows(self) -> usize {
        2 * self.lanes
    }

    /// Floats the layout of `tokens` rows of `n` columns takes.
    pub(crate) fn len(self, tokens: usize, n: usize) -> usize {
        tokens * n.next_multiple_of(self.lanes)
    }

    /// `x` (`tokens` rows of `n` columns) in lane-major groups of `group` tokens: with
    /// `L = lanes` and `steps = ⌈n/L⌉`, a group of `T` tokens (the last may be shorter) starts
    /// at `t0·L·steps` and holds `x[t0 + t][L·s + j]` at `(j·steps + s)·T + t`; positions past
    /// `n` are zero.
    pub(crate) fn lay_out(self, x: &[f32], n: usize, out: &mut [f32]) {
        use rayon::prelude::*;
        let (lanes, group) = (self.lanes, self.group);
        let tokens = x.len() / n;
        assert_eq!(out.len(), self.len(tokens, n), "lay_out: output length");
        let steps = n.div_ceil(lanes);
        out.par_chunks_mut(group * lanes * steps)
            .zip(x.par_chunks(group * n))
            .for_each(|(o, xg)| (self.group_fn)(lanes, xg, n, o));
    }
}

/// A level's outer-product tile for [`gemm`]: how it packs a panel of weight rows and
/// multiplies one group of tokens with a panel.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) trait OuterMicro {
    /// The stored weight element.
    type E;
    /// One vector of a packed panel (`lanes` f32).
    type V: crate::Plain;
    /// The level's layout.
    const LAYOUT: Layout;
    /// Rows `w[..rows]` (at most `LAYOUT.panel_rows()`, `n` columns each) into `dst`
    /// (`2·⌈n/lanes⌉·lanes` vectors), lane-major: `dst[(j·steps + s)·2 + h]` holds rows
    /// `lanes·h..` of column `lanes·s + j`, zero past `rows` and past `n`.
    ///
    /// # Safety
    /// The CPU has the level's features; `w` holds `rows·n` elements.
    unsafe fn pack(w: *const Self::E, rows: usize, n: usize, dst: &mut [Self::V]);
    /// Tokens `dst.t0..dst.t0 + nt` (`1 ≤ nt ≤ LAYOUT.group`; their group of the layout at
    /// `a`) times `panel` (rows `dst.r0..dst.r0 + dst.nr` of the call), written into `dst`.
    ///
    /// # Safety
    /// The CPU has the level's features; `a` holds the group (`nt·lanes·⌈n/lanes⌉` floats).
    unsafe fn tile(nt: usize, panel: &[Self::V], a: *const f32, n: usize, dst: &mut Dest<'_, '_>);
}

/// Where one tile call writes: `out[t0 + t][r0..r0 + nr]` for its tokens t, with
/// `bias[r0..r0 + nr]` added where there is a bias.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Dest<'a, 'o> {
    pub(crate) out: &'a mut [&'o mut [f32]],
    pub(crate) bias: Option<&'a [f32]>,
    pub(crate) t0: usize,
    pub(crate) r0: usize,
    pub(crate) nr: usize,
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Per thread: the packed panels of the rows a call is given.
    static PANELS: std::cell::RefCell<Vec<crate::matmul::Line>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Every row of `w` (`n` columns each) times every token of `a` (in `M::LAYOUT`): the rows
/// packed a panel at a time into the thread's buffer, then each group of tokens times every
/// panel (the group's activations stay in L1/L2 while the panels stream from L2).
///
/// # Safety
/// The CPU has the level's features; the shapes are a checked `GemmFn` call's
/// (`dot::entry_points`' `outer` arm).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn gemm<M: OuterMicro>(
    w: &[M::E],
    a: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [&mut [f32]],
) {
    let (lanes, group, pr) = (M::LAYOUT.lanes, M::LAYOUT.group, M::LAYOUT.panel_rows());
    let rows = w.len() / n;
    let steps = n.div_ceil(lanes);
    let per_panel = 2 * lanes * steps;
    let panels = rows.div_ceil(pr);
    PANELS.with_borrow_mut(|buf| {
        let buf = crate::matmul::typed_buf::<M::V>(buf, panels * per_panel);
        for (p, dst) in buf.chunks_exact_mut(per_panel).enumerate() {
            let r0 = p * pr;
            // SAFETY: rows r0..r0 + nr exist; the caller's contract covers the rest.
            unsafe { M::pack(w.as_ptr().add(r0 * n), (rows - r0).min(pr), n, dst) };
        }
        let tokens = out.len();
        let mut t0 = 0;
        while t0 < tokens {
            let nt = (tokens - t0).min(group);
            // SAFETY: the groups before t0 hold t0·lanes·steps floats of `a`.
            let ag = unsafe { a.as_ptr().add(t0 * lanes * steps) };
            for (p, panel) in buf.chunks_exact(per_panel).enumerate() {
                let r0 = p * pr;
                let nr = (rows - r0).min(pr);
                let mut dst = Dest {
                    out: &mut *out,
                    bias,
                    t0,
                    r0,
                    nr,
                };
                // SAFETY: as above; 1 ≤ nt ≤ group.
                unsafe { M::tile(nt, panel, ag, n, &mut dst) };
            }
            t0 += nt;
        }
    })
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Every level's group layout puts every value where the reference does, tails included.
    #[test]
    fn simd_group_layouts_equal_the_scalar_one() {
        if !crate::cpu::available_isas().contains(&crate::cpu::Isa::Avx512) {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let layout = crate::dot::avx512::float::LAYOUT;
        for n in [1, 5, 16, 17, 23, 64, 1000] {
            for t_n in 1..=layout.group {
                let x: Vec<f32> = (0..t_n * n).map(|i| i as f32 * 0.5 - 3.0).collect();
                let len = t_n * n.next_multiple_of(16);
                let (mut want, mut got) = (vec![f32::NAN; len], vec![f32::NAN; len]);
                scalar_group(16, &x, n, &mut want);
                (layout.group_fn)(16, &x, n, &mut got);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "n = {n}, {t_n} tokens");
            }
        }
    }
}
