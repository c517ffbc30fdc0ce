//! The non-tensor half of a Hugging Face GPT-2 checkpoint: `config.json` (hyper-parameters) and
//! the byte-level BPE tokenizer (`tokenizer.json`, or `vocab.json` + `merges.txt`), read the way
//! llama.cpp's `convert_hf_to_gguf.py` reads them so the GGUF metadata we write is the same.
//!
//! Every file is untrusted: each field is type-checked and range-checked, and every error names
//! the file and what is wrong with it.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use ggpt_gguf::gpt2;
use serde_json::Value as Json;

/// A problem with an input of the converter (a checkpoint file or directory, a GGUF file to
/// requantize): which file, and what is wrong with it. A typed error so that callers can tell
/// a bad input from an I/O or usage error (the CLI gives it the "bad input file" exit code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    pub path: PathBuf,
    pub problem: String,
}

impl InputError {
    pub fn new(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        InputError {
            path: path.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.problem)
    }
}

impl std::error::Error for InputError {}

type Result<T> = std::result::Result<T, InputError>;

/// Activation functions we accept: both names HF uses for GELU's tanh approximation, which is
/// what llama.cpp's GPT-2 graph (and ggpt's) computes. The erf form (`gelu`) would silently give
/// slightly different activations, so it is refused.
pub const ACCEPTED_ACTIVATIONS: &[&str] = &["gelu_new", "gelu_pytorch_tanh"];

/// Upper bounds that keep every size product far from overflow and reject absurd configs early.
const MAX_DIM: u64 = 1 << 20;
const MAX_LAYERS: u64 = 1 << 12;
const MAX_VOCAB: u64 = 1 << 24;

/// GPT-2 hyper-parameters from `config.json`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct HfConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    /// Feed-forward width: `n_inner`, or 4·n_embd when it is null/absent.
    pub n_ff: usize,
    /// Number of learned positions (`n_positions`, or the legacy `n_ctx`).
    pub n_ctx: usize,
    pub vocab_size: usize,
    pub layer_norm_eps: f32,
    pub activation: String,
    /// `tie_word_embeddings` (default true): the output head is `wte`. When false the
    /// checkpoint's own `lm_head.weight` becomes GGUF `output.weight`.
    pub tie_word_embeddings: bool,
}

