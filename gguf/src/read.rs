//! The GGUF reader: map the file, parse and validate the whole header up front, then hand out
//! tensor data as slices of the map.
//!
//! The file is untrusted. Every length and count is checked against the bytes that remain
//! before anything is allocated or sliced, so a truncated or hostile file yields an error that
//! names the byte offset and the field, never a panic or a multi-gigabyte allocation.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::value::{Array, Value, ValueType};
use crate::{
    align_up, tensor_size, GgmlType, GgufError, TensorInfo, DEFAULT_ALIGNMENT, KEY_ALIGNMENT,
    MAGIC, MAX_DIMS, MAX_NAME_LEN,
};

/// Longest string accepted anywhere in the header. Tokens and keys are tiny, but some
/// converters embed a whole tokenizer.json or chat template as one string, so this is far
/// above 1 MiB; the remaining-bytes check is what bounds allocations by the file size.
const MAX_STRING_LEN: u64 = 64 << 20;
/// Most elements accepted in one array (GPT-2's vocabulary has 50,257).
const MAX_ARRAY_LEN: u64 = 16 << 20;
/// Deepest nesting of arrays in arrays. The format allows any depth; the limit keeps the
/// recursive decoder's stack bounded on a file made of nested one-element arrays.
const MAX_ARRAY_DEPTH: u32 = 8;
/// Smallest possible tensor info: 8-byte name length, n_dims, one dim, type, offset.
const MIN_TENSOR_INFO: u64 = 8 + 4 + 8 + 4 + 8;
/// Smallest possible KV: 8-byte key length, 1-byte key, type, 1-byte value.
const MIN_KV: u64 = 8 + 1 + 4 + 1;

