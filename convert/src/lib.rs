//! Checkpoint readers (Hugging Face safetensors + config + tokenizer files, GGUF), the GGUF
//! writer, and the per-tensor type policy that decides how each GPT-2 tensor is stored.

pub mod atomic;
pub mod gguf;
pub mod hf;
pub mod pipeline;
pub mod policy;
pub mod requantize;
pub mod safetensors;
pub mod synth;
pub mod torch;
