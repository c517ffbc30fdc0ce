//! Dot-product kernels, per (weight × activation) pair: Q4_K·Q8_K, Q5_K·Q8_K, Q6_K·Q8_K,
//! Q8_0·Q8_0, F16·F32, BF16·F32 and F32·F32, one module per instruction-set level.
//!
//! `scalar.rs` is the reference; `avx2.rs`, `avx512.rs` and `neon.rs` must agree with it
//! (exactly on the integer parts, up to float summation order on the rest). Each format's
//! [`crate::WeightFormat::kernels`] picks its functions from these modules for a
//! [`crate::cpu::Level`]; the level in use is [`crate::cpu::level`].
//!
//! Besides the row-by-row dots, the x86 levels have multi-token kernels (`avx2_tile.rs` and
//! the `*_gemm` functions of `avx512.rs`): weight packing and register-tiled products that
//! reuse each unpacked weight block across several tokens, which `matmul` uses for prefill.
//! docs/kernels.md describes the layouts.

pub mod scalar;

pub(crate) mod amx;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2_tile;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
pub(crate) mod outer;
#[cfg(target_arch = "x86_64")]
mod tile;

pub use crate::cpu::{available_isas, isa, Isa};
pub use crate::format::{DotFn, GemmFn, RowsFn};

/// How far ahead of the block being multiplied the x86 row-by-row kernels prefetch weights:
/// about ten 1024-column K-quant rows, so the next rows of a matrix-vector product are on
/// their way while this one is multiplied. The packers of the quantized prefill tiles read
/// their rows once per call, from memory, in the same order, and prefetch the same way (short
/// prompts spent half their time packing, most of it waiting on those loads).
/// docs/performance.md has the measurements behind it.
#[cfg(target_arch = "x86_64")]
const PF_AHEAD: usize = 6144;

/// Prefetch into L2 the `bytes` bytes at `p + PF_AHEAD` (called once per weight block; for a
/// block that is not a whole number of lines some lines are requested twice, which costs a
/// load slot, not a memory access). L2 rather than L1 because it measured faster: decode ran
/// 10–30 % faster than with L1 hints 3 KiB ahead on the Granite-Rapids-class host (plausibly
/// because L1's few fill buffers cap the misses in flight).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_ahead(p: *const u8, bytes: usize) {
    prefetch_l2(p.wrapping_add(PF_AHEAD), bytes);
}

/// [`prefetch_ahead`] for the bytes of `x`: one weight block, or a run of them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_blocks<T: ?Sized>(x: &T) {
    prefetch_ahead((x as *const T).cast(), std::mem::size_of_val(x));
}

/// Request into L2 the `bytes` bytes at `p`, one `prefetcht1` per 64 bytes. Any address is
/// allowed: a prefetch never faults and changes no result.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn prefetch_l2(p: *const u8, bytes: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    let mut o = 0;
    while o < bytes {
        // SAFETY: a prefetch is only a hint: it never faults and has no visible effect, even
        // past the end of the data or of the address space (hence `wrapping_add`).
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(o).cast()) };
        o += 64;
    }
}

/// `v`, kept in memory: broadcasting one of its values is then a load (at AVX-512 folded into
/// the FMA as a `{1to16}` operand) instead of a shuffle on port 5, which unpacking K-quant
/// values keeps busy. Used by AVX-512 Q4_K/Q5_K (6–7 % faster in cache; AVX-512 Q6_K's single
/// product was no faster and keeps the register broadcast) and by the AVX2 K-quants. Only an
/// optimisation barrier for the compiler, which would otherwise broadcast the register the
/// value was computed in; values are the same.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn in_memory<T>(v: &T) -> &T {
    std::hint::black_box(v)
}

/// One K-quant superblock of a weight row, unpacked for the prefill kernels (384 bytes): the
/// 256 values as unsigned bytes in the dword-transposed tile order of
/// [`crate::act::Q8KTile`], and per 16-value group the scale `ws = d·sc_g` and the min factor
/// `wm` (Q4_K/Q5_K: `dmin·m_g`; Q6_K: `32·d·sc_g`, its −32 offset), so that a row·token product
/// is `Σ_g ws_g·(Σ q·a)_g·d_a − Σ_g wm_g·d_a·bsum_g`.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub struct KPacked {
    pub qs: [u8; 256],
    pub ws: [f32; 16],
    pub wm: [f32; 16],
}

/// Sixteen Q8_0 weight blocks packed for the prefill kernels (576 bytes): `qs` holds
/// `w + 128` as unsigned bytes in the tile order of [`crate::act::Q8_0Tile`], `d` the block
/// scales as f32 (0 for padding past the end of a row).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub struct Q8_0Packed {
    pub qs: [u8; 512],
    pub d: [f32; 16],
}

