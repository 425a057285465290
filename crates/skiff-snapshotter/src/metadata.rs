//! The snapshots a snapshotter holds, with containerd's rules for them,
//! kept in one JSON file written aside and renamed on every change.
//!
//! ```text
//! ROOT/metadata.json         every snapshot: id, kind, parent, labels, times, usage
//! ROOT/snapshots/ID/fs       its files (an upper dir; for a committed layer, the layer)
//! ROOT/snapshots/ID/work     overlayfs' work dir
//! ```
//! Directories are made before the snapshot is recorded and removed after
//! it is forgotten, so a crash leaves at most an orphan directory, which
//! Cleanup removes.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use skiff_agent::{ImageArg, Lease};

use crate::error::{Result, SnapshotError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// Bytes and inodes a snapshot's own directory holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: u64,
    pub kind: Kind,
    /// The committed snapshot under this one ("" for none).
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// Measured when committed.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// A layer of a skiff image: its files are this lazy mount, not a directory here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteLayer>,
}

/// A committed snapshot that is a lazy mount of a skiff image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// The image, `docker://HOST/REPO@sha256:…` (its artifact).
    pub image: ImageArg,
    /// The snapshot's hold on the mount; none until a snapshot on it
    /// first needs it (an attached artifact's layer prefix). Left out
    /// when none, so a snapshotter from before it reads the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
}

#[derive(Clone, Default, Serialize, Deserialize)]
struct Saved {
    next_id: u64,
    snapshots: BTreeMap<String, Snapshot>,
}

/// All snapshots, by key (active and view) or name (committed).
pub struct Metadata {
    root: PathBuf,
    saved: Saved,
    /// Held while open: one snapshotter per root.
    _lock: File,
}

