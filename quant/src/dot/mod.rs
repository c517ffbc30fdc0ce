//! Dot products of one weight row with one activation row, per (weight × activation) pair:
//! Q4_K·Q8_K, Q5_K·Q8_K, Q6_K·Q8_K, Q8_0·Q8_0, F16·F32, BF16·F32 and F32·F32.
//!
//! `scalar.rs` is the reference; `avx2.rs`, `avx512.rs` and `neon.rs` must agree with it
//! (exactly on the integer parts, up to float summation order on the rest).
//!
//! The variant is chosen once per process ([`isa`]): the best instruction set the CPU reports
//! at run time (never `-C target-cpu`, so one binary runs everywhere), unless the environment
//! variable `GGPT_ISA` names a lower supported one (`scalar`, `avx2`, `avx512`, `avx512vnni`,
//! `neon`, `neondot`), which is how tests and `ggpt` compare a SIMD path against the scalar one.
//! [`kernels_for`] gives any supported variant explicitly.
//!
//! Besides the row-by-row dots, a level may provide [`TileKernels`]: weight packing and
//! register-tiled products that reuse each unpacked weight block across several tokens, which
//! `matmul` uses for prefill. docs/kernels.md describes the layouts and the measurements.

pub mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_tile;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

use crate::q4_k::BlockQ4K;
use crate::q5_k::BlockQ5K;
use crate::q6_k::BlockQ6K;
use crate::q8_0::BlockQ8_0;
use crate::q8_k::BlockQ8K;
use half::{bf16, f16};
use std::fmt;
use std::sync::OnceLock;

/// An instruction-set level the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust, the reference.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL/DQ (+ the AVX2 set), without VNNI.
    Avx512,
    /// AVX-512 with VNNI (`vpdpbusd`): the int8 dot-product instruction.
    Avx512Vnni,
    /// aarch64 NEON (always present on aarch64).
    Neon,
    /// aarch64 NEON with the dot-product extension (`sdot`).
    NeonDot,
}

impl Isa {
    /// Every level, lowest first.
    pub const ALL: [Isa; 6] = [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Vnni,
        Isa::Neon,
        Isa::NeonDot,
    ];

    /// The name `GGPT_ISA` accepts.
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Neon => "neon",
            Isa::NeonDot => "neondot",
        }
    }

    /// Parse a `GGPT_ISA` value (case-insensitive).
    pub fn from_name(s: &str) -> Option<Isa> {
        let s = s.trim().to_ascii_lowercase();
        Isa::ALL.into_iter().find(|i| i.name() == s)
    }

    /// Whether this CPU can run the level (detected at run time).
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => Isa::Avx512.is_supported() && is_x86_feature_detected!("avx512vnni"),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => {
                std::arch::is_aarch64_feature_detected!("neon")
                    && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Whether kernels for this level exist in this build (it may still be unsupported by the CPU).
    fn is_implemented(self) -> bool {
        kernel_table(self).is_some()
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Levels this CPU supports and this build implements, lowest first.
pub fn available_isas() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|i| i.is_supported() && i.is_implemented())
        .collect()
}

/// The level in use: the best available, or the one `GGPT_ISA` names if that is available.
/// Decided on first call and fixed for the life of the process.
pub fn isa() -> Isa {
    static CHOSEN: OnceLock<Isa> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let avail = available_isas();
        let best = *avail.last().unwrap_or(&Isa::Scalar);
        match std::env::var("GGPT_ISA") {
            Ok(v) if !v.trim().is_empty() => match Isa::from_name(&v) {
                Some(i) if avail.contains(&i) => i,
                _ => {
                    eprintln!(
                        "ggpt: GGPT_ISA={v:?} is not available on this CPU/build (available: {}); using {best}",
                        avail.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
                    );
                    best
                }
            },
            _ => best,
        }
    })
}

/// One row-by-row dot product: weight row blocks · activation row blocks.
pub type DotFn<W, A> = fn(&[W], &[A]) -> f32;

