//! `push` and `pull` between a local store and an OCI registry.
//!
//! A push names the image's frames in blobs. Frames that hold only this
//! image's chunks are copied verbatim, grouped by the [`BLOB_SEGMENT_BYTES`]
//! span of the pack they start in, so the same frames make the same blob
//! whichever image of the store is pushed: a second image that shares them
//! names blobs the registry has (HEAD) or that another repository of it
//! holds (cross-mounted), and uploads only blobs with new chunks. Frames
//! that also hold other chunks (another image's, a deleted file's) are never
//! published: this image's chunks from them are framed anew. Blobs go first,
//! the manifest last, so a killed push run again sends only what had not
//! arrived.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use skiff_chunk::{Frame, FrameBuilder};
use skiff_format::artifact::{
    ChunkTable, TableChunk, TableFrame, CHUNK_TABLE_LAYER_TYPE, INDEX_DIGEST_ANNOTATION,
    INDEX_LAYER_TYPE, MANIFEST_LAYER_TYPE, OCI_CONFIG_TYPE, OCI_MANIFEST_TYPE, PACK_LAYER_TYPE,
};
use skiff_format::ChunkRef;
use skiff_format::{ChunkId, ImageIndex, ImageManifest, ImageRef, StartupProfile};
use skiff_registry::{
    Access, Descriptor, MountOutcome, OciManifest, RangePlan, Registry, RegistrySource,
    RemoteImage, Sha256Digest, MAX_SKIFF_MANIFEST_BYTES,
};
use skiff_source::ChunkSource;
use skiff_store::{ChunkLocation, PackFrame, Store};

use crate::transfer::{distinct_chunks, missing_in, seconds, store_chunks, TransferProgress};
use crate::ClientError;

/// A pack is cut into blobs of the frames that start in each such span of
/// it. Small enough that images sharing a run of frames share most of its
/// blobs (only those where the run starts and ends differ), large enough
/// that an image has few blobs (a 350 MB image: about 90).
pub const BLOB_SEGMENT_BYTES: u64 = 4 << 20;
/// Chunks framed anew for a push go into blobs of about this many raw bytes.
const REFRAMED_BLOB_RAW_BYTES: u64 = 64 << 20;
/// Index and chunk table blobs are compressed harder than frames: they are
/// read before a mount is ready.
const METADATA_ZSTD_LEVEL: i32 = 9;
/// Where a store remembers which repositories got which blobs, for cross-mounts.
const BLOB_LOG_FILE: &str = "registry-blobs.json";

