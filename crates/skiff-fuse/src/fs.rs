//! The read-only file system the kernel talks to.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use skiff_format::{ChunkId, ChunkRef, InodeKind};

use crate::fetcher::{ChunkBytes, Fetcher};
use crate::handover::Negotiated;
use crate::journal::{OpenJournal, OpenRecord};
use crate::pool::WaitPool;
use crate::profile::Recorder;
use crate::stats::MountStats;
use crate::tree::{ImageTree, BLOCK_SIZE};

/// Images never change under a mount, so the kernel may keep names,
/// attributes and pages as long as it likes.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Largest read the kernel is asked to send (it grants at most its own limit).
const MAX_READ: u32 = 1 << 20;
/// Files at least this big whose chunks are all on this host are handed to
/// the kernel to read directly (passthrough); for smaller ones a copy of the
/// file is not worth its disk space.
const PASSTHROUGH_MIN: u64 = 256 * 1024;
/// Threads that assemble files for passthrough (disk-bound work).
const ASSEMBLY_THREADS: usize = 2;

/// An open file: its inode and the chunks it pins in the host's cache.
struct OpenFile {
    ino: INodeNo,
    pins: Vec<ChunkId>,
    /// The backing id the kernel reads it through, if passthrough.
    backing: Option<u32>,
}

/// The open handles, and the journal a successor replays (journal.rs).
#[derive(Default)]
struct OpenTable {
    files: HashMap<u64, OpenFile>,
    journal: Option<OpenJournal>,
}

impl OpenFile {
    fn record(&self) -> OpenRecord {
        OpenRecord {
            ino: self.ino.0,
            backing: self.backing,
        }
    }
}

impl OpenTable {
    fn records(&self) -> BTreeMap<u64, OpenRecord> {
        self.files
            .iter()
            .map(|(&fh, file)| (fh, file.record()))
            .collect()
    }
}

/// A backing file the kernel reads an inode's passthrough handles from.
enum Backing {
    Owned(Arc<BackingId>),
    /// Opened by the daemon this one took over from: still open in the
    /// kernel, wrapped at the next open of its inode (the reply that can).
    Inherited(u32),
}

/// How the open handles of one inode are served. The kernel refuses to mix
/// passthrough and cached opens of an inode, or two backing files for it
/// (the open fails with EIO): while any handle is open, every new one is
/// served the same way, through the same backing file.
struct InodeOpens {
    handles: usize,
    backing: Option<Backing>,
}

pub struct SkiffFs {
    tree: Arc<ImageTree>,
    fetcher: Arc<Fetcher>,
    /// Reads that must wait on the network are answered from here, so the
    /// kernel's requests never queue behind a slow server.
    network: WaitPool,
    /// Files assembled for passthrough, on threads of their own: a build
    /// writes and syncs a whole file, and reads must not queue behind it.
    assembly: WaitPool,
    /// Inodes opened at least once: a file is assembled for passthrough
    /// when it is opened again, not for a scan that reads everything once.
    opened_before: Mutex<HashSet<INodeNo>>,
    next_handle: AtomicU64,
    open: Mutex<OpenTable>,
    inodes: Mutex<HashMap<INodeNo, InodeOpens>>,
    /// Answer opens (see [`crate::MountOptions::answer_opens`]).
    answer_opens: bool,
    /// What INIT agreed (see [`crate::SessionState`]); shared with the
    /// [`crate::Mount`], which hands it to a successor.
    negotiated: Arc<Negotiated>,
    /// Notes what is read while a startup profile is recorded.
    recorder: Arc<Recorder>,
}

impl SkiffFs {
    pub fn new(
        tree: Arc<ImageTree>,
        fetcher: Arc<Fetcher>,
        options: &crate::MountOptions,
        recorder: Arc<Recorder>,
        negotiated: Arc<Negotiated>,
    ) -> io::Result<SkiffFs> {
        let network = WaitPool::new(options.network_threads, "fetch")?;
        let assembly = WaitPool::new(ASSEMBLY_THREADS, "assemble")?;
        Ok(SkiffFs {
            tree,
            fetcher,
            network,
            assembly,
            opened_before: Mutex::default(),
            next_handle: AtomicU64::new(1),
            open: Mutex::new(OpenTable::default()),
            inodes: Mutex::new(HashMap::new()),
            answer_opens: options.answer_opens,
            negotiated,
            recorder,
        })
    }

