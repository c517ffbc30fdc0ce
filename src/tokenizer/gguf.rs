//! Building the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Only GPT-2's byte-level BPE is accepted: `tokenizer.ggml.model` must be "gpt2", and the
//! pre-tokenizer, when named, must be "gpt-2". llama.cpp uses the `gpt2` model for many BPE
//! vocabularies with other split regexes (`llama3`, `qwen2`, …); encoding those with GPT-2's
//! regex would silently give wrong ids, so they are refused instead.

use ggpt_gguf::{GgufError, GgufFile};

use super::Tokenizer;

use ggpt_gguf::gpt2::keys::{
    TOKENIZER_EOS_ID as KEY_EOS, TOKENIZER_MERGES as KEY_MERGES, TOKENIZER_MODEL as KEY_MODEL,
    TOKENIZER_PRE as KEY_PRE, TOKENIZER_TOKENS as KEY_TOKENS,
    TOKENIZER_TOKEN_TYPE as KEY_TOKEN_TYPE,
};

/// Why a tokenizer cannot be built: GGUF metadata or Hugging Face files that cannot be used. A
/// typed error so the command line can report it as a bad input file (exit 3); every message
/// from a file names the file once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// A key has the wrong type or the metadata cannot be read (the reader names file and key).
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The metadata or files read fine but do not describe a GPT-2 tokenizer ggpt can use.
    #[error("{file}: {problem}")]
    Invalid { file: String, problem: String },
    /// The vocabulary, merges or EOS id given to [`Tokenizer::new`] or
    /// [`Tokenizer::with_eos`] are inconsistent (the callers that read files add the file).
    #[error("{0}")]
    Tables(String),
}

impl Tokenizer {
    /// Reads the vocabulary, merges, token types and EOS id from GGUF metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let invalid = |problem: String| TokenizerError::Invalid {
            file: gguf.path().display().to_string(),
            problem,
        };
        let model = gguf
            .get_str(KEY_MODEL)?
            .ok_or_else(|| invalid(format!("no tokenizer in the file ({KEY_MODEL} is missing)")))?;
        if model != "gpt2" {
            return Err(invalid(format!(
                "tokenizer model {model:?} is not supported ({KEY_MODEL} must be \"gpt2\", \
                 GPT-2's byte-level BPE)"
            )));
        }
        if let Some(pre) = gguf.get_str(KEY_PRE)? {
            if pre != "gpt-2" {
                return Err(invalid(format!(
                    "pre-tokenizer {pre:?} is not supported ({KEY_PRE} must be \"gpt-2\"; \
                     other BPE vocabularies split text differently)"
                )));
            }
        }
        let tokens = gguf
            .get_str_array(KEY_TOKENS)?
            .ok_or_else(|| invalid(format!("cannot find tokenizer vocab ({KEY_TOKENS})")))?;
        let merges = gguf
            .get_str_array(KEY_MERGES)?
            .ok_or_else(|| invalid(format!("cannot find tokenizer merges ({KEY_MERGES})")))?;
        let types = gguf.get_i32_array(KEY_TOKEN_TYPE)?;
        // `Tokenizer::new` does not know the file; its message (and cause chain) goes after
        // the file name.
        let mut tok = Tokenizer::new(tokens, merges, types)
            .map_err(|e| invalid(format!("invalid tokenizer metadata: {e:#}")))?;
        if let Some(eos) = gguf.get_u64(KEY_EOS)? {
            let eos = u32::try_from(eos).unwrap_or(u32::MAX);
            tok = tok
                .with_eos(eos)
                .map_err(|e| invalid(format!("invalid {KEY_EOS}: {e:#}")))?;
        }
        Ok(tok)
    }
}
