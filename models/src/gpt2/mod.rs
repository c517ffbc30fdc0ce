//! GPT-2 as llama.cpp runs it from a GGUF file (`general.architecture = "gpt2"`).
//!
//! - [`hparams`]: the `gpt2.*` hyper-parameters, validated.
//! - [`weights`]: every tensor's presence, shape and type checked; 2-D weights stay in the
//!   mmapped file, only the small 1-D norms and biases are copied.
//! - [`forward`]: the forward pass over a batch of tokens, with its KV cache and scratch
//!   buffers in a [`State`].

pub mod forward;
pub mod hparams;
pub mod weights;

use std::sync::Arc;

use ggpt_gguf::gpt2::{keys, ARCH};
use ggpt_gguf::GgufFile;
use ggpt_quant::GgmlType;

pub use forward::{Output, Seqs, State};
pub use hparams::Hparams;
pub use weights::Weights;

/// Why a GGUF file cannot be loaded as GPT-2. Every message names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error(transparent)]
    Gguf(#[from] ggpt_gguf::GgufError),
    #[error("{file}: general.architecture is '{found}', expected 'gpt2'")]
    WrongArchitecture { file: String, found: String },
    #[error("{file}: missing metadata key '{key}'")]
    MissingKey { file: String, key: String },
    #[error("{file}: metadata key '{key}': {what}")]
    BadHparam {
        file: String,
        key: String,
        what: String,
    },
    #[error("{file}: missing tensor '{name}'")]
    MissingTensor { file: String, name: String },
    #[error(
        "{file}: {count} tensor(s) not part of a GPT-2 with gpt2.block_count = {n_layer}: {names}"
    )]
    UnexpectedTensors {
        file: String,
        n_layer: u64,
        count: usize,
        /// The first few names, quoted, then how many more.
        names: String,
    },
    #[error("{file}: tensor '{name}' has shape {found:?} (ne0 first), expected {expected:?}")]
    WrongShape {
        file: String,
        name: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("{file}: tensor '{name}' has type {ty}, which ggpt cannot use here (supported: {supported})")]
    UnsupportedType {
        file: String,
        name: String,
        ty: GgmlType,
        supported: &'static str,
    },
    #[error("{file}: tensor '{name}': {what}")]
    BadValues {
        file: String,
        name: String,
        what: String,
    },
}

/// Why a forward pass was refused. Checked before any state changes, so the session is
/// still usable after an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error("context full: sequence {seq} holds {have} tokens, {adding} more would exceed n_ctx = {n_ctx}")]
    ContextFull {
        seq: usize,
        have: usize,
        adding: usize,
        n_ctx: usize,
    },
    #[error("token id {token} is out of range (vocabulary has {n_vocab} tokens)")]
    TokenOutOfRange { token: u32, n_vocab: usize },
    #[error("n_ctx = {n_ctx} is not in 1..={max} (the model's context length)")]
    BadContext { n_ctx: usize, max: usize },
    #[error("invalid request: {0}")]
    BadRequest(String),
    /// A quantized weight has a NaN or infinite scale, found the first time the weight was
    /// used (the file is bad input). The pass stopped part-way: sequences keep the positions
    /// committed before it, but the error is meant to end the run.
    #[error("{file}: tensor '{tensor}': invalid values: {what}")]
    InvalidWeights {
        file: String,
        tensor: String,
        what: String,
    },
}

/// A loaded GPT-2: hyper-parameters plus weight descriptors borrowing the mmapped file.
pub struct Gpt2 {
    file: Arc<GgufFile>,
    hparams: Hparams,
    weights: Weights,
    /// Pinned and streamed weights when the model runs under a memory budget.
    residency: Option<crate::residency::Residency>,
}

impl Gpt2 {
    /// Validate `file` as a GPT-2 GGUF: architecture, hyper-parameters, the set of tensors
    /// (exactly GPT-2's for `gpt2.block_count` blocks), and each tensor's shape and type.
    /// `output.weight` is optional (tied to `token_embd.weight` when absent, as current
    /// llama.cpp converters write it).
    pub fn from_gguf(file: Arc<GgufFile>) -> Result<Gpt2, LoadError> {
        let hparams = Self::check_header(&file)?;
        let weights = Weights::load(&file, &hparams)?;
        Ok(Gpt2 {
            file,
            hparams,
            weights,
            residency: None,
        })
    }

