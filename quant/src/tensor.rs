//! Whole-tensor helpers: view bytes as blocks, quantize/dequantize rows of any supported type
//! (parallel over rows with rayon). (H1 owns this module.)
