//! One definition per tensor format, in the spirit of ggml's `type_traits` table.
//!
//! A format is a [`BlockFormat`] (block layout, reference quantizer and dequantizer). A format
//! the runtime can multiply is also a [`WeightFormat`]: it names the activation block its dot
//! product takes (ggml's `vec_dot_type`) and, per instruction-set level, its kernels — a
//! row-by-row dot product and optionally a multi-token tile path. [`FORMATS`] lists every
//! format once; tensor conversion ([`crate::tensor`]), matrix validation and matmul
//! ([`crate::matmul`]) and the model loader all look a type up here and nowhere else.
//!
//! Adding a format: its block file implementing both traits (kernels in `dot/`), and one line
//! in [`FORMATS`]. docs/kernels.md lists the steps.

use crate::act::{Q8KTile, Q8_0Tile};
use crate::cpu::Level;
use crate::dot::{KPacked, Q8_0Packed};
use crate::matmul::{self, QMatrix, Scratch};
use crate::q4_k::BlockQ4K;
use crate::q5_0::BlockQ5_0;
use crate::q5_1::BlockQ5_1;
use crate::q5_k::BlockQ5K;
use crate::q6_k::BlockQ6K;
use crate::q8_0::BlockQ8_0;
use crate::q8_k::BlockQ8K;
use crate::{tensor, BlockFormat, GgmlType, Plain};
use half::{bf16, f16};
use std::cell::RefCell;

/// One row-by-row dot product: weight row blocks · activation row blocks.
pub type DotFn<W, A> = fn(&[W], &[A]) -> f32;

/// Consecutive weight rows · one activation row: `out[r] = dot(row r of w, a)` with each row
/// `a.len()` blocks long, bit for bit what the level's [`DotFn`] gives that row (a level has one
/// where a call per run of rows saves per-row work).
///
/// # Panics
/// If `w.len() != a.len() * out.len()`.
pub type RowsFn<W, A> = fn(w: &[W], a: &[A], out: &mut [f32]);

/// A block of rows times a block of tokens: for every row `r` of `w` (`w.len() / n` rows of
/// `n` elements) and token `t` (`out.len()` tokens, activation rows of `n` elements in `a`),
/// `out[t][r] = dot(w row r, a row t) (+ bias[r])`.
///
/// # Panics
/// If the slice lengths disagree with that shape.
pub type GemmFn<W, A> =
    fn(w: &[W], a: &[A], n: usize, bias: Option<&[f32]>, out: &mut [&mut [f32]]);

/// A format the runtime can multiply: its activation block and its kernels per level.
pub trait WeightFormat: BlockFormat {
    /// The activation element its dot product consumes (Q8_K for the K-quants, Q8_0 for
    /// Q8_0, f32 for float weights); one per weight block.
    type Act: Plain;
    /// The packed weight layout of its tile kernels (`()` for formats multiplied as stored).
    type Packed: Packing;

    /// Quantize one activation row (`x.len() == out.len() * Self::BLOCK`).
    fn quantize_act(x: &[f32], out: &mut [Self::Act]);

    /// The activations of `x` (`n_tokens` rows of `cols`) in [`Self::Act`] form, quantized into
    /// `buf` (float formats return `x` itself).
    fn activations<'a>(
        x: &'a [f32],
        cols: usize,
        buf: &'a mut Vec<matmul::Line>,
    ) -> &'a [Self::Act] {
        let rows = x.len() / cols;
        let per_row = cols / Self::BLOCK;
        let act = matmul::typed_buf::<Self::Act>(buf, rows * per_row);
        matmul::quantize_rows(x, act, cols, Self::quantize_act);
        act
    }

    /// Its kernels at `level` (the portable ones where the level has none of its own).
    fn kernels(level: Level) -> Kernels<Self>;

    /// The level's many-rows form of the row dot ([`RowsFn`]), if it has one; the matrix-vector
    /// path uses it instead of calling [`Kernels::dot`] once per row.
    fn rows_kernel(_level: Level) -> Option<RowsFn<Self, Self::Act>> {
        None
    }
}

/// One format's kernels at one level.
pub struct Kernels<W: WeightFormat> {
    /// Weight row · activation row.
    pub dot: DotFn<W, W::Act>,
    /// Multi-token kernels, where the level has them for this format.
    pub tile: Option<Tile<W>>,
}

