//! Model definitions over mmapped GGUF weights. Today: GPT-2.
//!
//! - [`gpt2`]: loading a GPT-2 GGUF ([`gpt2::Gpt2::from_gguf`]) and its forward pass.
//! - [`kv_cache`]: the per-layer key/value cache (F16 or F32, several sequences).
//! - [`attention`]: one query against one head's cache (portable and AVX2/FMA variants).
//! - [`ops`]: LayerNorm, GELU, softmax and residual add on f32 slices.
//! - `anon`: lazily resident anonymous memory that the KV cache and activations live in.
//! - [`residency`]: pinning part of the weights and streaming the rest under a memory budget.

mod anon;
pub mod attention;
pub mod gpt2;
pub mod kv_cache;
pub mod ops;
pub mod residency;

pub use gpt2::{Gpt2, Hparams, LoadError, Output, RunError, Seqs, State};
pub use kv_cache::{KvCache, KvType};
pub use residency::{Residency, Span};
