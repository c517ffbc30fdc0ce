//! Helpers shared by the matmul tests: deterministic inputs, and quantized bytes laid out as
//! a mapped GGUF tensor would be.

/// Deterministic values in about [-1, 1] with a few larger ones, like hidden states.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            if i % 97 == 0 {
                v * 8.0
            } else {
                v
            }
        })
        .collect()
}

/// `bytes` copied to a 4-byte-aligned buffer (what an mmapped GGUF tensor guarantees).
pub fn aligned(bytes: &[u8]) -> Vec<u32> {
    let mut v = vec![0u32; bytes.len().div_ceil(4)];
    for (i, b) in bytes.iter().enumerate() {
        v[i / 4] |= (*b as u32) << (8 * (i % 4));
    }
    v
}

pub fn as_bytes(v: &[u32], len: usize) -> &[u8] {
    // SAFETY: u32 has no padding; the view covers `len ≤ 4·v.len()` initialised bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), len) }
}
