//! Which ggml type each GPT-2 tensor is stored in, for each output file type — llama.cpp's rules.
//!
//! Two steps, mirroring the two llama.cpp tools a user would chain:
//! 1. `convert_hf_to_gguf.py --outtype f16` ([`converter_type`]): 1-D tensors, norms, biases and
//!    the position table stay F32, every other weight becomes F16.
//! 2. `llama-quantize` ([`Policy::choose`], `llama_tensor_get_type` in `src/llama-quant.cpp`):
//!    only 2-D `*weight` tensors other than norms and `position_embd` are quantized; the default
//!    type of the file type is then adjusted per tensor (the Q4_K_M/Q5_K_M mixes, the tied
//!    output head).
//!
//! Where a row length is not a multiple of the chosen type's block size, ggml falls back as
//! llama-quantize does: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, and F16 if even that does not
//! divide the row. GPT-2 small/medium/large never hit this (n_embd 768/1024/1280 and 4·n_embd
//! are multiples of 256); GPT-2 XL (1600) does. The one difference: for a Q8_0 tensor whose rows
//! are not a multiple of 32, llama-quantize gives up ("Unsupported tensor size"); ggpt writes
//! F16 and reports it.

use std::cmp::Ordering;
use std::fmt;

use ggpt_gguf::gpt2;
use ggpt_quant::GgmlType;

/// `general.file_type` values (llama.cpp `llama_ftype`) of the files ggpt writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum FileType {
    F16 = 1,
    Q8_0 = 7,
    Q4KM = 15,
    Q5KS = 16,
    Q5KM = 17,
    Q6K = 18,
}

impl FileType {
    /// The file types `--type all` writes, in that order.
    pub const ALL: [FileType; 4] = [FileType::F16, FileType::Q8_0, FileType::Q6K, FileType::Q4KM];

    /// Every file type ggpt writes.
    pub const KNOWN: [FileType; 6] = [
        FileType::F16,
        FileType::Q8_0,
        FileType::Q6K,
        FileType::Q5KM,
        FileType::Q5KS,
        FileType::Q4KM,
    ];

    pub const fn code(self) -> u32 {
        self as u32
    }

    pub fn from_code(code: u32) -> Option<FileType> {
        FileType::KNOWN.into_iter().find(|t| t.code() == code)
    }

    /// Upper-case label used in file names (`tiny-gpt2-Q4_K_M.gguf`): llama.cpp's name for
    /// the file type ([`ggpt_gguf::file_type_name`]).
    pub const fn label(self) -> &'static str {
        match ggpt_gguf::file_type_name(self.code()) {
            Some(name) => name,
            None => panic!("a FileType without a llama.cpp name"),
        }
    }

    /// Parse a command-line name: f16, q8_0, q6_k, q5_k_m, q5_k_s, q4_k_m (any case).
    pub fn parse(s: &str) -> Option<FileType> {
        FileType::KNOWN
            .into_iter()
            .find(|t| t.label().eq_ignore_ascii_case(s))
    }

    /// Parse a `--type` value: one name, a comma-separated list, or `all` ([`FileType::ALL`]).
    pub fn parse_list(s: &str) -> Result<Vec<FileType>, UnknownFileType> {
        if s.trim().eq_ignore_ascii_case("all") {
            return Ok(FileType::ALL.to_vec());
        }
        s.split(',')
            .map(|t| {
                FileType::parse(t.trim()).ok_or_else(|| UnknownFileType {
                    given: t.to_string(),
                })
            })
            .collect()
    }

    /// The type llama-quantize starts from for every quantizable tensor.
    pub fn default_type(self) -> GgmlType {
        match self {
            FileType::F16 => GgmlType::F16,
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q6K => GgmlType::Q6K,
            FileType::Q5KM | FileType::Q5KS => GgmlType::Q5K,
            FileType::Q4KM => GgmlType::Q4K,
        }
    }
}

// Every file type has a llama.cpp name (evaluated at compile time, so `label` cannot panic).
const _: () = {
    let mut i = 0;
    while i < FileType::KNOWN.len() {
        FileType::KNOWN[i].label();
        i += 1;
    }
};

/// A type name that is not one of [`FileType::KNOWN`] (nor `all`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown type {given:?}; expected f16, q8_0, q6_k, q5_k_m, q5_k_s, q4_k_m or all")]
pub struct UnknownFileType {
    pub given: String,
}

