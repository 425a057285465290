//! Remote snapshots: the layer of a skiff image (its launcher's, see
//! `skiff_registry::launcher`), or a layer of an unconverted image with a
//! skiff artifact attached for it (`skiff_registry::referrers`), is
//! committed without being downloaded, and its files are a lazy mount of
//! the artifact, shared with `skiff mount` and `skiff run` on the host and
//! held by the snapshot's lease.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use skiff_agent::host::{is_dead_mount, mounted_here, MountedHere};
use skiff_agent::{ImageArg, Lease, MountRequest, MountSettings, Origin, SharedMounts};
use skiff_registry::launcher::{index_digest_at, launcher_diff_id, ARTIFACT_LABEL};
use skiff_registry::referrers::{attached, check_attached};
use skiff_registry::{Registry, RegistryRef, Sha256Digest, DOCKER_HUB};

use crate::error::{Result, SnapshotError};

/// The committed snapshot an unpack's Prepare is for (its chain id).
pub const TARGET_LABEL: &str = "containerd.io/snapshot.ref";
/// The image being pulled, as CRI names it: `HOST/REPO:TAG`.
pub const IMAGE_REF_LABEL: &str = "containerd.io/snapshot/cri.image-ref";
/// The digest of the (platform's) image manifest being pulled.
pub const MANIFEST_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.manifest-digest";
/// Marks a snapshot whose files were not unpacked here, as stargz does.
pub const REMOTE_LABEL: &str = "containerd.io/snapshot/remote";

/// How long a pull's answer to "which artifacts are attached to this
/// image" is reused: long enough for the Prepares of one unpack, short
/// enough that an image attached later is found on the next pull.
const ATTACHED_TTL: Duration = Duration::from_secs(60);
/// Images whose answer is kept at most (a pull asks for one).
const ATTACHED_CACHED: usize = 256;

/// Chain id → the artifacts attached for it, for one image.
type AttachedList = BTreeMap<String, Vec<Sha256Digest>>;
/// How long a lookup of attached artifacts may retry: an image without any
/// (most of them) must not wait long for an answer it does not need.
const LOOKUP_RETRY_WINDOW: Duration = Duration::from_secs(2);

/// The host's lazy mounts, as the snapshotter takes them.
pub struct LazyMounts {
    shared: SharedMounts,
    settings: MountSettings,
    /// Tells this snapshotter's leases from another's on the same run dir.
    owner: String,
    /// The artifacts attached to images pulled lately, by image.
    attached: Mutex<HashMap<RegistryRef, (Instant, AttachedList)>>,
    /// Where attached artifacts are trusted from (`HOST` or `HOST/REPO`
    /// prefixes); none: they are not looked for.
    attached_from: Vec<String>,
}

impl LazyMounts {
    /// The lazy mounts of the snapshotter whose root is `root`.
    pub fn new(shared: SharedMounts, settings: MountSettings, root: &Path) -> LazyMounts {
        LazyMounts {
            shared,
            settings,
            owner: skiff_agent::host::file_key(
                std::path::absolute(root)
                    .unwrap_or_else(|_| root.to_owned())
                    .as_os_str()
                    .as_encoded_bytes(),
            ),
            attached: Mutex::new(HashMap::new()),
            attached_from: Vec::new(),
        }
    }

    /// Trusts artifacts attached to images under these `HOST[/REPO]`
    /// prefixes (docs/CONTAINERD.md: whoever can attach to them decides
    /// what every image with the same layers shows on this node).
    pub fn with_attached_from(mut self, prefixes: Vec<String>) -> LazyMounts {
        self.attached_from = prefixes;
        self
    }

    /// Whether artifacts attached to images of `subject`'s repository are trusted.
    pub fn trusts_attached(&self, subject: &RegistryRef) -> bool {
        self.attached_from
            .iter()
            .any(|prefix| prefix_matches(prefix, subject))
    }

    /// Who the lease of this snapshotter's snapshot `name` says holds its mount.
    fn holder(&self, name: &str) -> String {
        format!("snapshot:{}:{name}", self.owner)
    }

    /// Refuses a layer whose chain id is not the one its artifact's index
    /// gives: a launcher may name any artifact, and the snapshot would
    /// stand for every image of that chain id on the host.
    pub fn check(&self, layer: &SkiffLayer) -> Result<()> {
        let ImageArg::Registry(reference) = &layer.image else {
            return Err(SnapshotError::InvalidArgument(format!(
                "{} is not in a registry",
                layer.image
            )));
        };
        let registry = self.registry(reference)?;
        let reading = |e: skiff_registry::RegistryError| {
            SnapshotError::FailedPrecondition(format!("reading {}: {e}", layer.image))
        };
        let index = index_digest_at(&registry).map_err(reading)?;
        let expected = launcher_diff_id(&index).map_err(reading)?;
        if expected.to_string() != layer.target {
            return Err(SnapshotError::InvalidArgument(format!(
                "the layer names {}, whose chain id is {expected}, not {}: refused",
                layer.image, layer.target
            )));
        }
        Ok(())
    }

