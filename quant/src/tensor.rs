//! Whole-tensor helpers: view bytes as blocks, quantize/dequantize rows of any supported type
//! (parallel over rows with rayon). Every type-specific step goes through [`crate::format`].
//!
//! **Alignment.** Block structs have alignment 2 (f16 fields) or 4 (Q8_K's f32), but byte
//! buffers from a `Vec<u8>` or a file offset need not be aligned. [`cast_blocks`] therefore
//! refuses unaligned input, and the functions here never require alignment: when the bytes
//! are aligned they work in place, otherwise they go through a small aligned block buffer
//! and copy bytes. [`quantize`] returns a plain `Vec<u8>` (no alignment promise); view it
//! with [`cast_blocks`] and fall back to [`dequantize`] if that returns `None`.
//!
//! **Byte order.** Blocks are read and written in native order, which is the on-disk
//! little-endian order on every target this crate builds for.

use crate::format::format;
use crate::{BlockFormat, GgmlType, Plain};
use rayon::prelude::*;
use std::mem::{align_of, size_of};

/// Why a tensor cannot be converted or checked. The messages name the type and the numbers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error("cannot quantize to {0}: not implemented")]
    CannotQuantize(GgmlType),
    #[error("cannot dequantize {0}: not implemented")]
    CannotDequantize(GgmlType),
    #[error("quantize to {0}: row length is 0")]
    EmptyRow(GgmlType),
    #[error("quantize to {ty}: {len} values are not a whole number of rows of {cols}")]
    PartialRow {
        ty: GgmlType,
        len: usize,
        cols: usize,
    },
    #[error("quantize to {ty}: row length {cols} is not a multiple of the block size {}", ty.block_size())]
    RaggedRow { ty: GgmlType, cols: usize },
    #[error("quantize to {ty}: {rows} rows of {row_bytes} bytes overflow")]
    TooLarge {
        ty: GgmlType,
        rows: usize,
        row_bytes: usize,
    },
    #[error("quantize to {ty}: output is {found} bytes, expected {rows} rows × {row_bytes} bytes")]
    OutputSize {
        ty: GgmlType,
        found: usize,
        rows: usize,
        row_bytes: usize,
    },
    #[error("dequantize {ty}: {values} values are not a whole number of {}-value blocks", ty.block_size())]
    PartialBlock { ty: GgmlType, values: usize },
    #[error("dequantize {ty}: {found} bytes given, {values} values need {expected}")]
    InputSize {
        ty: GgmlType,
        found: usize,
        values: usize,
        expected: u64,
    },
    #[error("{ty}: {len} bytes is not a whole number of {size}-byte blocks")]
    PartialBytes {
        ty: GgmlType,
        len: usize,
        size: usize,
    },
    /// A NaN or infinite value (`field: None`, `index` = value) or block scale (`index` = block).
    #[error("{ty}: found {what} {}", match field { Some(f) => format!("in {f} of block {index}"), None => format!("value at index {index}") })]
    NonFinite {
        ty: GgmlType,
        what: &'static str,
        field: Option<&'static str>,
        index: usize,
    },
}

#[cfg(target_endian = "big")]
compile_error!(
    "ggpt-quant reads ggml blocks in native byte order and needs a little-endian target"
);

/// View `bytes` as blocks. `None` if the length is not a whole number of blocks or the start
/// is not aligned for `B`.
pub fn cast_blocks<B: Plain>(bytes: &[u8]) -> Option<&[B]> {
    let size = size_of::<B>();
    if !bytes.len().is_multiple_of(size) || bytes.as_ptr().align_offset(align_of::<B>()) != 0 {
        return None;
    }
    // SAFETY: the pointer is aligned for B and the length is an exact multiple of its size
    // (both checked above); BlockFormat guarantees B is padding-free plain data for which
    // every bit pattern is valid; the returned slice borrows `bytes`, so lifetimes and
    // aliasing rules carry over.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), bytes.len() / size) })
}

/// Mutable version of [`cast_blocks`].
pub fn cast_blocks_mut<B: Plain>(bytes: &mut [u8]) -> Option<&mut [B]> {
    let size = size_of::<B>();
    if !bytes.len().is_multiple_of(size) || bytes.as_ptr().align_offset(align_of::<B>()) != 0 {
        return None;
    }
    // SAFETY: as in `cast_blocks`; the exclusive borrow of `bytes` moves to the result, and
    // any bytes written through B are valid u8s.
    Some(unsafe {
        std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<B>(), bytes.len() / size)
    })
}

