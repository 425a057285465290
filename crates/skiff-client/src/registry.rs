//! `push` and `pull` between a local store and an OCI registry.
//!
//! A push frames the image's chunks anew, in a deterministic order (layer
//! by layer, each in the layer's own path order), and cuts frames and blobs
//! where the chunks' own ids say ([`frame_cut`], [`blob_cut`]), within size
//! bounds, and at each layer and large directory ([`push_order`]). So
//! blobs are a function of the image's content alone: a second
//! image sharing a run of chunks (a base layer) makes the same blobs for it,
//! in any store, which the registry has (HEAD) or another repository of it
//! holds (cross-mounted); only blobs with new chunks are uploaded. And a
//! push never publishes a byte the image does not hold (another image's
//! chunks, a file a later layer deleted), as copying the store's frames
//! would. Blobs go first, the manifest last, so a killed push run again
//! sends only what had not arrived.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;
use skiff_chunk::{Frame, FrameBuilder, RawFrame};
use skiff_format::artifact::{
    ChunkTable, TableChunk, TableFrame, ARTIFACT_TYPE, CHUNK_TABLE_LAYER_TYPE,
    INDEX_DIGEST_ANNOTATION, INDEX_LAYER_TYPE, MANIFEST_LAYER_TYPE, OCI_CONFIG_TYPE,
    OCI_MANIFEST_TYPE, PACK_LAYER_TYPE,
};
use skiff_format::ChunkRef;
use skiff_format::{ChunkId, ImageIndex, ImageManifest, ImageRef, StartupProfile};
use skiff_oci::PathOrder;
use skiff_registry::launcher::{tag_content, IndexEntry, LAUNCHER_LAYER_TYPE, OCI_INDEX_TYPE};
use skiff_registry::referrers::{chain_ids, referrers_tag, CHAIN_ID_ANNOTATION};
use skiff_registry::{
    sha256_digest, Access, Descriptor, MountOutcome, OciManifest, RangePlan, Registry,
    RegistrySource, RemoteImage, Sha256Digest,
};
use skiff_source::ChunkSource;
use skiff_store::Store;

use crate::transfer::{missing_in, seconds, store_chunks, TransferProgress};
use crate::ClientError;

/// Index and chunk table blobs are compressed hard: they are read before a
/// mount is ready.
const METADATA_ZSTD_LEVEL: i32 = 9;
/// Frames a push makes are compressed harder than a store's (level 6 for
/// a store created since 2026-12-08, 3 before): a registry's bytes are
/// stored once and fetched by every host, and zstd decompresses level 9 as
/// fast. Fixed, not the store's level, so the same image makes the same
/// blobs in every store (with the same zstd library). On the dataset
/// (`git`, `python`, `perl`) level 9 stores 6% fewer bytes than level 3,
/// and with a blob's frames compressed side by side pushes as fast as
/// level 3 did one frame at a time (6.3 s for the three on two cores);
/// level 19 saves another 8% at a tenth of the speed. (Blobs pushed at
/// level 3, by skiff before 2026-12, are not those a push makes now: a
/// push sends them anew.)
const PUSH_ZSTD_LEVEL: i32 = 9;
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

