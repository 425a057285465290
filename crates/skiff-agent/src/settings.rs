//! The one typed definition of a lazy mount's options, with the one set of
//! defaults that `skiff mount`, `skiff run`, the mount daemon and the
//! snapshotter share.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use skiff_format::{ImageIndex, ImageManifest};
use skiff_fuse::PrefetchConfig;

use crate::error::{AgentError, Result};

pub const DEFAULT_RUN_DIR: &str = "/run/skiff";
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/skiff/chunks";

/// The window of a new stream of reads.
const FIRST_WINDOW_BYTES: u64 = 256 << 10;

/// How a lazy mount fetches, caches and prefetches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MountSettings {
    /// The host's chunk cache, shared by every mount.
    pub cache: PathBuf,
    /// Bound on the chunk cache in GB; least recently used chunks go first.
    pub cache_max_gb: f64,
    /// The cache is on storage other hosts share: claim chunks before
    /// fetching them (see `skiff_client::Claims`).
    pub shared_cache: bool,
    /// Fetch the rest of the image in the background.
    pub prefetch: bool,
    /// Cap on the background prefetch rate in MB/s (0: none).
    pub prefetch_rate_mb: u64,
    /// The largest read window in KiB (see `skiff_fuse::MountOptions::window`).
    pub window_kib: u64,
    /// Memory for chunks, per mount, in MiB.
    pub memory_mib: u64,
    /// Seconds a read keeps retrying an unreachable or stalled source before it fails with EIO.
    pub retry_for_secs: u64,
    /// Fetch the image's startup profile first.
    pub use_profile: bool,
    /// Honour the image's setuid bits and device nodes, as a root file system
    /// must: only for mounts under a root-only directory (or below an overlay).
    pub setuid_and_devices: bool,
    /// Answer every open (see `skiff_fuse::MountOptions::answer_opens`):
    /// open files' chunks are pinned in the cache, so a running container
    /// keeps what it has open whatever the cache evicts, and files
    /// assembled on this host are read by the kernel directly.
    pub passthrough: bool,
}

impl Default for MountSettings {
    fn default() -> Self {
        MountSettings {
            cache: PathBuf::from(DEFAULT_CACHE_DIR),
            cache_max_gb: 20.0,
            shared_cache: false,
            prefetch: true,
            prefetch_rate_mb: 0,
            window_kib: 16 << 10,
            memory_mib: 256,
            retry_for_secs: 30,
            use_profile: true,
            setuid_and_devices: true,
            passthrough: true,
        }
    }
}

impl MountSettings {
    pub fn validate(&self) -> Result<()> {
        if self.cache_max_gb.is_nan() || self.cache_max_gb <= 0.0 {
            return Err(AgentError::Settings(format!(
                "the cache bound (--cache-max-gb) must be above 0 GB, not {}",
                self.cache_max_gb
            )));
        }
        if self.window_kib == 0 || self.memory_mib == 0 {
            return Err(AgentError::Settings(
                "the read window and the memory for chunks must be above 0".into(),
            ));
        }
        Ok(())
    }

    pub fn cache_max_bytes(&self) -> u64 {
        (self.cache_max_gb * 1e9) as u64
    }

    pub fn retry_window(&self) -> Duration {
        Duration::from_secs(self.retry_for_secs)
    }

    /// The FUSE file system's options for `image`; `record_profile` makes
    /// a mount that records and does not learn from the profile it replaces.
    /// `cached` says whether chunks come over the network into the host
    /// cache (prefetching from a local store would only copy it into memory).
    pub fn fuse_options(
        &self,
        image: &str,
        manifest: &ImageManifest,
        index: &ImageIndex,
        record_profile: bool,
        cached: bool,
    ) -> skiff_fuse::MountOptions {
        let first = match &manifest.profile {
            Some(profile) if self.use_profile && !record_profile => {
                profile.chunk_order(index).unwrap_or_else(|e| {
                    tracing::warn!("ignoring the image's startup profile: {e}");
                    Vec::new()
                })
            }
            _ => Vec::new(),
        };
        let prefetch = (self.prefetch && cached).then(|| PrefetchConfig {
            max_rate: self.prefetch_rate_mb * 1_000_000,
            first,
            ..PrefetchConfig::default()
        });
        skiff_fuse::MountOptions {
            memory_bytes: self.memory_mib << 20,
            window: skiff_fuse::WindowLimits {
                min: FIRST_WINDOW_BYTES.min(self.window_kib << 10),
                max: self.window_kib << 10,
            },
            prefetch,
            fsname: format!("skiff:{image}"),
            record_profile,
            answer_opens: self.passthrough,
            setuid_and_devices: self.setuid_and_devices,
            ..skiff_fuse::MountOptions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_written_by_an_older_skiff_take_todays_defaults_for_what_they_lack() {
        let settings: MountSettings = serde_json::from_str(r#"{"window_kib": 64}"#).unwrap();
        assert_eq!(settings.window_kib, 64);
        assert_eq!(
            MountSettings {
                window_kib: 16 << 10,
                ..settings
            },
            MountSettings::default()
        );
    }

    #[test]
    fn a_cache_bound_of_zero_or_nan_is_refused() {
        for bad in [0.0, -1.0, f64::NAN] {
            let settings = MountSettings {
                cache_max_gb: bad,
                ..MountSettings::default()
            };
            assert!(settings.validate().is_err(), "{bad} accepted");
        }
        assert!(MountSettings::default().validate().is_ok());
    }
}
