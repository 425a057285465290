//! The OCI runtime that runs a bundle: crun (the default) or runc.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::RuntimeError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Crun,
    Runc,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Crun => "crun",
            Runtime::Runc => "runc",
        }
    }

    pub fn from_name(name: &str) -> Option<Runtime> {
        match name {
            "crun" => Some(Runtime::Crun),
            "runc" => Some(Runtime::Runc),
            _ => None,
        }
    }

    fn binary(self) -> Result<PathBuf, RuntimeError> {
        let name = self.name();
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
            .ok_or(RuntimeError::RuntimeMissing { runtime: name })
    }

    /// A command that runs the bundle at `bundle` in the foreground as
    /// container `id`, keeping the runtime's state under `state_root`. Its
    /// standard streams are the container's; its exit status is the
    /// container's.
    pub fn run_command(
        self,
        state_root: &Path,
        bundle: &Path,
        id: &str,
    ) -> Result<Command, RuntimeError> {
        self.command(
            state_root,
            &["run".into(), "--bundle".into(), bundle.into(), id.into()],
        )
    }

    /// Sends `signal` (`TERM`, `KILL`, …) to container `id`'s process.
    pub fn kill(self, state_root: &Path, id: &str, signal: &str) -> Result<(), RuntimeError> {
        self.call(state_root, &["kill", id, signal])
    }

    /// Removes what the runtime keeps of container `id` (after a crash of
    /// the process that ran it, killing what still runs); nothing is there
    /// after a clean exit.
    pub fn delete(self, state_root: &Path, id: &str) -> Result<(), RuntimeError> {
        if !state_root.join(id).exists() {
            return Ok(());
        }
        self.call(state_root, &["delete", "--force", id])
    }

    fn call(self, state_root: &Path, args: &[&str]) -> Result<(), RuntimeError> {
        let subcommand: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        let output = self
            .command(state_root, &subcommand)?
            .output()
            .map_err(RuntimeError::io(format!(
                "running {} {}",
                self.name(),
                args[0]
            )))?;
        if !output.status.success() {
            return Err(RuntimeError::InvalidOption(format!(
                "{} {}: {}",
                self.name(),
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }

    /// `RUNTIME --root STATE_ROOT ARGS…`, in a mount namespace of its own on
    /// a host whose cgroups crun refuses.
    fn command(
        self,
        state_root: &Path,
        subcommand: &[std::ffi::OsString],
    ) -> Result<Command, RuntimeError> {
        let binary = self.binary()?;
        let mut args = vec![binary.into_os_string(), "--root".into(), state_root.into()];
        args.extend(subcommand.iter().cloned());
        // crun refuses hosts with cgroup v1 and v2 both mounted ("hybrid"):
        // in a mount namespace of its own the v2 mount is hidden from it,
        // and the host keeps both.
        let command = if self == Runtime::Crun && hybrid_cgroups() {
            let mut shim: Vec<std::ffi::OsString> = vec![
                "--mount".into(),
                // Slave: the cgroup unmount stays in here, while unmounts on
                // the host (other images' lazy mounts) still reach this copy.
                "--propagation".into(),
                "slave".into(),
                "--".into(),
                "sh".into(),
                "-c".into(),
                format!("umount -l {HYBRID_V2_MOUNT} && exec \"$@\"").into(),
                "skiff-crun".into(),
            ];
            shim.append(&mut args);
            let mut command = Command::new("unshare");
            command.args(shim);
            command
        } else {
            let mut command = Command::new(&args[0]);
            command.args(&args[1..]);
            command
        };
        Ok(command)
    }
}

/// Where a hybrid host mounts cgroup v2 beside the v1 hierarchies.
const HYBRID_V2_MOUNT: &str = "/sys/fs/cgroup/unified";

/// Whether cgroup v2 is mounted at [`HYBRID_V2_MOUNT`] (v1 being at /sys/fs/cgroup).
fn hybrid_cgroups() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines().any(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let fs_type = fields
                .iter()
                .position(|f| *f == "-")
                .and_then(|dash| fields.get(dash + 1));
            fields.get(4) == Some(&HYBRID_V2_MOUNT) && fs_type == Some(&"cgroup2")
        })
    })
}
