//! The host's chunk cache: one directory shared by every mount, image and
//! process, so a chunk that several images share crosses the network once.
//!
//! ```text
//! CACHE/
//!   packs/abcd…       chunks end to end with a table of them (pack_file.rs):
//!                     what one fetch brought, up to 4 MiB a pack
//!   files/abcd…       whole files assembled from cached chunks, named by the
//!                     hash of their chunk list, for FUSE passthrough
//!   tmp/              files being written (renamed into place when whole)
//!   pins/PID-N        ids of the chunks open files of process PID pin
//!   pins/lease-PID-N  the same for a process on a host sharing the cache,
//!                     alive while it renews the file's mtime
//!   claims/ID         held by the host fetching chunk ID, on a cache that
//!                     several hosts share (claims.rs)
//!   evict.lock        held (flock) by the process evicting
//!   usage             bytes held, as every process's writes and the last
//!                     scan add up (8 bytes, little-endian; flock'd to change)
//! ```
//!
//! A pack appears whole or not at all (written aside, then renamed) and is
//! never changed, and every read checks a chunk against its id, so a crash
//! or a stray write costs a refetch, never wrong bytes. Each process knows
//! the packs of the others from a look at `packs/` every quarter second
//! (the chunks it wrote itself at once). Recency is a pack's mtime, touched
//! when one of its chunks is read after a while; eviction removes the least
//! recently used packs none of whose chunks an open file of a running
//! process pins. An older cache's `chunks/` (a file per chunk) is removed.
//!
//! On storage several hosts share ([`ChunkCache::open_shared`]), process
//! ids say nothing of another host's processes: pins are then leases, and
//! chunks are claimed before they are fetched so that one host fetches each.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use skiff_format::{ChunkId, ChunkRef};
use thiserror::Error;

use crate::claims::{expired, touch, unique_tag, Claims, RENEW_EVERY};
use crate::pack_file::{self, Entry, PendingPack};

/// A read refreshes a chunk's recency at most this often.
const TOUCH_AFTER: Duration = Duration::from_secs(60);
/// Eviction brings the cache down to this share of its bound, so that it
/// does not run again after every new chunk.
const EVICT_TO_PERCENT: u64 = 90;
/// Temporary files older than this were left by a writer that died.
const STALE_TEMP: Duration = Duration::from_secs(3600);
/// How often the keeper thread publishes changed pins and evicts if the
/// cache is over its bound (so a fetch never waits on an eviction).
const KEEPER_EVERY: Duration = Duration::from_millis(250);

/// Tells caches opened in one process apart in `pins/`.
static INSTANCES: AtomicU64 = AtomicU64::new(0);
/// Chunks waiting are written as a pack once they reach this many bytes
/// (or when the fetch that brought them ends),
const PACK_BYTES: usize = 4 << 20;
/// or this share of the bound, so eviction (a pack at a time) stays fine-grained.
const PACKS_PER_BOUND_AT_LEAST: u64 = 16;
/// Pack files kept open for reads.
const OPEN_PACKS: usize = 64;
/// `tmp/` names of an older cache's `chunks/` being removed.
const LEGACY_PREFIX: &str = "legacy-chunks-";
/// Pin files of processes judged by the lease, not the process id.
const LEASE_PREFIX: &str = "lease-";
/// A lease pin file not renewed for this long belongs to a process gone.
const PIN_LEASE: Duration = Duration::from_secs(30);
/// How often a shared cache sweeps claims that were left behind.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Where a cached chunk lies.
#[derive(Clone)]
struct Slot {
    pack: Arc<str>,
    offset: u64,
    len: u32,
}

/// The packs this process knows of, and where each chunk in them lies.
#[derive(Default)]
struct PackIndex {
    /// Every pack known to hold each chunk (two processes may have written
    /// it at once), the first added first.
    chunks: HashMap<ChunkId, Vec<Slot>>,
    /// By file name: the chunks each holds.
    packs: HashMap<Arc<str>, Vec<ChunkId>>,
    /// `packs/`'s mtime when it was last listed.
    listed: Option<SystemTime>,
}

impl PackIndex {
    fn add(&mut self, name: &str, entries: &[Entry]) {
        if self.packs.contains_key(name) {
            return;
        }
        let name: Arc<str> = name.into();
        for entry in entries {
            self.chunks.entry(entry.id).or_default().push(Slot {
                pack: name.clone(),
                offset: entry.offset,
                len: entry.len,
            });
        }
        self.packs
            .insert(name, entries.iter().map(|e| e.id).collect());
    }

    fn forget(&mut self, name: &str) {
        let Some(ids) = self.packs.remove(name) else {
            return;
        };
        for id in ids {
            // Another pack that holds it still does.
            if let Some(slots) = self.chunks.get_mut(&id) {
                slots.retain(|slot| &*slot.pack != name);
                if slots.is_empty() {
                    self.chunks.remove(&id);
                }
            }
        }
    }

    fn slot(&self, id: &ChunkId) -> Option<Slot> {
        self.chunks.get(id)?.first().cloned()
    }
}

/// A directory mtime this recent may not show a change made in the same
/// clock tick: `packs/` is listed again until its mtime is older.
const MTIME_SETTLES: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
#[error("chunk cache {path}: {context}: {source}")]
pub struct CacheError {
    path: PathBuf,
    context: &'static str,
    #[source]
    source: io::Error,
}

/// What one eviction pass found and removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvictReport {
    pub chunks_before: u64,
    pub bytes_before: u64,
    pub chunks_removed: u64,
    pub bytes_removed: u64,
}

