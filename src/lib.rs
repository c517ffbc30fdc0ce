//! ggpt: quantize GPT-2 to GGUF and run it fast on small machines.

pub mod cli;