fn read_json(path: &Path) -> Result<Json> {
    let text =
        fs::read_to_string(path).map_err(|e| InputError::new(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| InputError::new(path, format!("invalid JSON: {e}")))
}

/// Read an optional JSON file: `Ok(None)` when it does not exist.
fn read_json_opt(path: &Path) -> Result<Option<Json>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

impl HfConfig {
    pub fn load(dir: &Path) -> Result<HfConfig> {
        let path = dir.join("config.json");
        if let Some(why) = crate::atomic::not_a_regular_file(&path) {
            return Err(InputError::new(
                &path,
                format!("{why} (a Hugging Face model directory needs config.json)"),
            ));
        }
        let json = read_json(&path)?;
        HfConfig::from_json(&json, &path)
    }

    /// Validate a parsed `config.json`; `path` is only used in error messages.
    pub fn from_json(json: &Json, path: &Path) -> Result<HfConfig> {
        let err = |msg: String| InputError::new(path, msg);
        let obj = json
            .as_object()
            .ok_or_else(|| err("expected a JSON object".into()))?;

        match obj.get("model_type") {
            Some(Json::String(t)) if t == "gpt2" => {}
            Some(Json::String(t)) => {
                return Err(err(format!(
                "model_type is {t:?}; only GPT-2 checkpoints (model_type \"gpt2\") are supported"
            )))
            }
            _ => {
                return Err(err(
                    "model_type is missing or not a string; expected \"gpt2\"".into(),
                ))
            }
        }

        // Variants of the GPT-2 architecture that change the math: llama.cpp's graph (and ours)
        // implements none of them, so converting would produce a model that runs but is wrong.
        // (`reorder_and_upcast_attn` is not among them: it only makes transformers compute the
        // attention scores in fp32 with the scale applied first, the same math that ggpt and
        // llama.cpp do in f32 anyway, so it is accepted either way.)
        for (key, bad, why) in [
            (
                "scale_attn_by_inverse_layer_idx",
                true,
                "scales attention scores by 1/(layer+1)",
            ),
            (
                "scale_attn_weights",
                false,
                "disables the 1/sqrt(head_dim) attention scale",
            ),
            (
                "add_cross_attention",
                true,
                "adds encoder-decoder cross-attention layers",
            ),
        ] {
            match obj.get(key) {
                None | Some(Json::Null) => {}
                Some(Json::Bool(v)) if *v == bad => {
                    return Err(err(format!(
                        "{key}: {v} is not supported (it {why}; llama.cpp's GPT-2 graph does not implement it)"
                    )))
                }
                Some(Json::Bool(_)) => {}
                Some(other) => return Err(err(format!("{key} must be a boolean, found {other}"))),
            }
        }

        let get_uint = |key: &str, max: u64| -> Result<Option<usize>> {
            match obj.get(key) {
                None | Some(Json::Null) => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if n >= 1 && n <= max => Ok(Some(n as usize)),
                    Some(n) => Err(err(format!("{key} = {n} is out of range (1..={max})"))),
                    None => Err(err(format!("{key} must be a positive integer, found {v}"))),
                },
            }
        };
        let require = |key: &str, max: u64| -> Result<usize> {
            get_uint(key, max)?.ok_or_else(|| err(format!("{key} is missing")))
        };

        let n_layer = require("n_layer", MAX_LAYERS)?;
        let n_embd = require("n_embd", MAX_DIM)?;
        let n_head = require("n_head", MAX_DIM)?;
        let vocab_size = require("vocab_size", MAX_VOCAB)?;
        let n_ff = get_uint("n_inner", MAX_DIM)?.unwrap_or(4 * n_embd);
        let n_ctx = match (get_uint("n_positions", MAX_DIM)?, get_uint("n_ctx", MAX_DIM)?) {
            (Some(p), Some(c)) if p != c => {
                return Err(err(format!(
                    "n_positions = {p} and n_ctx = {c} disagree; the position table has n_positions rows"
                )))
            }
            (Some(p), _) => p,
            (None, Some(c)) => c,
            (None, None) => return Err(err("neither n_positions nor n_ctx is present".into())),
        };
        if !n_embd.is_multiple_of(n_head) {
            return Err(err(format!(
                "n_embd = {n_embd} is not a multiple of n_head = {n_head}"
            )));
        }

        let layer_norm_eps = match obj.get("layer_norm_epsilon") {
            None | Some(Json::Null) => return Err(err("layer_norm_epsilon is missing".into())),
            Some(v) => match v.as_f64() {
                Some(e) if e.is_finite() && e > 0.0 && e < 1.0 => e as f32,
                _ => {
                    return Err(err(format!(
                        "layer_norm_epsilon must be a number in (0, 1), found {v}"
                    )))
                }
            },
        };

        let activation = match obj.get("activation_function") {
            Some(Json::String(a)) if ACCEPTED_ACTIVATIONS.contains(&a.as_str()) => a.clone(),
            Some(Json::String(a)) => {
                return Err(err(format!(
                    "activation_function {a:?} is not supported; accepted: {} (GELU, tanh approximation)",
                    ACCEPTED_ACTIVATIONS.join(", ")
                )))
            }
            // transformers' GPT2Config default.
            None | Some(Json::Null) => "gelu_new".to_string(),
            Some(other) => return Err(err(format!("activation_function must be a string, found {other}"))),
        };

        let tie_word_embeddings = match obj.get("tie_word_embeddings") {
            None | Some(Json::Null) => true,
            Some(Json::Bool(b)) => *b,
            Some(other) => {
                return Err(err(format!(
                    "tie_word_embeddings must be a boolean, found {other}"
                )))
            }
        };

        Ok(HfConfig {
            tie_word_embeddings,
            n_layer,
            n_embd,
            n_head,
            n_ff,
            n_ctx,
            vocab_size,
            layer_norm_eps,
            activation,
        })
    }

    /// Number of parameters of the GGUF model (without a duplicate output head).
    pub fn n_params(&self) -> u64 {
        let (e, f, l) = (self.n_embd as u64, self.n_ff as u64, self.n_layer as u64);
        let per_layer = 4 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * f + f) + (f * e + e);
        (self.vocab_size as u64 + self.n_ctx as u64) * e + 2 * e + l * per_layer
    }
}