impl KPacked {
    pub const ZERO: KPacked = KPacked {
        qs: [0; 256],
        ws: [0.0; 16],
        wm: [0.0; 16],
    };
}
impl Q8_0Packed {
    pub const ZERO: Q8_0Packed = Q8_0Packed {
        qs: [0; 512],
        d: [0.0; 16],
    };
}

/// The safe entry points of one level's kernels, one line each, in a level module:
///
/// ```text
/// entry_points! { "features";
///     dot  q4k_q8k = q4k_q8k_impl(BlockQ4K, BlockQ8K);   // row dot
///     gemm f16_gemm = f16_gemm_impl(f16, f32);            // tile gemm on rows as stored
///     tile kq_gemm = kq_gemm_impl: kq_micro(KPacked, Q8KTile) x 4; // tile::gemm
///     pack pack_q4k = pack_q4k_impl(BlockQ4K => KPacked, count);
///     rows_fn q4k_rows = q4k_rows_impl(BlockQ4K, BlockQ8K); // many rows · one token (decode)
///     rows q8_0_q8_0, q8_0_rows = q8_0_q8_0_impl(BlockQ8_0, BlockQ8_0) x 2; // both, R rows a step
/// }
/// ```
///
/// `tile` also writes the `#[target_feature(enable = "features")]` function (`kq_gemm_impl`)
/// that absorbs the shared driver (`tile::gemm`, `#[inline(always)]`) with the level's micro
/// kernel (one row × up to 4 tokens here) as its `Micro`, inlined; `rows … x R` takes a kernel
/// of R rows × one token (`imp::<R>([&[W]; R], &[A]) -> [f32; R]`) and writes both the row dot
/// (its one-row form) and a many-rows entry that runs it R rows a step; the other kinds wrap a
/// `#[target_feature]` function the level wrote (`rows_fn`: a many-rows one, `imp(w, a, out)`).
/// `pack` checks that `out` holds `count(row.len())` units. SAFETY (every wrapper): a level module's functions are only
/// reachable through `WeightFormat::kernels` for a `cpu::Level`, which exists only after the
/// CPU was checked for the level's features; `dot` cuts both slices to their common length,
/// `gemm`/`tile` check the shapes with [`gemm_shape`], `rows`/`rows_fn` with [`rows_shape`], and `pack`
/// the lengths, which bounds
/// every pointer offset the kernels form (rows, tokens, blocks and masked tails inside the
/// slices).
macro_rules! entry_points {
    ($f:literal;) => {};
    ($f:literal; dot $name:ident = $imp:ident($w:ty, $a:ty); $($rest:tt)*) => {
        pub(crate) fn $name(w: &[$w], a: &[$a]) -> f32 {
            let n = w.len().min(a.len());
            // SAFETY: see `dot::entry_points`.
            unsafe { $imp(&w[..n], &a[..n]) }
        }
        $crate::dot::entry_points!($f; $($rest)*);
    };
    ($f:literal; rows_fn $name:ident = $imp:ident($w:ty, $a:ty); $($rest:tt)*) => {
        pub(crate) fn $name(w: &[$w], a: &[$a], out: &mut [f32]) {
            $crate::dot::rows_shape(w.len(), a.len(), out.len());
            // SAFETY: see `dot::entry_points` (the shape check makes `w` `out.len()` whole rows
            // of `a.len()` blocks, the level function's contract).
            unsafe { $imp(w, a, out) }
        }
        $crate::dot::entry_points!($f; $($rest)*);
    };
    ($f:literal; rows $dot:ident, $name:ident = $imp:ident($w:ty, $a:ty) x $r:literal; $($rest:tt)*) => {
        pub(crate) fn $dot(w: &[$w], a: &[$a]) -> f32 {
            let n = w.len().min(a.len());
            // SAFETY: see `dot::entry_points`.
            unsafe { $imp::<1>([&w[..n]], &a[..n])[0] }
        }
        pub(crate) fn $name(w: &[$w], a: &[$a], out: &mut [f32]) {
            /// Every row dotted with `a` in one `#[target_feature]` call, R rows at a time
            /// (independent accumulator chains, one load of each activation block), the last
            /// rows one at a time; each row's sum is that of the one-row form, bit for bit.
            #[target_feature(enable = $f)]
            unsafe fn rows(w: &[$w], a: &[$a], out: &mut [f32]) {
                let n = a.len();
                let mut outs = out.chunks_exact_mut($r);
                let mut ws = w.chunks_exact($r * n);
                for (o, wr) in (&mut outs).zip(&mut ws) {
                    let rows: [&[$w]; $r] = std::array::from_fn(|i| &wr[i * n..(i + 1) * n]);
                    // SAFETY: the caller's contract (`rows` below) is the row dot's.
                    o.copy_from_slice(&unsafe { $imp::<$r>(rows, a) });
                }
                let rest = outs.into_remainder();
                for (o, row) in rest.iter_mut().zip(ws.remainder().chunks_exact(n)) {
                    // SAFETY: as above.
                    *o = unsafe { $imp::<1>([row], a)[0] };
                }
            }
            $crate::dot::rows_shape(w.len(), a.len(), out.len());
            // SAFETY: see `dot::entry_points` (the shape check makes every row a whole
            // `a.len()`-block slice of `w`).
            unsafe { rows(w, a, out) }
        }
        $crate::dot::entry_points!($f; $($rest)*);
    };
    ($f:literal; gemm $name:ident = $imp:ident($w:ty, $a:ty); $($rest:tt)*) => {
        pub(crate) fn $name(
            w: &[$w],
            a: &[$a],
            n: usize,
            bias: Option<&[f32]>,
            out: &mut [&mut [f32]],
        ) {
            $crate::dot::gemm_shape(w.len(), a.len(), n, bias, out);
            // SAFETY: see `dot::entry_points`.
            unsafe { $imp(w, a, n, bias, out) }
        }
        $crate::dot::entry_points!($f; $($rest)*);
    };
    ($f:literal; outer $name:ident = $imp:ident($w:ty) in $layout:expr; $($rest:tt)*) => {
        pub(crate) fn $name(
            w: &[$w],
            a: &[f32],
            n: usize,
            bias: Option<&[f32]>,
            out: &mut [&mut [f32]],
        ) {
            let tokens = out.len();
            $crate::dot::gemm_shape(w.len(), tokens * n, n, bias, out);
            assert_eq!(a.len(), $layout.len(tokens, n), "outer: activation length");
            // SAFETY: see `dot::entry_points`.
            unsafe { $imp(w, a, n, bias, out) }
        }
        $crate::dot::entry_points!($f; $($rest)*);
    };
    ($f:literal; tile $name:ident = $imp:ident: $kernel:ident($w:ty, $a:ty) x $max_t:expr;
        $($rest:tt)*) => {
        #[target_feature(enable = $f)]
        unsafe fn $imp(w: &[$w], a: &[$a], n: usize, bias: Option<&[f32]>, out: &mut [&mut [f32]]) {
            struct Tile;
            impl $crate::dot::tile::Micro for Tile {
                type W = $w;
                type A = $a;
                const MAX_T: usize = $max_t;
                #[inline(always)]
                unsafe fn row<const T: usize>(w: *const $w, a: *const $a, n: usize) -> [f32; T] {
                    // SAFETY: the caller's contract (`Micro::row`) is the kernel's.
                    unsafe { $kernel::<T>(w, a, n) }
                }
            }
            // SAFETY: the caller's contract is the driver's.
            unsafe { $crate::dot::tile::gemm::<Tile>(w, a, n, bias, out) }
        }
        $crate::dot::entry_points!($f; gemm $name = $imp($w, $a); $($rest)*);
    };
    ($f:literal; pack $name:ident = $imp:ident($b:ty => $p:ty, $count:path); $($rest:tt)*) => {
        pub(crate) fn $name(row: &[$b], out: &mut [$p]) {
            assert_eq!($count(row.len()), out.len(), concat!(stringify!($name), ": length"));
            // SAFETY: see `dot::entry_points`.
            unsafe { $imp(row, out) }
        }
        $crate::dot::entry_points!($f; $($rest)*);
    };
}
pub(crate) use entry_points;

