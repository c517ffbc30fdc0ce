//! Helpers shared by the K-quant reference quantizers (ggml-quants.c): `nearest_int`,
//! `make_qkx2_quants`, `make_qx_quants`, and the 6-bit scale/min packing.