    /// Journals every open and release from now on, for a successor.
    pub fn with_journal(self, journal: OpenJournal) -> SkiffFs {
        self.open.lock().expect("open table poisoned").journal = Some(journal);
        self
    }

    /// Takes over the handles a predecessor's journal left open: their pins,
    /// and the way the kernel serves each inode.
    pub fn with_inherited_opens(
        self,
        opens: &BTreeMap<u64, OpenRecord>,
        generation: u32,
    ) -> SkiffFs {
        {
            let mut table = self.open.lock().expect("open table poisoned");
            let mut inodes = self.inodes.lock().expect("inode table poisoned");
            let passthrough = self.negotiated.passthrough.load(Ordering::Relaxed);
            let mut backing_inodes: HashMap<u32, INodeNo> = HashMap::new();
            for (&fh, record) in opens {
                let ino = INodeNo(record.ino);
                // A backing id belongs to one inode, and only to a passthrough connection.
                if let Some(id) = record.backing {
                    let owner = *backing_inodes.entry(id).or_insert(ino);
                    if !passthrough || owner != ino {
                        tracing::warn!("the journal's backing id {id} for inode {ino:?} is not one this connection can have; skipped");
                        continue;
                    }
                }
                let Some(InodeKind::File { chunks, .. }) = self.tree.inode(ino).map(|i| &i.kind)
                else {
                    tracing::warn!("the journal names inode {ino:?}, not a file of this image");
                    continue;
                };
                let pins: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
                self.fetcher.source().pin(&pins);
                let opens = inodes.entry(ino).or_insert(InodeOpens {
                    handles: 0,
                    backing: record.backing.map(Backing::Inherited),
                });
                opens.handles += 1;
                table.files.insert(
                    fh,
                    OpenFile {
                        ino,
                        pins,
                        backing: record.backing,
                    },
                );
            }
            // Above the handles of every daemon before (2^40 opens each).
            let next = opens.keys().max().map_or(1, |fh| fh + 1);
            let generation_start = u64::from(generation) << 40;
            self.next_handle
                .fetch_max(next.max(generation_start), Ordering::Relaxed);
        }
        self
    }

    /// A backing file for passthrough, when the kernel supports it and the
    /// whole file was assembled on this host; otherwise reads come through
    /// [`Filesystem::read`], and a file whose chunks are all here is
    /// assembled in the background for the next open.
    fn backing(&self, reply: &ReplyOpen, ino: INodeNo, chunks: &[ChunkRef]) -> Option<BackingId> {
        if !self.negotiated.passthrough.load(Ordering::Relaxed)
            || self.tree.attr(ino)?.size < PASSTHROUGH_MIN
        {
            return None;
        }
        let Some(file) = self.fetcher.source().assembled(chunks, false) else {
            let first_open = self
                .opened_before
                .lock()
                .expect("open log poisoned")
                .insert(ino);
            if first_open {
                return None;
            }
            // Checks a copy an earlier process made (its chunks may be long
            // evicted), or makes one if every chunk is here.
            let (fetcher, chunks) = (self.fetcher.clone(), chunks.to_vec());
            self.assembly.spawn(move || {
                fetcher.source().assembled(&chunks, true);
            });
            return None;
        };
        match reply.open_backing(&file) {
            Ok(id) => Some(id),
            Err(e) => {
                // A cache on a stacked file system, say: no passthrough then.
                tracing::info!("FUSE passthrough unavailable ({e}); reads go through skiff");
                self.negotiated.passthrough.store(false, Ordering::Relaxed);
                None
            }
        }
    }

