//! The fuzz targets' bodies live in [`harness`], a plain module with no libFuzzer dependency,
//! so tests/malformed.rs can include the same file and replay saved crashing inputs.

pub mod harness;