#[derive(Clone, Debug, Serialize)]
pub struct RegistryPushReport {
    pub image: String,
    pub destination: String,
    /// The OCI manifest's digest.
    pub digest: String,
    /// Blobs the manifest names (config and skiff metadata included).
    pub blobs: u64,
    pub blobs_uploaded: u64,
    pub blobs_mounted: u64,
    /// Blobs the repository had already.
    pub blobs_present: u64,
    pub bytes_uploaded: u64,
    #[serde(serialize_with = "seconds")]
    pub elapsed: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct RegistryPullReport {
    pub image: String,
    pub source: String,
    pub chunks: u64,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    /// Bytes the registry sent: the image's metadata blobs, and compressed
    /// frames (neighbours in them included).
    pub wire_bytes: u64,
    pub requests: u64,
    #[serde(serialize_with = "seconds")]
    pub elapsed: Duration,
}

/// One blob of a push.
enum PlannedBlob {
    /// Frames that hold only this image's chunks, copied verbatim: those of
    /// one segment of one pack that the image uses.
    Frames { pack: u32, frames: Vec<PackFrame> },
    /// This image's chunks from frames that also hold other chunks (another
    /// image's, or a deleted file's): framed anew, so a push never
    /// publishes bytes that are not the image's.
    Reframed { chunks: Vec<ChunkRef> },
}

/// The image's frames cut into blobs, in the order they are named.
fn plan_blobs(
    store: &Store,
    chunks: &[ChunkRef],
    locations: &HashMap<ChunkId, ChunkLocation>,
) -> Result<Vec<PlannedBlob>, ClientError> {
    let packs: HashSet<u32> = locations.values().map(|l| l.pack).collect();
    let mine: HashSet<ChunkId> = locations.keys().copied().collect();
    let used: HashSet<(u32, u64)> = locations
        .values()
        .map(|l| (l.pack, l.frame_offset))
        .collect();
    let mut blobs = Vec::new();
    let mut foreign_frames = HashSet::new();
    for (pack, frames) in store.frames_of_packs(&packs)? {
        let mut segments: BTreeMap<u64, Vec<PackFrame>> = BTreeMap::new();
        for frame in frames {
            if !used.contains(&(pack, frame.offset)) {
                continue;
            }
            if frame.chunks.iter().all(|id| mine.contains(id)) {
                segments
                    .entry(frame.offset / BLOB_SEGMENT_BYTES)
                    .or_default()
                    .push(frame);
            } else {
                foreign_frames.insert((pack, frame.offset));
            }
        }
        blobs.extend(
            segments
                .into_values()
                .map(|frames| PlannedBlob::Frames { pack, frames }),
        );
    }
    // In the index's order, so the same image frames them the same way every time.
    let mut reframed = Vec::new();
    let mut bytes = 0u64;
    for chunk in chunks {
        let loc = &locations[&chunk.id];
        if !foreign_frames.contains(&(loc.pack, loc.frame_offset)) {
            continue;
        }
        if bytes >= REFRAMED_BLOB_RAW_BYTES {
            blobs.push(PlannedBlob::Reframed {
                chunks: std::mem::take(&mut reframed),
            });
            bytes = 0;
        }
        reframed.push(*chunk);
        bytes += u64::from(chunk.len);
    }
    if !reframed.is_empty() {
        blobs.push(PlannedBlob::Reframed { chunks: reframed });
    }
    Ok(blobs)
}

/// The bytes of blob number `blob`, with its frames appended to the table
/// (frames) and its chunks noted in `placed` (chunk → frame, offset, length).
fn build_blob(
    store: &Store,
    planned: &PlannedBlob,
    blob: u32,
    frames: &mut Vec<TableFrame>,
    placed: &mut Vec<TableChunk>,
    mine: &HashSet<ChunkId>,
    locations: &HashMap<ChunkId, ChunkLocation>,
) -> Result<Vec<u8>, ClientError> {
    let mut bytes = Vec::new();
    match planned {
        PlannedBlob::Frames {
            pack,
            frames: copied,
        } => {
            for frame in copied {
                let at = frames.len() as u32;
                frames.push(TableFrame {
                    blob,
                    offset: bytes.len() as u64,
                    len: frame.len,
                    raw_len: frame.raw_len,
                });
                for id in frame.chunks.iter().filter(|id| mine.contains(id)) {
                    let loc = &locations[id];
                    placed.push(TableChunk {
                        id: *id,
                        frame: at,
                        offset: loc.offset,
                        len: loc.len,
                    });
                }
                bytes.extend(store.read_pack_bytes(*pack, frame.offset, u64::from(frame.len))?);
            }
        }
        PlannedBlob::Reframed { chunks } => {
            let config = store.config();
            let mut builder = FrameBuilder::new(config.frame_size as usize, config.zstd_level)?;
            let mut add = |frame: Frame, bytes: &mut Vec<u8>| {
                let at = frames.len() as u32;
                frames.push(TableFrame {
                    blob,
                    offset: bytes.len() as u64,
                    len: frame.compressed.len() as u32,
                    raw_len: frame.uncompressed_len,
                });
                for entry in &frame.entries {
                    placed.push(TableChunk {
                        id: entry.id,
                        frame: at,
                        offset: entry.offset,
                        len: entry.len,
                    });
                }
                bytes.extend_from_slice(&frame.compressed);
            };
            for chunk in chunks {
                let data = store.read_chunk(&chunk.id)?;
                if let Some(frame) = builder.push(chunk.id, &data)? {
                    add(frame, &mut bytes);
                }
            }
            if let Some(frame) = builder.finish()? {
                add(frame, &mut bytes);
            }
        }
    }
    Ok(bytes)
}

/// Which repositories of which registries received which blobs from this store.
#[derive(Default, serde::Deserialize, Serialize)]
struct BlobLog {
    /// host → blob digest → repositories.
    #[serde(default)]
    hosts: BTreeMap<String, BTreeMap<String, Vec<String>>>,
}

impl BlobLog {
    fn path(store: &Store) -> PathBuf {
        store.root().join(BLOB_LOG_FILE)
    }