/// llama.cpp token types (`llama_token_type` / gguf-py `TokenType`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
}

/// Special-token kinds in the order gguf-py's `SpecialVocab` looks them up, with the GGUF key
/// each is written under (`None`: the Feb-2025 gguf-py has no writer for it, so it is skipped).
const SPECIAL_KINDS: &[(&str, Option<&str>)] = &[
    ("bos", Some("tokenizer.ggml.bos_token_id")),
    ("eos", Some("tokenizer.ggml.eos_token_id")),
    ("unk", Some("tokenizer.ggml.unknown_token_id")),
    ("sep", Some("tokenizer.ggml.seperator_token_id")),
    ("pad", Some("tokenizer.ggml.padding_token_id")),
    ("cls", None),
    ("mask", Some("tokenizer.ggml.mask_token_id")),
];

/// `add_{kind}_token` flags gguf-py knows how to write.
const ADD_FLAG_KEYS: &[(&str, &str)] = &[
    ("bos", "tokenizer.ggml.add_bos_token"),
    ("eos", "tokenizer.ggml.add_eos_token"),
];

/// The tokenizer as GGUF stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct HfVocab {
    /// One string per id, `vocab_size` long (gaps filled with `[PAD{id}]`, type UNUSED).
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    /// "left right" pairs; the rank is the index.
    pub merges: Vec<String>,
    /// `(GGUF key, id)` in the order llama.cpp's converter writes them.
    pub special_ids: Vec<(&'static str, u32)>,
    /// `(GGUF key, value)` for `add_bos_token` / `add_eos_token` when tokenizer_config.json sets them.
    pub add_flags: Vec<(&'static str, bool)>,
    pub chat_template: Option<String>,
    /// Where the vocabulary and merges were read from (for messages).
    pub source: String,
}

/// An added token from tokenizer.json (`added_tokens`) or tokenizer_config.json (`added_tokens_decoder`).
#[derive(Debug, Clone)]
struct AddedToken {
    id: usize,
    content: String,
    special: bool,
}

impl HfVocab {
    /// Read the tokenizer like llama.cpp does: `tokenizer.json` when present (the fast tokenizer
    /// `AutoTokenizer` would load), otherwise `vocab.json` + `merges.txt`.
    pub fn load(dir: &Path, config: &HfConfig) -> Result<HfVocab> {
        let tj_path = dir.join("tokenizer.json");
        let tokenizer_json = read_json_opt(&tj_path)?;
        let tc_path = dir.join("tokenizer_config.json");
        let tokenizer_config = read_json_opt(&tc_path)?;
        let config_path = dir.join("config.json");
        let config_json = read_json_opt(&config_path)?;

        // Which file each part came from, so that errors name a file that exists.
        let (vocab, merges, added, source, vocab_file, merges_file, added_file) =
            match &tokenizer_json {
                Some(tj) => {
                    let model = tj
                        .get("model")
                        .and_then(Json::as_object)
                        .ok_or_else(|| InputError::new(&tj_path, "no \"model\" object"))?;
                    match model.get("type") {
                        Some(Json::String(t)) if t == "BPE" => {}
                        other => {
                            return Err(InputError::new(
                                &tj_path,
                                format!(
                                "model.type is {other:?}; a GPT-2 tokenizer is byte-level \"BPE\""
                            ),
                            ))
                        }
                    }
                    let vocab_json = model
                        .get("vocab")
                        .ok_or_else(|| InputError::new(&tj_path, "model.vocab is missing"))?;
                    let vocab = parse_vocab(vocab_json, &tj_path, "model.vocab")?;
                    let merges_json = model
                        .get("merges")
                        .ok_or_else(|| InputError::new(&tj_path, "model.merges is missing"))?;
                    let merges = parse_merges_json(merges_json, &tj_path)?;
                    let added = parse_added_tokens(tj.get("added_tokens"), &tj_path)?;
                    (
                        vocab,
                        merges,
                        added,
                        "tokenizer.json".to_string(),
                        tj_path.clone(),
                        tj_path.clone(),
                        tj_path.clone(),
                    )
                }
                None => {
                    let vocab_path = dir.join("vocab.json");
                    if !vocab_path.is_file() {
                        return Err(InputError::new(
                        &vocab_path,
                        "missing: the tokenizer needs tokenizer.json or vocab.json + merges.txt",
                    ));
                    }
                    let vocab =
                        parse_vocab(&read_json(&vocab_path)?, &vocab_path, "the top level")?;
                    let merges_path = dir.join("merges.txt");
                    if !merges_path.is_file() {
                        return Err(InputError::new(
                        &merges_path,
                        "missing: vocab.json needs merges.txt next to it (or provide tokenizer.json)",
                    ));
                    }
                    let text = fs::read_to_string(&merges_path).map_err(|e| {
                        InputError::new(&merges_path, format!("cannot read as UTF-8 text: {e}"))
                    })?;
                    let merges = parse_merges_txt(&text, &merges_path)?;
                    let added = match &tokenizer_config {
                        Some(tc) => {
                            parse_added_tokens_decoder(tc.get("added_tokens_decoder"), &tc_path)?
                        }
                        None => Vec::new(),
                    };
                    (
                        vocab,
                        merges,
                        added,
                        "vocab.json + merges.txt".to_string(),
                        vocab_path,
                        merges_path,
                        tc_path.clone(),
                    )
                }
            };
        if merges.is_empty() {
            return Err(InputError::new(
                &merges_file,
                "no merges: a BPE tokenizer cannot work without them",
            ));
        }

        let n = config.vocab_size;
        let mut tokens: Vec<Option<String>> = vec![None; n];
        let mut types = vec![token_type::NORMAL; n];
        for (text, id) in vocab {
            if id >= n {
                return Err(InputError::new(
                    &vocab_file,
                    format!("token {text:?} has id {id}, but config.json vocab_size is {n}"),
                ));
            }
            if let Some(prev) = &tokens[id] {
                return Err(InputError::new(
                    &vocab_file,
                    format!("tokens {prev:?} and {text:?} share id {id}"),
                ));
            }
            tokens[id] = Some(text);
        }

        // Added tokens. Without any list (a bare vocab.json), transformers' GPT2Tokenizer still
        // registers its default special token `<|endoftext|>`, so mirror that.
        let mut added = added;
        if added.is_empty() && tokenizer_json.is_none() {
            if let Some(id) = tokens
                .iter()
                .position(|t| t.as_deref() == Some("<|endoftext|>"))
            {
                added.push(AddedToken {
                    id,
                    content: "<|endoftext|>".into(),
                    special: true,
                });
            }
        }
        for a in &added {
            if a.id >= n {
                return Err(InputError::new(
                    &added_file,
                    format!(
                        "added token {:?} has id {}, but vocab_size is {n}",
                        a.content, a.id
                    ),
                ));
            }
            tokens[a.id] = Some(a.content.clone());
            types[a.id] = if a.special || looks_special(&a.content) {
                token_type::CONTROL
            } else {
                token_type::USER_DEFINED
            };
        }
        let tokens: Vec<String> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                t.unwrap_or_else(|| {
                    types[i] = token_type::UNUSED;
                    format!("[PAD{i}]")
                })
            })
            .collect();

        // Special token ids and add_*_token flags, in gguf-py SpecialVocab's order: names in
        // tokenizer_config.json resolved through tokenizer.json's added tokens first, then the
        // `*_token_id` fields of config.json for kinds still unset.
        let mut special: Vec<(&'static str, usize)> = Vec::new();
        let mut add_flags = Vec::new();
        let mut chat_template = None;
        if let Some(tc) = &tokenizer_config {
            let tc_obj = tc
                .as_object()
                .ok_or_else(|| InputError::new(&tc_path, "expected a JSON object"))?;
            match tc_obj.get("chat_template") {
                None | Some(Json::Null) => {}
                Some(Json::String(s)) => chat_template = Some(s.clone()),
                Some(_) => {
                    eprintln!(
                        "warning: {}: chat_template is not a string; not copied",
                        tc_path.display()
                    )
                }
            }
            // Only tokenizer.json's added tokens resolve names (as in gguf-py).
            let resolvable = if tokenizer_json.is_some() {
                &added[..]
            } else {
                &[]
            };
            for &(kind, key) in SPECIAL_KINDS {
                if let Some(Json::Bool(b)) = tc_obj.get(&format!("add_{kind}_token")) {
                    if let Some(&(_, flag_key)) = ADD_FLAG_KEYS.iter().find(|(k, _)| *k == kind) {
                        add_flags.push((flag_key, *b));
                    }
                }
                let content = match tc_obj.get(&format!("{kind}_token")) {
                    Some(Json::String(s)) => s.as_str(),
                    Some(Json::Object(o)) => match o.get("content") {
                        Some(Json::String(s)) => s.as_str(),
                        _ => continue,
                    },
                    _ => continue,
                };
                if let (Some(a), Some(key)) =
                    (resolvable.iter().find(|a| a.content == content), key)
                {
                    if !special.iter().any(|(k, _)| *k == key) {
                        special.push((key, a.id));
                    }
                }
            }
        }
        if let Some(cj) = &config_json {
            for &(kind, key) in SPECIAL_KINDS {
                let field = format!("{kind}_token_id");
                match cj.get(&field) {
                    None | Some(Json::Null) => {}
                    Some(v) => {
                        // gguf-py ignores non-integers (e.g. a list of eos ids) silently; so do we.
                        if let Some(i) = v.as_i64() {
                            if i < 0 || i as u64 >= n as u64 {
                                return Err(InputError::new(
                                    &config_path,
                                    format!("{field} = {i} is outside the vocabulary (0..{n})"),
                                ));
                            }
                            if let Some(key) = key {
                                if !special.iter().any(|(k, _)| *k == key) {
                                    special.push((key, i as usize));
                                }
                            }
                        }
                    }
                }
            }
        }
        let special_ids = special.into_iter().map(|(k, id)| (k, id as u32)).collect();

        Ok(HfVocab {
            tokens,
            token_types: types,
            merges,
            special_ids,
            add_flags,
            chat_template,
            source,
        })
    }
}