/// An opened, fully validated GGUF file.
///
/// Top-level arrays of strings (a tokenizer's 50,257 tokens and 50,000 merges) are validated
/// when the file is opened but not copied: [`GgufFile::get_str_array`] borrows them from the
/// file's bytes, and they become [`Value`]s only if [`GgufFile::get`] or
/// [`GgufFile::metadata`] asks for them.
pub struct GgufFile {
    data: Backing,
    path: PathBuf,
    /// `path` as text for error messages.
    name: String,
    version: u32,
    alignment: u64,
    data_offset: u64,
    kvs: Vec<(String, Slot)>,
    /// Every KV as a [`Value`], built on the first call that needs the string arrays as values.
    metadata: OnceLock<Vec<(String, Value)>>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_kv", &self.kvs.len())
            .field("n_tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

impl GgufFile {
    /// Map `path` and parse and validate its header.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let name = path.display().to_string();
        let io = |action, error| GgufError::Io {
            file: name.clone(),
            action,
            error,
        };
        // Only a regular file can be mapped. Checked before opening because opening a named
        // pipe blocks until a writer appears, and a directory opens fine but fails to map
        // with an unhelpful "No such device".
        let meta = std::fs::metadata(path).map_err(|e| io("cannot open", e))?;
        if !meta.is_file() {
            let what = if meta.is_dir() {
                "is a directory, not a GGUF file"
            } else {
                "is not a regular file (a pipe or device cannot be memory-mapped)"
            };
            return Err(io(
                "cannot open",
                std::io::Error::new(std::io::ErrorKind::InvalidInput, what),
            ));
        }
        let file = File::open(path).map_err(|e| io("cannot open", e))?;
        let len = file.metadata().map_err(|e| io("cannot stat", e))?.len();
        // Mapping an empty file fails on some platforms; an empty buffer gives the same
        // "truncated" error as any other too-short file.
        let data = if len == 0 {
            Backing::Owned(AlignedBuf::from_slice(&[]))
        } else {
            // SAFETY: the map is read-only and lives as long as `GgufFile`. The one hazard is
            // another process truncating or rewriting the file while it is mapped, which no
            // mmap-based loader can rule out; ggpt writes model files via a temporary file
            // and rename, so it never modifies a file in place.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io("cannot mmap", e))?;
            Backing::Mapped(map, file)
        };
        Self::parse(data, path.to_path_buf(), name)
    }

    /// Parse an in-memory file with the same validation as [`GgufFile::open`]. The bytes are
    /// copied into a 64-byte-aligned buffer so tensor data is as aligned as from a map.
    pub fn from_bytes(bytes: Vec<u8>, name: &str) -> Result<GgufFile, GgufError> {
        let data = Backing::Owned(AlignedBuf::from_slice(&bytes));
        drop(bytes);
        Self::parse(data, PathBuf::from(name), name.to_string())
    }

    fn parse(data: Backing, path: PathBuf, name: String) -> Result<GgufFile, GgufError> {
        let header = parse_header(data.bytes(), &name)?;
        Ok(GgufFile {
            data,
            path,
            name,
            version: header.version,
            alignment: header.alignment,
            data_offset: header.data_offset,
            kvs: header.kvs,
            metadata: OnceLock::new(),
            key_index: header.key_index,
            tensors: header.tensors,
            tensor_index: header.tensor_index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    pub fn file_len(&self) -> u64 {
        self.data.bytes().len() as u64
    }

    /// All KV pairs in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        self.metadata.get_or_init(|| {
            self.kvs
                .iter()
                .map(|(k, slot)| {
                    let v = match slot {
                        Slot::Value(v) => v.clone(),
                        Slot::Strings(run) => Value::Array(Array::String(
                            self.strings(run).map(str::to_string).collect(),
                        )),
                    };
                    (k.clone(), v)
                })
                .collect()
        })
    }

    /// Number of metadata KV pairs.
    pub fn n_kv(&self) -> usize {
        self.kvs.len()
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        let &i = self.key_index.get(key)?;
        match &self.kvs[i].1 {
            Slot::Value(v) => Some(v),
            Slot::Strings(_) => Some(&self.metadata()[i].1),
        }
    }

    /// Whether the metadata has `key`.
    pub fn contains_key(&self, key: &str) -> bool {
        self.key_index.contains_key(key)
    }

    /// The element count of the array at `key`; `None` if the key is missing or not an
    /// array. Does not decode a string array.
    pub fn array_len(&self, key: &str) -> Option<usize> {
        let &i = self.key_index.get(key)?;
        match &self.kvs[i].1 {
            Slot::Strings(run) => Some(run.count),
            Slot::Value(v) => v.as_array().map(|a| a.len()),
        }
    }

    /// The strings of a run validated at open time, borrowed from the file's bytes.
    fn strings<'a>(&'a self, run: &StrRun) -> impl ExactSizeIterator<Item = &'a str> + 'a {
        run_strs(self.data.bytes(), run)
    }

    fn type_error(&self, key: &str, expected: &str, found: &Value) -> GgufError {
        GgufError::Metadata {
            file: self.name.clone(),
            key: key.to_string(),
            what: format!("expected {expected}, found {}", found.type_label()),
        }
    }

