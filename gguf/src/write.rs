//! The streaming GGUF writer.
//!
//! The header is fully determined by the KV pairs and the tensor shapes and types, so it is
//! built first and written in one go; tensor bytes then follow one at a time, so a converter
//! never holds more than one quantized tensor in memory. The layout matches llama.cpp's
//! writers byte for byte: KVs and tensor infos in insertion order, tensor `i`'s offset is the
//! sum of the earlier sizes each padded to the alignment, the data section starts at the
//! aligned end of the header, and every tensor (the last one too) is zero-padded.

use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::value::{put_str, put_u32, put_u64, Value};
use crate::{
    align_up, tensor_size, GgmlType, GgufError, TensorInfo, DEFAULT_ALIGNMENT, KEY_ALIGNMENT,
    MAGIC, MAX_NAME_LEN, VERSION,
};

/// Builds a GGUF v3 header, then checks and pads tensor data as the caller streams it.
#[derive(Debug)]
pub struct GgufWriter {
    kvs: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    /// Index of the tensor `write_tensor_data` expects next; reset by `write_header`.
    /// Enforcing the order catches a caller that swaps two same-sized tensors, which the
    /// size check alone would miss.
    next: AtomicUsize,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter {
            kvs: Vec::new(),
            tensors: Vec::new(),
            alignment: DEFAULT_ALIGNMENT,
            next: AtomicUsize::new(0),
        }
    }

    /// Append a KV pair. Setting a key that already exists removes the old entry and appends
    /// the new one at the end — what llama.cpp's `gguf_set_val_*` do, so requantizing a file
    /// (copy all KVs, then set `general.file_type`) yields the same key order as llama-quantize.
    ///
    /// `general.alignment` with a power-of-two integer value changes the alignment (and is
    /// stored as u32, the only type llama.cpp accepts for it). Any other value for that key
    /// makes [`GgufWriter::write_header`] fail.
    pub fn add_kv(&mut self, key: &str, value: Value) {
        self.kvs.retain(|(k, _)| k != key);
        let value = if key == KEY_ALIGNMENT {
            match value
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .map(u32::try_from)
            {
                Some(Ok(a)) => {
                    self.set_alignment(a.into());
                    Value::U32(a)
                }
                _ => value,
            }
        } else {
            value
        };
        self.kvs.push((key.to_string(), value));
    }

    fn set_alignment(&mut self, alignment: u64) {
        self.alignment = alignment;
        let mut offset = 0;
        for t in &mut self.tensors {
            t.offset = offset;
            offset += padded(t.size, alignment);
        }
    }

    /// Append a tensor info. Checks what the reader checks: name shorter than 64 bytes and
    /// unique, 1–4 non-zero dims (ne0 first) whose element count fits in int64, ne0 a multiple
    /// of the type's block size.
    pub fn add_tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType) -> Result<(), GgufError> {
        let err = |what: String| GgufError::Writer(format!("tensor '{name}': {what}"));
        if name.len() >= MAX_NAME_LEN {
            return Err(err(format!(
                "name is {} bytes; llama.cpp allows at most {}",
                name.len(),
                MAX_NAME_LEN - 1
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(err("duplicate tensor name".to_string()));
        }
        let size = tensor_size(dims, ty).map_err(err)?;
        let offset = match self.tensors.last() {
            None => 0,
            Some(t) => t.offset + padded(t.size, self.alignment),
        };
        self.tensors.push(TensorInfo {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty,
            offset,
            size,
        });
        Ok(())
    }

    /// Tensor infos with their final offsets, in write order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// KV pairs in write order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.kvs
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Everything before the data section, zero-padded to the alignment.
    pub fn header_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 << 16);
        out.extend_from_slice(&MAGIC);
        put_u32(&mut out, VERSION);
        put_u64(&mut out, self.tensors.len() as u64);
        put_u64(&mut out, self.kvs.len() as u64);
        for (key, value) in &self.kvs {
            put_str(&mut out, key);
            value.encode(&mut out);
        }
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            put_u32(&mut out, t.dims.len() as u32);
            for &d in &t.dims {
                put_u64(&mut out, d);
            }
            put_u32(&mut out, t.ty as u32);
            put_u64(&mut out, t.offset);
        }
        out.resize(padded(out.len() as u64, self.alignment) as usize, 0);
        out
    }

    /// Absolute offset of the data section in the file that will be written.
    pub fn data_offset(&self) -> u64 {
        self.header_bytes().len() as u64
    }

    /// Size of the complete file: padded header plus every tensor padded.
    pub fn total_size(&self) -> u64 {
        let data: u64 = self
            .tensors
            .iter()
            .map(|t| padded(t.size, self.alignment))
            .sum();
        self.data_offset() + data
    }

    /// Write the header. Fails (writing nothing) if `general.alignment` was set to something
    /// other than a power-of-two u32.
    pub fn write_header<W: Write>(&self, w: &mut W) -> io::Result<()> {
        if let Some((_, v)) = self.kvs.iter().find(|(k, _)| k == KEY_ALIGNMENT) {
            if !matches!(v, Value::U32(a) if a.is_power_of_two()) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "GGUF writer: {KEY_ALIGNMENT} must be a power-of-two u32, got {} {v}",
                        v.type_label()
                    ),
                ));
            }
        }
        w.write_all(&self.header_bytes())?;
        self.next.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Write tensor `index`'s bytes and its zero padding. Tensors must come in order, right
    /// after [`GgufWriter::write_header`], each with exactly its size in bytes.
    pub fn write_tensor_data<W: Write>(
        &self,
        w: &mut W,
        index: usize,
        bytes: &[u8],
    ) -> io::Result<()> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        let t = self.tensors.get(index).ok_or_else(|| {
            invalid(format!(
                "GGUF writer: tensor index {index} out of range ({} tensors)",
                self.tensors.len()
            ))
        })?;
        let expected = self.next.load(Ordering::Relaxed);
        if index != expected {
            return Err(invalid(format!(
                "GGUF writer: tensor '{}' (#{index}) written out of order; expected #{expected}",
                t.name
            )));
        }
        if bytes.len() as u64 != t.size {
            return Err(invalid(format!(
                "GGUF writer: tensor '{}' ({} {:?}) needs {} bytes, got {}",
                t.name,
                t.ty,
                t.dims,
                t.size,
                bytes.len()
            )));
        }
        w.write_all(bytes)?;
        let pad = (padded(t.size, self.alignment) - t.size) as usize;
        w.write_all(&ZEROS[..pad.min(ZEROS.len())])?;
        // Alignments above ZEROS.len() are legal but unusual; pad the rest in chunks.
        let mut rest = pad.saturating_sub(ZEROS.len());
        while rest > 0 {
            let n = rest.min(ZEROS.len());
            w.write_all(&ZEROS[..n])?;
            rest -= n;
        }
        self.next.store(index + 1, Ordering::Relaxed);
        Ok(())
    }
}

static ZEROS: [u8; 4096] = [0; 4096];

/// `n` rounded up to `alignment`. Sizes are validated to fit in int64 and alignments are at
/// most 2^31, so this cannot overflow.
fn padded(n: u64, alignment: u64) -> u64 {
    align_up(n, alignment).unwrap_or(u64::MAX)
}
