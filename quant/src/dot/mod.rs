//! Dot products of one weight row with one activation row, per (weight × activation) pair:
//! Q4_K·Q8_K, Q5_K·Q8_K, Q6_K·Q8_K, Q8_0·Q8_0, F16·F16 (and F32·F32).
//!
//! `scalar.rs` is the reference; `avx2.rs`, `avx512.rs` and `neon.rs` must agree with it
//! (exactly on the integer parts). The variant is chosen once at run time.
//! (H2 owns this module.)
