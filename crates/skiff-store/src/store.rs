use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch,
    WriteOptions, DB,
};
use serde::Serialize;
use skiff_chunk::{decompress_frame, verify_chunk};
use skiff_format::{ChunkId, ImageIndex, ImageManifest, ImageRef, IndexDigest};

use crate::error::IoContext;
use crate::layout::*;
use crate::{PackWriter, StoreError};

/// Decompressed frames kept for readers that walk a file chunk by chunk.
const FRAME_CACHE_FRAMES: usize = 32;

/// A local skiff store. Open it with [`Store::open`] to write (one process at
/// a time) or [`Store::open_read_only`] to read beside a writer.
pub struct Store {
    root: PathBuf,
    config: StoreConfig,
    pub(crate) db: DB,
    read_only: bool,
    /// Held for the store's lifetime: the writer lock in write mode, a shared
    /// readers lock in read-only mode. Dropping it releases the flock.
    _lock: Option<File>,
    packs: Mutex<HashMap<u32, Arc<File>>>,
    frames: Mutex<FrameCache>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.root)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct FrameCache {
    frames: HashMap<(u32, u64), Arc<Vec<u8>>>,
    order: VecDeque<(u32, u64)>,
}

/// Sizes and ratios of what a store holds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StoreStats {
    pub images: u64,
    /// Sum over images of their regular files' sizes.
    pub logical_bytes: u64,
    pub chunks: u64,
    /// Unique chunk bytes before compression.
    pub chunk_bytes: u64,
    /// Compressed bytes of the frames that hold live chunks.
    pub frame_bytes: u64,
    /// Size of all pack files on disk (includes bytes gc can reclaim).
    pub pack_bytes: u64,
    /// logical_bytes / chunk_bytes.
    pub dedup_ratio: f64,
    /// chunk_bytes / frame_bytes.
    pub compression_ratio: f64,
}

/// What `fsck` checked and what it found wrong.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FsckReport {
    pub images: u64,
    pub chunks: u64,
    pub frames: u64,
    pub problems: Vec<String>,
}

impl Store {
    /// Opens the store at `root` for writing, creating it with `config` if it does
    /// not exist. Fails with [`StoreError::Busy`] if another process writes to it.
    pub fn open_or_create(root: &Path, config: &StoreConfig) -> Result<Store, StoreError> {
        Self::open_or_create_new(root, config).map(|(store, _)| store)
    }

    /// As [`Store::open_or_create`], and whether this call created the
    /// store: then this process has held it for writing since the moment it
    /// existed, and [`Store::remove_if_unused`] may take it away again.
    pub fn open_or_create_new(
        root: &Path,
        config: &StoreConfig,
    ) -> Result<(Store, bool), StoreError> {
        if root.join(CONFIG_FILE).exists() {
            return Ok((Self::open(root)?, false));
        }
        let lock = Self::create(root, config)?;
        let created = lock.is_some();
        let store = match lock {
            Some(lock) => Self::open_locked(root, lock)?,
            None => Self::open(root)?,
        };
        Ok((store, created))
    }

