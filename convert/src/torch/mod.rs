//! PyTorch `pytorch_model.bin` state_dicts, read without Python and without running the pickle.
//!
//! Two container layouts exist:
//! - the zip format `torch.save` writes since PyTorch 1.6: `<archive>/data.pkl` (the pickled
//!   dict) and one stored entry `<archive>/data/<key>` per storage ([`zip`]);
//! - the legacy format: five pickles back to back — magic number, protocol version, system info,
//!   the dict, the list of storage keys — followed by each storage as an 8-byte element count
//!   and its raw bytes, in the order of that list.
//!
//! The dict is interpreted by the allow-list unpickler in [`pickle`]. Each tensor becomes a byte
//! range of the mmapped file: its storage's bytes from `storage_offset` on, checked against the
//! storage's length. Tensors that share a storage (a tied `lm_head.weight`) share bytes. Only
//! contiguous row-major views can be read zero-copy; any other stride pattern is refused.

pub mod pickle;
pub mod zip;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use pickle::{PickleError, StorageDtype, Value};
use zip::ZipError;

/// What is wrong with a `pytorch_model.bin`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TorchErrorKind {
    #[error("{0}")]
    Zip(#[from] ZipError),
    #[error("{part}: {source}")]
    Pickle {
        part: &'static str,
        #[source]
        source: PickleError,
    },
    #[error("{0}")]
    Format(String),
    #[error("tensor {name}: {problem}")]
    Tensor { name: String, problem: String },
}

/// A `pytorch_model.bin` that cannot be read: the file and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {kind}", path.display())]
pub struct TorchError {
    pub path: PathBuf,
    #[source]
    pub kind: TorchErrorKind,
}

fn format_err(s: impl Into<String>) -> TorchErrorKind {
    TorchErrorKind::Format(s.into())
}

/// One tensor of the state_dict: its bytes are `start..end` of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchTensor {
    pub name: String,
    pub dtype: StorageDtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// An mmapped `pytorch_model.bin` and its tensors, in the dict's order.
pub struct TorchFile {
    pub path: PathBuf,
    pub map: Mmap,
    pub tensors: Vec<TorchTensor>,
}

impl TorchFile {
    pub fn open(path: &Path) -> Result<TorchFile, TorchError> {
        let err = |kind: TorchErrorKind| TorchError {
            path: path.to_path_buf(),
            kind,
        };
        let file = File::open(path).map_err(|e| err(format_err(format!("cannot open: {e}"))))?;
        // SAFETY: a read-only private map; as for safetensors we assume nobody truncates or
        // rewrites the checkpoint while it is converted. Every offset into it is bounds-checked.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| err(format_err(format!("cannot mmap: {e}"))))?;
        let tensors = parse(&map).map_err(err)?;
        Ok(TorchFile {
            path: path.to_path_buf(),
            map,
            tensors,
        })
    }
}

/// A storage's bytes in the file.
#[derive(Debug, Clone, Copy)]
struct StorageBytes {
    dtype: StorageDtype,
    start: usize,
    len: usize,
}

/// Parse a whole `pytorch_model.bin` (zip or legacy layout) into tensor byte ranges of `b`.
pub fn parse(b: &[u8]) -> Result<Vec<TorchTensor>, TorchErrorKind> {
    if zip::is_zip(b) {
        parse_zip(b)
    } else if b.len() > 262 && &b[257..262] == b"ustar" {
        Err(format_err(
            "a tar archive (the PyTorch < 0.4 format) is not supported; re-save the model with torch.save or as safetensors",
        ))
    } else if b.first() == Some(&0x80) {
        parse_legacy(b)
    } else {
        Err(format_err(
            "neither a zip archive nor a pickle: not a PyTorch checkpoint (or truncated)",
        ))
    }
}

