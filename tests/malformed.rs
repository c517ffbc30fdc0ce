//! Hostile input, end to end: a corpus of malformed files generated from the converted tiny
//! model (and from models/tiny-gpt2 itself), each run through the real `ggpt` binary. The
//! error contract (docs/errors.md) must hold for every one of them: a non-zero exit code, a
//! first stderr line starting with "error:" that names the file (or flag), and never a panic,
//! a signal or a hang.
//!
//! The corpus is made by an independent GGUF walker (not ggpt's reader) that records the byte
//! offset of every structural field, so truncations and patches hit exact boundaries, and by
//! a small encoder that rebuilds files with chosen defects (overlaps, wrong types, NaN scales).
//! Files are written one at a time into a scratch directory and deleted after use.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use common::{run_ggpt, run_ggpt_with, scratch, tiny_hf, tiny_model, Outcome, Rng, TIMEOUT};
use serde_json::{json, Value as Json};

// ---------------------------------------------------------------------------------------------
// An independent GGUF walker and encoder.

/// One field of the header: where it is, how long, what it is.
#[derive(Clone, Debug)]
struct Field {
    off: usize,
    len: usize,
    label: String,
}

#[derive(Clone, Debug)]
struct Kv {
    key: String,
    ty: u32,
    /// The encoded value (without the type code).
    value: Vec<u8>,
}

#[derive(Clone, Debug)]
struct Tensor {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
    /// Write this offset instead of the natural (contiguous, aligned) one.
    offset: Option<u64>,
}

/// A GGUF file taken apart.
#[derive(Clone, Debug)]
struct Gguf {
    version: u32,
    kvs: Vec<Kv>,
    tensors: Vec<Tensor>,
    alignment: u64,
}

/// The original bytes with their field map.
struct Base {
    bytes: Vec<u8>,
    fields: Vec<Field>,
    /// End of the tensor infos, and the aligned start of the data section.
    header_end: usize,
    data_offset: usize,
    gguf: Gguf,
    /// Absolute file offset of each tensor's data, in info order.
    tensor_at: Vec<usize>,
}

struct Walker<'a> {
    b: &'a [u8],
    pos: usize,
    fields: Vec<Field>,
}

impl Walker<'_> {
    fn take(&mut self, n: usize, label: impl Into<String>, record: bool) -> &[u8] {
        let s = &self.b[self.pos..self.pos + n];
        if record {
            self.fields.push(Field {
                off: self.pos,
                len: n,
                label: label.into(),
            });
        }
        self.pos += n;
        s
    }
    fn u32(&mut self, label: impl Into<String>, record: bool) -> u32 {
        u32::from_le_bytes(self.take(4, label, record).try_into().unwrap())
    }
    fn u64(&mut self, label: impl Into<String>, record: bool) -> u64 {
        u64::from_le_bytes(self.take(8, label, record).try_into().unwrap())
    }
    fn string(&mut self, label: &str, record: bool) -> String {
        let n = self.u64(format!("{label}.len"), record) as usize;
        String::from_utf8(self.take(n, format!("{label}.bytes"), record).to_vec()).unwrap()
    }
    /// Skip a value of type `ty`, recording its structure (array elements only sampled:
    /// first, second, middle and last).
    fn value(&mut self, ty: u32, label: &str, record: bool) {
        match ty {
            0 | 1 | 7 => {
                self.take(1, label, record);
            }
            2 | 3 => {
                self.take(2, label, record);
            }
            4..=6 => {
                self.take(4, label, record);
            }
            10..=12 => {
                self.take(8, label, record);
            }
            8 => {
                self.string(label, record);
            }
            9 => {
                let et = self.u32(format!("{label}.elem_type"), record);
                let n = self.u64(format!("{label}.count"), record) as usize;
                for i in 0..n {
                    let sample = record && (i < 2 || i == n / 2 || i + 1 == n);
                    self.value(et, &format!("{label}[{i}]"), sample);
                }
            }
            _ => panic!("walker: unknown value type {ty}"),
        }
    }
}

fn align(n: u64, a: u64) -> u64 {
    n.div_ceil(a) * a
}

fn ggml_size(ty: u32, dims: &[u64]) -> u64 {
    let (block, bytes) = match ty {
        0 => (1, 4),
        1 | 30 => (1, 2),
        2 => (32, 18),
        8 => (32, 34),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        _ => panic!("ggml_size: type {ty}"),
    };
    dims.iter().product::<u64>() / block * bytes
}

impl Base {
    fn load(path: &Path) -> Base {
        let bytes = std::fs::read(path).expect("read base model");
        let mut w = Walker {
            b: &bytes,
            pos: 0,
            fields: Vec::new(),
        };
        w.take(4, "magic", true);
        let version = w.u32("version", true);
        let n_t = w.u64("tensor_count", true) as usize;
        let n_kv = w.u64("kv_count", true) as usize;
        let mut kvs = Vec::new();
        for i in 0..n_kv {
            let key = w.string(&format!("kv{i}.key"), true);
            let ty = w.u32(format!("kv{i}.type"), true);
            let start = w.pos;
            w.value(ty, &format!("kv{i}.value"), true);
            kvs.push(Kv {
                key,
                ty,
                value: bytes[start..w.pos].to_vec(),
            });
        }
        let mut infos = Vec::new();
        for i in 0..n_t {
            let name = w.string(&format!("t{i}.name"), true);
            let nd = w.u32(format!("t{i}.n_dims"), true);
            let dims: Vec<u64> = (0..nd)
                .map(|j| w.u64(format!("t{i}.dim{j}"), true))
                .collect();
            let ty = w.u32(format!("t{i}.type"), true);
            let off = w.u64(format!("t{i}.offset"), true);
            infos.push((name, dims, ty, off));
        }
        let header_end = w.pos;
        let fields = w.fields;
        let alignment = kvs
            .iter()
            .find(|k| k.key == "general.alignment")
            .map_or(32, |k| {
                u32::from_le_bytes(k.value[..4].try_into().unwrap()) as u64
            });
        let data_offset = align(header_end as u64, alignment) as usize;
        let mut tensors = Vec::new();
        let mut tensor_at = Vec::new();
        for (name, dims, ty, off) in infos {
            let size = ggml_size(ty, &dims) as usize;
            let at = data_offset + off as usize;
            tensor_at.push(at);
            tensors.push(Tensor {
                name,
                dims,
                ty,
                data: bytes[at..at + size].to_vec(),
                offset: None,
            });
        }
        Base {
            fields,
            header_end,
            data_offset,
            tensor_at,
            gguf: Gguf {
                version,
                kvs,
                tensors,
                alignment,
            },
            bytes,
        }
    }

    fn field(&self, label: &str) -> &Field {
        self.fields
            .iter()
            .find(|f| f.label == label)
            .unwrap_or_else(|| panic!("no field {label}"))
    }

    fn kv_index(&self, key: &str) -> usize {
        self.gguf
            .kvs
            .iter()
            .position(|k| k.key == key)
            .unwrap_or_else(|| panic!("no key {key}"))
    }

