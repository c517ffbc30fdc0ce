//! GPT-2's tensors in a GGUF file: names, expected shapes and allowed types (llama.cpp's
//! `LLM_ARCH_GPT2` table), checked once at load.
//!
//! Weights are not copied: a [`Matrix`] holds a [`QMatrix`] over the mapped bytes, checked
//! (type, shape, size, alignment) once at load, and hands it to every matmul as it is. The 1-D
//! norms and biases are [`Vector`]s: plain f32 slices of the mapping when the file stores them
//! as F32 (llama.cpp's converters do), widened once into an owned buffer when it stores F16 or
//! BF16. Their values are all checked for NaN and infinity at load (1.2 MiB for GPT-2 Medium).
//!
//! The fp16 scales of a quantized matrix are not checked before a matmul reads them: a NaN or
//! infinite scale makes every output it contributes to non-finite (NaN and infinity survive
//! every multiply and add of the kernels, and an infinite scale times a zero sum is NaN), so
//! the caller's check of the outputs catches it, and [`Matrix::check`] then names the tensor
//! and the block. A check before use would read every matrix twice on the first token (the
//! check, then the matmul: 12.9 % of a one-token `ggpt run`'s CPU samples on GPT-2 Medium
//! Q4_K_M, docs/errors.md).
//! An embedding lookup checks the rows it reads ([`Matrix::check_row`]).

use std::sync::{Arc, OnceLock};

use ggpt_gguf::{GgufFile, TensorInfo};
use ggpt_quant::matmul::QMatrix;
use ggpt_quant::tensor::{validate_row_data, TensorError};
use ggpt_quant::GgmlType;
use rayon::prelude::*;

use super::{Hparams, LoadError, RunError};

/// Bytes of a matrix one task checks when its scales are validated in parallel.
const CHECK_CHUNK_BYTES: usize = 256 << 10;

pub use ggpt_gguf::gpt2::{
    block_tensor, BLOCK_TENSORS, GLOBAL_TENSORS, OPTIONAL_TENSORS, OUTPUT, POSITION_EMBD,
    TOKEN_EMBD,
};

/// Unexpected tensors named in an error before the rest are only counted.
const NAMED_EXTRA: usize = 6;

/// Check that `file` holds exactly the tensors of a GPT-2 with `n_layer` blocks: every one of
/// them (the first missing is named), and nothing else — a tensor the architecture does not
/// account for (a block beyond `gpt2.block_count`, an unknown name) is refused by name, as
/// llama.cpp refuses a file with the wrong number of tensors.
pub fn check_tensor_set(file: &GgufFile, n_layer: u64) -> Result<(), LoadError> {
    let path = || file.path().display().to_string();
    let mut expected: std::collections::HashSet<String> = GLOBAL_TENSORS
        .iter()
        .chain(&OPTIONAL_TENSORS)
        .map(|s| s.to_string())
        .collect();
    let mut required: Vec<String> = GLOBAL_TENSORS.iter().map(|s| s.to_string()).collect();
    for i in 0..n_layer {
        for t in BLOCK_TENSORS {
            let name = block_tensor(i, t);
            required.push(name.clone());
            expected.insert(name);
        }
    }
    if let Some(name) = required.into_iter().find(|n| file.tensor(n).is_none()) {
        return Err(LoadError::MissingTensor { file: path(), name });
    }
    let extra: Vec<&str> = file
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| !expected.contains(*n))
        .collect();
    if extra.is_empty() {
        return Ok(());
    }
    let mut names = extra
        .iter()
        .take(NAMED_EXTRA)
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ");
    if extra.len() > NAMED_EXTRA {
        names.push_str(&format!(" and {} more", extra.len() - NAMED_EXTRA));
    }
    Err(LoadError::UnexpectedTensors {
        file: path(),
        n_layer,
        count: extra.len(),
        names,
    })
}

const VECTOR_TYPES: &str = "F32, F16, BF16";

