//! Memory accounting: what a GPT-2 GGUF costs in RAM (and in VRAM on a GPU runtime), predicted
//! from the file's shapes, and what a process actually holds (peak RSS from /proc).
//!
//! The prediction mirrors ggpt's own allocations (see `Session`): mapped weights, the KV cache,
//! activation scratch sized to the batch, and the logits buffer. docs/memory.md explains each term.

use std::fmt;

/// The shapes that decide memory use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemShape {
    pub n_layer: u64,
    pub n_embd: u64,
    pub n_ff: u64,
    pub n_head: u64,
    pub n_vocab: u64,
    /// Whether the MLP's down projection (the matmul with the widest input, `n_ff` values per
    /// token) has float weights (F16, BF16, F32), whose prompts copy their activations as f32
    /// (see [`micro_batch_bytes`]); otherwise they are quantized to Q8_K or Q8_0.
    pub float_down: bool,
}

impl MemShape {
    /// The shape of a loaded model.
    pub fn of(model: &crate::model::Model) -> MemShape {
        let hp = model.hparams();
        let down = model.gpt2().weights().layers.first();
        MemShape {
            n_layer: hp.n_layer,
            n_embd: hp.n_embd,
            n_ff: hp.n_ff,
            n_head: hp.n_head,
            n_vocab: hp.n_vocab,
            float_down: down.is_some_and(|l| l.ffn_down.view().ty().block_size() == 1),
        }
    }

    /// GPT-2 Medium (345M).
    pub const GPT2_MEDIUM: MemShape = MemShape {
        n_layer: 24,
        n_embd: 1024,
        n_ff: 4096,
        n_head: 16,
        n_vocab: 50257,
        float_down: false,
    };
}

/// Bytes of a KV cache holding `n_ctx` positions for `n_seq` sequences, `elem` bytes per value:
/// K and V, every layer, one `n_embd` vector per position.
pub fn kv_cache_bytes(s: &MemShape, n_ctx: u64, n_seq: u64, elem: u64) -> u64 {
    2 * s.n_layer * n_ctx * s.n_embd * elem * n_seq
}

/// Bytes of the logits buffer for `rows` output rows (f32).
pub fn logits_bytes(s: &MemShape, rows: u64) -> u64 {
    rows * s.n_vocab * 4
}

/// The GPU compute-buffer model (see docs/memory.md): a GPU runtime evaluates a micro-batch of
/// `n_ubatch` tokens with every intermediate of one layer alive at once — the residual stream,
/// the normalised input, Q|K|V, the attention scores (`n_head × n_ubatch × n_ctx`, f32), the
/// attention output, and the FFN hidden state (`n_ff` wide) — plus the logits of the outputs.
/// llama.cpp's graph allocator reuses buffers between layers, so one layer's worth is the peak.
pub fn gpu_compute_bytes(s: &MemShape, n_ctx: u64, n_ubatch: u64, n_outputs: u64) -> u64 {
    let f = 4;
    let per_token = (s.n_embd * 2 + s.n_embd * 3 + s.n_embd + s.n_ff) * f;
    let scores = s.n_head * n_ubatch * n_ctx * f;
    n_ubatch * per_token + scores + logits_bytes(s, n_outputs)
}

/// What running a model needs, term by term (bytes).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Estimate {
    /// The whole GGUF file, mapped (weights + metadata); resident once touched.
    pub file_bytes: u64,
    /// Of which tensor data.
    pub tensor_bytes: u64,
    /// K and V for every layer at `n_ctx` positions and `n_seq` sequences.
    pub kv_bytes: u64,
    /// Activation buffers and the matmul's quantized activations of the micro-batch that
    /// peaks beside the KV cache, and the per-thread attention rows.
    pub scratch_bytes: u64,
    /// The logits buffer (`n_seq` rows of `n_vocab` f32).
    pub logits_bytes: u64,
    /// Tokenizer tables, copied norm/bias vectors, the program itself (measured constant).
    pub runtime_bytes: u64,
    /// Sum of the above: what ggpt's resident set should peak at.
    pub ram_total: u64,
    /// The compute buffer a GPU runtime would allocate ([`gpu_compute_bytes`]).
    pub gpu_compute_bytes: u64,
    /// Tensor data + KV cache + compute buffer: what full GPU offload needs in VRAM.
    pub vram_total: u64,
}

