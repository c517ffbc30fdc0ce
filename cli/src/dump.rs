//! `ggpt dump FILE.gguf OUTDIR`: every tensor dequantized to f32 as `OUTDIR/<name>.npy`, in
//! numpy order (shape = GGUF dims reversed). The Python cross-check loads these next to
//! llama.cpp's own gguf reader + dequantizer and compares them value for value.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use ggpt_convert::atomic::AtomicFile;

use super::common::{flag_error, output_error, InputError};
use ggpt_gguf::{GgufFile, TensorInfo};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF file to read.
    pub file: PathBuf,
    /// Directory for the .npy files (created if missing).
    pub outdir: PathBuf,
    /// Dump only this tensor (repeatable); default all.
    #[arg(long = "tensor", value_name = "NAME")]
    pub tensors: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let f = GgufFile::open(&args.file)?;
    let file = args.file.display();
    let bad_file = |problem: String| InputError::new(&args.file, problem);

    let selected: Vec<&TensorInfo> = if args.tensors.is_empty() {
        f.tensors().iter().collect()
    } else {
        args.tensors
            .iter()
            .map(|n| {
                f.tensor(n).ok_or_else(|| {
                    flag_error(format!("--tensor {n}: {file} has no tensor named '{n}'"))
                })
            })
            .collect::<Result<_>>()?
    };
    // Check everything that can be checked before writing the first file.
    let mut seen = HashSet::new();
    for t in &selected {
        if !ggpt_quant::tensor::can_dequantize(t.ty) {
            return Err(bad_file(format!(
                "tensor '{}' has type {}, which ggpt cannot dequantize",
                t.name, t.ty
            ))
            .into());
        }
        if !seen.insert(file_name(&t.name)) {
            return Err(bad_file(format!(
                "tensor '{}' maps to the same .npy file name as another tensor",
                t.name
            ))
            .into());
        }
    }

    ggpt_convert::atomic::create_dir_all(&args.outdir)
        .map_err(|e| output_error(&args.outdir, "cannot create the output directory", e))?;
    let mut values = Vec::new();
    for t in &selected {
        // The reader bounds every tensor by the file's size, so this fits in memory.
        let n = usize::try_from(t.n_elements())
            .map_err(|_| bad_file(format!("tensor '{}' is too large for this machine", t.name)))?;
        values.clear();
        values.resize(n, 0.0f32);
        ggpt_quant::tensor::dequantize(t.ty, f.tensor_data(t), &mut values)
            .map_err(|e| bad_file(format!("tensor '{}': {e}", t.name)))?;

        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        let path = args.outdir.join(file_name(&t.name));
        let write = || -> std::io::Result<()> {
            let mut out = AtomicFile::create(&path)?;
            ggpt::npy::write_f32(&mut out, &shape, &values)?;
            out.flush()?;
            out.commit()
        };
        // Each file appears complete or not at all (AtomicFile); a failure stops the dump.
        write().map_err(|e| output_error(&path, "cannot write", e))?;
    }
    super::common::note!(
        "wrote {} tensors from {file} to {}",
        selected.len(),
        args.outdir.display()
    );
    Ok(())
}

/// `<name>.npy`, with path separators replaced so a hostile tensor name cannot write outside
/// the output directory. Appending `.npy` also keeps `..` from naming a directory.
fn file_name(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if matches!(c, '/' | '\\' | '\0') {
                '_'
            } else {
                c
            }
        })
        .collect();
    format!("{safe}.npy")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ggpt_gguf::GgufWriter;
    use ggpt_quant::GgmlType;

    fn read_npy(path: &std::path::Path) -> (String, Vec<f32>) {
        let b = std::fs::read(path).unwrap();
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        let header = String::from_utf8(b[10..10 + hlen].to_vec()).unwrap();
        let vals = b[10 + hlen..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (header, vals)
    }

    #[test]
    fn dumps_every_tensor_in_numpy_order() {
        let dir = std::env::temp_dir().join(format!("ggpt-dump-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Values exactly representable in f16, so the expected output is known without
        // running any dequantizer.
        let vals: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        let f16_bytes: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let f32_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut w = GgufWriter::new();
        w.add_tensor("a.weight", &[3, 2], GgmlType::F16).unwrap();
        w.add_tensor("../b", &[6], GgmlType::F32).unwrap();
        let mut bytes = Vec::new();
        w.write_header(&mut bytes).unwrap();
        w.write_tensor_data(&mut bytes, 0, &f16_bytes).unwrap();
        w.write_tensor_data(&mut bytes, 1, &f32_bytes).unwrap();
        let file = dir.join("m.gguf");
        std::fs::write(&file, &bytes).unwrap();

        let out = dir.join("npy");
        run(Args {
            file: file.clone(),
            outdir: out.clone(),
            tensors: vec![],
        })
        .unwrap();
        let (h, v) = read_npy(&out.join("a.weight.npy"));
        assert!(
            h.contains("'descr': '<f4'") && h.contains("'shape': (2, 3)"),
            "{h}"
        );
        assert_eq!(v, vals);
        let (h, v) = read_npy(&out.join(".._b.npy"));
        assert!(h.contains("'shape': (6,)"), "{h}");
        assert_eq!(v, vals);
        assert!(!dir.join("b.npy").exists());

        let err = run(Args {
            file,
            outdir: out,
            tensors: vec!["nope".into()],
        })
        .unwrap_err();
        assert!(err.to_string().contains("no tensor named 'nope'"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_names_stay_inside_the_directory() {
        assert_eq!(
            file_name("blk.0.attn_qkv.weight"),
            "blk.0.attn_qkv.weight.npy"
        );
        assert_eq!(file_name("../../etc/x"), ".._.._etc_x.npy");
        assert_eq!(file_name(".."), "...npy");
        assert_eq!(file_name("a\\b"), "a_b.npy");
    }
}