/// A 2-D weight in the mapped file: `rows` rows of `cols` values (ne0 = cols, contiguous).
/// Only the loader makes one, after [`QMatrix::new`] accepted the tensor's bytes.
#[derive(Clone)]
pub struct Matrix {
    /// The tensor's entry in the file (name, offset, size).
    pub info: TensorInfo,
    /// The file whose bytes `m` borrows; holding it keeps them alive.
    file: Arc<GgufFile>,
    /// The weight over `file`'s bytes. `'static` only inside this struct: it is handed out
    /// re-borrowed for the lifetime of `&self` (see [`Matrix::view`]).
    m: QMatrix<'static>,
    /// The outcome of checking the quantized scales, once [`Matrix::check`] was called.
    checked: OnceLock<Result<(), RunError>>,
}

impl std::fmt::Debug for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matrix")
            .field("name", &self.info.name)
            .field("m", &self.m)
            .finish_non_exhaustive()
    }
}

impl Matrix {
    /// Check `info`'s bytes in `file` as a `rows × cols` weight the matmul can use.
    fn new(
        file: &Arc<GgufFile>,
        info: &TensorInfo,
        rows: usize,
        cols: usize,
    ) -> Result<Matrix, ggpt_quant::matmul::MatrixError> {
        let data: &[u8] = file.tensor_data(info);
        // SAFETY: `data` lies in `file`'s mapping (or its owned, 64-byte aligned buffer),
        // which is created once when the file is opened and is neither moved, resized nor
        // unmapped until the `GgufFile` is dropped. The `Arc` stored beside it keeps the
        // `GgufFile` alive for as long as this `Matrix` (and every clone) exists, and the
        // `'static` borrow never leaves the struct un-shortened (`view` ties it to `&self`).
        let data: &'static [u8] = unsafe { &*std::ptr::from_ref::<[u8]>(data) };
        let m = QMatrix::new(info.ty, rows, cols, data)?;
        Ok(Matrix {
            info: info.clone(),
            file: Arc::clone(file),
            m,
            checked: OnceLock::new(),
        })
    }

    /// The weight for a matmul, as checked at load (type, shape, size, alignment), without
    /// checking its values (see the module comment).
    pub fn view(&self) -> &QMatrix<'_> {
        &self.m
    }

    /// The element type.
    pub fn ty(&self) -> GgmlType {
        self.m.ty()
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.m.rows()
    }

    /// Values per row (input features).
    pub fn cols(&self) -> usize {
        self.m.cols()
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.m.row_bytes()
    }

    /// Check the fp16 scales of every block (ggml's row-data validation), in parallel, the
    /// first time it is called; later calls return the same outcome. The error names the
    /// file, the tensor and the first bad block. Float matrices are not read here: their
    /// values are checked by the caller's check of the outputs (reading them all would read
    /// the whole file).
    pub fn check(&self) -> Result<(), RunError> {
        if self.ty().block_size() == 1 {
            return Ok(());
        }
        self.checked
            .get_or_init(|| {
                let data = self.m.data();
                let rows_per_chunk = (CHECK_CHUNK_BYTES / self.row_bytes()).max(1);
                let chunk = rows_per_chunk * self.row_bytes();
                let first_bad = data
                    .par_chunks(chunk.max(1))
                    .enumerate()
                    .filter_map(|(i, bytes)| {
                        validate_row_data(self.ty(), bytes).err().map(|e| (i, e))
                    })
                    .min_by_key(|(i, _)| *i);
                match first_bad {
                    Some((i, e)) => Err(self.invalid(e, i * chunk)),
                    None => Ok(()),
                }
            })
            .clone()
    }

    /// [`Matrix::view`] of the matrix's bytes held elsewhere (`data`: a copy of its bytes,
    /// e.g. a streaming buffer), its length and alignment checked.
    pub fn view_in<'a>(&self, data: &'a [u8]) -> Result<QMatrix<'a>, RunError> {
        QMatrix::new(self.ty(), self.rows(), self.cols(), data).map_err(|e| {
            RunError::InvalidWeights {
                file: self.file.path().display().to_string(),
                tensor: self.info.name.clone(),
                what: e.to_string(),
            }
        })
    }

    /// Check the scales of rows `r` only (an embedding lookup), unless the whole matrix was
    /// already checked.
    pub fn check_row(&self, r: usize) -> Result<(), RunError> {
        if self.ty().block_size() == 1 {
            return Ok(());
        }
        if let Some(done) = self.checked.get() {
            return done.clone();
        }
        match self.row(r) {
            Some(bytes) => validate_row_data(self.ty(), bytes)
                .map_err(|e| self.invalid(e, r * self.row_bytes())),
            None => Ok(()),
        }
    }

    /// The error for `e`, found in the bytes starting at `offset` of the tensor: block
    /// indices are made relative to the whole tensor.
    fn invalid(&self, e: TensorError, offset: usize) -> RunError {
        let e = match e {
            TensorError::NonFinite {
                ty,
                what,
                field,
                index,
            } => TensorError::NonFinite {
                ty,
                what,
                field,
                index: index + offset / self.ty().type_size(),
            },
            other => other,
        };
        RunError::InvalidWeights {
            file: self.file.path().display().to_string(),
            tensor: self.info.name.clone(),
            what: e.to_string(),
        }
    }

    /// The bytes of row `r` (`None` if `r` is out of range).
    pub fn row(&self, r: usize) -> Option<&[u8]> {
        let start = r.checked_mul(self.row_bytes())?;
        self.m
            .data()
            .get(start..start.checked_add(self.row_bytes())?)
    }
}

