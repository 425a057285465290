//! Store behaviour that end-to-end tests cannot reach precisely: what a
//! crash leaves on disk, and what an aborted writer takes back.

use std::fs;
use std::io::Write;

use rocksdb::WriteBatch;
use skiff_chunk::FrameBuilder;
use skiff_format::ChunkId;

use crate::layout::{pack_meta_key, CF_META};
use crate::{Store, StoreConfig, StoreError};

fn chunk(i: u8) -> Vec<u8> {
    vec![i; 10_000 + usize::from(i)]
}

/// Writes chunks `ids` as one frame and commits them.
fn write_chunks(store: &Store, ids: &[u8]) {
    let mut writer = store.pack_writer().unwrap();
    let mut builder = FrameBuilder::new(1 << 30, 3).unwrap();
    for &i in ids {
        assert!(builder
            .push(ChunkId::of(&chunk(i)), &chunk(i))
            .unwrap()
            .is_none());
    }
    writer.append(&builder.finish().unwrap().unwrap()).unwrap();
    writer.finish().unwrap();
}

fn pack_files(store: &Store) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(store.root().join("packs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn committed_chunks_read_back_verified() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), &StoreConfig::default()).unwrap();
    write_chunks(&store, &[1, 2, 3]);
    assert_eq!(store.read_chunk(&ChunkId::of(&chunk(2))).unwrap(), chunk(2));
    assert!(matches!(
        store.read_chunk(&ChunkId::of(b"absent")),
        Err(StoreError::ChunkNotFound(_))
    ));
    let stats = store.stats().unwrap();
    assert_eq!(stats.chunks, 3);
    assert_eq!(
        stats.chunk_bytes,
        (1..=3).map(|i| chunk(i).len() as u64).sum::<u64>()
    );
}

#[test]
fn a_dropped_writer_takes_back_everything() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), &StoreConfig::default()).unwrap();
    write_chunks(&store, &[1]);
    let before = pack_files(&store);
    {
        let mut writer = store.pack_writer().unwrap();
        let mut builder = FrameBuilder::new(1, 3).unwrap();
        let frame = builder
            .push(ChunkId::of(&chunk(9)), &chunk(9))
            .unwrap()
            .unwrap();
        writer.append(&frame).unwrap();
        writer.commit().unwrap();
        assert!(store.contains_chunk(&ChunkId::of(&chunk(9))).unwrap());
    } // dropped unfinished
    assert!(!store.contains_chunk(&ChunkId::of(&chunk(9))).unwrap());
    assert!(store.contains_chunk(&ChunkId::of(&chunk(1))).unwrap());
    assert_eq!(pack_files(&store), before);
}

#[test]
fn reopening_repairs_what_a_crash_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    {
        let store = Store::open_or_create(root, &StoreConfig::default()).unwrap();
        write_chunks(&store, &[1, 2]);
        // A pack registered with no file yet, as a writer killed mid-start leaves it.
        let mut batch = WriteBatch::default();
        batch.put_cf(store.cf(CF_META), pack_meta_key(77), 0u64.to_le_bytes());
        store.write_batch(batch).unwrap();
        assert!(
            store.stats().is_ok(),
            "stats must tolerate the missing empty pack"
        );
    }
    let packs = fs::read_dir(root.join("packs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let committed_len = fs::metadata(&packs).unwrap().len();
    // Bytes appended but never committed, and a pack the database never heard of.
    fs::OpenOptions::new()
        .append(true)
        .open(&packs)
        .unwrap()
        .write_all(b"torn frame")
        .unwrap();
    fs::write(root.join("packs/00000099.pack"), b"orphan").unwrap();

    let store = Store::open(root).unwrap();
    assert_eq!(fs::metadata(&packs).unwrap().len(), committed_len);
    assert!(!root.join("packs/00000099.pack").exists());
    assert!(!store.committed_packs().unwrap().contains_key(&77));
    let report = store.fsck(&|_| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.chunks, 2);
}

#[test]
fn a_second_writer_is_told_the_store_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let _writer = Store::open_or_create(dir.path(), &StoreConfig::default()).unwrap();
    assert!(matches!(Store::open(dir.path()), Err(StoreError::Busy(_))));
    // Readers still get in.
    assert!(Store::open_read_only(dir.path()).is_ok());
}