/// A tensor whose name does not fit the model it is placed in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{name}: ffn_down outside a blk.N. block")]
    NoLayer { name: String },
    #[error("{name}: layer {layer} ≥ block_count {n_layer}")]
    LayerOutOfRange {
        name: String,
        layer: usize,
        n_layer: usize,
    },
}

impl fmt::Display for FileType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The type `convert_hf_to_gguf.py --outtype f16` gives a tensor (`prepare_tensors`).
/// `n_dims` is the numpy rank of the tensor.
pub fn converter_type(name: &str, n_dims: usize) -> GgmlType {
    if n_dims <= 1
        || name.ends_with("_norm.weight")
        || name == gpt2::POSITION_EMBD
        || !name.ends_with(".weight")
    {
        GgmlType::F32
    } else {
        GgmlType::F16
    }
}

/// ggml's `ggml_n_dims`: the rank ignoring trailing dimensions of size 1 (at least 1).
pub fn ggml_n_dims(dims: &[u64]) -> usize {
    dims.iter().rposition(|&d| d > 1).map_or(1, |i| i + 1)
}

/// llama-quantize's filter: does this tensor get a new type at all?
pub fn is_quantizable(name: &str, dims: &[u64]) -> bool {
    name.ends_with("weight")
        && ggml_n_dims(dims) >= 2
        && !name.contains("_norm.weight")
        && !name.contains("ffn_gate_inp.weight")
        && name != gpt2::POSITION_EMBD
        && name != "token_types.weight"
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third in between.
pub fn use_more_bits(i_layer: usize, n_layer: usize) -> bool {
    let (i, n) = (i_layer as i64, n_layer as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The layer of a `blk.N.*` tensor name.
pub fn layer_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("blk.")?;
    let (n, _) = rest.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// llama.cpp's tensor order (`weight_name_comparer`): tensors outside any block first, then block
/// 0, 1, … (numerically); by name (bytewise) within each group. llama-quantize writes this order.
pub fn tensor_order(a: &str, b: &str) -> Ordering {
    let la = layer_of(a).map_or(-1, |l| l as i64);
    let lb = layer_of(b).map_or(-1, |l| l as i64);
    la.cmp(&lb).then_with(|| a.as_bytes().cmp(b.as_bytes()))
}

/// Where ggpt's choice differs from llama.cpp's: a row length that not even the fallback
/// type's block divides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fallback {
    /// What the rules asked for (its block size does not divide the row).
    pub wanted: GgmlType,
    /// What llama-quantize would write, or `None` where llama-quantize refuses the tensor.
    pub llama_cpp: Option<GgmlType>,
}

/// The decision for one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub ty: GgmlType,
    /// Set when the type is a fallback that differs from llama.cpp's output.
    pub differs: Option<Fallback>,
}

/// llama-quantize's per-tensor decision for one output file.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub ftype: FileType,
    pub n_layer: usize,
    /// Whether the model has a separate `output.weight` (else `token_embd` doubles as the output
    /// head and gets the output's type).
    pub has_output: bool,
}

impl Policy {
    pub fn new(ftype: FileType, n_layer: usize, has_output: bool) -> Policy {
        Policy {
            ftype,
            n_layer,
            has_output,
        }
    }