    /// An integer of any width or signedness holding a non-negative value. llama.cpp's
    /// converter writes u32 for keys the spec documents as u64, so readers must take both.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v.as_u64() {
            Some(n) => Ok(Some(n)),
            None if v.as_i64().is_some() => Err(GgufError::Metadata {
                file: self.name.clone(),
                key: key.to_string(),
                what: format!("expected a non-negative integer, found {v}"),
            }),
            None => Err(self.type_error(key, "an unsigned integer", v)),
        }
    }

    /// f32, or f64 narrowed to f32.
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f32()
                .map(Some)
                .ok_or_else(|| self.type_error(key, "f32", v)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.type_error(key, "bool", v)),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.type_error(key, "str", v)),
        }
    }

    /// An array of strings, borrowed from the file (no string is copied).
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>, GgufError> {
        let Some(&i) = self.key_index.get(key) else {
            return Ok(None);
        };
        match &self.kvs[i].1 {
            Slot::Strings(run) => Ok(Some(self.strings(run).collect())),
            Slot::Value(Value::Array(Array::String(v))) => {
                Ok(Some(v.iter().map(String::as_str).collect()))
            }
            Slot::Value(v) => Err(self.type_error(key, "arr[str]", v)),
        }
    }

    /// An array of i32, or of any integer type whose every element fits in i32.
    pub fn get_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>, GgufError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        fn conv<T: Copy>(v: &[T]) -> Option<Vec<i32>>
        where
            i32: TryFrom<T>,
        {
            v.iter().map(|&x| i32::try_from(x).ok()).collect()
        }
        let out = match v {
            Value::Array(Array::I32(a)) => Some(a.clone()),
            Value::Array(Array::I8(a)) => conv(a),
            Value::Array(Array::U8(a)) => conv(a),
            Value::Array(Array::I16(a)) => conv(a),
            Value::Array(Array::U16(a)) => conv(a),
            Value::Array(Array::U32(a)) => conv(a),
            Value::Array(Array::I64(a)) => conv(a),
            Value::Array(Array::U64(a)) => conv(a),
            _ => return Err(self.type_error(key, "arr[i32]", v)),
        };
        out.map(Some).ok_or_else(|| GgufError::Metadata {
            file: self.name.clone(),
            key: key.to_string(),
            what: "an element does not fit in i32".to_string(),
        })
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's bytes, borrowed from the map (exactly `t.size` bytes). Infos from
    /// [`GgufFile::tensors`] were bounds-checked at open time; an info that does not fit this
    /// file (e.g. one taken from another file) yields an empty slice rather than a panic.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let range = || -> Option<std::ops::Range<usize>> {
            let start = self.data_offset.checked_add(t.offset)?;
            let end = start.checked_add(t.size)?;
            Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
        };
        range()
            .and_then(|r| self.data.bytes().get(r))
            .unwrap_or(&[])
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.data.bytes()
    }

    /// Whether the bytes are a memory mapping of the file at [`GgufFile::path`] (from
    /// [`GgufFile::open`]), starting at offset 0, rather than a copy in memory.
    pub fn is_mapped(&self) -> bool {
        matches!(self.data, Backing::Mapped(..))
    }

    /// The open file the bytes are mapped from (`None` for an in-memory copy).
    pub fn mapped_file(&self) -> Option<&File> {
        match &self.data {
            Backing::Mapped(_, f) => Some(f),
            Backing::Owned(_) => None,
        }
    }

    /// Check one tensor's values with `check`, which knows the block formats (ggpt-quant's
    /// `tensor::validate_row_data` checks them the way ggml's `ggml_validate_row_data` does: no
    /// NaN or infinite fp16 scale in any quantized block, no NaN or infinite F32/F16/BF16
    /// value). The header checks at open time cannot see these: such a file is well formed,
    /// but every activation that touches the bad block becomes NaN. The error names the file
    /// and the tensor.
    pub fn validate_tensor<E: std::fmt::Display>(
        &self,
        t: &TensorInfo,
        check: impl Fn(GgmlType, &[u8]) -> Result<(), E>,
    ) -> Result<(), GgufError> {
        let data = self.tensor_data(t);
        let err = |what: String| GgufError::Tensor {
            file: self.name.clone(),
            tensor: t.name.clone(),
            what,
        };
        if data.len() as u64 != t.size {
            return Err(err(format!(
                "data is {} bytes, expected {}",
                data.len(),
                t.size
            )));
        }
        check(t.ty, data).map_err(|e| err(format!("invalid values: {e}")))
    }

    /// [`GgufFile::validate_tensor`] for every tensor `select` accepts, in parallel. This reads
    /// (pages in) those tensors' data once, so it costs about what the first forward pass
    /// would; the error reported is the first bad tensor in file order.
    pub fn validate_tensor_data<E: std::fmt::Display>(
        &self,
        select: impl Fn(&TensorInfo) -> bool + Sync,
        check: impl Fn(GgmlType, &[u8]) -> Result<(), E> + Sync,
    ) -> Result<(), GgufError> {
        use rayon::prelude::*;
        let errors: Vec<(usize, GgufError)> = self
            .tensors
            .par_iter()
            .enumerate()
            .filter(|(_, t)| select(t))
            .filter_map(|(i, t)| self.validate_tensor(t, &check).err().map(|e| (i, e)))
            .collect();
        match errors.into_iter().min_by_key(|(i, _)| *i) {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Storage

enum Backing {
    /// The mapping and the descriptor it was made from (kept open so that readers of the
    /// same bytes, such as a streaming reader, use the very file that is mapped).
    Mapped(memmap2::Mmap, File),
    Owned(AlignedBuf),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(m, _) => m,
            Backing::Owned(b) => b.bytes(),
        }
    }
}

