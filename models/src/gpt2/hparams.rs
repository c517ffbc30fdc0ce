//! GPT-2 hyper-parameters, read from the `gpt2.*` GGUF keys and checked before anything is
//! sized from them.

use ggpt_gguf::gpt2::keys;
use ggpt_gguf::GgufFile;

use super::weights::TOKEN_EMBD;
use super::LoadError;

/// Largest values accepted from a file. Far above any GPT-2 (XL: 48 layers, 1600 channels,
/// 6400 ff, 25 heads, 1024 positions), small enough that sizes derived from them cannot
/// overflow and an absurd header is refused before it allocates anything.
const MAX_LAYERS: u64 = 1024;
const MAX_EMBD: u64 = 1 << 16;
const MAX_FF: u64 = 1 << 20;
const MAX_CTX: u64 = 1 << 20;
/// Largest vocabulary accepted (far above GPT-2's 50257; bounds the logits buffer).
const MAX_VOCAB: u64 = 1 << 22;

/// Shape of a GPT-2 model. Counts are u64 as GGUF stores them; all are validated at load
/// to small bounds, so converting them to `usize` is lossless. Only [`Hparams::from_gguf`]
/// builds one (`non_exhaustive` forbids struct literals outside this crate), so every
/// `Hparams` is complete and checked.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Hparams {
    /// Vocabulary size (rows of `token_embd.weight`).
    pub n_vocab: u64,
    /// Maximum positions the model was built for (`gpt2.context_length`, rows of
    /// `position_embd.weight`); a session's n_ctx may not exceed it.
    pub n_ctx: u64,
    /// Channels C (`gpt2.embedding_length`).
    pub n_embd: u64,
    /// Attention heads (`gpt2.attention.head_count`).
    pub n_head: u64,
    /// Transformer blocks (`gpt2.block_count`).
    pub n_layer: u64,
    /// Hidden width of the MLP (`gpt2.feed_forward_length`).
    pub n_ff: u64,
    /// LayerNorm epsilon (`gpt2.attention.layer_norm_epsilon`).
    pub eps: f32,
}

impl Hparams {
    /// Channels per head (C / n_head).
    pub fn head_dim(&self) -> u64 {
        self.n_embd / self.n_head
    }

    /// Read and validate the `gpt2.*` keys, and the vocabulary size: it is not a key
    /// (llama.cpp takes it from the tokenizer), so it comes from the rows of
    /// `token_embd.weight`, which must agree with `tokenizer.ggml.tokens` when present.
    pub fn from_gguf(file: &GgufFile) -> Result<Hparams, LoadError> {
        let path = file.path().display().to_string();
        let int = |key: &str, max: u64| -> Result<u64, LoadError> {
            let v = file.get_u64(key).map_err(LoadError::from)?.ok_or_else(|| {
                LoadError::MissingKey {
                    file: path.clone(),
                    key: key.to_string(),
                }
            })?;
            if v == 0 || v > max {
                return Err(LoadError::BadHparam {
                    file: path.clone(),
                    key: key.to_string(),
                    what: format!("{v} is outside 1..={max}"),
                });
            }
            Ok(v)
        };
        let n_layer = int(keys::BLOCK_COUNT, MAX_LAYERS)?;
        let n_ctx = int(keys::CONTEXT_LENGTH, MAX_CTX)?;
        let n_embd = int(keys::EMBEDDING_LENGTH, MAX_EMBD)?;
        let n_ff = int(keys::FEED_FORWARD_LENGTH, MAX_FF)?;
        let n_head = int(keys::HEAD_COUNT, MAX_EMBD)?;
        let eps_key = keys::LAYER_NORM_EPSILON;
        let eps = file
            .get_f32(eps_key)
            .map_err(LoadError::from)?
            .ok_or_else(|| LoadError::MissingKey {
                file: path.clone(),
                key: eps_key.to_string(),
            })?;
        if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
            return Err(LoadError::BadHparam {
                file: path.clone(),
                key: eps_key.to_string(),
                what: format!("{eps} is not in (0, 1)"),
            });
        }
        if n_embd % n_head != 0 {
            return Err(LoadError::BadHparam {
                file: path.clone(),
                key: keys::HEAD_COUNT.to_string(),
                what: format!("embedding length {n_embd} is not a multiple of {n_head} heads"),
            });
        }
        // llama.cpp only supports head_count_kv == head_count for GPT-2 (no GQA).
        if let Some(kv) = file.get_u64(keys::HEAD_COUNT_KV).map_err(LoadError::from)? {
            if kv != n_head {
                return Err(LoadError::BadHparam {
                    file: path,
                    key: keys::HEAD_COUNT_KV.to_string(),
                    what: format!("{kv} differs from head_count {n_head}; GPT-2 has no GQA"),
                });
            }
        }
        let n_vocab = vocab_size(file, &path, n_embd)?;
        Ok(Hparams {
            n_vocab,
            n_ctx,
            n_embd,
            n_head,
            n_layer,
            n_ff,
            eps,
        })
    }
}

/// The vocabulary size: the row count of `token_embd.weight` (dims [C, V]), checked before
/// anything is sized from it.
fn vocab_size(file: &GgufFile, path: &str, c: u64) -> Result<u64, LoadError> {
    let te = file
        .tensor(TOKEN_EMBD)
        .ok_or_else(|| LoadError::MissingTensor {
            file: path.to_string(),
            name: TOKEN_EMBD.to_string(),
        })?;
    if te.dims.len() != 2 || te.dims[0] != c || te.dims[1] == 0 || te.dims[1] > MAX_VOCAB {
        return Err(LoadError::WrongShape {
            file: path.to_string(),
            name: te.name.clone(),
            expected: vec![c, te.dims.get(1).copied().unwrap_or(0).clamp(1, MAX_VOCAB)],
            found: te.dims.clone(),
        });
    }
    let n_vocab = te.dims[1];
    // llama.cpp sizes the vocabulary from the tokenizer; the two must agree.
    if file.contains_key("tokenizer.ggml.tokens") {
        let n = file.array_len("tokenizer.ggml.tokens").map(|n| n as u64);
        if n != Some(n_vocab) {
            return Err(LoadError::BadHparam {
                file: path.to_string(),
                key: "tokenizer.ggml.tokens".to_string(),
                what: format!(
                    "holds {} tokens but {TOKEN_EMBD} has {n_vocab} rows",
                    n.map_or("no array of".to_string(), |n| n.to_string())
                ),
            });
        }
    }
    Ok(n_vocab)
}
