//! GGUF reader/writer tests: round trips, llama.cpp's layout rule checked against bytes
//! assembled by hand from the spec, every malformed-input class the reader guards against,
//! and an independent reader (gguf-rs) agreeing with what our writer produces.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;

use ggpt_gguf::{Array, GgmlType, GgufError, GgufFile, GgufWriter, TensorInfo, Value};

// ---------------------------------------------------------------------------------------------
// Allocation watch: the largest single allocation made by the current thread, so the tests can
// show that a lying count or length is rejected before anything is sized by it.

struct Watch;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call unchanged to the system allocator; the bookkeeping touches only a
// const-initialised thread-local Cell, which never allocates.
unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|m| m.set(m.get().max(layout.size())));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|m| m.set(m.get().max(new_size)));
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Watch = Watch;

/// Parse `bytes`, expecting an error; returns the message. Fails the test if parsing succeeds
/// or if any single allocation during parsing exceeded 1 MiB plus the input's own size.
fn reject(bytes: Vec<u8>, name: &str) -> String {
    let input = bytes.len();
    LARGEST.with(|m| m.set(0));
    let r = GgufFile::from_bytes(bytes, name);
    let largest = LARGEST.with(|m| m.get());
    assert!(
        largest <= input + (1 << 20),
        "{name}: parsing allocated {largest} bytes at once for a {input}-byte input"
    );
    match r {
        Ok(_) => panic!("{name}: malformed input was accepted"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(name), "error does not name the file: {msg}");
            msg
        }
    }
}

// ---------------------------------------------------------------------------------------------
// An independent encoder written from the spec, used to assemble expected and malformed files
// byte by byte without going through the writer under test.

#[derive(Default, Clone)]
struct B(Vec<u8>);

impl B {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> B {
        let mut b = B::default();
        b.raw(b"GGUF").u32(version).u64(n_tensors).u64(n_kv);
        b
    }
    fn raw(&mut self, x: &[u8]) -> &mut Self {
        self.0.extend_from_slice(x);
        self
    }
    fn u8(&mut self, x: u8) -> &mut Self {
        self.0.push(x);
        self
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.raw(&x.to_le_bytes())
    }
    fn u64(&mut self, x: u64) -> &mut Self {
        self.raw(&x.to_le_bytes())
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.bytes_str(s.as_bytes())
    }
    fn bytes_str(&mut self, s: &[u8]) -> &mut Self {
        self.u64(s.len() as u64).raw(s)
    }
    /// A KV with a u32 value.
    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key).u32(4).u32(v)
    }
    fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
        self.str(key).u32(8).str(v)
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    fn pad_to(&mut self, align: usize) -> &mut Self {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        self
    }
    fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    fn done(&self) -> Vec<u8> {
        self.0.clone()
    }
}

/// Block geometry per ggml type code, from ggml-common.h / gguf-py's GGML_QUANT_SIZES, kept
/// separate from ggpt-quant's table so the tests do not check that table against itself.
const TYPES: &[(GgmlType, u32, u64, u64)] = &[
    (GgmlType::F32, 0, 1, 4),
    (GgmlType::F16, 1, 1, 2),
    (GgmlType::Q4_0, 2, 32, 18),
    (GgmlType::Q4_1, 3, 32, 20),
    (GgmlType::Q5_0, 6, 32, 22),
    (GgmlType::Q5_1, 7, 32, 24),
    (GgmlType::Q8_0, 8, 32, 34),
    (GgmlType::Q8_1, 9, 32, 36),
    (GgmlType::Q2K, 10, 256, 84),
    (GgmlType::Q3K, 11, 256, 110),
    (GgmlType::Q4K, 12, 256, 144),
    (GgmlType::Q5K, 13, 256, 176),
    (GgmlType::Q6K, 14, 256, 210),
    (GgmlType::Q8K, 15, 256, 292),
    (GgmlType::BF16, 30, 1, 2),
];

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn write_file(w: &GgufWriter, data: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    w.write_header(&mut out).unwrap();
    for (i, d) in data.iter().enumerate() {
        w.write_tensor_data(&mut out, i, d).unwrap();
    }
    out
}

fn tmp_path(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ggpt-convert-gguf-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{}-{name}", std::process::id()))
}

