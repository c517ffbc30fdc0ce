//! The process-wide seed behind `ggpt.set_seed`: calls without `seed=` draw their seed from
//! it, so `set_seed(n)` followed by the same calls gives the same texts, as with
//! transformers' `set_seed`. Until `set_seed` is called it starts from the clock.

use std::sync::Mutex;

static STATE: Mutex<Option<u64>> = Mutex::new(None);

/// Restart the sequence of seeds from `seed`.
pub fn set_seed(seed: u64) {
    *STATE.lock().unwrap_or_else(|e| e.into_inner()) = Some(seed);
}

/// The next seed of the sequence (splitmix64).
pub fn next_seed() -> u64 {
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let s = state.get_or_insert_with(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
