//! What a skiff image's tag holds, so that containerd (and every other OCI
//! client) can pull it: an OCI image index of two manifests (docs/FORMAT.md,
//! "What the tag holds").
//!
//! - The **launcher**, for the image's platform: the image's own config
//!   with one small layer, a file that names the image. containerd pulls
//!   it like any image; skiff's snapshotter knows the layer by its
//!   annotation ([`ARTIFACT_LABEL`], which containerd hands snapshotters as
//!   a label) and mounts the artifact lazily instead of unpacking it.
//! - skiff's **artifact**, under the platform `unknown/unknown` that no
//!   runtime picks (as BuildKit marks its attestations), which skiff's own
//!   readers take.
//!
//! The launcher's layer holds the index digest, so its diff_id (and so
//! containerd's chain id, the snapshot's name) follows from the image's
//! content: images with the same files share a snapshot. A launcher could
//! name any artifact, so the snapshotter checks that the chain id is the
//! one the artifact's index gives ([`launcher_diff_id`]) before it mounts
//! the artifact under that name.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use skiff_format::artifact::{ARTIFACT_TYPE, OCI_CONFIG_TYPE, OCI_MANIFEST_TYPE};
use skiff_format::{ImageManifest, IndexDigest};

use crate::client::Registry;
use crate::digest::Sha256Digest;
use crate::image::{Descriptor, OciManifest, RemoteImage, MAX_SKIFF_MANIFEST_BYTES};
use crate::RegistryError;

/// The media type of an OCI image index.
pub const OCI_INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// The launcher's layer: a plain tar, so its digest is its diff_id.
pub const LAUNCHER_LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// Annotation of the launcher's layer: the digest of the artifact's OCI
/// manifest. containerd passes a layer's `containerd.io/snapshot/…`
/// annotations to the snapshotter as labels of its Prepare.
pub const ARTIFACT_LABEL: &str = "containerd.io/snapshot/skiff.artifact";
/// The one file of the launcher's layer.
pub const LAUNCHER_FILE: &str = ".skiff-image";

/// An OCI platform, as much of it as an index entry needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform no runtime asks for.
    fn unknown() -> Platform {
        Platform {
            architecture: "unknown".into(),
            os: "unknown".into(),
            variant: None,
        }
    }
}

/// One manifest of an index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: Sha256Digest,
    pub size: u64,
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image index.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OciIndex {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub manifests: Vec<IndexEntry>,
}

impl OciIndex {
    /// The skiff artifact this index lists, if any.
    pub fn artifact(&self) -> Option<&IndexEntry> {
        self.manifests
            .iter()
            .find(|m| m.artifact_type.as_deref() == Some(ARTIFACT_TYPE))
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("index serialises")
    }
}

/// What a tag is published with: blobs first, then the manifests (by
/// digest), the index last; each as the bytes its digest is of.
pub struct TagContent {
    /// The launcher's layer (a tar) and config, to upload as blobs.
    pub launcher_layer: Vec<u8>,
    pub launcher_config: Vec<u8>,
    pub artifact_json: Vec<u8>,
    pub launcher: OciManifest,
    pub launcher_json: Vec<u8>,
    pub index: OciIndex,
}

/// The launcher and index for `artifact`, an image with the OCI config
/// `config` and index `index_digest`.
pub fn tag_content(
    artifact: &OciManifest,
    config: &[u8],
    index_digest: &IndexDigest,
) -> Result<TagContent, RegistryError> {
    let artifact_json = artifact.to_json();
    let artifact_descriptor = Descriptor::of(OCI_MANIFEST_TYPE, &artifact_json);
    let launcher_layer = launcher_layer(index_digest)?;
    let mut layer = Descriptor::of(LAUNCHER_LAYER_TYPE, &launcher_layer);
    layer.annotations.insert(
        ARTIFACT_LABEL.to_owned(),
        artifact_descriptor.digest.to_string(),
    );
    let mut image: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(config)
        .map_err(|e| RegistryError::Io(format!("the image's config is not a JSON object: {e}")))?;
    let platform = Platform {
        architecture: string_field(&image, "architecture")
            .unwrap_or_else(|| host_architecture().to_owned()),
        os: string_field(&image, "os").unwrap_or_else(|| "linux".to_owned()),
        variant: string_field(&image, "variant"),
    };
    image.insert(
        "rootfs".into(),
        serde_json::json!({ "type": "layers", "diff_ids": [layer.digest.to_string()] }),
    );
    // Its entries would count layers the launcher does not have.
    image.remove("history");
    let launcher_config = serde_json::to_vec(&image).expect("a JSON object serialises");
    let launcher = OciManifest {
        schema_version: 2,
        media_type: OCI_MANIFEST_TYPE.to_owned(),
        artifact_type: None,
        config: Descriptor::of(OCI_CONFIG_TYPE, &launcher_config),
        layers: vec![layer],
        subject: None,
        annotations: artifact.annotations.clone(),
    };
    let launcher_json = launcher.to_json();
    let launcher_descriptor = Descriptor::of(OCI_MANIFEST_TYPE, &launcher_json);
    let entry = |d: Descriptor, artifact_type: Option<&str>, platform: Platform| IndexEntry {
        media_type: d.media_type,
        digest: d.digest,
        size: d.size,
        artifact_type: artifact_type.map(str::to_owned),
        platform: Some(platform),
        annotations: BTreeMap::new(),
    };
    let index = OciIndex {
        schema_version: 2,
        media_type: OCI_INDEX_TYPE.to_owned(),
        manifests: vec![
            entry(launcher_descriptor, None, platform),
            entry(
                artifact_descriptor,
                Some(ARTIFACT_TYPE),
                Platform::unknown(),
            ),
        ],
    };
    Ok(TagContent {
        launcher_layer,
        launcher_config,
        artifact_json,
        launcher,
        launcher_json,
        index,
    })
}

