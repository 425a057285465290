//! The snapshots themselves, with overlayfs semantics: a committed snapshot
//! is a directory holding one layer, an active one is an upper dir over its
//! parents, and the mounts containerd gets stack them.

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use crate::api::types::Mount;
use crate::error::{Result, SnapshotError};
use crate::metadata::{Kind, Metadata, RemoteLayer, Snapshot, Usage};
use crate::metrics::Metrics;
use crate::remote::{is_live, AttachedLayer, LazyMounts, SkiffLayer, REMOTE_LABEL, TARGET_LABEL};

/// A snapshot as containerd sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Info {
    pub name: String,
    pub snapshot: Snapshot,
}

pub struct Snapshotter {
    metadata: Mutex<Metadata>,
    /// Without it, skiff images' layers are unpacked as any others.
    lazy: Option<LazyMounts>,
    /// Held for a snapshot's name while its remote snapshot or lazy mount
    /// is made or let go: two pulls of one image make one, and a slow
    /// registry for one image holds up no other.
    remote_locks: NameLocks,
    metrics: Arc<Metrics>,
}

impl Snapshotter {
    pub fn open(root: &Path, lazy: Option<LazyMounts>) -> Result<Snapshotter> {
        let metadata = Metadata::open(root)?;
        if let Some(lazy) = &lazy {
            lazy.sweep(|name, lease| holds_lease(&metadata, name, lease));
        }
        Ok(Snapshotter {
            metadata: Mutex::new(metadata),
            lazy,
            remote_locks: NameLocks::default(),
            metrics: Metrics::new(),
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The metrics in Prometheus' text format, with the snapshots held now.
    pub fn render_metrics(&self) -> String {
        let mut held = [("active", 0), ("view", 0), ("committed", 0), ("remote", 0)];
        for (_, snapshot) in self.metadata().all() {
            let at = match (snapshot.kind, &snapshot.remote) {
                (_, Some(_)) => 3,
                (Kind::Active, None) => 0,
                (Kind::View, None) => 1,
                (Kind::Committed, None) => 2,
            };
            held[at].1 += 1;
        }
        self.metrics.render(&held)
    }

    fn metadata(&self) -> std::sync::MutexGuard<'_, Metadata> {
        // A panic mid-call leaves the metadata as it was saved last.
        self.metadata
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new active (`Kind::Active`) or read-only (`Kind::View`) snapshot on `parent`.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.ensure_remote_mount(parent)?;
        let mut metadata = self.metadata();
        metadata.create(kind, key, parent, labels)?;
        mounts_of(&metadata, key)
    }

    /// An active snapshot for `key`, or, for the layer of a skiff image
    /// being unpacked, its committed remote snapshot, answered
    /// `AlreadyExists` so containerd fetches nothing.
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if let Some(layer) = SkiffLayer::from_labels(&labels)? {
            if let Some(lazy) = &self.lazy {
                self.commit_remote(lazy, &layer, parent, labels)?;
                return Err(SnapshotError::AlreadyExists(layer.target));
            }
            tracing::warn!(
                "{} is a skiff image: unpacking its launcher, as lazy mounts are off",
                layer.image
            );
        } else if let (Some(lazy), Some(layer)) = (&self.lazy, AttachedLayer::from_labels(&labels))
        {
            if self.metadata().get(&layer.target).is_ok() {
                return Err(SnapshotError::AlreadyExists(layer.target));
            }
            // An image without an artifact for this layer unpacks as any other.
            match lazy.find_attached(&layer, &self.chain_id_of(parent)) {
                Ok(Some(image)) => {
                    self.metrics.attached_lookup("found");
                    self.commit_attached(&layer.target, image, parent, labels)?;
                    return Err(SnapshotError::AlreadyExists(layer.target));
                }
                Ok(None) => self.metrics.attached_lookup("none"),
                Err(e) => {
                    self.metrics.attached_lookup("refused");
                    tracing::warn!(
                        "unpacking {} of {}: its attached skiff artifact is refused: {e}",
                        layer.target,
                        layer.subject
                    );
                }
            }
        }
        self.create(Kind::Active, key, parent, labels)
    }

    /// The chain id of the committed snapshot `name` ("" for none):
    /// containerd names snapshots it unpacked itself NAMESPACE/N/CHAIN and
    /// keeps the chain id in their `containerd.io/snapshot.ref` label.
    fn chain_id_of(&self, name: &str) -> String {
        if name.is_empty() {
            return String::new();
        }
        let metadata = self.metadata();
        metadata
            .get(name)
            .ok()
            .and_then(|s| s.labels.get(TARGET_LABEL))
            .map_or_else(|| name.to_owned(), String::clone)
    }

    /// Commits a layer prefix of an unconverted image as a remote
    /// snapshot of the artifact attached for it; it is mounted when a
    /// snapshot on it first needs it, so the layers under the image's top
    /// cost no mount unless another image builds on them.
    fn commit_attached(
        &self,
        target: &str,
        image: skiff_agent::ImageArg,
        parent: &str,
        mut labels: BTreeMap<String, String>,
    ) -> Result<()> {
        let _one_at_a_time = self.remote_locks.lock(target);
        if self.metadata().get(target).is_ok() {
            return Ok(());
        }
        tracing::info!("{target} is the attached artifact {image}");
        labels.insert(REMOTE_LABEL.to_owned(), "remote snapshot".to_owned());
        let remote = RemoteLayer { image, lease: None };
        self.metadata()
            .create_remote(target, parent, labels, remote)?;
        self.metrics.remote_snapshot("attached");
        Ok(())
    }

    fn commit_remote(
        &self,
        lazy: &LazyMounts,
        layer: &SkiffLayer,
        parent: &str,
        mut labels: BTreeMap<String, String>,
    ) -> Result<()> {
        let _one_at_a_time = self.remote_locks.lock(&layer.target);
        if self.metadata().get(&layer.target).is_ok() {
            return Ok(());
        }
        if !parent.is_empty() {
            return Err(SnapshotError::InvalidArgument(format!(
                "{} is a whole image: its layer has no parent, and {parent} was given",
                layer.image
            )));
        }
        lazy.check(layer)?;
        tracing::info!("mounting {} lazily for {}", layer.image, layer.target);
        let lease = lazy.mount(&layer.image, &layer.target);
        self.metrics.lazy_mount(lease.is_ok().then_some("pull"));
        let lease = lease?;
        labels.insert(REMOTE_LABEL.to_owned(), "remote snapshot".to_owned());
        let remote = RemoteLayer {
            image: layer.image.clone(),
            lease: Some(lease.clone()),
        };
        if let Err(e) = self
            .metadata()
            .create_remote(&layer.target, parent, labels, remote)
        {
            lazy.release(&lease);
            return Err(e);
        }
        self.metrics.remote_snapshot("launcher");
        Ok(())
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let parent = self.metadata().get(key)?.parent.clone();
        self.ensure_remote_mount(&parent)?;
        mounts_of(&self.metadata(), key)
    }

    /// Mounts again the lazy mount that the snapshot `name` or the nearest
    /// of its parents stands on, if it is gone (the host restarted,
    /// someone ran `skiff umount`), so a new container never lands on an
    /// empty directory; refuses if it cannot be. The metadata stays free
    /// meanwhile: a probe of a wedged mount or a slow registry must not
    /// hold up containerd's other calls.
    fn ensure_remote_mount(&self, name: &str) -> Result<()> {
        let Some((name, remote)) = remote_under(&self.metadata(), name)? else {
            return Ok(());
        };
        if remote.lease.as_ref().is_some_and(is_live) {
            return Ok(());
        }
        let _one_at_a_time = self.remote_locks.lock(&name);
        let refused = |why: String| {
            SnapshotError::FailedPrecondition(format!(
                "snapshot {name} is a lazy mount of {}, which {why}",
                remote.image
            ))
        };
        let lazy = self
            .lazy
            .as_ref()
            .ok_or_else(|| refused("is not mounted, and lazy mounts are off".into()))?;
        // Another call may have made it again meanwhile.
        let lease = match self.metadata().get(&name)?.remote.clone() {
            Some(now) if now.lease.as_ref().is_some_and(is_live) => return Ok(()),
            Some(now) => now.lease,
            None => return Err(SnapshotError::NotFound(name.clone())),
        };
        let reason = match &lease {
            Some(gone) => {
                tracing::warn!(
                    "the lazy mount of {} for {name} is gone; mounting it again",
                    remote.image
                );
                lazy.release(gone);
                "gone"
            }
            None => {
                tracing::info!("mounting {} lazily for {name}", remote.image);
                "first_use"
            }
        };
        let lease = lazy.mount(&remote.image, &name);
        self.metrics.lazy_mount(lease.is_ok().then_some(reason));
        let lease = lease.map_err(|e| refused(format!("cannot be mounted: {e}")))?;
        self.metadata().set_lease(&name, lease)
    }

    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        let (id, fs) = {
            let metadata = self.metadata();
            let id = metadata.get(key)?.id;
            (id, metadata.fs_dir(id))
        };
        // Measured outside the lock: a big layer takes a while.
        let usage = disk_usage(&fs);
        let mut metadata = self.metadata();
        // Removed (or removed and made again) meanwhile: that call won.
        if metadata.get(key)?.id != id {
            return Err(SnapshotError::NotFound(key.to_owned()));
        }
        metadata.commit(name, key, labels, usage?)
    }