fn parse_zip(b: &[u8]) -> Result<Vec<TorchTensor>, TorchErrorKind> {
    let index = zip::read_index(b)?;
    let mut pkl: Vec<&str> = index
        .entries
        .keys()
        .map(String::as_str)
        .filter(|n| {
            n.strip_suffix("/data.pkl")
                .is_some_and(|p| !p.is_empty() && !p.contains('/'))
        })
        .collect();
    pkl.sort_unstable();
    let prefix = match pkl.as_slice() {
        [one] => one.trim_end_matches("data.pkl").to_string(),
        [] => {
            return Err(format_err(
                "zip archive has no <name>/data.pkl: not a torch.save file",
            ))
        }
        more => {
            return Err(format_err(format!(
                "zip archive has several data.pkl entries ({})",
                more.join(", ")
            )))
        }
    };
    if let Some(e) = index.entries.get(&format!("{prefix}byteorder")) {
        let order = &b[e.start..e.start + e.len];
        if order != b"little" {
            return Err(format_err(format!(
                "byteorder is {:?}; only little-endian checkpoints are supported",
                String::from_utf8_lossy(order)
            )));
        }
    }
    let e = index.entries[&format!("{prefix}data.pkl")];
    let (root, used) = pickle::unpickle(&b[e.start..e.start + e.len]).map_err(|source| {
        TorchErrorKind::Pickle {
            part: "data.pkl",
            source,
        }
    })?;
    if used != e.len {
        return Err(format_err("data.pkl has bytes after the pickle's STOP"));
    }
    let data_prefix = format!("{prefix}data/");
    let lookup = |key: &str, dtype: StorageDtype| -> Option<StorageBytes> {
        let e = index.entries.get(&format!("{data_prefix}{key}"))?;
        Some(StorageBytes {
            dtype,
            start: e.start,
            len: e.len,
        })
    };
    build(&root, |key, dtype| lookup(key, dtype))
}

/// The legacy magic number (`torch.serialization.MAGIC_NUMBER`).
const LEGACY_MAGIC: i128 = 0x1950a86a20f9469cfc6c;

fn parse_legacy(b: &[u8]) -> Result<Vec<TorchTensor>, TorchErrorKind> {
    let mut pos = 0usize;
    let mut next = |part: &'static str| -> Result<Value, TorchErrorKind> {
        let (v, used) = pickle::unpickle(&b[pos..])
            .map_err(|source| TorchErrorKind::Pickle { part, source })?;
        pos += used;
        Ok(v)
    };
    if next("magic number")? != Value::Int(LEGACY_MAGIC) {
        return Err(format_err(
            "a pickle that is not a torch.save checkpoint (wrong magic number)",
        ));
    }
    match next("protocol version")? {
        Value::Int(1001) => {}
        other => {
            return Err(format_err(format!(
                "unsupported legacy protocol version {other:?} (expected 1001)"
            )))
        }
    }
    let sys = next("system info")?;
    if let Value::Dict(d) = &sys {
        for (k, v) in &d.items {
            if matches!(k, Value::Str(s) if &**s == "little_endian") && *v != Value::Bool(true) {
                return Err(format_err(
                    "a big-endian checkpoint; only little-endian is supported",
                ));
            }
        }
    } else {
        return Err(format_err("legacy system info is not a dict"));
    }
    let root = next("state_dict")?;
    let keys = next("storage keys")?;
    let keys: Vec<String> = match &keys {
        Value::List(l) => l
            .items
            .iter()
            .map(|k| match k {
                Value::Str(s) => Ok(s.to_string()),
                other => Err(format_err(format!(
                    "storage key list holds a {}, not a string",
                    other.kind()
                ))),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(format_err(format!(
                "storage key list is a {}, not a list",
                other.kind()
            )))
        }
    };
    // The storages the dict refers to, with their element type (the raw records do not say).
    let mut dtypes: HashMap<String, StorageDtype> = HashMap::new();
    collect_storages(&root, &mut dtypes)?;
    let mut storages: HashMap<String, StorageBytes> = HashMap::new();
    for key in keys {
        let dtype = *dtypes
            .get(&key)
            .ok_or_else(|| format_err(format!("storage {key} is listed but no tensor uses it")))?;
        let numel = b
            .get(pos..pos + 8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])))
            .ok_or_else(|| format_err(format!("file ends before storage {key} (truncated)")))?;
        pos += 8;
        let len = numel
            .checked_mul(dtype.size() as u64)
            .and_then(|l| usize::try_from(l).ok())
            .filter(|&l| l <= b.len() - pos)
            .ok_or_else(|| {
                format_err(format!(
                    "storage {key} claims {numel} elements, more than the file holds (truncated?)"
                ))
            })?;
        if storages
            .insert(
                key.clone(),
                StorageBytes {
                    dtype,
                    start: pos,
                    len,
                },
            )
            .is_some()
        {
            return Err(format_err(format!("storage {key} is listed twice")));
        }
        pos += len;
    }
    if pos != b.len() {
        return Err(format_err(format!(
            "{} bytes after the last storage",
            b.len() - pos
        )));
    }
    build(&root, |key, _| storages.get(key).copied())
}

