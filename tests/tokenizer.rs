//! GPT-2 tokenizer parity: ids from independent reference implementations (test vectors, the
//! tiny-gpt2 validation tokens and PyTorch prompts), decode round trips, streaming, errors.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ggpt::tokenizer::{DecodeError, Tokenizer};
use ggpt_gguf::{Array, GgufFile, GgufWriter, Value as GgufValue};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn gpt2() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = root().join("tests/fixtures/tokenizer");
        Tokenizer::from_hf_files(&dir.join("vocab.json"), &dir.join("merges.txt"))
            .expect("load the GPT-2 tokenizer fixture")
    })
}

struct Vector {
    text: String,
    ids: Vec<u32>,
    ids_if_special_not_parsed: Option<Vec<u32>>,
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids array")
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("id")).expect("id fits u32"))
        .collect()
}

fn vectors() -> Vec<Vector> {
    let path = root().join("tests/fixtures/tokenizer/gpt2_tokenizer_vectors.jsonl");
    let text = std::fs::read_to_string(&path).expect("read vectors");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("vector JSON");
            Vector {
                text: v["text"].as_str().expect("text").to_owned(),
                ids: ids_of(&v["ids"]),
                ids_if_special_not_parsed: v.get("ids_if_special_not_parsed").map(ids_of),
            }
        })
        .collect()
}

/// Collects every mismatch so that a failure shows how widespread it is, not just the first.
fn report(failures: &[String], what: &str) {
    assert!(
        failures.is_empty(),
        "{} {what} mismatches; first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(8)].join("\n")
    );
}

#[test]
fn vocabulary_shape() {
    let t = gpt2();
    assert_eq!(t.n_vocab(), 50257);
    assert_eq!(t.n_merges(), 50000);
    assert_eq!(t.eos_id(), Some(50256));
    assert_eq!(t.token_id("Ġthe"), Some(262));
    assert_eq!(t.token_bytes(262), Some(&b" the"[..]));
    assert_eq!(t.token_bytes(198), Some(&b"\n"[..]));
    assert_eq!(t.token_bytes(50256), Some(&b"<|endoftext|>"[..]));
    assert_eq!(t.token_bytes(50257), None);
    assert!(t.is_special(50256));
}

#[test]
fn encodes_every_test_vector_exactly() {
    let t = gpt2();
    let vs = vectors();
    assert_eq!(vs.len(), 450);
    assert_eq!(
        vs.iter()
            .filter(|v| v.ids_if_special_not_parsed.is_some())
            .count(),
        3
    );
    let mut failures = Vec::new();
    for v in &vs {
        let got = t.encode(&v.text);
        if got != v.ids {
            failures.push(format!("{:?}: got {got:?}, want {:?}", v.text, v.ids));
        }
        // Without a special token in the text, ordinary encoding must agree with `encode`.
        let plain = v.ids_if_special_not_parsed.as_ref().unwrap_or(&v.ids);
        let got = t.encode_ordinary(&v.text);
        if &got != plain {
            failures.push(format!(
                "ordinary {:?}: got {got:?}, want {plain:?}",
                v.text
            ));
        }
    }
    report(&failures, "encode");
}

#[test]
fn decodes_every_test_vector_back_to_its_text() {
    let t = gpt2();
    let mut failures = Vec::new();
    for v in vectors() {
        match t.decode(&v.ids) {
            Ok(s) if s == v.text => {}
            other => failures.push(format!("{:?}: got {other:?}", v.text)),
        }
        if let Some(plain) = &v.ids_if_special_not_parsed {
            if t.decode(plain).as_deref() != Ok(v.text.as_str()) {
                failures.push(format!("{:?}: plain ids do not decode back", v.text));
            }
        }
    }
    report(&failures, "decode");
}

