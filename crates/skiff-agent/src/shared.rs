//! Shared lazy mounts: one mount per image and origin on a host, held by
//! leases. `skiff run` and the snapshotter take and give back mounts here.
//!
//! ```text
//! RUN_DIR/images/KEY                 a mount the agent made (KEY: origin and image)
//! RUN_DIR/leases/MOUNT/HOLDER.json   who holds the mount MOUNT (a mount point's key)
//! RUN_DIR/leases/.lock               taken while a lease is added or let go
//! ```
//! A lease bound to a process (a container's `skiff run`) ends with that
//! process; one without (for a holder that outlives processes, such as the
//! snapshotter's remote snapshots) lasts until it is released. A mount the
//! agent made goes when its last lease does; one `skiff mount` made stays.
//! `RUN_DIR/images` is root's alone (0700): the mounts honour setuid bits
//! and device nodes, as a root file system must.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::daemon::{find_shared_mount, mount_key, start_daemon, stop_mount, MountSpec, RunDir};
use crate::error::{IoContext, Result};
use crate::host::{file_key, lock_file, mounted_here, write_atomically, MountedHere, ProcessId};
use crate::origin::{ImageArg, Origin};
use crate::settings::MountSettings;

/// A hold on a lazy mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Who holds it: `container:ID`, `snapshot:KEY`.
    pub holder: String,
    pub mountpoint: PathBuf,
    /// The process whose life bounds the lease; `None`: until released.
    #[serde(default)]
    pub process: Option<ProcessId>,
    /// Whether the agent made the mount, and so unmounts it after the last lease.
    pub owned: bool,
}

impl Lease {
    fn is_live(&self) -> bool {
        self.process.is_none_or(|p| p.is_running())
    }
}

/// What a holder wants mounted.
#[derive(Clone, Debug)]
pub struct MountRequest {
    pub image: ImageArg,
    pub origin: Origin,
    pub token_file: Option<PathBuf>,
    pub settings: MountSettings,
    /// Record a startup profile: a private mount at this path, never shared.
    pub recording_at: Option<PathBuf>,
}

/// The leases of one run directory.
pub struct SharedMounts {
    run_dir: RunDir,
}

impl SharedMounts {
    pub fn new(run_dir: RunDir) -> SharedMounts {
        SharedMounts { run_dir }
    }

    pub fn run_dir(&self) -> &RunDir {
        &self.run_dir
    }

    fn leases_root(&self) -> PathBuf {
        self.run_dir.root().join("leases")
    }

    fn lease_dir(&self, mountpoint: &Path) -> PathBuf {
        self.leases_root().join(mount_key(mountpoint))
    }

    fn lease_path(&self, lease: &Lease) -> PathBuf {
        let name = file_key(lease.holder.as_bytes());
        self.lease_dir(&lease.mountpoint)
            .join(format!("{name}.json"))
    }

    /// Held while leases change, so a mount is never let go under a new holder.
    fn lock(&self) -> Result<File> {
        let root = self.leases_root();
        std::fs::create_dir_all(&root).io_context(|| format!("creating {}", root.display()))?;
        lock_file(&root.join(".lock"))
    }

