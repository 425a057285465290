//! Where an image comes from, typed: the one place a backend is chosen.
//!
//! An image on the command line is `NAME[:TAG]` (the local store, or a
//! chunk server with `--server`) or `docker://HOST/REPO:TAG` (a registry).
//! Adding a backend is one arm of [`Origin`] and one in [`open_image`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use skiff_client::{CachedSource, ChunkCache, Client};
use skiff_format::{ImageIndex, ImageManifest, ImageRef};
use skiff_registry::{RangePlan, Registry, RegistryRef, RegistrySource, RemoteImage};
use skiff_source::ChunkSource;
use skiff_store::Store;

use crate::error::{AgentError, IoContext, Result};
use crate::settings::MountSettings;

/// An image as the user names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ImageArg {
    /// `NAME[:TAG]` in a store or on a chunk server.
    Named(ImageRef),
    /// `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`.
    Registry(RegistryRef),
}

impl FromStr for ImageArg {
    type Err = AgentError;

    fn from_str(s: &str) -> Result<Self> {
        match RegistryRef::parse_url(s) {
            Some(reference) => Ok(ImageArg::Registry(reference?)),
            None => Ok(ImageArg::Named(s.parse()?)),
        }
    }
}

impl TryFrom<String> for ImageArg {
    type Error = AgentError;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<ImageArg> for String {
    fn from(image: ImageArg) -> String {
        image.to_string()
    }
}

impl fmt::Display for ImageArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageArg::Named(image) => image.fmt(f),
            ImageArg::Registry(reference) => reference.fmt(f),
        }
    }
}

/// Where a mount's chunks come from; kept in mount records, so `skiff run`
/// shares a mount only with one of the same image from the same place.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Origin {
    Store {
        path: PathBuf,
    },
    Server {
        url: String,
    },
    Registry {
        reference: String,
    },
    /// A record this version cannot read (written by an older skiff): its
    /// mount is still listed and unmounted, never shared.
    #[serde(other)]
    Unknown,
}

impl Origin {
    /// Reads a mount record's origin, whatever an older skiff wrote there.
    pub fn lenient<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Origin, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        Ok(serde_json::from_value(value).unwrap_or(Origin::Unknown))
    }
}

impl Origin {
    /// The origin of `image`, with `--server` if given, else the store.
    pub fn of(image: &ImageArg, server: Option<&str>, store_dir: &Path) -> Result<Origin> {
        Ok(match (image, server) {
            (ImageArg::Registry(reference), server) => {
                if let Some(server) = server {
                    // Likely $SKIFF_SERVER, set for other commands.
                    tracing::warn!(
                        "{reference} comes from its registry; ignoring the server {server}"
                    );
                }
                Origin::Registry {
                    reference: reference.to_string(),
                }
            }
            (ImageArg::Named(_), Some(url)) => Origin::Server {
                url: url.trim_end_matches('/').to_owned(),
            },
            (ImageArg::Named(_), None) => Origin::Store {
                path: store_dir
                    .canonicalize()
                    .unwrap_or_else(|_| store_dir.to_owned()),
            },
        })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Store { path } => write!(f, "store {}", path.display()),
            Origin::Server { url } => write!(f, "server {url}"),
            Origin::Registry { reference } => write!(f, "registry {reference}"),
            Origin::Unknown => write!(f, "unknown origin"),
        }
    }
}

/// What opening an image needs beyond its name and the mount settings.
#[derive(Clone, Copy, Default)]
pub struct OpenOptions<'a> {
    /// The chunk server's bearer token.
    pub token_file: Option<&'a Path>,
    /// Open this image, not the one the name means now (a takeover).
    pub pinned: Option<&'a PinnedImage>,
    /// Keep the image's metadata here (a supervised mount), and open a
    /// pinned image from what is kept here, without the network.
    pub keep: Option<&'a Path>,
}

/// The very image a mount serves, for a daemon that takes the mount over:
/// its inode numbers are positions in this image's index, whatever image
/// its tag names by then.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PinnedImage {
    pub manifest: ImageManifest,
    /// The registry manifest's digest, for an image from a registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_digest: Option<String>,
}

/// A token file's contents without surrounding white space; never empty.
pub fn read_token_file(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .io_context(|| format!("reading token file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(AgentError::Settings(format!(
            "token file {} is empty",
            path.display()
        )));
    }
    Ok(token.to_owned())
}

/// An image ready to mount: its manifest and index, and where its chunks come from.
pub struct OpenedImage {
    pub manifest: ImageManifest,
    /// The registry manifest's digest, for an image from a registry (with
    /// the manifest, what pins this very image: [`PinnedImage`]).
    pub registry_digest: Option<String>,
    pub index: ImageIndex,
    pub source: Arc<dyn ChunkSource>,
    /// The host's chunk cache, for a network source.
    pub cache: Option<Arc<ChunkCache>>,
}