#[test]
fn gc_drops_unreferenced_chunks_and_shrinks_packs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), &StoreConfig::default()).unwrap();
    write_chunks(&store, &[1, 2]);
    let report = store.gc().unwrap();
    assert_eq!(report.chunks_removed, 2);
    assert_eq!(report.bytes_after, 0);
    assert!(pack_files(&store).is_empty());
    assert!(store.fsck(&|_| {}).unwrap().problems.is_empty());
}

#[test]
fn readers_ask_for_an_upgrade_that_a_writer_performs() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open_or_create(dir.path(), &StoreConfig::default()).unwrap();
        write_chunks(&store, &[1]);
    }
    {
        // A store from before the layer records existed.
        let mut db = rocksdb::DB::open_cf(
            &rocksdb::Options::default(),
            dir.path().join("db"),
            crate::layout::COLUMN_FAMILIES,
        )
        .unwrap();
        db.drop_cf(crate::layout::CF_LAYERS).unwrap();
    }
    let err = Store::open_read_only(dir.path()).expect_err("a reader cannot open it");
    assert!(
        err.to_string().contains("open it once for writing"),
        "{err}"
    );
    drop(Store::open(dir.path()).unwrap());
    let store = Store::open_read_only(dir.path()).unwrap();
    assert_eq!(store.read_chunk(&ChunkId::of(&chunk(1))).unwrap(), chunk(1));
}

#[test]
fn a_dropped_writer_keeps_what_it_persisted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), &StoreConfig::default()).unwrap();
    let frame = |ids: &[u8]| {
        let mut builder = FrameBuilder::new(1 << 30, 3).unwrap();
        for &i in ids {
            builder.push(ChunkId::of(&chunk(i)), &chunk(i)).unwrap();
        }
        builder.finish().unwrap().unwrap()
    };
    let mut writer = store.pack_writer().unwrap();
    writer.append(&frame(&[1, 2])).unwrap();
    writer.persist().unwrap();
    writer.append(&frame(&[3])).unwrap();
    writer.commit().unwrap();
    drop(writer);
    for (i, kept) in [(1, true), (2, true), (3, false)] {
        assert_eq!(
            store.contains_chunk(&ChunkId::of(&chunk(i))).unwrap(),
            kept,
            "chunk {i}"
        );
    }
    assert_eq!(store.read_chunk(&ChunkId::of(&chunk(2))).unwrap(), chunk(2));
    assert_eq!(pack_files(&store).len(), 1, "the persisted pack stays");
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert!(store.fsck(&|_| ()).unwrap().problems.is_empty());
}

#[test]
fn keep_committed_keeps_only_what_was_committed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), &StoreConfig::default()).unwrap();
    let frame = |i: u8| {
        let mut builder = FrameBuilder::new(1 << 30, 3).unwrap();
        builder.push(ChunkId::of(&chunk(i)), &chunk(i)).unwrap();
        builder.finish().unwrap().unwrap()
    };
    let mut writer = store.pack_writer().unwrap();
    writer.append(&frame(1)).unwrap();
    writer.commit().unwrap();
    writer.append(&frame(2)).unwrap();
    writer.keep_committed();
    assert!(store.contains_chunk(&ChunkId::of(&chunk(1))).unwrap());
    assert!(!store.contains_chunk(&ChunkId::of(&chunk(2))).unwrap());
    drop(store);
    // The uncommitted frame's bytes are cut off at the next open.
    let store = Store::open(dir.path()).unwrap();
    assert!(store.fsck(&|_| ()).unwrap().problems.is_empty());
    assert_eq!(store.read_chunk(&ChunkId::of(&chunk(1))).unwrap(), chunk(1));
}