impl RegistryPushReport {
    fn new(image: &ImageRef, registry: &Registry) -> RegistryPushReport {
        RegistryPushReport {
            image: image.to_string(),
            destination: registry.reference().to_string(),
            digest: String::new(),
            blobs: 0,
            blobs_uploaded: 0,
            blobs_mounted: 0,
            blobs_present: 0,
            bytes_uploaded: 0,
            elapsed: Duration::ZERO,
        }
    }
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

/// A push closes a frame after a chunk whose id has these low bits clear
/// (about every 16 chunks: ~1 MiB), once it holds [`MIN_FRAME_RAW`]; at
/// [`MAX_FRAME_RAW`] it closes anyway. Content decides, so a shared run of
/// chunks gets the same frames in every image.
fn frame_cut(id: &ChunkId, raw: u64) -> bool {
    raw >= MIN_FRAME_RAW && id.as_bytes()[0] & 0x0f == 0
}

/// A blob closes after a frame whose last chunk's id says so (about every 4
/// frames), once it holds [`MIN_BLOB_RAW`], and at [`MAX_BLOB_RAW`] anyway
/// (and where [`push_order`] starts one): ~8 MiB of chunks, ~3 MB
/// compressed, so an image has few (a 1 GB one: about 130) and a walk few
/// requests, as a read never spans two blobs. A shared layer or large
/// directory needs no smaller blobs to be shared: it starts and ends blobs
/// of its own. A shared run inside a directory (libraries of one package in
/// `usr/lib/x86_64-linux-gnu`) shares all but a blob or two at its ends.
fn blob_cut(last: &ChunkId, raw: u64) -> bool {
    raw >= MAX_BLOB_RAW || (raw >= MIN_BLOB_RAW && last.as_bytes()[1] & 0x03 == 0)
}

const MIN_FRAME_RAW: u64 = 256 << 10;
/// A profile's chunks go into blobs of about this many compressed bytes.
const PROFILE_BLOB_BYTES: u64 = 64 << 20;
const MAX_FRAME_RAW: usize = 2 << 20;
const MIN_BLOB_RAW: u64 = 4 << 20;
const MAX_BLOB_RAW: u64 = 12 << 20;

/// A directory whose files bring at least this many bytes of chunks (first
/// seen there in the layer's path order) begins and ends blobs of its own.
/// Its tree is mostly one package's (`usr/share/perl/5.36`), which another
/// image may install among other files (`git` pulls in perl): with content
/// alone cutting, blobs realign only some way into the shared tree, and the
/// blob straddling each end is lost to sharing. On the dataset the pack
/// blobs went from 89.6 MB to 87.0 MB (with layer starts, below); 1 to 16
/// MiB stored the same, 32 MiB lost it (blobs: more the smaller).
const OWN_BLOBS_DIR_RAW: u64 = 8 << 20;

/// The image's chunks in the order a push frames them: layer by layer
/// (the records of the layers it was converted from), each layer's in the
/// layer's own path order, then any the records do not name; in the
/// index's order alone when a record is missing (an image pulled into the
/// store), and for a layer whose record this skiff cannot read.
///
/// A layer's own path order depends on that layer alone, so a layer two
/// images share is framed alike in both and makes the same blobs. The
/// image's path order restricted to a layer does not: a chunk of the base
/// that a file of an upper layer also holds (a license text, a run of
/// zeros) moves to that file's place, differently in every image, and
/// breaks a frame and a blob there. On the dataset (`git`, `python`,
/// `perl` on one base) the registry holds 7% fewer bytes than in the
/// image's order: the blobs all three share went from 32.6 MB to 40.5 MB.
/// Both are path orders, so a walk's windows map to as few requests.
///
/// Each layer starts a blob, so a base's last blob holds the base alone,
/// as in every image on it; so does each bound of a large directory
/// ([`OWN_BLOBS_DIR_RAW`]). Both come from the record's entries when the
/// push runs, so every store that converted the layer agrees.
fn push_order(
    store: &Store,
    manifest: &ImageManifest,
    chunks: &[ChunkRef],
) -> Result<Vec<Placed>, ClientError> {
    let mut layers = Vec::new();
    for diff_id in &manifest.source.diff_ids {
        let Some(record) = store.layer_record(diff_id)? else {
            // All or none: the order must not depend on which records a store happens to hold.
            return Ok(place(&[], chunks));
        };
        let order = skiff_oci::layer_path_order(&record, OWN_BLOBS_DIR_RAW).unwrap_or_else(|| {
            let ids: HashSet<&ChunkId> = record.chunks.iter().collect();
            PathOrder {
                chunks: chunks
                    .iter()
                    .map(|c| c.id)
                    .filter(|id| ids.contains(id))
                    .collect(),
                dir_bounds: Vec::new(),
            }
        });
        layers.push(order);
    }
    Ok(place(&layers, chunks))
}

/// The image's `chunks` in the layers' orders, each where it first
/// appears, then those no layer names (in their order). A blob starts at
/// each layer and each bound of a large directory; where the chunk there is
/// placed already or not in the image (a file a later layer replaced),
/// at the next chunk placed.
fn place(layers: &[PathOrder], chunks: &[ChunkRef]) -> Vec<Placed> {
    let by_id: HashMap<ChunkId, ChunkRef> = chunks.iter().map(|c| (c.id, *c)).collect();
    let mut order = Vec::with_capacity(chunks.len());
    let mut placed = HashSet::new();
    for layer in layers {
        let mut bounds = layer.dir_bounds.iter().map(|&at| at as usize).peekable();
        let mut start_pending = true;
        for (at, id) in layer.chunks.iter().enumerate() {
            while bounds.next_if(|&bound| bound <= at).is_some() {
                start_pending = true;
            }
            let Some(chunk) = by_id.get(id) else {
                continue;
            };
            if placed.insert(chunk.id) {
                order.push(Placed {
                    chunk: *chunk,
                    starts_blob: std::mem::take(&mut start_pending),
                });
            }
        }
    }
    let rest = chunks.iter().filter(|c| placed.insert(c.id));
    order.extend(rest.map(|&chunk| Placed {
        chunk,
        starts_blob: false,
    }));
    order
}

/// A chunk in a push's order.
#[derive(Clone, Copy, Debug)]
struct Placed {
    chunk: ChunkRef,
    /// Whether the chunk begins a new blob (and frame) whatever the content says.
    starts_blob: bool,
}

/// Frames and blobs as a push makes them, and the chunk table over them.
struct BlobWriter<'a> {
    registry: &'a Registry,
    log: &'a mut BlobLog,
    report: &'a mut RegistryPushReport,
    builder: FrameBuilder,
    /// The current blob's frames, compressed side by side when it closes
    /// (cuts depend on the chunks alone, not on compressed sizes).
    frames: Vec<RawFrame>,
    packs: Vec<Descriptor>,
    table: ChunkTable,
}