/// The run being estimated.
#[derive(Clone, Copy, Debug)]
pub struct RunShape {
    pub n_ctx: u64,
    /// Prompt tokens per call into the model; the session runs each call in the micro-batches
    /// of [`ggpt_models::gpt2::forward::micro_batches`] (one pass for up to `UBATCH` tokens).
    pub n_batch: u64,
    pub n_seq: u64,
    /// Bytes per KV element (2 for F16, 4 for F32).
    pub kv_elem: u64,
    pub threads: u64,
}

/// Resident memory of the process that is not model-dependent in a simple way: the tokenizer's
/// maps (~50 k tokens and merges), the executable and its libraries, thread stacks. Measured
/// with `ggpt mem --measure` on the tiny and GPT-2-Medium-shaped models (docs/memory.md).
pub const RUNTIME_BYTES: u64 = 14 * 1024 * 1024;

/// Activations of one micro-batch of `t` tokens: f32 rows of x, ln (also the attention
/// output), the head-major attention output (also the projection outputs), and one buffer for
/// Q|K|V and then the MLP hidden (3C or F, the wider); each token's position and sequence
/// (8 bytes each); the matmul's copy of the widest input's activations (F values): Q8_K
/// blocks for quantized weights (292 bytes per 256, Q8_0's 272 counted as that), and for float
/// weights from [`ggpt_quant::matmul::FLOAT_COPY_MIN_TOKENS`] tokens on 4 bytes a value: f32 in
/// the layout the AVX-512 and AVX2 outer-product tiles read (columns rounded up to 16), or two
/// bf16 parts in the AMX level's tiles (tokens and columns rounded up to 32), counted here as
/// the larger; scalar and NEON read the activations in place, so this is an upper bound there.
fn micro_batch_bytes(s: &MemShape, t: u64) -> u64 {
    let act_copy = if !s.float_down {
        t * s.n_ff.div_ceil(256) * 292
    } else if t >= ggpt_quant::matmul::FLOAT_COPY_MIN_TOKENS as u64 {
        4 * t.next_multiple_of(32) * s.n_ff.next_multiple_of(32)
    } else {
        0
    };
    4 * t * (3 * s.n_embd + (3 * s.n_embd).max(s.n_ff)) + 16 * t + act_copy
}

