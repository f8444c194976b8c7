//! Prometheus metrics: the process-wide recorder, the `/metrics` rendering and
//! one function per thing measured, so names and labels live in one place.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Seconds buckets from 0.5 ms to 10 s: embedding latencies on a CPU are a
/// few milliseconds, whole requests under load up to seconds.
const SECONDS_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The process-wide recorder, installed on first use. Metrics are global to
/// the process (several test servers in one process share them).
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full("lookalike_embed_batch_size".into()), BATCH_BUCKETS)
                })
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding
            // application); then ours renders nothing, which is harmless.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            spawn_upkeep(handle.clone());
            describe();
            handle
        })
        .clone()
}

/// Histograms keep raw samples until upkeep folds them into buckets; without
/// it, memory would grow with traffic between scrapes.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
        std::thread::sleep(Duration::from_secs(5));
        handle.run_upkeep();
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start the metrics upkeep thread");
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("lookalike_http_requests_total", "HTTP requests by method, route and status.");
    describe_histogram!("lookalike_http_request_duration_seconds", Unit::Seconds, "HTTP request latency.");
    describe_gauge!("lookalike_embed_queue_depth", "Images waiting to be embedded, by priority.");
    describe_histogram!("lookalike_embed_queue_wait_seconds", Unit::Seconds, "Time an image waits for its batch.");
    describe_histogram!("lookalike_embed_batch_size", "Images per forward pass.");
    describe_histogram!("lookalike_embed_batch_seconds", Unit::Seconds, "Forward pass time per batch, by device.");
    describe_counter!("lookalike_embed_cancelled_total", "Queued images dropped because their client went away.");
    describe_counter!("lookalike_embed_rejected_total", "Images refused because the queue was full (HTTP 503).");
    describe_histogram!("lookalike_preprocess_seconds", Unit::Seconds, "Decode, resize and normalise, per image.");
    describe_gauge!("lookalike_model_info", "The active model (value 1), with its device and precision.");
    describe_gauge!("lookalike_index_items", "Vectors in the search index.");
}

pub fn http_request(method: &str, route: &str, status: u16, elapsed: Duration) {
    let labels = [("method", method.to_string()), ("route", route.to_string()), ("status", status.to_string())];
    counter!("lookalike_http_requests_total", &labels).increment(1);
    histogram!("lookalike_http_request_duration_seconds", &labels).record(elapsed);
}

pub fn queue_depth(priority: &'static str, depth: usize) {
    gauge!("lookalike_embed_queue_depth", "priority" => priority).set(depth as f64);
}

pub fn queue_wait(priority: &'static str, wait: Duration) {
    histogram!("lookalike_embed_queue_wait_seconds", "priority" => priority).record(wait);
}

pub fn cancelled(priority: &'static str) {
    counter!("lookalike_embed_cancelled_total", "priority" => priority).increment(1);
}

pub fn rejected() {
    counter!("lookalike_embed_rejected_total").increment(1);
}

pub fn batch(device: &str, size: usize, elapsed: Duration) {
    histogram!("lookalike_embed_batch_size").record(size as f64);
    histogram!("lookalike_embed_batch_seconds", "device" => device.to_string()).record(elapsed);
}

pub fn preprocess(elapsed: Duration) {
    histogram!("lookalike_preprocess_seconds").record(elapsed);
}

/// 1 for the model serving now, 0 for one a switch replaced.
pub fn model_info(model: &str, device: &str, precision: &str, active: bool) {
    let labels = [("model", model.to_string()), ("device", device.to_string()), ("precision", precision.to_string())];
    gauge!("lookalike_model_info", &labels).set(if active { 1.0 } else { 0.0 });
}

pub fn index_items(count: usize) {
    gauge!("lookalike_index_items").set(count as f64);
}
