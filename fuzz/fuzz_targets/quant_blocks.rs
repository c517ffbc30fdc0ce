//! cargo-fuzz target: see ggpt_fuzz::harness::quant_blocks (shared with the regression test that
//! replays tests/fixtures/fuzz-regressions/quant_blocks/).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ggpt_fuzz::harness::quant_blocks(data);
});