    fn tensor_index(&self, name: &str) -> usize {
        self.gguf
            .tensors
            .iter()
            .position(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    /// The original bytes with `value` written over field `label` (little-endian, the
    /// field's own width).
    fn patched(&self, label: &str, value: u64) -> Vec<u8> {
        let f = self.field(label);
        let mut b = self.bytes.clone();
        b[f.off..f.off + f.len].copy_from_slice(&value.to_le_bytes()[..f.len]);
        b
    }

    fn patched_bytes(&self, at: usize, new: &[u8]) -> Vec<u8> {
        let mut b = self.bytes.clone();
        b[at..at + new.len()].copy_from_slice(new);
        b
    }
}

impl Gguf {
    fn encode(&self) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(b"GGUF");
        h.extend_from_slice(&self.version.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for kv in &self.kvs {
            h.extend_from_slice(&enc_str(&kv.key));
            h.extend_from_slice(&kv.ty.to_le_bytes());
            h.extend_from_slice(&kv.value);
        }
        let mut offsets = Vec::new();
        let mut next = 0u64;
        for t in &self.tensors {
            let off = t.offset.unwrap_or(next);
            offsets.push(off);
            if t.offset.is_none() {
                next = align(off + t.data.len() as u64, self.alignment);
            }
            h.extend_from_slice(&enc_str(&t.name));
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.ty.to_le_bytes());
            h.extend_from_slice(&off.to_le_bytes());
        }
        let data_offset = align(h.len() as u64, self.alignment) as usize;
        h.resize(data_offset + next as usize, 0);
        for (t, &off) in self.tensors.iter().zip(&offsets) {
            // Overridden offsets that point outside the natural layout get no data there.
            let at = data_offset + off as usize;
            if let Some(dst) = h.get_mut(at..at + t.data.len()) {
                dst.copy_from_slice(&t.data);
            }
        }
        h
    }

    fn set(&mut self, key: &str, ty: u32, value: Vec<u8>) -> &mut Self {
        match self.kvs.iter_mut().find(|k| k.key == key) {
            Some(kv) => {
                kv.ty = ty;
                kv.value = value;
            }
            None => self.kvs.push(Kv {
                key: key.to_string(),
                ty,
                value,
            }),
        }
        self
    }

    fn remove_key(&mut self, key: &str) -> &mut Self {
        let before = self.kvs.len();
        self.kvs.retain(|k| k.key != key);
        assert_ne!(before, self.kvs.len(), "no key {key}");
        self
    }

    fn tensor_mut(&mut self, name: &str) -> &mut Tensor {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    fn str_array(&self, key: &str) -> Vec<String> {
        let kv = self.kvs.iter().find(|k| k.key == key).expect("array key");
        decode_str_array(&kv.value)
    }
}

fn enc_str(s: &str) -> Vec<u8> {
    enc_bytes(s.as_bytes())
}

fn enc_bytes(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

fn enc_str_array<S: AsRef<str>>(items: &[S]) -> Vec<u8> {
    let mut v = 8u32.to_le_bytes().to_vec();
    v.extend_from_slice(&(items.len() as u64).to_le_bytes());
    for s in items {
        v.extend_from_slice(&enc_str(s.as_ref()));
    }
    v
}

fn decode_str_array(v: &[u8]) -> Vec<String> {
    assert_eq!(u32::from_le_bytes(v[..4].try_into().unwrap()), 8);
    let n = u64::from_le_bytes(v[4..12].try_into().unwrap()) as usize;
    let mut pos = 12;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = u64::from_le_bytes(v[pos..pos + 8].try_into().unwrap()) as usize;
        out.push(String::from_utf8(v[pos + 8..pos + 8 + len].to_vec()).unwrap());
        pos += 8 + len;
    }
    out
}

const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STR: u32 = 8;
const T_ARR: u32 = 9;
const T_U64: u32 = 10;

fn u32v(x: u32) -> Vec<u8> {
    x.to_le_bytes().to_vec()
}

fn f32v(x: f32) -> Vec<u8> {
    x.to_le_bytes().to_vec()
}

// ---------------------------------------------------------------------------------------------
// Cases and expectations.

/// What a command must do with a case.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    /// Fail with the error contract.
    Error,
    /// Anything orderly: success, or a failure that follows the error contract.
    Any,
}

/// The three read paths every GGUF case goes through.
#[derive(Clone, Copy, Debug)]
struct Wants {
    inspect: Want,
    run: Want,
    mem: Want,
}

/// Broken container: nothing may accept it.
const BROKEN: Wants = Wants {
    inspect: Want::Error,
    run: Want::Error,
    mem: Want::Error,
};
/// A well-formed GGUF that is not a usable GPT-2: inspect may show it, loading must fail.
const NOT_GPT2: Wants = Wants {
    inspect: Want::Any,
    run: Want::Error,
    mem: Want::Error,
};
/// Non-finite weights: a well-formed file whose values are bad. `GgufFile::validate_tensor_data`
/// must find them (checked in-process below); `inspect` checks every value and `run` must
/// refuse the file (loading checks quantized scales, the session every logit). `mem` only
/// loads: it refuses a bad quantized scale, while a bad F16 value is not read until a forward
/// pass (docs/errors.md explains the split).
fn non_finite_wants(ggml_type: u32) -> Wants {
    Wants {
        inspect: Want::Error,
        run: Want::Error,
        mem: if ggml_type == 1 {
            Want::Any
        } else {
            Want::Error
        },
    }
}
/// A GPT-2 file whose tensors the header does not account for: every command refuses it,
/// `inspect` included (it runs the loader's tensor-set check on gpt2 files).
const TENSOR_SET: Wants = Wants {
    inspect: Want::Error,
    run: Want::Error,
    mem: Want::Error,
};

/// Files whose set of tensors differs from GPT-2's for their `gpt2.block_count`, with a tensor
/// name the error must mention. The bundled model has 6 blocks.
type TensorSetEdit = (&'static str, fn(&mut Gguf));
const TENSOR_SET_EDITS: [TensorSetEdit; 3] = [
    ("block_count 5 with blk.5 tensors present", |g| {
        g.set("gpt2.block_count", T_U32, u32v(5));
    }),
    ("extra unknown tensor foo.weight", |g| {
        let mut t = g.tensor_mut("output_norm.bias").clone();
        t.name = "foo.weight".to_string();
        g.tensors.push(t);
    }),
    ("tensor blk.2.ffn_up.bias missing", |g| {
        g.tensors.retain(|t| t.name != "blk.2.ffn_up.bias");
    }),
];

/// Random damage: any orderly outcome.
const ANY: Wants = Wants {
    inspect: Want::Any,
    run: Want::Any,
    mem: Want::Any,
};

type Build = Box<dyn Fn(&Bases) -> Vec<u8> + Send + Sync>;

struct Case {
    category: &'static str,
    name: String,
    wants: Wants,
    build: Build,
}

struct Bases {
    q4km: Base,
    f16: Base,
    q8_0: Base,
    q6k: Base,
}

fn case(
    cases: &mut Vec<Case>,
    category: &'static str,
    name: impl Into<String>,
    wants: Wants,
    build: impl Fn(&Bases) -> Vec<u8> + Send + Sync + 'static,
) {
    cases.push(Case {
        category,
        name: name.into(),
        wants,
        build: Box::new(build),
    });
}

/// Truncations at structural boundaries: every recorded header field start (array elements
/// sampled), the end of the infos, the data section start, and inside tensor data.
fn truncations(bases: &Bases, cases: &mut Vec<Case>) {
    let b = &bases.q4km;
    let n_t = b.gguf.tensors.len();
    let mut cuts: BTreeMap<usize, String> = BTreeMap::new();
    for f in &b.fields {
        // Tensor infos: all fields of the first two, a middle and the last one; the first
        // field (name length) of every other one.
        let keep = match f.label.strip_prefix('t').and_then(|r| r.split('.').next()) {
            Some(i) if i.chars().all(|c| c.is_ascii_digit()) => {
                let i: usize = i.parse().unwrap();
                i < 2 || i == n_t / 2 || i + 1 == n_t || f.label.ends_with(".name.len")
            }
            _ => true,
        };
        if keep {
            cuts.entry(f.off).or_insert_with(|| f.label.clone());
            // Also cut in the middle of multi-byte fields.
            if f.len > 1 && !f.label.ends_with(".bytes") && !f.label.contains('[') {
                cuts.entry(f.off + f.len / 2)
                    .or_insert_with(|| format!("middle of {}", f.label));
            }
        }
    }
    cuts.insert(b.header_end, "end of tensor infos".into());
    if b.data_offset > b.header_end {
        cuts.insert(b.data_offset, "data section start".into());
    }
    for i in [0, 1, n_t / 2, n_t - 1] {
        let at = b.tensor_at[i];
        let len = b.gguf.tensors[i].data.len();
        cuts.insert(at + 1, format!("first byte of tensor {i}"));
        cuts.insert(at + len / 2, format!("middle of tensor {i}"));
        cuts.insert(at + len - 1, format!("last byte of tensor {i} missing"));
    }
    cuts.insert(b.bytes.len() - 1, "last byte missing".into());
    cuts.remove(&b.bytes.len());
    for (at, label) in cuts {
        case(
            cases,
            "truncation",
            format!("cut at {at} ({label})"),
            BROKEN,
            move |bs| bs.q4km.bytes[..at].to_vec(),
        );
    }
}

/// Header fields overwritten with hostile values: wrong magic/version, huge, negative and
/// off-by-one counts and lengths, bad type codes, n_dims, dims and offsets.
fn header_patches(bases: &Bases, cases: &mut Vec<Case>) {
    let b = &bases.q4km;
    let mut p = |label: String, value: u64, wants: Wants| {
        case(
            cases,
            "header field",
            format!("{label} = {value:#x}"),
            wants,
            move |bs| bs.q4km.patched(&label, value),
        );
    };
    for v in [0x4755_4747u64, 0x6675_6767, 0] {
        p("magic".into(), v, BROKEN);
    }
    for v in [0u64, 1, 4, 0x0300_0000, u32::MAX as u64] {
        p("version".into(), v, BROKEN);
    }
    let n_t = b.gguf.tensors.len() as u64;
    let n_kv = b.gguf.kvs.len() as u64;
    for v in [n_t + 1, u64::MAX, 1 << 63, 1 << 32, u64::MAX / 32] {
        p("tensor_count".into(), v, BROKEN);
    }
    // Fewer tensors than infos can still be a well-formed file (the tail reads as padding);
    // it must not load as GPT-2.
    for v in [0, 1, n_t - 1] {
        p("tensor_count".into(), v, NOT_GPT2);
    }
    for v in [0, n_kv - 1, n_kv + 1, u64::MAX, 1 << 40, 1 << 63] {
        p("kv_count".into(), v, BROKEN);
    }
    // Key lengths: huge, negative as i64, off by one, zero.
    for (i, v) in [
        (0usize, u64::MAX),
        (0, 1 << 63),
        (1, 1 << 32),
        (2, 0),
        (3, 17),
    ] {
        p(format!("kv{i}.key.len"), v, BROKEN);
    }
    // Value type codes: unknown, and changed to another type.
    let tokens = b.kv_index("tokenizer.ggml.tokens");
    let arch = b.kv_index("general.architecture");
    let blocks = b.kv_index("gpt2.block_count");
    for (i, v) in [
        (arch, 13u64),
        (arch, u32::MAX as u64),
        (arch, 9),
        (blocks, 8),
        (blocks, 9),
        (tokens, 4),
        (tokens, 12),
    ] {
        p(format!("kv{i}.type"), v, BROKEN);
    }
    // A u32 value read as bool: byte 24 is neither 0 nor 1.
    p(format!("kv{blocks}.type"), 7, BROKEN);
    // String and array lengths.
    for (label, v) in [
        (format!("kv{arch}.value.len"), u64::MAX),
        (format!("kv{arch}.value.len"), 1 << 40),
        (format!("kv{arch}.value.len"), 5),
        (format!("kv{tokens}.value.count"), u64::MAX),
        (format!("kv{tokens}.value.count"), (16 << 20) + 1),
        (format!("kv{tokens}.value.count"), 1 << 33),
        (format!("kv{tokens}.value.count"), 50_258),
        (format!("kv{tokens}.value.elem_type"), 13),
        (format!("kv{tokens}.value.elem_type"), 9),
        (format!("kv{tokens}.value.elem_type"), 7),
        (format!("kv{tokens}.value[0].len"), u64::MAX),
        (format!("kv{tokens}.value[1].len"), 1 << 30),
    ] {
        p(label, v, BROKEN);
    }
    // Fewer tokens than embedding rows: a valid file whose tokenizer does not fit the model.
    p(format!("kv{tokens}.value.count"), 0, BROKEN);
    // Tensor infos.
    let last = n_t as usize - 1;
    let qkv = b.tensor_index("blk.0.attn_qkv.weight");
    let norm = b.tensor_index("blk.0.attn_norm.weight");
    for (label, v) in [
        ("t0.name.len".to_string(), u64::MAX),
        ("t0.name.len".to_string(), 200),
        (format!("t{qkv}.n_dims"), 0),
        (format!("t{qkv}.n_dims"), 5),
        (format!("t{qkv}.n_dims"), u32::MAX as u64),
        (format!("t{qkv}.n_dims"), 1),
        (format!("t{qkv}.n_dims"), 3),
        (format!("t{qkv}.dim0"), 0),
        (format!("t{qkv}.dim0"), u64::MAX),
        (format!("t{qkv}.dim0"), 1 << 62),
        (format!("t{qkv}.dim0"), 255),
        (format!("t{qkv}.dim1"), 1 << 40),
        (format!("t{qkv}.dim1"), 3073),
        (format!("t{norm}.dim0"), 1 << 61),
        (format!("t{qkv}.type"), 16),
        (format!("t{qkv}.type"), 31),
        (format!("t{qkv}.type"), u32::MAX as u64),
        (format!("t{qkv}.type"), 0),
        (format!("t{last}.offset"), u64::MAX),
        (format!("t{last}.offset"), u64::MAX - 31),
        (format!("t{last}.offset"), 1 << 40),
        (format!("t{qkv}.offset"), 0),
        (format!("t{qkv}.offset"), 1),
        ("t1.offset".to_string(), 16),
    ] {
        p(label, v, BROKEN);
    }
    // Another type whose data happens to fit: a well-formed file, but not a usable GPT-2.
    p(format!("t{qkv}.type"), 2, NOT_GPT2);
    p(format!("t{norm}.type"), 8, NOT_GPT2);
    // Overlap: a tensor's offset set to another one's.
    let off0 = u64::from_le_bytes(b.bytes[b.field("t2.offset").off..][..8].try_into().unwrap());
    p("t3.offset".into(), off0, BROKEN);

    // Invalid UTF-8 in a key and in a token.
    let key = b.field("kv2.key.bytes").off;
    case(
        cases,
        "header field",
        "kv2 key not UTF-8",
        BROKEN,
        move |bs| bs.q4km.patched_bytes(key, &[0xff]),
    );
    let tok = b.field(&format!("kv{tokens}.value[1].bytes")).off;
    case(
        cases,
        "header field",
        "token 1 not UTF-8",
        BROKEN,
        move |bs| bs.q4km.patched_bytes(tok, &[0xc3]),
    );
}

/// Bits flipped at random places in the header (deterministic seed). The result may even be a
/// valid file, so only an orderly outcome is required.
fn random_flips(bases: &Bases, cases: &mut Vec<Case>) {
    let header = bases.q4km.data_offset as u64;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for k in 0..40 {
        let n = 1 + rng.below(4) as usize;
        let flips: Vec<(usize, u8)> = (0..n)
            .map(|_| {
                // Half of them in the first 4 KiB, where every field is structural.
                let at = if k % 2 == 0 {
                    rng.below(4096.min(header))
                } else {
                    rng.below(header)
                };
                (at as usize, 1u8 << rng.below(8))
            })
            .collect();
        case(
            cases,
            "random flips",
            format!("flips {flips:?}"),
            ANY,
            move |bs| {
                let mut b = bs.q4km.bytes.clone();
                for &(at, bit) in &flips {
                    b[at] ^= bit;
                }
                b
            },
        );
    }
    // And in the data section: weights change, nothing else may happen.
    for _ in 0..8 {
        let at = header + rng.below(bases.q4km.bytes.len() as u64 - header);
        let bit = 1u8 << rng.below(8);
        case(
            cases,
            "random flips",
            format!("data flip at {at}"),
            ANY,
            move |bs| {
                bs.q4km
                    .patched_bytes(at as usize, &[bs.q4km.bytes[at as usize] ^ bit])
            },
        );
    }
}

/// Re-encoded files with one defect each: container-level (duplicates, bad UTF-8, nesting,
/// alignment, overlap) and model-level (architecture, hyper-parameters, tensors, tokenizer).
fn semantic(cases: &mut Vec<Case>) {
    let mut e = |name: &str, wants: Wants, f: fn(&mut Gguf)| {
        case(cases, "container", name, wants, move |bs| {
            let mut g = bs.q4km.gguf.clone();
            f(&mut g);
            g.encode()
        });
    };
    e("duplicate key", BROKEN, |g| {
        let kv = g.kvs[2].clone();
        g.kvs.push(kv);
    });
    e("empty key", BROKEN, |g| g.kvs[2].key.clear());
    e("duplicate tensor name", BROKEN, |g| {
        g.tensors[1].name = g.tensors[0].name.clone()
    });
    e("tensor name of 64 bytes", BROKEN, |g| {
        g.tensors[0].name = "x".repeat(64)
    });
    e("invalid UTF-8 in a string value", BROKEN, |g| {
        g.set("general.name", T_STR, enc_bytes(b"tiny\xff\xfe"));
    });
    e("bool value 2", BROKEN, |g| {
        g.set("tokenizer.ggml.add_bos_token", T_BOOL, vec![2]);
    });
    e("arrays nested 100 deep", BROKEN, |g| {
        let mut v = Vec::new();
        for _ in 0..100 {
            v.extend_from_slice(&T_ARR.to_le_bytes());
            v.extend_from_slice(&1u64.to_le_bytes());
        }
        v.extend_from_slice(&T_U32.to_le_bytes());
        v.extend_from_slice(&0u64.to_le_bytes());
        g.set("x.nested", T_ARR, v);
    });
    e("alignment 3", BROKEN, |g| {
        g.set("general.alignment", T_U32, u32v(3));
    });
    e("alignment 0", BROKEN, |g| {
        g.set("general.alignment", T_U32, u32v(0));
    });
    e("alignment as a string", BROKEN, |g| {
        g.set("general.alignment", T_STR, enc_str("32"));
    });
    e(
        "alignment 2^31 (data offset beyond the file)",
        BROKEN,
        |g| {
            g.set("general.alignment", T_U32, u32v(1 << 31));
        },
    );
    e("overlapping tensors", BROKEN, |g| {
        g.tensors[5].offset = Some(0);
    });
    e("overlap by one block", BROKEN, |g| {
        let t = &g.tensors[0];
        let end = align(t.data.len() as u64, 32);
        g.tensors[1].offset = Some(end - 32);
    });
    e("unaligned offset", BROKEN, |g| {
        g.tensors[3].offset = Some(8);
    });
    e("tensor data past the end", BROKEN, |g| {
        g.tensors[4].offset = Some(1 << 30);
    });
    e("unsupported ggml type for a matrix (Q4_0)", NOT_GPT2, |g| {
        let t = g.tensor_mut("blk.0.ffn_up.weight");
        t.ty = 2;
        t.data = vec![0; ggml_size(2, &t.dims) as usize];
    });
    e("activation-only type Q8_K stored", NOT_GPT2, |g| {
        let t = g.tensor_mut("blk.1.ffn_down.weight");
        t.ty = 15;
        t.data = vec![0; ggml_size(15, &t.dims) as usize];
    });
    e("quantized norm", NOT_GPT2, |g| {
        let t = g.tensor_mut("blk.0.attn_norm.weight");
        t.ty = 8;
        t.data = vec![0; ggml_size(8, &t.dims) as usize];
    });
    for (name, edit) in TENSOR_SET_EDITS {
        e(name, TENSOR_SET, edit);
    }
    e("version 2 (still readable)", ANY, |g| g.version = 2);
    e("no tensors at all", NOT_GPT2, |g| g.tensors.clear());
    e("no metadata at all", NOT_GPT2, |g| g.kvs.clear());

    let mut m = |name: &str, f: fn(&mut Gguf)| {
        case(cases, "model", name, NOT_GPT2, move |bs| {
            let mut g = bs.q4km.gguf.clone();
            f(&mut g);
            g.encode()
        });
    };
    m("architecture llama", |g| {
        g.set("general.architecture", T_STR, enc_str("llama"));
    });
    m("architecture missing", |g| {
        g.remove_key("general.architecture");
    });
    m("architecture not a string", |g| {
        g.set("general.architecture", T_U32, u32v(2));
    });
    m("block_count missing", |g| {
        g.remove_key("gpt2.block_count");
    });
    m("block_count 0", |g| {
        g.set("gpt2.block_count", T_U32, u32v(0));
    });
    m("block_count one more than stored", |g| {
        g.set("gpt2.block_count", T_U32, u32v(7));
    });
    m("block_count 2^40 (u64)", |g| {
        g.set(
            "gpt2.block_count",
            T_U64,
            (1u64 << 40).to_le_bytes().to_vec(),
        );
    });
    m("block_count negative (i32)", |g| {
        g.set("gpt2.block_count", T_I32, (-6i32).to_le_bytes().to_vec());
    });
    m("block_count as f32", |g| {
        g.set("gpt2.block_count", T_F32, f32v(6.0));
    });
    m("context_length 0", |g| {
        g.set("gpt2.context_length", T_U32, u32v(0));
    });
    m("context_length larger than position_embd", |g| {
        g.set("gpt2.context_length", T_U32, u32v(4096));
    });
    m("context_length u64::MAX", |g| {
        g.set(
            "gpt2.context_length",
            T_U64,
            u64::MAX.to_le_bytes().to_vec(),
        );
    });
    m("embedding_length wrong", |g| {
        g.set("gpt2.embedding_length", T_U32, u32v(512));
    });
    m("embedding_length u32::MAX", |g| {
        g.set("gpt2.embedding_length", T_U32, u32v(u32::MAX));
    });
    m("head_count 0", |g| {
        g.set("gpt2.attention.head_count", T_U32, u32v(0));
    });
    m("head_count does not divide n_embd", |g| {
        g.set("gpt2.attention.head_count", T_U32, u32v(3));
    });
    m("head_count larger than n_embd", |g| {
        g.set("gpt2.attention.head_count", T_U32, u32v(512));
    });
    m("head_count_kv differs", |g| {
        g.set("gpt2.attention.head_count_kv", T_U32, u32v(4));
    });
    m("feed_forward_length wrong", |g| {
        g.set("gpt2.feed_forward_length", T_U32, u32v(1000));
    });
    m("layer_norm_epsilon NaN", |g| {
        g.set("gpt2.attention.layer_norm_epsilon", T_F32, f32v(f32::NAN));
    });
    m("layer_norm_epsilon inf", |g| {
        g.set(
            "gpt2.attention.layer_norm_epsilon",
            T_F32,
            f32v(f32::INFINITY),
        );
    });
    m("layer_norm_epsilon negative", |g| {
        g.set("gpt2.attention.layer_norm_epsilon", T_F32, f32v(-1e-5));
    });
    m("layer_norm_epsilon a string", |g| {
        g.set("gpt2.attention.layer_norm_epsilon", T_STR, enc_str("1e-5"));
    });
    m("missing tensor blk.3.ffn_up.weight", |g| {
        g.tensors.retain(|t| t.name != "blk.3.ffn_up.weight");
    });
    m("missing token_embd.weight", |g| {
        g.tensors.retain(|t| t.name != "token_embd.weight");
    });
    m("missing output_norm.bias", |g| {
        g.tensors.retain(|t| t.name != "output_norm.bias");
    });
    m("tensor renamed", |g| {
        g.tensor_mut("blk.5.attn_output.weight").name = "blk.5.attn_outpux.weight".into();
    });
    m("qkv bias with 2 dims", |g| {
        g.tensor_mut("blk.0.attn_qkv.bias").dims = vec![768, 1];
    });
    m("norm has 2 dims", |g| {
        g.tensor_mut("blk.2.ffn_norm.weight").dims = vec![128, 2];
    });
    m("ffn_up bias reshaped (same bytes)", |g| {
        // F32 bias of 1024 values viewed as 4 × 256: same size, wrong shape.
        g.tensor_mut("blk.1.ffn_up.bias").dims = vec![256, 4];
    });
    m("token_embd with one row fewer", |g| {
        let t = g.tensor_mut("token_embd.weight");
        let row = t.data.len() / t.dims[1] as usize;
        t.dims[1] -= 1;
        t.data.truncate(t.data.len() - row);
    });
    m("position_embd shorter than context", |g| {
        let t = g.tensor_mut("position_embd.weight");
        t.dims[1] = 512;
        t.data.truncate(t.data.len() / 2);
    });
    m("NaN in an F32 bias", |g| {
        g.tensor_mut("blk.0.ffn_down.bias").data[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    m("inf in an F32 norm", |g| {
        g.tensor_mut("output_norm.weight").data[0..4]
            .copy_from_slice(&f32::NEG_INFINITY.to_le_bytes());
    });
    m("tokenizer model llama", |g| {
        g.set("tokenizer.ggml.model", T_STR, enc_str("llama"));
    });
    m("tokenizer pre llama3", |g| {
        g.set("tokenizer.ggml.pre", T_STR, enc_str("llama3"));
    });
    m("tokenizer model missing", |g| {
        g.remove_key("tokenizer.ggml.model");
    });
    m("tokens missing", |g| {
        g.remove_key("tokenizer.ggml.tokens");
    });
    m("merges missing", |g| {
        g.remove_key("tokenizer.ggml.merges");
    });
    m("tokens of the wrong type", |g| {
        let n = 50_257u64;
        let mut v = T_U32.to_le_bytes().to_vec();
        v.extend_from_slice(&n.to_le_bytes());
        v.extend(std::iter::repeat_n(0u8, 4 * n as usize));
        g.set("tokenizer.ggml.tokens", T_ARR, v);
    });
    m("one token fewer than embedding rows", |g| {
        let mut t = g.str_array("tokenizer.ggml.tokens");
        t.pop();
        g.set("tokenizer.ggml.tokens", T_ARR, enc_str_array(&t));
    });
    m("byte token missing from the vocabulary", |g| {
        let mut t = g.str_array("tokenizer.ggml.tokens");
        // Id 0 is "!", the byte 0x21: rename it to something BPE can never produce.
        t[0] = "<not-a-byte>".into();
        g.set("tokenizer.ggml.tokens", T_ARR, enc_str_array(&t));
    });
    m("merge naming an unknown token", |g| {
        let mut mg = g.str_array("tokenizer.ggml.merges");
        mg[10] = "Ġqqqq zzzz".into();
        g.set("tokenizer.ggml.merges", T_ARR, enc_str_array(&mg));
    });
    m("merge without a space", |g| {
        let mut mg = g.str_array("tokenizer.ggml.merges");
        mg[3] = "Ġthe".into();
        g.set("tokenizer.ggml.merges", T_ARR, enc_str_array(&mg));
    });
    m("token_type shorter than tokens", |g| {
        let mut v = T_I32.to_le_bytes().to_vec();
        v.extend_from_slice(&10u64.to_le_bytes());
        v.extend(std::iter::repeat_n(1i32.to_le_bytes(), 10).flatten());
        g.set("tokenizer.ggml.token_type", T_ARR, v);
    });
    m("token_type values beyond i32", |g| {
        let n = 50_257u64;
        let mut v = T_U64.to_le_bytes().to_vec();
        v.extend_from_slice(&n.to_le_bytes());
        v.extend(std::iter::repeat_n(u64::MAX.to_le_bytes(), n as usize).flatten());
        g.set("tokenizer.ggml.token_type", T_ARR, v);
    });
    m("eos id past the vocabulary", |g| {
        g.set("tokenizer.ggml.eos_token_id", T_U32, u32v(50_257));
    });
    m("eos id u64::MAX", |g| {
        g.set(
            "tokenizer.ggml.eos_token_id",
            T_U64,
            u64::MAX.to_le_bytes().to_vec(),
        );
    });
    m("eos id negative", |g| {
        g.set(
            "tokenizer.ggml.eos_token_id",
            T_I32,
            (-1i32).to_le_bytes().to_vec(),
        );
    });
}

/// Inf/NaN in the fp16 scales of quantized blocks (and in F16 weights): generating text with
/// such a file must fail instead of printing garbage from NaN logits.
fn non_finite(bases: &Bases, cases: &mut Vec<Case>) {
    for (label, base) in [
        ("F16", &bases.f16),
        ("Q8_0", &bases.q8_0),
        ("Q6_K", &bases.q6k),
        ("Q4_K_M", &bases.q4km),
    ] {
        // The tied output head (a bad scale there poisons some logits), the first layer's
        // QKV (poisons every activation), and the first 2-D tensor of every type in the file.
        let mut names = vec![
            "token_embd.weight".to_string(),
            "blk.0.attn_qkv.weight".to_string(),
        ];
        for t in &base.gguf.tensors {
            if t.dims.len() == 2
                && !base
                    .gguf
                    .tensors
                    .iter()
                    .any(|u| names.contains(&u.name) && u.ty == t.ty)
            {
                names.push(t.name.clone());
            }
        }
        for name in names {
            let ty = base.gguf.tensors[base.tensor_index(&name)].ty;
            // Byte offsets of the fp16 fields in block 0 (ggml-common.h layouts).
            let fields: &[(usize, &'static str)] = match ty {
                0 => continue,
                1 => &[(0, "value")],
                8 => &[(0, "d")],
                12 | 13 => &[(0, "d"), (2, "dmin")],
                14 => &[(208, "d")],
                other => panic!("unexpected type {other} in {label}"),
            };
            for &(off, what) in fields {
                for (bits, kind) in [(0x7e00u16, "NaN"), (0x7c00, "+inf"), (0xfc00, "-inf")] {
                    let name = name.clone();
                    case(
                        cases,
                        "non-finite scale",
                        format!("{label}: {kind} in {what} of {name} block 0"),
                        non_finite_wants(ty),
                        move |bs| {
                            let base = match label {
                                "F16" => &bs.f16,
                                "Q8_0" => &bs.q8_0,
                                "Q6_K" => &bs.q6k,
                                _ => &bs.q4km,
                            };
                            let i = base.tensor_index(&name);
                            base.patched_bytes(base.tensor_at[i] + off, &bits.to_le_bytes())
                        },
                    );
                }
            }
        }
    }
}

fn load_bases() -> Bases {
    Bases {
        q4km: Base::load(&tiny_model("Q4_K_M")),
        f16: Base::load(&tiny_model("F16")),
        q8_0: Base::load(&tiny_model("Q8_0")),
        q6k: Base::load(&tiny_model("Q6_K")),
    }
}

fn check(o: &Outcome, want: Want, name: &str) -> Option<String> {
    if o.success() {
        return match want {
            Want::Error => Some("exit code 0 for bad input".to_string()),
            Want::Any => o.problem_if_not_orderly(),
        };
    }
    if let Some(p) = o.problem_if_not_orderly() {
        return Some(p);
    }
    // `run` prints its `ggpt: …` banner once the model has loaded; a problem found by the
    // first forward pass (non-finite weights) comes after it. Otherwise the error is first.
    let line = o
        .stderr
        .lines()
        .find(|l| !l.starts_with("ggpt: "))
        .unwrap_or("");
    if !line.starts_with("error:") {
        return Some(format!(
            "the error line does not start with \"error:\": {line:?}"
        ));
    }
    // Every refusal of a corpus file is about that file: exit 3, the file named once (a
    // message that repeats the path is a context wrapped around an error that had it).
    let named = line.matches(name).count();
    match o.code() {
        Some(3) if named == 1 => None,
        Some(3) => Some(format!("the error names the file {named} times")),
        code => Some(format!("exit code {code:?}, expected 3 (bad input file)")),
    }
}

/// Run `cases` on `workers` threads; return (per-category counts, failures).
fn run_cases(
    bases: &Bases,
    cases: &[Case],
    dir: &Path,
    workers: usize,
) -> (BTreeMap<&'static str, usize>, Vec<String>) {
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    // (category, stderr class, exit code) → count.
    type Codes<'a> = BTreeMap<(&'a str, String, Option<i32>), usize>;
    let codes: Mutex<Codes> = Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(c) = cases.get(i) else { break };
                let path = dir.join(format!("case-{i:03}.gguf"));
                std::fs::write(&path, (c.build)(bases)).expect("write case");
                let p = path.to_str().unwrap().to_string();
                let runs = [
                    (run_ggpt(&["inspect", &p]), c.wants.inspect),
                    (
                        run_ggpt(&[
                            "run", "-m", &p, "-p", "Hello!", "-n", "2", "-t", "1", "--seed", "1",
                        ]),
                        c.wants.run,
                    ),
                    (run_ggpt(&["mem", &p, "-t", "1"]), c.wants.mem),
                ];
                for (o, want) in runs {
                    *codes
                        .lock()
                        .unwrap()
                        .entry((
                            c.category,
                            o.cmd.split(' ').nth(1).unwrap_or("").to_string(),
                            o.code(),
                        ))
                        .or_insert(0) += 1;
                    if let Some(problem) = check(&o, want, &p) {
                        failures.lock().unwrap().push(format!(
                            "[{}] {}: {problem}\n{}",
                            c.category,
                            c.name,
                            o.describe()
                        ));
                    }
                }
                let _ = std::fs::remove_file(&path);
            });
        }
    });
    let mut counts = BTreeMap::new();
    for c in cases {
        *counts.entry(c.category).or_insert(0) += 1;
    }
    // Exit codes per category and command, for docs/errors.md.
    for ((cat, cmd, code), n) in codes.into_inner().unwrap() {
        eprintln!("  exit {code:?} from {cmd:<8} {cat:<18} × {n}");
    }
    (counts, failures.into_inner().unwrap())
}