pub struct ChunkCache {
    root: PathBuf,
    max_bytes: u64,
    /// What this process believes the cache holds: the shared `usage` as it
    /// last read it, grown by each chunk it writes since.
    approx_bytes: AtomicU64,
    /// Bytes this process wrote and has not yet added to `usage`.
    unpublished: AtomicU64,
    /// Chunks of files open in this process, with how many opens need each.
    pins: Mutex<HashMap<ChunkId, u32>>,
    /// Where other processes read this one's pins, and whether it is behind.
    pin_file: PathBuf,
    pins_changed: AtomicBool,
    evicting: Mutex<()>,
    /// Assembled files this process has checked against their chunks, and
    /// those it is building (by the hash of their chunk lists).
    verified: Mutex<HashSet<[u8; 32]>>,
    building: Mutex<HashSet<[u8; 32]>>,
    /// Chunks put and not yet written as a pack.
    pending: Mutex<PendingPack>,
    index: Mutex<PackIndex>,
    /// Packs open for reads, most recent last.
    open_packs: Mutex<VecDeque<(Arc<str>, Arc<File>)>>,
    /// Claims on chunks being fetched, for a cache several hosts share.
    claims: Option<Claims>,
}

/// A claim on building one assembled file, given back on drop.
struct Building<'a> {
    set: &'a Mutex<HashSet<[u8; 32]>>,
    key: [u8; 32],
}

impl<'a> Building<'a> {
    fn claim(set: &'a Mutex<HashSet<[u8; 32]>>, key: [u8; 32]) -> Option<Building<'a>> {
        let claimed = set.lock().expect("building set poisoned").insert(key);
        // Lazily: a guard made and dropped for a claim that failed would
        // take the other builder's key out of the set (and lock it again
        // while it is held).
        claimed.then(|| Building { set, key })
    }
}

impl Drop for Building<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .expect("building set poisoned")
            .remove(&self.key);
    }
}

/// Whether `file` is `chunks` end to end, read a piece at a time.
fn holds_chunks(file: &File, chunks: &[ChunkRef]) -> bool {
    let expected: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
    if !file.metadata().is_ok_and(|m| m.len() == expected) {
        return false;
    }
    let mut reader = io::BufReader::with_capacity(1 << 20, file);
    let mut buf = vec![0u8; 64 * 1024];
    chunks.iter().all(|chunk| {
        let mut hasher = blake3::Hasher::new();
        let mut left = chunk.len as usize;
        while left > 0 {
            let n = left.min(buf.len());
            if io::Read::read_exact(&mut reader, &mut buf[..n]).is_err() {
                return false;
            }
            hasher.update(&buf[..n]);
            left -= n;
        }
        hasher.finalize().as_bytes() == chunk.id.as_bytes()
    })
}

impl ChunkCache {
    /// Opens (creating) the cache at `root`, bounded to `max_bytes`. The
    /// first scan of what it holds runs in the background, so opening is
    /// instant whatever the cache's size.
    pub fn open(root: &Path, max_bytes: u64) -> Result<Arc<ChunkCache>, CacheError> {
        Self::open_with(root, max_bytes, false)
    }

    /// Opens a cache on storage several hosts share (NFS, say): chunks are
    /// claimed before they are fetched (see [`ChunkCache::claims`]), and this
    /// process's pins hold while it renews them, not while its pid runs.
    pub fn open_shared(root: &Path, max_bytes: u64) -> Result<Arc<ChunkCache>, CacheError> {
        Self::open_with(root, max_bytes, true)
    }