/// 64 bytes: a cache line, and more than any block format or SIMD load needs.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Chunk([u8; 64]);

/// A byte buffer whose start is 64-byte aligned, like a page-aligned map.
struct AlignedBuf {
    chunks: Vec<Chunk>,
    len: usize,
}

impl AlignedBuf {
    fn from_slice(bytes: &[u8]) -> Self {
        let mut chunks = vec![Chunk([0; 64]); bytes.len().div_ceil(64)];
        for (c, b) in chunks.iter_mut().zip(bytes.chunks(64)) {
            c.0[..b.len()].copy_from_slice(b);
        }
        AlignedBuf {
            chunks,
            len: bytes.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `Chunk` is `repr(C)` around `[u8; 64]`, so the vector's storage is
        // `chunks.len() * 64` initialised bytes with no padding, and `len <= chunks.len() * 64`
        // by construction. The slice borrows `self`, so the storage outlives it.
        unsafe { std::slice::from_raw_parts(self.chunks.as_ptr().cast::<u8>(), self.len) }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// The strings of `run` in `bytes` (the buffer the run was checked in).
fn run_strs<'a>(bytes: &'a [u8], run: &StrRun) -> impl ExactSizeIterator<Item = &'a str> + 'a {
    let mut pos = run.start;
    (0..run.count).map(move |_| {
        // The run was walked and checked when the file was opened (every length in
        // bounds, every string valid UTF-8) and the bytes cannot change since, so these
        // reads succeed; the fallbacks only keep this free of panics.
        let mut len = [0u8; 8];
        len.copy_from_slice(bytes.get(pos..pos + 8).unwrap_or(&[0; 8]));
        let len = u64::from_le_bytes(len) as usize;
        let end = (pos + 8).saturating_add(len);
        let s = bytes.get(pos + 8..end).unwrap_or(&[]);
        pos = end;
        std::str::from_utf8(s).unwrap_or_default()
    })
}

/// A metadata value as held by an open file.
enum Slot {
    Value(Value),
    /// A top-level array of strings, left in the file's bytes.
    Strings(StrRun),
}

/// `count` strings (u64 length, UTF-8 bytes) back to back from byte `start` of the file,
/// checked when the file was opened.
struct StrRun {
    start: usize,
    count: usize,
}

struct Header {
    version: u32,
    alignment: u64,
    data_offset: u64,
    kvs: Vec<(String, Slot)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// A bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn truncated(&self, what: &str, need: u64) -> GgufError {
        GgufError::Truncated {
            file: self.file.to_string(),
            offset: self.pos as u64,
            what: what.to_string(),
            need,
            have: self.remaining(),
        }
    }

    fn malformed(&self, at: usize, what: String) -> GgufError {
        GgufError::Malformed {
            file: self.file.to_string(),
            offset: at as u64,
            what,
        }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(what, n));
        }
        // n <= remaining <= usize::MAX, so the cast and the slice are in bounds.
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn bool(&mut self, what: &str) -> Result<bool, GgufError> {
        let at = self.pos;
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.malformed(at, format!("{what}: bool byte is {b}, must be 0 or 1"))),
        }
    }

    /// A u64 length then that many bytes of UTF-8 (invalid UTF-8 is an error, not replaced).
    fn string(&mut self, what: &str, max_len: u64) -> Result<String, GgufError> {
        self.str_slice(what, max_len).map(str::to_string)
    }

    /// [`Cursor::string`], borrowed from the buffer.
    fn str_slice(&mut self, what: &str, max_len: u64) -> Result<&'a str, GgufError> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > max_len {
            return Err(self.malformed(
                at,
                format!("{what}: string length {len} exceeds the limit of {max_len} bytes"),
            ));
        }
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s),
            Err(e) => Err(self.malformed(
                at + 8 + e.valid_up_to(),
                format!("{what}: string is not valid UTF-8"),
            )),
        }
    }

    fn value_type(&mut self, what: &str) -> Result<ValueType, GgufError> {
        let at = self.pos;
        let code = self.u32(what)?;
        ValueType::from_u32(code)
            .ok_or_else(|| self.malformed(at, format!("{what}: unknown value type code {code}")))
    }

    fn value(&mut self, ty: ValueType, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.u8("u8 value")?),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array("i8 value")?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array("u16 value")?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array("i16 value")?)),
            ValueType::U32 => Value::U32(self.u32("u32 value")?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array("i32 value")?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array("f32 value")?)),
            ValueType::Bool => Value::Bool(self.bool("bool value")?),
            ValueType::String => Value::String(self.string("string value", MAX_STRING_LEN)?),
            ValueType::Array => Value::Array(self.array_value(depth)?),
            ValueType::U64 => Value::U64(self.u64("u64 value")?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array("i64 value")?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array("f64 value")?)),
        })
    }

    /// Fixed-size elements: check the whole run once, then decode from the slice.
    fn fixed<T, const N: usize>(
        &mut self,
        count: u64,
        what: &str,
        f: fn([u8; N]) -> T,
    ) -> Result<Vec<T>, GgufError> {
        let bytes = self.take(count * N as u64, what)?;
        Ok(bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect())
    }

    /// An array's element type and count, checked against the limits and the bytes left.
    fn array_header(&mut self, depth: u32) -> Result<(ValueType, u64), GgufError> {
        let at = self.pos;
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.malformed(
                at,
                format!("arrays nested deeper than {MAX_ARRAY_DEPTH} levels"),
            ));
        }
        let elem = self.value_type("array element type")?;
        let count = self.u64("array length")?;
        if count > MAX_ARRAY_LEN {
            return Err(self.malformed(
                at,
                format!(
                    "array of {elem} has {count} elements, more than the limit of {MAX_ARRAY_LEN}"
                ),
            ));
        }
        // count <= 16 Mi and min size <= 12, so this cannot overflow.
        let min_bytes = count * elem.min_encoded_size();
        if min_bytes > self.remaining() {
            return Err(self.truncated(&format!("array of {count} {elem}"), min_bytes));
        }
        Ok((elem, count))
    }

    /// The strings of an array whose header was read: each checked (length, UTF-8) and
    /// skipped, none copied.
    fn str_run(&mut self, count: u64) -> Result<StrRun, GgufError> {
        let start = self.pos;
        for i in 0..count {
            self.str_slice("string array element", MAX_STRING_LEN)
                .map_err(|e| e.within(&format!("element {i}")))?;
        }
        Ok(StrRun {
            start,
            count: count as usize,
        })
    }

    /// A metadata value: a top-level array of strings stays in the file ([`Slot::Strings`]).
    fn slot(&mut self, ty: ValueType) -> Result<Slot, GgufError> {
        if ty == ValueType::Array {
            let mark = self.pos;
            let (elem, count) = self.array_header(0)?;
            if elem == ValueType::String {
                return self.str_run(count).map(Slot::Strings);
            }
            self.pos = mark;
        }
        self.value(ty, 0).map(Slot::Value)
    }

    /// Element type, count, elements. `depth` is the nesting level of this array.
    fn array_value(&mut self, depth: u32) -> Result<Array, GgufError> {
        let (elem, count) = self.array_header(depth)?;
        let n = count as usize;
        Ok(match elem {
            ValueType::U8 => Array::U8(self.take(count, "u8 array")?.to_vec()),
            ValueType::I8 => Array::I8(self.fixed(count, "i8 array", i8::from_le_bytes)?),
            ValueType::U16 => Array::U16(self.fixed(count, "u16 array", u16::from_le_bytes)?),
            ValueType::I16 => Array::I16(self.fixed(count, "i16 array", i16::from_le_bytes)?),
            ValueType::U32 => Array::U32(self.fixed(count, "u32 array", u32::from_le_bytes)?),
            ValueType::I32 => Array::I32(self.fixed(count, "i32 array", i32::from_le_bytes)?),
            ValueType::F32 => Array::F32(self.fixed(count, "f32 array", f32::from_le_bytes)?),
            ValueType::U64 => Array::U64(self.fixed(count, "u64 array", u64::from_le_bytes)?),
            ValueType::I64 => Array::I64(self.fixed(count, "i64 array", i64::from_le_bytes)?),
            ValueType::F64 => Array::F64(self.fixed(count, "f64 array", f64::from_le_bytes)?),
            ValueType::Bool => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.bool("bool array element")?);
                }
                Array::Bool(v)
            }
            ValueType::String => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(
                        self.string("string array element", MAX_STRING_LEN)
                            .map_err(|e| e.within(&format!("element {i}")))?,
                    );
                }
                Array::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(
                        self.array_value(depth + 1)
                            .map_err(|e| e.within(&format!("element {i}")))?,
                    );
                }
                Array::Array(v)
            }
        })
    }
}

