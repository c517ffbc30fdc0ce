//! Sampler behaviour: greedy, determinism, truncation (top-k, top-p, min-p), the distribution
//! of draws against softmax probabilities computed here independently, repetition penalty and
//! config validation.

use ggpt::sampler::{Sampler, SamplerConfig};

/// Sampling from the full distribution: every filter off.
fn plain(temperature: f32, seed: u64) -> SamplerConfig {
    SamplerConfig {
        temperature,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        seed,
    }
}

fn softmax(logits: &[f32], temperature: f64) -> Vec<f64> {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &l| m.max(f64::from(l)));
    let e: Vec<f64> = logits
        .iter()
        .map(|&l| ((f64::from(l) - max) / temperature).exp())
        .collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

fn frequencies(s: &mut Sampler, logits: &[f32], history: &[u32], n: usize) -> Vec<f64> {
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..n {
        counts[s.sample(logits, history) as usize] += 1;
    }
    counts.into_iter().map(|c| c as f64 / n as f64).collect()
}

/// |freq − p| within 5 standard errors of a binomial proportion (plus a hair for p ≈ 0).
fn assert_close(freq: &[f64], want: &[f64], n: usize, what: &str) {
    for (i, (&f, &p)) in freq.iter().zip(want).enumerate() {
        let tol = 5.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-4;
        assert!(
            (f - p).abs() <= tol,
            "{what}: token {i}: frequency {f:.4} vs probability {p:.4} (tol {tol:.4})\n\
             freq {freq:.4?}\nwant {want:.4?}"
        );
    }
}

const LOGITS: [f32; 6] = [1.0, 2.0, 0.5, -1.0, 1.5, -3.0];

#[test]
fn defaults_are_llama_cpp_defaults() {
    let c = SamplerConfig::default();
    assert_eq!(c.temperature, 0.8);
    assert_eq!(c.top_k, 40);
    assert_eq!(c.top_p, 0.95);
    assert_eq!(c.min_p, 0.05);
    assert_eq!(c.repeat_penalty, 1.0);
    assert_eq!(c.repeat_last_n, 64);
    assert!(c.validate().is_ok());
}

#[test]
fn greedy_is_argmax_with_ties_to_the_lowest_id() {
    let mut s = Sampler::new(SamplerConfig::greedy());
    assert_eq!(s.sample(&LOGITS, &[]), 1);
    assert_eq!(s.sample(&[0.0, 3.0, 1.0, 3.0], &[]), 1);
    assert_eq!(s.sample(&[f32::NAN, -1.0, f32::NAN], &[]), 1);
    assert_eq!(s.sample(&[-5.0], &[]), 0);
    // Negative temperature is greedy too, and so is a big random row.
    let mut s = Sampler::new(SamplerConfig {
        temperature: -1.0,
        ..SamplerConfig::default()
    });
    let row: Vec<f32> = (0..50257)
        .map(|i| ((i * 7919) % 10007) as f32 * 1e-3)
        .collect();
    let best = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
    assert_eq!(s.sample(&row, &[]) as usize, best);
}

#[test]
fn same_seed_same_sequence_different_seed_different_sequence() {
    let row: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 25.0).collect();
    let run = |seed: u64| -> Vec<u32> {
        let mut s = Sampler::new(SamplerConfig {
            seed,
            top_k: 0,
            ..SamplerConfig::default()
        });
        (0..200).map(|_| s.sample(&row, &[])).collect()
    };
    let a = run(1);
    assert_eq!(a, run(1));
    assert_ne!(a, run(2));
    // The draws really vary (this is not a disguised argmax).
    let distinct: std::collections::HashSet<_> = a.iter().collect();
    assert!(distinct.len() > 20, "{} distinct tokens", distinct.len());

    // reseed restarts the sequence.
    let mut s = Sampler::new(SamplerConfig {
        seed: 1,
        top_k: 0,
        ..SamplerConfig::default()
    });
    let _ = s.sample(&row, &[]);
    s.reseed(1);
    let again: Vec<u32> = (0..200).map(|_| s.sample(&row, &[])).collect();
    assert_eq!(a, again);
}

