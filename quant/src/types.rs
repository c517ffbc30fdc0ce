//! The ggml element types, defined with their block geometry in `ggpt-gguf` and re-exported
//! here, plus which of them ggpt's matmul can use as a weight.

pub use ggpt_gguf::GgmlType;

/// Whether ggpt can multiply a weight stored in this type (the runtime's set).
pub fn is_supported_weight(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(ty, F32 | F16 | BF16 | Q8_0 | Q4K | Q5K | Q6K)
}
