//! `ggpt inspect FILE.gguf [--json]`: the header of a GGUF file — every metadata key with its
//! type and value, a tensor table like llama.cpp's gguf-dump, and size totals — then a check
//! of every tensor's values (NaN/inf scales and weights, as ggml validates row data), which
//! names the first bad tensor and makes the command fail after printing the header.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use ggpt_gguf::{Array, GgufError, GgufFile, Value};
use serde_json::json;

use super::common::print_stdout;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF file to inspect.
    pub file: PathBuf,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// Print arrays in full instead of their first few items.
    #[arg(long)]
    pub full: bool,
    /// Skip reading the tensor data (the NaN/inf check): header only, no I/O beyond it.
    #[arg(long)]
    pub no_check: bool,
}

/// The outcome of the tensor-value check.
struct DataCheck {
    result: Result<(), GgufError>,
    ms: f64,
}

/// Array items shown before "…" unless `--full`.
const SHOWN_ITEMS: usize = 8;
/// Longest string shown in text mode before it is cut (the chat templates of some models are
/// kilobytes long).
const SHOWN_CHARS: usize = 120;

pub fn run(args: Args) -> Result<()> {
    let f = GgufFile::open(&args.file)?;
    let check = (!args.no_check).then(|| {
        let t = Instant::now();
        let result = f.validate_tensor_data(|_| true, ggpt_quant::tensor::validate_row_data);
        DataCheck {
            result,
            ms: t.elapsed().as_secs_f64() * 1e3,
        }
    });
    let tensor_set = gpt2_tensor_set(&f);
    let max_items = if args.full { usize::MAX } else { SHOWN_ITEMS };
    let out = if args.json {
        let mut j = to_json(&f, max_items);
        if let Some(Err(e)) = &tensor_set {
            j["tensor_set"] = json!({ "valid": false, "error": e.to_string() });
        }
        j["tensor_data"] = match &check {
            None => json!({ "checked": false }),
            Some(c) => json!({
                "checked": true,
                "valid": c.result.is_ok(),
                "error": c.result.as_ref().err().map(|e| e.to_string()),
                "ms": c.ms,
            }),
        };
        let mut s = serde_json::to_string_pretty(&j)?;
        s.push('\n');
        s
    } else {
        let mut s = to_text(
            &f,
            max_items,
            if args.full { usize::MAX } else { SHOWN_CHARS },
        );
        let _ = match &check {
            None => writeln!(s, "  tensor data      not checked (--no-check)"),
            Some(DataCheck { result: Ok(()), ms }) => writeln!(
                s,
                "  tensor data      every value finite (checked in {ms:.1} ms)"
            ),
            Some(DataCheck { result: Err(_), .. }) => {
                writeln!(s, "  tensor data      INVALID (see the error below)")
            }
        };
        if let Some(Err(_)) = &tensor_set {
            let _ = writeln!(
                s,
                "  tensor set       INVALID for gpt2 (see the error below)"
            );
        }
        s
    };
    // A closed pipe (`ggpt inspect x.gguf | head`) is not an error; see `Stdout`.
    print_stdout(&out)?;
    // The header was worth showing; the file is still bad input.
    if let Some(Err(e)) = tensor_set {
        return Err(e.into());
    }
    match check {
        Some(DataCheck { result: Err(e), .. }) => Err(e.into()),
        _ => Ok(()),
    }
}

/// For a GPT-2 file whose hyper-parameters can be read, the loader's check that its tensors
/// are exactly the architecture's (same error as `run`); `None` for other files.
fn gpt2_tensor_set(f: &GgufFile) -> Option<Result<(), ggpt_models::LoadError>> {
    if !matches!(f.get_str("general.architecture"), Ok(Some("gpt2"))) {
        return None;
    }
    let hp = ggpt_models::Hparams::from_gguf(f).ok()?;
    Some(ggpt_models::gpt2::weights::check_tensor_set(f, hp.n_layer))
}

/// Per-type totals, and the whole-file totals derived from them.
#[derive(Default)]
struct TypeTotals {
    count: u64,
    params: u64,
    bytes: u64,
}

fn totals(f: &GgufFile) -> (TypeTotals, BTreeMap<&'static str, TypeTotals>) {
    let mut all = TypeTotals::default();
    let mut by_type: BTreeMap<&'static str, TypeTotals> = BTreeMap::new();
    for t in f.tensors() {
        for tt in [&mut all, by_type.entry(t.ty.name()).or_default()] {
            tt.count += 1;
            // Each tensor is validated to < 2^63 elements/bytes, but a sum of many could still
            // overflow in principle; saturate rather than panic.
            tt.params = tt.params.saturating_add(t.n_elements());
            tt.bytes = tt.bytes.saturating_add(t.size);
        }
    }
    (all, by_type)
}

