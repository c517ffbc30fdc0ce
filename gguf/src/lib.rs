//! GGUF v2/v3: a validating reader that borrows an mmapped file, and a streaming writer that
//! lays files out exactly as llama.cpp's writers do.
//!
//! Layout (ggml `docs/gguf.md`): magic `GGUF`, u32 version, u64 tensor count, u64 KV count,
//! the KV pairs, one info record per tensor (name, n_dims, dims ne0 first, ggml type, offset
//! relative to the data section), zero padding to the alignment, then the tensor data, each
//! tensor zero-padded to the alignment. All integers little-endian.
//!
//! See docs/gguf.md for the design and the full list of checks the reader makes.

pub mod gpt2;
mod read;
mod types;
mod value;
mod write;

pub use read::GgufFile;
pub use types::{file_type_name, GgmlType};
pub use value::{Array, Value, ValueType};
pub use write::GgufWriter;

/// `GGUF` as the first four bytes of the file.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The version this crate writes.
pub const VERSION: u32 = 3;
/// Data alignment when `general.alignment` is absent (`GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// llama.cpp stores tensor names in a `char[GGML_MAX_NAME]` with a terminating NUL, so a name
/// must be shorter than this many bytes.
pub const MAX_NAME_LEN: usize = 64;
/// ggml tensors have at most four dimensions (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Key holding a custom alignment.
pub const KEY_ALIGNMENT: &str = "general.alignment";

/// Round `n` up to a multiple of `align` (a power of two); `None` on overflow.
pub fn align_up(n: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    Some(n.checked_add(align - 1)? & !(align - 1))
}

/// One tensor's info record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as stored, ne0 (the contiguous one) first: the numpy shape reversed.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset relative to the start of the data section.
    pub offset: u64,
    /// Bytes of tensor data (without padding).
    pub size: u64,
}

impl TensorInfo {
    /// Total element count. Validated not to overflow when the info was read or added.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Number of rows: the product of all dimensions but the first.
    pub fn rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }

    /// Elements per row (ne0).
    pub fn cols(&self) -> u64 {
        self.dims.first().copied().unwrap_or(0)
    }

    /// Bytes per row in this tensor's type (0 if the info is inconsistent).
    pub fn row_bytes(&self) -> u64 {
        self.ty.row_bytes(self.cols()).unwrap_or(0)
    }

    /// The numpy-order shape (outermost first).
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// Size in bytes of a tensor of `ty` with dims `dims` (ne0 first), after checking the dims the
/// way the reader does. The error text names what is wrong, without a file name.
pub(crate) fn tensor_size(dims: &[u64], ty: GgmlType) -> Result<u64, String> {
    if dims.is_empty() || dims.len() > MAX_DIMS {
        return Err(format!(
            "has {} dimensions, expected 1 to {MAX_DIMS}",
            dims.len()
        ));
    }
    let mut n: u64 = 1;
    for (i, &d) in dims.iter().enumerate() {
        if d == 0 {
            return Err(format!("dimension {i} is 0"));
        }
        // ggml counts elements in int64_t.
        n = n
            .checked_mul(d)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| format!("element count of dims {dims:?} overflows int64"))?;
    }
    let ne0 = dims[0];
    let row = ty.row_bytes(ne0).ok_or_else(|| {
        format!(
            "type {ty}: row length {ne0} is not a multiple of the block size {}",
            ty.block_size()
        )
    })?;
    let rows = n / ne0;
    rows.checked_mul(row)
        .filter(|&s| s <= i64::MAX as u64)
        .ok_or_else(|| format!("byte size of dims {dims:?} in type {ty} overflows"))
}

/// Everything that can go wrong reading or writing GGUF. Every message names the file and the
/// place (byte offset, key or tensor) that is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The I/O error is part of the message rather than a `source()`: `{:#}` would otherwise
    /// print it twice ("cannot open: No such file…: No such file…").
    #[error("{file}: {action}: {error}")]
    Io {
        file: String,
        action: &'static str,
        error: std::io::Error,
    },
    #[error("{file}: not a GGUF file: starts with {found}, expected \"GGUF\"")]
    BadMagic { file: String, found: String },
    #[error("{file}: {reason}")]
    UnsupportedVersion {
        file: String,
        version: u32,
        reason: String,
    },
    #[error("{file}: truncated: {what} at byte {offset} needs {need} bytes, only {have} remain")]
    Truncated {
        file: String,
        offset: u64,
        what: String,
        need: u64,
        have: u64,
    },
    #[error("{file}: byte {offset}: {what}")]
    Malformed {
        file: String,
        offset: u64,
        what: String,
    },
    #[error("{file}: tensor '{tensor}': {what}")]
    Tensor {
        file: String,
        tensor: String,
        what: String,
    },
    #[error("{file}: metadata key '{key}': {what}")]
    Metadata {
        file: String,
        key: String,
        what: String,
    },
    #[error("GGUF writer: {0}")]
    Writer(String),
}

impl GgufError {
    /// Prefix the description with where in the file structure the problem is ("key #3
    /// 'general.name'"). Only called on the error path.
    pub(crate) fn within(mut self, ctx: &str) -> Self {
        match &mut self {
            GgufError::Truncated { what, .. } | GgufError::Malformed { what, .. } => {
                *what = format!("{ctx}: {what}");
            }
            _ => {}
        }
        self
    }
}
