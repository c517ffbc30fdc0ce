//! Hugging Face safetensors checkpoints, single-file (`model.safetensors`) or sharded
//! (`model-0000K-of-0000N.safetensors` + `model.safetensors.index.json`).
//!
//! Each shard is mmapped and its header parsed and validated by the `safetensors` crate (offsets
//! contiguous, in bounds, consistent with shape × dtype, covering the file exactly) before any
//! tensor byte is touched. Tensor data is borrowed from the map; once a tensor has been converted
//! the caller hands its pages back to the kernel with [`Checkpoint::release`], so converting a
//! model larger than RAM keeps a small resident set.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16, slice::HalfFloatSliceExt};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value as Json;

use crate::hf::InputError;

type Result<T> = std::result::Result<T, InputError>;

/// Element types a GPT-2 checkpoint may store its weights in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SrcDtype {
    F32,
    F16,
    BF16,
}

impl SrcDtype {
    pub fn size(self) -> usize {
        match self {
            SrcDtype::F32 => 4,
            SrcDtype::F16 | SrcDtype::BF16 => 2,
        }
    }

    pub fn from_safetensors(d: Dtype) -> Option<SrcDtype> {
        match d {
            Dtype::F32 => Some(SrcDtype::F32),
            Dtype::F16 => Some(SrcDtype::F16),
            Dtype::BF16 => Some(SrcDtype::BF16),
            _ => None,
        }
    }
}

/// Decode little-endian source elements to f32 (exact for all three types).
/// `bytes.len()` must be `out.len() * dtype.size()`.
pub fn decode_f32(dtype: SrcDtype, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(
        bytes.len(),
        out.len() * dtype.size(),
        "decode_f32: length mismatch"
    );
    match dtype {
        SrcDtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        SrcDtype::F16 => {
            // Copy into aligned halves (the map gives no alignment guarantee), then use half's
            // vectorised conversion.
            let mut tmp = vec![f16::ZERO; 4096.min(out.len())];
            for (o, b) in out.chunks_mut(4096).zip(bytes.chunks(8192)) {
                let t = &mut tmp[..o.len()];
                for (h, c) in t.iter_mut().zip(b.chunks_exact(2)) {
                    *h = f16::from_bits(u16::from_le_bytes([c[0], c[1]]));
                }
                t.convert_to_f32_slice(o);
            }
        }
        SrcDtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
    }
}

/// One mmapped checkpoint file (`.safetensors` or `pytorch_model*.bin`) with its validated
/// tensor table.
struct Shard {
    path: PathBuf,
    map: Mmap,
    tensors: HashMap<String, Entry>,
}

/// Opens one checkpoint file of a given format.
type ShardOpener = fn(&Path) -> Result<Shard>;

/// Where one tensor's bytes are in its file.
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

impl Shard {
    fn open(path: &Path) -> Result<Shard> {
        let file =
            File::open(path).map_err(|e| InputError::new(path, format!("cannot open: {e}")))?;
        // SAFETY: the map is read-only and private to this process. Like every mmap-based loader
        // we assume the checkpoint is not truncated or rewritten by someone else while we convert
        // it; all offsets into it are validated below before use.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| InputError::new(path, format!("cannot mmap: {e}")))?;
        let (header_len, meta) = SafeTensors::read_metadata(&map)
            .map_err(|e| InputError::new(path, format!("invalid safetensors file: {e}")))?;
        let data_start = 8 + header_len;
        let mut tensors = HashMap::new();
        for name in meta.offset_keys() {
            if let Some(info) = meta.info(&name) {
                let (s, e) = info.data_offsets;
                tensors.insert(
                    name,
                    Entry {
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: data_start + s,
                        end: data_start + e,
                    },
                );
            }
        }
        Ok(Shard {
            path: path.to_path_buf(),
            map,
            tensors,
        })
    }