fn string_field(object: &serde_json::Map<String, serde_json::Value>, key: &str) -> Option<String> {
    object
        .get(key)
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// This machine's architecture as OCI platforms name it (GOARCH).
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The diff_id of the launcher layer of the image whose index is
/// `index_digest`, and so containerd's chain id for its one snapshot.
pub fn launcher_diff_id(index_digest: &IndexDigest) -> Result<Sha256Digest, RegistryError> {
    Ok(crate::sha256_digest(&launcher_layer(index_digest)?))
}

/// The index digest of the skiff image at `registry`'s reference, as its
/// skiff manifest says (what a mount of it checks the index against).
pub fn index_digest_at(registry: &Registry) -> Result<IndexDigest, RegistryError> {
    let (oci, _) = RemoteImage::manifest_at(registry, &registry.reference().reference)?;
    let bytes = registry.blob(&oci.layers[0].digest, MAX_SKIFF_MANIFEST_BYTES)?;
    Ok(ImageManifest::from_json(&bytes)?.index.digest)
}

/// A tar of one file that names the image: the same bytes for the same index.
fn launcher_layer(index_digest: &IndexDigest) -> Result<Vec<u8>, RegistryError> {
    let text = format!(
        "This is a skiff image (index blake3:{index_digest}).\n\
         Its files are mounted lazily by skiff's containerd snapshotter or `skiff run`.\n"
    );
    let mut header = tar::Header::new_ustar();
    header.set_size(text.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_data(&mut header, LAUNCHER_FILE, text.as_bytes())
        .and_then(|()| builder.into_inner())
        .map_err(|e| RegistryError::Io(format!("writing the launcher layer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact() -> OciManifest {
        let d = |t: &str, b: &[u8]| Descriptor::of(t, b);
        OciManifest::skiff(
            d(OCI_CONFIG_TYPE, b"{}"),
            d(skiff_format::artifact::MANIFEST_LAYER_TYPE, b"m"),
            d(skiff_format::artifact::INDEX_LAYER_TYPE, b"i"),
            &IndexDigest::of(b"index"),
            d(skiff_format::artifact::CHUNK_TABLE_LAYER_TYPE, b"t"),
            vec![],
        )
    }

    #[test]
    fn the_launcher_keeps_the_config_and_names_the_artifact() {
        let config = br#"{"architecture":"arm64","os":"linux","config":{"Cmd":["/bin/sh"]},
            "rootfs":{"type":"layers","diff_ids":["sha256:aa","sha256:bb"]},"history":[{}]}"#;
        let content = tag_content(&artifact(), config, &IndexDigest::of(b"index")).unwrap();
        let launched: serde_json::Value = serde_json::from_slice(&content.launcher_config).unwrap();
        assert_eq!(launched["config"]["Cmd"][0], "/bin/sh");
        assert!(launched.get("history").is_none());
        let layer = &content.launcher.layers[0];
        assert_eq!(launched["rootfs"]["diff_ids"][0], layer.digest.to_string());
        assert_eq!(layer.digest, crate::sha256_digest(&content.launcher_layer));
        let artifact_digest = crate::sha256_digest(&artifact().to_json());
        assert_eq!(
            layer.annotations[ARTIFACT_LABEL],
            artifact_digest.to_string()
        );

        let index = &content.index;
        assert_eq!(index.manifests.len(), 2);
        assert_eq!(
            index.manifests[0].platform.as_ref().unwrap().architecture,
            "arm64"
        );
        assert_eq!(
            index.manifests[0].digest,
            crate::sha256_digest(&content.launcher.to_json())
        );
        assert_eq!(index.artifact().unwrap().digest, artifact_digest);
        assert_eq!(
            index.artifact().unwrap().platform,
            Some(Platform::unknown())
        );
    }

    #[test]
    fn the_launcher_layer_is_the_images_content() {
        let a = launcher_layer(&IndexDigest::of(b"a")).unwrap();
        assert_eq!(a, launcher_layer(&IndexDigest::of(b"a")).unwrap());
        assert_ne!(a, launcher_layer(&IndexDigest::of(b"b")).unwrap());
        let mut archive = tar::Archive::new(a.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, [LAUNCHER_FILE]);
    }

    #[test]
    fn a_config_that_is_not_an_object_is_refused() {
        assert!(tag_content(&artifact(), b"[1]", &IndexDigest::of(b"x")).is_err());
    }
}