    pub fn remove(&self, key: &str) -> Result<()> {
        // A remote snapshot's lease goes before another Prepare can make
        // the snapshot (and its lease) again.
        let _one_at_a_time = self.remote_locks.lock(key);
        let (snapshot, dir) = {
            let mut metadata = self.metadata();
            let snapshot = metadata.remove(key)?;
            let dir = metadata.dir(snapshot.id);
            (snapshot, dir)
        };
        match (&snapshot.remote, &self.lazy) {
            (Some(remote), Some(lazy)) => {
                if let Some(lease) = &remote.lease {
                    lazy.release(lease);
                }
            }
            (Some(remote), None) => {
                if let Some(lease) = &remote.lease {
                    tracing::warn!(
                        "{key} held a lazy mount at {}; with lazy mounts off, it stays",
                        lease.mountpoint.display()
                    );
                }
            }
            (None, _) => remove_dir(&dir),
        }
        tracing::debug!("removed snapshot {key} ({})", snapshot.id);
        Ok(())
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        Ok(Info {
            name: key.to_owned(),
            snapshot: self.metadata().get(key)?.clone(),
        })
    }

    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Info> {
        let snapshot = self.metadata().update_labels(key, labels, paths)?;
        Ok(Info {
            name: key.to_owned(),
            snapshot,
        })
    }