fn parse_header(buf: &[u8], file: &str) -> Result<Header, GgufError> {
    let mut c = Cursor { buf, pos: 0, file };

    let magic: [u8; 4] = c.array("magic")?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic {
            file: file.to_string(),
            found: format!("{:?}", String::from_utf8_lossy(&magic)),
        });
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        _ => {
            let reason = if version == 1 {
                "GGUF version 1 is not supported (it predates 64-bit counts); \
                 re-convert the model with a current converter"
                    .to_string()
            } else if (1..=3).contains(&version.swap_bytes()) {
                format!(
                    "this is a big-endian GGUF (version {} byte-swapped); only little-endian files are supported",
                    version.swap_bytes()
                )
            } else {
                format!("GGUF version {version} is not supported (only versions 2 and 3)")
            };
            return Err(GgufError::UnsupportedVersion {
                file: file.to_string(),
                version,
                reason,
            });
        }
    }

    let at = c.pos;
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata KV count")?;
    // Each entry occupies at least a fixed number of bytes, so a count the rest of the file
    // cannot hold is rejected before anything is sized by it.
    let room = c.remaining();
    if !matches!(n_tensors.checked_mul(MIN_TENSOR_INFO), Some(b) if b <= room) {
        return Err(c.malformed(
            at,
            format!("tensor count {n_tensors} cannot fit in the {room} bytes that follow"),
        ));
    }
    if !matches!(n_kv.checked_mul(MIN_KV), Some(b) if b <= room) {
        return Err(c.malformed(
            at + 8,
            format!("metadata KV count {n_kv} cannot fit in the {room} bytes that follow"),
        ));
    }

    let mut kvs = Vec::with_capacity(n_kv as usize);
    let mut key_index = HashMap::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let at = c.pos;
        let key = c
            .string("key", MAX_STRING_LEN)
            .map_err(|e| e.within(&format!("metadata KV #{i}")))?;
        if key.is_empty() {
            return Err(c.malformed(at, format!("metadata KV #{i}: empty key")));
        }
        if key_index.contains_key(&key) {
            return Err(c.malformed(at, format!("metadata KV #{i}: duplicate key '{key}'")));
        }
        let value = c
            .value_type("value type")
            .and_then(|ty| c.slot(ty))
            .map_err(|e| e.within(&format!("metadata KV #{i} '{key}'")))?;
        key_index.insert(key.clone(), kvs.len());
        kvs.push((key, value));
    }

    let alignment = match key_index.get(KEY_ALIGNMENT) {
        None => DEFAULT_ALIGNMENT,
        Some(&i) => {
            let v = match &kvs[i].1 {
                Slot::Value(v) => v.clone(),
                Slot::Strings(run) => Value::Array(Array::String(
                    run_strs(buf, run).map(str::to_string).collect(),
                )),
            };
            match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => {
                    return Err(GgufError::Metadata {
                        file: file.to_string(),
                        key: KEY_ALIGNMENT.to_string(),
                        what: format!(
                            "alignment must be a power-of-two integer, found {} {v}",
                            v.type_label()
                        ),
                    })
                }
            }
        }
    };

    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let info =
            read_tensor_info(&mut c, file).map_err(|e| e.within(&format!("tensor info #{i}")))?;
        if tensor_index.contains_key(&info.name) {
            return Err(GgufError::Tensor {
                file: file.to_string(),
                tensor: info.name,
                what: format!("duplicate name (info #{i})"),
            });
        }
        tensor_index.insert(info.name.clone(), tensors.len());
        tensors.push(info);
    }

    let header_end = c.pos as u64;
    let data_offset = align_up(header_end, alignment).ok_or_else(|| {
        c.malformed(
            c.pos,
            format!("alignment {alignment} overflows the data offset"),
        )
    })?;
    check_tensor_layout(&tensors, file, alignment, data_offset, buf.len() as u64)?;

    Ok(Header {
        version,
        alignment,
        data_offset,
        kvs,
        key_index,
        tensors,
        tensor_index,
    })
}

