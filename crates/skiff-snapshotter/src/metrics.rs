//! Prometheus metrics of the snapshotter, served in the text format at
//! `/metrics` on `--metrics-address`: calls by kind and outcome, their
//! latency, remote snapshots made, attached artifacts looked up, lazy
//! mounts made, and at each scrape the snapshots held by kind.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

// Static labels: a call costs no allocation to count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    call: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallKind {
    call: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Source {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

type LatencyFamily = Family<CallKind, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    latency: LatencyFamily,
    remote_snapshots: Family<Source, Counter>,
    attached_lookups: Family<Outcome, Counter>,
    lazy_mounts: Family<Reason, Counter>,
    lazy_mount_failures: Counter,
    snapshots: Family<KindLabel, Gauge>,
}

fn latency_histogram() -> Histogram {
    // 100 µs to about 100 s: a Prepare may mount an image over a slow link.
    Histogram::new(exponential_buckets(0.000_1, 2.0, 20))
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut metrics = Metrics {
            registry: Registry::with_prefix("skiff_snapshotter"),
            calls: Family::default(),
            latency: LatencyFamily::new_with_constructor(latency_histogram),
            remote_snapshots: Family::default(),
            attached_lookups: Family::default(),
            lazy_mounts: Family::default(),
            lazy_mount_failures: Counter::default(),
            snapshots: Family::default(),
        };
        let registry = &mut metrics.registry;
        registry.register(
            "calls",
            "Calls of containerd's snapshots API, by call and gRPC code",
            metrics.calls.clone(),
        );
        registry.register(
            "call_duration_seconds",
            "Time a call of the snapshots API took, by call",
            metrics.latency.clone(),
        );
        registry.register(
            "remote_snapshots",
            "Remote snapshots committed without downloading a layer, by where the artifact \
             came from (launcher: a skiff image's tag; attached: beside an ordinary image)",
            metrics.remote_snapshots.clone(),
        );
        registry.register(
            "attached_lookups",
            "Layers being unpacked whose image was asked for attached skiff artifacts, by \
             outcome (found; none or refused: unpacked, the log says why)",
            metrics.attached_lookups.clone(),
        );
        registry.register(
            "lazy_mounts",
            "Lazy mounts made, by reason (pull; first_use: a snapshot on an attached \
             layer; gone: made again)",
            metrics.lazy_mounts.clone(),
        );
        registry.register(
            "lazy_mount_failures",
            "Lazy mounts that could not be made",
            metrics.lazy_mount_failures.clone(),
        );
        registry.register(
            "snapshots",
            "Snapshots held, by kind (active, view, committed, remote)",
            metrics.snapshots.clone(),
        );
        Arc::new(metrics)
    }

    pub fn call(&self, call: &'static str, code: tonic::Code, took: Duration) {
        self.calls
            .get_or_create(&CallLabels {
                call,
                code: code_name(code),
            })
            .inc();
        self.latency
            .get_or_create(&CallKind { call })
            .observe(took.as_secs_f64());
    }

    pub fn remote_snapshot(&self, source: &'static str) {
        self.remote_snapshots
            .get_or_create(&Source { source })
            .inc();
    }

    pub fn attached_lookup(&self, outcome: &'static str) {
        self.attached_lookups
            .get_or_create(&Outcome { outcome })
            .inc();
    }

    /// A lazy mount made, or (`None`) one that could not be.
    pub fn lazy_mount(&self, reason: Option<&'static str>) {
        match reason {
            Some(reason) => self.lazy_mounts.get_or_create(&Reason { reason }).inc(),
            None => self.lazy_mount_failures.inc(),
        };
    }

    /// The text format, with the snapshot gauges set to `held` (kind, count).
    pub fn render(&self, held: &[(&'static str, i64)]) -> String {
        for (kind, count) in held {
            self.snapshots
                .get_or_create(&KindLabel { kind })
                .set(*count);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_snapshots_are_rendered_with_their_labels() {
        let metrics = Metrics::new();
        metrics.call(
            "prepare",
            tonic::Code::AlreadyExists,
            Duration::from_millis(3),
        );
        metrics.call(
            "prepare",
            tonic::Code::AlreadyExists,
            Duration::from_millis(5),
        );
        metrics.remote_snapshot("attached");
        let text = metrics.render(&[("remote", 2), ("active", 1)]);
        assert!(
            text.contains(
                r#"skiff_snapshotter_calls_total{call="prepare",code="already_exists"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"skiff_snapshotter_remote_snapshots_total{source="attached"} 1"#));
        assert!(text.contains(r#"skiff_snapshotter_snapshots{kind="remote"} 2"#));
        assert!(text.contains(r#"skiff_snapshotter_call_duration_seconds_count{call="prepare"} 2"#));
    }
}