    /// The type of `name` (GGUF dims `dims`, ne0 first) in the output, given its type `current`
    /// in the F16/F32 input llama-quantize would read. Errors for a layer index out of range.
    pub fn choose(
        &self,
        name: &str,
        dims: &[u64],
        current: GgmlType,
    ) -> Result<Choice, PolicyError> {
        if !is_quantizable(name, dims) {
            return Ok(Choice {
                ty: current,
                differs: None,
            });
        }
        let default = self.ftype.default_type();
        // llama_tensor_get_type only runs for quantized default types.
        if !is_block_quant(default) {
            return Ok(Choice {
                ty: default,
                differs: None,
            });
        }
        let ne0 = dims.first().copied().unwrap_or(0);
        let mut ty = default;
        let (is_q4km, is_q5km) = (self.ftype == FileType::Q4KM, self.ftype == FileType::Q5KM);
        if name == gpt2::OUTPUT || (!self.has_output && name == gpt2::TOKEN_EMBD) {
            // The output head is the most sensitive matrix: Q6_K unless the file is Q8_0.
            if !ne0.is_multiple_of(ty.block_size() as u64) {
                ty = GgmlType::Q8_0;
            } else if ty != GgmlType::Q8_0 {
                ty = GgmlType::Q6K;
            }
        } else if name == gpt2::TOKEN_EMBD {
            // Unchanged for the file types ggpt writes.
        } else if name.contains("ffn_down") {
            if is_q4km || is_q5km {
                let layer = layer_of(name).ok_or_else(|| PolicyError::NoLayer {
                    name: name.to_string(),
                })?;
                if layer >= self.n_layer {
                    return Err(PolicyError::LayerOutOfRange {
                        name: name.to_string(),
                        layer,
                        n_layer: self.n_layer,
                    });
                }
                if use_more_bits(layer, self.n_layer) {
                    ty = GgmlType::Q6K;
                }
            }
        } else if name.contains("attn_qkv.weight") {
            if is_q4km {
                ty = GgmlType::Q5K;
            } else if is_q5km {
                ty = GgmlType::Q6K;
            }
        }

        if ne0.is_multiple_of(ty.block_size() as u64) {
            return Ok(Choice { ty, differs: None });
        }
        // llama-quantize's fallbacks for rows that are not a whole number of blocks.
        let fallback = match ty {
            GgmlType::Q4K => GgmlType::Q5_0,
            GgmlType::Q5K => GgmlType::Q5_1,
            GgmlType::Q6K => GgmlType::Q8_0,
            // llama-quantize throws "Unsupported tensor size"; F16 always fits.
            _ => {
                return Ok(Choice {
                    ty: GgmlType::F16,
                    differs: Some(Fallback {
                        wanted: ty,
                        llama_cpp: None,
                    }),
                })
            }
        };
        let ty = if ne0.is_multiple_of(fallback.block_size() as u64) {
            fallback
        } else {
            GgmlType::F16
        };
        Ok(Choice { ty, differs: None })
    }
}

