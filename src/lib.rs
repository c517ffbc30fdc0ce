//! ggpt: quantize GPT-2 to GGUF and run it fast on small machines.

pub mod bench;
pub mod budget;
pub mod chart;
pub mod compare;
pub mod diff;
mod error;
pub mod generate;
pub mod memory;
pub mod model;
pub mod npy;
pub mod perplexity;
pub mod sampler;
pub mod scoring;
pub mod session;
pub mod tokenizer;

pub use error::{Error, Result};

/// The checkpoint converter, with the `convert` feature.
#[cfg(feature = "convert")]
pub use ggpt_convert as convert;