fn report(what: &str, counts: &BTreeMap<&'static str, usize>, failures: &[String]) {
    let total: usize = counts.values().sum();
    eprintln!("{what}: {total} files");
    for (c, n) in counts {
        eprintln!("  {c:<20} {n}");
    }
    assert!(
        failures.is_empty(),
        "{} of the {what} runs broke the error contract:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// The GGUF corpus through `inspect`, `run -n 2` and `mem`.
#[test]
fn malformed_gguf_corpus() {
    let bases = load_bases();
    let mut cases = Vec::new();
    truncations(&bases, &mut cases);
    header_patches(&bases, &mut cases);
    random_flips(&bases, &mut cases);
    semantic(&mut cases);
    let dir = scratch("malformed-gguf");
    let (counts, failures) = run_cases(&bases, &cases, &dir, 2);
    assert!(cases.len() >= 200, "only {} GGUF cases", cases.len());
    report("malformed GGUF corpus", &counts, &failures);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Non-finite scales and weights: the reader's value check finds every one of them, naming
/// file and tensor; `inspect` and `run` refuse every one of them with exit 3.
#[test]
fn non_finite_weights_are_detected() {
    let bases = load_bases();
    let mut cases = Vec::new();
    non_finite(&bases, &mut cases);
    for c in &cases {
        let f = ggpt_gguf::GgufFile::from_bytes((c.build)(&bases), "bad.gguf")
            .unwrap_or_else(|e| panic!("{}: the header is fine, yet: {e}", c.name));
        let e = f
            .validate_tensor_data(|_| true, ggpt_quant::tensor::validate_row_data)
            .err()
            .unwrap_or_else(|| panic!("{}: not detected", c.name))
            .to_string();
        let tensor = c
            .name
            .rsplit(" of ")
            .next()
            .unwrap()
            .trim_end_matches(" block 0");
        assert!(
            e.contains("bad.gguf") && e.contains(tensor) && e.contains("block 0")
                || e.contains("index 0"),
            "{}: {e}",
            c.name
        );
    }
    let dir = scratch("malformed-nan");
    let (counts, failures) = run_cases(&bases, &cases, &dir, 2);
    report("non-finite weight corpus", &counts, &failures);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Malformed Hugging Face checkpoints through `ggpt convert`.

/// The checkpoint files a case directory links to (everything `convert` may read).
const HF_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "merges.txt",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
];
const SHARD2: &str = "model-00002-of-00002.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// New contents for some files of the checkpoint (`None` = delete the file).
type Edits = Vec<(&'static str, Option<Vec<u8>>)>;

#[derive(Clone, Copy, Debug, PartialEq)]
enum ConvertWant {
    /// `convert` must fail with the contract.
    Refused,
    /// `convert` may fail with the contract; if it writes a file anyway, `run` on that file
    /// must fail with the contract (a broken tokenizer that llama.cpp's converter also copies
    /// verbatim).
    RefusedOrUnusable,
}

struct HfCase {
    category: &'static str,
    name: String,
    /// What the error must name: a file name of the checkpoint, or "" for the directory.
    must_name: &'static str,
    want: ConvertWant,
    edits: Box<dyn Fn() -> Edits + Send + Sync>,
}

fn hf_read(name: &str) -> Vec<u8> {
    std::fs::read(tiny_hf().join(name)).expect("read checkpoint file")
}

fn hf_json(name: &str) -> Json {
    serde_json::from_slice(&hf_read(name)).expect("checkpoint JSON")
}

/// A safetensors file split into its header JSON and data section.
fn st_parts(bytes: &[u8]) -> (Json, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).expect("safetensors header");
    (header, bytes[8 + n..].to_vec())
}

fn st_join(header: &Json, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// Shard 2 with its header edited by `f`.
fn shard2_with(f: impl Fn(&mut Json)) -> Vec<u8> {
    let (mut h, data) = st_parts(&hf_read(SHARD2));
    f(&mut h);
    st_join(&h, &data)
}

/// Shard 2 with the bytes at `at` (relative to tensor `name`'s data) replaced.
fn shard2_data_patch(name: &str, at: usize, new: &[u8]) -> Vec<u8> {
    let (h, mut data) = st_parts(&hf_read(SHARD2));
    let start = h[name]["data_offsets"][0].as_u64().unwrap() as usize;
    data[start + at..start + at + new.len()].copy_from_slice(new);
    st_join(&h, &data)
}

fn json_with(name: &str, f: impl Fn(&mut Json)) -> Vec<u8> {
    let mut j = hf_json(name);
    f(&mut j);
    serde_json::to_vec(&j).unwrap()
}

fn hf_cases() -> Vec<HfCase> {
    let mut cases: Vec<HfCase> = Vec::new();
    let mut add = |category: &'static str,
                   name: &str,
                   must_name: &'static str,
                   want: ConvertWant,
                   edits: Box<dyn Fn() -> Edits + Send + Sync>| {
        cases.push(HfCase {
            category,
            name: name.to_string(),
            must_name,
            want,
            edits,
        })
    };
    use ConvertWant::*;

    // safetensors container.
    let raw = |f: fn(Vec<u8>) -> Vec<u8>| -> Box<dyn Fn() -> Edits + Send + Sync> {
        Box::new(move || vec![(SHARD2, Some(f(hf_read(SHARD2))))])
    };
    let header_len = |n: u64| -> Box<dyn Fn() -> Edits + Send + Sync> {
        Box::new(move || {
            let mut b = hf_read(SHARD2);
            b[..8].copy_from_slice(&n.to_le_bytes());
            vec![(SHARD2, Some(b))]
        })
    };
    for n in [u64::MAX, 1 << 40, 0, 2, 99_999_999, 100 << 20] {
        add(
            "safetensors",
            &format!("header length {n}"),
            SHARD2,
            Refused,
            header_len(n),
        );
    }
    add(
        "safetensors",
        "header length one past the file",
        SHARD2,
        Refused,
        raw(|mut b| {
            let n = b.len() as u64 - 7;
            b[..8].copy_from_slice(&n.to_le_bytes());
            b
        }),
    );
    add(
        "safetensors",
        "header not JSON",
        SHARD2,
        Refused,
        raw(|mut b| {
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            b[8..8 + n].fill(b'x');
            b
        }),
    );
    add(
        "safetensors",
        "header a JSON array",
        SHARD2,
        Refused,
        raw(|mut b| {
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            b[8..8 + n].fill(b' ');
            b[8..10].copy_from_slice(b"[]");
            b
        }),
    );
    add(
        "safetensors",
        "header not UTF-8",
        SHARD2,
        Refused,
        raw(|mut b| {
            b[10] = 0xff;
            b
        }),
    );
    for cut in [0usize, 4, 8, 100] {
        add(
            "safetensors",
            &format!("truncated to {cut} bytes"),
            SHARD2,
            Refused,
            Box::new(move || vec![(SHARD2, Some(hf_read(SHARD2)[..cut].to_vec()))]),
        );
    }
    add(
        "safetensors",
        "last byte missing",
        SHARD2,
        Refused,
        raw(|mut b| {
            b.pop();
            b
        }),
    );
    add(
        "safetensors",
        "one byte too many",
        SHARD2,
        Refused,
        raw(|mut b| {
            b.push(0);
            b
        }),
    );
    let w = "transformer.h.0.mlp.c_fc.weight";
    let bias = "transformer.h.0.mlp.c_fc.bias";
    let hdr =
        |name: &'static str, f: fn(&mut Json)| -> (String, Box<dyn Fn() -> Edits + Send + Sync>) {
            (
                name.to_string(),
                Box::new(move || vec![(SHARD2, Some(shard2_with(f)))]),
            )
        };
    for (name, edits) in [
        hdr("dtype I16 (valid safetensors, not a float)", |h| {
            h["transformer.h.0.mlp.c_fc.weight"]["dtype"] = json!("I16")
        }),
        hdr("dtype F64 (size does not match offsets)", |h| {
            h["transformer.h.0.mlp.c_fc.weight"]["dtype"] = json!("F64")
        }),
        hdr("dtype unknown", |h| {
            h["transformer.h.0.mlp.c_fc.weight"]["dtype"] = json!("Q4")
        }),
        hdr("dtype F8_E4M3", |h| {
            h["transformer.h.0.mlp.c_fc.weight"]["dtype"] = json!("F8_E4M3")
        }),
        hdr("shape does not match offsets", |h| {
            h["transformer.h.0.mlp.c_fc.weight"]["shape"] = json!([256, 1025])
        }),
        hdr("shape overflows", |h| {
            h["transformer.h.0.mlp.c_fc.weight"]["shape"] = json!([1u64 << 62, 1u64 << 62])
        }),
        hdr("shape of a scalar for a bias", |h| {
            h["transformer.h.0.mlp.c_fc.bias"]["shape"] = json!([])
        }),
        hdr("offsets overlap", |h| {
            let a = h["transformer.h.0.mlp.c_fc.bias"]["data_offsets"].clone();
            h["transformer.h.0.mlp.c_proj.bias"]["data_offsets"] = a;
        }),
        hdr("offsets reversed", |h| {
            let a = h["transformer.h.0.mlp.c_fc.bias"]["data_offsets"].clone();
            h["transformer.h.0.mlp.c_fc.bias"]["data_offsets"] = json!([a[1], a[0]]);
        }),
        hdr("offsets past the data", |h| {
            h["transformer.h.0.mlp.c_fc.bias"]["data_offsets"] =
                json!([1u64 << 40, (1u64 << 40) + 2048]);
        }),
        hdr("offset negative", |h| {
            h["transformer.h.0.mlp.c_fc.bias"]["data_offsets"][0] = json!(-1);
        }),
        hdr("offset fractional", |h| {
            h["transformer.h.0.mlp.c_fc.bias"]["data_offsets"][0] = json!(1.5);
        }),
        hdr("__metadata__ not strings", |h| {
            h["__metadata__"] = json!({"format": 1})
        }),
        hdr("tensor entry missing (gap in the data)", |h| {
            h.as_object_mut()
                .unwrap()
                .remove("transformer.h.0.mlp.c_fc.bias");
        }),
        hdr("tensor entry not an object", |h| {
            h["transformer.h.0.mlp.c_fc.bias"] = json!(7);
        }),
    ] {
        add("safetensors", &name, SHARD2, Refused, edits);
    }
    // Valid safetensors, wrong as GPT-2.
    for (name, edits) in [
        hdr("c_fc weight shape swapped (same bytes)", |h| {
            h["transformer.h.0.mlp.c_fc.weight"]["shape"] = json!([1024, 256])
        }),
        hdr("unknown tensor name", |h| {
            rename_key(
                h,
                "transformer.h.0.mlp.c_fc.bias",
                "transformer.h.0.mlp.c_fc.bias_x",
            );
        }),
        hdr("tensor also in the other shard", |h| {
            rename_key(h, "transformer.ln_f.weight", "transformer.wte.weight");
        }),
        hdr("layer 6 in a 6-layer model", |h| {
            rename_key(
                h,
                "transformer.h.5.ln_1.weight",
                "transformer.h.6.ln_1.weight",
            );
        }),
        hdr("untied lm_head of the wrong shape", |h| {
            rename_key(h, "transformer.ln_f.weight", "lm_head.weight");
        }),
    ] {
        add("gpt2 tensors", &name, SHARD2, Refused, edits);
    }
    for (name, bits) in [("NaN", 0x7e00u16), ("+inf", 0x7c00), ("-inf", 0xfc00)] {
        add(
            "gpt2 tensors",
            &format!("{name} in a weight"),
            SHARD2,
            Refused,
            Box::new(move || {
                vec![(
                    SHARD2,
                    Some(shard2_data_patch(w, 2 * 777, &bits.to_le_bytes())),
                )]
            }),
        );
        add(
            "gpt2 tensors",
            &format!("{name} in a bias"),
            SHARD2,
            Refused,
            Box::new(move || {
                vec![(
                    SHARD2,
                    Some(shard2_data_patch(bias, 0, &bits.to_le_bytes())),
                )]
            }),
        );
    }

    // The shard index.
    let index = |f: fn(&mut Json)| -> Box<dyn Fn() -> Edits + Send + Sync> {
        Box::new(move || vec![(INDEX, Some(json_with(INDEX, f)))])
    };
    add(
        "index",
        "not JSON",
        INDEX,
        Refused,
        Box::new(|| vec![(INDEX, Some(b"{\"weight_map\": ".to_vec()))]),
    );
    add(
        "index",
        "no weight_map",
        INDEX,
        Refused,
        index(|j| {
            j.as_object_mut().unwrap().remove("weight_map");
        }),
    );
    add(
        "index",
        "weight_map a list",
        INDEX,
        Refused,
        index(|j| j["weight_map"] = json!([])),
    );
    add(
        "index",
        "weight_map empty",
        INDEX,
        Refused,
        index(|j| j["weight_map"] = json!({})),
    );
    add(
        "index",
        "shard path escapes the directory",
        INDEX,
        Refused,
        index(|j| {
            j["weight_map"]["transformer.wte.weight"] =
                json!("../tiny-gpt2/model-00001-of-00002.safetensors")
        }),
    );
    add(
        "index",
        "absolute shard path",
        INDEX,
        Refused,
        index(|j| j["weight_map"]["transformer.wte.weight"] = json!("/etc/passwd")),
    );
    add(
        "index",
        "shard name a number",
        INDEX,
        Refused,
        index(|j| j["weight_map"]["transformer.wte.weight"] = json!(1)),
    );
    add(
        "index",
        "listed shard missing",
        "model-00003-of-00003.safetensors",
        Refused,
        index(|j| {
            j["weight_map"]["transformer.wte.weight"] = json!("model-00003-of-00003.safetensors")
        }),
    );
    add(
        "index",
        "tensor listed in the wrong shard",
        SHARD2,
        Refused,
        index(|j| j["weight_map"]["transformer.wte.weight"] = json!(SHARD2)),
    );
    add(
        "index",
        "no weights at all",
        "",
        Refused,
        Box::new(|| {
            vec![
                (INDEX, None),
                ("model-00001-of-00002.safetensors", None),
                (SHARD2, None),
            ]
        }),
    );

    // config.json.
    let cfg = |f: fn(&mut Json)| -> Box<dyn Fn() -> Edits + Send + Sync> {
        Box::new(move || vec![("config.json", Some(json_with("config.json", f)))])
    };
    add(
        "config.json",
        "missing",
        "config.json",
        Refused,
        Box::new(|| vec![("config.json", None)]),
    );
    add(
        "config.json",
        "not JSON",
        "config.json",
        Refused,
        Box::new(|| vec![("config.json", Some(b"{\"n_layer\": 6,".to_vec()))]),
    );
    add(
        "config.json",
        "not UTF-8",
        "config.json",
        Refused,
        Box::new(|| {
            vec![(
                "config.json",
                Some(b"{\"model_type\": \"gpt2\xff\"}".to_vec()),
            )]
        }),
    );
    add(
        "config.json",
        "a list",
        "config.json",
        Refused,
        Box::new(|| vec![("config.json", Some(b"[]".to_vec()))]),
    );
    for (name, f) in [
        (
            "model_type llama",
            (|j: &mut Json| j["model_type"] = json!("llama")) as fn(&mut Json),
        ),
        ("model_type missing", |j| {
            j.as_object_mut().unwrap().remove("model_type");
        }),
        ("n_layer 0", |j| j["n_layer"] = json!(0)),
        ("n_layer negative", |j| j["n_layer"] = json!(-6)),
        ("n_layer 10^12", |j| {
            j["n_layer"] = json!(1_000_000_000_000u64)
        }),
        ("n_layer a string", |j| j["n_layer"] = json!("6")),
        ("n_layer 6.5", |j| j["n_layer"] = json!(6.5)),
        ("n_embd not divisible by n_head", |j| {
            j["n_embd"] = json!(255)
        }),
        ("n_head 0", |j| j["n_head"] = json!(0)),
        ("n_head 2^40", |j| j["n_head"] = json!(1u64 << 40)),
        ("n_positions 0", |j| j["n_positions"] = json!(0)),
        ("n_positions 2^40", |j| j["n_positions"] = json!(1u64 << 40)),
        ("vocab_size 0", |j| j["vocab_size"] = json!(0)),
        ("vocab_size 2^60", |j| j["vocab_size"] = json!(1u64 << 60)),
        ("activation relu", |j| {
            j["activation_function"] = json!("relu")
        }),
        ("activation exact gelu", |j| {
            j["activation_function"] = json!("gelu")
        }),
        ("scale_attn_by_inverse_layer_idx", |j| {
            j["scale_attn_by_inverse_layer_idx"] = json!(true)
        }),
        ("untied embeddings", |j| {
            j["tie_word_embeddings"] = json!(false)
        }),
        ("layer_norm_epsilon 0", |j| {
            j["layer_norm_epsilon"] = json!(0.0)
        }),
        ("layer_norm_epsilon negative", |j| {
            j["layer_norm_epsilon"] = json!(-1e-5)
        }),
        ("layer_norm_epsilon 1e300", |j| {
            j["layer_norm_epsilon"] = json!(1e300)
        }),
        ("layer_norm_epsilon a string", |j| {
            j["layer_norm_epsilon"] = json!("1e-5")
        }),
        ("eos_token_id past the vocabulary", |j| {
            j["eos_token_id"] = json!(99_999_999)
        }),
        ("bos_token_id negative", |j| j["bos_token_id"] = json!(-5)),
    ] {
        add("config.json", name, "config.json", Refused, cfg(f));
    }
    // Config and tensors disagree: either file may be named.
    for (name, f) in [
        (
            "n_layer 5 (more tensors than layers)",
            (|j: &mut Json| j["n_layer"] = json!(5)) as fn(&mut Json),
        ),
        ("n_layer 7 (a layer missing)", |j| j["n_layer"] = json!(7)),
        ("n_embd 512 (shapes disagree)", |j| j["n_embd"] = json!(512)),
        ("n_inner 1000", |j| j["n_inner"] = json!(1000)),
        ("vocab_size 50000", |j| j["vocab_size"] = json!(50_000)),
    ] {
        add("config.json", name, "", Refused, cfg(f));
    }

    // tokenizer.json (read instead of vocab.json + merges.txt when present).
    let tj = |f: fn(&mut Json)| -> Box<dyn Fn() -> Edits + Send + Sync> {
        Box::new(move || vec![("tokenizer.json", Some(json_with("tokenizer.json", f)))])
    };
    add(
        "tokenizer",
        "tokenizer.json not JSON",
        "tokenizer.json",
        Refused,
        Box::new(|| vec![("tokenizer.json", Some(b"{\"model\": {".to_vec()))]),
    );
    for (name, f) in [
        (
            "no model",
            (|j: &mut Json| {
                j.as_object_mut().unwrap().remove("model");
            }) as fn(&mut Json),
        ),
        ("model.type WordPiece", |j| {
            j["model"]["type"] = json!("WordPiece")
        }),
        ("vocab missing", |j| {
            j["model"].as_object_mut().unwrap().remove("vocab");
        }),
        ("vocab a list", |j| j["model"]["vocab"] = json!(["a", "b"])),
        ("token id negative", |j| {
            j["model"]["vocab"]["Ġthe"] = json!(-1)
        }),
        ("token id past vocab_size", |j| {
            j["model"]["vocab"]["Ġthe"] = json!(60_000)
        }),
        ("token id a string", |j| {
            j["model"]["vocab"]["Ġthe"] = json!("262")
        }),
        ("two tokens share an id", |j| {
            j["model"]["vocab"]["Ġthe"] = json!(11)
        }),
        ("merges missing", |j| {
            j["model"].as_object_mut().unwrap().remove("merges");
        }),
        ("merges not a list", |j| j["model"]["merges"] = json!("Ġ t")),
        ("merges empty", |j| j["model"]["merges"] = json!([])),
        ("merge with one part", |j| {
            j["model"]["merges"][5] = json!("Ġt")
        }),
        ("merge of numbers", |j| {
            j["model"]["merges"][5] = json!([1, 2])
        }),
        ("added token id past vocab_size", |j| {
            j["added_tokens"][0]["id"] = json!(99_999_999)
        }),
    ] {
        add(
            "tokenizer",
            &format!("tokenizer.json: {name}"),
            "tokenizer.json",
            Refused,
            tj(f),
        );
    }
    for (name, f) in [
        (
            "merge naming an unknown token",
            (|j: &mut Json| j["model"]["merges"][5] = json!("Ġqqqq zzzz")) as fn(&mut Json),
        ),
        ("byte token Ġ missing", |j| {
            j["model"]["vocab"].as_object_mut().unwrap().remove("Ġ");
        }),
    ] {
        add(
            "tokenizer",
            &format!("tokenizer.json: {name}"),
            "",
            RefusedOrUnusable,
            tj(f),
        );
    }
    add(
        "tokenizer",
        "tokenizer_config.json not JSON",
        "tokenizer_config.json",
        Refused,
        Box::new(|| vec![("tokenizer_config.json", Some(b"{".to_vec()))]),
    );
    add(
        "tokenizer",
        "tokenizer_config.json a list",
        "tokenizer_config.json",
        Refused,
        Box::new(|| vec![("tokenizer_config.json", Some(b"[1]".to_vec()))]),
    );
    // vocab.json + merges.txt (tokenizer.json removed so they are read).
    let vm = |vocab: Option<Vec<u8>>, merges: Option<Vec<u8>>| -> Edits {
        let mut e: Edits = vec![("tokenizer.json", None)];
        if let Some(v) = vocab {
            e.push(("vocab.json", Some(v)));
        }
        if let Some(m) = merges {
            e.push(("merges.txt", Some(m)));
        }
        e
    };
    add(
        "tokenizer",
        "vocab.json not JSON",
        "vocab.json",
        Refused,
        Box::new(move || vm(Some(b"{\"!\": 0,".to_vec()), None)),
    );
    add(
        "tokenizer",
        "vocab.json a list",
        "vocab.json",
        Refused,
        Box::new(move || vm(Some(b"[\"!\"]".to_vec()), None)),
    );
    add(
        "tokenizer",
        "vocab.json ids shared",
        "vocab.json",
        Refused,
        Box::new(move || {
            vm(
                Some(json_with("vocab.json", |j| j["Ġthe"] = json!(0))),
                None,
            )
        }),
    );
    add(
        "tokenizer",
        "vocab.json id huge",
        "vocab.json",
        Refused,
        Box::new(move || {
            vm(
                Some(json_with("vocab.json", |j| j["Ġthe"] = json!(u64::MAX))),
                None,
            )
        }),
    );
    add(
        "tokenizer",
        "merges.txt not UTF-8",
        "merges.txt",
        Refused,
        Box::new(move || {
            let mut m = hf_read("merges.txt");
            m[200] = 0xff;
            vm(None, Some(m))
        }),
    );
    add(
        "tokenizer",
        "merges.txt only the version line",
        "merges.txt",
        Refused,
        Box::new(move || vm(None, Some(b"#version: 0.2\n".to_vec()))),
    );
    add(
        "tokenizer",
        "merges.txt line with one part",
        "merges.txt",
        Refused,
        Box::new(move || {
            vm(
                None,
                Some(b"#version: 0.2\n\xc4\xa0 t\n\xc4\xa0t\n".to_vec()),
            )
        }),
    );
    add(
        "tokenizer",
        "merges.txt missing",
        "merges.txt",
        Refused,
        Box::new(|| vec![("tokenizer.json", None), ("merges.txt", None)]),
    );
    add(
        "tokenizer",
        "no tokenizer at all",
        "vocab.json",
        Refused,
        Box::new(|| {
            vec![
                ("tokenizer.json", None),
                ("vocab.json", None),
                ("merges.txt", None),
            ]
        }),
    );
    cases
}

/// A checkpoint directory: links to the bundled files, with `edits` applied.
fn make_hf_dir(dir: &Path, edits: Edits) {
    std::fs::create_dir_all(dir).unwrap();
    for &f in HF_FILES {
        match edits.iter().find(|(n, _)| *n == f) {
            Some((_, Some(bytes))) => std::fs::write(dir.join(f), bytes).unwrap(),
            Some((_, None)) => {}
            None => std::os::unix::fs::symlink(tiny_hf().join(f), dir.join(f)).unwrap(),
        }
    }
}

/// The Hugging Face corpus through `convert` (and `run` on anything it writes).
#[test]
fn malformed_checkpoint_corpus() {
    let cases = hf_cases();
    let root = scratch("malformed-hf");
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(c) = cases.get(i) else { break };
                let dir = root.join(format!("case-{i:03}"));
                make_hf_dir(&dir, (c.edits)());
                let out = dir.join("out.gguf");
                let named = if c.must_name.is_empty() {
                    dir.clone()
                } else {
                    dir.join(c.must_name)
                };
                let o = run_ggpt(&[
                    "convert".as_ref(),
                    dir.as_os_str(),
                    "--type".as_ref(),
                    "f16".as_ref(),
                    "-o".as_ref(),
                    out.as_os_str(),
                ]);
                let failed_but_wrote = !o.success() && out.exists();
                let mut problem = None;
                if o.success() && c.want == ConvertWant::RefusedOrUnusable {
                    let p = out.to_str().unwrap();
                    let r = run_ggpt(&["run", "-m", p, "-p", "Hello", "-n", "2", "-t", "1"]);
                    if let Some(pr) = r.problem_if_not_clean_error(p) {
                        problem = Some((format!("convert accepted it, then run: {pr}"), r));
                    }
                } else if let Some(pr) = o.problem_if_not_clean_error(named.to_str().unwrap()) {
                    problem = Some((pr, o));
                }
                if let Some((pr, o)) = problem {
                    failures.lock().unwrap().push(format!(
                        "[{}] {}: {pr}\n{}",
                        c.category,
                        c.name,
                        o.describe()
                    ));
                }
                if failed_but_wrote {
                    failures.lock().unwrap().push(format!(
                        "[{}] {}: convert failed but left {}",
                        c.category,
                        c.name,
                        out.display()
                    ));
                }
                // Nothing half-written may be left behind either.
                if let Ok(rd) = std::fs::read_dir(&dir) {
                    for e in rd.flatten() {
                        if e.file_name().to_string_lossy().contains(".ggpt-tmp.") {
                            failures.lock().unwrap().push(format!(
                                "[{}] {}: temporary file {:?} left behind",
                                c.category,
                                c.name,
                                e.file_name()
                            ));
                        }
                    }
                }
                let _ = std::fs::remove_dir_all(&dir);
            });
        }
    });
    let mut counts = BTreeMap::new();
    for c in &cases {
        *counts.entry(c.category).or_insert(0) += 1;
    }
    report(
        "malformed checkpoint corpus",
        &counts,
        &failures.into_inner().unwrap(),
    );
    let _ = std::fs::remove_dir_all(&root);
}

