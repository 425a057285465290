//! What a mount has done, for `skiff status`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A monotonic origin for timestamps kept in atomics.
fn clock_origin() -> std::time::Instant {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(std::time::Instant::now)
}

/// Read latencies in power-of-two microsecond buckets: bucket `b` counts
/// reads that took less than 2^b µs (the last one, everything slower).
const LATENCY_BUCKETS: usize = 28;

#[derive(Default)]
pub struct MountStats {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub failed_reads: AtomicU64,
    pub memory_hits: AtomicU64,
    pub disk_hits: AtomicU64,
    pub fetch_requests: AtomicU64,
    /// Fetches of a stream's next window, before reads reached it.
    pub read_aheads: AtomicU64,
    pub fetched_chunks: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub corrupt_chunks: AtomicU64,
    pub prefetched_chunks: AtomicU64,
    pub prefetched_bytes: AtomicU64,
    pub prefetch_done: AtomicBool,
    pub passthrough_opens: AtomicU64,
    /// Opens of files and directories the kernel sent (see
    /// `MountOptions::answer_opens`: by default only the first of each).
    pub opens: AtomicU64,
    /// Chunks of the startup profile, and whether all of them are here.
    pub profile_chunks: AtomicU64,
    pub profile_done: AtomicBool,
    /// When the kernel last asked for file bytes (ms after [`clock_origin`], 0: never).
    pub last_read_ms: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

impl MountStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Notes that the kernel asked for file bytes now.
    pub fn note_read_request(&self) {
        let now = clock_origin().elapsed().as_millis() as u64;
        self.last_read_ms.store(now.max(1), Ordering::Relaxed);
    }

    /// How long since the kernel last asked for file bytes (`None`: never).
    pub fn since_last_read(&self) -> Option<Duration> {
        let last = self.last_read_ms.load(Ordering::Relaxed);
        (last > 0).then(|| {
            let now = clock_origin().elapsed().as_millis() as u64;
            Duration::from_millis(now.saturating_sub(last))
        })
    }

    pub fn record_read(&self, bytes: usize, took: Duration) {
        Self::add(&self.reads, 1);
        Self::add(&self.read_bytes, bytes as u64);
        let micros = took.as_micros().max(1) as u64;
        let bucket = (64 - micros.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        Self::add(&self.latency[bucket], 1);
    }

    /// The upper bound of the bucket holding quantile `q` of read latencies, in µs.
    fn latency_quantile(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .latency
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(1u64 << bucket);
            }
        }
        None
    }

    pub fn report(&self) -> StatsReport {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsReport {
            reads: get(&self.reads),
            read_bytes: get(&self.read_bytes),
            failed_reads: get(&self.failed_reads),
            memory_hits: get(&self.memory_hits),
            disk_hits: get(&self.disk_hits),
            fetch_requests: get(&self.fetch_requests),
            read_aheads: get(&self.read_aheads),
            fetched_chunks: get(&self.fetched_chunks),
            fetched_bytes: get(&self.fetched_bytes),
            corrupt_chunks: get(&self.corrupt_chunks),
            prefetched_chunks: get(&self.prefetched_chunks),
            prefetched_bytes: get(&self.prefetched_bytes),
            prefetch_done: self.prefetch_done.load(Ordering::Relaxed),
            passthrough_opens: get(&self.passthrough_opens),
            opens: get(&self.opens),
            profile_chunks: get(&self.profile_chunks),
            profile_done: self.profile_done.load(Ordering::Relaxed),
            read_latency_us_p50: self.latency_quantile(0.50),
            read_latency_us_p90: self.latency_quantile(0.90),
            read_latency_us_p99: self.latency_quantile(0.99),
        }
    }
}

/// A mount's counters as a daemon that takes the mount over carries them on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub report: StatsReport,
    /// Reads per latency bucket.
    pub latency: Vec<u64>,
}

impl MountStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            report: self.report(),
            latency: self
                .latency
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
        }
    }

    /// Adds what a predecessor counted (flags are this daemon's own to set).
    pub fn add_snapshot(&self, before: &StatsSnapshot) {
        let r = &before.report;
        for (counter, n) in [
            (&self.reads, r.reads),
            (&self.read_bytes, r.read_bytes),
            (&self.failed_reads, r.failed_reads),
            (&self.memory_hits, r.memory_hits),
            (&self.disk_hits, r.disk_hits),
            (&self.fetch_requests, r.fetch_requests),
            (&self.read_aheads, r.read_aheads),
            (&self.fetched_chunks, r.fetched_chunks),
            (&self.fetched_bytes, r.fetched_bytes),
            (&self.corrupt_chunks, r.corrupt_chunks),
            (&self.prefetched_chunks, r.prefetched_chunks),
            (&self.prefetched_bytes, r.prefetched_bytes),
            (&self.passthrough_opens, r.passthrough_opens),
            (&self.opens, r.opens),
        ] {
            Self::add(counter, n);
        }
        for (bucket, n) in self.latency.iter().zip(&before.latency) {
            Self::add(bucket, *n);
        }
    }
}

/// Counters of one mount. Latencies are bucket upper bounds (powers of two).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatsReport {
    pub reads: u64,
    pub read_bytes: u64,
    pub failed_reads: u64,
    pub memory_hits: u64,
    pub disk_hits: u64,
    pub fetch_requests: u64,
    /// Of those, fetches of a stream's next window ahead of its reads.
    #[serde(default)]
    pub read_aheads: u64,
    /// Chunks and raw bytes fetched from the source, prefetch included.
    pub fetched_chunks: u64,
    pub fetched_bytes: u64,
    pub corrupt_chunks: u64,
    pub prefetched_chunks: u64,
    pub prefetched_bytes: u64,
    pub prefetch_done: bool,
    /// Opens served by FUSE passthrough: the kernel reads those files directly.
    pub passthrough_opens: u64,
    /// Opens of files and directories the kernel sent the daemon.
    #[serde(default)]
    pub opens: u64,
    /// Chunks of the image's startup profile (0: none), fetched first.
    #[serde(default)]
    pub profile_chunks: u64,
    #[serde(default)]
    pub profile_done: bool,
    pub read_latency_us_p50: Option<u64>,
    pub read_latency_us_p90: Option<u64>,
    pub read_latency_us_p99: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles_come_from_power_of_two_buckets() {
        let stats = MountStats::default();
        assert_eq!(stats.latency_quantile(0.5), None);
        for _ in 0..98 {
            stats.record_read(10, Duration::from_micros(20));
        }
        stats.record_read(10, Duration::from_millis(3));
        stats.record_read(10, Duration::from_millis(3));
        let report = stats.report();
        assert_eq!(report.read_latency_us_p50, Some(32));
        assert_eq!(report.read_latency_us_p90, Some(32));
        assert_eq!(report.read_latency_us_p99, Some(4096));
        assert_eq!(report.reads, 100);
        assert_eq!(report.read_bytes, 1000);
    }

    #[test]
    fn a_successor_counts_on_from_its_predecessors_snapshot() {
        let before = MountStats::default();
        before.record_read(10, Duration::from_millis(3));
        MountStats::add(&before.fetched_bytes, 700);
        let after = MountStats::default();
        after.record_read(5, Duration::from_micros(20));
        after.add_snapshot(&before.snapshot());
        let report = after.report();
        assert_eq!((report.reads, report.read_bytes), (2, 15));
        assert_eq!(report.fetched_bytes, 700);
        assert_eq!(report.read_latency_us_p99, Some(4096));
    }
}
