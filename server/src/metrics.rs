//! `/metrics`: Prometheus text exposition through the `prometheus` crate, named `dsv4:*` after
//! vLLM's `vllm:*` metrics.
//!
//! Gauges and totals of the engine (running and waiting requests, KV blocks of both kinds, token
//! and prefix-cache totals, preemptions) are read from [`dsv4_engine::EngineStats`] at scrape
//! time; request latencies are measured on the HTTP side, where a client sees them: time to first
//! token from the moment the request was parsed, inter-token latency between consecutive tokens,
//! and end-to-end latency to the last token.

use std::sync::Mutex;
use std::time::Duration;

use dsv4_engine::EngineStats;
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Latency buckets in seconds (vLLM's time-to-first-token buckets, which also fit the CPU
/// backend's slower steps).
const LATENCY_BUCKETS: [f64; 17] =
    [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0];

/// The server's metrics registry.
pub struct Metrics {
    registry: Registry,
    running: IntGauge,
    waiting: IntGauge,
    blocks_used: IntGaugeVec,
    blocks_free: IntGaugeVec,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    preemptions: IntCounter,
    spec_drafts: IntCounter,
    spec_accepted: IntCounter,
    engine_finished: IntCounter,
    engine_cancelled: IntCounter,
    engine_failed: IntCounter,
    /// Engine totals already added to the counters (a counter only goes up by a delta).
    seen: Mutex<EngineStats>,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    requests: IntCounterVec,
}

fn histogram(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec())).expect("valid histogram")
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid gauge");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid counter");
        let m = Metrics {
            running: gauge("dsv4:num_requests_running", "Requests in the batch (prefilling or decoding)."),
            waiting: gauge("dsv4:num_requests_waiting", "Requests queued for admission."),
            blocks_used: IntGaugeVec::new(
                Opts::new("dsv4:kv_cache_blocks_used", "KV cache blocks held by sequences, by kind."),
                &["kind"],
            )
            .expect("valid gauge"),
            blocks_free: IntGaugeVec::new(
                Opts::new("dsv4:kv_cache_blocks_free", "KV cache blocks free or evictable, by kind."),
                &["kind"],
            )
            .expect("valid gauge"),
            prompt_tokens: counter("dsv4:prompt_tokens_total", "Prompt tokens admitted."),
            generation_tokens: counter("dsv4:generation_tokens_total", "Tokens generated."),
            prefix_queries: counter(
                "dsv4:prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache (hit rate = hits / queries).",
            ),
            prefix_hits: counter("dsv4:prefix_cache_hits_total", "Prompt tokens found in the prefix cache."),
            preemptions: counter("dsv4:num_preemptions_total", "Requests preempted to free KV blocks."),
            spec_drafts: counter(
                "dsv4:spec_decode_num_draft_tokens_total",
                "Tokens the MTP block drafted (speculative decoding; acceptance rate = accepted / drafted).",
            ),
            spec_accepted: counter(
                "dsv4:spec_decode_num_accepted_tokens_total",
                "Drafted tokens the main model accepted.",
            ),
            engine_finished: counter("dsv4:engine_requests_finished_total", "Requests the engine finished."),
            engine_cancelled: counter(
                "dsv4:engine_requests_cancelled_total",
                "Requests cancelled (client gone or stop string matched).",
            ),
            engine_failed: counter("dsv4:engine_requests_failed_total", "Requests that failed in the engine."),
            seen: Mutex::new(EngineStats::default()),
            ttft: histogram(
                "dsv4:time_to_first_token_seconds",
                "Time from the request being parsed to its first generated token, seen by the HTTP layer.",
            ),
            itl: histogram(
                "dsv4:inter_token_latency_seconds",
                "Time between consecutive generated tokens of a request.",
            ),
            e2e: histogram("dsv4:e2e_request_latency_seconds", "Time from the request being parsed to its last token."),
            requests: IntCounterVec::new(
                Opts::new("dsv4:request_success_total", "Replies that ended, by finish reason."),
                &["finished_reason"],
            )
            .expect("valid counter"),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.running.clone()),
            Box::new(m.waiting.clone()),
            Box::new(m.blocks_used.clone()),
            Box::new(m.blocks_free.clone()),
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.generation_tokens.clone()),
            Box::new(m.prefix_queries.clone()),
            Box::new(m.prefix_hits.clone()),
            Box::new(m.preemptions.clone()),
            Box::new(m.spec_drafts.clone()),
            Box::new(m.spec_accepted.clone()),
            Box::new(m.engine_finished.clone()),
            Box::new(m.engine_cancelled.clone()),
            Box::new(m.engine_failed.clone()),
            Box::new(m.ttft.clone()),
            Box::new(m.itl.clone()),
            Box::new(m.e2e.clone()),
            Box::new(m.requests.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("unique metric names");
        }
        m
    }

    /// Records a request's first token, `since` the request was parsed.
    pub fn observe_ttft(&self, since: Duration) {
        self.ttft.observe(since.as_secs_f64());
    }

    /// Records the gap between two tokens of one request.
    pub fn observe_itl(&self, gap: Duration) {
        self.itl.observe(gap.as_secs_f64());
    }

    /// Records a reply's end: its total time and how it finished (`stop`, `length`,
    /// `tool_calls`, `abort`, `error`).
    pub fn observe_end(&self, total: Duration, reason: &str) {
        self.e2e.observe(total.as_secs_f64());
        self.requests.with_label_values(&[reason]).inc();
    }

    /// Brings the engine gauges and totals up to `stats`.
    pub fn update(&self, stats: &EngineStats) {
        self.running.set(stats.running as i64);
        self.waiting.set(stats.waiting as i64);
        self.blocks_used.with_label_values(&["compressed"]).set(stats.compressed_blocks_used as i64);
        self.blocks_used.with_label_values(&["window"]).set(stats.window_blocks_used as i64);
        self.blocks_free.with_label_values(&["compressed"]).set(stats.compressed_blocks_free as i64);
        self.blocks_free.with_label_values(&["window"]).set(stats.window_blocks_free as i64);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let add = |c: &IntCounter, now: u64, before: u64| c.inc_by(now.saturating_sub(before));
        add(&self.prompt_tokens, stats.prompt_tokens_total, seen.prompt_tokens_total);
        add(&self.generation_tokens, stats.generation_tokens_total, seen.generation_tokens_total);
        add(&self.prefix_queries, stats.prefix_cache_queries_total, seen.prefix_cache_queries_total);
        add(&self.prefix_hits, stats.prefix_cache_hits_total, seen.prefix_cache_hits_total);
        add(&self.preemptions, stats.preemptions_total, seen.preemptions_total);
        add(&self.spec_drafts, stats.spec_draft_tokens_total, seen.spec_draft_tokens_total);
        add(&self.spec_accepted, stats.spec_accepted_tokens_total, seen.spec_accepted_tokens_total);
        add(&self.engine_finished, stats.requests_finished_total, seen.requests_finished_total);
        add(&self.engine_cancelled, stats.requests_cancelled_total, seen.requests_cancelled_total);
        add(&self.engine_failed, stats.requests_failed_total, seen.requests_failed_total);
        *seen = *stats;
    }

    /// The text exposition of every metric after [`Metrics::update`] with `stats`.
    pub fn render(&self, stats: &EngineStats) -> String {
        self.update(stats);
        let mut out = Vec::new();
        // Encoding into memory fails only on a metric family without samples, which this
        // registry never has; an empty answer is the fallback.
        if prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out).is_err() {
            out.clear();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_totals_become_counters_and_gauges() {
        let m = Metrics::new();
        let mut s = EngineStats { running: 2, waiting: 1, prompt_tokens_total: 10, ..Default::default() };
        s.compressed_blocks_used = 3;
        s.window_blocks_free = 7;
        let text = m.render(&s);
        assert!(text.contains("dsv4:num_requests_running 2"), "{text}");
        assert!(text.contains("dsv4:num_requests_waiting 1"), "{text}");
        assert!(text.contains("dsv4:prompt_tokens_total 10"), "{text}");
        assert!(text.contains("dsv4:kv_cache_blocks_used{kind=\"compressed\"} 3"), "{text}");
        assert!(text.contains("dsv4:kv_cache_blocks_free{kind=\"window\"} 7"), "{text}");
        s.spec_draft_tokens_total = 12;
        s.spec_accepted_tokens_total = 5;
        let text = m.render(&s);
        assert!(text.contains("dsv4:spec_decode_num_draft_tokens_total 12"), "{text}");
        assert!(text.contains("dsv4:spec_decode_num_accepted_tokens_total 5"), "{text}");
        s.prompt_tokens_total = 25;
        s.running = 0;
        let text = m.render(&s);
        assert!(text.contains("dsv4:prompt_tokens_total 25"), "{text}");
        assert!(text.contains("dsv4:num_requests_running 0"), "{text}");
        m.observe_ttft(Duration::from_millis(30));
        m.observe_end(Duration::from_millis(90), "stop");
        let text = m.render(&s);
        assert!(text.contains("dsv4:time_to_first_token_seconds_count 1"), "{text}");
        assert!(text.contains("dsv4:request_success_total{finished_reason=\"stop\"} 1"), "{text}");
    }
}
