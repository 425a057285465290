//! skiff's snapshotter under a real containerd (Debian's 1.6), driven
//! through CRI as the kubelet drives it: pull, pod sandbox, container,
//! output, and nothing left behind once containerd collects its garbage.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::time::{Duration, Instant};

use skiff_snapshotter::api::snapshots::snapshots_client::SnapshotsClient;
use skiff_snapshotter::api::snapshots::ListSnapshotsRequest;
use skiff_tests::cri::v1::image_service_client::ImageServiceClient;
use skiff_tests::cri::v1::runtime_service_client::RuntimeServiceClient;
use skiff_tests::cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PullImageRequest,
    RemoveContainerRequest, RemoveImageRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopPodSandboxRequest,
};
use skiff_tests::cri::{channel, Containerd, Snapshotter};
use skiff_tests::*;

/// busybox with its applets; `extra` layers go on top.
fn busybox_image(extra: Vec<Layer>, cmd: &[&str]) -> Image {
    let base = busybox_layer(&["sh", "cat", "echo", "sleep", "test", "ls"])
        .file("etc/motd", 0o644, "layer 0 motd\n")
        .file("data/gone", 0o644, "whited out above\n");
    let mut layers = vec![(base, Compression::Gzip)];
    layers.extend(extra.into_iter().map(|l| (l, Compression::Gzip)));
    let mut image = Image::new(layers);
    image.config["config"]["Cmd"] = serde_json::json!(cmd);
    image
}

fn push(registry: &Registry, image: &Image, repo_tag: &str) -> String {
    let layout = tempdir();
    image.write_layout(layout.path(), "x");
    registry.push(layout.path(), "x", repo_tag);
    format!("127.0.0.1:{}/{repo_tag}", registry.port)
}

/// Mounts whose mount point or options (overlay's lowerdir, upperdir) name a
/// path under `prefix`.
fn mounts_under(prefix: &std::path::Path) -> Vec<String> {
    let prefix = prefix.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&prefix))
        .map(str::to_owned)
        .collect()
}

fn image_spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    })
}

#[test]
fn containerd_runs_ordinary_images_through_the_snapshotter_and_leaves_nothing_behind() {
    let dir = tempdir();
    let registry = Registry::start();
    let pause = push(
        &registry,
        &busybox_image(vec![], &["/bin/sleep", "600"]),
        "pause:1",
    );
    let top = Layer::new()
        .file("etc/motd", 0o644, "layer 1 motd\n")
        .whiteout("data", "gone")
        .file("data/hello", 0o644, "hello from containerd\n");
    let app = push(&registry, &busybox_image(vec![top], &["/bin/sh"]), "app:1");

    let snapshotter = Snapshotter::start(dir.path());
    let containerd = Containerd::start(&snapshotter, registry.port, &pause);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (output, during_run) = runtime.block_on(async {
        let cri = channel(&containerd.socket).await;
        let mut images = ImageServiceClient::new(cri.clone());
        let mut pods = RuntimeServiceClient::new(cri);
        images
            .pull_image(PullImageRequest {
                image: image_spec(&app),
                ..Default::default()
            })
            .await
            .unwrap();

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
        let sandbox = pods
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod.clone()),
                runtime_handler: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .pod_sandbox_id;
        let script = "cat /etc/motd /data/hello; test -e /data/gone || echo gone is gone; \
                      echo written > /tmp/w; cat /tmp/w";
        let container = pods
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.clone(),
                sandbox_config: Some(pod),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: "app".into(),
                        attempt: 0,
                    }),
                    image: image_spec(&app),
                    command: vec!["/bin/sh".into(), "-c".into(), script.into()],
                    log_path: "app.log".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .container_id;
        pods.start_container(StartContainerRequest {
            container_id: container.clone(),
        })
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let exit_code = loop {
            let status = pods
                .container_status(ContainerStatusRequest {
                    container_id: container.clone(),
                    verbose: false,
                })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap();
            if status.state == ContainerState::ContainerExited as i32 {
                break status.exit_code;
            }
            assert!(Instant::now() < deadline, "the container never exited");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(exit_code, 0);
        // Snapshots while it all exists: the layers and the rootfs came from skiff.
        let mut skiff = SnapshotsClient::new(channel(&snapshotter.socket).await);
        let mut listed = skiff
            .list(ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner();
        // The pod's sandbox still runs on an overlay of skiff's directories.
        let mounted = mounts_under(&snapshotter.root).len();
        let mut during_run = 0;
        while let Some(batch) = listed.message().await.unwrap() {
            during_run += batch.info.len();
        }
        // CRI log lines: "TIME STREAM TAG TEXT".
        let log = fs::read_to_string(containerd.logs_dir.join("app.log")).unwrap();
        let output: String = log
            .lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3))
            .map(|text| format!("{text}\n"))
            .collect();

        pods.remove_container(RemoveContainerRequest {
            container_id: container,
        })
        .await
        .unwrap();
        pods.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: sandbox.clone(),
        })
        .await
        .unwrap();
        pods.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: sandbox,
        })
        .await
        .unwrap();
        for image in [&app, &pause] {
            images
                .remove_image(RemoveImageRequest {
                    image: image_spec(image),
                })
                .await
                .unwrap();
        }
        (output, (during_run, mounted))
    });
    let (during_run, mounted_during_run) = during_run;
    assert!(mounted_during_run > 0, "no mount used skiff's snapshots");
    assert_eq!(
        output,
        "layer 1 motd\nhello from containerd\ngone is gone\nwritten\n",
        "containerd's log: {}\nskiff's log: {}",
        fs::read_to_string(&containerd.log).unwrap_or_default(),
        fs::read_to_string(&snapshotter.log).unwrap_or_default()
    );
    // app: 2 layers, pause: its 1 layer is app's first; a rootfs each.
    assert!(during_run >= 4, "{during_run} snapshots while running");

    // containerd's garbage collector removes every snapshot through skiff.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = fs::read_dir(snapshotter.root.join("snapshots"))
            .unwrap()
            .count();
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} snapshot directories left after containerd's GC: {}",
            fs::read_to_string(snapshotter.root.join("metadata.json")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(mounts_under(&snapshotter.root), Vec::<String>::new());
    assert_eq!(mounts_under(containerd.dir()), Vec::<String>::new());
    assert!(snapshotter.terminate().success());
}