fn collect_storages(
    root: &Value,
    out: &mut HashMap<String, StorageDtype>,
) -> Result<(), TorchErrorKind> {
    let Value::Dict(d) = root else {
        return Ok(()); // `build` reports the problem.
    };
    for (_, v) in &d.items {
        if let Value::Tensor(t) = v {
            let s = &t.storage;
            if let Some(prev) = out.insert(s.key.clone(), s.dtype) {
                if prev != s.dtype {
                    return Err(format_err(format!(
                        "storage {} is used as both {prev:?} and {:?}",
                        s.key, s.dtype
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Turn the unpickled dict into tensors, resolving each storage key with `storage`.
fn build(
    root: &Value,
    storage: impl Fn(&str, StorageDtype) -> Option<StorageBytes>,
) -> Result<Vec<TorchTensor>, TorchErrorKind> {
    let Value::Dict(d) = root else {
        return Err(format_err(format!(
            "the pickle holds a {}, not a state_dict (a dict of tensors)",
            root.kind()
        )));
    };
    let mut seen: HashMap<&str, ()> = HashMap::new();
    let mut out = Vec::with_capacity(d.items.len());
    for (k, v) in &d.items {
        let Value::Str(name) = k else {
            return Err(format_err(format!(
                "state_dict has a {} key; expected tensor names",
                k.kind()
            )));
        };
        let terr = |problem: String| TorchErrorKind::Tensor {
            name: name.to_string(),
            problem,
        };
        if seen.insert(name, ()).is_some() {
            return Err(terr("appears twice in the state_dict".into()));
        }
        let t = match v {
            Value::Tensor(t) => t,
            Value::Dict(_) => {
                return Err(terr(
                    "is a nested dict, not a tensor (a training checkpoint? save the model's state_dict alone)"
                        .into(),
                ))
            }
            other => return Err(terr(format!("is a {}, not a tensor", other.kind()))),
        };
        let s = &t.storage;
        let bytes = storage(&s.key, s.dtype)
            .ok_or_else(|| terr(format!("its storage {} is missing from the file", s.key)))?;
        if bytes.dtype != s.dtype {
            return Err(terr(format!(
                "storage {} is {:?} here but {:?} elsewhere",
                s.key, s.dtype, bytes.dtype
            )));
        }
        let es = s.dtype.size() as u64;
        let storage_bytes = s
            .numel
            .checked_mul(es)
            .ok_or_else(|| terr("storage size overflows".into()))?;
        if storage_bytes > bytes.len as u64 {
            return Err(terr(format!(
                "storage {} should hold {} elements ({storage_bytes} bytes) but has {} bytes (truncated?)",
                s.key, s.numel, bytes.len
            )));
        }
        // Contiguous row-major: stride[i] = product of the sizes after i (any stride where the
        // size is 1). Anything else would need a gather.
        let mut expect: u64 = 1;
        let mut numel: u64 = 1;
        for (i, (&size, &stride)) in t.size.iter().zip(&t.stride).enumerate().rev() {
            if size != 1 && stride != expect && numel != 0 {
                return Err(terr(format!(
                    "is a non-contiguous view (sizes {:?}, strides {:?}, dimension {i}); save it with .contiguous() first",
                    t.size, t.stride
                )));
            }
            expect = expect
                .checked_mul(size)
                .ok_or_else(|| terr("size overflows".into()))?;
            numel = expect;
        }
        let end_el = t
            .offset
            .checked_add(numel)
            .ok_or_else(|| terr("offset overflows".into()))?;
        if end_el > s.numel {
            return Err(terr(format!(
                "needs elements {}..{end_el} of storage {}, which holds only {} (storage shorter than its tensor)",
                t.offset, s.key, s.numel
            )));
        }
        let start = bytes.start + (t.offset * es) as usize;
        let end = bytes.start + (end_el * es) as usize;
        let shape = t
            .size
            .iter()
            .map(|&x| usize::try_from(x).map_err(|_| terr("size overflows".into())))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(TorchTensor {
            name: name.to_string(),
            dtype: s.dtype,
            shape,
            start,
            end,
        });
    }
    Ok(out)
}