    fn open_with(root: &Path, max_bytes: u64, shared: bool) -> Result<Arc<ChunkCache>, CacheError> {
        // Root's alone: the chunks are the images' files, including those
        // the images let only their own root read (/etc/shadow, keys).
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(|source| CacheError {
                    path: root.to_owned(),
                    context: "creating the cache directory",
                    source,
                })?;
            // A directory someone else made (shared storage, say) may refuse.
            if let Err(e) = fs::set_permissions(root, fs::Permissions::from_mode(0o700)) {
                tracing::warn!("making {} root's alone: {e}", root.display());
            }
        }
        for dir in ["packs", "files", "tmp", "pins"].map(|d| root.join(d)) {
            fs::create_dir_all(&dir).map_err(|source| CacheError {
                path: root.to_owned(),
                context: "creating the cache directory",
                source,
            })?;
        }
        let claims = shared
            .then(|| Claims::open(root))
            .transpose()
            .map_err(|source| CacheError {
                path: root.to_owned(),
                context: "creating the claims directory",
                source,
            })?;
        let cache = Arc::new(ChunkCache {
            root: root.to_owned(),
            max_bytes,
            approx_bytes: AtomicU64::new(0),
            unpublished: AtomicU64::new(0),
            pins: Mutex::new(HashMap::new()),
            pin_file: root.join("pins").join(format!(
                "{}-{}",
                // Pids repeat across hosts: a shared cache's names must not.
                if shared {
                    format!("{LEASE_PREFIX}{}", unique_tag())
                } else {
                    std::process::id().to_string()
                },
                INSTANCES.fetch_add(1, Ordering::Relaxed)
            )),
            pins_changed: AtomicBool::new(false),
            evicting: Mutex::new(()),
            verified: Mutex::default(),
            building: Mutex::default(),
            pending: Mutex::default(),
            index: Mutex::default(),
            open_packs: Mutex::default(),
            claims,
        });
        cache.refresh();
        cache.clear_legacy_chunks();
        let this = Arc::downgrade(&cache);
        std::thread::Builder::new()
            .name("cache-keeper".into())
            .spawn(move || {
                // The first pass scans what earlier processes left.
                let mut scan = true;
                loop {
                    let Some(cache) = this.upgrade() else { return };
                    let stale = cache
                        .pending
                        .lock()
                        .expect("pending pack poisoned")
                        .since()
                        .is_some_and(|since| since.elapsed() >= KEEPER_EVERY);
                    if stale {
                        if let Err(e) = cache.flush() {
                            tracing::warn!("{e}");
                        }
                    }
                    cache.refresh();
                    if cache.pins_changed.swap(false, Ordering::Relaxed) {
                        if let Err(e) = cache.publish_pins() {
                            cache.pins_changed.store(true, Ordering::Relaxed);
                            tracing::warn!("{e}");
                        }
                    }
                    // What every process wrote counts toward the bound,
                    // not only what this one did.
                    if cache.unpublished.load(Ordering::Relaxed) > 0 {
                        if let Err(e) = cache.publish_usage() {
                            tracing::warn!("{e}");
                        }
                    }
                    if scan || cache.approx_bytes() > cache.max_bytes {
                        if let Err(e) = cache.evict() {
                            tracing::warn!("{e}");
                        }
                        scan = false;
                    }
                    drop(cache);
                    std::thread::sleep(KEEPER_EVERY);
                }
            })
            .map_err(|source| CacheError {
                path: root.to_owned(),
                context: "starting the cache thread",
                source,
            })?;
        if shared {
            // Apart from the keeper, whose eviction may wait on another
            // host's for longer than a lease.
            let this = Arc::downgrade(&cache);
            std::thread::Builder::new()
                .name("cache-renewer".into())
                .spawn(move || {
                    let mut swept = Instant::now();
                    loop {
                        let Some(cache) = this.upgrade() else { return };
                        if let Some(claims) = &cache.claims {
                            claims.renew();
                            if swept.elapsed() >= SWEEP_EVERY {
                                claims.sweep();
                                swept = Instant::now();
                            }
                        }
                        cache.renew_pins();
                        drop(cache);
                        std::thread::sleep(RENEW_EVERY);
                    }
                })
                .map_err(|source| CacheError {
                    path: root.to_owned(),
                    context: "starting the cache thread",
                    source,
                })?;
        }
        Ok(cache)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Claims on chunks being fetched, if several hosts share this cache.
    pub fn claims(&self) -> Option<&Claims> {
        self.claims.as_ref()
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Bytes cached, as of this process's last scan plus what it wrote since.
    pub fn approx_bytes(&self) -> u64 {
        self.approx_bytes.load(Ordering::Relaxed)
    }

    /// Moves away and removes, in the background, the `chunks/` of an older
    /// skiff's cache (a file per chunk), which nothing reads any more.
    fn clear_legacy_chunks(&self) {
        let legacy = self.root.join("chunks");
        let tmp = self.root.join("tmp");
        if legacy.is_dir() {
            let aside = tmp.join(format!(
                "{LEGACY_PREFIX}{}-{}",
                std::process::id(),
                INSTANCES.fetch_add(1, Ordering::Relaxed)
            ));
            if fs::rename(&legacy, &aside).is_ok() {
                tracing::info!("removing the older cache layout in {}", legacy.display());
            }
        }
        // Also what a process that exited mid-way left.
        let leftovers: Vec<PathBuf> = fs::read_dir(&tmp)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(LEGACY_PREFIX))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        if !leftovers.is_empty() {
            let _ = std::thread::Builder::new()
                .name("cache-legacy".into())
                .spawn(move || {
                    for dir in leftovers {
                        let _ = fs::remove_dir_all(dir);
                    }
                });
        }
    }

    fn pack_path(&self, name: &str) -> PathBuf {
        self.root.join("packs").join(name)
    }

