//! The status protocol of a mount daemon: one JSON request line on its
//! unix socket, one JSON answer, typed on both ends.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use skiff_client::ChunkCache;
use skiff_format::StartupProfile;
use skiff_fuse::{LocalShare, Mount, StatsReport};
use skiff_source::SourceTraffic;

use crate::daemon::{MountRecord, RunDir};
use crate::error::{AgentError, IoContext, Result};

/// What a client asks a mount daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "lowercase")]
pub enum Request {
    /// Answered with a [`MountStatus`].
    Status,
    /// Answered with the recorded `Option<StartupProfile>` (`None` unless the
    /// mount records); recording stops.
    Profile,
}

/// A mount's state, as `skiff status --json` prints it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountStatus {
    pub image: String,
    pub source: String,
    pub mountpoint: PathBuf,
    /// The daemon serving it now.
    pub pid: u32,
    /// The supervisor that keeps its connection across daemons, if it has one.
    #[serde(default)]
    pub supervisor_pid: Option<u32>,
    /// Daemons that took the mount over from one that died.
    #[serde(default)]
    pub takeovers: u32,
    /// Since the first daemon mounted it.
    pub uptime_secs: f64,
    /// Chunks of this image on this host (memory or cache).
    pub local: LocalShare,
    pub stats: StatsReport,
    /// What the source did on the network (a registry's requests, bytes, ranges).
    #[serde(default)]
    pub traffic: Option<SourceTraffic>,
    pub cache: Option<CacheStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CacheStatus {
    pub dir: PathBuf,
    pub bytes: u64,
    pub max_bytes: u64,
}

/// A request line is short; anything longer is not one.
const MAX_REQUEST: u64 = 4096;

pub(crate) fn spawn_status_server(
    listener: UnixListener,
    mount: Arc<Mount>,
    record: MountRecord,
    cache: Option<Arc<ChunkCache>>,
    started: Instant,
    takeovers: u32,
) {
    let weak = Arc::downgrade(&mount);
    drop(mount);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Some(mount) = weak.upgrade() else { return };
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut line = String::new();
            let _ = BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line);
            let body = match serde_json::from_str::<Request>(line.trim()) {
                Ok(Request::Profile) => serde_json::to_vec(&mount.finish_profile(Vec::new())),
                Ok(Request::Status) => serde_json::to_vec(&MountStatus {
                    image: record.image.clone(),
                    source: record.source.clone(),
                    mountpoint: record.mountpoint.clone(),
                    pid: record.daemon.pid,
                    supervisor_pid: record.supervisor.map(|p| p.pid),
                    takeovers,
                    uptime_secs: started.elapsed().as_secs_f64(),
                    local: mount.local_share(),
                    stats: mount.stats(),
                    traffic: mount.source_traffic(),
                    cache: cache.as_ref().map(|c| CacheStatus {
                        dir: c.root().to_owned(),
                        bytes: c.approx_bytes(),
                        max_bytes: c.max_bytes(),
                    }),
                }),
                Err(e) => {
                    tracing::debug!("a status request that is not one: {e}");
                    continue;
                }
            };
            drop(mount);
            if let Ok(body) = body {
                let _ = stream.write_all(&body);
            }
        }
    });
}

/// Sends `request` to the daemon of the mount at `mountpoint` and returns its answer.
fn ask(run_dir: &RunDir, mountpoint: &Path, request: Request) -> Result<Vec<u8>> {
    let socket = run_dir.socket_path(mountpoint);
    let mut stream = UnixStream::connect(&socket).map_err(|source| AgentError::NoDaemon {
        mountpoint: mountpoint.to_owned(),
        socket: socket.clone(),
        source,
    })?;
    let talk = |stream: &mut UnixStream| -> std::io::Result<Vec<u8>> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut line = serde_json::to_vec(&request)?;
        line.push(b'\n');
        stream.write_all(&line)?;
        let mut body = Vec::new();
        stream.read_to_end(&mut body)?;
        Ok(body)
    };
    talk(&mut stream).io_context(|| format!("asking the daemon at {}", socket.display()))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(body).map_err(|source| AgentError::Json {
        context: format!("reading the mount's {what}"),
        source,
    })
}

/// The status of the mount at `mountpoint`.
pub fn mount_status(run_dir: &RunDir, mountpoint: &Path) -> Result<MountStatus> {
    parse(&ask(run_dir, mountpoint, Request::Status)?, "status")
}

/// Ends the recording of the mount at `mountpoint` and returns its profile
/// (`None`: the mount was not recording).
pub fn take_profile(run_dir: &RunDir, mountpoint: &Path) -> Result<Option<StartupProfile>> {
    parse(&ask(run_dir, mountpoint, Request::Profile)?, "profile")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_object_each() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"request":"status"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"request":"profile"}"#).unwrap(),
            Request::Profile
        );
        assert!(serde_json::from_str::<Request>("status").is_err());
    }
}
