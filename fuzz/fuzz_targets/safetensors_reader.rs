//! cargo-fuzz target: see ggpt_fuzz::harness::safetensors_reader (shared with the regression test that
//! replays tests/fixtures/fuzz-regressions/safetensors_reader/).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ggpt_fuzz::harness::safetensors_reader(data);
});