    /// Undoes what an open of `ino` took: its pins and its count.
    fn forget_open(&self, ino: INodeNo, pins: &[ChunkId]) {
        self.fetcher.source().unpin(pins);
        let mut inodes = self.inodes.lock().expect("inode table poisoned");
        if let Some(opens) = inodes.get_mut(&ino) {
            opens.handles -= 1;
            if opens.handles == 0 {
                // The last handle is closed: its backing file goes too.
                inodes.remove(&ino);
            }
        }
    }

    fn attr(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        self.tree.attr(ino).ok_or(Errno::ENOENT)
    }
}

/// The predecessor's backing file `raw`, owned from now on (closed with
/// the inode's last handle).
#[allow(unsafe_code)]
fn adopt_backing(reply: &ReplyOpen, raw: u32) -> BackingId {
    // SAFETY: `raw` comes from the open-file journal of this connection: the
    // daemon before this one opened it on the same FUSE connection (the
    // supervisor hands over that very descriptor) and journalled its last
    // release, which closes it, before closing it. Only this inode's entry
    // holds it, and it is wrapped once.
    unsafe { reply.wrap_backing(raw) }
}

/// Answers a read with the bytes `offset..offset + len` of a file, from the
/// chunks that hold them (the first starting at `first_start`): a range
/// inside one chunk goes out as a slice of it, without a copy.
fn reply_with(reply: ReplyData, chunks: &[ChunkBytes], first_start: u64, offset: u64, len: usize) {
    let skip = (offset - first_start) as usize;
    match chunks.first() {
        Some(chunk) if skip + len <= chunk.len() => reply.data(&chunk[skip..skip + len]),
        _ => reply.data(&assemble(chunks, first_start, offset, len)),
    }
}

/// The bytes `offset..offset + len` of a file, cut from the chunks that hold them.
fn assemble(chunks: &[ChunkBytes], first_start: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut skip = (offset - first_start) as usize;
    for chunk in chunks {
        if out.len() == len {
            break;
        }
        let piece = chunk.get(skip.min(chunk.len())..).unwrap_or(&[]);
        let take = piece.len().min(len - out.len());
        out.extend_from_slice(&piece[..take]);
        skip = skip.saturating_sub(chunk.len());
    }
    out
}