    /// The live leases on the mount at `mountpoint`; those whose process is
    /// gone are removed on the way.
    pub fn leases(&self, mountpoint: &Path) -> Vec<Lease> {
        let Ok(entries) = std::fs::read_dir(self.lease_dir(mountpoint)) else {
            return Vec::new();
        };
        let mut live = Vec::new();
        for entry in entries.flatten() {
            let lease: Option<Lease> = std::fs::read(entry.path())
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            match lease {
                Some(lease) if lease.is_live() => live.push(lease),
                _ => {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        live.sort_by(|a, b| a.holder.cmp(&b.holder));
        live
    }

    /// Every live lease, on any mount, whose holder starts with `prefix`.
    pub fn leases_held_by(&self, prefix: &str) -> Vec<Lease> {
        let Ok(mounts) = std::fs::read_dir(self.leases_root()) else {
            return Vec::new();
        };
        let mut held: Vec<Lease> = mounts
            .flatten()
            .filter_map(|mount| std::fs::read_dir(mount.path()).ok())
            .flat_map(|leases| leases.flatten())
            .filter_map(|entry| {
                let bytes = std::fs::read(entry.path()).ok()?;
                serde_json::from_slice::<Lease>(&bytes).ok()
            })
            .filter(|lease| lease.holder.starts_with(prefix) && lease.is_live())
            .collect();
        held.sort_by(|a, b| a.holder.cmp(&b.holder));
        held
    }

    fn write_lease(&self, lease: &Lease) -> Result<()> {
        let dir = self.lease_dir(&lease.mountpoint);
        std::fs::create_dir_all(&dir).io_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::to_vec_pretty(lease).map_err(|source| crate::AgentError::Json {
            context: "writing a lease".into(),
            source,
        })?;
        write_atomically(&self.lease_path(lease), &json)
    }

    /// Where the agent mounts `image` from `origin` when no mount of it exists.
    pub fn mountpoint_for(&self, image: &ImageArg, origin: &Origin) -> PathBuf {
        self.run_dir
            .shared_mounts()
            .join(file_key(format!("{origin} {image}").as_bytes()))
    }

    /// A lease for `holder` on a mount of what `request` names: a live
    /// shareable one if the host has it, else a new one (private when recording).
    pub fn acquire(
        &self,
        request: &MountRequest,
        holder: &str,
        process: Option<ProcessId>,
    ) -> Result<Lease> {
        let _lock = self.lock()?;
        let existing = match request.recording_at {
            Some(_) => None,
            None => find_shared_mount(&self.run_dir, &request.image, &request.origin),
        };
        let lease = match existing {
            Some(mountpoint) => {
                tracing::info!(
                    "sharing the mount of {} at {}",
                    request.image,
                    mountpoint.display()
                );
                // One the agent made goes with its last holder, whoever made
                // it; one `skiff mount` made stays.
                let owned = self.is_agents(&mountpoint);
                Lease {
                    holder: holder.to_owned(),
                    mountpoint,
                    process,
                    owned,
                }
            }
            None => {
                let mountpoint = match &request.recording_at {
                    Some(path) => path.clone(),
                    None => self.mountpoint_for(&request.image, &request.origin),
                };
                if let Some(parent) = mountpoint.parent() {
                    let made = if request.recording_at.is_some() {
                        std::fs::create_dir_all(parent)
                    } else {
                        crate::host::create_private_dir(parent)
                    };
                    made.io_context(|| format!("creating {}", parent.display()))?;
                }
                let spec = MountSpec {
                    image: request.image.clone(),
                    origin: request.origin.clone(),
                    mountpoint: crate::mountpoint_path(&mountpoint)?,
                    token_file: request.token_file.clone(),
                    settings: request.settings.clone(),
                    record_profile: request.recording_at.is_some(),
                };
                start_daemon(&self.run_dir, &spec)?;
                Lease {
                    holder: holder.to_owned(),
                    mountpoint: spec.mountpoint,
                    process,
                    owned: true,
                }
            }
        };
        if let Err(e) = self.write_lease(&lease) {
            // Nobody would ever let go of a mount made for this holder.
            if lease.owned && self.leases(&lease.mountpoint).is_empty() {
                self.unmount(&lease.mountpoint);
            }
            return Err(e);
        }
        Ok(lease)
    }

    fn is_agents(&self, mountpoint: &Path) -> bool {
        self.run_dir
            .shared_mounts()
            .canonicalize()
            .is_ok_and(|images| mountpoint.starts_with(images))
    }

    /// Lets go of `lease`; unmounts its mount if the agent made it and no
    /// other live lease holds it. Returns whether it was unmounted.
    pub fn release(&self, lease: &Lease) -> Result<bool> {
        let _lock = self.lock()?;
        let _ = std::fs::remove_file(self.lease_path(lease));
        if !lease.owned || !self.leases(&lease.mountpoint).is_empty() {
            return Ok(false);
        }
        self.unmount(&lease.mountpoint);
        Ok(true)
    }

    fn unmount(&self, mountpoint: &Path) {
        let _ = std::fs::remove_dir(self.lease_dir(mountpoint));
        // A runtime's mount namespace may let go of an overlay on it (and so
        // of the image) a moment after the container is gone.
        for _ in 0..20 {
            match nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty()) {
                // The daemon sees its mount gone and exits.
                Ok(()) => return,
                Err(nix::errno::Errno::EBUSY) => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => break,
            }
        }
        if mounted_here(mountpoint) == MountedHere::Nothing {
            return;
        }
        if let Err(e) = stop_mount(&self.run_dir, mountpoint) {
            // Already gone (someone ran `skiff umount`) is fine.
            tracing::debug!("unmounting {}: {e}", mountpoint.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, mountpoint: &Path, process: Option<ProcessId>) -> Lease {
        Lease {
            holder: holder.into(),
            mountpoint: mountpoint.to_owned(),
            process,
            owned: true,
        }
    }

    fn dead_process() -> ProcessId {
        let me = ProcessId::current();
        ProcessId {
            start: me.start + 1,
            ..me
        }
    }

    #[test]
    fn a_mount_is_held_while_any_live_lease_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let shared = SharedMounts::new(RunDir::new(dir.path()));
        let mountpoint = dir.path().join("images/abc");
        let container = lease("container:a", &mountpoint, Some(ProcessId::current()));
        let snapshot = lease("snapshot:k", &mountpoint, None);
        shared.write_lease(&container).unwrap();
        shared.write_lease(&snapshot).unwrap();
        assert_eq!(
            shared.leases(&mountpoint),
            vec![container.clone(), snapshot.clone()]
        );
        // Another mount's leases are its own.
        assert!(shared.leases(&dir.path().join("images/other")).is_empty());
        // Released while the snapshot still holds it: nothing is unmounted.
        assert!(!shared.release(&container).unwrap());
        assert_eq!(shared.leases(&mountpoint), vec![snapshot.clone()]);
        // The last one lets the mount go (here nothing is mounted).
        assert!(shared.release(&snapshot).unwrap());
        assert!(shared.leases(&mountpoint).is_empty());
    }

    #[test]
    fn a_holders_leases_are_found_on_every_mount() {
        let dir = tempfile::tempdir().unwrap();
        let shared = SharedMounts::new(RunDir::new(dir.path()));
        let (a, b) = (dir.path().join("images/a"), dir.path().join("images/b"));
        let mine = [
            lease("snapshot:me:x", &a, None),
            lease("snapshot:me:y", &b, None),
        ];
        for l in &mine {
            shared.write_lease(l).unwrap();
        }
        shared
            .write_lease(&lease("snapshot:other:x", &a, None))
            .unwrap();
        shared
            .write_lease(&lease("snapshot:me:dead", &b, Some(dead_process())))
            .unwrap();
        assert_eq!(shared.leases_held_by("snapshot:me:"), mine.to_vec());
        assert!(shared.leases_held_by("container:").is_empty());
    }

    #[test]
    fn a_lease_of_a_process_that_is_gone_holds_nothing_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let shared = SharedMounts::new(RunDir::new(dir.path()));
        let mountpoint = dir.path().join("images/abc");
        let dead = lease("container:dead", &mountpoint, Some(dead_process()));
        shared.write_lease(&dead).unwrap();
        assert!(shared.leases(&mountpoint).is_empty());
        assert!(!shared.lease_path(&dead).exists());
    }

    #[test]
    fn a_mount_that_skiff_mount_made_stays_after_its_last_lease() {
        let dir = tempfile::tempdir().unwrap();
        let shared = SharedMounts::new(RunDir::new(dir.path()));
        let users = Lease {
            owned: false,
            ..lease("container:a", &dir.path().join("mnt"), None)
        };
        shared.write_lease(&users).unwrap();
        assert!(!shared.release(&users).unwrap());
        assert!(shared.leases(&users.mountpoint).is_empty());
    }

    #[test]
    fn the_agents_mount_point_depends_on_image_and_origin() {
        let dir = tempfile::tempdir().unwrap();
        let shared = SharedMounts::new(RunDir::new(dir.path()));
        let image: ImageArg = "debian:12".parse().unwrap();
        let a = Origin::Store { path: "/a".into() };
        let b = Origin::Store { path: "/b".into() };
        assert_eq!(
            shared.mountpoint_for(&image, &a),
            shared.mountpoint_for(&image, &a)
        );
        assert_ne!(
            shared.mountpoint_for(&image, &a),
            shared.mountpoint_for(&image, &b)
        );
        assert!(shared
            .mountpoint_for(&image, &a)
            .starts_with(dir.path().join("images")));
    }
}