/// gguf-py's heuristic for added tokens that should be CONTROL although not flagged special.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

fn parse_vocab(json: &Json, path: &Path, what: &str) -> Result<Vec<(String, usize)>> {
    let obj = json.as_object().ok_or_else(|| {
        InputError::new(
            path,
            format!("{what}: expected an object mapping token → id"),
        )
    })?;
    let mut out = Vec::with_capacity(obj.len());
    for (text, id) in obj {
        let id = id.as_u64().filter(|&i| i < MAX_VOCAB).ok_or_else(|| {
            InputError::new(path, format!("{what}: token {text:?} has invalid id {id}"))
        })?;
        out.push((text.clone(), id as usize));
    }
    Ok(out)
}

/// `model.merges` of tokenizer.json: either "a b" strings or (since transformers 4.45) `[a, b]`
/// pairs, which gguf stores as "a b" with spaces inside a part mapped to U+0120 like byte-level BPE.
fn parse_merges_json(json: &Json, path: &Path) -> Result<Vec<String>> {
    let list = json
        .as_array()
        .ok_or_else(|| InputError::new(path, "model.merges: expected a list"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        match m {
            Json::String(s) => {
                if s.split(' ').filter(|p| !p.is_empty()).count() != 2 {
                    return Err(InputError::new(
                        path,
                        format!("model.merges[{i}] = {s:?} is not \"left right\""),
                    ));
                }
                out.push(s.clone());
            }
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] if !a.is_empty() && !b.is_empty() => {
                    let enc = |p: &str| p.replace(' ', "\u{120}");
                    out.push(format!("{} {}", enc(a), enc(b)));
                }
                _ => {
                    return Err(InputError::new(
                        path,
                        format!("model.merges[{i}] is not a pair of strings"),
                    ))
                }
            },
            _ => {
                return Err(InputError::new(
                    path,
                    format!("model.merges[{i}] is neither a string nor a pair"),
                ))
            }
        }
    }
    Ok(out)
}

