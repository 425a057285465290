//! Claims on chunks being fetched, for a cache that several hosts share
//! (Wharf, SoCC '18): the host fetching a chunk holds `claims/ID`, made
//! with `O_EXCL`, and the others wait for the chunk's pack instead of
//! fetching it too.
//!
//! A claim is a lease. Its holder renews the file's mtime while it fetches,
//! and a claim not renewed for [`CLAIM_LEASE`] is taken over, so a host that
//! dies mid-fetch holds the others up for one lease, not for ever. Times are
//! set by the storage (`UTIME_NOW`: on NFS, the server's clock) and read
//! against each host's own clock, so the hosts' clocks and the server's must
//! agree to within a few seconds (NTP does).

use std::collections::HashSet;
use std::fs::{self, File};
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use skiff_format::ChunkId;

/// A claim not renewed for this long is its holder's no more; the lease
/// leaves room for the clocks of the hosts and the storage to differ a little.
pub const CLAIM_LEASE: Duration = Duration::from_secs(10);
/// How often a holder renews the claims it holds.
pub const RENEW_EVERY: Duration = Duration::from_secs(2);
/// Claims (and moved-aside claims) older than this are swept away: their
/// holders died and nobody wanted the chunk since.
const SWEEP_AFTER: Duration = Duration::from_secs(600);

/// Tells takeovers in one process apart.
static ASIDE: AtomicU64 = AtomicU64::new(0);

/// Whether another host has a chunk in hand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This process holds the claim: it fetches the chunk, then releases it.
    Mine,
    /// A live claim of another process: the chunk arrives in the cache soon.
    Theirs,
}

pub struct Claims {
    dir: PathBuf,
    /// What a claim file of this process says, and names of its own in
    /// `claims/` hold: its host and pid, and a nonce that tells it from an
    /// earlier process with the same pid ([`unique_tag`]).
    tag: String,
    held: Mutex<HashSet<ChunkId>>,
}

/// Names this process alone makes in a directory other hosts share: pids
/// repeat across hosts (and containers), so its host and a nonce too.
pub fn unique_tag() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().replace(['/', ' '], "_"))
        .unwrap_or_default();
    let nonce = RandomState::new().hash_one(std::process::id());
    format!("{host}-{}-{nonce:016x}", std::process::id())
}

/// Sets `file`'s mtime to now as the storage reckons it (`UTIME_NOW`).
pub(crate) fn touch(file: &File) -> io::Result<()> {
    use rustix::fs::{futimens, Timespec, Timestamps, UTIME_NOW, UTIME_OMIT};
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_NOW,
        },
    };
    futimens(file, &times).map_err(io::Error::from)
}