    /// The checks of [`Gpt2::from_gguf`] that need only the header: architecture,
    /// hyper-parameters and the set of tensor names. Reads no tensor data (`ggpt inspect`
    /// uses it).
    pub fn check_header(file: &GgufFile) -> Result<Hparams, LoadError> {
        let path = file.path().display().to_string();
        match file.get_str(keys::ARCHITECTURE)? {
            Some(ARCH) => {}
            Some(other) => {
                return Err(LoadError::WrongArchitecture {
                    file: path,
                    found: other.to_string(),
                })
            }
            None => {
                return Err(LoadError::MissingKey {
                    file: path,
                    key: keys::ARCHITECTURE.to_string(),
                })
            }
        }
        let hparams = Hparams::from_gguf(file)?;
        weights::check_tensor_set(file, hparams.n_layer)?;
        Ok(hparams)
    }

    /// Shape of the model.
    pub fn hparams(&self) -> &Hparams {
        &self.hparams
    }

    /// The file the weights live in.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The weight descriptors.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Check every quantized weight's scales ([`weights::Matrix::check`]): the first bad one
    /// in file order is the error. The forward pass does not check them (see
    /// [`weights`]); call this up front to refuse such a file before running it, or after a
    /// forward pass produced non-finite outputs, to name the block.
    pub fn check_weights(&self) -> Result<(), RunError> {
        self.weights
            .matrices()
            .into_iter()
            .try_for_each(|m| m.check())
    }

    /// The file's mapping, shared (to build a [`Residency`](crate::residency::Residency)).
    pub fn file_arc(&self) -> &Arc<GgufFile> {
        &self.file
    }

    /// Run with part of the weights pinned and the rest streamed (`None`: leave every page
    /// to the kernel). A residency first copies the norms and biases out of the mapping
    /// ([`Weights::own_vectors`]): the forward pass reads them outside the residency, and
    /// their pages would otherwise be reclaimed and read again (with the read-around) on
    /// every token.
    pub fn set_residency(&mut self, r: Option<crate::residency::Residency>) {
        if r.is_some() {
            self.weights.own_vectors();
        }
        self.residency = r;
    }

    /// The residency set with [`Gpt2::set_residency`], if any.
    pub fn residency(&self) -> Option<&crate::residency::Residency> {
        self.residency.as_ref()
    }

    /// Run `f` on the weight `m` for a matmul: its bytes from the residency (a resident copy
    /// or a streaming buffer, held while `f` runs) or from the mapping. The values are not
    /// checked here: a non-finite scale makes every output it touches non-finite, which the
    /// caller's check of the outputs catches ([`Gpt2::check_weights`] then names the block).
    fn with_weight<R>(
        &self,
        m: &weights::Matrix,
        f: impl FnOnce(&ggpt_quant::matmul::QMatrix<'_>) -> R,
    ) -> Result<R, RunError> {
        if let Some(r) = &self.residency {
            let base = self.file.data_offset();
            match r.weight(base + m.info.offset, m.info.size) {
                Ok(Some(bytes)) => return Ok(f(&m.view_in(&bytes)?)),
                Ok(None) => {}
                Err(what) => {
                    return Err(RunError::InvalidWeights {
                        file: self.file.path().display().to_string(),
                        tensor: m.info.name.clone(),
                        what,
                    })
                }
            }
        }
        Ok(f(m.view()))
    }

    /// Forward-pass step `step` (block `step`, or the output head at n_layer) is about to run.
    fn enter_step(&self, step: usize) {
        if let Some(r) = &self.residency {
            r.enter(step);
        }
    }

    /// Forward-pass step `step` is done.
    fn leave_step(&self, step: usize) {
        if let Some(r) = &self.residency {
            r.leave(step);
        }
    }
}
