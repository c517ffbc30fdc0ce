//! The ggml element types, defined with their block geometry in `ggpt-gguf` and re-exported
//! here, plus which of them ggpt's matmul can use as a weight.

pub use ggpt_gguf::GgmlType;

/// Whether ggpt can multiply a weight stored in this type (the runtime's set, from
/// [`crate::format::FORMATS`]).
pub fn is_supported_weight(ty: GgmlType) -> bool {
    crate::format::is_weight_type(ty)
}
