//! Text generation: the loop of `ggpt run`, with stop strings and a callback per text piece.
//!
//! The token choices are the CLI's: one sampler per sequence seeded `seed + i`, the prompt
//! evaluated once, and with several sequences the prompt's KV copied to each and one batched
//! decode step per token (`Session::fork_prompt` + `decode_batch`). A sequence ends at
//! `<|endoftext|>` (unless `ignore_eos`), at a stop string, or after `max_new_tokens`.

use anyhow::Result;
use ggpt::model::Model;
use ggpt::sampler::{Sampler, SamplerConfig};
use ggpt::session::Session;

/// One generation call.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampler: SamplerConfig,
    pub n_seq: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

/// Holds back text that may be the start of a stop string, so that a stop string split over
/// several tokens never reaches the caller, and cuts the text where one appears.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher {
            stops,
            held: String::new(),
        }
    }

    /// Add generated text. Returns the text that is now safe to emit, and whether a stop
    /// string was found (everything from it on is dropped).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(i) = first_stop {
            let out = self.held[..i].to_string();
            self.held.clear();
            return (out, true);
        }
        // The longest tail of the held text that begins some stop string stays held.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// The end of the text: whatever is still held is emitted.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of `stop`, on
/// character boundaries.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start)
                && stop.is_char_boundary(n)
                && stop.starts_with(&text[start..])
        })
        .unwrap_or(0)
}

/// Generate. `emit(seq, piece)` receives each sequence's text as it is decided (UTF-8
/// characters are never split; a piece may be empty, once per step, so that the caller can
/// check for an interrupt); an error from it ends the generation with that error. Returns
/// the text of every sequence (without the prompt).
pub fn generate(
    model: &Model,
    req: &Request,
    mut emit: impl FnMut(usize, &str) -> Result<()>,
) -> Result<Vec<String>> {
    let tok = model.tokenizer();
    let eos = tok.eos_id();
    let n_seq = req.n_seq;
    let n_vocab = model.hparams().n_vocab as usize;
    let mut texts = vec![String::new(); n_seq];
    if req.max_new_tokens == 0 {
        return Ok(texts);
    }
    let n_ctx = req.prompt.len() + req.max_new_tokens;
    let mut session = Session::new(model, n_ctx, n_seq)?;
    let mut logits = session.prefill(&req.prompt)?.to_vec();
    if n_seq > 1 {
        session.fork_prompt();
    }
    let mut samplers: Vec<Sampler> = (0..n_seq)
        .map(|i| {
            Sampler::new(SamplerConfig {
                seed: req.sampler.seed.wrapping_add(i as u64),
                ..req.sampler
            })
        })
        .collect();
    let mut histories = vec![req.prompt.clone(); n_seq];
    let mut decoders: Vec<_> = (0..n_seq).map(|_| tok.stream_decoder()).collect();
    let mut matchers: Vec<_> = (0..n_seq)
        .map(|_| StopMatcher::new(req.stop.clone()))
        .collect();
    let mut done = vec![false; n_seq];
    let mut stopped = vec![false; n_seq];
    for step in 0..req.max_new_tokens {
        let mut next = Vec::with_capacity(n_seq);
        for s in 0..n_seq {
            let r = if step == 0 { 0 } else { s };
            let row = &logits[r * n_vocab..(r + 1) * n_vocab];
            let id = if done[s] {
                next.last().copied().unwrap_or(0)
            } else {
                samplers[s].sample(row, &histories[s])
            };
            if !done[s] {
                histories[s].push(id);
                if Some(id) == eos && !req.ignore_eos {
                    done[s] = true;
                } else {
                    let piece = decoders[s].push(id)?;
                    let (out, hit) = matchers[s].push(&piece);
                    texts[s].push_str(&out);
                    emit(s, &out)?;
                    if hit {
                        done[s] = true;
                        stopped[s] = true;
                    }
                }
            }
            next.push(id);
        }
        if done.iter().all(|&d| d) || step + 1 == req.max_new_tokens {
            break;
        }
        logits = if n_seq == 1 {
            session.decode(next[0])?.to_vec()
        } else {
            session.decode_batch(&next)?.to_vec()
        };
    }
    for (s, dec) in decoders.into_iter().enumerate() {
        if stopped[s] {
            continue;
        }
        let (mut out, _) = matchers[s].push(&dec.finish());
        out.push_str(&matchers[s].finish());
        texts[s].push_str(&out);
        emit(s, &out)?;
    }
    Ok(texts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (o, hit) = m.push(p);
            out.push_str(&o);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_strings_split_over_pieces_are_cut() {
        assert_eq!(run(&["\n\n"], &["a", "\n", "\nb"]), ("a".into(), true));
        assert_eq!(run(&["END"], &["xE", "N", "D"]), ("x".into(), true));
        assert_eq!(run(&["END"], &["xE", "N", "d"]), ("xENd".into(), false));
        assert_eq!(run(&[], &["héllo", " ✓"]), ("héllo ✓".into(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
        // The earliest of several stop strings wins.
        assert_eq!(run(&["b", "a"], &["xyab"]), ("xy".into(), true));
    }
}