/// A 1-D f32 tensor (a norm or a bias), read as `&[f32]` through `Deref`. Only the loader
/// makes one, after checking every value is finite.
#[derive(Clone)]
pub struct Vector {
    values: VectorValues,
}

#[derive(Clone)]
enum VectorValues {
    /// The tensor's bytes in the file, F32 and aligned. `'static` only inside the struct: it
    /// is handed out re-borrowed for the lifetime of `&self` (see `Deref`).
    Mapped {
        /// The file whose bytes `values` borrows; holding it keeps them alive.
        _file: Arc<GgufFile>,
        values: &'static [f32],
    },
    /// Widened from F16 or BF16 (or an F32 tensor at an unaligned offset).
    Owned(Vec<f32>),
}

impl std::ops::Deref for Vector {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &self.values {
            VectorValues::Mapped { values, .. } => values,
            VectorValues::Owned(v) => v,
        }
    }
}

impl std::fmt::Debug for Vector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match self.values {
            VectorValues::Mapped { .. } => "mapped",
            VectorValues::Owned(_) => "owned",
        };
        f.debug_struct("Vector")
            .field("len", &self.len())
            .field("values", &how)
            .finish()
    }
}

impl Vector {
    /// Whether the values are read in place from the mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.values, VectorValues::Mapped { .. })
    }

    /// Copy mapped values into memory of their own (owned ones stay as they are).
    fn own(&mut self) {
        if let VectorValues::Mapped { values, .. } = self.values {
            self.values = VectorValues::Owned(values.to_vec());
        }
    }
}

/// LayerNorm parameters (C each).
#[derive(Clone, Debug)]
pub struct Norm {
    pub w: Vector,
    pub b: Vector,
}

/// One transformer block. Shapes in llm.c letters (C channels, F = n_ff), weights as
/// (rows = out, cols = in).
#[derive(Clone, Debug)]
pub struct Layer {
    /// ln_1
    pub attn_norm: Norm,
    /// (3C, C): rows 0..C produce Q, C..2C K, 2C..3C V.
    pub attn_qkv: Matrix,
    /// (3C)
    pub attn_qkv_b: Vector,
    /// (C, C)
    pub attn_out: Matrix,
    /// (C)
    pub attn_out_b: Vector,
    /// ln_2
    pub ffn_norm: Norm,
    /// (F, C)
    pub ffn_up: Matrix,
    /// (F)
    pub ffn_up_b: Vector,
    /// (C, F)
    pub ffn_down: Matrix,
    /// (C)
    pub ffn_down_b: Vector,
}

impl Layer {
    /// The block's norms and biases, in the order the block uses them.
    pub fn vectors(&self) -> [&Vector; 8] {
        let (a, f) = (&self.attn_norm, &self.ffn_norm);
        [
            &a.w,
            &a.b,
            &self.attn_qkv_b,
            &self.attn_out_b,
            &f.w,
            &f.b,
            &self.ffn_up_b,
            &self.ffn_down_b,
        ]
    }