    /// A PyTorch `pytorch_model*.bin` (see [`crate::torch`]).
    fn open_torch(path: &Path) -> Result<Shard> {
        let f = crate::torch::TorchFile::open(path)
            .map_err(|e| InputError::new(&e.path, e.kind.to_string()))?;
        let tensors = f
            .tensors
            .into_iter()
            .map(|t| {
                (
                    t.name,
                    Entry {
                        dtype: t.dtype.to_safetensors(),
                        shape: t.shape,
                        start: t.start,
                        end: t.end,
                    },
                )
            })
            .collect();
        Ok(Shard {
            path: f.path,
            map: f.map,
            tensors,
        })
    }

    /// Byte range of a tensor inside the map (already validated when the shard was opened).
    fn range(&self, name: &str) -> Option<(usize, usize)> {
        let e = self.tensors.get(name)?;
        Some((e.start, e.end))
    }
}

/// A tensor as stored in the checkpoint, borrowed from the map.
#[derive(Debug, Clone, Copy)]
pub struct SourceTensor<'a> {
    /// Name as written in the file (possibly with `transformer.`).
    pub name: &'a str,
    pub file: &'a Path,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl SourceTensor<'_> {
    /// The element type, or an error naming file, tensor and dtype for anything but F32/F16/BF16.
    pub fn src_dtype(&self) -> Result<SrcDtype> {
        SrcDtype::from_safetensors(self.dtype).ok_or_else(|| {
            InputError::new(
                self.file,
                format!(
                    "tensor {} has dtype {:?}; only F32, F16 and BF16 weights can be converted",
                    self.name, self.dtype
                ),
            )
        })
    }

    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// All shards of a checkpoint and the tensor → shard index.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// tensor name → shard index; sorted for deterministic iteration.
    index: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Open a checkpoint directory: `model.safetensors.index.json` + its shards if present, else
    /// `model.safetensors`, else the same two for PyTorch (`pytorch_model.bin.index.json` +
    /// shards, `pytorch_model.bin`). Safetensors wins when both formats are present.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let candidates: [(&str, &str, ShardOpener); 2] = [
            (
                "model.safetensors.index.json",
                "model.safetensors",
                Shard::open,
            ),
            (
                "pytorch_model.bin.index.json",
                "pytorch_model.bin",
                Shard::open_torch,
            ),
        ];
        for (index_name, single_name, open) in candidates {
            let index_path = dir.join(index_name);
            let single = dir.join(single_name);
            let shards = if index_path.is_file() {
                open_index(dir, &index_path, open)?
            } else if single.is_file() {
                vec![open(&single)?]
            } else {
                continue;
            };
            return Checkpoint::from_shards(dir, shards);
        }
        Err(InputError::new(
            dir,
            "no model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json",
        ))
    }

    fn from_shards(dir: &Path, shards: Vec<Shard>) -> Result<Checkpoint> {
        let mut index: BTreeMap<String, usize> = BTreeMap::new();
        for (s, shard) in shards.iter().enumerate() {
            for name in shard.tensors.keys() {
                if let Some(&prev) = index.get(name) {
                    return Err(InputError::new(
                        &shard.path,
                        format!("tensor {name} is also in {}", shards[prev].path.display()),
                    ));
                }
                index.insert(name.clone(), s);
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            shards,
            index,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Shard files, in order.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Tensor names as stored, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn get(&self, name: &str) -> Option<SourceTensor<'_>> {
        let (key, &s) = self.index.get_key_value(name)?;
        let shard = &self.shards[s];
        let info = shard.tensors.get(name)?;
        let (start, end) = (info.start, info.end);
        Some(SourceTensor {
            name: key,
            file: &shard.path,
            dtype: info.dtype,
            shape: &info.shape,
            data: shard.map.get(start..end)?,
        })
    }

    /// Tell the kernel we are done with a tensor's pages, so they leave our resident set.
    pub fn release(&self, name: &str) {
        self.release_range(name, 0, usize::MAX);
    }

    /// Like [`Checkpoint::release`] for bytes `start..end` of the tensor's data (clamped to it),
    /// so a large tensor streamed in chunks never has more than a chunk resident.
    pub fn release_range(&self, name: &str, start: usize, end: usize) {
        let Some(&s) = self.index.get(name) else {
            return;
        };
        let shard = &self.shards[s];
        let Some((t0, t1)) = shard.range(name) else {
            return;
        };
        let a = t0.saturating_add(start).min(t1);
        let b = t0.saturating_add(end).min(t1);
        if b > a {
            // SAFETY: the map is a read-only mapping of an unmodified file, and no slice into this
            // range is used after this call (the pipeline releases bytes only once it has
            // converted them). Even if one were, MADV_DONTNEED on a clean file-backed page only
            // drops it: the next access faults the same bytes back in from the file. memmap2
            // widens the range to page boundaries, which at worst drops a neighbour's page that
            // is then faulted in again.
            let r = unsafe {
                shard
                    .map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a)
            };
            // Purely an optimisation: failure (e.g. an unsupported platform) changes nothing.
            let _ = r;
        }
    }
}