/// The dot-product kernels of one instruction-set level.
///
/// A table for a SIMD level is only handed out after the CPU was checked to support it, which
/// is what makes its (internally `unsafe`) function pointers safe to call.
#[derive(Debug)]
pub struct Kernels {
    pub isa: Isa,
    pub q4k_q8k: DotFn<BlockQ4K, BlockQ8K>,
    pub q5k_q8k: DotFn<BlockQ5K, BlockQ8K>,
    pub q6k_q8k: DotFn<BlockQ6K, BlockQ8K>,
    pub q8_0_q8_0: DotFn<BlockQ8_0, BlockQ8_0>,
    pub f16_f32: DotFn<f16, f32>,
    pub bf16_f32: DotFn<bf16, f32>,
    pub f32_f32: DotFn<f32, f32>,
    /// Multi-token kernels, where this level has them.
    pub tile: Option<&'static TileKernels>,
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

/// A block of rows times a block of tokens: for every row `r` of `w` (`w.len() / n` rows of
/// `n` elements) and token `t` (`out.len()` tokens, activation rows of `n` elements in `a`),
/// `out[t][r] = dot(w row r, a row t) (+ bias[r])`.
///
/// # Panics
/// If the slice lengths disagree with that shape.
pub type GemmFn<W, A> =
    fn(w: &[W], a: &[A], n: usize, bias: Option<&[f32]>, out: &mut [&mut [f32]]);

/// Multi-token kernels: weight packing and register-tiled products that reuse each unpacked
/// weight block across several tokens. Only levels that benefit have them; elsewhere matmul
/// loops over the row-by-row [`Kernels`].
#[derive(Debug)]
pub struct TileKernels {
    /// Pack one weight row (`out.len() == row.len()`).
    pub pack_q4k: fn(&[BlockQ4K], &mut [KPacked]),
    pub pack_q5k: fn(&[BlockQ5K], &mut [KPacked]),
    pub pack_q6k: fn(&[BlockQ6K], &mut [KPacked]),
    /// Pack one weight row (`out.len() == act::q8_0_tiles(row.len())`).
    pub pack_q8_0: fn(&[BlockQ8_0], &mut [Q8_0Packed]),
    /// K-quant rows (`n` superblocks each) × Q8_K tiles.
    pub kq: GemmFn<KPacked, crate::act::Q8KTile>,
    /// Q8_0 rows (`n` tiles of 16 blocks each) × Q8_0 tiles.
    pub q8_0: GemmFn<Q8_0Packed, crate::act::Q8_0Tile>,
    pub f16: GemmFn<f16, f32>,
    pub bf16: GemmFn<bf16, f32>,
    pub f32: GemmFn<f32, f32>,
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

static SCALAR: Kernels = Kernels {
    isa: Isa::Scalar,
    q4k_q8k: scalar::q4k_q8k,
    q5k_q8k: scalar::q5k_q8k,
    q6k_q8k: scalar::q6k_q8k,
    q8_0_q8_0: scalar::q8_0_q8_0,
    f16_f32: scalar::f16_f32,
    bf16_f32: scalar::bf16_f32,
    f32_f32: scalar::f32_f32,
    tile: None,
};

/// The table compiled for `isa`, without checking the CPU.
fn kernel_table(isa: Isa) -> Option<&'static Kernels> {
    match isa {
        Isa::Scalar => Some(&SCALAR),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Some(&avx2::AVX2),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Some(&avx512::PLAIN),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => Some(&avx512::VNNI),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => Some(&neon::NEON),
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot => Some(&neon::NEON_DOT),
        _ => None,
    }
}

/// The kernels of `isa`, or `None` if this CPU or build cannot run it.
pub fn kernels_for(isa: Isa) -> Option<&'static Kernels> {
    if isa.is_supported() {
        kernel_table(isa)
    } else {
        None
    }
}

/// The kernels of the level in use ([`isa`]).
pub fn kernels() -> &'static Kernels {
    static K: OnceLock<&'static Kernels> = OnceLock::new();
    K.get_or_init(|| kernels_for(isa()).unwrap_or(&SCALAR))
}

fn check_len(w: usize, a: usize) {
    assert_eq!(w, a, "dot product of rows with different block counts");
}

/// Q4_K · Q8_K with the selected kernels. Panics if the block counts differ.
pub fn q4k_q8k(w: &[BlockQ4K], a: &[BlockQ8K]) -> f32 {
    check_len(w.len(), a.len());
    (kernels().q4k_q8k)(w, a)
}
/// Q5_K · Q8_K with the selected kernels. Panics if the block counts differ.
pub fn q5k_q8k(w: &[BlockQ5K], a: &[BlockQ8K]) -> f32 {
    check_len(w.len(), a.len());
    (kernels().q5k_q8k)(w, a)
}
/// Q6_K · Q8_K with the selected kernels. Panics if the block counts differ.
pub fn q6k_q8k(w: &[BlockQ6K], a: &[BlockQ8K]) -> f32 {
    check_len(w.len(), a.len());
    (kernels().q6k_q8k)(w, a)
}
/// Q8_0 · Q8_0 with the selected kernels. Panics if the block counts differ.
pub fn q8_0_q8_0(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
    check_len(w.len(), a.len());
    (kernels().q8_0_q8_0)(w, a)
}
/// F16 · F32 with the selected kernels. Panics if the lengths differ.
pub fn f16_f32(w: &[f16], a: &[f32]) -> f32 {
    check_len(w.len(), a.len());
    (kernels().f16_f32)(w, a)
}
/// BF16 · F32 with the selected kernels. Panics if the lengths differ.
pub fn bf16_f32(w: &[bf16], a: &[f32]) -> f32 {
    check_len(w.len(), a.len());
    (kernels().bf16_f32)(w, a)
}
/// F32 · F32 with the selected kernels. Panics if the lengths differ.
pub fn f32_f32(w: &[f32], a: &[f32]) -> f32 {
    check_len(w.len(), a.len());
    (kernels().f32_f32)(w, a)
}