fn read_tensor_info(c: &mut Cursor<'_>, file: &str) -> Result<TensorInfo, GgufError> {
    let at = c.pos;
    let name = c.string("tensor name", MAX_STRING_LEN)?;
    if name.len() >= MAX_NAME_LEN {
        return Err(c.malformed(
            at,
            format!(
                "tensor name '{name}' is {} bytes; llama.cpp allows at most {}",
                name.len(),
                MAX_NAME_LEN - 1
            ),
        ));
    }
    let tensor_err = |what: String| GgufError::Tensor {
        file: file.to_string(),
        tensor: name.clone(),
        what,
    };
    let n_dims = c.u32("n_dims")?;
    if n_dims == 0 || n_dims as usize > MAX_DIMS {
        return Err(tensor_err(format!(
            "has {n_dims} dimensions, expected 1 to {MAX_DIMS}"
        )));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(c.u64("dimension")?);
    }
    let ty_at = c.pos;
    let code = c.u32("ggml type")?;
    let ty = GgmlType::from_u32(code).ok_or_else(|| {
        tensor_err(format!(
            "unknown or unsupported ggml type code {code} at byte {ty_at}"
        ))
    })?;
    let offset = c.u64("data offset")?;
    let size = tensor_size(&dims, ty).map_err(tensor_err)?;
    Ok(TensorInfo {
        name,
        dims,
        ty,
        offset,
        size,
    })
}