/// Read a sharded checkpoint's index (`weight_map`: tensor name → shard file next to it) and
/// open every shard it lists with `open`.
fn open_index(
    dir: &Path,
    index_path: &Path,
    open: fn(&Path) -> Result<Shard>,
) -> Result<Vec<Shard>> {
    let index_name = index_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = std::fs::read_to_string(index_path)
        .map_err(|e| InputError::new(index_path, format!("cannot read: {e}")))?;
    let json: Json = serde_json::from_str(&text)
        .map_err(|e| InputError::new(index_path, format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(Json::as_object)
        .ok_or_else(|| InputError::new(index_path, "no \"weight_map\" object"))?;
    let mut files: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            InputError::new(
                index_path,
                format!("weight_map[{name:?}] is not a file name"),
            )
        })?;
        // Shards live next to the index: refuse paths that would reach elsewhere.
        if file.is_empty() || file.contains(['/', '\\']) || file == "." || file == ".." {
            return Err(InputError::new(
                index_path,
                format!("weight_map[{name:?}] = {file:?} is not a plain file name"),
            ));
        }
        files.insert(file, 0);
    }
    if files.is_empty() {
        return Err(InputError::new(index_path, "weight_map is empty"));
    }
    let mut shards = Vec::with_capacity(files.len());
    for (i, (file, slot)) in files.iter_mut().enumerate() {
        let path = dir.join(file);
        if let Some(why) = crate::atomic::not_a_regular_file(&path) {
            return Err(InputError::new(
                &path,
                format!("{why} (listed in {index_name})"),
            ));
        }
        shards.push(open(&path)?);
        *slot = i;
    }
    for (name, file) in map {
        let s = file
            .as_str()
            .and_then(|f| files.get(f))
            .copied()
            .unwrap_or_default();
        if !shards[s].tensors.contains_key(name) {
            return Err(InputError::new(
                &shards[s].path,
                format!("tensor {name} is listed in {index_name} for this file but is not in it"),
            ));
        }
    }
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_all_dtypes() {
        let vals = [1.0f32, -2.5, 0.0, 65504.0, 3.0e-5];
        let mut out = [0f32; 5];
        let b32: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        decode_f32(SrcDtype::F32, &b32, &mut out);
        assert_eq!(out, vals);
        let b16: Vec<u8> = vals
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        decode_f32(SrcDtype::F16, &b16, &mut out);
        for (o, v) in out.iter().zip(vals) {
            assert_eq!(*o, f16::from_f32(v).to_f32());
        }
        let bb: Vec<u8> = vals
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        decode_f32(SrcDtype::BF16, &bb, &mut out);
        for (o, v) in out.iter().zip(vals) {
            assert_eq!(*o, bf16::from_f32(v).to_f32());
        }
        // Longer than one conversion chunk.
        let long: Vec<f32> = (0..10_000).map(|i| i as f32 * 0.25).collect();
        let b: Vec<u8> = long
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        let mut o = vec![0f32; long.len()];
        decode_f32(SrcDtype::F16, &b, &mut o);
        assert_eq!(o[9_999], f16::from_f32(9_999.0 * 0.25).to_f32());
        assert_eq!(o[4_097], f16::from_f32(4_097.0 * 0.25).to_f32());
        for (i, v) in o.iter().enumerate() {
            assert_eq!(*v, f16::from_f32(i as f32 * 0.25).to_f32(), "element {i}");
        }
    }
}
