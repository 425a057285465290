//! The container's writable root: overlayfs with the image as its only
//! lower layer and upper and work directories on local disk, so writes
//! never reach the image or the host's chunk cache.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::RuntimeError;

/// A mounted overlay. It stays mounted until [`Overlay::unmount`]: a
/// container may outlive the process that started it.
pub struct Overlay {
    pub root: PathBuf,
}

impl Overlay {
    /// Mounts `lower` (read-only) under `upper` and `work` at `root`,
    /// creating the three directories.
    pub fn mount(
        lower: &Path,
        upper: &Path,
        work: &Path,
        root: &Path,
    ) -> Result<Overlay, RuntimeError> {
        for dir in [upper, work, root] {
            std::fs::create_dir_all(dir)
                .map_err(RuntimeError::io(format!("creating {}", dir.display())))?;
        }
        // overlayfs splits its options at commas and lower dirs at colons.
        for path in [lower, upper, work] {
            let text = path.to_string_lossy();
            if text.contains([',', ':', '\\']) || path.to_str().is_none() {
                return Err(RuntimeError::InvalidOption(format!(
                    "{} cannot be an overlay directory (it holds ',', ':' or '\\\\')",
                    path.display()
                )));
            }
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        mount(
            Some("overlay"),
            root,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|source| RuntimeError::Overlay {
            path: root.to_owned(),
            source,
        })?;
        Ok(Overlay {
            root: root.to_owned(),
        })
    }

    /// Unmounts the overlay at `root` if one is there; a busy one (a
    /// process still inside) is detached.
    pub fn unmount(root: &Path) -> Result<(), RuntimeError> {
        match umount2(root, MntFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(()),
            Err(nix::errno::Errno::EBUSY) => umount2(root, MntFlags::MNT_DETACH)
                .map_err(|e| RuntimeError::io(format!("unmounting {}", root.display()))(e.into())),
            Err(e) => Err(RuntimeError::io(format!("unmounting {}", root.display()))(
                e.into(),
            )),
        }
    }
}
