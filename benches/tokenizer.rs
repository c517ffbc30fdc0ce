//! Tokenizer throughput on WikiText-2 test (1.29 MB): encode with a cold and a warm piece
//! cache, decode, and building the tokenizer from `vocab.json` + `merges.txt`.
//!
//! Run: `cargo bench --bench tokenizer`.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ggpt::tokenizer::Tokenizer;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn load() -> Tokenizer {
    Tokenizer::from_hf_files(
        &fixture("tests/fixtures/tokenizer/vocab.json"),
        &fixture("tests/fixtures/tokenizer/merges.txt"),
    )
    .expect("load the GPT-2 tokenizer fixture")
}

fn bench(c: &mut Criterion) {
    let text = std::fs::read_to_string(fixture("tests/fixtures/text/wikitext-2-test.txt"))
        .expect("read wikitext-2-test.txt");
    let tok = load();
    let ids = tok.encode(&text);

    let mut g = c.benchmark_group("wikitext-2-test");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("encode (cold cache)", |b| {
        b.iter_batched(
            || tok.clear_cache(),
            |()| tok.encode(&text),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("encode (warm cache)", |b| b.iter(|| tok.encode(&text)));
    g.bench_function("decode", |b| b.iter(|| tok.decode(&ids).expect("decode")));
    g.finish();

    let mut g = c.benchmark_group("tokenizer");
    g.sample_size(10);
    g.bench_function("load vocab.json + merges.txt", |b| b.iter(load));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