    fn error(&self, context: &'static str) -> impl FnOnce(io::Error) -> CacheError + '_ {
        move |source| CacheError {
            path: self.root.clone(),
            context,
            source,
        }
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        // Locks in order (pending, then index), one at a time.
        let pending = self
            .pending
            .lock()
            .expect("pending pack poisoned")
            .get(id)
            .is_some();
        pending
            || self
                .index
                .lock()
                .expect("pack index poisoned")
                .chunks
                .contains_key(id)
    }

    /// The chunk if it is cached and intact. A pack holding bytes that do
    /// not match the id (a torn write, a bad disk) is removed, and the chunk
    /// reported as absent.
    pub fn get(&self, id: &ChunkId) -> Option<Bytes> {
        if let Some(data) = self.pending.lock().expect("pending pack poisoned").get(id) {
            // Not the slice: it may keep a whole frame alive in the caller's cache.
            return Some(Bytes::copy_from_slice(data));
        }
        let slot = self.index.lock().expect("pack index poisoned").slot(id)?;
        let Some(file) = self.open_pack(&slot.pack) else {
            // Evicted by another process since this one last looked.
            self.forget_pack(&slot.pack);
            return None;
        };
        let mut data = vec![0u8; slot.len as usize];
        let intact =
            file.read_exact_at(&mut data, slot.offset).is_ok() && ChunkId::of(&data) == *id;
        if !intact {
            tracing::warn!(
                "cached chunk {id} is damaged; removing its pack {}",
                slot.pack
            );
            let _ = fs::remove_file(self.pack_path(&slot.pack));
            self.forget_pack(&slot.pack);
            return None;
        }
        touch_if_stale(&file);
        Some(Bytes::from(data))
    }

    /// Caches a chunk the caller has verified; it is written with the
    /// chunks put after it as one pack, at [`ChunkCache::flush`] or once
    /// they fill one. A chunk already there is not put again; racing
    /// another process to write it is harmless.
    pub fn put(&self, id: &ChunkId, data: Bytes) -> Result<(), CacheError> {
        let full = {
            let mut pending = self.pending.lock().expect("pending pack poisoned");
            let known = pending.get(id).is_some()
                || self
                    .index
                    .lock()
                    .expect("pack index poisoned")
                    .chunks
                    .contains_key(id);
            if known {
                return Ok(());
            }
            pending.push(*id, data);
            pending.bytes() as u64 >= self.pack_bytes()
        };
        if full {
            self.flush()?;
        }
        Ok(())
    }

    /// How big a pack grows.
    fn pack_bytes(&self) -> u64 {
        (PACK_BYTES as u64).min(self.max_bytes / PACKS_PER_BOUND_AT_LEAST)
    }

    /// Writes the chunks put so far as one pack.
    pub fn flush(&self) -> Result<(), CacheError> {
        // Held throughout: the chunks stay readable from memory until the
        // pack is in the index.
        let mut pending = self.pending.lock().expect("pending pack poisoned");
        if pending.is_empty() {
            return Ok(());
        }
        let pack = std::mem::take(&mut *pending).encode();
        // Recreated if someone removed it (deleting the cache is allowed).
        fs::create_dir_all(self.root.join("packs"))
            .map_err(self.error("creating the packs directory"))?;
        // No fsync: a pack torn by a crash fails its checks and is fetched
        // again. On storage other hosts share, synced before it is renamed
        // into place: over NFS the name may reach the server before the bytes.
        let sync = self.claims.is_some();
        self.write_atomically(&self.pack_path(&pack.name), sync, |file| {
            pack.write_to(file)
        })?;
        self.index
            .lock()
            .expect("pack index poisoned")
            .add(&pack.name, &pack.entries);
        drop(pending);
        self.wrote(pack.len());
        Ok(())
    }

    /// Learns the packs other processes wrote and forgets those they
    /// evicted, if `packs/` changed since the last look.
    pub(crate) fn refresh(&self) {
        self.refresh_listing(false);
    }

    /// As [`ChunkCache::refresh`], listing `packs/` whatever its mtime says:
    /// over NFS a client may see a directory's mtime late.
    pub(crate) fn refresh_now(&self) {
        self.refresh_listing(true);
    }

    fn refresh_listing(&self, always: bool) {
        let dir = self.root.join("packs");
        let Ok(changed) = fs::metadata(&dir).and_then(|m| m.modified()) else {
            return;
        };
        // What was known before the listing: a pack written after it is not gone.
        let known: Vec<Arc<str>> = {
            let index = self.index.lock().expect("pack index poisoned");
            if index.listed == Some(changed) && !always {
                return;
            }
            index.packs.keys().cloned().collect()
        };
        let Ok(listing) = fs::read_dir(&dir) else {
            return;
        };
        let names: HashSet<String> = listing
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        let (gone, new): (Vec<Arc<str>>, Vec<String>) = {
            let index = self.index.lock().expect("pack index poisoned");
            let gone = known
                .into_iter()
                .filter(|name| !names.contains(&**name))
                .collect();
            let new = names
                .into_iter()
                .filter(|name| !index.packs.contains_key(name.as_str()))
                .collect();
            (gone, new)
        };
        for name in gone {
            self.forget_pack(&name);
        }
        // Tables are read without the lock: reads go on meanwhile.
        let tables: Vec<(String, Vec<Entry>)> = new
            .into_iter()
            .filter_map(|name| Some((name.clone(), self.pack_table(&name)?)))
            .collect();
        let mut index = self.index.lock().expect("pack index poisoned");
        for (name, table) in tables {
            index.add(&name, &table);
        }
        let settled = changed.elapsed().is_ok_and(|age| age >= MTIME_SETTLES);
        index.listed = settled.then_some(changed);
    }

    /// The table of pack `name`; `None` if it is gone or not a whole pack.
    fn pack_table(&self, name: &str) -> Option<Vec<Entry>> {
        let file = File::open(self.pack_path(name)).ok()?;
        pack_file::read_table(&file).ok()?
    }

    fn open_pack(&self, name: &Arc<str>) -> Option<Arc<File>> {
        let mut open = self.open_packs.lock().expect("open packs poisoned");
        if let Some(at) = open.iter().position(|(n, _)| n == name) {
            let entry = open.remove(at)?;
            let file = entry.1.clone();
            open.push_back(entry);
            return Some(file);
        }
        let file = Arc::new(File::open(self.pack_path(name)).ok()?);
        if open.len() >= OPEN_PACKS {
            open.pop_front();
        }
        open.push_back((name.clone(), file.clone()));
        Some(file)
    }

    fn forget_pack(&self, name: &str) {
        self.index.lock().expect("pack index poisoned").forget(name);
        self.open_packs
            .lock()
            .expect("open packs poisoned")
            .retain(|(n, _)| &**n != name);
    }

    /// Writes a file aside in tmp/ and renames it to `path`, so that readers
    /// in any process see all of it or nothing.
    fn write_atomically(
        &self,
        path: &Path,
        sync: bool,
        write: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> Result<(), CacheError> {
        let mut temp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))
            .map_err(self.error("creating a temporary file"))?;
        write(temp.as_file_mut()).map_err(self.error("writing a file"))?;
        if sync {
            temp.as_file()
                .sync_all()
                .map_err(self.error("syncing a file"))?;
        }
        temp.persist(path)
            .map_err(|e| self.error("renaming a file into place")(e.error))?;
        Ok(())
    }