fn bpw(bytes: u64, params: u64) -> f64 {
    if params == 0 {
        0.0
    } else {
        bytes as f64 * 8.0 / params as f64
    }
}

// ---------------------------------------------------------------------------------------------
// Text

fn to_text(f: &GgufFile, max_items: usize, max_chars: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}", f.path().display());
    let _ = writeln!(
        s,
        "GGUF v{}, alignment {}, data section at byte {}, {} bytes",
        f.version(),
        f.alignment(),
        f.data_offset(),
        f.file_len()
    );

    let _ = writeln!(s, "\nMetadata ({} keys):", f.metadata().len());
    let key_w = f
        .metadata()
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let types: Vec<String> = f.metadata().iter().map(|(_, v)| v.type_label()).collect();
    let type_w = types.iter().map(|t| t.len()).max().unwrap_or(0);
    for (i, ((k, v), ty)) in f.metadata().iter().zip(&types).enumerate() {
        let _ = writeln!(
            s,
            "{:>5}  {k:<key_w$}  {ty:<type_w$}  {}",
            i + 1,
            text_value(v, max_items, max_chars)
        );
    }

    let _ = writeln!(s, "\nTensors ({}):", f.tensors().len());
    let name_w = f
        .tensors()
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let dims: Vec<String> = f
        .tensors()
        .iter()
        .map(|t| format!("{:?}", t.dims))
        .collect();
    let dims_w = dims.iter().map(|d| d.len()).max().unwrap_or(4).max(4);
    let _ = writeln!(
        s,
        "{:>5}  {:<name_w$}  {:<5}  {:<dims_w$}  {:>12}  {:>12}",
        "#", "name", "type", "dims", "bytes", "offset"
    );
    for (i, (t, d)) in f.tensors().iter().zip(&dims).enumerate() {
        let _ = writeln!(
            s,
            "{i:>5}  {:<name_w$}  {:<5}  {d:<dims_w$}  {:>12}  {:>12}",
            t.name,
            t.ty.name(),
            t.size,
            t.offset
        );
    }

    let (all, by_type) = totals(f);
    let _ = writeln!(s, "\nTotals:");
    let _ = writeln!(s, "  tensors          {}", all.count);
    let _ = writeln!(s, "  parameters       {}", group_digits(all.params));
    let _ = writeln!(
        s,
        "  tensor bytes     {} ({})",
        group_digits(all.bytes),
        human_bytes(all.bytes)
    );
    let _ = writeln!(
        s,
        "  file bytes       {} ({})",
        group_digits(f.file_len()),
        human_bytes(f.file_len())
    );
    let _ = writeln!(s, "  bits per weight  {:.3}", bpw(all.bytes, all.params));
    let _ = writeln!(s, "  by type:");
    for (ty, tt) in &by_type {
        let _ = writeln!(
            s,
            "    {ty:<5} {:>4} tensors  {:>14} params  {:>14} bytes  {:>7.3} bpw",
            tt.count,
            group_digits(tt.params),
            group_digits(tt.bytes),
            bpw(tt.bytes, tt.params)
        );
    }
    s
}

/// A value on one line: strings quoted and escaped (so tokens like "\n" stay visible) and cut
/// at `max_chars`, arrays cut after `max_items` with their length shown.
fn text_value(v: &Value, max_items: usize, max_chars: usize) -> String {
    match v {
        Value::String(st) => quote(st, max_chars),
        Value::Array(a) => text_array(a, max_items, max_chars),
        v => v.to_string(),
    }
}

fn text_array(a: &Array, max_items: usize, max_chars: usize) -> String {
    let shown = a.len().min(max_items);
    let mut items: Vec<String> = (0..shown)
        .filter_map(|i| a.get(i))
        .map(|v| text_value(&v, max_items, max_chars))
        .collect();
    if shown < a.len() {
        items.push(format!("… {} more", a.len() - shown));
    }
    format!("[{}]", items.join(", "))
}

fn quote(st: &str, max_chars: usize) -> String {
    let n = st.chars().count();
    if n <= max_chars {
        format!("{st:?}")
    } else {
        let head: String = st.chars().take(max_chars).collect();
        format!("{head:?}… ({n} chars)")
    }
}

fn group_digits(n: u64) -> String {
    let d = n.to_string();
    let mut out = String::with_capacity(d.len() + d.len() / 3);
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.2} {}", UNITS[u])
    }
}

// ---------------------------------------------------------------------------------------------
// JSON

