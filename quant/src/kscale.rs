//! The 12-byte scale field of Q4_K and Q5_K: eight sub-blocks' 6-bit scales and 6-bit mins.
//!
//! Sub-blocks 0..4 keep their scale and min in the low 6 bits of bytes j and j+4; sub-blocks
//! 4..8 keep their low 4 bits in the nibbles of byte j+4 and their top 2 bits in the spare top
//! bits of bytes j-4 (scale) and j (min). [`set_scale_min_k4`] writes that layout and
//! [`scales_mins_bytes`] is the one decoder (the AVX-512 kernels do the same in a vector).

/// Pack sub-block `j`'s 6-bit scale `ls` and min `lm` (ggml's packing in
/// `quantize_row_q4_K_ref`). `scales` must start zeroed for j ≥ 4's top bits to OR in.
#[inline]
pub fn set_scale_min_k4(j: usize, ls: u8, lm: u8, scales: &mut [u8; 12]) {
    if j < 4 {
        scales[j] = ls;
        scales[j + 4] = lm;
    } else {
        scales[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
        scales[j - 4] |= (ls >> 4) << 6;
        scales[j] |= (lm >> 4) << 6;
    }
}

/// All eight scales and mins as 16 bytes: the scales of sub-blocks 0..8, then their mins.
/// Works four bytes at a time on u32 words.
#[inline(always)]
pub fn scales_mins_bytes(s: &[u8; 12]) -> [u8; 16] {
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (a, b, c) = (w(0), w(4), w(8));
    let sc_lo = a & 0x3f3f_3f3f;
    let sc_hi = (c & 0x0f0f_0f0f) | ((a >> 2) & 0x3030_3030);
    let mn_lo = b & 0x3f3f_3f3f;
    let mn_hi = ((c >> 4) & 0x0f0f_0f0f) | ((b >> 2) & 0x3030_3030);
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&sc_lo.to_le_bytes());
    out[4..8].copy_from_slice(&sc_hi.to_le_bytes());
    out[8..12].copy_from_slice(&mn_lo.to_le_bytes());
    out[12..16].copy_from_slice(&mn_hi.to_le_bytes());
    out
}

/// (scales, mins) of the eight sub-blocks.
#[inline(always)]
pub fn unpack_scales_mins(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let b = scales_mins_bytes(s);
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    sc.copy_from_slice(&b[..8]);
    mn.copy_from_slice(&b[8..]);
    (sc, mn)
}

/// Sub-block `j`'s (scale, min), each 0..=63 (ggml's `get_scale_min_k4`).
#[inline(always)]
pub fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    let b = scales_mins_bytes(q);
    (b[j], b[8 + j])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_min_packing_round_trips() {
        for seed in 0..64u32 {
            let ls: Vec<u8> = (0..8).map(|j| ((seed * 7 + j * 13) % 64) as u8).collect();
            let lm: Vec<u8> = (0..8)
                .map(|j| ((seed * 11 + j * 5 + 3) % 64) as u8)
                .collect();
            let mut q = [0u8; 12];
            for j in 0..8 {
                set_scale_min_k4(j, ls[j], lm[j], &mut q);
            }
            let (sc, mn) = unpack_scales_mins(&q);
            for j in 0..8 {
                assert_eq!(get_scale_min_k4(j, &q), (ls[j], lm[j]));
                assert_eq!((sc[j], mn[j]), (ls[j], lm[j]));
            }
        }
    }

    /// Every byte pattern decodes as ggml's per-sub-block formula says (written out here, as
    /// the specification the word-wise decoder must meet).
    #[test]
    fn decoder_matches_ggml_formula() {
        let mut s = 0x1234_5678_9abc_def1u64;
        for _ in 0..10_000 {
            let mut q = [0u8; 12];
            for b in q.iter_mut() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                *b = s as u8;
            }
            for j in 0..8 {
                let want = if j < 4 {
                    (q[j] & 63, q[j + 4] & 63)
                } else {
                    (
                        (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
                        (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
                    )
                };
                assert_eq!(get_scale_min_k4(j, &q), want);
            }
        }
    }
}
