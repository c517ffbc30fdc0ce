//! The activation layout of the outer-product float tiles (prompts with F16, BF16 and F32
//! weights at the AVX-512 level).
//!
//! The register tile of a float row dot (`float_micro`) gives each (row, token) pair 16 lane
//! sums `L_j = Σ_s w[16s + j]·a[16s + j]` (FMAs in ascending `s` from +0) and adds them in
//! `hsum`'s tree. The outer-product tile computes the same `L_j` for 16 rows at once: the
//! weights of a panel of rows are converted once and stored per lane (column `16s + j` of 16
//! rows is one vector), each FMA multiplies such a vector by one broadcast activation, and the
//! tree becomes 15 vertical additions. Per (row, token) the operations are the same, so the
//! bits are the same, and float matmuls stay batch-invariant. The broadcasts read the
//! activations in the order laid out here, once per call, so the tile's loads are sequential
//! (rows of a prompt are 4 KiB apart at 1024 columns, and 12 of them at once would share one
//! set of the L1 cache).

/// From this many tokens on, float matmuls use the outer-product tile.
pub(crate) const MIN_TOKENS: usize = 16;
/// Tokens per group of the layout: the register tile's tokens (2 × 12 accumulators).
pub(crate) const GROUP: usize = 12;
/// Weight rows per packed panel (two vectors); row blocks of the work split are multiples of it.
pub(crate) const PANEL_ROWS: usize = 32;

/// Floats the layout of `tokens` rows of `n` columns takes.
pub(crate) fn len(tokens: usize, n: usize) -> usize {
    tokens * n.next_multiple_of(16)
}

/// `x` (`tokens` rows of `n` columns) in lane-major groups of [`GROUP`] tokens: a group of `T`
/// tokens (the last may be shorter) starts at `t0·16·steps` (`steps = ⌈n/16⌉`) and holds
/// `x[t0 + t][16s + j]` at `(j·steps + s)·T + t`; positions past `n` are zero.
pub(crate) fn lane_major(x: &[f32], n: usize, out: &mut [f32]) {
    use rayon::prelude::*;
    let tokens = x.len() / n;
    assert_eq!(out.len(), len(tokens, n), "lane_major: output length");
    let steps = n.div_ceil(16);
    out.par_chunks_mut(GROUP * 16 * steps)
        .zip(x.par_chunks(GROUP * n))
        .for_each(|(o, xg)| {
            let t_n = xg.len() / n;
            for j in 0..16 {
                for s in 0..steps {
                    let c = 16 * s + j;
                    let dst = &mut o[(j * steps + s) * t_n..][..t_n];
                    if c < n {
                        for (t, d) in dst.iter_mut().enumerate() {
                            *d = xg[t * n + c];
                        }
                    } else {
                        dst.fill(0.0);
                    }
                }
            }
        });
}