// ---------------------------------------------------------------------------------------------
// Hostile command lines and unusable outputs.

/// Flags out of range, files that are missing or not what they claim to be: each must end with
/// one error naming the flag or file, before any work is done.
#[test]
fn hostile_flags_and_paths() {
    let dir = scratch("malformed-flags");
    let model = tiny_model("Q4_K_M");
    let m = model.to_str().unwrap();
    let bad_utf8 = dir.join("prompt-latin1.txt");
    std::fs::write(&bad_utf8, b"caf\xe9 au lait\n").unwrap();
    let bad = bad_utf8.to_str().unwrap();
    let long = dir.join("long-prompt.txt");
    std::fs::write(
        &long,
        "the quick brown fox jumps over the lazy dog. ".repeat(200),
    )
    .unwrap();
    let long = long.to_str().unwrap();
    let missing = dir.join("no-such-file.gguf");
    let missing = missing.to_str().unwrap();
    let d = dir.to_str().unwrap();
    let text = tiny_hf().join("val.txt");
    let text = text.to_str().unwrap();
    let hf = tiny_hf();
    let hf = hf.to_str().unwrap();
    let q8 = tiny_model("Q8_0");
    let q8 = q8.to_str().unwrap();
    let requant = dir.join("requant.gguf");
    let requant = requant.to_str().unwrap();

    // (arguments, what the error must name, the exit code docs/errors.md promises: 2 for a
    // command line that parses but cannot be used, 3 for a bad input file)
    let cases: Vec<(Vec<&str>, &str, Option<i32>)> = vec![
        // clap's own parsing: exit 2.
        (vec!["run", "-m", m, "-n", "1e30"], "--n-predict", Some(2)),
        (vec!["run", "-m", m, "-n", "-1"], "-1", Some(2)),
        (
            vec!["run", "-m", m, "-n", "99999999999999999999999"],
            "--n-predict",
            Some(2),
        ),
        (vec!["run", "-m", m, "--ctx", "-5"], "-5", Some(2)),
        (vec!["run", "-m", m, "-t", "two"], "--threads", Some(2)),
        (vec!["run", "-p", "x"], "--model", Some(2)),
        (vec!["convert", hf, "--type", "q3_k"], "q3_k", Some(2)),
        (vec!["frobnicate"], "frobnicate", Some(2)),
        // Range checks.
        (
            vec!["run", "-m", m, "-p", "Hi", "--ctx", "0"],
            "--ctx",
            Some(2),
        ),
        (
            vec!["run", "-m", m, "-p", "Hi", "--ctx", "1025"],
            "--ctx",
            Some(2),
        ),
        (
            vec!["run", "-m", m, "-p", "Hi", "--ctx", "18446744073709551615"],
            "--ctx",
            Some(2),
        ),
        (
            vec!["run", "-m", m, "-p", "Hi", "-t", "0"],
            "--threads",
            Some(2),
        ),
        (
            vec!["run", "-m", m, "-p", "Hi", "-t", "1000000"],
            "--threads",
            Some(2),
        ),
        (
            vec!["run", "-m", m, "-p", "Hi", "--num-return-sequences", "0"],
            "--num-return-sequences",
            Some(2),
        ),
        (
            vec![
                "run",
                "-m",
                m,
                "-p",
                "Hi",
                "--num-return-sequences",
                "1000000",
            ],
            "--num-return-sequences",
            Some(2),
        ),
        (
            vec!["run", "-m", m, "-p", "Hi", "-n", "2000"],
            "-n",
            Some(2),
        ),
        (
            vec!["run", "-m", m, "-p", "Hi", "-n", "18446744073709551614"],
            "-n",
            Some(2),
        ),
        (
            vec!["run", "-m", m, "-p", "Hi", "--ctx", "16", "-n", "16"],
            "-n",
            Some(2),
        ),
        (
            vec!["run", "-m", m, "-f", long, "--ctx", "64", "-n", "2"],
            "context",
            Some(2),
        ),
        (
            vec!["run", "-m", m, "-f", long, "-n", "2"],
            "context",
            Some(2),
        ),
        (
            vec!["run", "-m", m, "-p", "Hi", "--temp=-1"],
            "temperature",
            Some(2),
        ),
        (
            vec!["run", "-m", m, "-p", "Hi", "--temp", "NaN"],
            "temperature",
            Some(2),
        ),
        (
            vec!["run", "-m", m, "-p", "Hi", "--top-p", "2"],
            "top_p",
            Some(2),
        ),
        (vec!["mem", m, "--ctx", "0"], "--ctx", Some(2)),
        (vec!["mem", m, "--ctx", "1000000"], "--ctx", Some(2)),
        (vec!["mem", m, "--batch", "0"], "--batch", Some(2)),
        (vec!["mem", m, "--seqs", "0"], "--seqs", Some(2)),
        (vec!["mem", m, "--seqs", "1000000"], "--seqs", Some(2)),
        (vec!["mem", m, "--kv", "q4"], "--kv", Some(2)),
        (vec!["mem", m, "-t", "0"], "--threads", Some(2)),
        (
            vec!["perplexity", "-m", m, "-f", text, "--chunks", "0"],
            "--chunks",
            Some(2),
        ),
        // cli/src/bench.rs still reports its own range errors with exit 1.
        (vec!["bench", "-m", m, "-r", "0"], "-r", None),
        (vec!["bench", "-m", m, "-r", "1000000"], "-r", None),
        // Files.
        (vec!["run", "-m", m, "-f", bad], bad, Some(3)),
        (vec!["run", "-m", m, "-f", missing], missing, Some(3)),
        (vec!["run", "-m", missing, "-p", "Hi"], missing, Some(3)),
        (vec!["run", "-m", d, "-p", "Hi"], d, Some(3)),
        (
            vec!["run", "-m", "/dev/null", "-p", "Hi"],
            "/dev/null",
            Some(3),
        ),
        (vec!["inspect", missing], missing, Some(3)),
        (vec!["inspect", d], d, Some(3)),
        (vec!["inspect", "/dev/zero"], "/dev/zero", Some(3)),
        (
            vec!["inspect", "/proc/self/status"],
            "/proc/self/status",
            Some(3),
        ),
        (vec!["inspect", hf], hf, Some(3)),
        (vec!["mem", missing], missing, Some(3)),
        (vec!["tokenize", "-m", missing, "Hi"], missing, Some(3)),
        (vec!["features", "-m", missing, "Hi"], missing, Some(3)),
        (
            vec!["perplexity", "-m", missing, "-f", text],
            missing,
            Some(3),
        ),
        (vec!["perplexity", "-m", m, "-f", missing], missing, Some(3)),
        (vec!["perplexity", "-m", m, "-f", bad], bad, Some(3)),
        (vec!["dump", missing, d], missing, Some(3)),
        (
            vec!["quantize", missing, requant, "--type", "q4_k_m"],
            missing,
            Some(3),
        ),
        (
            vec!["quantize", q8, requant, "--type", "q4_k_m"],
            q8,
            Some(3),
        ),
        (vec!["convert", missing], missing, Some(3)),
        (vec!["convert", m], m, Some(3)),
        (vec!["convert", d], "config.json", Some(3)),
    ];
    let mut failures = Vec::new();
    for (args, name, code) in &cases {
        let o = run_ggpt(args);
        let problem = o.problem_if_not_clean_error(name).or_else(|| match code {
            Some(c) if o.code() != Some(*c) => {
                Some(format!("exit code {:?}, expected {c}", o.code()))
            }
            _ => None,
        });
        if let Some(p) = problem {
            failures.push(format!("{p}\n{}", o.describe()));
        }
    }
    // Standard input that is not UTF-8.
    let o = run_ggpt_with(
        &["run", "-m", m, "-p", "-", "-n", "1"],
        Some(b"\xff\xfe\x00x"),
        TIMEOUT,
    );
    if let Some(p) = o.problem_if_not_clean_error("standard input") {
        failures.push(format!("{p}\n{}", o.describe()));
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile command lines broke the error contract:\n\n{}",
        failures.len(),
        cases.len() + 1,
        failures.join("\n\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Outputs that cannot be written: a path under a regular file, a read-only pseudo file
/// system (tests run as root, so permissions alone cannot be relied on), a missing directory.
/// Exit code 4, the destination named, nothing left behind.
#[test]
fn unwritable_outputs() {
    let dir = scratch("malformed-out");
    let hf = tiny_hf();
    let hf = hf.to_str().unwrap();
    let model = tiny_model("F16");
    let m = model.to_str().unwrap();
    let file = dir.join("a-regular-file");
    std::fs::write(&file, b"x").unwrap();
    let under_file = file.join("out.gguf");
    let under_file = under_file.to_str().unwrap();
    let no_dir = dir.join("no/such/dir/");
    let no_dir = no_dir.to_str().unwrap();
    let npy = file.join("f.npy");
    let npy = npy.to_str().unwrap();
    // (arguments, the exit code docs/errors.md promises)
    let cases: Vec<(Vec<&str>, Option<i32>)> = vec![
        (
            vec!["convert", hf, "--type", "q8_0", "-o", under_file],
            Some(4),
        ),
        (
            vec![
                "convert",
                hf,
                "--type",
                "q8_0",
                "-o",
                "/proc/ggpt-test.gguf",
            ],
            Some(4),
        ),
        (
            vec!["convert", hf, "--type", "all", "-o", "/proc/"],
            Some(4),
        ),
        (vec!["convert", hf, "--type", "all", "-o", no_dir], Some(4)),
        (vec!["quantize", m, under_file, "--type", "q4_k_m"], Some(4)),
        (vec!["features", "-m", m, "Hello", "--npy", npy], Some(4)),
        (vec!["dump", m, under_file], Some(4)),
    ];
    let mut failures = Vec::new();
    for (args, code) in &cases {
        let target = args
            .iter()
            .copied()
            .find(|a| {
                a.contains("a-regular-file") || a.starts_with("/proc") || a.contains("no/such")
            })
            .unwrap();
        let o = run_ggpt(args);
        let problem = o.problem_if_not_clean_error(target).or_else(|| match code {
            Some(c) if o.code() != Some(*c) => {
                Some(format!("exit code {:?}, expected {c}", o.code()))
            }
            _ => None,
        });
        if let Some(p) = problem {
            failures.push(format!("{p}\n{}", o.describe()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} unwritable-output cases broke the error contract:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small tmpfs mounted for one test and unmounted (even on panic) afterwards.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` where mounting is not allowed (not root, or no CAP_SYS_ADMIN in a container).
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Disk full half way through a conversion: exit 4 naming the output, and neither the
/// destination nor a temporary file left on the full file system.
#[test]
fn disk_full_during_convert() {
    let dir = scratch("malformed-full");
    let mnt = dir.join("mnt");
    let Some(fs) = Tmpfs::mount(&mnt, "4m") else {
        eprintln!("disk_full_during_convert: cannot mount a tmpfs here; nothing to check");
        return;
    };
    let out = mnt.join("model.gguf");
    let o = run_ggpt(&[
        "convert".as_ref(),
        tiny_hf().as_os_str(),
        "--type".as_ref(),
        "q8_0".as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    let left: Vec<_> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    drop(fs);
    if let Some(p) = o.problem_if_not_clean_error(out.to_str().unwrap()) {
        panic!("{p}\n{}", o.describe());
    }
    assert_eq!(o.code(), Some(4), "{}", o.describe());
    assert!(
        o.stderr.contains("No space left on device"),
        "{}",
        o.describe()
    );
    assert!(left.is_empty(), "left on the full disk: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Fuzzing regressions.

/// The fuzz targets' bodies (fuzz/src/harness.rs), shared so that saved inputs replay here.
#[path = "../fuzz/src/harness.rs"]
mod harness;

/// Every input the fuzzers once crashed on (tests/fixtures/fuzz-regressions/<target>/) runs
/// through its target's body again, and the GGUF ones also through `ggpt inspect` and `run`.
#[test]
fn fuzz_regressions_replay() {
    let root = common::repo().join("tests/fixtures/fuzz-regressions");
    type Body = fn(&[u8]);
    let targets: [(&str, Body); 4] = [
        ("gguf_reader", harness::gguf_reader),
        ("safetensors_reader", harness::safetensors_reader),
        ("tokenizer", harness::tokenizer),
        ("quant_blocks", harness::quant_blocks),
    ];
    let mut replayed = 0;
    let mut failures = Vec::new();
    for (target, body) in targets {
        let dir = root.join(target);
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
            Err(_) => continue,
        };
        files.sort();
        for path in files {
            let bytes = std::fs::read(&path).unwrap();
            body(&bytes);
            replayed += 1;
            if target == "gguf_reader" {
                let p = path.to_str().unwrap();
                for o in [
                    run_ggpt(&["inspect", p]),
                    run_ggpt(&["run", "-m", p, "-p", "Hi", "-n", "2", "-t", "1"]),
                ] {
                    let problem = if o.success() {
                        o.problem_if_not_orderly()
                    } else {
                        o.problem_if_not_clean_error(p)
                    };
                    if let Some(pr) = problem {
                        failures.push(format!("{pr}\n{}", o.describe()));
                    }
                }
            }
        }
    }
    eprintln!("replayed {replayed} saved fuzz inputs");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Move the entry `from` of a JSON object to the key `to` (a header tensor renamed or moved).
fn rename_key(j: &mut Json, from: &str, to: &str) {
    let v = j
        .as_object_mut()
        .and_then(|o| o.remove(from))
        .unwrap_or_else(|| panic!("no key {from:?} to rename"));
    j[to] = v;
}

/// Tensors the header does not account for (a smaller `gpt2.block_count` than the blocks
/// stored, an unknown tensor, a missing one): `run`, `inspect`, `features` and `perplexity`
/// all refuse the file with exit 3 and an error naming the tensors.
#[test]
fn tensor_set_must_match_the_architecture() {
    let bases = load_bases();
    let dir = scratch("tensor-set");
    let text = dir.join("text.txt");
    std::fs::write(&text, "Hello world. ".repeat(200)).unwrap();
    let text = text.to_str().unwrap().to_string();
    let must_name = [
        "'blk.5.attn_norm.weight'",
        "'foo.weight'",
        "'blk.2.ffn_up.bias'",
    ];
    for ((name, edit), tensor) in TENSOR_SET_EDITS.iter().zip(must_name) {
        let mut g = bases.q4km.gguf.clone();
        edit(&mut g);
        let path = dir.join("bad.gguf");
        std::fs::write(&path, g.encode()).unwrap();
        let p = path.to_str().unwrap();
        let runs = [
            run_ggpt(&["run", "-m", p, "-p", "Hello", "-n", "2", "-t", "1"]),
            run_ggpt(&["inspect", p]),
            run_ggpt(&["features", "-m", p, "Hello"]),
            run_ggpt(&["perplexity", "-m", p, "-f", &text, "-c", "64", "-t", "1"]),
        ];
        let mut first: Option<String> = None;
        for o in runs {
            assert_eq!(o.code(), Some(3), "{name}: {}", o.describe());
            let line = o.error_line().to_string();
            assert!(
                line.contains(tensor) && line.contains(p),
                "{name}: {}",
                o.describe()
            );
            // The same message from every command.
            match &first {
                None => first = Some(line),
                Some(f) => assert_eq!(&line, f, "{name}"),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