impl BlobWriter<'_> {
    fn push(&mut self, placed: &Placed, data: &[u8]) -> Result<(), ClientError> {
        let chunk = &placed.chunk;
        if placed.starts_blob {
            self.close_frame();
            self.close_blob()?;
        }
        let full = self.builder.add(chunk.id, data);
        if full || frame_cut(&chunk.id, self.builder.len() as u64) {
            self.close_frame();
            let blob_raw = self.frames.iter().map(|f| f.len() as u64).sum();
            if blob_cut(&chunk.id, blob_raw) {
                self.close_blob()?;
            }
        }
        Ok(())
    }

    fn close_frame(&mut self) {
        self.frames.extend(self.builder.take_raw());
    }

    fn add_frame(&mut self, blob: &mut Vec<u8>, frame: Frame) {
        let at = self.table.frames.len() as u32;
        self.table.frames.push(TableFrame {
            blob: self.packs.len() as u32,
            offset: blob.len() as u64,
            len: frame.compressed.len() as u32,
            raw_len: frame.uncompressed_len,
        });
        self.table
            .chunks
            .extend(frame.entries.iter().map(|e| TableChunk {
                id: e.id,
                frame: at,
                offset: e.offset,
                len: e.len,
            }));
        blob.extend_from_slice(&frame.compressed);
    }

    fn close_blob(&mut self) -> Result<(), ClientError> {
        if self.frames.is_empty() {
            return Ok(());
        }
        let frames = std::mem::take(&mut self.frames)
            .into_par_iter()
            .map(RawFrame::compress)
            .collect::<Result<Vec<Frame>, _>>()?;
        let mut blob = Vec::with_capacity(frames.iter().map(|f| f.compressed.len()).sum());
        for frame in frames {
            self.add_frame(&mut blob, frame);
        }
        let descriptor = publish(self.registry, self.log, self.report, PACK_LAYER_TYPE, &blob)?;
        self.packs.push(descriptor);
        Ok(())
    }

    /// Closes the last frame and blob; the pack descriptors and the chunk table.
    fn finish(mut self) -> Result<(Vec<Descriptor>, ChunkTable), ClientError> {
        self.close_frame();
        self.close_blob()?;
        self.table.chunks.sort_by_key(|c| c.id);
        self.table.validate(self.packs.len())?;
        Ok((self.packs, self.table))
    }
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

