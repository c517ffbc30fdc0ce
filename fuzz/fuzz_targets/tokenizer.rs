//! cargo-fuzz target: see ggpt_fuzz::harness::tokenizer (shared with the regression test that
//! replays tests/fixtures/fuzz-regressions/tokenizer/).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ggpt_fuzz::harness::tokenizer(data);
});