#[test]
fn top_k_1_and_tiny_top_p_are_argmax() {
    for seed in 0..50 {
        let mut k1 = Sampler::new(SamplerConfig {
            top_k: 1,
            temperature: 5.0,
            seed,
            ..plain(1.0, 0)
        });
        assert_eq!(k1.sample(&LOGITS, &[]), 1);
        let mut p0 = Sampler::new(SamplerConfig {
            top_p: 1e-6,
            temperature: 5.0,
            seed,
            ..plain(1.0, 0)
        });
        assert_eq!(p0.sample(&LOGITS, &[]), 1);
    }
}

#[test]
fn draws_follow_the_softmax_at_each_temperature() {
    let n = 200_000;
    for t in [1.0f32, 0.5, 2.0] {
        let mut s = Sampler::new(plain(t, 42));
        let freq = frequencies(&mut s, &LOGITS, &[], n);
        assert_close(&freq, &softmax(&LOGITS, f64::from(t)), n, &format!("T={t}"));
    }
}

#[test]
fn top_k_renormalises_over_the_k_best() {
    let n = 100_000;
    let mut s = Sampler::new(SamplerConfig {
        top_k: 3,
        ..plain(1.0, 3)
    });
    let freq = frequencies(&mut s, &LOGITS, &[], n);
    // The three best are ids 1, 4, 0.
    let kept = [LOGITS[1], LOGITS[4], LOGITS[0]];
    let p = softmax(&kept, 1.0);
    let want = [p[2], p[0], 0.0, 0.0, p[1], 0.0];
    assert_close(&freq, &want, n, "top_k=3");
}

#[test]
fn top_p_keeps_the_smallest_nucleus_and_temperature_comes_after() {
    let n = 100_000;
    // Probabilities at T=1, descending: id1 .444, id4 .269, id0 .163, id2 .099, ...
    // Cumulative: .444, .713, .876: top_p 0.8 keeps ids 1, 4, 0.
    let p1 = softmax(&LOGITS, 1.0);
    let mut order: Vec<usize> = (0..LOGITS.len()).collect();
    order.sort_by(|&a, &b| p1[b].total_cmp(&p1[a]));
    let mut cum = 0.0;
    let mut nucleus = Vec::new();
    for &i in &order {
        nucleus.push(i);
        cum += p1[i];
        if cum >= 0.8 {
            break;
        }
    }
    assert_eq!(nucleus, [1, 4, 0]);
    // Then temperature 0.5 reshapes the survivors.
    let kept: Vec<f32> = nucleus.iter().map(|&i| LOGITS[i]).collect();
    let pk = softmax(&kept, 0.5);
    let mut want = vec![0.0; LOGITS.len()];
    for (j, &i) in nucleus.iter().enumerate() {
        want[i] = pk[j];
    }
    let mut s = Sampler::new(SamplerConfig {
        top_p: 0.8,
        ..plain(0.5, 9)
    });
    assert_close(&frequencies(&mut s, &LOGITS, &[], n), &want, n, "top_p=0.8");
}

#[test]
fn min_p_drops_tokens_far_below_the_best() {
    let n = 100_000;
    // p_i / p_max = exp(l_i - 2): id0 .368, id2 .223, id3 .0498, id4 .607, id5 .0067.
    // min_p 0.3 keeps ids 1, 4, 0.
    let mut s = Sampler::new(SamplerConfig {
        min_p: 0.3,
        ..plain(1.0, 5)
    });
    let freq = frequencies(&mut s, &LOGITS, &[], n);
    let kept = [LOGITS[0], LOGITS[1], LOGITS[4]];
    let p = softmax(&kept, 1.0);
    let want = [p[0], p[1], 0.0, 0.0, p[2], 0.0];
    assert_close(&freq, &want, n, "min_p=0.3");
}