    fn registry(&self, reference: &RegistryRef) -> Result<Registry> {
        self.registry_retrying_for(reference, self.settings.retry_window())
    }

    fn registry_retrying_for(&self, reference: &RegistryRef, window: Duration) -> Result<Registry> {
        Ok(Registry::new(reference)
            .map_err(|e| SnapshotError::FailedPrecondition(e.to_string()))?
            .with_retry_window(window))
    }

    /// The artifact attached to the pulled image for `layer`'s chain id,
    /// checked (it is attached to that image, holds the layers of that
    /// chain id, all its metadata reads, and `parent_chain` is the chain id
    /// of the layers under it); `None` if there is none or the image's
    /// repository is not trusted. An error (unreadable, or every candidate
    /// failed a check) means the layer is unpacked as any other.
    pub fn find_attached(
        &self,
        layer: &AttachedLayer,
        parent_chain: &str,
    ) -> Result<Option<ImageArg>> {
        if !self.trusts_attached(&layer.subject) {
            return Ok(None);
        }
        let list = self.attached_to(&layer.subject);
        let Some(candidates) = list.get(&layer.target) else {
            return Ok(None);
        };
        let mut refused = Vec::new();
        for artifact in candidates {
            let image = layer.subject.with_reference(&artifact.to_string());
            let checked = self
                .registry_retrying_for(&image, LOOKUP_RETRY_WINDOW)
                .and_then(|registry| {
                    check_attached(&registry, &layer.digest, &layer.target)
                        .map_err(|e| SnapshotError::FailedPrecondition(e.to_string()))
                });
            match checked {
                Ok(chain) => {
                    let below = chain
                        .len()
                        .checked_sub(2)
                        .map_or("", |at| chain[at].as_str());
                    if below == parent_chain {
                        return Ok(Some(ImageArg::Registry(image)));
                    }
                    refused.push(format!(
                        "{artifact}: its layers are on {below:?}, the pull's on {parent_chain:?}"
                    ));
                }
                Err(e) => refused.push(format!("{artifact}: {e}")),
            }
        }
        Err(SnapshotError::FailedPrecondition(refused.join("; ")))
    }

    /// The artifacts attached to `subject`, asked of the registry at most
    /// once a minute; a registry that cannot say counts as "none" for that
    /// minute too, so the Prepares of one pull wait for it once.
    fn attached_to(&self, subject: &RegistryRef) -> AttachedList {
        let cached = |cache: &HashMap<RegistryRef, (Instant, AttachedList)>| {
            cache
                .get(subject)
                .filter(|(at, _)| at.elapsed() < ATTACHED_TTL)
                .map(|(_, list)| list.clone())
        };
        if let Some(list) = cached(&self.attached_cache()) {
            return list;
        }
        let listed = self
            .registry_retrying_for(subject, LOOKUP_RETRY_WINDOW)
            .and_then(|registry| {
                let digest: Sha256Digest = subject.reference.parse().map_err(|_| {
                    SnapshotError::InvalidArgument(format!("{subject} does not name a digest"))
                })?;
                attached(&registry, &digest)
                    .map_err(|e| SnapshotError::FailedPrecondition(e.to_string()))
            });
        let list = match listed {
            Ok(list) => {
                if !list.is_empty() {
                    tracing::info!(
                        "{subject} has skiff artifacts attached for {} layers",
                        list.len()
                    );
                }
                list
            }
            Err(e) => {
                tracing::warn!(
                    "cannot list what is attached to {subject} ({e}); its layers are unpacked"
                );
                AttachedList::new()
            }
        };
        let mut cache = self.attached_cache();
        cache.retain(|_, (at, _)| at.elapsed() < ATTACHED_TTL);
        if cache.len() >= ATTACHED_CACHED {
            cache.clear();
        }
        cache.insert(subject.clone(), (Instant::now(), list.clone()));
        list
    }