    /// [`Layer::vectors`], mutable.
    fn vectors_mut(&mut self) -> [&mut Vector; 8] {
        let (a, f) = (&mut self.attn_norm, &mut self.ffn_norm);
        [
            &mut a.w,
            &mut a.b,
            &mut self.attn_qkv_b,
            &mut self.attn_out_b,
            &mut f.w,
            &mut f.b,
            &mut self.ffn_up_b,
            &mut self.ffn_down_b,
        ]
    }
}

/// Every GPT-2 tensor.
#[derive(Clone, Debug)]
pub struct Weights {
    /// (V, C): embedding rows, and the output projection when `output` is absent.
    pub token_embd: Matrix,
    /// (n_ctx_train, C)
    pub pos_embd: Matrix,
    pub layers: Vec<Layer>,
    /// ln_f
    pub output_norm: Norm,
    /// (V, C), only in files that store the tied projection twice.
    pub output: Option<Matrix>,
}

impl Weights {
    /// The matrix that turns final hidden states into logits.
    pub fn lm_head(&self) -> &Matrix {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }

    /// Every norm and bias, in forward-pass order.
    pub fn vectors(&self) -> impl Iterator<Item = &Vector> {
        let out = &self.output_norm;
        self.layers
            .iter()
            .flat_map(Layer::vectors)
            .chain([&out.w, &out.b])
    }

    /// Copy the norms and biases that are read in place from the mapping into memory of their
    /// own ([`Weights::mapped_vector_bytes`] of them). A model whose weights are streamed needs this: its
    /// mapped pages are reclaimed between tokens, and a fault on one of these small tensors
    /// reads the kernel's whole read-around window (8 MiB on a disk with that read-ahead)
    /// into the page cache, every token.
    pub fn own_vectors(&mut self) {
        let out = &mut self.output_norm;
        self.layers
            .iter_mut()
            .flat_map(Layer::vectors_mut)
            .chain([&mut out.w, &mut out.b])
            .for_each(Vector::own);
    }

    /// Bytes of the norms and biases read in place from the mapping (what
    /// [`Weights::own_vectors`] copies).
    pub fn mapped_vector_bytes(&self) -> u64 {
        self.vectors()
            .filter(|v| v.is_mapped())
            .map(|v| std::mem::size_of_val::<[f32]>(v) as u64)
            .sum()
    }

    /// Every 2-D weight, in file order.
    pub fn matrices(&self) -> Vec<&Matrix> {
        let mut all: Vec<&Matrix> = [&self.token_embd, &self.pos_embd]
            .into_iter()
            .chain(&self.output)
            .chain(
                self.layers
                    .iter()
                    .flat_map(|l| [&l.attn_qkv, &l.attn_out, &l.ffn_up, &l.ffn_down]),
            )
            .collect();
        all.sort_by_key(|m| m.info.offset);
        all
    }

    /// Check and collect every tensor (shape and type), once [`check_tensor_set`] has passed.
    pub(crate) fn load(file: &Arc<GgufFile>, hp: &Hparams) -> Result<Weights, LoadError> {
        let ld = Loader {
            file,
            path: file.path().display().to_string(),
        };
        let c = hp.n_embd;

        let (v, t, f) = (hp.n_vocab, hp.n_ctx, hp.n_ff);
        let token_embd = ld.matrix(TOKEN_EMBD, c, v)?;
        let pos_embd = ld.matrix(POSITION_EMBD, c, t)?;
        let output_norm = ld.norm("output_norm", c)?;
        let output = match file.tensor(OUTPUT) {
            Some(_) => Some(ld.matrix(OUTPUT, c, v)?),
            None => None,
        };
        let layers = (0..hp.n_layer)
            .map(|i| {
                let n = |s: &str| block_tensor(i, s);
                Ok(Layer {
                    attn_norm: ld.norm(&n("attn_norm"), c)?,
                    attn_qkv: ld.matrix(&n("attn_qkv.weight"), c, 3 * c)?,
                    attn_qkv_b: ld.vector(&n("attn_qkv.bias"), 3 * c)?,
                    attn_out: ld.matrix(&n("attn_output.weight"), c, c)?,
                    attn_out_b: ld.vector(&n("attn_output.bias"), c)?,
                    ffn_norm: ld.norm(&n("ffn_norm"), c)?,
                    ffn_up: ld.matrix(&n("ffn_up.weight"), c, f)?,
                    ffn_up_b: ld.vector(&n("ffn_up.bias"), f)?,
                    ffn_down: ld.matrix(&n("ffn_down.weight"), f, c)?,
                    ffn_down_b: ld.vector(&n("ffn_down.bias"), c)?,
                })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        Ok(Weights {
            token_embd,
            pos_embd,
            layers,
            output_norm,
            output,
        })
    }
}

struct Loader<'f> {
    file: &'f Arc<GgufFile>,
    path: String,
}

impl Loader<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo, LoadError> {
        self.file
            .tensor(name)
            .ok_or_else(|| LoadError::MissingTensor {
                file: self.path.clone(),
                name: name.to_string(),
            })
    }