/// A root holding one file `f` made of chunks `ids`, each said to be `len(i)` long.
fn one_file_index(ids: &[u8], len: impl Fn(u8) -> u32) -> skiff_format::ImageIndex {
    use skiff_format::{
        ChunkRef, ChunkingParams, DirEntry, ImageIndex, Inode, InodeKind, Metadata,
    };
    let chunks: Vec<ChunkRef> = ids
        .iter()
        .map(|&i| ChunkRef {
            id: ChunkId::of(&chunk(i)),
            len: len(i),
        })
        .collect();
    let meta = |mode| Metadata {
        mode,
        ..Metadata::default()
    };
    ImageIndex {
        chunking: ChunkingParams::default(),
        inodes: vec![
            Inode {
                meta: meta(0o755),
                kind: InodeKind::Directory {
                    entries: vec![DirEntry {
                        name: b"f".to_vec(),
                        ino: 2,
                    }],
                },
            },
            Inode {
                meta: meta(0o644),
                kind: InodeKind::File {
                    size: chunks.iter().map(|c| u64::from(c.len)).sum(),
                    chunks,
                },
            },
        ],
    }
}

#[test]
fn an_index_whose_chunk_lengths_disagree_with_the_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_or_create(dir.path(), &StoreConfig::default()).unwrap();
    write_chunks(&store, &[1, 2]);
    let true_len = |i: u8| chunk(i).len() as u32;
    let good = one_file_index(&[1, 2], true_len);
    store.put_index(&good.encode()).unwrap();
    // One byte more for chunk 2: a tar header written from it would lie.
    let lying = one_file_index(&[1, 2], |i| true_len(i) + u32::from(i == 2));
    let refused = store.put_index(&lying.encode()).unwrap_err();
    assert!(
        matches!(refused, StoreError::ChunkLength { claimed, stored, .. } if claimed == stored + 1),
        "{refused}"
    );
    assert!(!store
        .contains_index(&skiff_format::IndexDigest::of(&lying.encode()))
        .unwrap());
}

#[test]
fn only_the_creator_of_an_unused_store_may_remove_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let (store, created) = Store::open_or_create_new(&root, &StoreConfig::default()).unwrap();
    assert!(created);
    // A reader has it open: it stays.
    let reader = Store::open_read_only(&root).unwrap();
    assert!(!store.remove_if_unused().unwrap());
    drop(reader);
    assert!(root.join("skiff-store.json").exists());

    let (store, created) = Store::open_or_create_new(&root, &StoreConfig::default()).unwrap();
    assert!(!created, "the second opener did not create it");
    write_chunks(&store, &[1]);
    let index = one_file_index(&[1], |i| chunk(i).len() as u32);
    let encoded = index.encode();
    let manifest = skiff_format::ImageManifest {
        schema_version: skiff_format::MANIFEST_SCHEMA_VERSION,
        name: "x".into(),
        tag: "latest".into(),
        index: skiff_format::IndexDescriptor {
            digest: skiff_format::IndexDigest::of(&encoded),
            size: encoded.len() as u64,
            files: index.file_count(),
            logical_bytes: index.logical_bytes(),
        },
        chunking: index.chunking,
        source: skiff_format::SourceInfo {
            manifest_digest: String::new(),
            config_digest: String::new(),
            platform: "linux/amd64".into(),
            layers: 1,
            diff_ids: Vec::new(),
        },
        config: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
        profile: None,
    };
    store.put_image(&manifest, &index, &[]).unwrap();
    // It holds an image now: it stays too.
    assert!(!store.remove_if_unused().unwrap());
    assert!(root.join("skiff-store.json").exists());

    let empty = dir.path().join("empty");
    let (store, _) = Store::open_or_create_new(&empty, &StoreConfig::default()).unwrap();
    assert!(store.remove_if_unused().unwrap());
    assert!(!empty.exists());
}