    fn attached_cache(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<RegistryRef, (Instant, AttachedList)>> {
        self.attached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A lease on a mount of `image` for the snapshot `name`.
    pub fn mount(&self, image: &ImageArg, name: &str) -> Result<Lease> {
        let request = MountRequest {
            image: image.clone(),
            origin: Origin::of(image, None, Path::new(""))?,
            token_file: None,
            settings: self.settings.clone(),
            recording_at: None,
        };
        Ok(self.shared.acquire(&request, &self.holder(name), None)?)
    }

    /// Lets go of this snapshotter's leases that `wanted` (given the
    /// snapshot's name and the lease) does not want: those a crash left
    /// between a lease and its snapshot's record.
    pub fn sweep(&self, wanted: impl Fn(&str, &Lease) -> bool) {
        let prefix = self.holder("");
        for lease in self.shared.leases_held_by(&prefix) {
            let name = lease.holder.strip_prefix(&prefix).unwrap_or_default();
            if !wanted(name, &lease) {
                tracing::info!(
                    "letting go of the lease on {} for {name}, which no snapshot holds",
                    lease.mountpoint.display()
                );
                self.release(&lease);
            }
        }
    }

    pub fn release(&self, lease: &Lease) {
        if let Err(e) = self.shared.release(lease) {
            tracing::warn!("letting go of {}: {e}", lease.mountpoint.display());
        }
    }
}

/// Whether `lease`'s mount is there and its daemon answers.
pub fn is_live(lease: &Lease) -> bool {
    mounted_here(&lease.mountpoint) == MountedHere::Skiff && !is_dead_mount(&lease.mountpoint)
}

/// What a Prepare's labels say of a skiff image's layer.
#[derive(Debug, PartialEq)]
pub struct SkiffLayer {
    /// The committed snapshot to make (the chain id).
    pub target: String,
    /// The image's artifact, `docker://HOST/REPO@sha256:…`.
    pub image: ImageArg,
}

impl SkiffLayer {
    /// `None` for any other layer; an error for a skiff layer whose labels
    /// do not say where the image is.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Result<Option<SkiffLayer>> {
        let Some(artifact) = labels.get(ARTIFACT_LABEL) else {
            return Ok(None);
        };
        let Some(target) = labels.get(TARGET_LABEL) else {
            // Not an unpack (a Prepare on top of the image): nothing to mount.
            return Ok(None);
        };
        let digest: Sha256Digest = artifact.parse().map_err(|_| {
            SnapshotError::InvalidArgument(format!("{ARTIFACT_LABEL} is not a digest: {artifact}"))
        })?;
        let image_ref = labels.get(IMAGE_REF_LABEL).ok_or_else(|| {
            SnapshotError::FailedPrecondition(format!(
                "this is a skiff image's layer, but the pull did not say which image \
                 ({IMAGE_REF_LABEL}): pull it through CRI (the kubelet, crictl), \
                 with CRI's disable_snapshot_annotations = false"
            ))
        })?;
        Ok(Some(SkiffLayer {
            target: target.clone(),
            image: ImageArg::Registry(artifact_reference(image_ref, &digest)?),
        }))
    }
}

/// What a Prepare's labels say of a layer of an ordinary image pulled
/// through CRI: where to look for artifacts attached to it.
#[derive(Debug, PartialEq)]
pub struct AttachedLayer {
    /// The committed snapshot to make (the chain id).
    pub target: String,
    /// The image manifest, `HOST/REPO@sha256:…`.
    pub subject: RegistryRef,
    pub digest: Sha256Digest,
}

impl AttachedLayer {
    /// `None` unless this is an unpack's Prepare with CRI's labels.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Option<AttachedLayer> {
        let target = labels.get(TARGET_LABEL)?;
        let digest: Sha256Digest = labels.get(MANIFEST_DIGEST_LABEL)?.parse().ok()?;
        let subject = artifact_reference(labels.get(IMAGE_REF_LABEL)?, &digest).ok()?;
        Some(AttachedLayer {
            target: target.clone(),
            subject,
            digest,
        })
    }
}

/// Whether `prefix` (`HOST`, or `HOST/REPO` matching that repository and
/// those under it) covers the repository of `reference`.
fn prefix_matches(prefix: &str, reference: &RegistryRef) -> bool {
    let (host, repository) = prefix
        .trim_end_matches('/')
        .split_once('/')
        .unwrap_or((prefix.trim_end_matches('/'), ""));
    let host = if host == "docker.io" {
        DOCKER_HUB
    } else {
        host
    };
    host == reference.host
        && (repository.is_empty()
            || reference.repository == repository
            || reference
                .repository
                .strip_prefix(repository)
                .is_some_and(|rest| rest.starts_with('/')))
}