#[test]
fn repetition_penalty_lowers_repeated_tokens() {
    let n = 100_000;
    let penalty = 2.0f32;
    let cfg = SamplerConfig {
        repeat_penalty: penalty,
        repeat_last_n: 3,
        ..plain(1.0, 11)
    };
    // Token 1 (positive logit) repeated twice and token 3 (negative) once in the window;
    // token 4 is older than the last 3 positions and must not be penalised.
    let history = [4, 1, 3, 1];
    let mut penalised = LOGITS;
    penalised[1] /= penalty;
    penalised[3] *= penalty;
    let want = softmax(&penalised, 1.0);

    let base = softmax(&LOGITS, 1.0);
    assert!(want[1] < base[1] && want[3] < base[3] && want[4] > base[4]);

    let mut s = Sampler::new(cfg);
    let freq = frequencies(&mut s, &LOGITS, &history, n);
    assert_close(&freq, &want, n, "repeat_penalty=2");

    // Greedy sees the penalised logits too: token 1 (2.0 → 1.0) loses to token 4 (1.5).
    let mut g = Sampler::new(SamplerConfig {
        temperature: 0.0,
        ..cfg
    });
    assert_eq!(g.sample(&LOGITS, &[]), 1);
    assert_eq!(g.sample(&LOGITS, &history), 4);
    // Ids beyond the vocabulary in the history are ignored rather than panicking.
    assert_eq!(g.sample(&LOGITS, &[99, u32::MAX]), 1);
}

#[test]
fn validate_names_the_bad_field() {
    let bad = [
        (
            SamplerConfig {
                temperature: f32::NAN,
                ..Default::default()
            },
            "temperature",
        ),
        (
            SamplerConfig {
                temperature: -0.1,
                ..Default::default()
            },
            "temperature",
        ),
        (
            SamplerConfig {
                temperature: f32::INFINITY,
                ..Default::default()
            },
            "temperature",
        ),
        (
            SamplerConfig {
                top_p: 0.0,
                ..Default::default()
            },
            "top_p",
        ),
        (
            SamplerConfig {
                top_p: 1.5,
                ..Default::default()
            },
            "top_p",
        ),
        (
            SamplerConfig {
                min_p: -0.1,
                ..Default::default()
            },
            "min_p",
        ),
        (
            SamplerConfig {
                min_p: 1.1,
                ..Default::default()
            },
            "min_p",
        ),
        (
            SamplerConfig {
                repeat_penalty: 0.0,
                ..Default::default()
            },
            "repeat_penalty",
        ),
        (
            SamplerConfig {
                repeat_penalty: f32::NAN,
                ..Default::default()
            },
            "repeat_penalty",
        ),
    ];
    for (cfg, field) in bad {
        let err = cfg.validate().expect_err(field);
        assert!(err.to_string().contains(field), "{err}");
    }
    assert!(SamplerConfig::greedy().validate().is_ok());
    assert!(SamplerConfig {
        top_p: 1.0,
        min_p: 1.0,
        ..Default::default()
    }
    .validate()
    .is_ok());
}

#[test]
fn degenerate_rows_do_not_panic() {
    let mut s = Sampler::new(SamplerConfig::default());
    assert_eq!(s.sample(&[], &[]), 0);
    assert_eq!(s.sample(&[f32::NEG_INFINITY; 4], &[]), 0);
    assert_eq!(s.sample(&[0.0, f32::INFINITY, 1.0], &[]), 1);
    assert_eq!(s.sample(&[f32::NAN, f32::NAN, 0.0], &[]), 2);
    // Only one finite candidate: it is always drawn.
    for _ in 0..100 {
        assert_eq!(
            s.sample(&[f32::NEG_INFINITY, 0.5, f32::NEG_INFINITY], &[]),
            1
        );
    }
}