#[test]
fn streaming_decode_gives_the_same_text_token_by_token() {
    let t = gpt2();
    let mut failures = Vec::new();
    let mut held_back = 0;
    for v in vectors() {
        let mut dec = t.stream_decoder();
        let mut text = String::new();
        for &id in &v.ids {
            let chunk = dec.push(id).expect("valid id");
            // Incomplete characters are held back, never shown as U+FFFD midway.
            if chunk.contains('\u{FFFD}') && !v.text.contains('\u{FFFD}') {
                failures.push(format!("{:?}: replacement char in chunk {chunk:?}", v.text));
            }
            if !dec.pending().is_empty() {
                held_back += 1;
            }
            text.push_str(&chunk);
        }
        assert!(dec.pending().is_empty(), "{:?}: bytes left pending", v.text);
        text.push_str(&dec.finish());
        if text != v.text {
            failures.push(format!("{:?}: streamed {text:?}", v.text));
        }
    }
    report(&failures, "streaming");
    // The vectors include emoji and CJK split across tokens: the hold-back path must have run.
    assert!(
        held_back > 10,
        "only {held_back} tokens ended mid-character"
    );
}

#[test]
fn stream_decoder_holds_back_split_characters_and_flushes_lossily() {
    let t = gpt2();
    // "👍" is F0 9F 91 8D; GPT-2 splits it over two tokens.
    let ids = t.encode("👍");
    assert_eq!(ids.len(), 2, "{ids:?}");
    let mut dec = t.stream_decoder();
    assert_eq!(dec.push(ids[0]).expect("push"), "");
    assert!(!dec.pending().is_empty());
    assert_eq!(dec.push(ids[1]).expect("push"), "👍");

    // An unfinished character at the end of the stream is flushed as U+FFFD.
    let mut dec = t.stream_decoder();
    assert_eq!(dec.push_all(&[ids[0]]).expect("push"), "");
    assert_eq!(dec.finish(), "\u{FFFD}");

    // Bytes that can never be completed do not block the text after them: a lone UTF-8
    // continuation byte followed by "a".
    let cont = t.token_id(&ggpt::tokenizer::byte_alphabet::byte_to_char(0x8D).to_string());
    let cont = cont.expect("byte token");
    let a = t.token_id("a").expect("a");
    let mut dec = t.stream_decoder();
    assert_eq!(dec.push_all(&[cont, a]).expect("push"), "\u{FFFD}a");
    assert!(dec.pending().is_empty());

    let mut dec = t.stream_decoder();
    assert_eq!(
        dec.push(60_000),
        Err(DecodeError::IdOutOfRange {
            id: 60_000,
            n_vocab: 50257
        })
    );
}

#[test]
fn decode_rejects_bad_ids_and_broken_utf8() {
    let t = gpt2();
    let err = t.decode(&[262, 50257]).unwrap_err();
    assert_eq!(
        err,
        DecodeError::IdOutOfRange {
            id: 50257,
            n_vocab: 50257
        }
    );
    assert!(err.to_string().contains("50257"), "{err}");
    assert!(t.decode_bytes(&[u32::MAX]).is_err());

    let ids = t.encode("a👍");
    let cut = &ids[..ids.len() - 1];
    assert_eq!(t.decode(cut), Err(DecodeError::InvalidUtf8 { offset: 1 }));
    assert_eq!(t.decode_lossy(cut).as_deref(), Ok("a\u{FFFD}"));
    assert_eq!(t.decode_bytes(cut).expect("bytes").len(), 1 + 3);
    assert_eq!(t.decode(&[]).as_deref(), Ok(""));
}

/// `val_tokens.npy` holds GPT-2 ids from Hugging Face's tokenizer: 471 documents, each followed
/// by `<|endoftext|>`. Decoding them and encoding the text again must give the same ids.
#[test]
fn reencodes_the_tiny_gpt2_validation_tokens_exactly() {
    let ids = read_npy_u16(&root().join("models/tiny-gpt2/val_tokens.npy"));
    assert_eq!(ids.len(), 253_274);
    let t = gpt2();
    let text = t.decode(&ids).expect("validation tokens decode");
    let again = t.encode(&text);
    if let Some(i) = ids.iter().zip(&again).position(|(a, b)| a != b) {
        let lo = i.saturating_sub(5);
        panic!(
            "first difference at token {i}: want {:?}, got {:?} (text {:?})",
            &ids[lo..(i + 5).min(ids.len())],
            &again[lo..(i + 5).min(again.len())],
            t.decode_lossy(&ids[lo..(i + 5).min(ids.len())])
        );
    }
    assert_eq!(again.len(), ids.len());
    assert_eq!(ids.iter().filter(|&&i| i == 50256).count(), 471);
}