/// The manifest `digest` in the repository `image_ref` (`HOST/REPO[:TAG][@DIGEST]`) names.
fn artifact_reference(image_ref: &str, digest: &Sha256Digest) -> Result<RegistryRef> {
    // Pinned references name the launcher: only the repository matters.
    let named = image_ref
        .split_once('@')
        .map_or(image_ref, |(name, _)| name);
    let mut reference = RegistryRef::parse(named).map_err(|e| {
        SnapshotError::InvalidArgument(format!("{IMAGE_REF_LABEL} {image_ref}: {e}"))
    })?;
    // containerd names Docker Hub docker.io; its API lives elsewhere.
    if reference.host == "docker.io" {
        reference.host = DOCKER_HUB.to_owned();
    }
    Ok(reference.with_reference(&digest.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::tests::labels;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_skiff_layer_names_its_artifact_in_the_pulled_repository() {
        let layer = SkiffLayer::from_labels(&labels(&[
            (ARTIFACT_LABEL, DIGEST),
            (TARGET_LABEL, "sha256:chain"),
            (IMAGE_REF_LABEL, "127.0.0.1:5000/team/app:v1@sha256:feed"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(layer.target, "sha256:chain");
        assert_eq!(
            layer.image.to_string(),
            format!("docker://127.0.0.1:5000/team/app@{DIGEST}")
        );
        let hub = SkiffLayer::from_labels(&labels(&[
            (ARTIFACT_LABEL, DIGEST),
            (TARGET_LABEL, "c"),
            (IMAGE_REF_LABEL, "docker.io/library/app:1"),
        ]))
        .unwrap()
        .unwrap();
        assert!(hub
            .image
            .to_string()
            .starts_with(&format!("docker://{DOCKER_HUB}/library/app@")));
    }

    #[test]
    fn a_layer_pulled_through_cri_names_the_image_to_look_for_attached_artifacts() {
        let layer = AttachedLayer::from_labels(&labels(&[
            (TARGET_LABEL, "sha256:chain"),
            (IMAGE_REF_LABEL, "docker.io/team/app:v1"),
            (MANIFEST_DIGEST_LABEL, DIGEST),
        ]))
        .unwrap();
        assert_eq!(layer.target, "sha256:chain");
        assert_eq!(
            layer.subject.to_string(),
            format!("docker://{DOCKER_HUB}/team/app@{DIGEST}")
        );
        assert_eq!(layer.digest.to_string(), DIGEST);
        // Without CRI's labels (ctr, an unpack by hand) there is nothing to look for.
        for missing in [TARGET_LABEL, IMAGE_REF_LABEL, MANIFEST_DIGEST_LABEL] {
            let mut partial = labels(&[
                (TARGET_LABEL, "sha256:chain"),
                (IMAGE_REF_LABEL, "h.io/app:v1"),
                (MANIFEST_DIGEST_LABEL, DIGEST),
            ]);
            partial.remove(missing);
            assert_eq!(AttachedLayer::from_labels(&partial), None, "{missing}");
        }
    }

    #[test]
    fn attached_artifacts_are_trusted_only_under_the_prefixes_given() {
        let at = |r: &str| RegistryRef::parse(r).unwrap();
        let app = at("h.io:5000/team/app:1");
        assert!(prefix_matches("h.io:5000", &app));
        assert!(prefix_matches("h.io:5000/team", &app));
        assert!(prefix_matches("h.io:5000/team/", &app));
        assert!(prefix_matches("h.io:5000/team/app", &app));
        assert!(!prefix_matches("h.io:5000/tea", &app));
        assert!(!prefix_matches("h.io:5000/team/app2", &app));
        assert!(!prefix_matches("h.io", &app));
        assert!(!prefix_matches("other.io/team", &app));
        let hub = at(&format!("{DOCKER_HUB}/library/debian:12"));
        assert!(prefix_matches("docker.io/library", &hub));
        let root = tempfile::tempdir().unwrap();
        let lazy = LazyMounts::new(
            SharedMounts::new(skiff_agent::RunDir::new(root.path())),
            MountSettings::default(),
            root.path(),
        );
        assert!(!lazy.trusts_attached(&app), "trusted with no prefix given");
        let lazy = lazy.with_attached_from(vec!["h.io:5000/team".into()]);
        assert!(lazy.trusts_attached(&app));
        assert!(!lazy.trusts_attached(&at("h.io:5000/other/app:1")));
    }

    #[test]
    fn other_layers_are_not_remote_and_a_skiff_layer_without_its_image_is_refused() {
        let plain = labels(&[(TARGET_LABEL, "c"), (IMAGE_REF_LABEL, "h.io/a:1")]);
        assert_eq!(SkiffLayer::from_labels(&plain).unwrap(), None);
        let no_image = labels(&[(ARTIFACT_LABEL, DIGEST), (TARGET_LABEL, "c")]);
        let e = SkiffLayer::from_labels(&no_image).unwrap_err();
        assert!(
            e.to_string().contains("disable_snapshot_annotations"),
            "{e}"
        );
        let bad = labels(&[
            (ARTIFACT_LABEL, "md5:x"),
            (TARGET_LABEL, "c"),
            (IMAGE_REF_LABEL, "h.io/a:1"),
        ]);
        assert!(SkiffLayer::from_labels(&bad).is_err());
    }
}
