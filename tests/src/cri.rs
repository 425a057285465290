//! A real containerd (Debian's) with skiff's snapshotter as a proxy plugin,
//! driven through the CRI API as the kubelet drives it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{skiff_bin, tempdir};

/// The kubelet's API (`runtime.v1`), client side.
pub mod v1 {
    #![allow(clippy::all)]
    tonic::include_proto!("runtime.v1");
}

/// A gRPC channel to a unix socket.
pub async fn channel(socket: &Path) -> tonic::transport::Channel {
    let socket = socket.to_owned();
    tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

fn wait_for_socket(path: &Path, child: &mut Child, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}): {}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what} does not answer on {}: {}",
            path.display(),
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `skiff snapshotter` on a socket of its own, killed on drop.
pub struct Snapshotter {
    pub socket: PathBuf,
    pub root: PathBuf,
    pub log: PathBuf,
    child: Child,
    leave_mounts: bool,
}

impl Snapshotter {
    /// Starts it with its socket, root, run dir and chunk cache under `dir`
    /// (the same ones again when started again on `dir`), prefetch off so
    /// that what a pull fetches is what it needs.
    pub fn start(dir: &Path) -> Snapshotter {
        let socket = dir.join("skiff.sock");
        let root = dir.join("skiff-root");
        let log = dir.join("snapshotter.log");
        let mut child = Command::new(skiff_bin())
            .arg("snapshotter")
            .arg("--address")
            .arg(&socket)
            .arg("--root")
            .arg(&root)
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--cache")
            .arg(dir.join("cache"))
            .arg("--no-prefetch")
            .env("RUST_LOG", "skiff_snapshotter=debug,info")
            .stdout(Stdio::null())
            .stderr(
                fs::File::options()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        wait_for_socket(&socket, &mut child, "skiff snapshotter", &log);
        Snapshotter {
            socket,
            root,
            log,
            child,
            leave_mounts: false,
        }
    }

    /// The run dir it shares with `skiff run` (its lazy mounts are under `images/`).
    pub fn run_dir(&self) -> PathBuf {
        self.root.with_file_name("run")
    }

    /// Kills it (SIGKILL) and waits; its lazy mounts stay, as they would.
    pub fn kill(mut self) {
        self.leave_mounts = true;
    }

    /// Stops it as an init system would (SIGTERM) and waits; its lazy mounts stay.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.leave_mounts = true;
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.leave_mounts {
            // A failed test leaves lazy mounts; their daemons exit with them.
            unmount_under(&self.run_dir());
        }
    }
}

/// Lazily unmounts every mount at or under `dir`.
fn unmount_under(dir: &Path) {
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let dir = dir.display().to_string();
    for point in mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|p| p.starts_with(&dir))
    {
        let _ = Command::new("umount").args(["-l", point]).status();
    }
}

/// containerd with its own root, state and socket, CRI on, pulling from
/// `registry` over plain HTTP, with `snapshotter` as CRI's snapshotter.
pub struct Containerd {
    pub socket: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    pub logs_dir: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Containerd {
    pub fn start(snapshotter: &Snapshotter, registry_port: u16, sandbox_image: &str) -> Containerd {
        let dir = tempdir();
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let state = d.join("state");
        let log = d.join("containerd.log");
        let logs_dir = d.join("pod-logs");
        fs::create_dir_all(&logs_dir).unwrap();
        let registry = format!("127.0.0.1:{registry_port}");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[ttrpc]
  address = ""
[debug]
  level = "info"
[proxy_plugins]
  [proxy_plugins.skiff]
    type = "snapshot"
    address = "{skiff}"
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{sandbox_image}"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    # Hosts (and CI sandboxes) without CAP_SYS_RESOURCE cannot give the
    # sandbox its oom_score_adj of -998; containers keep containerd's instead.
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "skiff"
      disable_snapshot_annotations = false
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{cni}"
    [plugins."io.containerd.grpc.v1.cri".registry]
      [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry}"]
        endpoint = ["http://{registry}"]
"#,
            root = d.join("root").display(),
            state = state.display(),
            socket = socket.display(),
            skiff = snapshotter.socket.display(),
            cni = d.join("cni").display(),
        );
        let config_path = d.join("config.toml");
        fs::write(&config_path, config).unwrap();
        let mut child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("containerd is required (apt-get install containerd; `make test` installs it)");
        wait_for_socket(&socket, &mut child, "containerd", &log);
        Containerd {
            socket,
            state,
            log,
            logs_dir,
            child,
            _dir: dir,
        }
    }

    /// `ctr` against this containerd, in CRI's namespace.
    fn ctr(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
    }

    /// Where containerd keeps everything (root, state, logs).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // A failed test leaves tasks: they go first, or they would outlive it.
        if let Ok(out) = self.ctr(&["tasks", "ls", "-q"]) {
            for task in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", task]);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Shims outlive a killed containerd; they and their mounts go too.
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(format!("containerd-shim.*{}", self.socket.display()))
            .status();
        unmount_under(&self.state);
    }
}
