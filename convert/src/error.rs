//! The crate's error type.
//!
//! Every public function of `ggpt-convert` that converts, requantizes or synthesizes returns
//! [`ConvertError`]. A variant either wraps the typed error of the step that found the problem
//! (shown unchanged; [`ConvertError::inner`] gives it, so a caller that sorts failures by type
//! — a command line choosing an exit code, a binding choosing an exception — looks through the
//! wrapper), or says what went wrong where no narrower type exists.

use ggpt_gguf::GgufError;

use crate::atomic::UnusableOutput;
use crate::hf::InputError;
use crate::pipeline::OutputError;
use crate::policy::PolicyError;

/// Why a conversion, requantization or synthesis failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// An input (checkpoint, config, tokenizer files, GGUF) that cannot be converted.
    #[error(transparent)]
    Input(#[from] InputError),
    /// A GGUF input that is not readable, or a header the writer refuses.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A tensor name that does not fit the model's block count.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// An output path that cannot be written (a directory, the input itself, …).
    #[error(transparent)]
    UnusableOutput(#[from] UnusableOutput),
    /// Writing an output failed (disk full, permissions, …); nothing partial is left.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// A request that cannot be carried out as given (no output type, a shape with a zero
    /// dimension).
    #[error("{0}")]
    Request(String),
    /// A tensor the quantizer could not encode, or whose encoding failed its own check.
    #[error("tensor {tensor}: {what}")]
    Encode { tensor: String, what: String },
}

impl ConvertError {
    /// The wrapped error, for sorting failures by type; `self` for the variants that wrap none.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        match self {
            ConvertError::Input(e) => e,
            ConvertError::Gguf(e) => e,
            ConvertError::Policy(e) => e,
            ConvertError::UnusableOutput(e) => e,
            ConvertError::Output(e) => e,
            ConvertError::Request(_) | ConvertError::Encode { .. } => self,
        }
    }

    /// `e` itself, or the error inside it if it is a [`ConvertError`].
    pub fn unwrap_ref<'a>(
        e: &'a (dyn std::error::Error + 'static),
    ) -> &'a (dyn std::error::Error + 'static) {
        match e.downcast_ref::<ConvertError>() {
            Some(ours) => ours.inner(),
            None => e,
        }
    }
}

/// `Result` with the crate's [`ConvertError`].
pub type Result<T, E = ConvertError> = std::result::Result<T, E>;
