//! Prometheus metrics through the `metrics` facade and its Prometheus exporter. Each server
//! owns its recorder (none is installed globally), so several servers in one process (the
//! tests) keep separate counts.

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

const META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// Handles to every metric the server records.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub queue_depth: Gauge,
    pub busy_slots: Gauge,
    pub paused_slots: Gauge,
    pub slots: Gauge,
    pub rss: Gauge,
    pub step_tokens: Histogram,
    pub step_seqs: Histogram,
    pub ttft: Histogram,
    pub itl: Histogram,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Prefix("ggpt_step_".into()), BATCH_BUCKETS)
            })
            .expect("bucket lists are non-empty")
            .build_recorder();
        let handle = recorder.handle();
        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            recorder.describe_counter(name.into(), unit, help.into());
        };
        describe(
            "ggpt_requests_total",
            None,
            "HTTP requests by endpoint and status code",
        );
        describe(
            "ggpt_prompt_tokens_total",
            None,
            "Prompt tokens accepted for generation",
        );
        describe("ggpt_generated_tokens_total", None, "Tokens generated");
        recorder.describe_gauge(
            "ggpt_queue_depth".into(),
            None,
            "Sequences waiting for a slot".into(),
        );
        recorder.describe_gauge(
            "ggpt_busy_slots".into(),
            None,
            "Slots running a sequence".into(),
        );
        recorder.describe_gauge(
            "ggpt_paused_slots".into(),
            None,
            "Busy slots paused because their client has not read its unread events".into(),
        );
        recorder.describe_gauge(
            "ggpt_slots".into(),
            None,
            "Slots in total (all models)".into(),
        );
        recorder.describe_gauge(
            "ggpt_rss_bytes".into(),
            Some(Unit::Bytes),
            "Resident set size".into(),
        );
        recorder.describe_histogram(
            "ggpt_step_tokens".into(),
            None,
            "Tokens per engine step (one forward pass)".into(),
        );
        recorder.describe_histogram(
            "ggpt_step_sequences".into(),
            None,
            "Sequences per engine step".into(),
        );
        recorder.describe_histogram(
            "ggpt_time_to_first_token_seconds".into(),
            Some(Unit::Seconds),
            "From request arrival to its first generated token".into(),
        );
        recorder.describe_histogram(
            "ggpt_inter_token_latency_seconds".into(),
            Some(Unit::Seconds),
            "Between consecutive tokens of one sequence".into(),
        );
        let key = |n: &'static str| Key::from_static_name(n);
        Arc::new(Metrics {
            prompt_tokens: recorder.register_counter(&key("ggpt_prompt_tokens_total"), &META),
            generated_tokens: recorder.register_counter(&key("ggpt_generated_tokens_total"), &META),
            queue_depth: recorder.register_gauge(&key("ggpt_queue_depth"), &META),
            busy_slots: recorder.register_gauge(&key("ggpt_busy_slots"), &META),
            paused_slots: recorder.register_gauge(&key("ggpt_paused_slots"), &META),
            slots: recorder.register_gauge(&key("ggpt_slots"), &META),
            rss: recorder.register_gauge(&key("ggpt_rss_bytes"), &META),
            step_tokens: recorder.register_histogram(&key("ggpt_step_tokens"), &META),
            step_seqs: recorder.register_histogram(&key("ggpt_step_sequences"), &META),
            ttft: recorder.register_histogram(&key("ggpt_time_to_first_token_seconds"), &META),
            itl: recorder.register_histogram(&key("ggpt_inter_token_latency_seconds"), &META),
            recorder,
            handle,
        })
    }

    /// Count one answered request.
    pub fn request(&self, endpoint: &str, status: u16) {
        let key = Key::from_parts(
            "ggpt_requests_total",
            vec![
                Label::new("endpoint", endpoint.to_string()),
                Label::new("status", status.to_string()),
            ],
        );
        self.recorder.register_counter(&key, &META).increment(1);
    }

    /// The Prometheus text exposition, with the RSS read now.
    pub fn render(&self) -> String {
        if let Some(r) = ggpt::memory::rss() {
            self.rss.set(r.current as f64);
        }
        self.handle.render()
    }

    /// Drain histogram buffers; call every few seconds.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}
