//! The open-file journal: what a daemon's successor must know of the files
//! the kernel holds open on a mount it takes over.
//!
//! The kernel keeps an inode's open handles in one mode: all cached, or all
//! passthrough through one backing file (fs.rs, [`crate::fs`]). A successor
//! that answered a new open of such an inode another way would fail it, so
//! every open and release is appended here before the kernel hears of it,
//! and a successor replays the journal. A line torn by a crash is the last
//! one, and is skipped: its open was never answered, so the kernel sends it
//! again.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Appended records above which the journal is rewritten with only the live opens.
const COMPACT_AFTER: u64 = 64 * 1024;

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Entry {
    Open {
        fh: u64,
        ino: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backing: Option<u32>,
    },
    Release {
        fh: u64,
    },
}

/// A handle the kernel holds open: its inode and, if it reads through the
/// kernel (passthrough), the backing id of the file it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OpenRecord {
    pub ino: u64,
    pub backing: Option<u32>,
}

pub(crate) struct OpenJournal {
    path: PathBuf,
    file: File,
    appended: u64,
}

impl OpenJournal {
    /// A new, empty journal at `path` (a first mount).
    pub fn create(path: &Path) -> io::Result<OpenJournal> {
        let file = File::create(path)?;
        Ok(OpenJournal {
            path: path.to_owned(),
            file,
            appended: 0,
        })
    }

    /// The handles still open by the journal at `path` (a takeover), and
    /// the journal, compacted to them, to go on with.
    pub fn resume(path: &Path) -> io::Result<(OpenJournal, BTreeMap<u64, OpenRecord>)> {
        let open = match File::open(path) {
            Ok(file) => replay(BufReader::new(file))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        // Rewritten aside and renamed: a crash here leaves the old journal.
        let mut journal = OpenJournal {
            path: path.to_owned(),
            file: File::options().create(true).append(true).open(path)?,
            appended: 0,
        };
        journal.rewrite(&open)?;
        Ok((journal, open))
    }

    pub fn opened(&mut self, fh: u64, record: OpenRecord) -> io::Result<()> {
        self.append(&Entry::Open {
            fh,
            ino: record.ino,
            backing: record.backing,
        })
    }

    pub fn released(&mut self, fh: u64) -> io::Result<()> {
        self.append(&Entry::Release { fh })
    }

    /// Whether the journal has grown enough over its `live` handles to be rewritten.
    pub fn wants_compaction(&self, live: usize) -> bool {
        self.appended > COMPACT_AFTER && self.appended > 4 * live as u64
    }

    fn append(&mut self, entry: &Entry) -> io::Result<()> {
        let mut line = serde_json::to_vec(entry).map_err(io::Error::other)?;
        line.push(b'\n');
        // One write per record: a crash tears at most the last line.
        self.file.write_all(&line)?;
        self.appended += 1;
        Ok(())
    }

    /// Replaces the journal with one open record per live handle, atomically.
    pub fn rewrite<'a>(
        &mut self,
        live: impl IntoIterator<Item = (&'a u64, &'a OpenRecord)>,
    ) -> io::Result<()> {
        let temporary = self.path.with_extension("tmp");
        let mut out = io::BufWriter::new(File::create(&temporary)?);
        let mut count = 0;
        for (&fh, record) in live {
            count += 1;
            let entry = Entry::Open {
                fh,
                ino: record.ino,
                backing: record.backing,
            };
            serde_json::to_writer(&mut out, &entry).map_err(io::Error::other)?;
            out.write_all(b"\n")?;
        }
        out.into_inner().map_err(|e| e.into_error())?;
        std::fs::rename(&temporary, &self.path)?;
        self.file = File::options().append(true).open(&self.path)?;
        self.appended = count;
        Ok(())
    }
}

fn replay(input: impl BufRead) -> io::Result<BTreeMap<u64, OpenRecord>> {
    let mut open = BTreeMap::new();
    for line in input.lines() {
        let line = line?;
        let Ok(entry) = serde_json::from_str::<Entry>(&line) else {
            tracing::warn!("skipping a torn line of the open-file journal");
            continue;
        };
        match entry {
            Entry::Open { fh, ino, backing } => {
                open.insert(fh, OpenRecord { ino, backing });
            }
            Entry::Release { fh } => {
                open.remove(&fh);
            }
        }
    }
    Ok(open)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successor_sees_the_handles_still_open_and_a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opens");
        let mut journal = OpenJournal::create(&path).unwrap();
        let cached = OpenRecord {
            ino: 5,
            backing: None,
        };
        let passthrough = OpenRecord {
            ino: 9,
            backing: Some(3),
        };
        journal.opened(1, cached).unwrap();
        journal.opened(2, passthrough).unwrap();
        journal.opened(3, cached).unwrap();
        journal.released(1).unwrap();
        drop(journal);
        // A crash in the middle of a record.
        let mut file = File::options().append(true).open(&path).unwrap();
        file.write_all(br#"{"op":"release","f"#).unwrap();
        drop(file);

        let (mut journal, open) = OpenJournal::resume(&path).unwrap();
        assert_eq!(open, BTreeMap::from([(2, passthrough), (3, cached)]));
        // Compacted, and goes on.
        journal.released(2).unwrap();
        drop(journal);
        let (_, open) = OpenJournal::resume(&path).unwrap();
        assert_eq!(open, BTreeMap::from([(3, cached)]));
    }

    #[test]
    fn compaction_keeps_only_the_live_handles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opens");
        let mut journal = OpenJournal::create(&path).unwrap();
        let record = OpenRecord {
            ino: 2,
            backing: None,
        };
        let live = BTreeMap::from([(0, record)]);
        journal.opened(0, record).unwrap();
        for fh in 1..=COMPACT_AFTER {
            journal.opened(fh, record).unwrap();
            journal.released(fh).unwrap();
            if journal.wants_compaction(live.len()) {
                journal.rewrite(&live).unwrap();
            }
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count() as u64;
        assert!(lines < COMPACT_AFTER, "{lines} lines");
        drop(journal);
        assert_eq!(OpenJournal::resume(&path).unwrap().1, live);
    }
}
