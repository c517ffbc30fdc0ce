//! The multi-token driver shared by every level with tile kernels (`avx2_tile.rs`, `avx512.rs`).
//!
//! A level supplies its register tile — one packed row × `T` tokens — as a [`Micro`]; the
//! driver walks the tokens in groups of [`Micro::MAX_T`] (outer, so their activations stay in
//! L1 while the packed rows stream from L2) and the rows inside each group, and writes
//! `out[t][r] = row·token + bias[r]`. [`float_gemm`] does the same for float rows as stored, with
//! a level's [`FloatMicro`] (R rows × up to 4 tokens).
//!
//! Everything here is `#[inline(always)]` and carries no `#[target_feature]`: a level's thin
//! entry point (a `#[target_feature]` function that calls [`gemm`]) absorbs the driver, so the
//! micro kernel, itself `#[inline]` with the level's features, is inlined into code compiled
//! for those features. No SIMD value crosses a function boundary here (only pointers and f32
//! arrays), so the driver has no ABI dependence on the level.

/// A register tile of one level: packed rows of `W` times activation tiles of `A`.
pub(crate) trait Micro {
    /// One packed unit of a weight row (`KPacked`, `Q8_0Packed`).
    type W;
    /// The matching activation unit (`Q8KTile`, `Q8_0Tile`).
    type A;
    /// Most tokens per register tile (1..=8).
    const MAX_T: usize;
    /// One row (`n` units at `w`) times `T ≤ MAX_T` tokens (token t's `n` units at `a + t·n`).
    ///
    /// # Safety
    /// The caller's CPU supports the level's features; `w` holds `n` units and `a` `T·n`.
    unsafe fn row<const T: usize>(w: *const Self::W, a: *const Self::A, n: usize) -> [f32; T];
}

/// Every row of `w` (`n` units each) times the `T` tokens starting at `t0`.
///
/// # Safety
/// As [`Micro::row`]; `a` holds `(t0 + T)·n` units and `out[t0..t0 + T]` rows of `w.len()/n`.
#[inline(always)]
unsafe fn rows_by_tokens<M: Micro, const T: usize>(
    w: &[M::W],
    a: &[M::A],
    n: usize,
    t0: usize,
    bias: Option<&[f32]>,
    out: &mut [&mut [f32]],
) {
    let rows = w.len() / n;
    // SAFETY: t0 + T ≤ tokens and `a` holds tokens·n units (checked by the caller).
    let ap = unsafe { a.as_ptr().add(t0 * n) };
    for r in 0..rows {
        // SAFETY: row r < rows lies inside `w`; see above for `ap`.
        let v = unsafe { M::row::<T>(w.as_ptr().add(r * n), ap, n) };
        let b = bias.map_or(0.0, |b| b[r]);
        for (t, v) in v.iter().enumerate() {
            out[t0 + t][r] = v + b;
        }
    }
}

/// `out[t][r] = Σ w_r·a_t + bias[r]` for every token `t < out.len()`.
///
/// # Safety
/// The CPU supports `M`'s level; the shapes were checked with `super::gemm_shape`
/// (`w.len() = rows·n`, `a.len() = tokens·n`, every `out[t]` and `bias` of `rows`).
#[inline(always)]
pub(crate) unsafe fn gemm<M: Micro>(
    w: &[M::W],
    a: &[M::A],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [&mut [f32]],
) {
    let tokens = out.len();
    let mut t0 = 0;
    while t0 < tokens {
        let m = (tokens - t0).min(M::MAX_T);
        // SAFETY (each arm): t0 + m ≤ tokens, m ≤ MAX_T; the rest is the caller's contract.
        unsafe {
            match m {
                8 => rows_by_tokens::<M, 8>(w, a, n, t0, bias, out),
                7 => rows_by_tokens::<M, 7>(w, a, n, t0, bias, out),
                6 => rows_by_tokens::<M, 6>(w, a, n, t0, bias, out),
                5 => rows_by_tokens::<M, 5>(w, a, n, t0, bias, out),
                4 => rows_by_tokens::<M, 4>(w, a, n, t0, bias, out),
                3 => rows_by_tokens::<M, 3>(w, a, n, t0, bias, out),
                2 => rows_by_tokens::<M, 2>(w, a, n, t0, bias, out),
                _ => rows_by_tokens::<M, 1>(w, a, n, t0, bias, out),
            }
        }
        t0 += m;
    }
}

/// A float register tile of one level (F16/BF16/F32 weights as stored × f32 tokens): `R`
/// weight rows × `T ≤ 4` tokens of f32 sums.
pub(crate) trait FloatMicro {
    /// The stored weight element.
    type E;
    /// Rows `w`, `w + n`, … (`R` of them) times tokens `a`, `a + n`, … (`T`), `n` columns each.
    ///
    /// # Safety
    /// The caller's CPU supports the level's features; `w` holds `R·n` values and `a` `T·n`.
    unsafe fn tile<const R: usize, const T: usize>(
        &self,
        w: *const Self::E,
        a: *const f32,
        n: usize,
    ) -> [[f32; T]; R];
}

/// `out[t][r] = Σ w_r·a_t + bias[r]` with a float register tile: tokens in groups of 4, rows
/// in tiles of `R`, the remaining rows one at a time.
///
/// # Safety
/// As [`gemm`], for `m`'s level.
#[inline(always)]
pub(crate) unsafe fn float_gemm<M: FloatMicro, const R: usize>(
    m: &M,
    w: &[M::E],
    a: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [&mut [f32]],
) {
    let rows = w.len() / n;
    let tokens = out.len();
    let mut t0 = 0;
    while t0 < tokens {
        let nt = (tokens - t0).min(4);
        // SAFETY: t0 < tokens, and `a` holds tokens·n values.
        let ap = unsafe { a.as_ptr().add(t0 * n) };
        let mut r = 0;
        while r < rows {
            // SAFETY: r < rows.
            let wp = unsafe { w.as_ptr().add(r * n) };
            let full = rows - r >= R;
            macro_rules! tile {
                ($r:expr, $t:literal) => {{
                    // SAFETY: $r rows from r and $t tokens from t0 exist (checked above).
                    let v = unsafe { m.tile::<{ $r }, $t>(wp, ap, n) };
                    for (rr, vr) in v.iter().enumerate() {
                        let b = bias.map_or(0.0, |b| b[r + rr]);
                        for (t, x) in vr.iter().enumerate() {
                            out[t0 + t][r + rr] = x + b;
                        }
                    }
                    r += $r;
                }};
            }
            match (full, nt) {
                (true, 4) => tile!(R, 4),
                (true, 3) => tile!(R, 3),
                (true, 2) => tile!(R, 2),
                (true, _) => tile!(R, 1),
                (false, 4) => tile!(1, 4),
                (false, 3) => tile!(1, 3),
                (false, 2) => tile!(1, 2),
                (false, _) => tile!(1, 1),
            }
        }
        t0 += nt;
    }
}
