//! The library's error type.
//!
//! Every public function of `ggpt` that can fail returns [`Error`] (or a narrower typed error
//! that converts into it). Each variant wraps the error of the layer that found the problem
//! and shows its message unchanged; [`Error::inner`] gives that error, so a caller that sorts
//! failures by type (a command line choosing an exit code, a binding choosing an exception)
//! looks through the wrapper.

use ggpt_gguf::GgufError;
use ggpt_models::{LoadError, RunError};

use crate::model::NonFiniteWeights;
use crate::perplexity::MethodError;
use crate::sampler::ConfigError;
use crate::tokenizer::{DecodeError, TokenizerError};

/// Why a library call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file is not a readable GGUF (missing, truncated, malformed).
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The GGUF file is not a GPT-2 ggpt can run (architecture, shapes, types).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The tokenizer (in a GGUF file or a checkpoint's files) cannot be used.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A forward pass produced NaN or infinity: the weights hold one.
    #[error(transparent)]
    NonFiniteWeights(#[from] NonFiniteWeights),
    /// A request the model cannot run (context full, token out of range).
    #[error(transparent)]
    Run(#[from] RunError),
    /// Token ids that cannot be turned into text.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A sampler setting out of range.
    #[error(transparent)]
    Sampler(#[from] ConfigError),
    /// A perplexity method or text that cannot be evaluated.
    #[error(transparent)]
    Method(#[from] MethodError),
}

impl Error {
    /// The wrapped error, for sorting failures by type.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        match self {
            Error::Gguf(e) => e,
            Error::Load(e) => e,
            Error::Tokenizer(e) => e,
            Error::NonFiniteWeights(e) => e,
            Error::Run(e) => e,
            Error::Decode(e) => e,
            Error::Sampler(e) => e,
            Error::Method(e) => e,
        }
    }

    /// `e` itself, or the error inside it if it is an [`Error`].
    pub fn unwrap_ref<'a>(
        e: &'a (dyn std::error::Error + 'static),
    ) -> &'a (dyn std::error::Error + 'static) {
        match e.downcast_ref::<Error>() {
            Some(ours) => ours.inner(),
            None => e,
        }
    }
}

/// `Result` with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