    pub fn list(&self) -> Vec<Info> {
        self.metadata()
            .all()
            .map(|(name, snapshot)| Info {
                name: name.clone(),
                snapshot: snapshot.clone(),
            })
            .collect()
    }

    pub fn usage(&self, key: &str) -> Result<Usage> {
        let (usage, fs) = {
            let metadata = self.metadata();
            let snapshot = metadata.get(key)?;
            (snapshot.usage, metadata.fs_dir(snapshot.id))
        };
        match usage {
            Some(usage) => Ok(usage),
            None => disk_usage(&fs),
        }
    }

    /// Removes directories no snapshot owns.
    pub fn cleanup(&self) -> Result<()> {
        let orphans = self.metadata().orphan_dirs();
        for dir in orphans {
            tracing::info!("removing {}, which no snapshot owns", dir.display());
            remove_dir(&dir);
        }
        Ok(())
    }
}

/// Locks by name: one holder of each name at a time.
#[derive(Default)]
struct NameLocks {
    held: Mutex<HashSet<String>>,
    freed: Condvar,
}

impl NameLocks {
    fn lock(&self, name: &str) -> NameGuard<'_> {
        let mut held = self.held();
        while held.contains(name) {
            held = self
                .freed
                .wait(held)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        held.insert(name.to_owned());
        NameGuard {
            locks: self,
            name: name.to_owned(),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // The set is changed in one step: a panic cannot leave it half-done.
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct NameGuard<'a> {
    locks: &'a NameLocks,
    name: String,
}

impl Drop for NameGuard<'_> {
    fn drop(&mut self) {
        self.locks.held().remove(&self.name);
        self.locks.freed.notify_all();
    }
}

/// Whether the snapshot `name` holds `lease` (a crash between a lease and
/// its record leaves leases that no snapshot holds).
fn holds_lease(metadata: &Metadata, name: &str, lease: &skiff_agent::Lease) -> bool {
    metadata
        .get(name)
        .ok()
        .and_then(|s| s.remote.as_ref()?.lease.as_ref())
        == Some(lease)
}

/// The nearest remote snapshot at or under `name`, with its name.
fn remote_under(metadata: &Metadata, name: &str) -> Result<Option<(String, RemoteLayer)>> {
    Ok(metadata
        .chain(name)?
        .into_iter()
        .find_map(|(name, snapshot)| Some((name.to_owned(), snapshot.remote.clone()?))))
}

fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }
}