/// merges.txt: an optional `#version` line, then one "left right" pair per line.
pub(crate) fn parse_merges_txt(text: &str, path: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (i == 0 && line.starts_with('#')) {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => out.push(format!("{a} {b}")),
            _ => {
                return Err(InputError::new(
                    path,
                    format!(
                        "line {}: expected two space-separated symbols, found {line:?}",
                        i + 1
                    ),
                ))
            }
        }
    }
    Ok(out)
}

fn parse_added_tokens(json: Option<&Json>, path: &Path) -> Result<Vec<AddedToken>> {
    let list = match json {
        None | Some(Json::Null) => return Ok(Vec::new()),
        Some(Json::Array(l)) => l,
        Some(_) => return Err(InputError::new(path, "added_tokens: expected a list")),
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let id = t
            .get("id")
            .and_then(Json::as_u64)
            .filter(|&i| i < MAX_VOCAB);
        let content = t.get("content").and_then(Json::as_str);
        match (id, content) {
            (Some(id), Some(content)) => out.push(AddedToken {
                id: id as usize,
                content: content.to_string(),
                special: t.get("special").and_then(Json::as_bool).unwrap_or(false),
            }),
            _ => {
                return Err(InputError::new(
                    path,
                    format!("added_tokens[{i}] lacks a valid id or content"),
                ))
            }
        }
    }
    Ok(out)
}

