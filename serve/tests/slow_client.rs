//! Slow and stalled clients. A streaming handler stops taking its request's engine events while
//! its client does not read (the HTTP body blocks); the engine must then pause the sequence
//! instead of generating every token into memory, resume it with the same tokens once the
//! events are read, and free its slot when the handler gives up (drops the receiver).
//!
//! These drive the engine directly: over loopback the kernel's socket buffers absorb a whole
//! stream of the bundled model before the body would block, so an HTTP client cannot stall a
//! stream in test time.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ggpt::model::Model;
use ggpt::sampler::SamplerConfig;
use ggpt_models::KvType;
use ggpt_serve::engine::{
    event_channel, EngineConfig, EngineHandle, Event, EventReceiver, EventSender, Params, SeqJob,
    EVENTS_PER_SEQ,
};
use ggpt_serve::metrics::Metrics;

const MAX_TOKENS: usize = 400;

fn engine() -> (Arc<EngineHandle>, Arc<Metrics>) {
    let model = Model::load(&model("Q8_0")).expect("load the tiny model");
    let metrics = Metrics::new();
    let cfg = EngineConfig {
        parallel: 1,
        n_ctx: 512,
        prefill_chunk: 256,
        max_queue: 1,
        kv_type: KvType::F16,
    };
    let e = EngineHandle::start(vec![Arc::new(model)], cfg, Arc::clone(&metrics)).unwrap();
    (e, metrics)
}

/// A seeded, sampled sequence of MAX_TOKENS tokens that cannot end early; returns the sender
/// side (to watch its unread count) and the receiver.
fn submit(e: &EngineHandle) -> (EventSender, EventReceiver) {
    let (tx, rx) = event_channel(1);
    let params = Params {
        sampler: SamplerConfig {
            seed: 42,
            ..SamplerConfig::default()
        },
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        logit_bias: Vec::new(),
        logprobs: None,
        prompt_logprobs: false,
        max_tokens: MAX_TOKENS,
        stop_at_eos: false,
    };
    e.submit(vec![SeqJob {
        model: 0,
        prompt: vec![464, 3290, 286, 262],
        params,
        choice: 0,
        cancel: Arc::new(AtomicBool::new(false)),
        events: tx.clone(),
        arrived: Instant::now(),
    }])
    .expect("a free slot");
    (tx, rx)
}

fn gauge(m: &Metrics, name: &str) -> f64 {
    metric(&m.render(), name).unwrap_or_else(|| panic!("{name} not in the metrics"))
}

async fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Receive until the sequence ends; the tokens in order.
async fn read_all(rx: &mut EventReceiver, mut tokens: Vec<u32>) -> Vec<u32> {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("an event within 60 s")
            .expect("the engine ends the sequence with Done");
        match ev {
            Event::Token { token, .. } => tokens.push(token),
            Event::Done { generated, .. } => {
                assert_eq!(generated, MAX_TOKENS);
                return tokens;
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_pauses_its_sequence_which_resumes_unchanged() {
    let (e, m) = engine();
    // Reference: a reader that keeps up.
    let (_, mut rx) = submit(&e);
    let want = read_all(&mut rx, Vec::new()).await;
    assert_eq!(want.len(), MAX_TOKENS);
    drop(rx);
    let generated_ref = gauge(&m, "ggpt_generated_tokens_total");

    // The same request, not read: the engine stops at the limit of unread events and
    // generates nothing more (no tokens are produced into memory for a stalled client).
    let (tx, mut rx) = submit(&e);
    eventually(Duration::from_secs(30), "the sequence paused", || {
        gauge(&m, "ggpt_paused_slots") == 1.0
    })
    .await;
    assert_eq!(tx.unread(), EVENTS_PER_SEQ);
    let generated = gauge(&m, "ggpt_generated_tokens_total") - generated_ref;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tx.unread(), EVENTS_PER_SEQ);
    assert_eq!(
        gauge(&m, "ggpt_generated_tokens_total") - generated_ref,
        generated,
        "tokens generated while paused"
    );
    assert!(generated <= EVENTS_PER_SEQ as f64, "{generated} tokens");
    assert_eq!(gauge(&m, "ggpt_busy_slots"), 1.0);

    // The client reads: the sequence resumes and its tokens are the ones it would have had.
    let got = read_all(&mut rx, Vec::new()).await;
    assert_eq!(
        got, want,
        "a paused and resumed sequence generated other tokens"
    );
    eventually(Duration::from_secs(5), "the finished slot freed", || {
        gauge(&m, "ggpt_busy_slots") == 0.0 && gauge(&m, "ggpt_paused_slots") == 0.0
    })
    .await;
    e.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_sequence_whose_handler_gives_up_frees_its_slot() {
    let (e, m) = engine();
    let (tx, rx) = submit(&e);
    eventually(Duration::from_secs(30), "the sequence paused", || {
        gauge(&m, "ggpt_paused_slots") == 1.0
    })
    .await;
    // The HTTP side drops the receiver when its client has not read for --timeout (or left).
    drop(rx);
    assert!(tx.is_closed());
    eventually(Duration::from_secs(1), "the slot freed", || {
        gauge(&m, "ggpt_busy_slots") == 0.0 && gauge(&m, "ggpt_paused_slots") == 0.0
    })
    .await;
    assert!(gauge(&m, "ggpt_generated_tokens_total") <= EVENTS_PER_SEQ as f64);
    // The slot takes the next request at once.
    let (_, mut rx) = submit(&e);
    assert_eq!(read_all(&mut rx, Vec::new()).await.len(), MAX_TOKENS);
    e.shutdown();
}