/// Every tensor aligned, inside the file, and disjoint from every other. llama.cpp's own
/// layout (contiguous, in info order) passes, and so does any other non-overlapping one.
fn check_tensor_layout(
    tensors: &[TensorInfo],
    file: &str,
    alignment: u64,
    data_offset: u64,
    file_len: u64,
) -> Result<(), GgufError> {
    let err = |t: &TensorInfo, what: String| GgufError::Tensor {
        file: file.to_string(),
        tensor: t.name.clone(),
        what,
    };
    for t in tensors {
        if t.offset % alignment != 0 {
            return Err(err(
                t,
                format!(
                    "data offset {} is not a multiple of the alignment {alignment}",
                    t.offset
                ),
            ));
        }
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.size));
        if !matches!(end, Some(e) if e <= file_len) {
            return Err(err(
                t,
                format!(
                    "data [{}, +{}) in the data section at byte {data_offset} runs past the end of the file ({file_len} bytes)",
                    t.offset, t.size
                ),
            ));
        }
    }
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| t.offset);
    for w in order.windows(2) {
        let (a, b) = (w[0], w[1]);
        // In bounds was checked above, so the sum cannot overflow.
        if a.offset + a.size > b.offset {
            return Err(err(
                b,
                format!(
                    "data at offset {} overlaps tensor '{}' (offset {}, {} bytes)",
                    b.offset, a.name, a.offset, a.size
                ),
            ));
        }
    }
    Ok(())
}