/// Makes sure the repository has `bytes` as a blob: HEAD, else a
/// cross-mount from a repository this store pushed it to, else an upload.
fn ensure_blob(
    registry: &Registry,
    log: &BlobLog,
    descriptor: &Descriptor,
    bytes: &[u8],
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
    registry.upload_blob(&descriptor.digest, bytes, session)?;
    Ok(Sent::Uploaded(bytes.len() as u64))
}

/// Makes sure the repository has `bytes` as a blob of `media_type`,
/// noting what it took in `report` and where the blob now is in `log`.
fn publish(
    registry: &Registry,
    log: &mut BlobLog,
    report: &mut RegistryPushReport,
    media_type: &str,
    bytes: &[u8],
) -> Result<Descriptor, ClientError> {
    let descriptor = Descriptor::of(media_type, bytes);
    let sent = ensure_blob(registry, log, &descriptor, bytes)?;
    log.add(registry.host(), &descriptor.digest, registry.repository());
    report.blobs += 1;
    match sent {
        Sent::Present => report.blobs_present += 1,
        Sent::Mounted => report.blobs_mounted += 1,
        Sent::Uploaded(n) => {
            report.blobs_uploaded += 1;
            report.bytes_uploaded += n;
        }
    }
    Ok(descriptor)
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
    let tag = &registry.reference().reference;
    if registry.reference().is_digest() {
        return Err(ClientError::Protocol {
            url: registry.reference().to_string(),
            message: "push to a tag, not a digest".into(),
        });
    }
    let log_path = BlobLog::path(store);
    let mut log = BlobLog::load(&log_path);
    let mut report = RegistryPushReport::new(image, registry);
    let (oci, manifest) = push_artifact(store, image, registry, &mut log, &mut report, progress)?;
    let digest = publish_tag(registry, tag, &oci, &manifest, &mut |media_type, bytes| {
        publish(registry, &mut log, &mut report, media_type, bytes)
    })?;
    log.save(&log_path);
    report.digest = digest.to_string();
    report.elapsed = started.elapsed();
    Ok(report)
}

/// What `attach_to_registry` did: a push of each layer prefix.
#[derive(Clone, Debug, Serialize)]
pub struct RegistryAttachReport {
    /// The image the artifacts are attached to.
    pub subject: String,
    pub artifacts: Vec<RegistryPushReport>,
    /// Whether the registry lists them through its referrers API; if not,
    /// the index at the fallback tag `sha256-HEX` does.
    pub referrers_api: bool,
    #[serde(serialize_with = "seconds")]
    pub elapsed: Duration,
}