/// How a format's multi-token kernels take their weights.
pub enum Tile<W: WeightFormat> {
    /// Rows as stored (float formats): `few`, times the [`WeightFormat::activations`], below
    /// `dot::outer::MIN_TOKENS` tokens; `many` from there on, with the activations in the
    /// level's `layout` (`dot::outer::Layout::lay_out`). Both give the same bits.
    Outer {
        few: GemmFn<W, W::Act>,
        many: GemmFn<W, f32>,
        layout: crate::dot::outer::Layout,
        /// At the `amx` level (F16, BF16), from `dot::amx::MIN_TOKENS` tokens on: instead of
        /// `few`/`many`, the AMX tiles, times the activations laid out by `dot::amx::lay_out`.
        /// Close to `many`'s sums, not equal to them (`dot::amx` bounds the difference), so not
        /// used under batch invariance.
        amx: Option<GemmFn<W, crate::dot::amx::Tile>>,
    },
    /// Rows packed per call into [`WeightFormat::Packed`], times activation tiles.
    Packed {
        /// Pack one weight row (`out.len() == Packed::per_row(row.len())`).
        pack: PackFn<W>,
        gemm: PackedGemmFn<W>,
    },
}

/// Packs one weight row of format `W` for its tile kernels.
pub type PackFn<W> = fn(&[W], &mut [<W as WeightFormat>::Packed]);
/// Packed rows of format `W` × activation tiles.
pub type PackedGemmFn<W> =
    GemmFn<<W as WeightFormat>::Packed, <<W as WeightFormat>::Packed as Packing>::Act>;

/// A packed weight layout for the tile kernels, with its activation tile.
pub trait Packing: Plain {
    /// The activation tile the packed rows are multiplied with.
    type Act: Plain;
    /// Packed items for a weight row of `blocks` blocks.
    fn per_row(blocks: usize) -> usize;
    /// Activation tiles for a token row of `blocks` weight blocks.
    fn act_per_row(blocks: usize) -> usize;
    /// Quantize one activation row into tiles.
    fn quantize_act(x: &[f32], out: &mut [Self::Act]);
    /// Run `f` with this thread's packing buffer (grown once, reused across calls).
    fn with_buffer<R>(f: impl FnOnce(&mut Vec<Self>) -> R) -> R;
}

thread_local! {
    static PACK_K: RefCell<Vec<KPacked>> = const { RefCell::new(Vec::new()) };
    static PACK_Q8_0: RefCell<Vec<Q8_0Packed>> = const { RefCell::new(Vec::new()) };
}

impl Packing for KPacked {
    type Act = Q8KTile;
    fn per_row(blocks: usize) -> usize {
        blocks
    }
    fn act_per_row(blocks: usize) -> usize {
        blocks
    }
    fn quantize_act(x: &[f32], out: &mut [Q8KTile]) {
        crate::act::quantize_q8k_tile(x, out)
    }
    fn with_buffer<R>(f: impl FnOnce(&mut Vec<Self>) -> R) -> R {
        PACK_K.with(|b| f(&mut b.borrow_mut()))
    }
}

impl Packing for Q8_0Packed {
    type Act = Q8_0Tile;
    fn per_row(blocks: usize) -> usize {
        crate::act::q8_0_tiles(blocks)
    }
    fn act_per_row(blocks: usize) -> usize {
        crate::act::q8_0_tiles(blocks)
    }
    fn quantize_act(x: &[f32], out: &mut [Q8_0Tile]) {
        crate::act::quantize_q8_0_tile(x, out)
    }
    fn with_buffer<R>(f: impl FnOnce(&mut Vec<Self>) -> R) -> R {
        PACK_Q8_0.with(|b| f(&mut b.borrow_mut()))
    }
}

/// No packing: the layout of formats whose tile kernels take rows as stored.
impl Packing for () {
    type Act = f32;
    fn per_row(_: usize) -> usize {
        0
    }
    fn act_per_row(_: usize) -> usize {
        0
    }
    fn quantize_act(_: &[f32], _: &mut [f32]) {}
    fn with_buffer<R>(f: impl FnOnce(&mut Vec<Self>) -> R) -> R {
        f(&mut Vec::new())
    }
}