fn parse_added_tokens_decoder(json: Option<&Json>, path: &Path) -> Result<Vec<AddedToken>> {
    let map = match json {
        None | Some(Json::Null) => return Ok(Vec::new()),
        Some(Json::Object(m)) => m,
        Some(_) => {
            return Err(InputError::new(
                path,
                "added_tokens_decoder: expected an object",
            ))
        }
    };
    let mut out = Vec::with_capacity(map.len());
    for (id, t) in map {
        let id: usize = id
            .parse()
            .ok()
            .filter(|&i: &usize| (i as u64) < MAX_VOCAB)
            .ok_or_else(|| InputError::new(path, format!("added_tokens_decoder: bad id {id:?}")))?;
        let content = t.get("content").and_then(Json::as_str).ok_or_else(|| {
            InputError::new(path, format!("added_tokens_decoder[{id}] has no content"))
        })?;
        out.push(AddedToken {
            id,
            content: content.to_string(),
            special: t.get("special").and_then(Json::as_bool).unwrap_or(false),
        });
    }
    Ok(out)
}

/// What a Hugging Face tensor name means for the GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HfTensor {
    /// Written under `gguf_name`; `transpose` for Conv1D weights stored [in, out].
    Keep {
        gguf_name: String,
        /// Expected HF shape (row-major, as stored).
        hf_shape: Vec<usize>,
        transpose: bool,
    },
    /// Causal-mask buffers: recomputed by every runtime, so not converted.
    DropBuffer,
    /// `lm_head.weight` of a tied model: it is `wte`, so it is not written.
    TiedHead,
    /// The head of another task (`score.weight` of GPT2ForSequenceClassification, …): not
    /// part of the language model, skipped with a note.
    ExtraHead,
}

/// Tensors of task heads other than the language-model head (GPT2ForSequenceClassification,
/// GPT2ForTokenClassification, GPT2ForQuestionAnswering, GPT2DoubleHeadsModel).
pub fn is_extra_head(name: &str) -> bool {
    name == "score.weight"
        || name == "score.bias"
        || name.starts_with("classifier.")
        || name.starts_with("qa_outputs.")
        || name.starts_with("multiple_choice_head.")
}

/// A checkpoint tensor of a layer beyond `n_layer`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("layer {layer} is out of range: config.json has n_layer = {n_layer}")]
pub struct LayerOutOfRange {
    pub layer: usize,
    pub n_layer: usize,
}

/// How each GGUF tensor comes from a Hugging Face GPT-2 checkpoint: the HF name (without the
/// `transformer.` prefix; `h.N.` for a block tensor), and its HF shape in units of
/// [`Dim`]. 2-D weights are Conv1D, stored [in, out], and are transposed on the way.
const GLOBAL_MAP: [(&str, &str, &[Dim]); 5] = [
    (gpt2::TOKEN_EMBD, "wte.weight", &[Dim::Vocab, Dim::Embd]),
    (gpt2::POSITION_EMBD, "wpe.weight", &[Dim::Ctx, Dim::Embd]),
    ("output_norm.weight", "ln_f.weight", &[Dim::Embd]),
    ("output_norm.bias", "ln_f.bias", &[Dim::Embd]),
    (gpt2::OUTPUT, "lm_head.weight", &[Dim::Vocab, Dim::Embd]),
];
/// The HF name after `h.N.` and the HF shape of each of [`gpt2::BLOCK_TENSORS`], in its order.
const BLOCK_MAP: [(&str, &[Dim]); 12] = [
    ("ln_1.weight", &[Dim::Embd]),
    ("ln_1.bias", &[Dim::Embd]),
    ("attn.c_attn.weight", &[Dim::Embd, Dim::Qkv]),
    ("attn.c_attn.bias", &[Dim::Qkv]),
    ("attn.c_proj.weight", &[Dim::Embd, Dim::Embd]),
    ("attn.c_proj.bias", &[Dim::Embd]),
    ("ln_2.weight", &[Dim::Embd]),
    ("ln_2.bias", &[Dim::Embd]),
    ("mlp.c_fc.weight", &[Dim::Embd, Dim::Ff]),
    ("mlp.c_fc.bias", &[Dim::Ff]),
    ("mlp.c_proj.weight", &[Dim::Ff, Dim::Embd]),
    ("mlp.c_proj.bias", &[Dim::Embd]),
];

