//! cargo-fuzz target: see ggpt_fuzz::harness::torch_reader (the allow-list unpickler and the
//! pytorch_model.bin reader; shared with the regression test that replays
//! tests/fixtures/fuzz-regressions/torch_reader/).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ggpt_fuzz::harness::torch_reader(data);
});
