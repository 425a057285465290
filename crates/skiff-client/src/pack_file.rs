//! The host cache's pack files: many chunks in one file, so a fetch of a
//! window of chunks costs one file creation, not one per 64 KiB chunk.
//!
//! ```text
//! pack  := data | entry* | count u32 LE | MAGIC
//! entry := id[32] | offset u64 LE | len u32 LE      (offset into data)
//! ```
//!
//! A pack is written whole, aside, and renamed into place, and never
//! changed after. Its name is the BLAKE3 of its table, so two processes
//! that write the same chunks make the same file. The table says where
//! each chunk is; what it says is trusted only as far as the bytes found
//! there hash to the chunk's id.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::time::Instant;

use bytes::Bytes;
use skiff_format::ChunkId;

const MAGIC: &[u8; 8] = b"skiffcp1";
const ENTRY_LEN: usize = 32 + 8 + 4;
const FOOTER_LEN: usize = 4 + MAGIC.len();

/// Where a chunk lies in a pack's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: ChunkId,
    pub offset: u64,
    pub len: u32,
}

/// Chunks waiting to be written as one pack. They are held as they came
/// (slices of the frames they were decoded from) and written with one
/// vectored write, not copied into a buffer first.
#[derive(Default)]
pub struct PendingPack {
    chunks: Vec<Bytes>,
    entries: Vec<Entry>,
    /// Positions in `entries`.
    by_id: HashMap<ChunkId, usize>,
    bytes: usize,
    since: Option<Instant>,
}

impl PendingPack {
    pub fn push(&mut self, id: ChunkId, chunk: Bytes) {
        self.since.get_or_insert_with(Instant::now);
        self.by_id.insert(id, self.entries.len());
        self.entries.push(Entry {
            id,
            offset: self.bytes as u64,
            len: u32::try_from(chunk.len()).expect("a chunk is far below 4 GiB"),
        });
        self.bytes += chunk.len();
        self.chunks.push(chunk);
    }

    pub fn get(&self, id: &ChunkId) -> Option<&Bytes> {
        self.chunks.get(*self.by_id.get(id)?)
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// When the oldest chunk waiting arrived.
    pub fn since(&self) -> Option<Instant> {
        self.since
    }

    /// The pack, ready to be written.
    pub fn encode(self) -> EncodedPack {
        let PendingPack {
            mut chunks,
            entries,
            ..
        } = self;
        let mut tail = Vec::with_capacity(entries.len() * ENTRY_LEN + FOOTER_LEN);
        for entry in &entries {
            tail.extend_from_slice(entry.id.as_bytes());
            tail.extend_from_slice(&entry.offset.to_le_bytes());
            tail.extend_from_slice(&entry.len.to_le_bytes());
        }
        let name = blake3::hash(&tail).to_hex()[..32].to_owned();
        let count = u32::try_from(entries.len()).expect("a pack holds far fewer than 4G chunks");
        tail.extend_from_slice(&count.to_le_bytes());
        tail.extend_from_slice(MAGIC);
        chunks.push(Bytes::from(tail));
        EncodedPack {
            name,
            parts: chunks,
            entries,
        }
    }
}

/// A pack's file name (the BLAKE3 of its table), its bytes in parts (the
/// chunks, then table and footer), and its table.
pub struct EncodedPack {
    pub name: String,
    parts: Vec<Bytes>,
    pub entries: Vec<Entry>,
}

impl EncodedPack {
    pub fn len(&self) -> u64 {
        self.parts.iter().map(|p| p.len() as u64).sum()
    }

    /// Writes the whole pack to `out` in as few vectored writes as it takes.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = self.parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut slices = &mut slices[..];
        while !slices.is_empty() {
            match out.write_vectored(slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The table of the pack in `file`; `None` if the file is not a whole pack
/// (a foreign file, or a table that points outside the data).
pub fn read_table(file: &File) -> io::Result<Option<Vec<Entry>>> {
    let len = file.metadata()?.len();
    if len < FOOTER_LEN as u64 {
        return Ok(None);
    }
    let mut footer = [0u8; FOOTER_LEN];
    file.read_exact_at(&mut footer, len - FOOTER_LEN as u64)?;
    if &footer[4..] != MAGIC {
        return Ok(None);
    }
    let count = u32::from_le_bytes(footer[..4].try_into().expect("4 bytes")) as u64;
    let Some(table_len) = count
        .checked_mul(ENTRY_LEN as u64)
        .filter(|&t| t + FOOTER_LEN as u64 <= len)
    else {
        return Ok(None);
    };
    let data_len = len - FOOTER_LEN as u64 - table_len;
    let mut table = vec![0u8; table_len as usize];
    file.read_exact_at(&mut table, data_len)?;
    let entries: Option<Vec<Entry>> = table
        .chunks_exact(ENTRY_LEN)
        .map(|raw| {
            let id = ChunkId::from_slice(&raw[..32]).ok()?;
            let offset = u64::from_le_bytes(raw[32..40].try_into().ok()?);
            let len = u32::from_le_bytes(raw[40..44].try_into().ok()?);
            (offset.checked_add(u64::from(len))? <= data_len).then_some(Entry { id, offset, len })
        })
        .collect();
    Ok(entries)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_pack_reads_back_its_table_and_a_torn_one_is_refused() {
        let mut pending = PendingPack::default();
        let chunks: Vec<Vec<u8>> = (0..3u8).map(|n| vec![n; 1000 + usize::from(n)]).collect();
        for chunk in &chunks {
            pending.push(ChunkId::of(chunk), Bytes::from(chunk.clone()));
        }
        assert_eq!(
            pending.get(&ChunkId::of(&chunks[1])).unwrap(),
            &chunks[1][..]
        );
        let pack = pending.encode();
        assert_eq!(pack.name.len(), 32);
        let mut bytes = Vec::new();
        pack.write_to(&mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, pack.len());
        let (name, entries) = (pack.name, pack.entries);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(&name);
        std::fs::write(&path, &bytes).unwrap();
        let table = read_table(&File::open(&path).unwrap()).unwrap().unwrap();
        assert_eq!(table, entries);
        for (entry, chunk) in table.iter().zip(&chunks) {
            let mut data = vec![0u8; entry.len as usize];
            File::open(&path)
                .unwrap()
                .read_exact_at(&mut data, entry.offset)
                .unwrap();
            assert_eq!(&data, chunk);
        }
        // Cut short, or with a table that points past the data: not a pack.
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(read_table(&File::open(&path).unwrap()).unwrap(), None);
        let mut lying = bytes.clone();
        let first_entry = bytes.len() - FOOTER_LEN - 3 * ENTRY_LEN;
        lying[first_entry + 32..first_entry + 40].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &lying).unwrap();
        assert_eq!(read_table(&File::open(&path).unwrap()).unwrap(), None);
    }
}