impl Filesystem for SkiffFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Each capability on its own: an old kernel lacking one keeps the rest.
        for wanted in [
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
        ] {
            if config.add_capabilities(wanted).is_err() {
                tracing::debug!("the kernel lacks {wanted:?}");
            }
        }
        if let Err(max) = config.set_max_readahead(MAX_READ) {
            let _ = config.set_max_readahead(max);
        }
        if let Err(max) = config.set_max_write(MAX_READ) {
            let _ = config.set_max_write(max);
        }
        let kernel = config.capabilities();
        // Directories are listed whole from memory: an opendir and its
        // releasedir are two round trips for nothing.
        let no_opendir = kernel.contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        let no_open = !self.answer_opens && kernel.contains(InitFlags::FUSE_NO_OPEN_SUPPORT);
        // Passthrough with the backing files on a plain file system leaves
        // one level of stacking for an overlay on top (`skiff run`).
        // A recording mount must see every read, so it never hands files to
        // the kernel; nor can a mount that answers no opens.
        let passthrough = !no_open
            && !self.recorder.is_recording()
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        let negotiated = &self.negotiated;
        negotiated.passthrough.store(passthrough, Ordering::Relaxed);
        negotiated.no_open.store(no_open, Ordering::Relaxed);
        negotiated.no_opendir.store(no_opendir, Ordering::Relaxed);
        negotiated.resend.store(
            kernel.contains(InitFlags::FUSE_HAS_RESEND),
            Ordering::Relaxed,
        );
        // Readahead of many files at once (a container start) may all be in flight.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.tree.lookup(parent, name.as_bytes()) {
            Some(ino) => match self.attr(ino) {
                Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
                Err(e) => reply.error(e),
            },
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.tree.inode(ino).map(|i| &i.kind) {
            Some(InodeKind::Symlink { target }) => reply.data(target),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        MountStats::add(&self.fetcher.stats.opens, 1);
        // The kernel then opens this and every later file on its own, with
        // the page cache kept (the mount is read-only, and so is the image).
        if self.negotiated.no_open.load(Ordering::Relaxed) {
            return reply.error(Errno::ENOSYS);
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let Some(InodeKind::File { chunks, .. }) = self.tree.inode(ino).map(|i| &i.kind) else {
            return reply.error(Errno::ENOENT);
        };
        let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
        self.fetcher.source().pin(&ids);
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let backing = {
            let mut inodes = self.inodes.lock().expect("inode table poisoned");
            match inodes.get_mut(&ino) {
                Some(opens) => {
                    opens.handles += 1;
                    if let Some(Backing::Inherited(raw)) = opens.backing {
                        opens.backing = Some(Backing::Owned(Arc::new(adopt_backing(&reply, raw))));
                    }
                    match &opens.backing {
                        Some(Backing::Owned(id)) => Some(id.clone()),
                        _ => None,
                    }
                }
                None => {
                    let backing = self.backing(&reply, ino, chunks).map(Arc::new);
                    inodes.insert(
                        ino,
                        InodeOpens {
                            handles: 1,
                            backing: backing.clone().map(Backing::Owned),
                        },
                    );
                    backing
                }
            }
        };
        // In the table and the journal before the kernel hears of the
        // handle: its release may come at once, or this daemon may die.
        {
            let mut table = self.open.lock().expect("open table poisoned");
            let file = OpenFile {
                ino,
                pins: ids,
                backing: backing.as_ref().map(|id| id.raw()),
            };
            if let Some(journal) = &mut table.journal {
                if let Err(e) = journal.opened(handle, file.record()) {
                    // A successor would not know of this handle: refuse it.
                    tracing::error!("the open-file journal: {e}; refusing an open");
                    drop(table);
                    self.forget_open(ino, &file.pins);
                    return reply.error(Errno::EIO);
                }
            }
            table.files.insert(handle, file);
        }
        match backing {
            Some(id) => {
                MountStats::add(&self.fetcher.stats.passthrough_opens, 1);
                reply.opened_passthrough(FileHandle(handle), FopenFlags::empty(), &id);
            }
            None => reply.opened(FileHandle(handle), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    /// There is nothing to write back: ENOSYS tells the kernel to stop
    /// sending a flush at every close (a quarter of a cold walk's requests).
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let released = {
            let mut table = self.open.lock().expect("open table poisoned");
            let file = table.files.remove(&fh.0);
            // Journalled before its backing file is closed: a successor never
            // reuses a closed backing id.
            if file.is_some() {
                let live = table.files.len();
                let records = table
                    .journal
                    .as_ref()
                    .is_some_and(|j| j.wants_compaction(live))
                    .then(|| table.records());
                if let Some(journal) = &mut table.journal {
                    let written = match records {
                        Some(records) => journal
                            .released(fh.0)
                            .and_then(|()| journal.rewrite(&records)),
                        None => journal.released(fh.0),
                    };
                    if let Err(e) = written {
                        tracing::warn!("the open-file journal: {e}");
                    }
                }
            }
            file
        };
        if let Some(file) = released {
            self.forget_open(file.ino, &file.pins);
        }
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let started = Instant::now();
        let Some(span) = self.tree.span(ino, offset, u64::from(size)) else {
            return reply.error(Errno::EISDIR);
        };
        let len = span.len as usize;
        self.fetcher.stats.note_read_request();
        self.recorder
            .note(ino, span.first, span.chunks.len(), offset, span.len);
        // Reads going on in path order: fetch ahead of them, off this thread
        // (picking the window looks at the cache).
        if let Some(last) = span
            .chunks
            .last()
            .filter(|c| self.fetcher.read_ahead_due(ino.0, &c.id))
        {
            let (fetcher, id) = (self.fetcher.clone(), last.id);
            self.network.spawn(move || {
                if let Some(ahead) = fetcher.read_ahead(ino.0, &id) {
                    ahead.fetch();
                }
            });
        }
        // At hand without the network: answer on this thread.
        if let Some(chunks) = self.fetcher.all_cached(span.chunks) {
            self.fetcher.stats.record_read(len, started.elapsed());
            return reply_with(reply, &chunks, span.start, offset, len);
        }
        let (tree, fetcher) = (self.tree.clone(), self.fetcher.clone());
        let (first, count, start) = (span.first, span.chunks.len(), span.start);
        self.network.spawn(move || {
            let chunks = tree.chunks_from(ino, first);
            match fetcher.get(ino.0, first == 0, &chunks[..count.min(chunks.len())]) {
                Ok(chunks) => {
                    fetcher.stats.record_read(len, started.elapsed());
                    reply_with(reply, &chunks, start, offset, len);
                }
                Err(e) => {
                    MountStats::add(&fetcher.stats.failed_reads, 1);
                    tracing::error!("read of inode {} at {offset} failed: {}", ino.0, e.0);
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        MountStats::add(&self.fetcher.stats.opens, 1);
        // As for files: the kernel opens directories itself from then on,
        // and caches their listings.
        if self.negotiated.no_opendir.load(Ordering::Relaxed) {
            return reply.error(Errno::ENOSYS);
        }
        match self.tree.inode(ino).map(|i| &i.kind) {
            Some(InodeKind::Directory { .. }) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(listing) = listing(&self.tree, ino) else {
            return reply.error(Errno::ENOTDIR);
        };
        for (n, (child, name)) in listing.enumerate().skip(offset as usize) {
            let Some(attr) = self.tree.attr(child) else {
                continue;
            };
            if reply.add(child, n as u64 + 1, attr.kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(listing) = listing(&self.tree, ino) else {
            return reply.error(Errno::ENOTDIR);
        };
        for (n, (child, name)) in listing.enumerate().skip(offset as usize) {
            let Some(attr) = self.tree.attr(child) else {
                continue;
            };
            if reply.add(child, n as u64 + 1, name, &TTL, &attr, Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let index = self.tree.index();
        let blocks = index.logical_bytes().div_ceil(u64::from(BLOCK_SIZE));
        reply.statfs(
            blocks,
            0,
            0,
            index.inodes.len() as u64,
            0,
            BLOCK_SIZE,
            255,
            BLOCK_SIZE,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(inode) = self.tree.inode(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let found = inode
            .meta
            .xattrs
            .iter()
            .find(|x| x.name.as_slice() == name.as_bytes());
        match found {
            Some(x) => reply_sized(reply, &x.value, size),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(inode) = self.tree.inode(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut names = Vec::new();
        for x in &inode.meta.xattrs {
            names.extend_from_slice(&x.name);
            names.push(0);
        }
        reply_sized(reply, &names, size);
    }
}

/// A directory's entries as readdir lists them: "." and ".." first.
fn listing(tree: &ImageTree, dir: INodeNo) -> Option<impl Iterator<Item = (INodeNo, &OsStr)>> {
    let Some(InodeKind::Directory { entries }) = tree.inode(dir).map(|i| &i.kind) else {
        return None;
    };
    let dots = [(dir, OsStr::new(".")), (tree.parent(dir), OsStr::new(".."))];
    Some(
        dots.into_iter().chain(
            entries
                .iter()
                .map(|e| (INodeNo(e.ino), OsStr::from_bytes(&e.name))),
        ),
    )
}

/// The xattr protocol: size 0 asks how big the value is; too small a buffer is ERANGE.
fn reply_sized(reply: ReplyXattr, value: &[u8], size: u32) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_cut_from_the_chunks_that_hold_them() {
        let chunks: Vec<ChunkBytes> = vec![b"hello ".to_vec().into(), b"world".to_vec().into()];
        assert_eq!(assemble(&chunks, 0, 0, 11), b"hello world");
        assert_eq!(assemble(&chunks, 0, 4, 4), b"o wo");
        assert_eq!(assemble(&chunks[1..], 6, 8, 3), b"rld");
        assert_eq!(assemble(&chunks, 0, 10, 1), b"d");
    }
}