/// `n` packed units for `n` blocks (the K-quant packers' count).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const fn same(n: usize) -> usize {
    n
}

/// Check a [`GemmFn`] call's shape; returns (rows, tokens).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn gemm_shape(
    w: usize,
    a: usize,
    n: usize,
    bias: Option<&[f32]>,
    out: &[&mut [f32]],
) -> (usize, usize) {
    assert!(
        n > 0 && w.is_multiple_of(n),
        "gemm: weight length is not a whole number of rows"
    );
    let (rows, tokens) = (w / n, out.len());
    assert_eq!(a, tokens * n, "gemm: activation length");
    assert!(out.iter().all(|o| o.len() == rows), "gemm: output rows");
    if let Some(b) = bias {
        assert_eq!(b.len(), rows, "gemm: bias length");
    }
    (rows, tokens)
}

/// Check a [`crate::format::RowsFn`] call's shape: `out.len()` rows of `a` blocks in `w`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn rows_shape(w: usize, a: usize, out: usize) {
    assert!(a > 0, "rows: empty activation row");
    assert_eq!(
        w,
        a * out,
        "rows: weight length is not out.len() rows of the activation's"
    );
}

// SAFETY: repr(C) arrays of integers and floats without padding (sizes 384 and 576, multiples
// of the 64-byte alignment), valid for every bit pattern.
unsafe impl crate::Plain for KPacked {}
// SAFETY: as above.
unsafe impl crate::Plain for Q8_0Packed {}
