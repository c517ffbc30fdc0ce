//! A loaded model: the mmapped GGUF file, its validated GPT-2 weights and its tokenizer.
//!
//! Loading maps the file and checks its header (metadata, every tensor's shape and type, the
//! 1-D norms and biases, the tokenizer tables) without reading the 2-D weights, so
//! [`Model::load_ms`] is a few milliseconds and nothing of the weights is resident before the
//! first token.
//!
//! Weight values are not checked before a forward pass reads them. A NaN or infinite value —
//! an fp16 scale of a quantized block, or an F16/F32 weight — makes every output it touches
//! non-finite, so the session checks every logit (and hidden state) it returns; when one is
//! not finite it checks the quantized scales ([`Model::check_weights`]) and returns
//! [`RunError::InvalidWeights`] naming the file, the tensor and the block, or, when the scales
//! are fine, [`NonFiniteWeights`] (a bad float weight; `ggpt inspect` checks every value).
//! Checking scales before use would read each quantized matrix twice on the first token, and
//! checking every F16 value would read the whole file (docs/errors.md has the measurements).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ggpt_gguf::GgufFile;
use ggpt_models::Gpt2;

use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::Result;

pub use ggpt_models::{Hparams, KvType, LoadError, RunError};

/// A well-formed model file whose weights hold NaN or infinity, found when a forward pass
/// produced non-finite outputs (a bit flip, a broken converter). The file is bad input, not a
/// runtime failure: the command line reports it like a corrupt file.
#[derive(Debug, thiserror::Error)]
#[error("{file}: the weights contain NaN or infinity: {what}")]
pub struct NonFiniteWeights {
    pub file: String,
    pub what: String,
}

/// A GPT-2 GGUF ready to run. Create [`Session`](crate::session::Session)s from it to
/// evaluate tokens; any number of sessions can share one model.
///
/// ```no_run
/// use ggpt::model::Model;
/// # fn main() -> ggpt::Result<()> {
/// let model = Model::load("tiny-gpt2-F16.gguf".as_ref())?;
/// let ids = model.tokenizer().encode("Hello");
/// println!("{} layers, {} tokens, loaded in {:.1} ms", model.hparams().n_layer, ids.len(), model.load_ms());
/// # Ok(()) }
/// ```
pub struct Model {
    gpt2: Gpt2,
    tokenizer: Tokenizer,
    load_ms: f64,
}

impl Model {
    /// Map and validate a GGUF file: GPT-2 architecture, hyper-parameters, every tensor's
    /// presence, shape and type, and the tokenizer tables. Weight values are checked through
    /// the outputs (see the module comment).
    pub fn load(path: &Path) -> Result<Model> {
        let start = Instant::now();
        let file = GgufFile::open(path)?;
        let mut model = Self::from_file(file)?;
        model.load_ms = start.elapsed().as_secs_f64() * 1e3;
        Ok(model)
    }

    /// Build a model from an already opened file (e.g. one made in memory with
    /// [`GgufFile::from_bytes`]).
    pub fn from_file(file: GgufFile) -> Result<Model> {
        let start = Instant::now();
        let file = Arc::new(file);
        // Independent: the network's header checks and the tokenizer's tables (the larger
        // part) are built on two cores.
        let (gpt2, tokenizer) = rayon::join(
            || Gpt2::from_gguf(Arc::clone(&file)),
            || Tokenizer::from_gguf(&file),
        );
        let (gpt2, tokenizer) = (gpt2?, tokenizer?);
        if tokenizer.n_vocab() as u64 != gpt2.hparams().n_vocab {
            return Err(TokenizerError::Invalid {
                file: file.path().display().to_string(),
                problem: format!(
                    "the tokenizer has {} tokens but token_embd.weight has {} rows",
                    tokenizer.n_vocab(),
                    gpt2.hparams().n_vocab
                ),
            }
            .into());
        }
        Ok(Model {
            gpt2,
            tokenizer,
            load_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// The tokenizer stored in the file.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Model shape.
    pub fn hparams(&self) -> &Hparams {
        self.gpt2.hparams()
    }

    /// The mapped GGUF file.
    pub fn file(&self) -> &GgufFile {
        self.gpt2.file()
    }

    /// The GPT-2 network (weights and forward pass).
    pub fn gpt2(&self) -> &Gpt2 {
        &self.gpt2
    }

    /// Check the fp16 scales of every quantized weight now (ggml's row-data validation), for
    /// callers that want a bad file refused before they start: the error names the file, the
    /// tensor and the block. Float weights are left to the session's logit check (see the
    /// module comment).
    pub fn check_weights(&self) -> Result<(), RunError> {
        self.gpt2.check_weights()
    }

    /// The GPT-2 network, mutable: to set how its weights are held under a memory budget
    /// ([`crate::budget::fit`]) before any session is created.
    pub fn gpt2_mut(&mut self) -> &mut Gpt2 {
        &mut self.gpt2
    }

    /// Milliseconds spent opening and validating the file.
    pub fn load_ms(&self) -> f64 {
        self.load_ms
    }

    /// Whether the file stores a separate `output.weight` (older llama.cpp converters) rather
    /// than tying the output projection to `token_embd.weight`.
    pub fn has_output_weight(&self) -> bool {
        self.gpt2.weights().output.is_some()
    }

    /// The file's quantization mix as llama.cpp names it (`general.file_type`): "F16",
    /// "Q8_0", "Q6_K", "Q4_K_M", …; "unknown" if the key is absent.
    pub fn file_type_name(&self) -> String {
        match self.file().get_u64(ggpt_gguf::gpt2::keys::FILE_TYPE) {
            Ok(Some(t)) => u32::try_from(t)
                .ok()
                .and_then(ggpt_gguf::file_type_name)
                .map_or_else(|| format!("ftype {t}"), str::to_string),
            _ => "unknown".to_string(),
        }
    }
}
