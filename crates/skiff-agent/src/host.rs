//! What the agent reads off the host: mount points, processes, and files
//! written so a reader never sees half of one.

use std::path::{Path, PathBuf};

use skiff_client::process_is_running;

use crate::error::{AgentError, IoContext, Result};

/// Makes `dir` (and missing parents) and leaves it root's alone (0700):
/// image trees below it hold setuid binaries and device nodes that no
/// other user may reach, as containerd and docker keep theirs.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The mount point as an absolute path with its parent's symlinks resolved,
/// without touching the mount point itself (a dead mount fails every stat).
pub fn mountpoint_path(path: &Path) -> Result<PathBuf> {
    let absolute = std::path::absolute(path).io_context(|| format!("{}", path.display()))?;
    let (Some(parent), Some(name)) = (absolute.parent(), absolute.file_name()) else {
        return Err(AgentError::BadMountPoint(path.to_owned()));
    };
    let parent = parent
        .canonicalize()
        .io_context(|| format!("{}", parent.display()))?;
    Ok(parent.join(name))
}

/// What is mounted at a path, from /proc/self/mountinfo.
#[derive(Debug, PartialEq, Eq)]
pub enum MountedHere {
    Nothing,
    /// A skiff FUSE mount (its source reads "skiff:IMAGE").
    Skiff,
    Other(String),
}

pub fn mounted_here(path: &Path) -> MountedHere {
    match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(info) => mounted_in(&info, path),
        Err(_) => MountedHere::Nothing,
    }
}

/// What `mountinfo` (the text of /proc/PID/mountinfo) has on top at `path`.
fn mounted_in(info: &str, path: &Path) -> MountedHere {
    let Some(wanted) = path.to_str() else {
        return MountedHere::Nothing;
    };
    // The last line for a path is the mount on top.
    for line in info.lines().rev() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(point), Some(dash)) = (fields.get(4), fields.iter().position(|f| *f == "-"))
        else {
            continue;
        };
        if unescape_mountinfo(point) != wanted {
            continue;
        }
        let fs_type = fields.get(dash + 1).copied().unwrap_or("?");
        let source = fields
            .get(dash + 2)
            .map(|s| unescape_mountinfo(s))
            .unwrap_or_default();
        return if fs_type.starts_with("fuse") && source.starts_with("skiff:") {
            MountedHere::Skiff
        } else {
            MountedHere::Other(fs_type.to_owned())
        };
    }
    MountedHere::Nothing
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::new();
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let digits: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&digits, 8) {
                Ok(byte) => out.push(byte as char),
                Err(_) => out.push_str(&digits),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether the mount at `path` is dead: its daemon is gone and every access
/// fails with ENOTCONN.
pub fn is_dead_mount(path: &Path) -> bool {
    // Opening asks the daemon (a stat may be answered from the kernel's cache).
    std::fs::read_dir(path).is_err_and(|e| e.raw_os_error() == Some(nix::libc::ENOTCONN))
}

/// Detaches a skiff mount whose daemon is gone ("Transport endpoint is not connected").
pub fn clear_dead_mount(mountpoint: &Path) -> Result<()> {
    nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH)
        .map_err(std::io::Error::from)
        .io_context(|| format!("unmounting the dead mount at {}", mountpoint.display()))?;
    tracing::warn!("removed a dead skiff mount at {}", mountpoint.display());
    Ok(())
}

/// When process `pid` started, in clock ticks after boot (/proc/PID/stat field 22).
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "(COMM)" start with the state, field 3.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A process named so that a pid reused by another process is not mistaken for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessId {
    pub pid: u32,
    /// Its start time (see [`process_start`]).
    #[serde(default, rename = "pid_start")]
    pub start: u64,
}

impl ProcessId {
    pub fn current() -> ProcessId {
        ProcessId::of(std::process::id())
    }

    /// The process `pid` is now.
    pub fn of(pid: u32) -> ProcessId {
        ProcessId {
            pid,
            start: process_start(pid).unwrap_or(0),
        }
    }

    /// Whether this process still runs: a pid reused by another process does not count.
    pub fn is_running(&self) -> bool {
        process_is_running(self.pid) && process_start(self.pid) == Some(self.start)
    }
}

/// A short file name for `bytes` (a path, a holder): 16 hex digits of its BLAKE3.
pub fn file_key(bytes: &[u8]) -> String {
    let mut key = skiff_format::ChunkId::of(bytes).to_string();
    key.truncate(16);
    key
}

/// An exclusive flock on `path` (created if missing), held until the file is dropped.
pub fn lock_file(path: &Path) -> Result<std::fs::File> {
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .io_context(|| format!("opening {}", path.display()))?;
    file.lock()
        .io_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

/// Written aside and renamed: a reader never sees half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&partial)?;
        std::io::Write::write_all(&mut file, bytes)?;
        // On disk before it takes the name: a power cut leaves the old file or the new.
        file.sync_all()?;
        std::fs::rename(&partial, path)
    };
    write().io_context(|| format!("writing {}", path.display()))
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:35 / /run/skiff/images/ab rw,nosuid,nodev shared:2 - fuse skiff:debian:12 rw,user_id=0
41 22 0:36 / /mnt/with\\040space rw shared:3 - fuse skiff:x rw
42 40 0:37 / /run/skiff/images/ab rw shared:4 - overlay overlay rw,lowerdir=/a
43 22 0:38 / /mnt/other rw shared:5 - fuse sshfs#host rw
";

    #[test]
    fn the_mount_on_top_of_a_path_decides_what_is_there() {
        assert_eq!(
            mounted_in(INFO, Path::new("/run/skiff/images/ab")),
            MountedHere::Other("overlay".into())
        );
        assert_eq!(
            mounted_in(INFO, Path::new("/mnt/with space")),
            MountedHere::Skiff
        );
        assert_eq!(
            mounted_in(INFO, Path::new("/mnt/other")),
            MountedHere::Other("fuse".into())
        );
        assert_eq!(mounted_in(INFO, Path::new("/mnt")), MountedHere::Nothing);
    }

    #[test]
    fn a_reused_pid_is_not_the_process_it_names() {
        let me = ProcessId::current();
        assert!(me.is_running());
        let other = ProcessId {
            start: me.start + 1,
            ..me
        };
        assert!(!other.is_running());
    }
}