    fn load(path: &Path) -> BlobLog {
        std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    fn holders(&self, host: &str, digest: &Sha256Digest) -> Vec<String> {
        self.hosts
            .get(host)
            .and_then(|blobs| blobs.get(&digest.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    fn add(&mut self, host: &str, digest: &Sha256Digest, repository: &str) {
        let repos = self
            .hosts
            .entry(host.to_owned())
            .or_default()
            .entry(digest.to_string())
            .or_default();
        if !repos.iter().any(|r| r == repository) {
            repos.push(repository.to_owned());
        }
    }

    /// Written aside and renamed; a lost update only costs an upload a cross-mount could have saved.
    fn save(&self, path: &Path) {
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec(self)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::warn!("could not record pushed blobs in {}: {e}", path.display());
        }
    }
}

/// What happened to one blob of a push.
enum Sent {
    Present,
    Mounted,
    Uploaded(u64),
}

/// Makes sure the repository has `digest`: HEAD, else a cross-mount from
/// a repository this store pushed it to, else an upload of `bytes()`.
fn ensure_blob(
    registry: &Registry,
    log: &BlobLog,
    descriptor: &Descriptor,
    bytes: &mut dyn FnMut() -> Result<Vec<u8>, ClientError>,
) -> Result<Sent, ClientError> {
    if registry
        .blob_size(&descriptor.digest, &Access::Push)?
        .is_some()
    {
        return Ok(Sent::Present);
    }
    let mut session = None;
    for from in log.holders(registry.host(), &descriptor.digest) {
        if from == registry.repository() {
            continue;
        }
        match registry.mount_blob(&descriptor.digest, &from) {
            Ok(MountOutcome::Mounted) => return Ok(Sent::Mounted),
            // Not mountable from there (gone, or no access): upload into the session it opened.
            Ok(MountOutcome::Upload(location)) => session = Some(location),
            Err(e) => tracing::warn!(
                "cross-mounting {} from {from}: {e}; uploading it",
                descriptor.digest
            ),
        }
        break;
    }
    let data = bytes()?;
    registry.upload_blob(&descriptor.digest, &data, session)?;
    Ok(Sent::Uploaded(data.len() as u64))
}

fn zstd_compress(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, METADATA_ZSTD_LEVEL).expect("zstd compression of a buffer")
}

/// Publishes `image` from `store` to `registry`'s repository under its reference (a tag).
pub fn push_to_registry(
    store: &Store,
    image: &ImageRef,
    registry: &Registry,
    progress: &dyn TransferProgress,
) -> Result<RegistryPushReport, ClientError> {
    let started = Instant::now();
    let manifest = store.image(image)?;
    let tag = &registry.reference().reference;
    if registry.reference().is_digest() {
        return Err(ClientError::Protocol {
            url: registry.reference().to_string(),
            message: "push to a tag, not a digest".into(),
        });
    }
    let encoded = store.index_bytes(&manifest.index.digest)?;
    let index = ImageIndex::decode(&encoded)?;
    let chunks = distinct_chunks(&index);
    let mut locations = HashMap::new();
    for chunk in &chunks {
        let loc = store
            .chunk_location(&chunk.id)?
            .ok_or(skiff_store::StoreError::ChunkNotFound(chunk.id))?;
        locations.insert(chunk.id, loc);
    }
    let mine: HashSet<ChunkId> = locations.keys().copied().collect();
    let planned = plan_blobs(store, &chunks, &locations)?;
    let total: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
    progress.start(planned.len() as u64, total);

    let log_path = BlobLog::path(store);
    let mut log = BlobLog::load(&log_path);
    let mut report = RegistryPushReport {
        image: image.to_string(),
        destination: registry.reference().to_string(),
        digest: String::new(),
        blobs: 0,
        blobs_uploaded: 0,
        blobs_mounted: 0,
        blobs_present: 0,
        bytes_uploaded: 0,
        elapsed: Duration::ZERO,
    };
    let count = |sent: Sent, report: &mut RegistryPushReport| {
        report.blobs += 1;
        match sent {
            Sent::Present => report.blobs_present += 1,
            Sent::Mounted => report.blobs_mounted += 1,
            Sent::Uploaded(n) => {
                report.blobs_uploaded += 1;
                report.bytes_uploaded += n;
            }
        }
    };
    let (mut frames, mut placed) = (Vec::new(), Vec::new());
    let mut packs = Vec::with_capacity(planned.len());
    for (at, blob) in planned.iter().enumerate() {
        let before = placed.len();
        let bytes = build_blob(
            store,
            blob,
            at as u32,
            &mut frames,
            &mut placed,
            &mine,
            &locations,
        )?;
        let descriptor = Descriptor::of(PACK_LAYER_TYPE, &bytes);
        let mut once = Some(bytes);
        let sent = ensure_blob(registry, &log, &descriptor, &mut || {
            Ok(once.take().unwrap_or_default())
        })?;
        log.add(registry.host(), &descriptor.digest, registry.repository());
        count(sent, &mut report);
        progress.advance(placed[before..].iter().map(|c| u64::from(c.len)).sum());
        packs.push(descriptor);
    }
    placed.sort_by_key(|c| c.id);
    let table = ChunkTable {
        frames,
        chunks: placed,
    };
    table.validate(packs.len())?;
    let config_bytes = manifest.config.get().as_bytes().to_vec();
    let small = [
        (OCI_CONFIG_TYPE, config_bytes),
        (MANIFEST_LAYER_TYPE, manifest.to_json()),
        (INDEX_LAYER_TYPE, zstd_compress(&encoded)),
        (CHUNK_TABLE_LAYER_TYPE, zstd_compress(&table.encode())),
    ];
    let mut descriptors = Vec::new();
    for (media_type, bytes) in small {
        let descriptor = Descriptor::of(media_type, &bytes);
        let mut once = Some(bytes);
        let sent = ensure_blob(registry, &log, &descriptor, &mut || {
            Ok(once.take().unwrap_or_default())
        })?;
        log.add(registry.host(), &descriptor.digest, registry.repository());
        count(sent, &mut report);
        descriptors.push(descriptor);
    }
    log.save(&log_path);
    let [config, skiff_manifest, mut index_layer, table_layer] =
        <[Descriptor; 4]>::try_from(descriptors).expect("four small blobs");
    index_layer.annotations.insert(
        INDEX_DIGEST_ANNOTATION.to_owned(),
        format!("blake3:{}", manifest.index.digest),
    );
    let oci = OciManifest::skiff(
        config,
        skiff_manifest,
        index_layer,
        &manifest.index.digest,
        table_layer,
        packs,
    );
    let digest = registry.put_manifest(tag, OCI_MANIFEST_TYPE, &oci.to_json())?;
    report.digest = digest.to_string();
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Fetches the image at `registry`'s reference into `store` as `target`.
pub fn pull_from_registry(
    registry: std::sync::Arc<Registry>,
    store: &Store,
    target: &ImageRef,
    progress: &dyn TransferProgress,
) -> Result<RegistryPullReport, ClientError> {
    let started = Instant::now();
    let before = registry.traffic.snapshot();
    let image = RemoteImage::fetch(&registry)?;
    let chunks = distinct_chunks(&image.index);
    let missing = missing_in(store, &chunks)?;
    let bytes_fetched: u64 = missing.iter().map(|c| u64::from(c.len)).sum();
    progress.start(missing.len() as u64, bytes_fetched);
    let spool = store.root().join("tmp");
    let source = RegistrySource::new(registry.clone(), &image, RangePlan::default(), spool);
    store_chunks(store, &missing, progress, &mut |ids, each| {
        let mut failed = None;
        source
            .fetch(ids, &mut |id, data| {
                if failed.is_none() {
                    failed = each(id, data).err();
                }
            })
            .map_err(|e| ClientError::Source(e.to_string()))?;
        failed.map_or(Ok(()), Err)
    })?;
    store.put_index(&image.index_bytes)?;
    let mut manifest: ImageManifest = image.manifest.clone();
    manifest.name = target.name.clone();
    manifest.tag = target.tag.clone();
    store.put_manifest(&manifest)?;
    let after = registry.traffic.snapshot();
    Ok(RegistryPullReport {
        image: target.to_string(),
        source: registry.reference().to_string(),
        chunks: chunks.len() as u64,
        chunks_fetched: missing.len() as u64,
        bytes_fetched,
        wire_bytes: after.bytes - before.bytes,
        requests: after.requests - before.requests,
        elapsed: started.elapsed(),
    })
}

/// Stores a startup profile with the image at `registry`'s tag, and lays
/// the profile's chunks out for it: they are framed anew, in the profile's
/// order, into one more pack blob, and the chunk table points them there,
/// so a start fetches them with a few contiguous ranged reads instead of a
/// frame for each. Uploaded: that blob, the new chunk table and skiff
/// manifest; then the OCI manifest is pushed again to the tag. Refused if
/// the tag now names an image with another index than `index`. `chunks`
/// gives the profile's chunks (the host's cache, after the recording).
pub fn put_profile(
    registry: &Registry,
    index: &skiff_format::IndexDigest,
    profile: StartupProfile,
    chunks: &dyn ChunkSource,
) -> Result<Sha256Digest, ClientError> {
    if registry.reference().is_digest() {
        return Err(ClientError::Protocol {
            url: registry.reference().to_string(),
            message: "a profile is stored under a tag; this image is named by digest".into(),
        });
    }
    let tag = registry.reference().reference.clone();
    let RemoteImage {
        mut oci,
        index: image_index,
        mut table,
        ..
    } = RemoteImage::fetch(registry)?;
    let bytes = registry.blob(&oci.layers[0].digest, MAX_SKIFF_MANIFEST_BYTES)?;
    let mut manifest = ImageManifest::from_json(&bytes)?;
    if manifest.index.digest != *index {
        return Err(ClientError::Protocol {
            url: registry.reference().to_string(),
            message: format!(
                "the tag now names another image (index {}); the profile is not stored",
                manifest.index.digest
            ),
        });
    }
    let order = profile.chunk_order(&image_index)?;
    let blob = oci.packs().len() as u32;
    let mut builder = FrameBuilder::new(
        skiff_chunk::DEFAULT_FRAME_SIZE,
        skiff_chunk::DEFAULT_ZSTD_LEVEL,
    )?;
    let mut frames = Vec::new();
    let mut failed = None;
    chunks
        .fetch(&order, &mut |id, data| {
            if failed.is_none() {
                match builder.push(id, &data) {
                    Ok(Some(frame)) => frames.push(frame),
                    Ok(None) => {}
                    Err(e) => failed = Some(e),
                }
            }
        })
        .map_err(|e| ClientError::Source(e.to_string()))?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    frames.extend(builder.finish()?);
    let mut blob_bytes = Vec::new();
    for frame in frames {
        let at = table.frames.len() as u32;
        table.frames.push(TableFrame {
            blob,
            offset: blob_bytes.len() as u64,
            len: frame.compressed.len() as u32,
            raw_len: frame.uncompressed_len,
        });
        for entry in &frame.entries {
            if let Ok(i) = table.chunks.binary_search_by(|c| c.id.cmp(&entry.id)) {
                table.chunks[i] = TableChunk {
                    id: entry.id,
                    frame: at,
                    offset: entry.offset,
                    len: entry.len,
                };
            }
        }
        blob_bytes.extend_from_slice(&frame.compressed);
    }
    table.validate(oci.packs().len() + 1)?;
    manifest.profile = Some(profile);
    let json = manifest.to_json();
    let uploads = [
        (PACK_LAYER_TYPE, blob_bytes),
        (CHUNK_TABLE_LAYER_TYPE, zstd_compress(&table.encode())),
        (MANIFEST_LAYER_TYPE, json),
    ];
    let mut descriptors = Vec::new();
    for (media_type, bytes) in uploads {
        let descriptor = Descriptor::of(media_type, &bytes);
        if registry
            .blob_size(&descriptor.digest, &Access::Push)?
            .is_none()
        {
            registry.upload_blob(&descriptor.digest, &bytes, None)?;
        }
        descriptors.push(descriptor);
    }
    let [profile_blob, table_layer, manifest_layer] =
        <[Descriptor; 3]>::try_from(descriptors).expect("three blobs");
    oci.layers[0] = manifest_layer;
    oci.layers[2] = table_layer;
    oci.layers.push(profile_blob);
    Ok(registry.put_manifest(&tag, OCI_MANIFEST_TYPE, &oci.to_json())?)
}