/// The bytes of a block slice (e.g. to write it to a file).
pub fn blocks_as_bytes<B: BlockFormat>(blocks: &[B]) -> &[u8] {
    // SAFETY: B is padding-free plain data (BlockFormat contract), so all its bytes are
    // initialised; u8 has alignment 1; the length in bytes is exact.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks))
    }
}

/// Mutable bytes of a block slice.
pub fn blocks_as_bytes_mut<B: BlockFormat>(blocks: &mut [B]) -> &mut [u8] {
    // SAFETY: as in `blocks_as_bytes`; any byte pattern written is a valid B (BlockFormat
    // contract), and the exclusive borrow moves to the result.
    unsafe {
        std::slice::from_raw_parts_mut(
            blocks.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(blocks),
        )
    }
}

/// An all-zero block (valid for every BlockFormat).
fn zeroed<B: BlockFormat>() -> B {
    // SAFETY: BlockFormat types are plain data where every bit pattern, all zeros included,
    // is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Blocks staged per step when the caller's bytes are unaligned.
const STAGE: usize = 16;

/// Quantize `src` (whole blocks) into `out` bytes, aligned or not.
pub(crate) fn from_float_bytes<B: BlockFormat>(src: &[f32], out: &mut [u8]) {
    debug_assert_eq!(src.len() / B::BLOCK * size_of::<B>(), out.len());
    if let Some(blocks) = cast_blocks_mut::<B>(out) {
        B::from_float(src, blocks);
        return;
    }
    let mut stage = [zeroed::<B>(); STAGE];
    for (x, o) in src
        .chunks(STAGE * B::BLOCK)
        .zip(out.chunks_mut(STAGE * size_of::<B>()))
    {
        let n = x.len() / B::BLOCK;
        B::from_float(x, &mut stage[..n]);
        o.copy_from_slice(blocks_as_bytes(&stage[..n]));
    }
}

/// Dequantize `bytes` (whole blocks) into `out`, aligned or not.
pub(crate) fn to_float_bytes<B: BlockFormat>(bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len() / size_of::<B>() * B::BLOCK, out.len());
    if let Some(blocks) = cast_blocks::<B>(bytes) {
        B::to_float(blocks, out);
        return;
    }
    let mut stage = [zeroed::<B>(); STAGE];
    for (b, y) in bytes
        .chunks(STAGE * size_of::<B>())
        .zip(out.chunks_mut(STAGE * B::BLOCK))
    {
        let n = b.len() / size_of::<B>();
        blocks_as_bytes_mut(&mut stage[..n]).copy_from_slice(b);
        B::to_float(&stage[..n], y);
    }
}

/// Types [`quantize`] can produce.
pub fn can_quantize(ty: GgmlType) -> bool {
    format(ty).is_some()
}

/// Types [`dequantize`] can read.
pub fn can_dequantize(ty: GgmlType) -> bool {
    can_quantize(ty)
}

/// Check `src.len()`/`cols`/`ty` and return (rows, bytes per row).
fn check_quantize(
    ty: GgmlType,
    src_len: usize,
    cols: usize,
) -> Result<(usize, usize), TensorError> {
    if !can_quantize(ty) {
        return Err(TensorError::CannotQuantize(ty));
    }
    if cols == 0 {
        return Err(TensorError::EmptyRow(ty));
    }
    if !src_len.is_multiple_of(cols) {
        return Err(TensorError::PartialRow {
            ty,
            len: src_len,
            cols,
        });
    }
    let row_bytes = ty
        .row_bytes(cols as u64)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or(TensorError::RaggedRow { ty, cols })?;
    Ok((src_len / cols, row_bytes))
}