/// Predict memory from the model's shapes and file sizes.
pub fn estimate(s: &MemShape, file_bytes: u64, tensor_bytes: u64, r: &RunShape) -> Estimate {
    let kv_bytes = kv_cache_bytes(s, r.n_ctx, r.n_seq, r.kv_elem);
    let head_dim = s.n_embd / s.n_head.max(1);
    // The session's activations follow its current micro-batch, so what matters is the
    // largest of them beside the KV cache at each point: a prefill's passes, each beside the
    // cache filled so far (the short last pass beside the nearly full one), and a batched
    // decode step of n_seq tokens beside the full cache.
    let kv_per_pos = kv_cache_bytes(s, 1, 1, r.kv_elem);
    let mut activations = micro_batch_bytes(s, r.n_seq);
    let mut end = 0;
    while end < r.n_ctx {
        let call = r.n_batch.max(1).min(r.n_ctx - end);
        for u in ggpt_models::gpt2::forward::micro_batches(call as usize) {
            end += u as u64;
            let to_come = kv_per_pos * (r.n_ctx - end);
            activations = activations.max(micro_batch_bytes(s, u as u64).saturating_sub(to_come));
        }
    }
    // Per thread: one head's K and V in f32 and two rows of scores (queries go in pairs).
    let attention = r.threads * 4 * (2 * r.n_ctx * head_dim + 2 * (r.n_ctx + 4 * head_dim));
    // Per thread, float weights: the outer-product tile's packed panels, or at the AMX level
    // the bf16 weight tiles of the same size (prompts of FLOAT_COPY_MIN_TOKENS tokens or more);
    // quantized weights: the tile kernels' packed rows
    // (prompts of TILE_MIN_TOKENS or more). Levels without tile kernels (scalar, NEON) keep
    // neither, so there this is an upper bound.
    let weight_buffers =
        if s.float_down && r.n_batch >= ggpt_quant::matmul::FLOAT_COPY_MIN_TOKENS as u64 {
            // The AMX level's sums between chunks of columns, for the widest pass.
            let pass = r.n_batch.min(ggpt_models::gpt2::forward::UBATCH as u64);
            let sums =
                ggpt_quant::matmul::FLOAT_SUMS_BYTES_PER_TOKEN as u64 * pass.next_multiple_of(32);
            r.threads * (ggpt_quant::matmul::PANEL_BYTES as u64 + sums)
        } else if !s.float_down && r.n_batch >= ggpt_quant::matmul::TILE_MIN_TOKENS as u64 {
            r.threads * ggpt_quant::matmul::TILE_BYTES as u64
        } else {
            0
        };
    let scratch_bytes = activations + attention + weight_buffers;
    let logits_bytes = logits_bytes(s, r.n_seq);
    let ram_total = file_bytes + kv_bytes + scratch_bytes + logits_bytes + RUNTIME_BYTES;
    let ubatch = r.n_ctx.min(512);
    let gpu = gpu_compute_bytes(s, r.n_ctx, ubatch, r.n_seq);
    Estimate {
        file_bytes,
        tensor_bytes,
        kv_bytes,
        scratch_bytes,
        logits_bytes,
        runtime_bytes: RUNTIME_BYTES,
        ram_total,
        gpu_compute_bytes: gpu,
        vram_total: tensor_bytes + kv_bytes + gpu,
    }
}

/// A byte count printed in MiB.
pub struct Mib(pub u64);

impl fmt::Display for Mib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2} MiB", self.0 as f64 / (1024.0 * 1024.0))
    }
}

/// Resident-set figures of this process, from `/proc/self/status` (Linux).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rss {
    /// Peak resident set (VmHWM).
    pub peak: u64,
    /// Current resident set (VmRSS).
    pub current: u64,
    /// Current anonymous memory (heap, stacks).
    pub anon: u64,
    /// Current file-backed memory (the mapped weights, the binary).
    pub file: u64,
}

/// Read this process's RSS figures; `None` where /proc is unavailable.
pub fn rss() -> Option<Rss> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status(&status)
}

