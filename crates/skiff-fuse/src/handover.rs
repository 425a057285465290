//! Handing a live FUSE connection to a new daemon.
//!
//! The kernel sends `FUSE_INIT` once per connection: a daemon that takes a
//! mount over is given the connection's descriptor and what the first INIT
//! negotiated ([`SessionState`]), and never sees an INIT. The requests its
//! predecessor had read but not answered are still the kernel's; it sends
//! them again when asked ([`resend_pending`], Linux 6.9's
//! `FUSE_NOTIFY_RESEND`), as long as the descriptor they were read from
//! stayed open: the supervisor's copy keeps it so.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

/// `FUSE_NOTIFY_RESEND` in `include/uapi/linux/fuse.h` (protocol 7.40).
const FUSE_NOTIFY_RESEND: i32 = 7;

/// What the first daemon of a connection agreed with the kernel, which a
/// successor must keep to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    /// Files may be handed to the kernel to read (FUSE passthrough).
    pub passthrough: bool,
    /// The kernel can send unanswered requests again (`FUSE_HAS_RESEND`,
    /// Linux 6.9): without it, a successor would leave the requests its
    /// predecessor had read waiting forever, so there is none.
    #[serde(default)]
    pub resend: bool,
    /// Opens of files are answered ENOSYS, after which the kernel sends no
    /// opens or releases (`FUSE_NO_OPEN_SUPPORT`): a successor must not
    /// answer so if this daemon did not, since the kernel may lack it.
    #[serde(default)]
    pub no_open: bool,
    /// The same for directories (`FUSE_NO_OPENDIR_SUPPORT`).
    #[serde(default)]
    pub no_opendir: bool,
}

/// [`SessionState`] as the file system learns it (at INIT) and its
/// [`crate::Mount`] hands it on: one copy both share.
#[derive(Debug, Default)]
pub(crate) struct Negotiated {
    pub passthrough: AtomicBool,
    pub resend: AtomicBool,
    pub no_open: AtomicBool,
    pub no_opendir: AtomicBool,
}

impl Negotiated {
    pub fn of(state: SessionState) -> Negotiated {
        Negotiated {
            passthrough: AtomicBool::new(state.passthrough),
            resend: AtomicBool::new(state.resend),
            no_open: AtomicBool::new(state.no_open),
            no_opendir: AtomicBool::new(state.no_opendir),
        }
    }

    pub fn state(&self) -> SessionState {
        SessionState {
            passthrough: self.passthrough.load(Ordering::Relaxed),
            resend: self.resend.load(Ordering::Relaxed),
            no_open: self.no_open.load(Ordering::Relaxed),
            no_opendir: self.no_opendir.load(Ordering::Relaxed),
        }
    }
}

/// A live FUSE connection: its `/dev/fuse` descriptor and its state.
#[derive(Debug)]
pub struct Connection {
    pub fd: OwnedFd,
    pub state: SessionState,
    /// How many daemons served it before the one it is handed to (0: the
    /// first). A daemon's file handles start above every earlier daemon's,
    /// so a request resent from a dead one never names a new handle.
    pub generation: u32,
}

/// Asks the kernel to queue again every request of this connection that a
/// daemon read and did not answer (a notification: `unique` 0, the code in
/// `error`, no payload).
pub fn resend_pending(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&16u32.to_ne_bytes());
    header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    let mut device = File::from(fd.try_clone_to_owned()?);
    let written = device.write(&header)?;
    if written != header.len() {
        return Err(io::Error::other(format!(
            "the kernel took {written} of the {} bytes of FUSE_NOTIFY_RESEND",
            header.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_predecessor_from_before_no_open_answered_opens_and_so_does_its_successor() {
        let old: SessionState = serde_json::from_str(r#"{"passthrough": true}"#).unwrap();
        let state = Negotiated::of(old).state();
        assert!(state.passthrough);
        assert!(!state.no_open && !state.no_opendir && !state.resend);
        let now = SessionState {
            no_open: true,
            no_opendir: true,
            ..SessionState::default()
        };
        let carried: SessionState =
            serde_json::from_str(&serde_json::to_string(&now).unwrap()).unwrap();
        let state = Negotiated::of(carried).state();
        assert!(state.no_open && state.no_opendir && !state.passthrough);
    }
}