/// Publishes the images `prefixes` from `store` (the merged trees of the
/// first 1, 2, … layers of the image `subject` in `registry`'s
/// repository, bottom first) as skiff artifacts attached to it, each
/// annotated with its chain id (skiff_registry::referrers). Nothing is
/// tagged but, on a registry without the referrers API, the fallback tag,
/// where entries of skiff artifacts for the same chain ids are replaced
/// and all others kept.
pub fn attach_to_registry(
    store: &Store,
    prefixes: &[ImageRef],
    registry: &Registry,
    subject: &Descriptor,
    progress: &dyn TransferProgress,
) -> Result<RegistryAttachReport, ClientError> {
    let started = Instant::now();
    let log_path = BlobLog::path(store);
    let mut log = BlobLog::load(&log_path);
    let mut reports = Vec::new();
    let mut entries = Vec::new();
    let mut referrers_api = true;
    for image in prefixes {
        let mut report = RegistryPushReport::new(image, registry);
        let (mut oci, manifest) =
            push_artifact(store, image, registry, &mut log, &mut report, progress)?;
        let chain =
            chain_ids(&manifest.source.diff_ids)
                .pop()
                .ok_or_else(|| ClientError::Protocol {
                    url: registry.reference().to_string(),
                    message: format!("{image} has no layers to attach"),
                })?;
        oci.subject = Some(subject.clone());
        oci.annotations
            .insert(CHAIN_ID_ANNOTATION.to_owned(), chain.clone());
        let json = oci.to_json();
        referrers_api &= registry.put_referrer(OCI_MANIFEST_TYPE, &json)?;
        let descriptor = Descriptor::of(OCI_MANIFEST_TYPE, &json);
        report.digest = descriptor.digest.to_string();
        report.elapsed = started.elapsed();
        entries.push(IndexEntry {
            media_type: descriptor.media_type,
            digest: descriptor.digest,
            size: descriptor.size,
            artifact_type: oci.artifact_type.clone(),
            platform: None,
            annotations: oci.annotations.clone(),
        });
        reports.push(report);
    }
    log.save(&log_path);
    if !referrers_api {
        update_referrers_tag(registry, &subject.digest, entries)?;
    }
    Ok(RegistryAttachReport {
        subject: registry
            .reference()
            .with_reference(&subject.digest.to_string())
            .to_string(),
        artifacts: reports,
        referrers_api,
        elapsed: started.elapsed(),
    })
}

/// Times an attach puts the fallback tag again when another writer's index
/// replaced its own meanwhile.
const REFERRERS_TAG_ATTEMPTS: usize = 3;

/// Adds `entries` to the index at `subject`'s fallback tag, in place of
/// skiff entries for the same chain ids (an attach made again). Everything
/// else in it (other tools' entries, fields skiff does not know) is kept
/// as it is; the index is read back, and put again if a concurrent writer's
/// replaced it.
fn update_referrers_tag(
    registry: &Registry,
    subject: &Sha256Digest,
    entries: Vec<IndexEntry>,
) -> Result<(), ClientError> {
    let tag = referrers_tag(subject);
    let url = registry.reference().with_reference(&tag).to_string();
    let malformed = |message: String| ClientError::Protocol {
        url: url.clone(),
        message,
    };
    let chains: HashSet<&str> = entries
        .iter()
        .filter_map(|e| e.annotations.get(CHAIN_ID_ANNOTATION).map(String::as_str))
        .collect();
    let ours: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| serde_json::to_value(e).expect("an index entry serialises"))
        .collect();
    let listed = |index: &serde_json::Value| -> bool {
        let manifests = index["manifests"].as_array();
        entries.iter().all(|e| {
            manifests.is_some_and(|m| m.iter().any(|d| d["digest"] == e.digest.to_string()))
        })
    };
    for _ in 0..REFERRERS_TAG_ATTEMPTS {
        let mut index = match registry.manifest(&tag, &[OCI_INDEX_TYPE])? {
            Some((bytes, _, _)) => serde_json::from_slice::<serde_json::Value>(&bytes)
                .map_err(|e| malformed(format!("the referrers index there does not parse: {e}")))?,
            None => serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX_TYPE,
                "manifests": [],
            }),
        };
        let manifests = index
            .get_mut("manifests")
            .and_then(serde_json::Value::as_array_mut)
            .ok_or_else(|| malformed("the referrers index there lists no manifests".into()))?;
        // Skiff's entries for the chain ids put again go; all else stays.
        manifests.retain(|d| {
            let replaced = d["artifactType"] == ARTIFACT_TYPE
                && d["annotations"][CHAIN_ID_ANNOTATION]
                    .as_str()
                    .is_some_and(|chain| chains.contains(chain));
            !replaced
        });
        manifests.extend(ours.iter().cloned());
        let json = serde_json::to_vec(&index).expect("JSON serialises");
        registry.put_manifest(&tag, OCI_INDEX_TYPE, &json)?;
        match registry.manifest(&tag, &[OCI_INDEX_TYPE])? {
            Some((bytes, _, _))
                if serde_json::from_slice::<serde_json::Value>(&bytes)
                    .is_ok_and(|now| listed(&now)) =>
            {
                return Ok(());
            }
            _ => tracing::warn!("{url} changed under this attach; putting it again"),
        }
    }
    Err(malformed(format!(
        "another writer kept replacing it ({REFERRERS_TAG_ATTEMPTS} attempts)"
    )))
}