/// Quantize a row-major `rows × cols` matrix (`rows = src.len()/cols`) with ggml's reference
/// quantizer for `ty` (F32, F16, BF16, Q8_0, Q4_K, Q5_K, Q6_K, Q8_K), in parallel over rows.
/// `cols` must be a multiple of the type's block size. The result is the tensor's bytes as
/// ggml lays them out (see the module docs about alignment).
pub fn quantize(ty: GgmlType, src: &[f32], cols: usize) -> Result<Vec<u8>, TensorError> {
    let (rows, row_bytes) = check_quantize(ty, src.len(), cols)?;
    let total = rows.checked_mul(row_bytes).ok_or(TensorError::TooLarge {
        ty,
        rows,
        row_bytes,
    })?;
    let mut out = vec![0u8; total];
    quantize_into(ty, src, cols, &mut out)?;
    Ok(out)
}

/// Like [`quantize`] but writes into `out`, which must be exactly the tensor's size in bytes
/// (any alignment). Does not allocate (for streaming conversion).
pub fn quantize_into(
    ty: GgmlType,
    src: &[f32],
    cols: usize,
    out: &mut [u8],
) -> Result<(), TensorError> {
    let (rows, row_bytes) = check_quantize(ty, src.len(), cols)?;
    if rows.checked_mul(row_bytes) != Some(out.len()) {
        return Err(TensorError::OutputSize {
            ty,
            found: out.len(),
            rows,
            row_bytes,
        });
    }
    if rows == 0 {
        return Ok(());
    }
    let quantize = format(ty).expect("checked by check_quantize").quantize;
    // Super-block quantizers search for scales and are compute-bound; the others are
    // memory-bound: give rayon bigger pieces of work for them.
    let min_rows = if ty.block_size() >= 256 {
        1
    } else {
        (1 << 16) / cols + 1
    };
    out.par_chunks_mut(row_bytes)
        .zip(src.par_chunks(cols))
        .with_min_len(min_rows)
        .for_each(|(o, x)| quantize(x, o));
    Ok(())
}

/// Dequantize a tensor's bytes (any alignment) of type `ty` into `out`, whose length is the
/// number of values; `bytes` must hold exactly that many values' blocks. Supports F32, F16,
/// BF16, Q8_0, Q4_K, Q5_K, Q6_K and Q8_K; large inputs are split across threads.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), TensorError> {
    if !can_dequantize(ty) {
        return Err(TensorError::CannotDequantize(ty));
    }
    let expect = ty
        .row_bytes(out.len() as u64)
        .ok_or(TensorError::PartialBlock {
            ty,
            values: out.len(),
        })?;
    if expect != bytes.len() as u64 {
        return Err(TensorError::InputSize {
            ty,
            found: bytes.len(),
            values: out.len(),
            expected: expect,
        });
    }
    // Pieces of ~64 Ki values keep the threads busy without much overhead.
    let blocks_per_piece = ((1usize << 16) / ty.block_size()).max(1);
    let piece_bytes = blocks_per_piece * ty.type_size();
    let piece_vals = blocks_per_piece * ty.block_size();
    let run = format(ty).expect("checked by can_dequantize").dequantize;
    if out.len() <= piece_vals {
        run(bytes, out);
    } else {
        bytes
            .par_chunks(piece_bytes)
            .zip(out.par_chunks_mut(piece_vals))
            .for_each(|(b, y)| run(b, y));
    }
    Ok(())
}

/// Byte offsets of the fp16 scale fields in one block of `ty` (ggml's
/// `ggml_validate_row_data` checks exactly these) with their names, for the quantized types;
/// empty for the float types and Q8_K (whose scale is f32).
pub fn fp16_scale_fields(ty: GgmlType) -> &'static [(usize, &'static str)] {
    use GgmlType::*;
    match ty {
        Q4_0 | Q5_0 | Q8_0 => &[(0, "d")],
        Q4_1 | Q5_1 => &[(0, "d"), (2, "m")],
        Q8_1 => &[(0, "d"), (2, "s")],
        // block_q2_K: scales[16], qs[64], then d, dmin.
        Q2K => &[(80, "d"), (82, "dmin")],
        // block_q3_K: hmask[32], qs[64], scales[12], then d.
        Q3K => &[(108, "d")],
        Q4K | Q5K => &[(0, "d"), (2, "dmin")],
        // block_q6_K: d comes last.
        Q6K => &[(208, "d")],
        F32 | F16 | BF16 | Q8K => &[],
    }
}

