//! Model definitions over mmapped GGUF weights. Today: GPT-2.