/// A dimension of a checkpoint tensor, resolved against the config.
#[derive(Clone, Copy, Debug)]
enum Dim {
    Vocab,
    Ctx,
    Embd,
    /// 3 × n_embd: query, key and value side by side.
    Qkv,
    Ff,
}

impl Dim {
    fn of(self, c: &HfConfig) -> usize {
        match self {
            Dim::Vocab => c.vocab_size,
            Dim::Ctx => c.n_ctx,
            Dim::Embd => c.n_embd,
            Dim::Qkv => 3 * c.n_embd,
            Dim::Ff => c.n_ff,
        }
    }
}

fn keep(gguf_name: String, dims: &[Dim], block: bool, c: &HfConfig) -> HfTensor {
    HfTensor::Keep {
        gguf_name,
        hf_shape: dims.iter().map(|d| d.of(c)).collect(),
        // Only the blocks' matrices are Conv1D; wte, wpe and lm_head are [rows, n_embd].
        transpose: block && dims.len() == 2,
    }
}

/// Map a HF GPT-2 tensor name (with or without the `transformer.` prefix) to its GGUF meaning.
/// `Ok(None)` for a name that is not part of GPT-2; `Err` for a layer the config does not have.
pub fn map_tensor_name(
    name: &str,
    c: &HfConfig,
) -> std::result::Result<Option<HfTensor>, LayerOutOfRange> {
    let n = name.strip_prefix("transformer.").unwrap_or(name);
    if name == "lm_head.weight" && c.tie_word_embeddings {
        return Ok(Some(HfTensor::TiedHead));
    }
    if is_extra_head(name) {
        return Ok(Some(HfTensor::ExtraHead));
    }
    // `lm_head.weight` never carries the `transformer.` prefix.
    let global = if n == "lm_head.weight" && n != name {
        None
    } else {
        GLOBAL_MAP.iter().find(|(_, hf, _)| *hf == n)
    };
    if let Some((g, _, dims)) = global {
        return Ok(Some(keep(g.to_string(), dims, false, c)));
    }
    let Some(rest) = n.strip_prefix("h.") else {
        return Ok(None);
    };
    let Some((layer, field)) = rest.split_once('.') else {
        return Ok(None);
    };
    // Only canonical decimal layer numbers ("07" would alias "7").
    if layer.is_empty()
        || !layer.bytes().all(|b| b.is_ascii_digit())
        || (layer.len() > 1 && layer.starts_with('0'))
    {
        return Ok(None);
    }
    let Ok(i) = layer.parse::<usize>() else {
        return Ok(None);
    };
    if field == "attn.bias" || field == "attn.masked_bias" {
        return Ok(Some(HfTensor::DropBuffer));
    }
    let Some(k) = BLOCK_MAP.iter().position(|(hf, _)| *hf == field) else {
        return Ok(None);
    };
    if i >= c.n_layer {
        return Err(LayerOutOfRange {
            layer: i,
            n_layer: c.n_layer,
        });
    }
    let g = gpt2::block_tensor(i as u64, gpt2::BLOCK_TENSORS[k]);
    Ok(Some(keep(g, BLOCK_MAP[k].1, true, c)))
}