fn parse_status(status: &str) -> Option<Rss> {
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    Some(Rss {
        peak: field("VmHWM:")?,
        current: field("VmRSS:")?,
        anon: field("RssAnon:").unwrap_or(0),
        file: field("RssFile:").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn gpt2_medium_kv_cache_by_hand() {
        let s = MemShape::GPT2_MEDIUM;
        // 2 (K,V) × 24 layers × 1024 positions × 1024 values × 2 bytes = 96 MiB exactly.
        assert_eq!(kv_cache_bytes(&s, 1024, 1, 2), 96 * MIB);
        assert_eq!(kv_cache_bytes(&s, 1024, 1, 4), 192 * MIB);
        assert_eq!(kv_cache_bytes(&s, 512, 4, 2), 192 * MIB);
    }

    #[test]
    fn gpt2_medium_logits_row() {
        // 50257 × 4 B = 201,028 B ≈ 196.3 KiB per output row.
        assert_eq!(logits_bytes(&MemShape::GPT2_MEDIUM, 1), 201_028);
    }

    #[test]
    fn compute_buffer_grows_with_batch_and_context() {
        let s = MemShape::GPT2_MEDIUM;
        let a = gpu_compute_bytes(&s, 1024, 512, 1);
        // 512 × (1024·6 + 4096) × 4 + 16 × 512 × 1024 × 4 + 201028
        assert_eq!(
            a,
            512 * (1024 * 6 + 4096) * 4 + 16 * 512 * 1024 * 4 + 201_028
        );
        assert!(gpu_compute_bytes(&s, 512, 512, 1) < a);
    }

    #[test]
    fn gpt2_medium_scratch_by_hand() {
        let s = MemShape::GPT2_MEDIUM;
        let run = |n_batch| RunShape {
            n_ctx: 1024,
            n_batch,
            n_seq: 1,
            kv_elem: 2,
            threads: 2,
        };
        // Per token: f32 rows of 3·1024 + max(3·1024, 4096) values, 16 bytes of position and
        // sequence, 16 Q8_K blocks of 292 bytes.
        let per_token = 4 * (3 * 1024 + 4096) + 16 + 16 * 292;
        assert_eq!(per_token, 33_360);
        // Per thread: K and V of one head in f32 (2 × 1024 × 64) and two rows of scores.
        let attention = 2 * 4 * (2 * 1024 * 64 + 2 * (1024 + 4 * 64));
        // One call of 1024 tokens: passes of 240, 240, 240, 240 and 64. The last one runs
        // beside the full cache; the one before it beside all but 64 positions (98 304 bytes
        // of F16 K and V each), 240 × 33 360 − 64 × 98 304 = 1 714 944 < 64 × 33 360.
        // Each of the two threads also keeps 192 KiB of packed weight rows.
        let tiles = 2 * 192 * 1024;
        let one_call = estimate(&s, 0, 0, &run(1024));
        assert_eq!(one_call.scratch_bytes, 64 * 33_360 + attention + tiles);
        // Calls of 256 tokens are one pass each, and the last one ends beside the full cache.
        let calls = estimate(&s, 0, 0, &run(256));
        assert_eq!(calls.scratch_bytes, 256 * 33_360 + attention + tiles);
        // Below 4 tokens rows are dotted as stored: no packed rows.
        let decode = estimate(&s, 0, 0, &run(1));
        assert_eq!(decode.scratch_bytes, 33_360 + attention);
        // Float weights: the down projection's input copied at 4 bytes a value (4 × 4096 bytes
        // per token, tokens rounded up to 32 for the AMX tiles) instead of Q8_K. Now the pass
        // before the last is the peak: 240 × 28 688 + 256 × 16 384 − 64 × 98 304 = 4 787 968
        // > 64 × 45 072.
        let f = MemShape {
            float_down: true,
            ..MemShape::GPT2_MEDIUM
        };
        let per_token = 4 * (3 * 1024 + 4096) + 16 + 4 * 4096;
        assert_eq!(per_token, 45_072);
        assert_eq!(240 * 28_688 + 256 * 16_384 - 64 * 98_304, 4_787_968);
        // Each of the two threads also keeps 1 MiB of packed f32 weight panels (or bf16 tiles),
        // and at the AMX level the sums of up to 256 rows × 256 tokens between chunks.
        let panels = 2 * ((1 << 20) + 4 * 256 * 256);
        let one_call = estimate(&f, 0, 0, &run(1024));
        assert_eq!(one_call.scratch_bytes, 4_787_968 + attention + panels);
        let calls = estimate(&f, 0, 0, &run(256));
        assert_eq!(calls.scratch_bytes, 256 * 45_072 + attention + panels);
        // Below 20 tokens nothing is copied: a 19-token prompt needs less than with Q8_K.
        let short = |s: &MemShape| estimate(s, 0, 0, &run(19)).scratch_bytes;
        assert!(short(&f) < short(&s));
    }

    #[test]
    fn parses_proc_status() {
        let text = "Name:\tggpt\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nRssAnon:\t 512 kB\nRssFile:\t 500 kB\n";
        let r = parse_status(text).unwrap();
        assert_eq!(r.peak, 2048 * 1024);
        assert_eq!(r.current, 1024 * 1024);
        assert_eq!(r.anon, 512 * 1024);
        assert_eq!(r.file, 500 * 1024);
        assert!(parse_status("garbage").is_none());
        assert!(rss().is_some());
    }
}