/// Every value type, including nested and empty arrays and non-ASCII text.
fn all_values() -> Vec<(&'static str, Value)> {
    vec![
        ("t.u8", Value::U8(250)),
        ("t.i8", Value::I8(-100)),
        ("t.u16", Value::U16(65000)),
        ("t.i16", Value::I16(-32000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.f32", Value::F32(-1.5e-5)),
        ("t.bool.true", Value::Bool(true)),
        ("t.bool.false", Value::Bool(false)),
        ("t.str", Value::from("Ġthe ünïcödé ✓ \u{0} tab\t")),
        ("t.str.empty", Value::from("")),
        ("t.u64", Value::U64(u64::MAX)),
        ("t.i64", Value::I64(i64::MIN)),
        ("t.f64", Value::F64(std::f64::consts::PI)),
        ("a.u8", Value::from(vec![0u8, 1, 255])),
        ("a.i8", Value::from(vec![-128i8, 0, 127])),
        ("a.u16", Value::from(vec![1u16, 65535])),
        ("a.i16", Value::from(vec![-32768i16, 32767])),
        ("a.u32", Value::from(vec![7u32, u32::MAX])),
        ("a.i32", Value::from(vec![1i32, -1, 3])),
        ("a.f32", Value::from(vec![0.5f32, -0.0, f32::INFINITY])),
        ("a.bool", Value::from(vec![true, false, true])),
        ("a.str", Value::from(vec!["Ġa", "", "b c"])),
        ("a.u64", Value::from(vec![u64::MAX, 0])),
        ("a.i64", Value::from(vec![i64::MIN, i64::MAX])),
        ("a.f64", Value::from(vec![1e300f64, -2.5])),
        ("a.empty", Value::Array(Array::F32(vec![]))),
        (
            "a.nested",
            Value::from(vec![
                Array::I32(vec![1, 2]),
                Array::String(vec!["x".into()]),
                Array::Array(vec![Array::U8(vec![9]), Array::Bool(vec![])]),
                Array::U64(vec![]),
            ]),
        ),
        ("a.nested.empty", Value::Array(Array::Array(vec![]))),
    ]
}

// ---------------------------------------------------------------------------------------------
// Round trips

#[test]
fn round_trip_every_value_type() {
    let mut w = GgufWriter::new();
    for (k, v) in all_values() {
        w.add_kv(k, v);
    }
    let bytes = write_file(&w, &[]);
    assert_eq!(bytes.len() as u64, w.total_size());
    let f = GgufFile::from_bytes(bytes, "values.gguf").unwrap();
    assert_eq!(f.version(), 3);
    let expected = all_values();
    assert_eq!(f.metadata().len(), expected.len());
    for ((k, v), (ek, ev)) in f.metadata().iter().zip(&expected) {
        assert_eq!(k, ek);
        assert_eq!(v, ev, "value of {k}");
        assert_eq!(f.get(k), Some(ev));
    }
    assert_eq!(f.get_u64("t.u8").unwrap(), Some(250));
    assert_eq!(f.get_u64("t.u32").unwrap(), Some(4_000_000_000));
    assert_eq!(f.get_u64("t.u64").unwrap(), Some(u64::MAX));
    assert!(f.get_u64("t.i8").is_err(), "negative value read as u64");
    assert!(f.get_u64("t.str").is_err());
    assert_eq!(f.get_u64("missing").unwrap(), None);
    assert_eq!(f.get_f32("t.f32").unwrap(), Some(-1.5e-5));
    assert_eq!(f.get_f32("t.f64").unwrap(), Some(std::f32::consts::PI));
    assert!(f.get_f32("t.u32").is_err());
    assert_eq!(f.get_str("t.str.empty").unwrap(), Some(""));
    assert!(f.get_str("t.u8").is_err());
    assert_eq!(
        f.get_str_array("a.str").unwrap(),
        Some(vec!["Ġa", "", "b c"])
    );
    assert!(f.get_str_array("a.i32").is_err());
    assert_eq!(f.get_i32_array("a.i32").unwrap(), Some(vec![1, -1, 3]));
    assert_eq!(f.get_i32_array("a.u8").unwrap(), Some(vec![0, 1, 255]));
    assert!(
        f.get_i32_array("a.u32").is_err(),
        "u32::MAX does not fit i32"
    );
    assert!(f.get_i32_array("a.str").is_err());
    let err = f.get_str("t.u8").unwrap_err().to_string();
    assert!(err.contains("values.gguf") && err.contains("t.u8"), "{err}");
}

#[test]
fn round_trip_every_tensor_type() {
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", Value::from("gpt2"));
    let mut data = Vec::new();
    for (i, &(ty, _, block, _)) in TYPES.iter().enumerate() {
        // Odd row counts and 3-D/4-D shapes make sizes that are not multiples of 32.
        let dims: Vec<u64> = match i % 3 {
            0 => vec![block * 2, 3],
            1 => vec![block, 5, 1, 3],
            _ => vec![block * 3, 1, 7],
        };
        w.add_tensor(&format!("t{i}.{}", ty.name()), &dims, ty)
            .unwrap();
        let size = w.tensors()[i].size as usize;
        data.push(pattern(size, i as u8));
    }
    let bytes = write_file(&w, &data);
    assert_eq!(bytes.len() as u64, w.total_size());
    let f = GgufFile::from_bytes(bytes.clone(), "types.gguf").unwrap();
    assert_eq!(f.tensors().len(), TYPES.len());
    assert_eq!(f.data_offset() % 32, 0);
    for (i, (t, &(ty, code, block, bytes_per_block))) in f.tensors().iter().zip(TYPES).enumerate() {
        assert_eq!(t.ty, ty);
        assert_eq!(t.ty as u32, code);
        let n: u64 = t.dims.iter().product();
        assert_eq!(t.n_elements(), n);
        assert_eq!(t.cols(), t.dims[0]);
        assert_eq!(t.rows(), n / t.dims[0]);
        assert_eq!(t.size, n / block * bytes_per_block, "size of {}", t.name);
        assert_eq!(f.tensor_data(t), &data[i][..], "data of {}", t.name);
        // Borrowed from the buffer, not copied.
        let start = (f.data_offset() + t.offset) as usize;
        assert_eq!(f.tensor_data(t).as_ptr(), f.bytes()[start..].as_ptr());
        assert_eq!(f.tensor(&t.name), Some(t));
    }
    // Open the same bytes from disk through the mmap path.
    let path = tmp_path("types.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let m = GgufFile::open(&path).unwrap();
    assert_eq!(m.tensors(), f.tensors());
    assert_eq!(m.metadata(), f.metadata());
    assert_eq!(m.path(), path.as_path());
    assert_eq!(m.file_len(), bytes.len() as u64);
    for t in m.tensors() {
        assert_eq!(m.tensor_data(t), f.tensor_data(t));
        assert_eq!(
            m.tensor_data(t).as_ptr() as usize % 32,
            0,
            "{} misaligned",
            t.name
        );
    }
    std::fs::remove_file(&path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Layout: llama.cpp's rule, checked against bytes assembled by hand

#[test]
fn writer_layout_matches_llama_cpp_byte_for_byte() {
    // Two KVs, three tensors of 12, 68 and 4 bytes: the offsets must be 0, 32, 128 (each size
    // rounded up to 32), the header padded to 32, every tensor zero-padded, the last one too.
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", Value::from("gpt2"));
    w.add_kv("gpt2.block_count", Value::U32(6));
    w.add_tensor("a", &[3], GgmlType::F32).unwrap();
    w.add_tensor("bb", &[64], GgmlType::Q8_0).unwrap();
    w.add_tensor("c", &[2], GgmlType::F16).unwrap();
    let data = vec![pattern(12, 1), pattern(68, 2), pattern(4, 3)];
    let got = write_file(&w, &data);

    let mut e = B::header(3, 3, 2);
    e.kv_str("general.architecture", "gpt2")
        .kv_u32("gpt2.block_count", 6)
        .tensor("a", &[3], 0, 0)
        .tensor("bb", &[64], 8, 32)
        .tensor("c", &[2], 1, 128)
        .pad_to(32);
    let header_len = e.0.len();
    e.raw(&data[0])
        .zeros(20)
        .raw(&data[1])
        .zeros(28)
        .raw(&data[2])
        .zeros(28);
    let expected = e.done();

    assert_eq!(got.len(), expected.len());
    assert_eq!(got, expected);
    assert_eq!(w.header_bytes(), &expected[..header_len]);
    assert_eq!(w.data_offset(), header_len as u64);
    assert_eq!(w.total_size(), expected.len() as u64);
    let offsets: Vec<u64> = w.tensors().iter().map(|t| t.offset).collect();
    assert_eq!(offsets, [0, 32, 128]);
}

#[test]
fn custom_alignment_is_honoured_by_writer_and_reader() {
    let mut w = GgufWriter::new();
    w.add_tensor("a", &[3], GgmlType::F32).unwrap();
    w.add_tensor("b", &[5], GgmlType::F32).unwrap();
    // Set after the tensors: offsets must be recomputed.
    w.add_kv("general.alignment", Value::U64(64));
    assert_eq!(w.alignment(), 64);
    assert_eq!(
        w.metadata()[0].1,
        Value::U32(64),
        "stored as u32 like llama.cpp"
    );
    assert_eq!(w.tensors()[1].offset, 64);
    let bytes = write_file(&w, &[pattern(12, 0), pattern(20, 1)]);
    assert_eq!(bytes.len() % 64, 0);
    let f = GgufFile::from_bytes(bytes, "align64.gguf").unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.tensor_data(&f.tensors()[1]), &pattern(20, 1)[..]);

    // A bad alignment value cannot be written.
    let mut w = GgufWriter::new();
    w.add_kv("general.alignment", Value::U32(48));
    assert!(w.write_header(&mut Vec::new()).is_err());
}

#[test]
fn add_kv_replaces_like_gguf_set_val() {
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", Value::from("gpt2"));
    w.add_kv("general.file_type", Value::U32(1));
    w.add_kv("general.name", Value::from("x"));
    w.add_kv("general.file_type", Value::U32(15));
    let keys: Vec<&str> = w.metadata().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["general.architecture", "general.name", "general.file_type"]
    );
    assert_eq!(w.metadata()[2].1, Value::U32(15));
}

#[test]
fn writer_rejects_bad_tensors_and_data() {
    let mut w = GgufWriter::new();
    w.add_tensor("ok", &[32, 2], GgmlType::Q8_0).unwrap();
    w.add_tensor("ok2", &[32, 2], GgmlType::Q8_0).unwrap();
    assert!(
        w.add_tensor("ok", &[4], GgmlType::F32).is_err(),
        "duplicate"
    );
    assert!(w.add_tensor(&"n".repeat(64), &[4], GgmlType::F32).is_err());
    assert!(w.add_tensor(&"n".repeat(63), &[4], GgmlType::F32).is_ok());
    assert!(
        w.add_tensor("b1", &[33], GgmlType::Q8_0).is_err(),
        "ne0 % 32"
    );
    assert!(w.add_tensor("b2", &[4, 0], GgmlType::F32).is_err());
    assert!(w.add_tensor("b3", &[], GgmlType::F32).is_err());
    assert!(w.add_tensor("b4", &[1, 1, 1, 1, 1], GgmlType::F32).is_err());
    assert!(w
        .add_tensor("b5", &[1 << 32, 1 << 32], GgmlType::F32)
        .is_err());
    assert_eq!(w.tensors().len(), 3);

    let mut out = Vec::new();
    w.write_header(&mut out).unwrap();
    let size = w.tensors()[0].size as usize;
    assert_eq!(size, 68);
    assert!(w
        .write_tensor_data(&mut out, 0, &vec![0; size - 1])
        .is_err());
    assert!(
        w.write_tensor_data(&mut out, 1, &vec![0; size]).is_err(),
        "order"
    );
    assert!(w.write_tensor_data(&mut out, 9, &[]).is_err());
    w.write_tensor_data(&mut out, 0, &vec![1; size]).unwrap();
    w.write_tensor_data(&mut out, 1, &vec![2; size]).unwrap();
    w.write_tensor_data(&mut out, 2, &[7; 16]).unwrap();
    assert_eq!(out.len() as u64, w.total_size());
    GgufFile::from_bytes(out, "w.gguf").unwrap();
}

// ---------------------------------------------------------------------------------------------
// Layouts other writers may produce

#[test]
fn accepts_version_2_and_non_contiguous_layouts() {
    // Tensors stored in reverse order with a gap, and a v2 header: valid, though llama.cpp
    // itself insists on contiguous in-order data.
    let mut b = B::header(2, 2, 1);
    b.kv_str("general.architecture", "gpt2")
        .tensor("first", &[4], 0, 64)
        .tensor("second", &[8], 1, 0)
        .pad_to(32);
    let d1 = pattern(16, 5);
    let d2 = pattern(16, 9);
    b.raw(&d2).zeros(48).raw(&d1);
    let f = GgufFile::from_bytes(b.done(), "v2.gguf").unwrap();
    assert_eq!(f.version(), 2);
    assert_eq!(f.tensor_data(f.tensor("first").unwrap()), &d1[..]);
    assert_eq!(f.tensor_data(f.tensor("second").unwrap()), &d2[..]);
    assert_eq!(f.get_str("general.architecture").unwrap(), Some("gpt2"));
    // An info from elsewhere never makes tensor_data panic.
    let bogus = TensorInfo {
        name: "x".into(),
        dims: vec![4],
        ty: GgmlType::F32,
        offset: u64::MAX - 3,
        size: 16,
    };
    assert!(f.tensor_data(&bogus).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Malformed inputs

/// A small valid file with a string, an array and two tensors, and where its last tensor ends.
fn small_valid() -> (Vec<u8>, usize) {
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", Value::from("gpt2"));
    w.add_kv("tokenizer.ggml.tokens", Value::from(vec!["a", "Ġb"]));
    w.add_kv("flags", Value::from(vec![true, false]));
    w.add_kv("nested", Value::from(vec![Array::I32(vec![1])]));
    w.add_tensor("w", &[32, 2], GgmlType::Q8_0).unwrap();
    w.add_tensor("b", &[3], GgmlType::F32).unwrap();
    let bytes = write_file(&w, &[pattern(68, 1), pattern(12, 2)]);
    let t = &w.tensors()[1];
    let end = (w.data_offset() + t.offset + t.size) as usize;
    (bytes, end)
}

#[test]
fn truncation_at_every_byte_is_an_error() {
    let (bytes, end) = small_valid();
    GgufFile::from_bytes(bytes.clone(), "full.gguf").unwrap();
    for len in 0..end {
        reject(bytes[..len].to_vec(), &format!("cut{len}.gguf"));
    }
    // Only the trailing padding after the last tensor may be missing.
    for len in end..=bytes.len() {
        GgufFile::from_bytes(bytes[..len].to_vec(), "padcut.gguf").unwrap();
    }
}

#[test]
fn corrupting_any_header_byte_never_panics() {
    // Not every flipped byte is an error (e.g. a changed letter in a name), but none may panic
    // or allocate without bound.
    let (bytes, _) = small_valid();
    let header_len = {
        let f = GgufFile::from_bytes(bytes.clone(), "h.gguf").unwrap();
        f.data_offset() as usize
    };
    for i in 0..header_len {
        for flip in [0xff, 0x80, 0x01] {
            let mut b = bytes.clone();
            b[i] ^= flip;
            let input = b.len();
            LARGEST.with(|m| m.set(0));
            let _ = GgufFile::from_bytes(b, "flip.gguf");
            let largest = LARGEST.with(|m| m.get());
            assert!(largest <= input + (1 << 20), "byte {i}: {largest} bytes");
        }
    }
}

#[test]
fn bad_magic_and_versions() {
    let mut b = B::default();
    b.raw(b"GGML").u32(3).u64(0).u64(0);
    let m = reject(b.done(), "magic.gguf");
    assert!(m.contains("not a GGUF file"), "{m}");

    let m = reject(B::header(1, 0, 0).done(), "v1.gguf");
    assert!(m.contains("version 1"), "{m}");
    let m = reject(B::header(4, 0, 0).done(), "v4.gguf");
    assert!(m.contains("version 4"), "{m}");
    let m = reject(B::header(3u32.swap_bytes(), 0, 0).done(), "be.gguf");
    assert!(m.contains("big-endian"), "{m}");
    assert!(matches!(
        GgufFile::from_bytes(B::header(1, 0, 0).done(), "v1.gguf"),
        Err(GgufError::UnsupportedVersion { version: 1, .. })
    ));
    // An empty file with a valid header is fine.
    GgufFile::from_bytes(B::header(3, 0, 0).done(), "empty.gguf").unwrap();
}

#[test]
fn huge_counts_and_lengths_fail_without_allocating() {
    let m = reject(B::header(3, u64::MAX, 0).done(), "ntensors.gguf");
    assert!(m.contains("tensor count"), "{m}");
    let m = reject(B::header(3, 0, u64::MAX).done(), "nkv.gguf");
    assert!(m.contains("KV count"), "{m}");
    // A count that is plausible but larger than the file.
    reject(B::header(3, 1000, 0).done(), "ntensors2.gguf");

    // Key length u64::MAX.
    let mut b = B::header(3, 0, 1);
    b.u64(u64::MAX).raw(b"abc").u32(4).u32(1);
    reject(b.done(), "keylen.gguf");

    // String value length far past the end.
    let mut b = B::header(3, 0, 1);
    b.str("k").u32(8).u64(1 << 40).raw(b"abc");
    let m = reject(b.done(), "strlen.gguf");
    assert!(m.contains("'k'"), "{m}");

    // Arrays: over the element cap, and within it but longer than the file.
    for (elem, count) in [
        (10u32, 1u64 << 40),
        (0, (16 << 20) + 1),
        (8, 1 << 20),
        (9, 1 << 20),
    ] {
        let mut b = B::header(3, 0, 1);
        b.str("arr").u32(9).u32(elem).u64(count).zeros(64);
        reject(b.done(), &format!("arr{elem}.gguf"));
    }

    // Nested arrays deeper than the limit.
    let mut b = B::header(3, 0, 1);
    b.str("deep").u32(9);
    for _ in 0..10_000 {
        b.u32(9).u64(1);
    }
    b.u32(0).u64(0);
    let m = reject(b.done(), "deep.gguf");
    assert!(m.contains("nested"), "{m}");
}

#[test]
fn invalid_values_are_errors() {
    let file = |f: &dyn Fn(&mut B)| {
        let mut b = B::header(3, 0, 1);
        f(&mut b);
        b.done()
    };
    let m = reject(
        file(&|b| {
            b.str("k").u32(13).u32(0);
        }),
        "vtype.gguf",
    );
    assert!(m.contains("value type code 13"), "{m}");
    let m = reject(
        file(&|b| {
            b.str("k").u32(9).u32(77).u64(0);
        }),
        "etype.gguf",
    );
    assert!(m.contains("77"), "{m}");
    let m = reject(
        file(&|b| {
            b.str("k").u32(7).u8(2);
        }),
        "bool.gguf",
    );
    assert!(m.contains("bool"), "{m}");
    let m = reject(
        file(&|b| {
            b.str("k").u32(9).u32(7).u64(3).raw(&[1, 0, 2]);
        }),
        "boolarr.gguf",
    );
    assert!(m.contains("bool"), "{m}");
    let m = reject(
        file(&|b| {
            b.str("k").u32(8).bytes_str(b"ok \xff\xfe");
        }),
        "utf8.gguf",
    );
    assert!(m.contains("UTF-8"), "{m}");
    let m = reject(
        file(&|b| {
            b.bytes_str(b"k\xc3").u32(4).u32(0);
        }),
        "utf8key.gguf",
    );
    assert!(m.contains("UTF-8"), "{m}");
    let m = reject(
        file(&|b| {
            b.str("k")
                .u32(9)
                .u32(8)
                .u64(2)
                .str("fine")
                .bytes_str(b"\xc0\x80");
        }),
        "utf8arr.gguf",
    );
    assert!(m.contains("UTF-8") && m.contains("element 1"), "{m}");
    let m = reject(
        file(&|b| {
            b.str("").u32(4).u32(0);
        }),
        "emptykey.gguf",
    );
    assert!(m.contains("empty key"), "{m}");

    let mut b = B::header(3, 0, 2);
    b.kv_u32("dup", 1).kv_u32("dup", 2);
    let m = reject(b.done(), "dupkey.gguf");
    assert!(m.contains("duplicate key 'dup'"), "{m}");

    for (v, name) in [
        (Value::U32(48), "a48"),
        (Value::U32(0), "a0"),
        (Value::from("32"), "astr"),
    ] {
        let mut w = GgufWriter::new();
        w.add_kv("general.alignment", v);
        let mut out = w.header_bytes();
        out.extend_from_slice(&[0; 64]);
        let m = reject(out, &format!("{name}.gguf"));
        assert!(m.contains("general.alignment"), "{m}");
    }
}

/// A one-tensor file whose info is given raw, followed by `data` bytes of data section.
fn one_tensor(name: &[u8], dims: &[u64], ty: u32, offset: u64, data: usize) -> Vec<u8> {
    let mut b = B::header(3, 1, 0);
    b.bytes_str(name).u32(dims.len() as u32);
    for &d in dims {
        b.u64(d);
    }
    b.u32(ty).u64(offset).pad_to(32).zeros(data);
    b.done()
}

#[test]
fn invalid_tensor_infos_are_errors() {
    // The baseline is valid, so each rejection below is due to the one field changed.
    GgufFile::from_bytes(one_tensor(b"t", &[8, 2], 0, 0, 64), "ok.gguf").unwrap();

    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            one_tensor(b"t", &[8, 2], 99, 0, 64),
            "type99",
            "ggml type code 99",
        ),
        (
            one_tensor(b"t", &[8, 2], 4, 0, 64),
            "type4",
            "ggml type code 4",
        ),
        (one_tensor(b"t", &[33, 2], 8, 0, 128), "block", "block size"),
        (
            one_tensor(b"t", &[8, 0], 0, 0, 64),
            "zerodim",
            "dimension 1 is 0",
        ),
        (one_tensor(b"t", &[], 0, 0, 64), "ndims0", "dimensions"),
        (
            one_tensor(b"t", &[1, 1, 1, 1, 1], 0, 0, 64),
            "ndims5",
            "dimensions",
        ),
        (
            one_tensor(b"t", &[1 << 32, 1 << 32], 0, 0, 64),
            "overflow",
            "overflows",
        ),
        (
            one_tensor(b"t", &[u64::MAX], 0, 0, 64),
            "overflow1",
            "overflows",
        ),
        (
            one_tensor(b"t", &[1 << 40], 1, 0, 64),
            "outside",
            "past the end",
        ),
        (
            one_tensor(b"t", &[8, 2], 0, 32, 64),
            "offsetrange",
            "past the end",
        ),
        (
            one_tensor(b"t", &[8, 2], 0, u64::MAX - 31, 64),
            "offsetwrap",
            "past the end",
        ),
        (
            one_tensor(b"t", &[4], 0, 16, 64),
            "misaligned",
            "multiple of the alignment",
        ),
        (
            one_tensor(&[b'n'; 64], &[4], 0, 0, 64),
            "longname",
            "at most 63",
        ),
        (one_tensor(b"t\xff", &[4], 0, 0, 64), "utf8name", "UTF-8"),
    ];
    for (bytes, name, needle) in cases {
        let m = reject(bytes, &format!("{name}.gguf"));
        assert!(m.contains(needle), "{name}: {m}");
    }

    // Two tensors: overlapping, and with the same name.
    let two = |n2: &str, off2: u64| {
        let mut b = B::header(3, 2, 0);
        b.tensor("a", &[16], 0, 0)
            .tensor(n2, &[8], 0, off2)
            .pad_to(32)
            .zeros(128);
        b.done()
    };
    GgufFile::from_bytes(two("b", 64), "two.gguf").unwrap();
    let m = reject(two("b", 32), "overlap.gguf");
    assert!(m.contains("overlaps tensor 'a'"), "{m}");
    let m = reject(two("a", 64), "dupname.gguf");
    assert!(m.contains("duplicate name"), "{m}");
}

// ---------------------------------------------------------------------------------------------
// An independent reader agrees

/// gguf-rs hands metadata out as JSON values; compare one of ours with one of theirs.
fn agrees(ours: &Value, theirs: &serde_json::Value) -> bool {
    match ours {
        Value::String(s) => theirs.as_str() == Some(s.as_str()),
        Value::Bool(b) => theirs.as_bool() == Some(*b),
        // gguf-rs stores an f32 as its shortest decimal text, and JSON has no infinity.
        Value::F32(x) if x.is_finite() => theirs.as_f64().map(|t| t as f32) == Some(*x),
        Value::F32(_) => theirs.is_null(),
        Value::F64(x) => theirs.as_f64() == Some(*x),
        Value::Array(a) => match theirs.as_array() {
            Some(t) => {
                t.len() == a.len()
                    && t.iter().enumerate().all(|(i, ti)| match a.get(i) {
                        Some(o) => agrees(&o, ti),
                        None => false,
                    })
            }
            None => false,
        },
        int => (theirs.as_i64(), theirs.as_u64()) == (int.as_i64(), int.as_u64()),
    }
}

#[test]
fn gguf_rs_reads_our_files_identically() {
    // gguf-rs cannot read nested arrays, so this file has every other value type.
    let mut w = GgufWriter::new();
    let values: Vec<_> = all_values()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("a.nested"))
        .collect();
    for (k, v) in &values {
        w.add_kv(k, v.clone());
    }
    let mut data = Vec::new();
    for (i, &(ty, _, block, _)) in TYPES.iter().enumerate() {
        w.add_tensor(&format!("blk.{i}.weight"), &[block * 2, 3], ty)
            .unwrap();
        data.push(pattern(w.tensors()[i].size as usize, i as u8));
    }
    let path = tmp_path("gguf-rs.gguf");
    std::fs::write(&path, write_file(&w, &data)).unwrap();

    let mut container =
        gguf_rs::get_gguf_container_array_size(path.to_str().unwrap(), u64::MAX).unwrap();
    let model = container.decode().unwrap();
    let ours = GgufFile::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();

    assert_eq!(model.get_version(), "v3");
    assert_eq!(model.num_kv(), values.len() as u64);
    assert_eq!(model.data_offset(), ours.data_offset());
    assert_eq!(model.alignment(), ours.alignment());

    let meta = model.metadata();
    let their_keys: Vec<&String> = meta.keys().collect();
    let mut our_keys: Vec<&String> = ours.metadata().iter().map(|(k, _)| k).collect();
    our_keys.sort();
    assert_eq!(their_keys, our_keys);
    for (k, v) in ours.metadata() {
        let theirs = &meta[k];
        assert!(agrees(v, theirs), "key {k}: ours {v}, gguf-rs {theirs}");
    }

    assert_eq!(model.tensors().len(), ours.tensors().len());
    for (t, o) in model.tensors().iter().zip(ours.tensors()) {
        assert_eq!(t.name, o.name);
        assert_eq!(t.shape, o.dims);
        assert_eq!(t.kind, o.ty as u32);
        assert_eq!(t.offset, o.offset);
        // Two gguf-rs bugs: it assumes 256-element blocks for every type code >= 10 (wrong for
        // BF16, code 30) and sizes Q8_1 blocks with f32 scales (40 bytes, ggml's are 36).
        // Every other type must agree.
        if !matches!(o.ty, GgmlType::BF16 | GgmlType::Q8_1) {
            assert_eq!(t.size, o.size, "size of {} ({})", o.name, o.ty);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// String arrays borrowed from the file

/// Top-level string arrays are left in the file's bytes at open time: what
/// `get_str_array` borrows must be exactly what the eager decoding (`metadata`, `get`) gives,
/// whichever is asked first, and a bad string must still be refused when the file is opened.
#[test]
fn borrowed_string_arrays_equal_the_decoded_values() {
    let tokens: Vec<String> = (0..3000)
        .map(|i| match i % 4 {
            0 => format!("Ġt{i}"),
            1 => String::new(),
            2 => "é€😀".repeat(i % 7),
            _ => format!("<|{i}|>"),
        })
        .collect();
    let mut w = GgufWriter::new();
    w.add_kv("a.first", Value::from(vec!["x", "y z"]));
    w.add_kv("t.u32", Value::U32(7));
    w.add_kv("a.tokens", Value::Array(Array::String(tokens.clone())));
    w.add_kv("a.empty", Value::Array(Array::String(vec![])));
    let bytes = write_file(&w, &[]);
    for metadata_first in [false, true] {
        let f = GgufFile::from_bytes(bytes.clone(), "strings.gguf").unwrap();
        if metadata_first {
            assert_eq!(f.metadata(), w.metadata());
        }
        let borrowed = f.get_str_array("a.tokens").unwrap().unwrap();
        assert_eq!(borrowed, tokens);
        // The borrowed strings point into the file's bytes, not into copies.
        let range = f.bytes().as_ptr_range();
        assert!(borrowed
            .iter()
            .filter(|s| !s.is_empty())
            .all(|s| range.contains(&s.as_ptr())));
        assert_eq!(
            f.get("a.tokens"),
            Some(&Value::Array(Array::String(tokens.clone())))
        );
        assert_eq!(f.get_str_array("a.first").unwrap().unwrap(), ["x", "y z"]);
        assert_eq!(f.get_str_array("a.empty").unwrap().unwrap().len(), 0);
        assert!(f.get_str_array("t.u32").is_err());
        assert_eq!(f.get_str_array("missing").unwrap(), None);
        assert_eq!(f.n_kv(), 4);
        assert_eq!(f.metadata(), w.metadata());
    }

    // A string that is not UTF-8 inside the array is still found at open, with its index.
    let needle = b"<|2999|>";
    let at = bytes
        .windows(needle.len())
        .position(|win| win == needle)
        .unwrap();
    let mut bad = bytes.clone();
    bad[at + 2] = 0xff;
    let err = GgufFile::from_bytes(bad, "bad.gguf")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("element 2999") && err.contains("UTF-8"),
        "{err}"
    );
}

/// String arrays (a tokenizer's tokens and merges, borrowed from the file): the strings read
/// back are the ones written whatever the mix of lengths (empty, short, 128 bytes and more)
/// and characters (1- to 4-byte UTF-8), and a string that is not UTF-8 is named by its index
/// wherever it sits and whatever the defect.
#[test]
fn string_arrays_of_every_length_read_back_and_bad_ones_are_named() {
    let long_ascii = "x".repeat(200);
    let long_multi = "é🦀".repeat(40); // 240 bytes, 4-byte characters included
    let exactly_128 = "a".repeat(127) + "b";
    let strings: Vec<String> = [
        long_multi.as_str(),
        "",
        "a",
        "Ġthe",
        "é",
        "🦀",
        "",
        long_ascii.as_str(),
        long_multi.as_str(),
        "ok",
        exactly_128.as_str(),
        &"c".repeat(127),
        "ü",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let array = |items: &[Vec<u8>]| {
        let mut b = B::header(3, 0, 1);
        b.str("tokenizer.ggml.tokens")
            .u32(9)
            .u32(8)
            .u64(items.len() as u64);
        for s in items {
            b.bytes_str(s);
        }
        b.done()
    };
    let bytes: Vec<Vec<u8>> = strings.iter().map(|s| s.as_bytes().to_vec()).collect();
    let f = GgufFile::from_bytes(array(&bytes), "strings.gguf").expect("valid strings");
    let got = f
        .get_str_array("tokenizer.ggml.tokens")
        .unwrap()
        .expect("present");
    assert_eq!(got, strings.iter().map(String::as_str).collect::<Vec<_>>());

    // A bad byte in each string in turn: a lone continuation byte at the start, a truncated
    // 2-byte sequence at the end (the next prefix byte is ASCII), an invalid lead byte.
    for i in 0..bytes.len() {
        for bad in [&b"\x80"[..], b"\xc3", b"\xff"] {
            let mut items = bytes.clone();
            if bad == b"\x80" {
                items[i].splice(0..0, bad.iter().copied());
            } else {
                items[i].extend_from_slice(bad);
            }
            let m = reject(array(&items), "bad-string.gguf");
            assert!(
                m.contains("UTF-8") && m.contains(&format!("element {i}")),
                "string {i}, {bad:?}: {m}"
            );
        }
    }
}