impl Claims {
    /// The claims of the cache at `root`, made if missing.
    pub fn open(root: &std::path::Path) -> io::Result<Claims> {
        let dir = root.join("claims");
        fs::create_dir_all(&dir)?;
        Ok(Claims {
            dir,
            tag: unique_tag(),
            held: Mutex::default(),
        })
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// A name no other process makes, for a claim moved aside.
    fn aside(&self) -> PathBuf {
        self.dir.join(format!(
            ".aside-{}-{}",
            self.tag,
            ASIDE.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Claims `id` for this process unless another holds a live claim on it.
    /// A claim that cannot be made for another reason (the storage refuses)
    /// counts as this process's: a chunk fetched twice, not a stall.
    pub fn claim(&self, id: &ChunkId) -> Claim {
        let path = self.path(id);
        // Twice: once more after moving an expired claim aside.
        for _ in 0..2 {
            match File::options().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    // Its content only guards the release: an empty claim is still one.
                    let _ = file.write_all(self.tag.as_bytes());
                    self.held.lock().expect("claims poisoned").insert(*id);
                    return Claim::Mine;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if !self.take_over_expired(id) {
                        return Claim::Theirs;
                    }
                }
                // Deleting the cache is allowed: make the directory again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let _ = fs::create_dir_all(&self.dir);
                }
                Err(e) => {
                    tracing::warn!("claiming chunk {id} in {}: {e}", self.dir.display());
                    return Claim::Mine;
                }
            }
        }
        Claim::Theirs
    }

    /// Removes `id`'s claim if it expired, and says whether it did (or the
    /// claim went meanwhile). Of several hosts that find it expired at once,
    /// one moves it aside; a claim renewed or made since the look is put back.
    fn take_over_expired(&self, id: &ChunkId) -> bool {
        let path = self.path(id);
        match fs::metadata(&path) {
            Ok(meta) if expired(&meta, CLAIM_LEASE) => {}
            Ok(_) => return false,
            Err(e) => return e.kind() == io::ErrorKind::NotFound,
        }
        let aside = self.aside();
        if fs::rename(&path, &aside).is_err() {
            return true; // gone already: another host took it over
        }
        let live = fs::metadata(&aside).is_ok_and(|meta| !expired(&meta, CLAIM_LEASE));
        if live {
            // Fails only if yet another claim was made meanwhile: it stands.
            let _ = fs::hard_link(&aside, &path);
        }
        let _ = fs::remove_file(&aside);
        if !live {
            tracing::info!("took over the expired claim on chunk {id}");
        }
        !live
    }

    /// Whether a process holds a live claim on `id`.
    #[cfg(test)]
    fn is_claimed(&self, id: &ChunkId) -> bool {
        fs::metadata(self.path(id)).is_ok_and(|meta| !expired(&meta, CLAIM_LEASE))
    }

    /// Gives up this process's claims on `ids` (fetched and written, or failed).
    pub fn release(&self, ids: &[ChunkId]) {
        let mut held = self.held.lock().expect("claims poisoned");
        for id in ids {
            if !held.remove(id) {
                continue;
            }
            // Moved aside first, then looked at: a claim another host made
            // after taking ours over goes back.
            let (path, aside) = (self.path(id), self.aside());
            if fs::rename(&path, &aside).is_err() {
                continue;
            }
            if !fs::read_to_string(&aside).is_ok_and(|holder| holder == self.tag) {
                let _ = fs::hard_link(&aside, &path);
            }
            let _ = fs::remove_file(&aside);
        }
    }

    /// Renews every claim this process holds.
    pub fn renew(&self) {
        let held: Vec<ChunkId> = self
            .held
            .lock()
            .expect("claims poisoned")
            .iter()
            .copied()
            .collect();
        for id in held {
            if let Ok(file) = File::options().write(true).open(self.path(&id)) {
                let _ = touch(&file);
            }
        }
    }

    /// Removes claims whose holders stopped renewing them long ago.
    pub fn sweep(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry
                .metadata()
                .is_ok_and(|meta| expired(&meta, SWEEP_AFTER))
            {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

impl Drop for Claims {
    fn drop(&mut self) {
        let held: Vec<ChunkId> = self
            .held
            .get_mut()
            .map(|held| held.iter().copied().collect())
            .unwrap_or_default();
        self.release(&held);
    }
}

/// Whether an mtime is over `lease` old, or as far in the future: a clock
/// that far ahead must not make a claim live for ever.
pub(crate) fn expired(meta: &fs::Metadata, lease: Duration) -> bool {
    meta.modified().is_ok_and(|t| match t.elapsed() {
        Ok(age) => age > lease,
        Err(ahead) => ahead.duration() > lease,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::SystemTime;

    fn id(n: u8) -> ChunkId {
        ChunkId::of(&[n])
    }

    fn age(claims: &Claims, id: &ChunkId, by: Duration) {
        let file = File::options().write(true).open(claims.path(id)).unwrap();
        file.set_modified(SystemTime::now() - by).unwrap();
    }

    #[test]
    fn a_chunk_is_claimed_once_until_its_claim_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            Claims::open(dir.path()).unwrap(),
            Claims::open(dir.path()).unwrap(),
        );
        assert_eq!(a.claim(&id(1)), Claim::Mine);
        assert_eq!(b.claim(&id(1)), Claim::Theirs);
        assert!(b.is_claimed(&id(1)));
        // Releasing what it does not hold leaves the other's claim alone.
        b.release(&[id(1)]);
        assert_eq!(b.claim(&id(1)), Claim::Theirs);
        a.release(&[id(1)]);
        assert!(!b.is_claimed(&id(1)));
        assert_eq!(b.claim(&id(1)), Claim::Mine);
    }

    #[test]
    fn an_expired_claim_is_taken_over_and_a_renewed_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            Claims::open(dir.path()).unwrap(),
            Claims::open(dir.path()).unwrap(),
        );
        assert_eq!(a.claim(&id(1)), Claim::Mine);
        assert_eq!(a.claim(&id(2)), Claim::Mine);
        age(&a, &id(1), CLAIM_LEASE * 2);
        age(&a, &id(2), CLAIM_LEASE * 2);
        a.renew();
        assert_eq!(b.claim(&id(1)), Claim::Theirs, "renewed");
        age(&a, &id(2), CLAIM_LEASE * 2);
        assert_eq!(b.claim(&id(2)), Claim::Mine, "expired");
        // The old holder's release does not remove the new holder's claim.
        a.release(&[id(2)]);
        assert!(a.is_claimed(&id(2)));
        drop(b);
        assert!(
            !a.is_claimed(&id(2)),
            "a dropped holder releases its claims"
        );
        assert_eq!(fs::read_dir(dir.path().join("claims")).unwrap().count(), 1);
    }
}