fn to_json(f: &GgufFile, max_items: usize) -> serde_json::Value {
    let metadata: Vec<_> = f
        .metadata()
        .iter()
        .map(|(k, v)| {
            let mut o = json!({ "key": k, "type": v.type_label() });
            match v {
                Value::Array(a) => {
                    o["elem_type"] = json!(a.elem_type().name());
                    o["len"] = json!(a.len());
                    o["value"] = json_array(a, max_items);
                    o["truncated"] = json!(a.len() > max_items);
                }
                v => o["value"] = json_value(v, max_items),
            }
            o
        })
        .collect();
    let tensors: Vec<_> = f
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({
                "index": i,
                "name": t.name,
                "type": t.ty.name(),
                "dims": t.dims,
                "n_elements": t.n_elements(),
                "bytes": t.size,
                "offset": t.offset,
            })
        })
        .collect();
    let (all, by_type) = totals(f);
    let by_type: serde_json::Map<String, serde_json::Value> = by_type
        .iter()
        .map(|(ty, tt)| {
            (
                ty.to_string(),
                json!({
                    "tensors": tt.count,
                    "parameters": tt.params,
                    "bytes": tt.bytes,
                    "bits_per_weight": bpw(tt.bytes, tt.params),
                }),
            )
        })
        .collect();
    json!({
        "file": f.path().display().to_string(),
        "version": f.version(),
        "alignment": f.alignment(),
        "data_offset": f.data_offset(),
        "metadata": metadata,
        "tensors": tensors,
        "totals": {
            "tensors": all.count,
            "parameters": all.params,
            "tensor_bytes": all.bytes,
            "file_bytes": f.file_len(),
            "bits_per_weight": bpw(all.bytes, all.params),
            "by_type": by_type,
        },
    })
}

fn json_value(v: &Value, max_items: usize) -> serde_json::Value {
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        // Via the shortest decimal form, so 1e-5f32 prints as 1e-5, not 9.999999747378752e-6.
        Value::F32(x) => json_float(x.to_string().parse().unwrap_or(f64::NAN)),
        Value::F64(x) => json_float(*x),
        Value::Bool(x) => json!(x),
        Value::String(x) => json!(x),
        Value::Array(a) => json_array(a, max_items),
    }
}

/// JSON has no NaN or infinity; spell them as strings rather than failing or printing null.
fn json_float(x: f64) -> serde_json::Value {
    if x.is_finite() {
        json!(x)
    } else {
        json!(x.to_string())
    }
}

fn json_array(a: &Array, max_items: usize) -> serde_json::Value {
    let shown = a.len().min(max_items);
    serde_json::Value::Array(
        (0..shown)
            .filter_map(|i| a.get(i))
            .map(|v| json_value(&v, max_items))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_and_sizes() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1,000");
        assert_eq!(group_digits(17_867_008), "17,867,008");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.00 MiB");
    }

    #[test]
    fn totals_and_table() {
        use ggpt_gguf::GgufWriter;
        use ggpt_quant::GgmlType;
        let mut w = GgufWriter::new();
        w.add_kv("general.architecture", Value::from("gpt2"));
        w.add_tensor("w", &[64, 4], GgmlType::Q8_0).unwrap(); // 8 blocks × 34 B = 272 B
        w.add_tensor("b", &[4], GgmlType::F32).unwrap(); // 16 B
        let mut bytes = Vec::new();
        w.write_header(&mut bytes).unwrap();
        w.write_tensor_data(&mut bytes, 0, &[0; 272]).unwrap();
        w.write_tensor_data(&mut bytes, 1, &[0; 16]).unwrap();
        let f = GgufFile::from_bytes(bytes, "t.gguf").unwrap();
        let text = to_text(&f, SHOWN_ITEMS, SHOWN_CHARS);
        assert!(text.contains("parameters       260"), "{text}");
        assert!(text.contains("tensor bytes     288"), "{text}");
        // 288 × 8 / 260
        assert!(text.contains("bits per weight  8.862"), "{text}");
        assert!(text.contains("Q8_0     1 tensors"), "{text}");
        let j = to_json(&f, SHOWN_ITEMS);
        assert_eq!(j["totals"]["parameters"], json!(260));
        assert_eq!(j["tensors"][0]["dims"], json!([64, 4]));
        assert_eq!(j["tensors"][1]["offset"], json!(288));
        assert_eq!(j["metadata"][0]["value"], json!("gpt2"));
    }

    #[test]
    fn long_values_are_abbreviated() {
        let a = Value::from((0..100).collect::<Vec<i32>>());
        let t = text_value(&a, 3, 10);
        assert_eq!(t, "[0, 1, 2, … 97 more]");
        let s = Value::from("a\nbcdefghijklmnop");
        assert_eq!(text_value(&s, 3, 4), "\"a\\nbc\"… (17 chars)");
        assert_eq!(json_array(a.as_array().unwrap(), 2), json!([0, 1]));
        assert_eq!(json_value(&Value::F32(f32::INFINITY), 1), json!("inf"));
    }
}
