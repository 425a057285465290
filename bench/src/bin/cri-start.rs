//! One cold start through CRI, as the kubelet makes it, for bench/containerd.sh.
//!
//! Starts a containerd of its own (and, for `skiff`, skiff's snapshotter)
//! with empty roots under WORK, pulls the sandbox image and starts the pod
//! untimed, then times PullImage of IMAGE, CreateContainer and
//! StartContainer until the container's log shows a line starting with
//! READY. Prints `{"pull_s":…,"ready_s":…}` (ready counts from the pull).
//!
//! Usage: cri-start skiff|overlayfs WORK REGISTRY PAUSE IMAGE READY -- CMD
//!   REGISTRY: HOST:PORT pulled from over plain HTTP (PAUSE's and IMAGE's)

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skiff_tests::cri::{Containerd, Kubelet, Snapshotter};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(split) = args.iter().position(|a| a == "--") else {
        bail!("usage: cri-start skiff|overlayfs WORK REGISTRY PAUSE IMAGE READY -- CMD");
    };
    let [variant, work, registry, pause, image, ready] = &args[..split] else {
        bail!("usage: cri-start skiff|overlayfs WORK REGISTRY PAUSE IMAGE READY -- CMD");
    };
    let command = args[split + 1..].join(" ");
    let work = PathBuf::from(work);
    std::fs::create_dir_all(&work)?;
    let insecure = [("SKIFF_INSECURE_REGISTRIES", registry.as_str())];
    // The snapshotter runs for both, so containerd's config is the same;
    // only CRI's snapshotter differs.
    // Images with skiff's artifacts attached come from the same registry.
    let snapshotter = Snapshotter::start_with(&work, &["--attached-from", registry], &insecure);
    let cri_snapshotter = match variant.as_str() {
        "skiff" => "skiff",
        "overlayfs" => "overlayfs",
        other => bail!("unknown variant {other}"),
    };
    let containerd = Containerd::start_with(&snapshotter, cri_snapshotter, &[registry], pause);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (pull_s, ready_s) = runtime
        .block_on(async {
            let mut kubelet = Kubelet::connect(&containerd).await;
            kubelet.pull(pause).await;
            let sandbox = kubelet.run_pod().await;
            let started = Instant::now();
            kubelet.pull(image).await;
            let pull_s = started.elapsed().as_secs_f64();
            kubelet.start(&sandbox, "app", image, &command).await;
            let deadline = started + Duration::from_secs(300);
            loop {
                let log =
                    std::fs::read_to_string(kubelet.logs_dir.join("app.log")).unwrap_or_default();
                // CRI log lines: "TIME STREAM TAG TEXT".
                if log
                    .lines()
                    .filter_map(|l| l.splitn(4, ' ').nth(3))
                    .any(|text| text.starts_with(ready.as_str()))
                {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("no line starting with {ready:?} in 300 s: {log}");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, anyhow::Error>((pull_s, started.elapsed().as_secs_f64()))
        })
        .context("timing the start")?;
    println!("{{\"pull_s\":{pull_s:.4},\"ready_s\":{ready_s:.4}}}");
    // Dropping them kills containerd, its shims and tasks, the snapshotter
    // and its mounts.
    drop(containerd);
    drop(snapshotter);
    Ok(())
}
