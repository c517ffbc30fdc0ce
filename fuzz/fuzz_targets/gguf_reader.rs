//! cargo-fuzz target: see ggpt_fuzz::harness::gguf_reader (shared with the regression test that
//! replays tests/fixtures/fuzz-regressions/gguf_reader/).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ggpt_fuzz::harness::gguf_reader(data);
});
