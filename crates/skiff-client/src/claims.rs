//! Claims on chunks being fetched, for a cache that several hosts share
//! (Wharf, SoCC '18): the host fetching a chunk holds `claims/ID`, made
//! with `O_EXCL`, and the others wait for the chunk's pack instead of
//! fetching it too.
//!
//! A claim is a lease. Its holder renews the file's mtime while it fetches,
//! and a claim not renewed for [`CLAIM_LEASE`] is taken over, so a host that
//! dies mid-fetch holds the others up for one lease, not for ever.

use std::collections::HashSet;
use std::fs::{self, File};
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use skiff_format::ChunkId;

/// A claim not renewed for this long is its holder's no more. Hosts compare
/// an mtime set by the shared storage with their own clocks: the lease
/// leaves room for clock skew between them.
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
    /// What a claim file of this process says: its host and pid, and a
    /// nonce that tells it from an earlier process with the same pid.
    holder: String,
    held: Mutex<HashSet<ChunkId>>,
}

impl Claims {
    /// The claims of the cache at `root`, made if missing.
    pub fn open(root: &std::path::Path) -> io::Result<Claims> {
        let dir = root.join("claims");
        fs::create_dir_all(&dir)?;
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        let nonce = RandomState::new().hash_one(std::process::id());
        Ok(Claims {
            dir,
            holder: format!("{host} {} {nonce:016x}\n", std::process::id()),
            held: Mutex::default(),
        })
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        self.dir.join(id.to_string())
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
                    let _ = file.write_all(self.holder.as_bytes());
                    self.held.lock().expect("claims poisoned").insert(*id);
                    return Claim::Mine;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if !self.take_over_expired(id) {
                        return Claim::Theirs;
                    }
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
        let aside = self.dir.join(format!(
            ".aside-{}-{}",
            std::process::id(),
            ASIDE.fetch_add(1, Ordering::Relaxed)
        ));
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
            let path = self.path(id);
            // Not a claim another host made after taking ours over.
            if fs::read_to_string(&path).is_ok_and(|holder| holder == self.holder) {
                let _ = fs::remove_file(&path);
            }
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
        let now = SystemTime::now();
        for id in held {
            if let Ok(file) = File::options().write(true).open(self.path(&id)) {
                let _ = file.set_modified(now);
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

fn expired(meta: &fs::Metadata, lease: Duration) -> bool {
    meta.modified()
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > lease))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