    fn shaped(&self, name: &str, expected: &[u64]) -> Result<&TensorInfo, LoadError> {
        let info = self.info(name)?;
        if info.dims != expected {
            return Err(LoadError::WrongShape {
                file: self.path.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: info.dims.clone(),
            });
        }
        Ok(info)
    }

    /// A 2-D weight with dims [ne0 = cols, ne1 = rows].
    fn matrix(&self, name: &str, cols: u64, rows: u64) -> Result<Matrix, LoadError> {
        let info = self.shaped(name, &[cols, rows])?;
        if !ggpt_quant::types::is_supported_weight(info.ty) {
            return Err(LoadError::UnsupportedType {
                file: self.path.clone(),
                name: name.to_string(),
                ty: info.ty,
                supported: ggpt_quant::format::weight_type_list(),
            });
        }
        // The matmul kernels view the bytes as blocks: type, size and alignment are checked
        // here, once, so a bad file is an error at load rather than a panic mid-inference.
        Matrix::new(self.file, info, rows as usize, cols as usize).map_err(|e| {
            LoadError::BadValues {
                file: self.path.clone(),
                name: name.to_string(),
                what: e.to_string(),
            }
        })
    }

    /// A 1-D tensor of `n` values as f32, borrowed from the file when it is F32 (see
    /// [`Vector`]). Non-finite values are refused: they would turn every activation downstream
    /// into NaN.
    fn vector(&self, name: &str, n: u64) -> Result<Vector, LoadError> {
        let info = self.shaped(name, &[n])?;
        if !matches!(info.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            return Err(LoadError::UnsupportedType {
                file: self.path.clone(),
                name: name.to_string(),
                ty: info.ty,
                supported: VECTOR_TYPES,
            });
        }
        let bad = |what: String| LoadError::BadValues {
            file: self.path.clone(),
            name: name.to_string(),
            what,
        };
        let bytes = self.file.tensor_data(info);
        let mapped = match info.ty {
            GgmlType::F32 => ggpt_quant::tensor::cast_blocks::<f32>(bytes),
            _ => None,
        };
        let values = match mapped {
            Some(v) => {
                // SAFETY: `v` lies in the file's mapping (or its owned, aligned buffer), which
                // is neither moved, resized nor unmapped until the `GgufFile` is dropped; the
                // `Arc` stored beside it keeps the file alive as long as the vector (and every
                // clone) exists, and `Deref` ties the borrow to `&self`.
                VectorValues::Mapped {
                    _file: Arc::clone(self.file),
                    values: unsafe { &*std::ptr::from_ref::<[f32]>(v) },
                }
            }
            None => {
                let mut out = vec![0.0f32; n as usize];
                ggpt_quant::tensor::dequantize(info.ty, bytes, &mut out)
                    .map_err(|e| bad(e.to_string()))?;
                VectorValues::Owned(out)
            }
        };
        let v = Vector { values };
        if v.len() != n as usize {
            return Err(bad(format!("{} values, expected {n}", v.len())));
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(bad(format!("element {i} is {}", v[i])));
        }
        Ok(v)
    }

    fn norm(&self, prefix: &str, c: u64) -> Result<Norm, LoadError> {
        Ok(Norm {
            w: self.vector(&format!("{prefix}.weight"), c)?,
            b: self.vector(&format!("{prefix}.bias"), c)?,
        })
    }
}