impl Metadata {
    /// Opens (or starts) the metadata under `root`.
    pub fn open(root: &Path) -> Result<Metadata> {
        // Layers hold setuid binaries and device nodes: no other user may
        // reach them, as with containerd's own snapshotters.
        for dir in [root.to_owned(), root.join("snapshots")] {
            skiff_agent::host::create_private_dir(&dir)
                .map_err(|e| SnapshotError::io(format!("creating {}", dir.display()), e))?;
        }
        let lock_path = root.join(".lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| SnapshotError::io(format!("opening {}", lock_path.display()), e))?;
        lock.try_lock().map_err(|_| {
            SnapshotError::FailedPrecondition(format!(
                "another snapshotter uses {}",
                root.display()
            ))
        })?;
        let path = root.join("metadata.json");
        let mut saved = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| SnapshotError::Corrupt(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
            Err(e) => return Err(SnapshotError::io(format!("reading {}", path.display()), e)),
        };
        let mut metadata = Metadata {
            root: root.to_owned(),
            saved: Saved::default(),
            _lock: lock,
        };
        // A crash between making a directory and saving its record leaves
        // the directory: its id is never given out again.
        let highest_dir = metadata
            .snapshot_dirs()
            .into_iter()
            .filter_map(|(id, _)| id)
            .max();
        saved.next_id = saved.next_id.max(highest_dir.unwrap_or(0));
        metadata.saved = saved;
        Ok(metadata)
    }

    /// Applies `change` to a copy and keeps it only once it is saved, so a
    /// failed save (a full disk) changes nothing.
    fn change<T>(&mut self, change: impl FnOnce(&mut Saved) -> Result<T>) -> Result<T> {
        let mut next = self.saved.clone();
        let value = change(&mut next)?;
        let path = self.root.join("metadata.json");
        let json = serde_json::to_vec(&next)
            .map_err(|e| SnapshotError::Corrupt(format!("encoding the metadata: {e}")))?;
        skiff_agent::write_atomically(&path, &json)?;
        self.saved = next;
        Ok(value)
    }

    /// The entries of `ROOT/snapshots`, with the id each is named by (if any).
    fn snapshot_dirs(&self) -> Vec<(Option<u64>, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(self.root.join("snapshots")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_str().and_then(|n| n.parse().ok()),
                    e.path(),
                )
            })
            .collect()
    }

    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    pub fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    pub fn work_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }

    pub fn get(&self, key: &str) -> Result<&Snapshot> {
        self.saved
            .snapshots
            .get(key)
            .ok_or_else(|| SnapshotError::NotFound(key.to_owned()))
    }

    pub fn all(&self) -> impl Iterator<Item = (&String, &Snapshot)> {
        self.saved.snapshots.iter()
    }

    /// The committed snapshots under `key`, nearest first.
    pub fn parents(&self, key: &str) -> Result<Vec<&Snapshot>> {
        let chain = self.chain(&self.get(key)?.parent)?;
        Ok(chain.into_iter().map(|(_, snapshot)| snapshot).collect())
    }

    /// The snapshot `name` and the committed ones under it, nearest first,
    /// with their names ("" is none).
    pub fn chain<'a>(&'a self, name: &'a str) -> Result<Vec<(&'a str, &'a Snapshot)>> {
        let mut chain = Vec::new();
        let mut name = name;
        while !name.is_empty() {
            let snapshot = self.get(name)?;
            chain.push((name, snapshot));
            if chain.len() > self.saved.snapshots.len() {
                return Err(SnapshotError::Corrupt(format!(
                    "{name}'s parents form a loop"
                )));
            }
            name = snapshot.parent.as_str();
        }
        Ok(chain)
    }

    /// containerd's rules for a new snapshot `key` on `parent`: a key not
    /// taken, on a committed parent or none.
    fn check_new(&self, key: &str, parent: &str) -> Result<()> {
        if key.is_empty() {
            return Err(SnapshotError::InvalidArgument("an empty key".into()));
        }
        if self.saved.snapshots.contains_key(key) {
            return Err(SnapshotError::AlreadyExists(key.to_owned()));
        }
        if !parent.is_empty() && self.get(parent)?.kind != Kind::Committed {
            return Err(SnapshotError::InvalidArgument(format!(
                "parent {parent} is not a committed snapshot"
            )));
        }
        Ok(())
    }

    /// Records a new active or view snapshot on `parent` (committed, or "").
    pub fn create(
        &mut self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Snapshot> {
        self.check_new(key, parent)?;
        let id = self.saved.next_id + 1;
        for dir in [self.dir(id), self.fs_dir(id), self.work_dir(id)] {
            // Not create_dir_all: a directory already there is someone else's.
            std::fs::create_dir(&dir)
                .map_err(|e| SnapshotError::io(format!("creating {}", dir.display()), e))?;
        }
        let now = SystemTime::now();
        let snapshot = Snapshot {
            id,
            kind,
            parent: parent.to_owned(),
            labels,
            created: now,
            updated: now,
            usage: None,
            remote: None,
        };
        let recorded = self.change(|saved| {
            saved.next_id = id;
            saved.snapshots.insert(key.to_owned(), snapshot.clone());
            Ok(())
        });
        if let Err(e) = recorded {
            let _ = std::fs::remove_dir_all(self.dir(id));
            return Err(e);
        }
        Ok(snapshot)
    }

    /// Records the committed snapshot `name` on `parent` whose files are `remote`'s mount.
    pub fn create_remote(
        &mut self,
        name: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        remote: RemoteLayer,
    ) -> Result<Snapshot> {
        self.check_new(name, parent)?;
        let id = self.saved.next_id + 1;
        let now = SystemTime::now();
        let snapshot = Snapshot {
            id,
            kind: Kind::Committed,
            parent: parent.to_owned(),
            labels,
            created: now,
            updated: now,
            // Nothing of it is on this disk.
            usage: Some(Usage::default()),
            remote: Some(remote),
        };
        self.change(|saved| {
            saved.next_id = id;
            saved.snapshots.insert(name.to_owned(), snapshot.clone());
            Ok(snapshot)
        })
    }

    /// Replaces the lease of the remote snapshot `name` (its mount was made again).
    pub fn set_lease(&mut self, name: &str, lease: Lease) -> Result<()> {
        let mut snapshot = self.get(name)?.clone();
        let Some(remote) = snapshot.remote.as_mut() else {
            return Err(SnapshotError::FailedPrecondition(format!(
                "{name} is not a remote snapshot"
            )));
        };
        remote.lease = Some(lease);
        self.change(|saved| {
            saved.snapshots.insert(name.to_owned(), snapshot);
            Ok(())
        })
    }

    /// Turns the active snapshot `key` into the committed `name`.
    pub fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        usage: Usage,
    ) -> Result<()> {
        if self.saved.snapshots.contains_key(name) {
            return Err(SnapshotError::AlreadyExists(name.to_owned()));
        }
        let active = self.get(key)?;
        if active.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition(format!(
                "{key} is not an active snapshot"
            )));
        }
        let mut snapshot = active.clone();
        snapshot.kind = Kind::Committed;
        snapshot.labels = labels;
        snapshot.usage = Some(usage);
        snapshot.updated = SystemTime::now();
        self.change(|saved| {
            saved.snapshots.remove(key);
            saved.snapshots.insert(name.to_owned(), snapshot);
            Ok(())
        })
    }

    /// Forgets `key` and returns it; its directory is the caller's to remove.
    pub fn remove(&mut self, key: &str) -> Result<Snapshot> {
        self.get(key)?;
        if let Some((child, _)) = self.all().find(|(_, s)| s.parent == key) {
            return Err(SnapshotError::FailedPrecondition(format!(
                "{key} has a child snapshot ({child})"
            )));
        }
        self.change(|saved| {
            saved
                .snapshots
                .remove(key)
                .ok_or_else(|| SnapshotError::NotFound(key.to_owned()))
        })
    }

    /// Sets `key`'s labels as containerd's field paths say: none or
    /// `labels` replace them all, `labels.NAME` sets or removes one.
    pub fn update_labels(
        &mut self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Snapshot> {
        let mut snapshot = self.get(key)?.clone();
        let mut updated = snapshot.labels.clone();
        if paths.is_empty() || paths.iter().any(|p| p == "labels") {
            updated = labels;
        } else {
            for path in paths {
                let Some(name) = path.strip_prefix("labels.") else {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "cannot update the field {path:?}"
                    )));
                };
                match labels.get(name) {
                    Some(value) => updated.insert(name.to_owned(), value.clone()),
                    None => updated.remove(name),
                };
            }
        }
        snapshot.labels = updated;
        snapshot.updated = SystemTime::now();
        self.change(|saved| {
            saved.snapshots.insert(key.to_owned(), snapshot.clone());
            Ok(snapshot)
        })
    }

    /// Snapshot directories no snapshot owns (left by a crash).
    pub fn orphan_dirs(&self) -> Vec<PathBuf> {
        let owned: std::collections::BTreeSet<u64> = self.all().map(|(_, s)| s.id).collect();
        self.snapshot_dirs()
            .into_iter()
            .filter(|(id, _)| id.is_none_or(|id| !owned.contains(&id)))
            .map(|(_, path)| path)
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    pub(crate) fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn snapshots_follow_containerds_rules_and_survive_a_reopen() {
        let root = tempfile::tempdir().unwrap();
        let mut meta = Metadata::open(root.path()).unwrap();
        meta.create(Kind::Active, "a", "", BTreeMap::new()).unwrap();
        // Not on an active parent, not twice.
        assert!(matches!(
            meta.create(Kind::Active, "b", "a", BTreeMap::new()),
            Err(SnapshotError::InvalidArgument(_))
        ));
        assert!(matches!(
            meta.create(Kind::View, "a", "", BTreeMap::new()),
            Err(SnapshotError::AlreadyExists(_))
        ));
        meta.commit("layer1", "a", labels(&[("x", "1")]), Usage::default())
            .unwrap();
        assert!(matches!(meta.get("a"), Err(SnapshotError::NotFound(_))));
        meta.create(Kind::Active, "b", "layer1", BTreeMap::new())
            .unwrap();
        assert_eq!(meta.parents("b").unwrap()[0].labels, labels(&[("x", "1")]));
        // A parent with a child stays.
        assert!(matches!(
            meta.remove("layer1"),
            Err(SnapshotError::FailedPrecondition(_))
        ));
        drop(meta);

        let mut meta = Metadata::open(root.path()).unwrap();
        assert_eq!(meta.get("layer1").unwrap().kind, Kind::Committed);
        assert_eq!(meta.get("b").unwrap().parent, "layer1");
        let b = meta.remove("b").unwrap();
        std::fs::remove_dir_all(meta.dir(b.id)).unwrap();
        meta.remove("layer1").unwrap();
        // layer1's directory is still there: an orphan.
        assert_eq!(meta.orphan_dirs().len(), 1);
    }

    #[test]
    fn a_directory_left_by_a_crash_is_never_handed_out_again_and_one_root_has_one_owner() {
        let root = tempfile::tempdir().unwrap();
        let meta = Metadata::open(root.path()).unwrap();
        assert!(matches!(
            Metadata::open(root.path()),
            Err(SnapshotError::FailedPrecondition(_))
        ));
        // As a crash after the directory and before the record leaves it.
        std::fs::create_dir_all(meta.fs_dir(1)).unwrap();
        drop(meta);
        let mut meta = Metadata::open(root.path()).unwrap();
        let snapshot = meta.create(Kind::Active, "a", "", BTreeMap::new()).unwrap();
        assert_eq!(snapshot.id, 2);
        assert_eq!(meta.orphan_dirs(), vec![meta.dir(1)]);
        let mode = std::fs::metadata(root.path().join("snapshots"))
            .unwrap()
            .permissions();
        assert_eq!(mode.mode() & 0o777, 0o700);
    }

    #[test]
    fn a_remote_snapshot_is_committed_with_its_lease_and_no_directory() {
        let root = tempfile::tempdir().unwrap();
        let mut meta = Metadata::open(root.path()).unwrap();
        let digest = format!("sha256:{}", "0".repeat(64));
        let remote = |mountpoint: &str| RemoteLayer {
            image: format!("docker://h.io/app@{digest}").parse().unwrap(),
            lease: Some(Lease {
                holder: "snapshot:o:chain".into(),
                mountpoint: mountpoint.into(),
                process: None,
                owned: true,
            }),
        };
        meta.create(Kind::Active, "a", "", BTreeMap::new()).unwrap();
        // Only on a committed parent, never over another snapshot.
        assert!(matches!(
            meta.create_remote("chain", "a", BTreeMap::new(), remote("/m")),
            Err(SnapshotError::InvalidArgument(_))
        ));
        meta.create_remote("chain", "", labels(&[("l", "1")]), remote("/m"))
            .unwrap();
        assert!(matches!(
            meta.create_remote("chain", "", BTreeMap::new(), remote("/m")),
            Err(SnapshotError::AlreadyExists(_))
        ));
        let snapshot = meta.get("chain").unwrap();
        assert_eq!(snapshot.kind, Kind::Committed);
        assert!(!meta.dir(snapshot.id).exists());
        // A snapshot on it, then its lease moves (made again) and survives a reopen.
        meta.create(Kind::Active, "c", "chain", BTreeMap::new())
            .unwrap();
        let lease = |mountpoint| remote(mountpoint).lease.unwrap();
        meta.set_lease("chain", lease("/m2")).unwrap();
        assert!(meta.set_lease("c", lease("/x")).is_err());
        drop(meta);
        let mut meta = Metadata::open(root.path()).unwrap();
        assert_eq!(meta.get("chain").unwrap().remote, Some(remote("/m2")));
        meta.remove("c").unwrap();
        assert_eq!(meta.remove("chain").unwrap().remote, Some(remote("/m2")));
    }

    #[test]
    fn labels_update_by_field_path() {
        let root = tempfile::tempdir().unwrap();
        let mut meta = Metadata::open(root.path()).unwrap();
        meta.create(
            Kind::Active,
            "a",
            "",
            labels(&[("keep", "1"), ("drop", "2")]),
        )
        .unwrap();
        let s = meta
            .update_labels(
                "a",
                labels(&[("new", "3")]),
                &["labels.new".into(), "labels.drop".into()],
            )
            .unwrap();
        assert_eq!(s.labels, labels(&[("keep", "1"), ("new", "3")]));
        let s = meta
            .update_labels("a", labels(&[("only", "4")]), &[])
            .unwrap();
        assert_eq!(s.labels, labels(&[("only", "4")]));
        assert!(matches!(
            meta.update_labels("a", BTreeMap::new(), &["parent".into()]),
            Err(SnapshotError::InvalidArgument(_))
        ));
    }
}
