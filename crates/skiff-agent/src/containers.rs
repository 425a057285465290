//! Containers on local disk:
//!
//! ```text
//! CONTAINERS/ID/state.json   image, command, the supervising process, exit code, its lease
//! CONTAINERS/ID/config.json  the OCI runtime config (the directory is the bundle)
//! CONTAINERS/ID/rootfs       overlay: the image's lazy mount under upper/
//! CONTAINERS/ID/upper, work  the container's writes
//! CONTAINERS/ID/image        a private mount of the image, when recording a profile
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};
use skiff_format::ChunkId;
use skiff_runtime::Overlay;

use crate::daemon::RunDir;
use crate::error::{AgentError, IoContext, Result};
use crate::host::{lock_file, write_atomically, ProcessId};
use crate::shared::Lease;

/// `CONTAINERS/ID/state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerState {
    pub id: String,
    pub image: String,
    pub command: Vec<String>,
    pub runtime: String,
    pub created_unix: u64,
    /// The process that supervises the container (its `skiff run`).
    #[serde(flatten)]
    pub supervisor: ProcessId,
    /// The image's lazy mount under the overlay.
    pub lower: PathBuf,
    /// The container's hold on that mount.
    #[serde(default)]
    pub lease: Option<Lease>,
    /// Written by skiff before leases: whether `skiff run` made the mount.
    #[serde(default, skip_serializing)]
    pub owns_mount: bool,
    pub exit_code: Option<i32>,
}

impl ContainerState {
    pub fn is_running(&self) -> bool {
        self.exit_code.is_none() && self.supervisor.is_running()
    }

    pub fn status(&self) -> String {
        match self.exit_code {
            Some(code) => format!("exited ({code})"),
            None if self.is_running() => "running".to_owned(),
            None => "dead (its `skiff run` is gone)".to_owned(),
        }
    }

    /// Its hold on the image's mount; for a container an older skiff
    /// started, the one its `owns_mount` stood for.
    pub fn mount_lease(&self) -> Option<Lease> {
        self.lease.clone().or_else(|| {
            self.owns_mount.then(|| Lease {
                holder: Self::holder(&self.id),
                mountpoint: self.lower.clone(),
                process: Some(self.supervisor),
                owned: true,
            })
        })
    }

    /// The holder name of this container's lease.
    pub fn holder(id: &str) -> String {
        format!("container:{id}")
    }
}

/// The containers directory, locked while a container is created or removed.
pub struct Containers {
    dir: PathBuf,
}

impl Containers {
    /// Opens (or makes) the containers directory, root's alone: the
    /// containers' root file systems and upper directories below it hold
    /// setuid binaries and device nodes the images and containers made.
    pub fn open(dir: &Path) -> Result<Containers> {
        crate::host::create_private_dir(dir)
            .io_context(|| format!("creating {}", dir.display()))?;
        Ok(Containers {
            dir: dir
                .canonicalize()
                .io_context(|| format!("{}", dir.display()))?,
        })
    }

    pub fn lock(&self) -> Result<File> {
        lock_file(&self.dir.join(".lock"))
    }

    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    pub fn state(&self, id: &str) -> Result<ContainerState> {
        let path = self.path(id).join("state.json");
        let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => AgentError::NoContainer(id.to_owned()),
            _ => AgentError::Io {
                context: format!("reading {}", path.display()),
                source: e,
            },
        })?;
        serde_json::from_slice(&bytes).map_err(|source| AgentError::Json {
            context: format!("reading {}", path.display()),
            source,
        })
    }

    pub fn save(&self, state: &ContainerState) -> Result<()> {
        let path = self.path(&state.id).join("state.json");
        let json = serde_json::to_vec_pretty(state).map_err(|source| AgentError::Json {
            context: format!("writing {}", path.display()),
            source,
        })?;
        write_atomically(&path, &json)
    }

    /// Every container, oldest first.
    pub fn all(&self) -> Vec<ContainerState> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut states: Vec<ContainerState> = entries
            .flatten()
            .filter_map(|e| self.state(&e.file_name().to_string_lossy()).ok())
            .collect();
        states.sort_by_key(|s| (s.created_unix, s.id.clone()));
        states
    }

    /// Unmounts the container's overlay and removes its directory, and the
    /// log of a mount that was the container's alone.
    pub fn remove(&self, state: &ContainerState, run_dir: &RunDir) -> Result<()> {
        let dir = self.path(&state.id);
        Overlay::unmount(&dir.join("rootfs"))?;
        if state.lower.starts_with(&dir) {
            let _ = std::fs::remove_file(run_dir.log_path(&state.lower));
        }
        std::fs::remove_dir_all(&dir).io_context(|| format!("removing {}", dir.display()))
    }
}

/// Refuses an ID that is not a safe directory name.
pub fn check_container_id(id: &str) -> Result<()> {
    let valid = !id.is_empty()
        && id.len() <= 64
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid {
        return Err(AgentError::InvalidContainerId(id.to_owned()));
    }
    Ok(())
}

/// 12 random hex digits.
pub fn new_container_id() -> String {
    let seed = format!(
        "{}-{:?}-{:?}",
        std::process::id(),
        SystemTime::now(),
        Instant::now()
    );
    ChunkId::of(seed.as_bytes()).to_string()[..12].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_that_could_climb_out_or_hide_are_refused() {
        for bad in ["", "..", ".x", "a/b", "-rf", &"a".repeat(65), "a b"] {
            assert!(check_container_id(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "web-1.prod_2", &new_container_id()] {
            check_container_id(good).unwrap();
        }
    }

    #[test]
    fn a_container_whose_supervisor_died_is_dead_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let containers = Containers::open(dir.path()).unwrap();
        let me = ProcessId::current();
        let mut state = ContainerState {
            id: "c1".into(),
            image: "a:b".into(),
            command: vec!["sh".into()],
            runtime: "crun".into(),
            created_unix: 1,
            supervisor: me,
            lower: "/m".into(),
            lease: None,
            owns_mount: false,
            exit_code: None,
        };
        std::fs::create_dir(containers.path("c1")).unwrap();
        containers.save(&state).unwrap();
        assert!(containers.state("c1").unwrap().is_running());
        state.supervisor.start += 1;
        containers.save(&state).unwrap();
        assert_eq!(
            containers.state("c1").unwrap().status(),
            "dead (its `skiff run` is gone)"
        );
        state.exit_code = Some(3);
        containers.save(&state).unwrap();
        assert_eq!(containers.all()[0].status(), "exited (3)");
        assert!(matches!(
            containers.state("nope"),
            Err(AgentError::NoContainer(_))
        ));
    }
}
