//! Counters the engine and the HTTP handlers update, rendered as Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    /// Answered with a 4xx (bad request, unknown model, missing key).
    pub rejected_bad: AtomicU64,
    /// Answered 503: the queue was full.
    pub rejected_busy: AtomicU64,
    pub cancelled: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Tokens sampled in llama.cpp's graph (greedy requests, unless --host-sampling).
    pub device_sampled: AtomicU64,
    pub active_sequences: AtomicU64,
    pub decode_steps: AtomicU64,
    /// Seconds spent in decode calls, in microseconds.
    pub decode_micros: AtomicU64,
    /// The engine thread's time by part, in microseconds: llama.cpp's decode, the
    /// retention policy after it, and sampling (which first waits for the logits, so
    /// GPU work still running when the policy ends is counted here).
    pub llama_decode_micros: AtomicU64,
    pub policy_micros: AtomicU64,
    pub sample_micros: AtomicU64,
    /// Tokens per second of the recent decode steps (an f64's bits).
    pub decode_rate_bits: AtomicU64,
    pub overlay_slots_used: AtomicU64,
    pub kv_store_bytes: AtomicU64,
    pub kv_overlay_bytes: AtomicU64,
    pub parallel: AtomicU64,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn set_decode_rate(&self, rate: f64) {
        self.decode_rate_bits.store(rate.to_bits(), Relaxed);
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, queued: u64) -> String {
        let mut out = String::new();
        let mut put = |name: &str, kind: &str, help: &str, value: String| {
            let _ =
                writeln!(out, "# HELP logquant_{name} {help}\n# TYPE logquant_{name} {kind}\nlogquant_{name} {value}");
        };
        let c = |a: &AtomicU64| a.load(Relaxed).to_string();
        put("requests_total", "counter", "Requests to /v1 completion endpoints.", c(&self.requests));
        put("requests_rejected_total", "counter", "Requests answered with a 4xx error.", c(&self.rejected_bad));
        put(
            "requests_busy_total",
            "counter",
            "Requests answered 503 because the queue was full.",
            c(&self.rejected_busy),
        );
        put("requests_completed_total", "counter", "Requests whose answer ended normally.", c(&self.completed));
        put(
            "requests_cancelled_total",
            "counter",
            "Requests whose client went away before the end.",
            c(&self.cancelled),
        );
        put("requests_failed_total", "counter", "Requests ended by an engine error.", c(&self.failed));
        put("prompt_tokens_total", "counter", "Prompt tokens decoded.", c(&self.prompt_tokens));
        put("completion_tokens_total", "counter", "Tokens generated.", c(&self.completion_tokens));
        put(
            "device_sampled_tokens_total",
            "counter",
            "Tokens sampled greedily in the compute graph (no logits copied out).",
            c(&self.device_sampled),
        );
        put("queue_length", "gauge", "Requests waiting for a free sequence.", queued.to_string());
        put("active_sequences", "gauge", "Sequences being prefilled or decoded.", c(&self.active_sequences));
        put("parallel_sequences", "gauge", "Sequences the context holds (the memory plan).", c(&self.parallel));
        put("decode_steps_total", "counter", "Decode calls (one per batch step).", c(&self.decode_steps));
        // counters kept in microseconds, shown in seconds
        let micros = |a: &AtomicU64| format!("{:.6}", a.load(Relaxed) as f64 / 1e6);
        put("decode_seconds_total", "counter", "Seconds spent in decode calls.", micros(&self.decode_micros));
        put(
            "engine_llama_decode_seconds_total",
            "counter",
            "Seconds of the engine thread in llama.cpp's decode.",
            micros(&self.llama_decode_micros),
        );
        put(
            "engine_policy_seconds_total",
            "counter",
            "Seconds of the engine thread in the retention policy after each decode (two-tier cache).",
            micros(&self.policy_micros),
        );
        put(
            "engine_sample_seconds_total",
            "counter",
            "Seconds of the engine thread sampling, waiting for the logits included.",
            micros(&self.sample_micros),
        );
        let rate = f64::from_bits(self.decode_rate_bits.load(Relaxed));
        put(
            "decode_tokens_per_second",
            "gauge",
            "Generated tokens per second over the recent steps.",
            format!("{rate:.3}"),
        );
        put("overlay_slots_used", "gauge", "f16 overlay slots in use (two-tier cache).", c(&self.overlay_slots_used));
        let _ = writeln!(
            out,
            "# HELP logquant_kv_bytes KV cache bytes allocated, by tier.\n# TYPE logquant_kv_bytes gauge\nlogquant_kv_bytes{{tier=\"store\"}} {}\nlogquant_kv_bytes{{tier=\"overlay\"}} {}",
            self.kv_store_bytes.load(Relaxed),
            self.kv_overlay_bytes.load(Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_is_a_comment_or_a_sample() {
        let m = Metrics::default();
        Metrics::add(&m.requests, 3);
        m.set_decode_rate(12.5);
        let text = m.render(2);
        assert!(text.contains("logquant_requests_total 3\n"));
        assert!(text.contains("logquant_queue_length 2\n"));
        assert!(text.contains("logquant_decode_tokens_per_second 12.500\n"));
        Metrics::add(&m.policy_micros, 1_500_000);
        assert!(m.render(0).contains("logquant_engine_policy_seconds_total 1.500000\n"));
        for line in text.lines() {
            let sample = line.split(' ').count() == 2 && line.starts_with("logquant_");
            assert!(line.starts_with("# HELP ") || line.starts_with("# TYPE ") || sample, "{line}");
        }
    }
}