fn is_block_quant(t: GgmlType) -> bool {
    !matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use GgmlType::*;

    fn gpt2_names(n_layer: usize) -> Vec<String> {
        let mut v: Vec<String> = [
            "token_embd.weight",
            "position_embd.weight",
            "output_norm.weight",
            "output_norm.bias",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for i in 0..n_layer {
            for t in [
                "attn_qkv",
                "attn_output",
                "ffn_up",
                "ffn_down",
                "attn_norm",
                "ffn_norm",
            ] {
                v.push(format!("blk.{i}.{t}.weight"));
                v.push(format!("blk.{i}.{t}.bias"));
            }
        }
        v
    }

    #[test]
    fn use_more_bits_matches_reference_layer_sets() {
        // GPT-2 Medium (24 layers): the layers llama-quantize gives more bits.
        let medium: Vec<usize> = (0..24).filter(|&i| use_more_bits(i, 24)).collect();
        assert_eq!(medium, [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]);
        // n = 6: n/8 = 0, 7n/8 = 5 → layers 2 and 5 (i − 0) % 3 == 2, plus 5 ≥ 5.
        let six: Vec<usize> = (0..6).filter(|&i| use_more_bits(i, 6)).collect();
        assert_eq!(six, [2, 5]);
    }

    #[test]
    fn q4_k_m_mix_for_gpt2() {
        let p = Policy::new(FileType::Q4KM, 24, false);
        let ty =
            |n: &str, dims: &[u64]| p.choose(n, dims, converter_type(n, dims.len())).unwrap().ty;
        assert_eq!(ty("token_embd.weight", &[1024, 50257]), Q6K);
        assert_eq!(ty("position_embd.weight", &[1024, 1024]), F32);
        assert_eq!(ty("blk.3.attn_qkv.weight", &[1024, 3072]), Q5K);
        assert_eq!(ty("blk.3.attn_output.weight", &[1024, 1024]), Q4K);
        assert_eq!(ty("blk.3.ffn_up.weight", &[1024, 4096]), Q4K);
        assert_eq!(ty("blk.5.ffn_down.weight", &[4096, 1024]), Q6K);
        assert_eq!(ty("blk.6.ffn_down.weight", &[4096, 1024]), Q4K);
        assert_eq!(ty("blk.6.ffn_down.bias", &[1024]), F32);
        assert_eq!(ty("blk.6.attn_norm.weight", &[1024]), F32);
        // With a duplicate output head, token_embd keeps the default and output gets Q6_K.
        let p = Policy::new(FileType::Q4KM, 24, true);
        assert_eq!(
            p.choose("token_embd.weight", &[1024, 50257], F16)
                .unwrap()
                .ty,
            Q4K
        );
        assert_eq!(
            p.choose("output.weight", &[1024, 50257], F16).unwrap().ty,
            Q6K
        );
    }

    #[test]
    fn uniform_types_and_f16() {
        for (ft, t) in [
            (FileType::Q8_0, Q8_0),
            (FileType::Q6K, Q6K),
            (FileType::F16, F16),
        ] {
            let p = Policy::new(ft, 2, false);
            for n in gpt2_names(2) {
                let dims: &[u64] = if n.ends_with(".bias") || n.contains("norm") {
                    &[256]
                } else {
                    &[256, 512]
                };
                let want = if dims.len() == 2 && n != "position_embd.weight" {
                    t
                } else {
                    F32
                };
                assert_eq!(
                    p.choose(&n, dims, converter_type(&n, dims.len()))
                        .unwrap()
                        .ty,
                    want,
                    "{ft} {n}"
                );
            }
        }
    }

    #[test]
    fn q5_k_m_and_q5_k_s_mixes_for_gpt2() {
        let ty = |p: &Policy, n: &str, dims: &[u64]| {
            p.choose(n, dims, converter_type(n, dims.len())).unwrap().ty
        };
        let m = Policy::new(FileType::Q5KM, 24, false);
        let s = Policy::new(FileType::Q5KS, 24, false);
        // Tied output head: Q6_K in both.
        assert_eq!(ty(&m, "token_embd.weight", &[1024, 50257]), Q6K);
        assert_eq!(ty(&s, "token_embd.weight", &[1024, 50257]), Q6K);
        // Q5_K_M: attn_qkv Q6_K on every layer, ffn_down Q6_K on the use_more_bits layers.
        for l in 0..24 {
            let more = use_more_bits(l, 24);
            let n = |t: &str| format!("blk.{l}.{t}.weight");
            assert_eq!(ty(&m, &n("attn_qkv"), &[1024, 3072]), Q6K);
            assert_eq!(
                ty(&m, &n("ffn_down"), &[4096, 1024]),
                if more { Q6K } else { Q5K }
            );
            assert_eq!(ty(&m, &n("ffn_up"), &[1024, 4096]), Q5K);
            assert_eq!(ty(&m, &n("attn_output"), &[1024, 1024]), Q5K);
            // Q5_K_S: Q5_K everywhere but the output head.
            for t in ["attn_qkv", "ffn_down", "ffn_up", "attn_output"] {
                assert_eq!(ty(&s, &n(t), &[1024, 1024]), Q5K, "{t}");
            }
        }
        assert_eq!(ty(&m, "position_embd.weight", &[1024, 1024]), F32);
        assert_eq!(ty(&s, "blk.0.ffn_down.bias", &[1024]), F32);
        // A separate output head takes Q6_K; token_embd then keeps Q5_K.
        let m = Policy::new(FileType::Q5KM, 24, true);
        assert_eq!(ty(&m, "output.weight", &[1024, 50257]), Q6K);
        assert_eq!(ty(&m, "token_embd.weight", &[1024, 50257]), Q5K);
    }

    #[test]
    fn fallbacks_for_odd_rows() {
        // n_embd 1600 (GPT-2 XL): 1600 % 256 ≠ 0, 1600 % 32 == 0. Fallbacks are llama.cpp's.
        let same = |ty| Choice { ty, differs: None };
        let p = Policy::new(FileType::Q4KM, 48, false);
        let c = p.choose("blk.1.attn_output.weight", &[1600, 1600], F16);
        assert_eq!(c.unwrap(), same(Q5_0));
        let c = p.choose("blk.1.attn_qkv.weight", &[1600, 4800], F16);
        assert_eq!(c.unwrap(), same(Q5_1));
        // Q5_K_M on XL: qkv Q6_K → Q8_0, ffn_up Q5_K → Q5_1, ffn_down rows of 6400 = 25·256 fit.
        let p = Policy::new(FileType::Q5KM, 48, false);
        let c = |n: &str, d: &[u64]| p.choose(n, d, F16).unwrap();
        assert_eq!(c("blk.1.attn_qkv.weight", &[1600, 4800]), same(Q8_0));
        assert_eq!(c("blk.1.ffn_up.weight", &[1600, 6400]), same(Q5_1));
        assert_eq!(c("blk.0.ffn_down.weight", &[6400, 1600]), same(Q6K));
        assert_eq!(c("blk.7.ffn_down.weight", &[6400, 1600]), same(Q5K));
        // Rows that not even 32 divides end in F16, as in llama.cpp.
        assert_eq!(c("blk.1.ffn_up.weight", &[100, 400]), same(F16));
        let p = Policy::new(FileType::Q4KM, 48, false);
        // Tied output head: llama.cpp picks Q8_0 up front, as do we.
        assert_eq!(
            p.choose("token_embd.weight", &[1600, 50257], F16).unwrap(),
            Choice {
                ty: Q8_0,
                differs: None
            }
        );
        // Q6_K → Q8_0 is llama.cpp's own fallback: no difference.
        let p = Policy::new(FileType::Q6K, 48, false);
        assert_eq!(
            p.choose("blk.0.ffn_up.weight", &[1600, 6400], F16).unwrap(),
            Choice {
                ty: Q8_0,
                differs: None
            }
        );
        // A row that not even Q8_0 divides ends in F16, as in llama.cpp…
        assert_eq!(
            p.choose("blk.0.ffn_up.weight", &[100, 400], F16).unwrap(),
            same(F16)
        );
        // … except where Q8_0 was the type asked for: llama-quantize refuses that tensor.
        let p = Policy::new(FileType::Q8_0, 48, false);
        assert_eq!(
            p.choose("blk.0.ffn_up.weight", &[100, 400], F16).unwrap(),
            Choice {
                ty: F16,
                differs: Some(Fallback {
                    wanted: Q8_0,
                    llama_cpp: None
                })
            }
        );
        // ffn_down of 6400 = 25·256 divides.
        let p = Policy::new(FileType::Q4KM, 48, false);
        assert_eq!(
            p.choose("blk.0.ffn_down.weight", &[6400, 1600], F16)
                .unwrap()
                .ty,
            Q6K
        );
    }

    #[test]
    fn order_is_llama_cpp_s() {
        let mut v = gpt2_names(12);
        v.reverse();
        v.sort_by(|a, b| tensor_order(a, b));
        assert_eq!(
            &v[..4],
            [
                "output_norm.bias",
                "output_norm.weight",
                "position_embd.weight",
                "token_embd.weight"
            ]
        );
        assert_eq!(v[4], "blk.0.attn_norm.bias");
        assert_eq!(v[5], "blk.0.attn_norm.weight");
        assert_eq!(v[15], "blk.0.ffn_up.weight");
        assert_eq!(v[16], "blk.1.attn_norm.bias");
        assert!(
            v.iter().position(|n| n == "blk.10.attn_norm.bias")
                > v.iter().position(|n| n == "blk.9.ffn_up.weight")
        );
    }

    #[test]
    fn ftype_names() {
        assert_eq!(FileType::parse("q4_k_m"), Some(FileType::Q4KM));
        assert_eq!(FileType::parse("Q8_0"), Some(FileType::Q8_0));
        assert_eq!(FileType::parse("q4_0"), None);
        assert_eq!(FileType::from_code(18), Some(FileType::Q6K));
        assert_eq!(FileType::from_code(17), Some(FileType::Q5KM));
        assert_eq!(FileType::from_code(16), Some(FileType::Q5KS));
        assert_eq!(FileType::parse("q5_k_m"), Some(FileType::Q5KM));
        assert_eq!(FileType::parse("Q5_K_S"), Some(FileType::Q5KS));
        assert_eq!(FileType::parse_list("all").unwrap(), FileType::ALL);
        assert_eq!(
            FileType::parse_list("q5_k_s, q5_k_m").unwrap(),
            [FileType::Q5KS, FileType::Q5KM]
        );
        assert_eq!(
            FileType::parse_list("f16,q5_k").unwrap_err(),
            UnknownFileType {
                given: "q5_k".into()
            }
        );
    }

    #[test]
    fn names_that_do_not_fit_the_model_are_typed_errors() {
        let p = Policy::new(FileType::Q4KM, 2, false);
        assert_eq!(
            p.choose("blk.2.ffn_down.weight", &[1024, 256], F16)
                .unwrap_err(),
            PolicyError::LayerOutOfRange {
                name: "blk.2.ffn_down.weight".into(),
                layer: 2,
                n_layer: 2
            }
        );
        assert!(matches!(
            p.choose("ffn_down.weight", &[1024, 256], F16),
            Err(PolicyError::NoLayer { .. })
        ));
        assert_eq!(ggml_n_dims(&[1024, 1]), 1);
        assert_eq!(ggml_n_dims(&[1, 1024]), 2);
    }
}