fn f16_problem(bits: u16) -> Option<&'static str> {
    if bits & 0x7c00 != 0x7c00 {
        None
    } else if bits & 0x03ff == 0 {
        Some("inf")
    } else {
        Some("NaN")
    }
}

/// Like ggml's `ggml_validate_row_data`: the length must be whole blocks, and no fp16/f32
/// scale (or F16/BF16/F32 value) may be NaN or infinite. The error names the type, the
/// block (value index for F16/BF16/F32) and the field.
pub fn validate_row_data(ty: GgmlType, bytes: &[u8]) -> Result<(), TensorError> {
    let size = ty.type_size();
    if !bytes.len().is_multiple_of(size) {
        return Err(TensorError::PartialBytes {
            ty,
            len: bytes.len(),
            size,
        });
    }
    match ty {
        GgmlType::F32 => {
            for (i, c) in bytes.chunks_exact(4).enumerate() {
                let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if !v.is_finite() {
                    let what = if v.is_nan() { "NaN" } else { "inf" };
                    return Err(TensorError::NonFinite {
                        ty,
                        what,
                        field: None,
                        index: i,
                    });
                }
            }
        }
        GgmlType::F16 => {
            for (i, c) in bytes.chunks_exact(2).enumerate() {
                if let Some(what) = f16_problem(u16::from_le_bytes([c[0], c[1]])) {
                    return Err(TensorError::NonFinite {
                        ty,
                        what,
                        field: None,
                        index: i,
                    });
                }
            }
        }
        GgmlType::BF16 => {
            for (i, c) in bytes.chunks_exact(2).enumerate() {
                let bits = u16::from_le_bytes([c[0], c[1]]) & 0x7fff;
                if bits >= 0x7f80 {
                    let what = if bits > 0x7f80 { "NaN" } else { "inf" };
                    return Err(TensorError::NonFinite {
                        ty,
                        what,
                        field: None,
                        index: i,
                    });
                }
            }
        }
        GgmlType::Q8K => {
            // Not checked by ggml (never stored in files), but its f32 d can be bad too.
            for (i, blk) in bytes.chunks_exact(size).enumerate() {
                let d = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
                if !d.is_finite() {
                    let what = if d.is_nan() { "NaN" } else { "inf" };
                    return Err(TensorError::NonFinite {
                        ty,
                        what,
                        field: Some("d"),
                        index: i,
                    });
                }
            }
        }
        _ => {
            let fields = fp16_scale_fields(ty);
            for (i, blk) in bytes.chunks_exact(size).enumerate() {
                for &(off, name) in fields {
                    if let Some(what) = f16_problem(u16::from_le_bytes([blk[off], blk[off + 1]])) {
                        return Err(TensorError::NonFinite {
                            ty,
                            what,
                            field: Some(name),
                            index: i,
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::q6_k::BlockQ6K;
    use crate::q8_0::BlockQ8_0;
    use crate::q8_k::BlockQ8K;

    fn data(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32) * 0.37).sin() * (1.0 + (i % 13) as f32))
            .collect()
    }

    #[test]
    fn cast_rejects_bad_length_and_alignment() {
        let buf = vec![0u64; 64];
        // SAFETY: viewing an initialised u64 buffer as bytes (test-only helper).
        let bytes: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), 512) };
        assert_eq!(
            cast_blocks::<BlockQ8_0>(&bytes[..34 * 3]).map(|b| b.len()),
            Some(3)
        );
        assert!(cast_blocks::<BlockQ8_0>(&bytes[..35]).is_none());
        assert!(cast_blocks::<BlockQ8_0>(&bytes[1..35]).is_none());
        assert!(cast_blocks::<BlockQ8K>(&bytes[2..2 + 292]).is_none());
        assert!(cast_blocks::<BlockQ8K>(&bytes[4..4 + 292]).is_some());
        assert!(cast_blocks::<BlockQ6K>(&bytes[2..2 + 210]).is_some());
    }

    #[test]
    fn quantize_unaligned_equals_aligned() {
        let cols = 512;
        let src = data(cols * 3);
        for ty in [
            GgmlType::F16,
            GgmlType::Q8_0,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
        ] {
            let a = quantize(ty, &src, cols).unwrap();
            let mut raw = vec![0u8; a.len() + 1];
            // Whichever of raw[0..] / raw[1..] is odd-addressed forces the staged path.
            for off in 0..2 {
                let o = &mut raw[off..off + a.len()];
                quantize_into(ty, &src, cols, o).unwrap();
                assert_eq!(o, &a[..], "{ty} offset {off}");
                let mut y1 = vec![0.0f32; src.len()];
                let mut y2 = vec![1.0f32; src.len()];
                dequantize(ty, o, &mut y1).unwrap();
                dequantize(ty, &a, &mut y2).unwrap();
                assert_eq!(y1, y2);
            }
        }
    }

    #[test]
    fn float_types_round_trip() {
        let src = data(300);
        for ty in [GgmlType::F32, GgmlType::BF16, GgmlType::F16] {
            let q = quantize(ty, &src, 100).unwrap();
            assert_eq!(q.len(), 300 * ty.type_size());
            let mut y = vec![0.0; 300];
            dequantize(ty, &q, &mut y).unwrap();
            let tol = match ty {
                GgmlType::F32 => 0.0,
                GgmlType::F16 => 1.0 / 1024.0,
                _ => 1.0 / 128.0,
            };
            for (a, b) in src.iter().zip(&y) {
                assert!((a - b).abs() <= tol * a.abs(), "{ty}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn shape_errors() {
        let src = data(512);
        assert!(quantize(GgmlType::Q4K, &src, 0).is_err());
        assert!(quantize(GgmlType::Q4K, &src, 128).is_err()); // not whole blocks
        assert!(quantize(GgmlType::Q4K, &src, 300).is_err()); // not whole rows
        assert!(quantize(GgmlType::Q4_0, &src, 256).is_err()); // unsupported
        let mut out = vec![0u8; 10];
        assert!(quantize_into(GgmlType::Q8_0, &src, 256, &mut out).is_err());
        let q = quantize(GgmlType::Q8_0, &src, 256).unwrap();
        let mut y = vec![0.0; 511];
        assert!(dequantize(GgmlType::Q8_0, &q, &mut y).is_err());
        let mut y = vec![0.0; 480];
        assert!(dequantize(GgmlType::Q8_0, &q, &mut y).is_err());
        assert!(dequantize(GgmlType::Q2K, &q, &mut y).is_err());
    }

    #[test]
    fn validate_finds_bad_scales() {
        let src = data(1024);
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
            GgmlType::F16,
        ] {
            let mut q = quantize(ty, &src, 1024).unwrap();
            assert_eq!(validate_row_data(ty, &q), Ok(()));
            // Poison the second block's first scale field.
            let off = ty.type_size() + fp16_scale_fields(ty).first().map_or(0, |f| f.0);
            q[off..off + 2].copy_from_slice(&0x7c01u16.to_le_bytes());
            let e = validate_row_data(ty, &q).unwrap_err().to_string();
            assert!(e.contains("NaN") && e.contains(" 1"), "{ty}: {e}");
            q[off..off + 2].copy_from_slice(&0xfc00u16.to_le_bytes());
            let e = validate_row_data(ty, &q).unwrap_err().to_string();
            assert!(e.contains("inf"), "{ty}: {e}");
            assert!(validate_row_data(ty, &q[..q.len() - 1]).is_err());
        }
        let mut q = quantize(GgmlType::Q4K, &src, 1024).unwrap();
        q[144 * 3 + 2..144 * 3 + 4].copy_from_slice(&0x7e00u16.to_le_bytes());
        let e = validate_row_data(GgmlType::Q4K, &q)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dmin") && e.contains("block 3"), "{e}");

        let mut f = quantize(GgmlType::F32, &src, 1024).unwrap();
        assert!(validate_row_data(GgmlType::F32, &f).is_ok());
        f[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(validate_row_data(GgmlType::F32, &f)
            .unwrap_err()
            .to_string()
            .contains("index 10"));
        let mut b = quantize(GgmlType::BF16, &src, 1024).unwrap();
        assert!(validate_row_data(GgmlType::BF16, &b).is_ok());
        b[6..8].copy_from_slice(&0xff80u16.to_le_bytes());
        assert!(validate_row_data(GgmlType::BF16, &b)
            .unwrap_err()
            .to_string()
            .contains("inf value at index 3"));
    }
}