    /// A file holding `chunks` end to end, checked chunk by chunk against
    /// their ids, for the kernel to read without skiff (FUSE passthrough).
    /// Without `build`, only a file this cache has already checked is
    /// returned (a quick look, for an open). With `build` (slow, for a
    /// background thread), an existing file is checked, and a missing or
    /// damaged one is made from the cached chunks, streamed to disk one chunk
    /// at a time; one such build per file runs at a time. `None` if the file
    /// does not exist and cannot (or may not) be made.
    pub fn assembled(&self, chunks: &[ChunkRef], build: bool) -> Result<Option<File>, CacheError> {
        let mut hasher = blake3::Hasher::new();
        for chunk in chunks {
            hasher.update(chunk.id.as_bytes());
            hasher.update(&chunk.len.to_le_bytes());
        }
        let key = *hasher.finalize().as_bytes();
        let path = self
            .root
            .join("files")
            .join(blake3::Hash::from(key).to_hex().as_str());
        let verified = || {
            self.verified
                .lock()
                .expect("verified set poisoned")
                .contains(&key)
        };
        if !build {
            return Ok(if verified() {
                File::open(&path).ok().inspect(touch_if_stale)
            } else {
                None
            });
        }
        let Some(_building) = Building::claim(&self.building, key) else {
            return Ok(None); // another thread is on it
        };
        if let Ok(file) = File::open(&path) {
            if verified() || holds_chunks(&file, chunks) {
                touch_if_stale(&file);
                self.verified
                    .lock()
                    .expect("verified set poisoned")
                    .insert(key);
                return Ok(Some(file));
            }
            tracing::warn!(
                "assembled file {} is damaged; making it again",
                path.display()
            );
            let _ = fs::remove_file(&path);
        }
        if !chunks.iter().all(|c| self.contains(&c.id)) {
            return Ok(None);
        }
        // Synced: once checked, the kernel reads these bytes without skiff.
        let mut complete = true;
        self.write_atomically(&path, true, |file| {
            for chunk in chunks {
                // get() checks the chunk against its id.
                match self.get(&chunk.id) {
                    Some(data) if data.len() == chunk.len as usize => file.write_all(&data)?,
                    _ => {
                        complete = false;
                        return Err(io::Error::other("a chunk left the cache"));
                    }
                }
            }
            Ok(())
        })
        .or_else(|e| if complete { Err(e) } else { Ok(()) })?;
        if !complete {
            return Ok(None);
        }
        self.wrote(chunks.iter().map(|c| u64::from(c.len)).sum());
        self.verified
            .lock()
            .expect("verified set poisoned")
            .insert(key);
        File::open(&path)
            .map(Some)
            .map_err(self.error("opening an assembled file"))
    }

    pub fn pin(&self, ids: &[ChunkId]) {
        let mut pins = self.pins.lock().expect("pin table poisoned");
        for id in ids {
            *pins.entry(*id).or_default() += 1;
        }
        self.pins_changed.store(true, Ordering::Relaxed);
    }

    pub fn unpin(&self, ids: &[ChunkId]) {
        let mut pins = self.pins.lock().expect("pin table poisoned");
        for id in ids {
            if let Some(count) = pins.get_mut(id) {
                *count -= 1;
                if *count == 0 {
                    pins.remove(id);
                }
            }
        }
        self.pins_changed.store(true, Ordering::Relaxed);
    }

    /// Tells the other hosts that this process's pins still hold; a pin
    /// file another host removed (it looked stale) is written again.
    fn renew_pins(&self) {
        match File::options().write(true).open(&self.pin_file) {
            Ok(file) => {
                let _ = touch(&file);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let pinned = !self.pins.lock().expect("pin table poisoned").is_empty();
                if pinned {
                    self.pins_changed.store(true, Ordering::Relaxed);
                }
            }
            Err(_) => {}
        }
    }

    /// Writes this process's pins where other processes' evictions look.
    fn publish_pins(&self) -> Result<(), CacheError> {
        let ids: Vec<u8> = {
            let pins = self.pins.lock().expect("pin table poisoned");
            pins.keys().flat_map(|id| *id.as_bytes()).collect()
        };
        self.write_atomically(&self.pin_file, false, |file| file.write_all(&ids))
    }

    /// Chunks pinned by this process and by every other running one; pin
    /// files of processes that are gone are removed.
    fn all_pins(&self) -> std::collections::HashSet<ChunkId> {
        let mut all: std::collections::HashSet<ChunkId> = self
            .pins
            .lock()
            .expect("pin table poisoned")
            .keys()
            .copied()
            .collect();
        let Ok(files) = fs::read_dir(self.root.join("pins")) else {
            return all;
        };
        for file in files.flatten() {
            let path = file.path();
            if path == self.pin_file {
                continue;
            }
            let name = file.file_name();
            let name = name.to_str().unwrap_or_default();
            let alive = match name.strip_prefix(LEASE_PREFIX) {
                // Perhaps another host's: only the lease tells.
                Some(_) => file.metadata().is_ok_and(|meta| !expired(&meta, PIN_LEASE)),
                None => name
                    .split('-')
                    .next()
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_some_and(process_is_running),
            };
            if !alive {
                let _ = fs::remove_file(&path);
                continue;
            }
            if let Ok(bytes) = fs::read(&path) {
                all.extend(
                    bytes
                        .chunks_exact(32)
                        .filter_map(|raw| <[u8; 32]>::try_from(raw).ok().map(ChunkId::from_bytes)),
                );
            }
        }
        all
    }

    /// Scans the cache and, if it holds more than its bound, removes the
    /// least recently used unpinned chunks until it holds 90% of the bound.
    /// One process evicts at a time; the others wait for it, then rescan.
    pub fn evict(&self) -> Result<EvictReport, CacheError> {
        let _this_process = self.evicting.lock().expect("eviction lock poisoned");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("evict.lock"))
            .map_err(self.error("opening evict.lock"))?;
        lock.lock().map_err(self.error("locking evict.lock"))?;

