use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{ChunkingParams, FormatError, ImageRef, IndexDigest, StartupProfile};

/// The manifest encoding this code writes and reads.
pub const MANIFEST_SCHEMA_VERSION: u32 = 1;

/// Where the index lives and what it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexDescriptor {
    pub digest: IndexDigest,
    /// Length of the encoded index in bytes.
    pub size: u64,
    pub files: u64,
    /// Sum of regular file sizes, hard links counted once.
    pub logical_bytes: u64,
}

/// What the image was converted from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Digest of the source OCI/Docker image manifest (`sha256:…`).
    pub manifest_digest: String,
    /// Digest of the source config blob (`sha256:…`).
    pub config_digest: String,
    /// `os/arch[/variant]` that was selected.
    pub platform: String,
    pub layers: u32,
    /// The uncompressed layers, bottom first: gc keeps their conversion
    /// records (and the chunks those name) while this image exists.
    /// Absent (empty) in manifests written before layer records existed.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// A named image in a skiff store: JSON, fields in this order, no timestamps,
/// so converting the same image twice gives the same bytes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageManifest {
    pub schema_version: u32,
    pub name: String,
    pub tag: String,
    pub index: IndexDescriptor,
    pub chunking: ChunkingParams,
    pub source: SourceInfo,
    /// The image's OCI config, byte for byte as in the source image.
    pub config: Box<RawValue>,
    /// What a recorded start read first (`skiff run --record-profile`);
    /// absent until one is recorded, so conversions stay byte-identical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<StartupProfile>,
}

impl ImageManifest {
    pub fn image_ref(&self) -> ImageRef {
        ImageRef {
            name: self.name.clone(),
            tag: self.tag.clone(),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serialising owned data with string keys into a Vec cannot fail.
        serde_json::to_vec(self).expect("manifest serialises")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, FormatError> {
        let manifest: ImageManifest = serde_json::from_slice(bytes)
            .map_err(|e| FormatError::MalformedManifest(e.to_string()))?;
        if manifest.schema_version != MANIFEST_SCHEMA_VERSION {
            return Err(FormatError::MalformedManifest(format!(
                "schema version {} (this skiff reads {MANIFEST_SCHEMA_VERSION})",
                manifest.schema_version
            )));
        }
        manifest.chunking.validate()?;
        Ok(manifest)
    }
}
