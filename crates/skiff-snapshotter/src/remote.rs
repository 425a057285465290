//! Remote snapshots: the layer of a skiff image (its launcher's, see
//! `skiff_registry::launcher`) is committed without being downloaded, and
//! its files are a lazy mount of the image, shared with `skiff mount` and
//! `skiff run` on the host and held by the snapshot's lease.

use std::collections::BTreeMap;
use std::path::Path;

use skiff_agent::host::{is_dead_mount, mounted_here, MountedHere};
use skiff_agent::{ImageArg, Lease, MountRequest, MountSettings, Origin, SharedMounts};
use skiff_registry::launcher::{index_digest_at, launcher_diff_id, ARTIFACT_LABEL};
use skiff_registry::{Registry, RegistryRef, Sha256Digest, DOCKER_HUB};

use crate::error::{Result, SnapshotError};

/// The committed snapshot an unpack's Prepare is for (its chain id).
pub const TARGET_LABEL: &str = "containerd.io/snapshot.ref";
/// The image being pulled, as CRI names it: `HOST/REPO:TAG`.
pub const IMAGE_REF_LABEL: &str = "containerd.io/snapshot/cri.image-ref";
/// Marks a snapshot whose files were not unpacked here, as stargz does.
pub const REMOTE_LABEL: &str = "containerd.io/snapshot/remote";

/// The host's lazy mounts, as the snapshotter takes them.
pub struct LazyMounts {
    shared: SharedMounts,
    settings: MountSettings,
    /// Tells this snapshotter's leases from another's on the same run dir.
    owner: String,
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
        }
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
        let registry = Registry::new(reference)
            .map_err(|e| SnapshotError::FailedPrecondition(e.to_string()))?
            .with_retry_window(self.settings.retry_window());
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

/// The artifact `digest` in the repository `image_ref` (`HOST/REPO[:TAG][@DIGEST]`) names.
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