        // A full disk must not stop the eviction that makes room.
        if let Err(e) = self.flush() {
            tracing::warn!("{e}");
        }
        self.remove_stale_temps();
        // The scan sees what this process wrote so far: it need not be added
        // again. What others publish while it runs is added to its result.
        self.unpublished.store(0, Ordering::Relaxed);
        let published_before = self.update_usage(|usage| usage)?;
        let mut entries = self.scan()?;
        let mut report = EvictReport {
            chunks_before: entries.iter().map(|e| e.chunks.len() as u64).sum(),
            bytes_before: entries.iter().map(|e| e.len).sum(),
            ..EvictReport::default()
        };
        let mut total = report.bytes_before;
        if total > self.max_bytes {
            let target = self.max_bytes / 100 * EVICT_TO_PERCENT;
            entries.sort_by_key(|e| e.used);
            let pins = self.all_pins();
            for entry in entries {
                if total <= target {
                    break;
                }
                if entry.chunks.iter().any(|id| pins.contains(id)) {
                    continue;
                }
                match fs::remove_file(&entry.path) {
                    Ok(()) => {
                        total -= entry.len;
                        report.chunks_removed += entry.chunks.len() as u64;
                        report.bytes_removed += entry.len;
                        if let Some(name) = &entry.pack {
                            self.forget_pack(name);
                        }
                    }
                    // Another process evicted it first.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => total -= entry.len,
                    Err(e) => return Err(self.error("removing a chunk")(e)),
                }
            }
            tracing::debug!(
                removed = report.chunks_removed,
                bytes = report.bytes_removed,
                "evicted from the chunk cache"
            );
        }
        self.update_usage(|usage| total.saturating_add(usage.saturating_sub(published_before)))?;
        Ok(report)
    }

    fn wrote(&self, bytes: u64) {
        self.approx_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.unpublished.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Adds what this process wrote since it last did to the shared count
    /// of bytes held; returns the total, which every process's next look
    /// at it sees. Between scans the bound then holds across processes to
    /// within what each writes in one keeper tick.
    fn publish_usage(&self) -> Result<u64, CacheError> {
        // Not while this process evicts: its scan already counts what it
        // wrote, and bytes taken from `unpublished` in the middle of it
        // would be counted twice.
        let _not_evicting = self.evicting.lock().expect("eviction lock poisoned");
        let written = self.unpublished.swap(0, Ordering::Relaxed);
        self.update_usage(|total| total.saturating_add(written))
    }

    /// Changes `usage` under its lock and takes the result as this
    /// process's view.
    fn update_usage(&self, change: impl FnOnce(u64) -> u64) -> Result<u64, CacheError> {
        use std::io::{Read, Seek};
        let mut file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(self.root.join("usage"))
            .map_err(self.error("opening usage"))?;
        file.lock().map_err(self.error("locking usage"))?;
        let mut bytes = [0u8; 8];
        // Empty (new) or torn: counted from zero until the next scan.
        let read = file.read_exact(&mut bytes).is_ok();
        let total = change(if read { u64::from_le_bytes(bytes) } else { 0 });
        file.rewind()
            .and_then(|()| file.write_all(&total.to_le_bytes()))
            .map_err(self.error("writing usage"))?;
        // Ours since the read: still to be published, already in our view.
        let pending = self.unpublished.load(Ordering::Relaxed);
        self.approx_bytes
            .store(total.saturating_add(pending), Ordering::Relaxed);
        Ok(total)
    }

    /// Every pack and assembled file, with its size, last use and chunks.
    fn scan(&self) -> Result<Vec<CachedFile>, CacheError> {
        self.refresh();
        let mut entries = Vec::new();
        let packs = self.root.join("packs");
        for file in fs::read_dir(&packs)
            .map_err(self.error("listing packs/"))?
            .flatten()
        {
            let Ok(name) = file.file_name().into_string() else {
                continue;
            };
            let known = self
                .index
                .lock()
                .expect("pack index poisoned")
                .packs
                .get(name.as_str())
                .cloned();
            // Written since the refresh, or not a pack (torn, foreign: it
            // goes first, with no chunks to spare it).
            let chunks = known.unwrap_or_else(|| {
                self.pack_table(&name).map_or_else(Vec::new, |table| {
                    let mut index = self.index.lock().expect("pack index poisoned");
                    index.add(&name, &table);
                    table.iter().map(|e| e.id).collect()
                })
            });
            entries.extend(CachedFile::of(&file, Some(name), chunks));
        }
        // Assembled files: an open one stays readable after removal.
        if let Ok(files) = fs::read_dir(self.root.join("files")) {
            for file in files.flatten() {
                entries.extend(CachedFile::of(&file, None, Vec::new()));
            }
        }
        Ok(entries)
    }

    fn remove_stale_temps(&self) {
        let Ok(temps) = fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for temp in temps.flatten() {
            if temp.metadata().is_ok_and(|m| older_than(&m, STALE_TEMP)) {
                let _ = fs::remove_file(temp.path());
            }
        }
    }
}

/// Every chunk the packs of the cache at `root` hold, as stored (not
/// checked against its id): for inspecting a cache, and for tests that
/// must see what reached the disk.
pub fn stored_chunks(root: &Path) -> io::Result<Vec<(ChunkId, Vec<u8>)>> {
    let mut chunks = Vec::new();
    for entry in fs::read_dir(root.join("packs"))?.flatten() {
        // Evicted since the listing.
        let Ok(file) = File::open(entry.path()) else {
            continue;
        };
        for e in pack_file::read_table(&file)?.unwrap_or_default() {
            let mut data = vec![0u8; e.len as usize];
            file.read_exact_at(&mut data, e.offset)?;
            chunks.push((e.id, data));
        }
    }
    Ok(chunks)
}

fn older_than(meta: &fs::Metadata, age: Duration) -> bool {
    meta.modified()
        .is_ok_and(|t| t.elapsed().is_ok_and(|elapsed| elapsed > age))
}