/// Reads `image`'s manifest and index from `origin` and makes its chunk source.
pub fn open_image(
    image: &ImageArg,
    origin: &Origin,
    settings: &MountSettings,
    options: OpenOptions,
) -> Result<OpenedImage> {
    let cache = || {
        let open = if settings.shared_cache {
            ChunkCache::open_shared
        } else {
            ChunkCache::open
        };
        open(&settings.cache, settings.cache_max_bytes()).map_err(|e| AgentError::Open {
            image: image.to_string(),
            source: Box::new(e),
        })
    };
    let opening = |source: Box<dyn std::error::Error + Send + Sync>| AgentError::Open {
        image: image.to_string(),
        source,
    };
    match (origin, image) {
        (Origin::Store { path }, ImageArg::Named(name)) => {
            let store = Store::open_read_only(path)?;
            let manifest = match options.pinned {
                Some(pinned) => pinned.manifest.clone(),
                None => store.image(name)?,
            };
            let index = store.index(&manifest.index.digest)?;
            Ok(OpenedImage {
                registry_digest: None,
                manifest,
                index,
                source: Arc::new(store),
                cache: None,
            })
        }
        (Origin::Server { url }, ImageArg::Named(name)) => {
            let token = options.token_file.map(read_token_file).transpose()?;
            let client = Client::new(url, token)?
                .with_retry_window(settings.retry_window())
                // A stalled server costs a retry, never the whole window.
                .with_batch_timeout(Duration::from_secs(10));
            let from_server = |e| opening(format!("from {url}: {e}").into());
            let (manifest, index) = match options.pinned {
                Some(pinned) => {
                    let digest = &pinned.manifest.index.digest;
                    let encoded = match options.keep.and_then(|dir| kept::index(dir, digest)) {
                        Some(encoded) => encoded,
                        None => client.index_bytes(digest).map_err(from_server)?,
                    };
                    let index = ImageIndex::decode(&encoded).map_err(|e| opening(Box::new(e)))?;
                    index.validate().map_err(|e| opening(Box::new(e)))?;
                    (pinned.manifest.clone(), index)
                }
                None => {
                    let (manifest, encoded, index) = client.image(name).map_err(from_server)?;
                    if let Some(dir) = options.keep {
                        kept::save(dir, &[(kept::INDEX, encoded.as_slice())], None::<&()>);
                    }
                    (manifest, index)
                }
            };
            let cache = cache()?;
            Ok(OpenedImage {
                registry_digest: None,
                manifest,
                index,
                source: Arc::new(CachedSource::new(cache.clone(), client)),
                cache: Some(cache),
            })
        }
        (Origin::Registry { .. }, ImageArg::Registry(reference)) => {
            let reference = match options.pinned.and_then(|p| p.registry_digest.as_deref()) {
                Some(digest) => reference.with_reference(digest),
                None => reference.clone(),
            };
            let registry =
                Arc::new(Registry::new(&reference)?.with_retry_window(settings.retry_window()));
            // Kept parts count only if they are the pinned image's.
            let kept_parts = options.pinned.and_then(|pinned| {
                let parts = kept::remote_image_parts(options.keep?)?;
                let same = Some(parts.digest.to_string()) == pinned.registry_digest
                    && parts.stored_manifest.index.digest == pinned.manifest.index.digest;
                same.then_some(parts)
            });
            let remote = match kept_parts {
                Some(parts) => RemoteImage::from_parts(&registry, parts),
                None => RemoteImage::fetch(&registry),
            }
            .map_err(|e| opening(Box::new(e)))?;
            if let (Some(dir), None) = (options.keep, options.pinned) {
                let parts = remote.parts();
                kept::save(
                    dir,
                    &[
                        (kept::INDEX, parts.index_bytes.as_slice()),
                        (kept::TABLE, parts.table_bytes.as_slice()),
                    ],
                    Some(&parts),
                );
            }
            let cache = cache()?;
            let plan = RangePlan {
                retry_window: settings.retry_window(),
                ..RangePlan::default()
            };
            let source = RegistrySource::new(registry, &remote, plan, cache.root().join("tmp"));
            Ok(OpenedImage {
                registry_digest: Some(remote.digest.to_string()),
                manifest: remote.manifest,
                index: remote.index,
                source: Arc::new(CachedSource::new(cache.clone(), source)),
                cache: Some(cache),
            })
        }
        (origin, image) => Err(AgentError::OriginMismatch {
            image: image.to_string(),
            origin: origin.to_string(),
        }),
    }
}

/// An image's metadata kept on local disk for a mount's next daemon.
mod kept {
    use std::path::Path;

    use serde::Serialize;
    use skiff_format::IndexDigest;
    use skiff_registry::RemoteImageParts;

    pub const INDEX: &str = "index";
    pub const TABLE: &str = "table";
    const PARTS: &str = "parts.json";

    /// Writes `files` and `parts` into `dir`; a failure costs a takeover
    /// the network, so it is only logged.
    pub fn save(dir: &Path, files: &[(&str, &[u8])], parts: Option<&impl Serialize>) {
        let written = std::fs::create_dir_all(dir).and_then(|()| {
            for (name, bytes) in files {
                crate::host::write_atomically(&dir.join(name), bytes)
                    .map_err(std::io::Error::other)?;
            }
            if let Some(parts) = parts {
                let json = serde_json::to_vec(parts).map_err(std::io::Error::other)?;
                crate::host::write_atomically(&dir.join(PARTS), &json)
                    .map_err(std::io::Error::other)?;
            }
            Ok(())
        });
        if let Err(e) = written {
            tracing::warn!("keeping the image's metadata in {}: {e}", dir.display());
        }
    }

    /// The kept index, if it is the one `digest` names.
    pub fn index(dir: &Path, digest: &IndexDigest) -> Option<Vec<u8>> {
        let bytes = std::fs::read(dir.join(INDEX)).ok()?;
        (IndexDigest::of(&bytes) == *digest).then_some(bytes)
    }

    pub fn remote_image_parts(dir: &Path) -> Option<RemoteImageParts> {
        let mut parts: RemoteImageParts =
            serde_json::from_slice(&std::fs::read(dir.join(PARTS)).ok()?).ok()?;
        parts.index_bytes = std::fs::read(dir.join(INDEX)).ok()?;
        parts.table_bytes = std::fs::read(dir.join(TABLE)).ok()?;
        Some(parts)
    }
}
