//! Checkpoint readers (Hugging Face safetensors + config + tokenizer files), the conversion
//! pipeline to GGUF (written with `ggpt-gguf`), and the per-tensor type policy that decides
//! how each GPT-2 tensor is stored.

pub mod atomic;
pub mod error;
pub mod hf;
pub mod pipeline;
pub mod policy;
pub mod requantize;
pub mod safetensors;
pub mod synth;
pub mod torch;

pub use error::ConvertError;