/// Marks a cached file as used now, unless that was recorded lately.
fn touch_if_stale(file: &File) {
    if file.metadata().is_ok_and(|m| older_than(&m, TOUCH_AFTER)) {
        // Recency only steers eviction; failing to record it is harmless.
        let _ = file.set_modified(SystemTime::now());
    }
}

impl Drop for ChunkCache {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.pin_file);
    }
}

/// Whether process `pid` runs. A killed process whose parent is gone may
/// linger as a zombie where nothing reaps orphans; that counts as gone.
pub fn process_is_running(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (COMM) STATE ...": COMM may hold spaces and parentheses.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

struct CachedFile {
    /// The pack's name; `None` for an assembled file.
    pack: Option<String>,
    /// The chunks a pack holds.
    chunks: Vec<ChunkId>,
    path: PathBuf,
    len: u64,
    used: SystemTime,
}

impl CachedFile {
    /// `None` if it went away since the listing (another process evicted it).
    fn of(entry: &fs::DirEntry, pack: Option<String>, chunks: Vec<ChunkId>) -> Option<CachedFile> {
        let meta = entry.metadata().ok()?;
        let used = if pack.is_some() && chunks.is_empty() {
            SystemTime::UNIX_EPOCH
        } else {
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)
        };
        Some(CachedFile {
            pack,
            chunks,
            path: entry.path(),
            len: meta.len(),
            used,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn chunk(n: u8, len: usize) -> (ChunkId, Vec<u8>) {
        let data = vec![n; len];
        (ChunkId::of(&data), data)
    }

    /// Puts a chunk in a pack of its own.
    fn put_alone(cache: &ChunkCache, id: &ChunkId, data: &[u8]) {
        cache.put(id, Bytes::copy_from_slice(data)).unwrap();
        cache.flush().unwrap();
    }

    fn pack_of(cache: &ChunkCache, id: &ChunkId) -> PathBuf {
        let index = cache.index.lock().unwrap();
        cache.pack_path(&index.slot(id).unwrap().pack)
    }

    fn age(cache: &ChunkCache, id: &ChunkId, secs: u64) {
        let file = File::options()
            .write(true)
            .open(pack_of(cache, id))
            .unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(secs))
            .unwrap();
    }

    /// A chunk whose pack of its own is `bytes` long on disk.
    fn packed_chunk(n: u8, bytes: usize) -> (ChunkId, Vec<u8>) {
        chunk(n, bytes - 44 - 12)
    }

    #[test]
    fn a_second_claim_on_a_build_fails_and_leaves_the_first_in_place() {
        let set = Mutex::new(HashSet::new());
        let first = Building::claim(&set, [7; 32]).unwrap();
        // Used to lock the set again while holding it (a hang), and to
        // take the first builder's key out of it.
        assert!(Building::claim(&set, [7; 32]).is_none());
        assert!(set.lock().unwrap().contains(&[7; 32]));
        drop(first);
        assert!(set.lock().unwrap().is_empty());
        assert!(Building::claim(&set, [7; 32]).is_some());
    }

    #[test]
    fn chunks_round_trip_and_damaged_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        let (id, data) = chunk(1, 1000);
        let (other, other_data) = chunk(2, 700);
        assert!(cache.get(&id).is_none());
        cache.put(&id, Bytes::from(data.clone())).unwrap();
        cache.put(&id, Bytes::from(data.clone())).unwrap();
        assert!(cache.contains(&id));
        assert_eq!(cache.get(&id).unwrap(), data, "waiting to be written");
        cache.put(&other, Bytes::from(other_data.clone())).unwrap();
        cache.flush().unwrap();
        assert_eq!(cache.get(&id).unwrap(), data);
        assert_eq!(cache.get(&other).unwrap(), other_data);
        // Both in one pack, written once.
        let packs = fs::read_dir(dir.path().join("packs")).unwrap().count();
        assert_eq!(packs, 1);
        let pack = pack_of(&cache, &id);
        let mut bytes = fs::read(&pack).unwrap();
        bytes[10] ^= 1;
        fs::write(&pack, &bytes).unwrap();
        assert!(cache.get(&id).is_none());
        assert!(!cache.contains(&id), "a damaged chunk is dropped");
        assert!(!pack.exists(), "with its pack");
        assert!(!cache.contains(&other));
    }

    #[test]
    fn eviction_removes_the_least_recently_used_unpinned_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 10_000).unwrap();
        let chunks: Vec<_> = (0..5).map(|n| packed_chunk(n, 3000)).collect();
        for (n, (id, data)) in chunks.iter().enumerate().take(3) {
            put_alone(&cache, id, data);
            age(&cache, id, 1000 - n as u64 * 100);
        }
        // Oldest first: 0, 1, 2. Reading 0 refreshes it; pinning 1 keeps it.
        assert!(cache.get(&chunks[0].0).is_some());
        cache.pin(&[chunks[1].0]);
        put_alone(&cache, &chunks[3].0, &chunks[3].1);
        cache.evict().unwrap();
        // 12,000 bytes > 10,000: evict down to 9,000 by dropping the LRU unpinned chunk (2).
        let present: Vec<bool> = chunks.iter().map(|(id, _)| cache.contains(id)).collect();
        assert_eq!(present, [true, true, false, true, false]);
        assert_eq!(cache.approx_bytes(), 9000);
        cache.unpin(&[chunks[1].0]);
        put_alone(&cache, &chunks[4].0, &chunks[4].1);
        cache.evict().unwrap();
        let present: Vec<bool> = chunks.iter().map(|(id, _)| cache.contains(id)).collect();
        assert_eq!(present, [true, false, false, true, true]);
    }

    #[test]
    fn assembled_files_hold_their_chunks_end_to_end_and_count_toward_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        let (a, b) = (chunk(1, 1000), chunk(2, 500));
        let refs = [
            ChunkRef { id: a.0, len: 1000 },
            ChunkRef { id: b.0, len: 500 },
            ChunkRef { id: a.0, len: 1000 },
        ];
        cache.put(&a.0, Bytes::from(a.1.clone())).unwrap();
        assert!(
            cache.assembled(&refs, true).unwrap().is_none(),
            "a chunk is missing"
        );
        cache.put(&b.0, Bytes::from(b.1.clone())).unwrap();
        assert!(
            cache.assembled(&refs, false).unwrap().is_none(),
            "not built yet"
        );
        let mut file = cache.assembled(&refs, true).unwrap().unwrap();
        assert!(cache.assembled(&refs, false).unwrap().is_some());
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut file, &mut bytes).unwrap();
        assert_eq!(bytes, [a.1.clone(), b.1.clone(), a.1.clone()].concat());
        // One pack of both chunks (with its table of two), and the file.
        let pack = 1000 + 500 + 2 * 44 + 12;
        assert_eq!(cache.evict().unwrap().bytes_before, pack + 2500);

        // Another process (a new cache on the same directory) hands out
        // nothing it has not checked; a file damaged since is made again.
        let path = fs::read_dir(dir.path().join("files"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut damaged = bytes.clone();
        damaged[1200] ^= 1;
        fs::write(&path, &damaged).unwrap();
        let other = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        assert!(
            other.assembled(&refs, false).unwrap().is_none(),
            "not checked here"
        );
        let mut file = other.assembled(&refs, true).unwrap().unwrap();
        let mut rebuilt = Vec::new();
        io::Read::read_to_end(&mut file, &mut rebuilt).unwrap();
        assert_eq!(rebuilt, bytes);
        assert!(other.assembled(&refs, false).unwrap().is_some());
    }

    #[test]
    fn pins_of_another_process_are_honoured_until_it_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let other = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        let cache = ChunkCache::open(dir.path(), 5000).unwrap();
        let (old, new) = (packed_chunk(1, 3000), packed_chunk(2, 3000));
        put_alone(&cache, &old.0, &old.1);
        age(&cache, &old.0, 1000);
        other.pin(&[old.0]);
        other.publish_pins().unwrap();
        put_alone(&cache, &new.0, &new.1);
        cache.evict().unwrap();
        assert!(cache.contains(&old.0), "pinned by the other cache");
        assert!(!cache.contains(&new.0), "the only chunk it could evict");
        // A pin file of a process that is gone counts for nothing.
        drop(other);
        // Its keeper thread may hold it a moment longer; its pin file goes with it.
        let ours = format!("{}-", std::process::id());
        for _ in 0..200 {
            let left = fs::read_dir(dir.path().join("pins"))
                .unwrap()
                .flatten()
                .any(|f| f.file_name().to_string_lossy().starts_with(&ours));
            if !left {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        fs::write(dir.path().join("pins/999999999-0"), old.0.as_bytes()).unwrap();
        put_alone(&cache, &new.0, &new.1);
        cache.evict().unwrap();
        assert!(!cache.contains(&old.0));
        assert!(!dir.path().join("pins/999999999-0").exists());
    }

    #[test]
    fn a_second_process_view_sees_what_the_first_wrote_at_its_next_scan() {
        let dir = tempfile::tempdir().unwrap();
        let a = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        let b = ChunkCache::open(dir.path(), 1 << 30).unwrap();
        let (id, data) = packed_chunk(9, 5000);
        put_alone(&a, &id, &data);
        // Published before b scans: bytes another process publishes during
        // a scan that already saw them count twice until the next scan.
        a.publish_usage().unwrap();
        b.refresh();
        assert_eq!(b.get(&id).unwrap(), data);
        assert_eq!(b.evict().unwrap().bytes_before, 5000);
        assert_eq!(b.approx_bytes(), 5000);
        // What the other evicts, this one forgets at its next look.
        fs::remove_file(pack_of(&a, &id)).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        b.refresh();
        assert!(!b.contains(&id));
        // A cache an older skiff left (a file per chunk) is cleared.
        fs::create_dir_all(dir.path().join("chunks/ab")).unwrap();
        fs::write(dir.path().join("chunks/ab/abcd"), b"old").unwrap();
        drop(ChunkCache::open(dir.path(), 1 << 30).unwrap());
        assert!(!dir.path().join("chunks").exists());
    }

    /// Bytes of packs under `root`.
    fn on_disk(root: &Path) -> u64 {
        walk_files(&root.join("packs"))
    }

    fn walk_files(dir: &Path) -> u64 {
        fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| match e.file_type() {
                        Ok(t) if t.is_dir() => walk_files(&e.path()),
                        _ => e.metadata().map_or(0, |m| m.len()),
                    })
                    .sum()
            })
            .unwrap_or(0)
    }

    #[test]
    fn the_bound_holds_for_three_processes_that_each_stay_under_it() {
        let dir = tempfile::tempdir().unwrap();
        let bound = 100_000;
        // Three caches on one directory, as three mount daemons have it;
        // each writes 60 KB, under the bound alone, 180 KB together.
        let caches: Vec<_> = (0..3)
            .map(|_| ChunkCache::open(dir.path(), bound).unwrap())
            .collect();
        for n in 0..12u8 {
            for (i, cache) in caches.iter().enumerate() {
                let (id, data) = chunk(n * 3 + i as u8, 5000);
                cache.put(&id, Bytes::from(data.clone())).unwrap();
            }
            std::thread::sleep(KEEPER_EVERY / 4);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while on_disk(dir.path()) > bound {
            assert!(
                std::time::Instant::now() < deadline,
                "{} bytes cached, bound {bound}",
                on_disk(dir.path())
            );
            std::thread::sleep(KEEPER_EVERY);
        }
    }
}