/// The mounts that present snapshot `key`: a bind of its own directory when
/// it has no parents, else an overlay of its parents (nearest on top) under
/// its upper dir (active) or on their own (view).
fn mounts_of(metadata: &Metadata, key: &str) -> Result<Vec<Mount>> {
    let snapshot = metadata.get(key)?;
    if snapshot.kind == Kind::Committed {
        return Err(SnapshotError::FailedPrecondition(format!(
            "{key} is committed: only active and view snapshots have mounts"
        )));
    }
    // A remote snapshot is the image's whole tree: what is under it is not
    // part of this one.
    let mut lowers: Vec<PathBuf> = Vec::new();
    for parent in metadata.parents(key)? {
        if let Some(remote) = &parent.remote {
            let lease = remote.lease.as_ref().ok_or_else(|| {
                SnapshotError::FailedPrecondition(format!("{} is not mounted yet", remote.image))
            })?;
            lowers.push(lease.mountpoint.clone());
            break;
        }
        lowers.push(metadata.fs_dir(parent.id));
    }
    let access = if snapshot.kind == Kind::View {
        "ro"
    } else {
        "rw"
    };
    let bind = |dir: &Path| Mount {
        r#type: "bind".into(),
        source: dir.display().to_string(),
        target: String::new(),
        options: vec![access.into(), "rbind".into()],
    };
    match (snapshot.kind, lowers.as_slice()) {
        (_, []) => Ok(vec![bind(&metadata.fs_dir(snapshot.id))]),
        // overlayfs needs two lower dirs without an upper one.
        (Kind::View, [only]) => Ok(vec![bind(only)]),
        (kind, lowers) => {
            let mut options = Vec::new();
            if kind == Kind::Active {
                options.push(format!(
                    "workdir={}",
                    metadata.work_dir(snapshot.id).display()
                ));
                options.push(format!(
                    "upperdir={}",
                    metadata.fs_dir(snapshot.id).display()
                ));
            }
            let lowerdir: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
            options.push(format!("lowerdir={}", lowerdir.join(":")));
            Ok(vec![Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options,
            }])
        }
    }
}