    /// Creates the database with all its column families, then writes the
    /// config file last: a store exists once its config does, so a crash
    /// part-way leaves nothing a reader would take for a store. Returns the
    /// writer's lock, still held, if this call created it; `None` if another
    /// process had finished creating it first.
    fn create(root: &Path, config: &StoreConfig) -> Result<Option<File>, StoreError> {
        config.chunking.validate()?;
        fs::create_dir_all(root.join(PACKS_DIR))
            .context(|| format!("creating store {}", root.display()))?;
        let lock = lock_store(root)?;
        if root.join(CONFIG_FILE).exists() {
            return Ok(None); // another process created it before we took the lock
        }
        let db_dir = root.join(DB_DIR);
        if db_dir.exists() {
            fs::remove_dir_all(&db_dir)
                .context(|| format!("removing the half-created {}", db_dir.display()))?;
        }
        drop(DB::open_cf_descriptors(
            &db_options(true),
            &db_dir,
            column_families(),
        )?);
        let json = serde_json::to_vec_pretty(config).expect("config serialises");
        let tmp = root.join(format!("{CONFIG_FILE}.tmp"));
        fs::write(&tmp, json).context(|| format!("writing {}", tmp.display()))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, root.join(CONFIG_FILE))
            .context(|| format!("creating {}", root.display()))?;
        Ok(Some(lock))
    }

    /// Opens an existing store for writing.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let lock = lock_store(root)?;
        Self::open_locked(root, lock)
    }

    fn open_locked(root: &Path, lock: File) -> Result<Store, StoreError> {
        let config = read_config(root)?;
        let db = DB::open_cf_descriptors(&db_options(true), root.join(DB_DIR), column_families())?;
        let store = Store::assemble(root, config, db, false, Some(lock));
        store.recover_packs()?;
        Ok(store)
    }

    /// Removes a store this process created ([`Store::open_or_create_new`])
    /// if it still holds no image and no reader has it open; says whether
    /// it did. Anything else is left as it is.
    pub fn remove_if_unused(self) -> Result<bool, StoreError> {
        if !self.images()?.is_empty() {
            return Ok(false);
        }
        let Ok(readers) = readers_lock(&self.root, LockKind::Exclusive, "a reader has it open")
        else {
            return Ok(false);
        };
        // The database closes first; the writer's lock is let go only once
        // the directory is gone, so nobody opens what is being removed.
        let Store {
            root, db, _lock, ..
        } = self;
        drop(db);
        let removed = fs::remove_dir_all(&root).context(|| format!("removing {}", root.display()));
        drop((_lock, readers));
        removed.map(|()| true)
    }

    /// Opens an existing store for reading only; works while a writer holds it.
    pub fn open_read_only(root: &Path) -> Result<Store, StoreError> {
        let config = read_config(root)?;
        let readers_lock = match readers_lock(root, LockKind::Shared, "gc is compacting it") {
            Ok(lock) => Some(lock),
            // A store on read-only media: nothing can gc it under us either.
            Err(StoreError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::ReadOnlyFilesystem =>
            {
                None
            }
            Err(e) => return Err(e),
        };
        // A writer creates column families a newer skiff added; a reader cannot.
        let existing = DB::list_cf(&Options::default(), root.join(DB_DIR))?;
        if let Some(missing) = COLUMN_FAMILIES
            .iter()
            .find(|cf| !existing.iter().any(|e| e == *cf))
        {
            return Err(StoreError::BadStore {
                path: root.to_owned(),
                reason: format!(
                    "it predates the {missing:?} table; open it once for writing (any convert, rm or gc) to upgrade it"
                ),
            });
        }
        let db = DB::open_cf_descriptors_read_only(
            &db_options(false),
            root.join(DB_DIR),
            column_families(),
            false,
        )?;
        Ok(Store::assemble(root, config, db, true, readers_lock))
    }

    fn assemble(
        root: &Path,
        config: StoreConfig,
        db: DB,
        read_only: bool,
        lock: Option<File>,
    ) -> Store {
        Store {
            root: root.to_owned(),
            config,
            db,
            read_only,
            _lock: lock,
            packs: Mutex::new(HashMap::new()),
            frames: Mutex::new(FrameCache::default()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub(crate) fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    pub(crate) fn pack_path(&self, pack: u32) -> PathBuf {
        self.root.join(PACKS_DIR).join(pack_file_name(pack))
    }

    pub(crate) fn write_batch(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    /// Cuts packs back to their committed length and removes packs the
    /// database does not reference: what a crash mid-write leaves behind.
    fn recover_packs(&self) -> Result<(), StoreError> {
        let committed = self.committed_packs()?;
        let registered_but_never_created: Vec<u32> = committed
            .iter()
            .filter(|&(&pack, &len)| len == 0 && !self.pack_path(pack).exists())
            .map(|(&pack, _)| pack)
            .collect();
        if !registered_but_never_created.is_empty() {
            let mut batch = WriteBatch::default();
            for pack in registered_but_never_created {
                batch.delete_cf(self.cf(CF_META), pack_meta_key(pack));
            }
            self.write_batch(batch)?;
        }
        let dir = self.root.join(PACKS_DIR);
        let entries = fs::read_dir(&dir).context(|| format!("listing {}", dir.display()))?;
        for entry in entries {
            let entry = entry.context(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name();
            let Some(pack) = name.to_str().and_then(pack_of_file_name) else {
                continue;
            };
            let path = entry.path();
            match committed.get(&pack) {
                None => {
                    tracing::info!(pack, "removing pack left by an interrupted write");
                    fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
                }
                Some(&len) => {
                    let actual = entry
                        .metadata()
                        .context(|| format!("stat {}", path.display()))?
                        .len();
                    if actual > len {
                        tracing::info!(
                            pack,
                            actual,
                            len,
                            "truncating pack to its committed length"
                        );
                        let file = File::options()
                            .write(true)
                            .open(&path)
                            .context(|| format!("opening {}", path.display()))?;
                        file.set_len(len)
                            .and_then(|()| file.sync_all())
                            .context(|| format!("truncating {}", path.display()))?;
                    } else if actual < len {
                        return Err(StoreError::Corrupt(format!(
                            "pack {} is {actual} bytes, {len} were committed",
                            path.display()
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Every pack the database knows, with its committed length.
    pub(crate) fn committed_packs(&self) -> Result<BTreeMap<u32, u64>, StoreError> {
        let mut packs = BTreeMap::new();
        for item in self.db.iterator_cf(self.cf(CF_META), IteratorMode::Start) {
            let (key, value) = item?;
            if let Some(pack) = pack_of_meta_key(&key) {
                packs.insert(pack, decode_u64(&value, "pack length")?);
            }
        }
        Ok(packs)
    }

    /// The number the next new pack gets.
    pub(crate) fn next_pack_id(&self) -> Result<u32, StoreError> {
        match self.db.get_pinned_cf(self.cf(CF_META), META_NEXT_PACK)? {
            Some(bytes) => Ok(decode_u64(&bytes, "next pack id")? as u32),
            None => Ok(1),
        }
    }

    /// Starts writing frames into a new pack. Only one writer per store.
    pub fn pack_writer(&self) -> Result<PackWriter<'_>, StoreError> {
        if self.read_only {
            return Err(StoreError::BadStore {
                path: self.root.clone(),
                reason: "opened read-only".into(),
            });
        }
        Ok(PackWriter::new(self))
    }

    pub fn contains_chunk(&self, id: &ChunkId) -> Result<bool, StoreError> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_CHUNKS), id.as_bytes())?
            .is_some())
    }

    pub fn chunk_location(&self, id: &ChunkId) -> Result<Option<ChunkLocation>, StoreError> {
        match self.db.get_pinned_cf(self.cf(CF_CHUNKS), id.as_bytes())? {
            Some(bytes) => Ok(Some(ChunkLocation::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Reads and verifies one chunk.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, StoreError> {
        let loc = self
            .chunk_location(id)?
            .ok_or(StoreError::ChunkNotFound(*id))?;
        let frame = self.read_frame(&loc)?;
        let data = frame
            .get(loc.offset as usize..(loc.offset as usize + loc.len as usize))
            .ok_or_else(|| StoreError::Corrupt(format!("chunk {id} lies outside its frame")))?;
        verify_chunk(id, data)?;
        Ok(data.to_vec())
    }

    fn pack_file(&self, pack: u32) -> Result<Arc<File>, StoreError> {
        let mut packs = self.packs.lock().expect("pack handle cache poisoned");
        if let Some(file) = packs.get(&pack) {
            return Ok(file.clone());
        }
        let path = self.pack_path(pack);
        let file = Arc::new(File::open(&path).context(|| format!("opening {}", path.display()))?);
        packs.insert(pack, file.clone());
        Ok(file)
    }

    /// Forgets a cached handle (the pack was replaced by gc).
    pub(crate) fn forget_pack(&self, pack: u32) {
        self.packs
            .lock()
            .expect("pack handle cache poisoned")
            .remove(&pack);
        let mut cache = self.frames.lock().expect("frame cache poisoned");
        cache.frames.retain(|key, _| key.0 != pack);
        cache.order.retain(|key| key.0 != pack);
    }

    /// The compressed bytes of a frame, straight from its pack (not checked:
    /// whoever decompresses it checks the chunks in it against their ids).
    pub fn read_raw_frame(&self, loc: &ChunkLocation) -> Result<Vec<u8>, StoreError> {
        let file = self.pack_file(loc.pack)?;
        let mut compressed = vec![0u8; loc.frame_len as usize];
        file.read_exact_at(&mut compressed, loc.frame_offset)
            .context(|| format!("reading pack {} at {}", loc.pack, loc.frame_offset))?;
        Ok(compressed)
    }

    /// The uncompressed bytes of the frame holding `loc`, through a small cache.
    pub(crate) fn read_frame(&self, loc: &ChunkLocation) -> Result<Arc<Vec<u8>>, StoreError> {
        let key = loc.frame_key();
        if let Some(frame) = self
            .frames
            .lock()
            .expect("frame cache poisoned")
            .frames
            .get(&key)
        {
            return Ok(frame.clone());
        }
        let compressed = self.read_raw_frame(loc)?;
        let frame = Arc::new(decompress_frame(&compressed, loc.frame_raw_len as usize)?);
        let mut cache = self.frames.lock().expect("frame cache poisoned");
        if cache.frames.insert(key, frame.clone()).is_none() {
            cache.order.push_back(key);
            while cache.order.len() > FRAME_CACHE_FRAMES {
                if let Some(old) = cache.order.pop_front() {
                    cache.frames.remove(&old);
                }
            }
        }
        Ok(frame)
    }

    /// Records an image: its index and its manifest, in one atomic write.
    /// Every chunk the index references must already be in the store.
    ///
    /// `layers` are records of layers converted on the way (by diff_id),
    /// written in the same batch; their chunks must be stored too.
    pub fn put_image(
        &self,
        manifest: &ImageManifest,
        index: &ImageIndex,
        layers: &[(String, LayerRecord)],
    ) -> Result<(), StoreError> {
        let encoded = index.encode();
        check_descriptor(manifest, &encoded)?;
        let what = format!("image {}", manifest.image_ref());
        self.check_chunk_refs(&what, index)?;
        self.check_chunks_present(
            &what,
            layers.iter().flat_map(|(_, record)| record.chunks.iter()),
        )?;
        let mut batch = WriteBatch::default();
        for (diff_id, record) in layers {
            batch.put_cf(self.cf(CF_LAYERS), diff_id.as_bytes(), record.encode());
        }
        self.add_index_to_batch(&mut batch, &encoded)?;
        batch.put_cf(
            self.cf(CF_IMAGES),
            manifest.image_ref().key(),
            manifest.to_json(),
        );
        self.write_batch(batch)
    }

    /// Stores an index received from elsewhere once every chunk it names is
    /// in the store; the index is decoded and validated first.
    pub fn put_index(&self, encoded: &[u8]) -> Result<IndexDigest, StoreError> {
        let index = ImageIndex::decode(encoded)?;
        index.validate()?;
        let digest = IndexDigest::of(encoded);
        self.check_chunk_refs(&format!("index {digest}"), &index)?;
        let mut batch = WriteBatch::default();
        self.add_index_to_batch(&mut batch, encoded)?;
        self.write_batch(batch)?;
        Ok(digest)
    }

    /// Tags a manifest whose index and every chunk are already stored,
    /// replacing what the tag named before.
    pub fn put_manifest(&self, manifest: &ImageManifest) -> Result<(), StoreError> {
        let encoded = self.index_bytes(&manifest.index.digest)?;
        check_descriptor(manifest, &encoded)?;
        // put_index checked the chunks; checking again costs little and keeps
        // the promise that a tagged image is complete whatever wrote the index.
        let index = ImageIndex::decode(&encoded)?;
        self.check_chunk_refs(&format!("image {}", manifest.image_ref()), &index)?;
        if let Some(profile) = &manifest.profile {
            profile
                .chunk_order(&index)
                .map_err(|e| StoreError::BadManifest(e.to_string()))?;
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_IMAGES),
            manifest.image_ref().key(),
            manifest.to_json(),
        );
        self.write_batch(batch)
    }

    pub fn contains_index(&self, digest: &IndexDigest) -> Result<bool, StoreError> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_INDEXES), digest.as_bytes())?
            .is_some())
    }

    /// Every chunk `index` references is stored, with the length the index
    /// gives it: a reader (export writing tar headers, a mount answering
    /// reads) trusts the index's lengths, so a peer's index that disagrees
    /// with the chunks is refused here, on ingest.
    fn check_chunk_refs(&self, what: &str, index: &ImageIndex) -> Result<(), StoreError> {
        for chunk in index.chunk_refs() {
            match self.chunk_location(&chunk.id)? {
                None => {
                    return Err(StoreError::MissingChunk {
                        image: what.to_owned(),
                        chunk: chunk.id,
                    })
                }
                Some(location) if location.len != chunk.len => {
                    return Err(StoreError::ChunkLength {
                        image: what.to_owned(),
                        chunk: chunk.id,
                        claimed: chunk.len,
                        stored: location.len,
                    })
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn check_chunks_present<'a>(
        &self,
        what: &str,
        ids: impl Iterator<Item = &'a ChunkId>,
    ) -> Result<(), StoreError> {
        for id in ids {
            if !self.contains_chunk(id)? {
                return Err(StoreError::MissingChunk {
                    image: what.to_owned(),
                    chunk: *id,
                });
            }
        }
        Ok(())
    }

    fn add_index_to_batch(&self, batch: &mut WriteBatch, encoded: &[u8]) -> Result<(), StoreError> {
        let compressed =
            zstd::bulk::compress(encoded, 3).context(|| "compressing index".to_string())?;
        batch.put_cf(
            self.cf(CF_INDEXES),
            IndexDigest::of(encoded).as_bytes(),
            compressed,
        );
        Ok(())
    }

    /// The record of a layer converted before, by its diff_id.
    pub fn layer_record(&self, diff_id: &str) -> Result<Option<LayerRecord>, StoreError> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_LAYERS), diff_id.as_bytes())?
        {
            Some(bytes) => Ok(Some(LayerRecord::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    pub fn image(&self, image: &ImageRef) -> Result<ImageManifest, StoreError> {
        let bytes = self
            .db
            .get_pinned_cf(self.cf(CF_IMAGES), image.key())?
            .ok_or_else(|| StoreError::ImageNotFound(image.clone()))?;
        Ok(ImageManifest::from_json(&bytes)?)
    }

    /// All images, sorted by name:tag.
    pub fn images(&self) -> Result<Vec<ImageManifest>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_IMAGES), IteratorMode::Start) {
            let (_, value) = item?;
            out.push(ImageManifest::from_json(&value)?);
        }
        Ok(out)
    }

    /// Removes a tag; its index and chunks stay until `gc`.
    pub fn remove_image(&self, image: &ImageRef) -> Result<(), StoreError> {
        self.image(image)?;
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_IMAGES), image.key());
        self.write_batch(batch)
    }

    /// The encoded bytes of an index, checked against its digest.
    pub fn index_bytes(&self, digest: &IndexDigest) -> Result<Vec<u8>, StoreError> {
        let compressed = self
            .db
            .get_pinned_cf(self.cf(CF_INDEXES), digest.as_bytes())?
            .ok_or(StoreError::IndexNotFound(*digest))?;
        // An index of a 100k-file image is a few MB; 1 GiB bounds a corrupt length header.
        let bytes = skiff_chunk::decompress_bounded(&compressed, 1 << 30)
            .map_err(|e| StoreError::Corrupt(format!("index {digest}: {e}")))?;
        if IndexDigest::of(&bytes) != *digest {
            return Err(StoreError::Corrupt(format!(
                "index {digest} does not match its digest"
            )));
        }
        Ok(bytes)
    }

    pub fn index(&self, digest: &IndexDigest) -> Result<ImageIndex, StoreError> {
        Ok(ImageIndex::decode(&self.index_bytes(digest)?)?)
    }

    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut stats = StoreStats::default();
        for manifest in self.images()? {
            stats.images += 1;
            stats.logical_bytes += manifest.index.logical_bytes;
        }
        let mut frames = HashMap::new();
        for item in self.db.iterator_cf(self.cf(CF_CHUNKS), IteratorMode::Start) {
            let (_, value) = item?;
            let loc = ChunkLocation::decode(&value)?;
            stats.chunks += 1;
            stats.chunk_bytes += u64::from(loc.len);
            frames.insert(loc.frame_key(), u64::from(loc.frame_len));
        }
        stats.frame_bytes = frames.values().sum();
        stats.pack_bytes = self.pack_bytes()?;
        stats.dedup_ratio = ratio(stats.logical_bytes, stats.chunk_bytes);
        stats.compression_ratio = ratio(stats.chunk_bytes, stats.frame_bytes);
        Ok(stats)
    }

    /// Size of all pack files on disk.
    pub(crate) fn pack_bytes(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for (pack, committed) in self.committed_packs()? {
            let path = self.pack_path(pack);
            total += match fs::metadata(&path) {
                Ok(meta) => meta.len(),
                // Registered, then the writer died before creating it: recovery drops it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && committed == 0 => 0,
                Err(e) => return Err(e).context(|| format!("stat {}", path.display())),
            };
        }
        Ok(total)
    }

    /// Checks that every image's index is present and intact, every chunk it
    /// names is stored, and every stored chunk decompresses to bytes that hash
    /// to its id. `progress` is called with the compressed bytes checked.
    pub fn fsck(&self, progress: &dyn Fn(u64)) -> Result<FsckReport, StoreError> {
        let mut report = FsckReport::default();
        for item in self.db.iterator_cf(self.cf(CF_IMAGES), IteratorMode::Start) {
            let (key, value) = item?;
            report.images += 1;
            let name = String::from_utf8_lossy(&key).into_owned();
            let manifest = match ImageManifest::from_json(&value) {
                Ok(m) => m,
                Err(e) => {
                    report.problems.push(format!("image {name}: {e}"));
                    continue;
                }
            };
            let index = match self.index(&manifest.index.digest) {
                Ok(index) => index,
                Err(e) => {
                    report.problems.push(format!("image {name}: {e}"));
                    continue;
                }
            };
            let mut seen = HashSet::new();
            for chunk in index.chunk_refs() {
                if !seen.insert(chunk.id) {
                    continue;
                }
                match self.chunk_location(&chunk.id)? {
                    Some(loc) if loc.len == chunk.len => {}
                    Some(loc) => report.problems.push(format!(
                        "image {name}: chunk {} is {} bytes in the index, {} in the store",
                        chunk.id, chunk.len, loc.len
                    )),
                    None => report
                        .problems
                        .push(format!("image {name}: chunk {} is missing", chunk.id)),
                }
            }
        }

        for item in self.db.iterator_cf(self.cf(CF_LAYERS), IteratorMode::Start) {
            let (key, value) = item?;
            let name = String::from_utf8_lossy(&key).into_owned();
            match LayerRecord::decode(&value) {
                Ok(record) => {
                    for id in &record.chunks {
                        if !self.contains_chunk(id)? {
                            report
                                .problems
                                .push(format!("layer record {name}: chunk {id} is missing"));
                        }
                    }
                }
                Err(e) => report.problems.push(format!("layer record {name}: {e}")),
            }
        }

        // Group chunks by frame so each frame is read and decompressed once.
        let packs = self.committed_packs()?;
        let mut by_frame: BTreeMap<(u32, u64), Vec<(ChunkId, ChunkLocation)>> = BTreeMap::new();
        for item in self.db.iterator_cf(self.cf(CF_CHUNKS), IteratorMode::Start) {
            let (key, value) = item?;
            let id = ChunkId::from_slice(&key)?;
            let loc = ChunkLocation::decode(&value)?;
            by_frame.entry(loc.frame_key()).or_default().push((id, loc));
        }
        for chunks in by_frame.values() {
            let loc = chunks[0].1;
            report.frames += 1;
            let committed = packs.get(&loc.pack).copied().unwrap_or(0);
            if loc.frame_offset + u64::from(loc.frame_len) > committed {
                report.problems.push(format!(
                    "frame at pack {} offset {} lies past the pack's committed length {committed}",
                    loc.pack, loc.frame_offset
                ));
                continue;
            }
            let frame = match self
                .read_raw_frame(&loc)
                .and_then(|c| Ok(decompress_frame(&c, loc.frame_raw_len as usize)?))
            {
                Ok(frame) => frame,
                Err(e) => {
                    report.problems.push(format!(
                        "frame at pack {} offset {}: {e}",
                        loc.pack, loc.frame_offset
                    ));
                    continue;
                }
            };
            for (id, loc) in chunks {
                report.chunks += 1;
                let data = frame.get(loc.offset as usize..loc.offset as usize + loc.len as usize);
                match data.map(|d| verify_chunk(id, d)) {
                    Some(Ok(())) => {}
                    Some(Err(e)) => report.problems.push(e.to_string()),
                    None => report
                        .problems
                        .push(format!("chunk {id} lies outside its frame")),
                }
            }
            progress(u64::from(loc.frame_len));
        }
        Ok(report)
    }
}

#[derive(Clone, Copy)]
pub(crate) enum LockKind {
    Shared,
    Exclusive,
}

/// Takes the store's writer lock, or says the store is busy.
fn lock_store(root: &Path) -> Result<File, StoreError> {
    lock_file(root, LOCK_FILE, LockKind::Exclusive)
}

/// flock(2)s `STORE/name` without waiting; [`StoreError::Busy`] if held.
pub(crate) fn lock_file(root: &Path, name: &str, kind: LockKind) -> Result<File, StoreError> {
    let lock_path = root.join(name);
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .context(|| format!("opening {}", lock_path.display()))?;
    let taken = match kind {
        LockKind::Shared => lock.try_lock_shared(),
        LockKind::Exclusive => lock.try_lock(),
    };
    match taken {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Busy(root.to_owned())),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).context(|| format!("locking {}", lock_path.display()))
        }
    }
}

/// The lock between readers (shared) and gc (exclusive); `held` says why
/// the store is in use when the other side has it.
pub(crate) fn readers_lock(
    root: &Path,
    kind: LockKind,
    held: &'static str,
) -> Result<File, StoreError> {
    lock_file(root, READERS_LOCK_FILE, kind).map_err(|e| match e {
        StoreError::Busy(path) => StoreError::InUse(path, held),
        other => other,
    })
}

/// Makes a directory's entries (a created or removed pack) survive power loss.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .context(|| format!("syncing {}", dir.display()))
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn read_config(root: &Path) -> Result<StoreConfig, StoreError> {
    let path = root.join(CONFIG_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::NoStore(root.to_owned()))
        }
        Err(e) => return Err(e).context(|| format!("reading {}", path.display())),
    };
    let config: StoreConfig = serde_json::from_slice(&bytes).map_err(|e| StoreError::BadStore {
        path: root.to_owned(),
        reason: format!("{CONFIG_FILE}: {e}"),
    })?;
    if config.format_version != STORE_FORMAT_VERSION {
        return Err(StoreError::BadStore {
            path: root.to_owned(),
            reason: format!(
                "store format {} (this skiff reads {STORE_FORMAT_VERSION})",
                config.format_version
            ),
        });
    }
    config.chunking.validate()?;
    Ok(config)
}

fn db_options(create: bool) -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(create);
    opts.create_missing_column_families(create);
    opts.set_keep_log_file_num(2);
    // Chunk lookups during convert are mostly misses: a bloom filter answers them without I/O.
    let mut table = BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    opts.set_block_based_table_factory(&table);
    opts
}

fn column_families() -> Vec<ColumnFamilyDescriptor> {
    COLUMN_FAMILIES
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(*name, db_options(false)))
        .collect()
}

/// Checks that a manifest describes the encoded index it names.
fn check_descriptor(manifest: &ImageManifest, encoded: &[u8]) -> Result<(), StoreError> {
    let digest = IndexDigest::of(encoded);
    if digest != manifest.index.digest {
        return Err(StoreError::BadManifest(format!(
            "it names index {} but the index hashes to {digest}",
            manifest.index.digest
        )));
    }
    if manifest.index.size != encoded.len() as u64 {
        return Err(StoreError::BadManifest(format!(
            "it says index {digest} is {} bytes, the index is {}",
            manifest.index.size,
            encoded.len()
        )));
    }
    Ok(())
}
