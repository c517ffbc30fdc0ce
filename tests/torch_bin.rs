//! `pytorch_model.bin` checkpoints end to end: convert the fixtures written by real PyTorch
//! (tests/fixtures/torch-bin), load the GGUF, and compare the logits with the ones transformers
//! computed for the same weights (stored beside the fixtures); and `ggpt convert --dry-run`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use ggpt::model::Model;
use ggpt::session::Session;
use ggpt_convert::pipeline::{convert_hf, ConvertOptions, NoProgress};
use ggpt_convert::policy::FileType;
use serde_json::Value as Json;

fn fixtures() -> PathBuf {
    common::repo().join("tests/fixtures/torch-bin")
}

/// The case's checkpoint + config with the shared tokenizer files, in a scratch directory of
/// `test`'s own (tests run in parallel in one process, and `scratch` empties its directory).
fn model_dir(test: &str, case: &str) -> PathBuf {
    let d = common::scratch(&format!("torch-{test}-{case}"));
    let hf = d.join(case);
    fs::create_dir_all(&hf).unwrap();
    for e in fs::read_dir(fixtures().join(case)).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), hf.join(e.file_name())).unwrap();
    }
    for f in ["vocab.json", "merges.txt"] {
        fs::copy(
            common::repo().join("tests/fixtures/tokenizer").join(f),
            hf.join(f),
        )
        .unwrap();
    }
    hf
}

fn convert(hf: &Path, ty: FileType) -> PathBuf {
    let out = hf.join(format!("m-{}.gguf", ty.label()));
    let opts = ConvertOptions {
        hf_dir: hf.to_path_buf(),
        types: vec![ty],
        output: Some(out.clone()),
        name: Some("m".into()),
    };
    convert_hf(&opts, &NoProgress).unwrap();
    out
}

#[test]
fn converted_fixtures_reproduce_transformers_logits() {
    for (case, expected) in [
        ("zip-tied", "zip-tied"),
        ("legacy-tied", "zip-tied"),
        ("sharded", "zip-tied"),
        ("zip-untied-bf16", "zip-untied-bf16"),
        ("openai-layout-f32", "openai-layout-f32"),
    ] {
        let want: Json = serde_json::from_str(
            &fs::read_to_string(fixtures().join(format!("expected/{expected}.json"))).unwrap(),
        )
        .unwrap();
        let ids: Vec<u32> = want["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let argmax: Vec<usize> = want["argmax"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let top5: Vec<f32> = want["last_logits_top5"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let top5_ids: Vec<usize> = want["last_logits_top5_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();

        let hf = model_dir("logits", case);
        let path = convert(&hf, FileType::F16);
        let model = Model::load(&path).unwrap();
        assert_eq!(
            model.has_output_weight(),
            case == "zip-untied-bf16",
            "{case}: output.weight presence"
        );
        let mut s = Session::new(&model, 128, 1).unwrap();
        let mut logits = Vec::new();
        s.prefill_all_logits(&ids, &mut logits).unwrap();
        let v = logits.len() / ids.len();
        assert_eq!(v, 50257);
        // Random tiny models have close logits; f16 weights (bf16 → f16 for the untied case)
        // move them by ~1e-3. Transformers' argmax must be within 0.02 of our best, and the
        // last position's top five must match in value.
        for (t, &want_id) in argmax.iter().enumerate() {
            let row = &logits[t * v..(t + 1) * v];
            let best = row.iter().cloned().fold(f32::MIN, f32::max);
            assert!(
                best - row[want_id] < 0.02,
                "{case}: position {t}: transformers' argmax {want_id} has {} vs our max {best}",
                row[want_id]
            );
        }
        let last = &logits[(ids.len() - 1) * v..];
        for (&id, &x) in top5_ids.iter().zip(&top5) {
            assert!(
                (last[id] - x).abs() < 0.02,
                "{case}: last logit of {id}: ours {} transformers {x}",
                last[id]
            );
        }
    }
}

#[test]
fn dry_run_prints_the_exact_sizes_and_writes_nothing() {
    let hf = model_dir("dry-run", "zip-untied-bf16");
    let out = hf.join("out");
    fs::create_dir_all(&out).unwrap();
    let o = common::run_ggpt::<&std::ffi::OsStr>(&[
        "convert".as_ref(),
        hf.as_os_str(),
        "-t".as_ref(),
        "all".as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
        "--dry-run".as_ref(),
    ]);
    assert!(o.success(), "{}", o.describe());
    assert_eq!(
        fs::read_dir(&out).unwrap().count(),
        0,
        "dry run wrote files"
    );
    // Each predicted size, then the real conversion.
    let sizes: Vec<(String, u64)> = o
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("would write "))
        .map(|l| {
            let (path, rest) = l.split_once(" (").unwrap();
            let bytes = rest.split_once(' ').unwrap().0.parse().unwrap();
            (path.to_string(), bytes)
        })
        .collect();
    assert_eq!(sizes.len(), 4, "{}", o.stdout);
    assert!(o.stdout.contains("output.weight") && o.stdout.contains("lm_head.weight"));
    let r = common::run_ggpt::<&std::ffi::OsStr>(&[
        "convert".as_ref(),
        hf.as_os_str(),
        "-t".as_ref(),
        "all".as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    assert!(r.success(), "{}", r.describe());
    for (path, bytes) in sizes {
        assert_eq!(fs::metadata(&path).unwrap().len(), bytes, "{path}");
    }
}