/// Every GGUF tensor a GPT-2 checkpoint must provide, with the canonical HF name it comes from.
pub fn expected_tensors(c: &HfConfig) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = GLOBAL_MAP
        .iter()
        .filter(|(g, _, _)| *g != gpt2::OUTPUT || !c.tie_word_embeddings)
        .map(|(g, hf, _)| (g.to_string(), hf.to_string()))
        .collect();
    for i in 0..c.n_layer {
        for (g, (h, _)) in gpt2::BLOCK_TENSORS.iter().zip(BLOCK_MAP) {
            out.push((gpt2::block_tensor(i as u64, g), format!("h.{i}.{h}")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(extra: Json) -> std::result::Result<HfConfig, InputError> {
        let mut base = json!({
            "model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 32,
            "vocab_size": 100, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
        });
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        HfConfig::from_json(&base, Path::new("cfg/config.json"))
    }

    #[test]
    fn config_defaults_and_aliases() {
        let c = cfg(json!({})).unwrap();
        assert_eq!((c.n_ff, c.n_ctx, c.layer_norm_eps), (256, 32, 1e-5f32));
        let c = cfg(json!({"n_inner": 100, "n_positions": null, "n_ctx": 16})).unwrap();
        assert_eq!((c.n_ff, c.n_ctx), (100, 16));
        // Precision-only flag: same math in f32.
        assert!(cfg(json!({"reorder_and_upcast_attn": true})).is_ok());
        assert!(cfg(json!({})).unwrap().tie_word_embeddings);
        assert!(
            !cfg(json!({"tie_word_embeddings": false}))
                .unwrap()
                .tie_word_embeddings
        );
    }

    #[test]
    fn config_refusals_name_the_problem() {
        for (extra, needle) in [
            (json!({"model_type": "llama"}), "model_type is \"llama\""),
            (
                json!({"scale_attn_by_inverse_layer_idx": true}),
                "scale_attn_by_inverse_layer_idx",
            ),
            (
                json!({"activation_function": "relu"}),
                "gelu_new, gelu_pytorch_tanh",
            ),
            (json!({"n_head": 5}), "not a multiple of n_head"),
            (json!({"n_embd": -3}), "n_embd must be a positive integer"),
            (json!({"n_layer": null}), "n_layer is missing"),
            (json!({"n_ctx": 64}), "disagree"),
            (json!({"layer_norm_epsilon": "x"}), "layer_norm_epsilon"),
        ] {
            let e = cfg(extra.clone()).unwrap_err();
            assert!(e.to_string().starts_with("cfg/config.json: "), "{e}");
            assert!(e.to_string().contains(needle), "{extra}: {e}");
        }
    }

    #[test]
    fn merges_formats() {
        let p = Path::new("m.txt");
        assert_eq!(
            parse_merges_txt("#version: 0.2\nĠ t\n\nh e\n", p).unwrap(),
            vec!["Ġ t", "h e"]
        );
        let e = parse_merges_txt("#v\na b c\n", p).unwrap_err();
        assert!(e.problem.contains("line 2"), "{e}");
        let j = json!(["a b", ["c d", "e"]]);
        assert_eq!(
            parse_merges_json(&j, p).unwrap(),
            vec!["a b", "c\u{120}d e"]
        );
        assert!(parse_merges_json(&json!([["a"]]), p).is_err());
    }

    #[test]
    fn names_map_with_and_without_prefix() {
        let c = cfg(json!({})).unwrap();
        let a = map_tensor_name("transformer.h.1.mlp.c_fc.weight", &c).unwrap();
        let b = map_tensor_name("h.1.mlp.c_fc.weight", &c).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a,
            Some(HfTensor::Keep {
                gguf_name: "blk.1.ffn_up.weight".into(),
                hf_shape: vec![64, 256],
                transpose: true
            })
        );
        assert_eq!(
            map_tensor_name("h.0.attn.masked_bias", &c).unwrap(),
            Some(HfTensor::DropBuffer)
        );
        assert_eq!(
            map_tensor_name("lm_head.weight", &c).unwrap(),
            Some(HfTensor::TiedHead)
        );
        assert_eq!(map_tensor_name("h.01.ln_1.weight", &c).unwrap(), None);
        assert_eq!(map_tensor_name("foo.weight", &c).unwrap(), None);
        assert_eq!(
            map_tensor_name("h.2.ln_1.weight", &c).unwrap_err(),
            LayerOutOfRange {
                layer: 2,
                n_layer: 2
            }
        );
        assert_eq!(expected_tensors(&c).len(), 4 + 2 * 12);
    }
}