/// The prompts PyTorch ran for golden.json, with their Hugging Face token ids.
#[test]
fn matches_the_golden_prompt_ids() {
    let path = root().join("models/tiny-gpt2/golden.json");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read golden")).expect("json");
    let prompts = golden["prompts"].as_array().expect("prompts");
    assert!(!prompts.is_empty());
    let t = gpt2();
    for p in prompts {
        let text = p["text"].as_str().expect("text");
        assert_eq!(t.encode(text), ids_of(&p["input_ids"]), "{text:?}");
        let new_ids = ids_of(&p["greedy"]["new_ids"]);
        let want = p["greedy"]["text"].as_str().expect("greedy text");
        assert_eq!(t.decode(&new_ids).as_deref(), Ok(want));
    }
}

#[test]
fn wikitext_round_trips() {
    let path = root().join("tests/fixtures/text/wikitext-2-test.txt");
    let text = std::fs::read_to_string(path).expect("read wikitext");
    let t = gpt2();
    let ids = t.encode(&text);
    // Around 4.4 bytes per token for English prose; a broken merge table gives far more tokens.
    let bytes_per_token = text.len() as f64 / ids.len() as f64;
    assert!(
        (3.5..6.0).contains(&bytes_per_token),
        "{bytes_per_token} bytes per token"
    );
    assert_eq!(t.decode(&ids).expect("decode"), text);
}

