//! GPT-2's names in a GGUF file (llama.cpp's `LLM_ARCH_GPT2`): the metadata keys and the
//! tensor names, written by the converter and read by the loader.

/// `general.architecture` of a GPT-2 file.
pub const ARCH: &str = "gpt2";

/// Metadata keys.
pub mod keys {
    pub const ARCHITECTURE: &str = "general.architecture";
    pub const TYPE: &str = "general.type";
    pub const NAME: &str = "general.name";
    pub const FILE_TYPE: &str = "general.file_type";
    pub const QUANTIZATION_VERSION: &str = "general.quantization_version";

    pub const BLOCK_COUNT: &str = "gpt2.block_count";
    pub const CONTEXT_LENGTH: &str = "gpt2.context_length";
    pub const EMBEDDING_LENGTH: &str = "gpt2.embedding_length";
    pub const FEED_FORWARD_LENGTH: &str = "gpt2.feed_forward_length";
    pub const HEAD_COUNT: &str = "gpt2.attention.head_count";
    pub const HEAD_COUNT_KV: &str = "gpt2.attention.head_count_kv";
    pub const LAYER_NORM_EPSILON: &str = "gpt2.attention.layer_norm_epsilon";

    pub const TOKENIZER_MODEL: &str = "tokenizer.ggml.model";
    pub const TOKENIZER_PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENIZER_TOKENS: &str = "tokenizer.ggml.tokens";
    pub const TOKENIZER_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const TOKENIZER_MERGES: &str = "tokenizer.ggml.merges";
    pub const TOKENIZER_EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

/// The token embedding, (V, C); its row count is the vocabulary size.
pub const TOKEN_EMBD: &str = "token_embd.weight";
/// The position embedding, (n_ctx, C).
pub const POSITION_EMBD: &str = "position_embd.weight";
/// The output projection, (V, C): optional, tied to [`TOKEN_EMBD`] when absent.
pub const OUTPUT: &str = "output.weight";

/// The tensors outside the blocks, in llama.cpp's order. [`OUTPUT`] is optional
/// ([`OPTIONAL_TENSORS`]).
pub const GLOBAL_TENSORS: [&str; 4] = [
    TOKEN_EMBD,
    POSITION_EMBD,
    "output_norm.weight",
    "output_norm.bias",
];
/// Tensors a GPT-2 file may hold or leave out.
pub const OPTIONAL_TENSORS: [&str; 1] = [OUTPUT];
/// The tensors of every block `blk.N.`, by their name after that prefix.
pub const BLOCK_TENSORS: [&str; 12] = [
    "attn_norm.weight",
    "attn_norm.bias",
    "attn_qkv.weight",
    "attn_qkv.bias",
    "attn_output.weight",
    "attn_output.bias",
    "ffn_norm.weight",
    "ffn_norm.bias",
    "ffn_up.weight",
    "ffn_up.bias",
    "ffn_down.weight",
    "ffn_down.bias",
];

/// `blk.{i}.{name}`.
pub fn block_tensor(i: u64, name: &str) -> String {
    format!("blk.{i}.{name}")
}
