//! Prometheus metrics, served in the text format at `/metrics`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::HttpBody;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::{AppState, ROUTES};

// Static labels: a request costs no allocation to count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: &'static str,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    pub bytes_out: Counter,
    pub chunks_out: Counter,
    pub chunks_received: Counter,
    pub chunks_stored: Counter,
    pub chunks_rejected: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_warmed: Counter,
    pub cache_bytes: Gauge,
}

fn latency_histogram() -> Histogram {
    // 50 µs to about 1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let metrics = Metrics {
            registry: Registry::with_prefix("skiff"),
            requests: Family::default(),
            latency: HistogramFamily::new_with_constructor(latency_histogram),
            bytes_out: Counter::default(),
            chunks_out: Counter::default(),
            chunks_received: Counter::default(),
            chunks_stored: Counter::default(),
            chunks_rejected: Counter::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_warmed: Counter::default(),
            cache_bytes: Gauge::default(),
        };
        let mut metrics = metrics;
        let registry = &mut metrics.registry;
        registry.register(
            "http_requests",
            "HTTP requests by method, route and status",
            metrics.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to the response's headers, by method and route",
            metrics.latency.clone(),
        );
        let counters = [
            (
                "http_response_bytes",
                "Response body bytes sent",
                &metrics.bytes_out,
            ),
            ("chunks_sent", "Chunks sent to clients", &metrics.chunks_out),
            (
                "chunks_received",
                "Chunks received in uploads",
                &metrics.chunks_received,
            ),
            (
                "chunks_stored",
                "Uploaded chunks that were new to the store",
                &metrics.chunks_stored,
            ),
            (
                "chunks_rejected",
                "Uploaded chunks refused because they did not match their id",
                &metrics.chunks_rejected,
            ),
            (
                "cache_hits",
                "Chunk reads answered from the hot-chunk cache",
                &metrics.cache_hits,
            ),
            (
                "cache_misses",
                "Chunk reads that went to the store",
                &metrics.cache_misses,
            ),
            (
                "cache_warmed",
                "Chunks loaded into the cache ahead of requests",
                &metrics.cache_warmed,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "cache_bytes",
            "Bytes held by the hot-chunk cache",
            metrics.cache_bytes.clone(),
        );
        Arc::new(metrics)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Counts every request by route and status, times it, and adds up the
/// bytes of bodies whose length is known (streamed bodies count their own).
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|matched| ROUTES.iter().find(|r| **r == matched.as_str()))
        .copied()
        .unwrap_or("unmatched");
    let method = match *request.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        _ => "other",
    };
    let response = next.run(request).await;
    let metrics = &state.metrics;
    metrics
        .latency
        .get_or_create(&RouteLabels { method, route })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status: response.status().as_u16(),
        })
        .inc();
    // Content-Length is set after this layer runs; the body knows its size.
    if let Some(len) = response.body().size_hint().exact() {
        metrics.bytes_out.inc_by(len);
    }
    response
}

pub async fn render(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