/// Bytes (allocated blocks) and inodes under `dir`, each hard-linked inode once.
fn disk_usage(dir: &Path) -> Result<Usage> {
    let mut usage = Usage::default();
    let mut seen = std::collections::HashSet::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| SnapshotError::io(format!("measuring {}", path.display()), e))?;
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        usage.inodes += 1;
        usage.size += (meta.blocks() * 512) as i64;
        if meta.is_dir() {
            let entries = std::fs::read_dir(&path)
                .map_err(|e| SnapshotError::io(format!("measuring {}", path.display()), e))?;
            pending.extend(entries.flatten().map(|e| e.path()));
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_stack_parents_nearest_first_under_the_upper_dir() {
        let root = tempfile::tempdir().unwrap();
        let s = Snapshotter::open(root.path(), None).unwrap();
        let none = BTreeMap::new;
        let base = s.create(Kind::Active, "k1", "", none()).unwrap();
        assert_eq!(base[0].r#type, "bind");
        assert!(base[0].options.contains(&"rw".to_string()));
        std::fs::write(PathBuf::from(&base[0].source).join("f"), b"layer one").unwrap();
        s.commit("l1", "k1", none()).unwrap();
        assert!(s.usage("l1").unwrap().inodes >= 2);

        s.create(Kind::Active, "k2", "l1", none()).unwrap();
        s.commit("l2", "k2", none()).unwrap();
        let top = s.create(Kind::Active, "c", "l2", none()).unwrap();
        let options = &top[0].options;
        assert_eq!(top[0].r#type, "overlay");
        let lowerdir = options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
            .unwrap();
        let l1 = s.stat("l1").unwrap().snapshot.id;
        let l2 = s.stat("l2").unwrap().snapshot.id;
        assert_eq!(
            lowerdir,
            format!(
                "{}:{}",
                root.path().join(format!("snapshots/{l2}/fs")).display(),
                root.path().join(format!("snapshots/{l1}/fs")).display()
            )
        );
        assert!(options.iter().any(|o| o.starts_with("upperdir=")));

        // A view of one layer is a read-only bind of it.
        let view = s.create(Kind::View, "v", "l1", none()).unwrap();
        assert_eq!(view[0].r#type, "bind");
        assert!(view[0].options.contains(&"ro".to_string()));
        assert!(matches!(
            s.mounts("l1"),
            Err(SnapshotError::FailedPrecondition(_))
        ));

        for key in ["v", "c", "l2", "l1"] {
            s.remove(key).unwrap();
        }
        assert!(s.list().is_empty());
        assert_eq!(
            std::fs::read_dir(root.path().join("snapshots"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn a_name_is_locked_by_one_holder_at_a_time_and_other_names_are_free() {
        let locks = NameLocks::default();
        let held = locks.lock("a");
        // Another name does not wait.
        drop(locks.lock("b"));
        let order = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            s.spawn(|| {
                let _a = locks.lock("a");
                order.lock().unwrap().push("second");
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            order.lock().unwrap().push("first");
            drop(held);
        });
        assert_eq!(*order.lock().unwrap(), ["first", "second"]);
        assert!(locks.held().is_empty());
    }

    #[test]
    fn only_the_lease_a_snapshot_records_is_held() {
        let root = tempfile::tempdir().unwrap();
        let mut metadata = Metadata::open(root.path()).unwrap();
        let lease = |mountpoint: &str| skiff_agent::Lease {
            holder: "snapshot:o:chain".into(),
            mountpoint: mountpoint.into(),
            process: None,
            owned: true,
        };
        let image: skiff_agent::ImageArg = format!("docker://h.io/app@sha256:{}", "0".repeat(64))
            .parse()
            .unwrap();
        let remote = |lease| RemoteLayer {
            image: image.clone(),
            lease,
        };
        metadata
            .create_remote("chain", "", BTreeMap::new(), remote(Some(lease("/m"))))
            .unwrap();
        metadata
            .create_remote("unmounted", "", BTreeMap::new(), remote(None))
            .unwrap();
        assert!(holds_lease(&metadata, "chain", &lease("/m")));
        // Made again elsewhere, or for a snapshot that is gone or never mounted: swept.
        assert!(!holds_lease(&metadata, "chain", &lease("/old")));
        assert!(!holds_lease(&metadata, "removed", &lease("/m")));
        assert!(!holds_lease(&metadata, "unmounted", &lease("/m")));
    }

    #[test]
    fn an_overlay_on_a_remote_snapshot_stops_at_its_mount() {
        let root = tempfile::tempdir().unwrap();
        let s = Snapshotter::open(root.path(), None).unwrap();
        s.create(Kind::Active, "k1", "", BTreeMap::new()).unwrap();
        s.commit("l1", "k1", BTreeMap::new()).unwrap();
        let remote = RemoteLayer {
            image: format!("docker://h.io/app@sha256:{}", "0".repeat(64))
                .parse()
                .unwrap(),
            lease: Some(skiff_agent::Lease {
                holder: "snapshot:o:chain".into(),
                mountpoint: "/run/skiff/images/abc".into(),
                process: None,
                owned: true,
            }),
        };
        let mut metadata = s.metadata();
        metadata
            .create_remote("chain", "l1", BTreeMap::new(), remote)
            .unwrap();
        metadata
            .create(Kind::Active, "c", "chain", BTreeMap::new())
            .unwrap();
        let mounts = mounts_of(&metadata, "c").unwrap();
        let lowerdir = mounts[0]
            .options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
            .unwrap();
        // The mount is the image's whole tree: l1 under it is not part of c.
        assert_eq!(lowerdir, "/run/skiff/images/abc");
        drop(metadata);
        // Its mount is not there, and without lazy mounts it cannot be made again.
        assert!(matches!(
            s.create(Kind::Active, "d", "chain", BTreeMap::new()),
            Err(SnapshotError::FailedPrecondition(_))
        ));
    }
}