/// Uploads the blobs of `image`'s skiff artifact (pack blobs, config,
/// skiff manifest, index, chunk table); returns the artifact's manifest,
/// not yet put, and the image's skiff manifest.
fn push_artifact(
    store: &Store,
    image: &ImageRef,
    registry: &Registry,
    log: &mut BlobLog,
    report: &mut RegistryPushReport,
    progress: &dyn TransferProgress,
) -> Result<(OciManifest, ImageManifest), ClientError> {
    let manifest = store.image(image)?;
    let encoded = store.index_bytes(&manifest.index.digest)?;
    let index = ImageIndex::decode(&encoded)?;
    let distinct = index.distinct_chunks();
    let order = push_order(store, &manifest, &distinct)?;
    let total: u64 = order.iter().map(|p| u64::from(p.chunk.len)).sum();
    progress.start(order.len() as u64, total);
    let mut writer = BlobWriter {
        registry,
        log: &mut *log,
        report: &mut *report,
        builder: FrameBuilder::new(MAX_FRAME_RAW, PUSH_ZSTD_LEVEL)?,
        frames: Vec::new(),
        packs: Vec::new(),
        table: ChunkTable::default(),
    };
    for placed in &order {
        writer.push(placed, &store.read_chunk(&placed.chunk.id)?)?;
        progress.advance(u64::from(placed.chunk.len));
    }
    let (packs, table) = writer.finish()?;
    let config_bytes = manifest.config.get().as_bytes().to_vec();
    let small = [
        (OCI_CONFIG_TYPE, config_bytes),
        (MANIFEST_LAYER_TYPE, manifest.to_json()),
        (INDEX_LAYER_TYPE, zstd_compress(&encoded)),
        (
            CHUNK_TABLE_LAYER_TYPE,
            zstd_compress(&table.encode(&distinct)?),
        ),
    ];
    let mut descriptors = Vec::new();
    for (media_type, bytes) in small {
        descriptors.push(publish(registry, log, report, media_type, &bytes)?);
    }
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
    Ok((oci, manifest))
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
    let chunks = image.index.distinct_chunks();
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
                    failed = each(id, &data).err();
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
    // What the tag names now, to check again just before it is replaced:
    // a registry has no compare-and-swap, but a push meanwhile is noticed.
    let tag_digest = || -> Result<Option<Sha256Digest>, ClientError> {
        Ok(registry
            .manifest(&tag, &[OCI_INDEX_TYPE, OCI_MANIFEST_TYPE])?
            .map(|(_, _, digest)| digest))
    };
    let read_at = tag_digest()?;
    let RemoteImage {
        mut oci,
        index: image_index,
        mut table,
        stored_manifest: mut manifest,
        ..
    } = RemoteImage::fetch(registry)?;
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
    let mut builder = FrameBuilder::new(skiff_chunk::DEFAULT_FRAME_SIZE, PUSH_ZSTD_LEVEL)?;
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
    // One or more blobs after the image's packs, each well under what a reader accepts.
    let mut blobs: Vec<Vec<u8>> = Vec::new();
    for frame in frames {
        if blobs
            .last()
            .is_none_or(|b| b.len() as u64 >= PROFILE_BLOB_BYTES)
        {
            blobs.push(Vec::new());
        }
        let blob = (oci.packs().len() + blobs.len() - 1) as u32;
        let blob_bytes = blobs.last_mut().expect("a blob was just added");
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
    table.validate(oci.packs().len() + blobs.len())?;
    manifest.profile = Some(profile);
    let upload = |media_type: &str, bytes: &[u8]| -> Result<Descriptor, ClientError> {
        let descriptor = Descriptor::of(media_type, bytes);
        if registry
            .blob_size(&descriptor.digest, &Access::Push)?
            .is_none()
        {
            registry.upload_blob(&descriptor.digest, bytes, None)?;
        }
        Ok(descriptor)
    };
    for blob in &blobs {
        let descriptor = upload(PACK_LAYER_TYPE, blob)?;
        oci.layers.push(descriptor);
    }
    oci.layers[2] = upload(
        CHUNK_TABLE_LAYER_TYPE,
        &zstd_compress(&table.encode(&image_index.distinct_chunks())?),
    )?;
    oci.layers[0] = upload(MANIFEST_LAYER_TYPE, &manifest.to_json())?;
    if tag_digest()? != read_at {
        return Err(ClientError::Protocol {
            url: registry.reference().to_string(),
            message: "the tag was pushed to while the profile was being stored; it is not stored"
                .into(),
        });
    }
    publish_tag(registry, &tag, &oci, &manifest, &mut |media_type, bytes| {
        upload(media_type, bytes)
    })
}

/// Uploads a blob (if the repository lacks it) and describes it.
type Upload<'a> = dyn FnMut(&str, &[u8]) -> Result<Descriptor, ClientError> + 'a;

/// Puts the skiff image `artifact` (whose skiff manifest is `manifest`) at
/// `tag` as skiff_registry::launcher says: the launcher's blobs through
/// `upload`, the artifact and the launcher by digest, then the index at
/// the tag, so a reader never finds a tag whose parts are missing.
/// Returns the index's digest.
fn publish_tag(
    registry: &Registry,
    tag: &str,
    artifact: &OciManifest,
    manifest: &ImageManifest,
    upload: &mut Upload,
) -> Result<Sha256Digest, ClientError> {
    let content = tag_content(
        artifact,
        manifest.config.get().as_bytes(),
        &manifest.index.digest,
    )?;
    upload(LAUNCHER_LAYER_TYPE, &content.launcher_layer)?;
    upload(OCI_CONFIG_TYPE, &content.launcher_config)?;
    for json in [&content.artifact_json, &content.launcher_json] {
        registry.put_manifest(&sha256_digest(json).to_string(), OCI_MANIFEST_TYPE, json)?;
    }
    Ok(registry.put_manifest(tag, OCI_INDEX_TYPE, &content.index.to_json())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: u8) -> ChunkRef {
        ChunkRef {
            id: ChunkId::of(&[i]),
            len: 1,
        }
    }

    fn layer(ids: &[u8], dir_bounds: &[u32]) -> PathOrder {
        PathOrder {
            chunks: ids.iter().map(|&i| chunk(i).id).collect(),
            dir_bounds: dir_bounds.to_vec(),
        }
    }

    /// (chunk, starts a blob) as bytes for short asserts.
    fn placed(order: &[Placed]) -> Vec<(u8, bool)> {
        let index: HashMap<ChunkId, u8> = (0..=255).map(|i| (chunk(i).id, i)).collect();
        order
            .iter()
            .map(|p| (index[&p.chunk.id], p.starts_blob))
            .collect()
    }

    #[test]
    fn each_layer_and_large_directory_starts_a_blob_at_its_first_chunk_placed() {
        // The image lacks chunk 3 (a later layer replaced its file) and 9.
        let image: Vec<ChunkRef> = [0, 1, 2, 4, 5, 6, 7, 8].map(chunk).to_vec();
        let layers = [
            layer(&[0, 1, 2], &[1]),
            // Begins with a chunk of the image's files that was replaced,
            // then one the base placed; a bound falls on chunk 9, absent too.
            layer(&[3, 1, 4, 5, 9, 6], &[4]),
            // Every chunk placed already: it adds nothing.
            layer(&[0, 4], &[]),
            layer(&[7], &[]),
        ];
        assert_eq!(
            placed(&place(&layers, &image)),
            vec![
                (0, true),
                (1, true),
                (2, false),
                (4, true),
                (5, false),
                (6, true),
                (7, true),
                // Named by no layer: after the last, without a start.
                (8, false),
            ]
        );
        // Without records: the index's order, no starts.
        assert!(place(&[], &image).iter().all(|p| !p.starts_blob));
    }
}
