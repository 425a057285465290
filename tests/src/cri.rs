//! A real containerd (Debian's) with skiff's snapshotter as a proxy plugin,
//! driven through the CRI API as the kubelet drives it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use v1::image_service_client::ImageServiceClient;
use v1::runtime_service_client::RuntimeServiceClient;
use v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ExecSyncRequest, ImageSpec, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, PullImageRequest, RemoveContainerRequest, RemoveImageRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};

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
        Self::start_with(dir, &["--no-prefetch"], &[])
    }

    /// Starts it as [`Snapshotter::start`] does, with `args` for the mount
    /// options and `env` added.
    pub fn start_with(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Snapshotter {
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
            .args(args)
            .envs(env.iter().copied())
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
        let registry = format!("127.0.0.1:{registry_port}");
        Self::start_with(snapshotter, "skiff", &[&registry], sandbox_image)
    }

    /// containerd with `cri_snapshotter` (`skiff`, or containerd's own
    /// `overlayfs`) as CRI's, pulling from each of `registries`
    /// (`HOST:PORT`) over plain HTTP.
    pub fn start_with(
        snapshotter: &Snapshotter,
        cri_snapshotter: &str,
        registries: &[&str],
        sandbox_image: &str,
    ) -> Containerd {
        let dir = tempdir();
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let state = d.join("state");
        let log = d.join("containerd.log");
        let logs_dir = d.join("pod-logs");
        fs::create_dir_all(&logs_dir).unwrap();
        let mirrors: String = registries
            .iter()
            .map(|r| {
                format!(
                    "      [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{r}\"]\n        endpoint = [\"http://{r}\"]\n"
                )
            })
            .collect();
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
      snapshotter = "{cri_snapshotter}"
      disable_snapshot_annotations = false
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{cni}"
    [plugins."io.containerd.grpc.v1.cri".registry]
{mirrors}"#,
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

pub fn image_spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    })
}

/// The kubelet's side of CRI, for one pod on the host's network.
pub struct Kubelet {
    pub images: ImageServiceClient<Channel>,
    pub pods: RuntimeServiceClient<Channel>,
    pub logs_dir: std::path::PathBuf,
    pod: PodSandboxConfig,
}

impl Kubelet {
    pub async fn connect(containerd: &Containerd) -> Kubelet {
        let cri = channel(&containerd.socket).await;
        let pod = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "pod".into(),
                uid: "pod-uid".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            log_directory: containerd.logs_dir.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        Kubelet {
            images: ImageServiceClient::new(cri.clone()),
            pods: RuntimeServiceClient::new(cri),
            logs_dir: containerd.logs_dir.clone(),
            pod,
        }
    }

    pub async fn pull(&mut self, image: &str) {
        self.images
            .pull_image(PullImageRequest {
                image: image_spec(image),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    pub async fn run_pod(&mut self) -> String {
        self.pods
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(self.pod.clone()),
                runtime_handler: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .pod_sandbox_id
    }

    /// Creates and starts container `name` running `sh -c script`; retries
    /// while containerd cannot reach the snapshotter (it redials a
    /// restarted one after a backoff), as the kubelet would.
    pub async fn start(&mut self, sandbox: &str, name: &str, image: &str, script: &str) -> String {
        let request = CreateContainerRequest {
            pod_sandbox_id: sandbox.to_owned(),
            sandbox_config: Some(self.pod.clone()),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                image: image_spec(image),
                command: vec!["/bin/sh".into(), "-c".into(), script.into()],
                log_path: format!("{name}.log"),
                ..Default::default()
            }),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let container = loop {
            match self.pods.create_container(request.clone()).await {
                Ok(created) => break created.into_inner().container_id,
                Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("creating {name}: {e}"),
            }
        };
        self.pods
            .start_container(StartContainerRequest {
                container_id: container.clone(),
            })
            .await
            .unwrap();
        container
    }

    pub async fn wait_exit(&mut self, container: &str) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self
                .pods
                .container_status(ContainerStatusRequest {
                    container_id: container.to_owned(),
                    verbose: false,
                })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap();
            if status.state == ContainerState::ContainerExited as i32 {
                return status.exit_code;
            }
            assert!(Instant::now() < deadline, "the container never exited");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What container `name` wrote (CRI log lines: "TIME STREAM TAG TEXT").
    pub fn output(&self, name: &str) -> String {
        let log = fs::read_to_string(self.logs_dir.join(format!("{name}.log"))).unwrap();
        log.lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3))
            .map(|text| format!("{text}\n"))
            .collect()
    }

    /// Runs `cmd` in a running container; its stdout and exit code.
    pub async fn exec(&mut self, container: &str, cmd: &[&str]) -> (String, i32) {
        let out = self
            .pods
            .exec_sync(ExecSyncRequest {
                container_id: container.to_owned(),
                cmd: cmd.iter().map(|c| c.to_string()).collect(),
                timeout: 20,
            })
            .await
            .unwrap()
            .into_inner();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            out.exit_code,
        )
    }

    /// Removes the containers, the pod and the images, as the kubelet does.
    pub async fn remove(&mut self, containers: &[String], sandbox: &str, images: &[&str]) {
        for container in containers {
            self.pods
                .remove_container(RemoveContainerRequest {
                    container_id: container.clone(),
                })
                .await
                .unwrap();
        }
        self.pods
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: sandbox.to_owned(),
            })
            .await
            .unwrap();
        self.pods
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: sandbox.to_owned(),
            })
            .await
            .unwrap();
        for image in images {
            self.images
                .remove_image(RemoveImageRequest {
                    image: image_spec(image),
                })
                .await
                .unwrap();
        }
    }
}