#[test]
fn hf_files_errors_name_the_file_and_the_problem() {
    let dir = std::env::temp_dir().join(format!("ggpt-tok-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let merges = root().join("tests/fixtures/tokenizer/merges.txt");
    let check = |name: &str, body: &str, want: &str| {
        let vocab = dir.join(name);
        std::fs::write(&vocab, body).expect("write vocab");
        let err = Tokenizer::from_hf_files(&vocab, &merges).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(name) && msg.contains(want), "{msg}");
    };
    check("notjson.json", "{", "not valid JSON");
    check("array.json", "[1, 2]", "expected a JSON object");
    check("gap.json", r#"{"a": 0, "b": 2}"#, "out of range");
    check("dup.json", r#"{"a": 0, "b": 0}"#, "used by both");
    check("neg.json", r#"{"a": -1}"#, "not a non-negative integer");
    check("small.json", r#"{"a": 0, "b": 1}"#, "no token for byte");
    let missing = dir.join("missing.json");
    let err = Tokenizer::from_hf_files(&missing, Path::new("/nonexistent/merges.txt")).unwrap_err();
    assert!(format!("{err:#}").contains("missing.json"), "{err:#}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The GGUF metadata llama.cpp's converter writes for GPT-2's tokenizer, built from the
/// Hugging Face fixture files. `skip` leaves a key out, `replace` overrides one.
fn gpt2_gguf(skip: &str, replace: Option<(&str, GgufValue)>) -> GgufFile {
    let dir = root().join("tests/fixtures/tokenizer");
    let vocab: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("vocab.json")).expect("vocab"))
            .expect("vocab json");
    let mut tokens: Vec<(u64, String)> = vocab
        .as_object()
        .expect("object")
        .iter()
        .map(|(t, id)| (id.as_u64().expect("id"), t.clone()))
        .collect();
    tokens.sort();
    let tokens: Vec<String> = tokens.into_iter().map(|(_, t)| t).collect();
    let types: Vec<i32> = (0..tokens.len())
        .map(|i| if i == 50256 { 3 } else { 1 })
        .collect();
    let merges: Vec<String> = std::fs::read_to_string(dir.join("merges.txt"))
        .expect("merges")
        .lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    let mut kvs = vec![
        ("tokenizer.ggml.model", GgufValue::String("gpt2".into())),
        ("tokenizer.ggml.pre", GgufValue::String("gpt-2".into())),
        (
            "tokenizer.ggml.tokens",
            GgufValue::Array(Array::String(tokens)),
        ),
        (
            "tokenizer.ggml.token_type",
            GgufValue::Array(Array::I32(types)),
        ),
        (
            "tokenizer.ggml.merges",
            GgufValue::Array(Array::String(merges)),
        ),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(50256)),
    ];
    kvs.retain(|(k, _)| *k != skip);
    let mut w = GgufWriter::new();
    for (k, v) in kvs {
        w.add_kv(k, v);
    }
    if let Some((k, v)) = replace {
        w.add_kv(k, v);
    }
    GgufFile::from_bytes(w.header_bytes(), "test.gguf").expect("parse the test GGUF")
}

#[test]
fn from_gguf_matches_the_hf_files() {
    let t = Tokenizer::from_gguf(&gpt2_gguf("", None)).expect("tokenizer from GGUF");
    assert_eq!(t.n_vocab(), 50257);
    assert_eq!(t.eos_id(), Some(50256));
    let mut failures = Vec::new();
    for v in vectors() {
        if t.encode(&v.text) != v.ids {
            failures.push(format!("{:?}", v.text));
        }
    }
    report(&failures, "GGUF encode");

    // Token types are honoured: with <|endoftext|> marked normal it is plain text.
    let types: Vec<i32> = vec![1; 50257];
    let gguf = gpt2_gguf(
        "",
        Some((
            "tokenizer.ggml.token_type",
            GgufValue::Array(Array::I32(types)),
        )),
    );
    let t = Tokenizer::from_gguf(&gguf).expect("tokenizer from GGUF");
    assert!(!t.is_special(50256));
    assert_eq!(t.encode("<|endoftext|>"), [27, 91, 437, 1659, 5239, 91, 29]);
}

#[test]
fn from_gguf_errors_name_the_file_and_the_key() {
    let err_of = |gguf: GgufFile| format!("{:#}", Tokenizer::from_gguf(&gguf).unwrap_err());
    let cases = [
        (
            gpt2_gguf("tokenizer.ggml.merges", None),
            "cannot find tokenizer merges",
        ),
        (
            gpt2_gguf("tokenizer.ggml.tokens", None),
            "cannot find tokenizer vocab",
        ),
        (
            gpt2_gguf("tokenizer.ggml.model", None),
            "tokenizer.ggml.model is missing",
        ),
        (
            gpt2_gguf(
                "",
                Some(("tokenizer.ggml.model", GgufValue::String("llama".into()))),
            ),
            "\"llama\" is not supported",
        ),
        (
            gpt2_gguf(
                "",
                Some(("tokenizer.ggml.pre", GgufValue::String("llama3".into()))),
            ),
            "\"llama3\" is not supported",
        ),
        (
            gpt2_gguf(
                "",
                Some(("tokenizer.ggml.eos_token_id", GgufValue::U32(50257))),
            ),
            "EOS token id 50257 is out of range",
        ),
        (
            gpt2_gguf(
                "",
                Some((
                    "tokenizer.ggml.token_type",
                    GgufValue::Array(Array::I32(vec![1; 10])),
                )),
            ),
            "token types list has 10 entries",
        ),
        (
            gpt2_gguf("", Some(("tokenizer.ggml.merges", GgufValue::U32(1)))),
            "tokenizer.ggml.merges",
        ),
        (
            gpt2_gguf(
                "",
                Some((
                    "tokenizer.ggml.merges",
                    GgufValue::Array(Array::String(vec!["Ġ t".into(), "Ġ zzzz".into()])),
                )),
            ),
            "merge 1 (\"Ġ zzzz\"): \"zzzz\" is not in the vocabulary",
        ),
    ];
    for (gguf, want) in cases {
        let msg = err_of(gguf);
        assert!(msg.contains("test.gguf") && msg.contains(want), "{msg}");
    }
    // Without a pre-tokenizer key the file is still taken as GPT-2.
    assert!(Tokenizer::from_gguf(&gpt2_gguf("tokenizer.ggml.pre", None)).is_ok());
}

/// Reads a 1-D little-endian uint16 `.npy` file (format version 1.0).
fn read_npy_u16(path: &Path) -> Vec<u32> {
    let bytes = std::fs::read(path).expect("read npy");
    assert_eq!(&bytes[..6], b"\x93NUMPY", "not an npy file");
    assert_eq!(bytes[6], 1, "npy version");
    let header_len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).expect("header");
    assert!(header.contains("'descr': '<u2'"), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    bytes[10 + header_len..]
        .chunks_exact(2)
        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
        .collect()
}