/// A whole-matrix product for one format (see [`crate::matmul::matmul_at`]).
pub(crate) type MatmulFn =
    fn(Level, &QMatrix<'_>, &[f32], usize, Option<&[f32]>, &mut [f32], &mut Scratch);

/// One entry of the format table.
pub struct Format {
    /// The ggml type.
    pub ty: GgmlType,
    /// Alignment a byte slice must have to be viewed as blocks in place.
    pub align: usize,
    /// Quantize whole blocks into bytes (any alignment).
    pub(crate) quantize: fn(&[f32], &mut [u8]),
    /// Dequantize whole blocks from bytes (any alignment).
    pub(crate) dequantize: fn(&[u8], &mut [f32]),
    /// The matrix product, for formats the runtime multiplies.
    pub(crate) matmul: Option<MatmulFn>,
}

impl Format {
    /// A format ggpt can write and read but not multiply.
    const fn storage<B: BlockFormat>() -> Format {
        Format {
            ty: B::TYPE,
            align: std::mem::align_of::<B>(),
            quantize: tensor::from_float_bytes::<B>,
            dequantize: tensor::to_float_bytes::<B>,
            matmul: None,
        }
    }

    /// A format ggpt can also multiply.
    const fn weight<W: WeightFormat>() -> Format {
        Format {
            matmul: Some(matmul::matmul_format::<W>),
            ..Format::storage::<W>()
        }
    }

    /// Whether the runtime can multiply a matrix of this format.
    pub fn is_weight(&self) -> bool {
        self.matmul.is_some()
    }
}

/// Every format ggpt implements.
pub static FORMATS: [Format; 10] = [
    Format::weight::<f32>(),
    Format::weight::<f16>(),
    Format::weight::<bf16>(),
    Format::weight::<BlockQ8_0>(),
    Format::weight::<BlockQ5_0>(),
    Format::weight::<BlockQ5_1>(),
    Format::weight::<BlockQ4K>(),
    Format::weight::<BlockQ5K>(),
    Format::weight::<BlockQ6K>(),
    Format::storage::<BlockQ8K>(),
];

/// The table entry of `ty`, if ggpt implements it.
pub fn format(ty: GgmlType) -> Option<&'static Format> {
    FORMATS.iter().find(|f| f.ty == ty)
}

/// Whether ggpt can multiply a weight stored in `ty`.
pub fn is_weight_type(ty: GgmlType) -> bool {
    format(ty).is_some_and(Format::is_weight)
}

/// The types ggpt can multiply, in table order (for messages).
pub fn weight_types() -> impl Iterator<Item = GgmlType> {
    FORMATS.iter().filter(|f| f.is_weight()).map(|f| f.ty)
}

/// [`weight_types`] as one comma-separated list ("F32, F16, …"), for error messages.
pub fn weight_type_list() -> &'static str {
    static LIST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LIST.get_or_init(|| {
        weight_types()
            .map(GgmlType::name)
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// The `WeightFormat` of a K-quant (Q4_K, Q5_K, Q6_K): Q8_K activations, `KPacked` tiles, and
/// per level the row dot `$dot`, its many-rows form `$rows` (AVX-512 levels) and the packer
/// `$pack` of that level's module (the tile gemm `kq_gemm` is shared by the three formats).
macro_rules! k_quant_weight_format {
    ($block:ty, $dot:ident, $rows:ident, $pack:ident) => {
        impl $crate::format::WeightFormat for $block {
            type Act = $crate::q8_k::BlockQ8K;
            type Packed = $crate::dot::KPacked;
            fn quantize_act(x: &[f32], out: &mut [$crate::q8_k::BlockQ8K]) {
                $crate::act::quantize_q8k(x, out)
            }
            fn kernels(level: $crate::cpu::Level) -> $crate::format::Kernels<Self> {
                use $crate::cpu::Isa;
                use $crate::dot::*;
                use $crate::format::{DotFn, Kernels};
                let (dot, tile): (DotFn<Self, $crate::q8_k::BlockQ8K>, _) = match level.isa() {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => (
                        avx2::$dot,
                        Some($crate::format::Tile::Packed {
                            pack: avx2_tile::$pack,
                            gemm: avx2_tile::kq_gemm,
                        }),
                    ),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => (
                        avx512::plain::$dot,
                        Some($crate::format::Tile::Packed {
                            pack: avx512::plain::$pack,
                            gemm: avx512::plain::kq_gemm,
                        }),
                    ),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512Vnni | Isa::Amx => (
                        avx512::vnni::$dot,
                        Some($crate::format::Tile::Packed {
                            pack: avx512::vnni::$pack,
                            gemm: avx512::vnni::kq_gemm,
                        }),
                    ),
                    #[cfg(target_arch = "aarch64")]
                    Isa::Neon => (neon::plain::$dot, None),
                    #[cfg(target_arch = "aarch64")]
                    Isa::NeonDot => (neon::dot::$dot, None),
                    _ => (scalar::$dot, None),
                };
                Kernels { dot, tile }
            }
            fn rows_kernel(
                level: $crate::cpu::Level,
            ) -> Option<$crate::format::RowsFn<Self, $crate::q8_k::BlockQ8K>> {
                #[allow(unused_imports)]
                use $crate::dot::*;
                match level.isa() {
                    #[cfg(target_arch = "x86_64")]
                    $crate::cpu::Isa::Avx512 => Some(avx512::plain::$rows),
                    #[cfg(target_arch = "x86_64")]
                    $crate::cpu::Isa::Avx512Vnni | $crate::cpu::Isa::Amx => {
                        Some(avx512::vnni::$rows)
                    }
                    _ => None,
                }
            }
        }
    };
}
pub(crate) use k_quant_weight_format;
