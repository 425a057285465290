//! skiff's snapshotter under a real containerd (Debian's 1.6), driven
//! through CRI as the kubelet drives it: pull, pod sandbox, container,
//! output, and nothing left behind once containerd collects its garbage;
//! ordinary images unpacked, skiff images mounted lazily with nothing
//! downloaded at the pull, across restarts of the snapshotter.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use skiff_snapshotter::api::snapshots::snapshots_client::SnapshotsClient;
use skiff_snapshotter::api::snapshots::{
    ListSnapshotsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use skiff_tests::cri::{channel, Containerd, Kubelet, Snapshotter};
use skiff_tests::registry_proxy::RegistryProxy;
use skiff_tests::*;

/// busybox with its applets; `extra` layers go on top.
fn busybox_image(extra: Vec<Layer>, cmd: &[&str]) -> Image {
    let base = busybox_layer(&["sh", "cat", "echo", "sleep", "test", "ls", "sha256sum"])
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

/// The snapshots skiff's snapshotter holds: (name, labels).
async fn skiff_snapshots(
    snapshotter: &Snapshotter,
) -> Vec<(String, std::collections::HashMap<String, String>)> {
    let mut skiff = SnapshotsClient::new(channel(&snapshotter.socket).await);
    let mut listed = skiff
        .list(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut all = Vec::new();
    while let Some(batch) = listed.message().await.unwrap() {
        all.extend(batch.info.into_iter().map(|i| (i.name, i.labels)));
    }
    all
}

/// Waits for containerd's garbage collector to remove every snapshot
/// through skiff, then checks that no mount is left under any of `dirs`.
fn assert_all_collected(snapshotter: &Snapshotter, dirs: &[&Path]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = fs::read_dir(snapshotter.root.join("snapshots"))
            .unwrap()
            .count();
        let metadata =
            fs::read_to_string(snapshotter.root.join("metadata.json")).unwrap_or_default();
        let remote_left = metadata.contains("\"remote\"");
        if left == 0 && !remote_left {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} snapshot directories left after containerd's GC: {metadata}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for dir in dirs {
        assert_eq!(
            mounts_under(dir),
            Vec::<String>::new(),
            "under {}",
            dir.display()
        );
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
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
    let (output, during_run, mounted_during_run) = runtime().block_on(async {
        let mut kubelet = Kubelet::connect(&containerd).await;
        kubelet.pull(&app).await;
        let sandbox = kubelet.run_pod().await;
        let script = "cat /etc/motd /data/hello; test -e /data/gone || echo gone is gone; \
                      echo written > /tmp/w; cat /tmp/w";
        let container = kubelet.start(&sandbox, "app", &app, script).await;
        assert_eq!(kubelet.wait_exit(&container).await, 0);
        // Snapshots while it all exists: the layers and the rootfs came from skiff.
        let during_run = skiff_snapshots(&snapshotter).await.len();
        // The pod's sandbox still runs on an overlay of skiff's directories.
        let mounted = mounts_under(&snapshotter.root).len();
        let output = kubelet.output("app");
        kubelet
            .remove(&[container], &sandbox, &[&app, &pause])
            .await;
        (output, during_run, mounted)
    });
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
    assert_all_collected(&snapshotter, &[&snapshotter.root, containerd.dir()]);
    assert!(snapshotter.terminate().success());
}

/// Blob digests fetched through `proxy` since `from` log lines.
fn blobs_fetched(proxy: &RegistryProxy, from: usize) -> BTreeSet<String> {
    proxy.stats.log.lock().unwrap()[from..]
        .iter()
        .filter(|line| line.starts_with("GET "))
        .filter_map(|line| {
            let path = line.split(' ').nth(1)?.split('?').next()?;
            let (_, digest) = path.rsplit_once("/blobs/")?;
            digest.starts_with("sha256:").then(|| digest.to_owned())
        })
        .collect()
}

#[test]
fn containerd_starts_a_skiff_image_lazily_and_the_snapshotter_restarts_under_it() {
    let dir = tempdir();
    let registry = Registry::start();
    let proxy = RegistryProxy::start(&format!("http://127.0.0.1:{}", registry.port));
    let registry_host = format!("127.0.0.1:{}", proxy.port);
    // The sandbox image is an ordinary one, through the same snapshotter.
    let pause = push(
        &registry,
        &busybox_image(vec![], &["/bin/sleep", "600"]),
        "pause:1",
    )
    .replace(
        &format!(":{}/", registry.port),
        &format!(":{}/", proxy.port),
    );
    let big = noise(3_000_000, 7);
    let top = Layer::new()
        .file("etc/motd", 0o644, "lazy motd\n")
        .whiteout("data", "gone")
        .file("data/big", 0o644, big.clone());
    let layout = dir.path().join("layout");
    busybox_image(vec![top], &["/bin/sh"]).write_layout(&layout, "v1");
    let store = dir.path().join("store");
    skiff_ok(
        &store,
        &["convert", &format!("oci:{}:v1", layout.display()), "lazy:1"],
    );
    let app = format!("{registry_host}/team/lazy:1");
    skiff_ok(&store, &["push", "lazy:1", &format!("docker://{app}")]);

    // What the tag holds: the launcher containerd pulls, and skiff's artifact.
    let index = oci_manifest(&proxy.url, "team/lazy", "1", None);
    let launcher = oci_manifest(
        &proxy.url,
        "team/lazy",
        index["manifests"][0]["digest"].as_str().unwrap(),
        None,
    );
    let artifact = skiff_artifact_manifest(&proxy.url, "team/lazy", "1", None);
    let launcher_layer = launcher["layers"][0]["digest"].as_str().unwrap().to_owned();
    // The skiff manifest, index and chunk table: what a mount reads first.
    let metadata_blobs: BTreeSet<String> = artifact["layers"].as_array().unwrap()[..3]
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    let packs: BTreeSet<String> = artifact["layers"].as_array().unwrap()[3..]
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    assert!(!packs.is_empty());

    let metrics_port = free_port();
    let metrics_address = format!("127.0.0.1:{metrics_port}");
    let snapshotter = Snapshotter::start_with(
        dir.path(),
        &["--no-prefetch", "--metrics-address", &metrics_address],
        &[],
    );
    let metrics = format!("http://{metrics_address}");
    let containerd = Containerd::start(&snapshotter, proxy.port, &pause);
    let rt = runtime();
    let mut kubelet = rt.block_on(Kubelet::connect(&containerd));
    let before_pull = proxy.stats.log.lock().unwrap().len();
    rt.block_on(kubelet.pull(&app));
    let pulled = blobs_fetched(&proxy, before_pull);
    assert!(
        !pulled.contains(&launcher_layer),
        "containerd downloaded the launcher's layer: {pulled:?}\nskiff's log: {}",
        fs::read_to_string(&snapshotter.log).unwrap_or_default()
    );
    let fetched_packs: Vec<&String> = pulled.intersection(&packs).collect();
    assert!(
        fetched_packs.is_empty(),
        "the pull fetched pack blobs {fetched_packs:?}"
    );
    // Only the launcher's config (containerd) and the image's metadata (skiff).
    let mut expected = metadata_blobs.clone();
    expected.insert(launcher["config"]["digest"].as_str().unwrap().to_owned());
    assert_eq!(pulled, expected);
    let remote: Vec<_> = rt
        .block_on(skiff_snapshots(&snapshotter))
        .into_iter()
        .filter(|(_, labels)| labels.contains_key("containerd.io/snapshot/remote"))
        .collect();
    assert_eq!(remote.len(), 1, "{remote:?}");
    // What an operator's Prometheus sees of that pull.
    let metric = |name: &str, labels: &[&str]| metric_at(&metrics, name, labels);
    assert_eq!(
        metric(
            "skiff_snapshotter_calls_total",
            &[r#"call="prepare""#, r#"code="already_exists""#]
        ),
        1.0
    );
    assert_eq!(
        metric(
            "skiff_snapshotter_remote_snapshots_total",
            &[r#"source="launcher""#]
        ),
        1.0
    );
    assert_eq!(
        metric("skiff_snapshotter_lazy_mounts_total", &[r#"reason="pull""#]),
        1.0
    );
    assert_eq!(
        metric("skiff_snapshotter_snapshots", &[r#"kind="remote""#]),
        1.0
    );
    let images = snapshotter.run_dir().join("images");
    assert_eq!(
        mounts_under(&images).len(),
        1,
        "one lazy mount for the image"
    );
    // Its setuid binaries and device nodes are out of other users' reach.
    let mode = fs::metadata(&images).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    // A launcher naming this artifact under another chain id, or on a
    // parent, would stand for another image on the host: refused.
    let (chain, labels) = remote[0].clone();
    let forged = |target: &str, parent: &str| {
        let mut labels = labels.clone();
        labels.insert("containerd.io/snapshot.ref".into(), target.into());
        PrepareSnapshotRequest {
            snapshotter: String::new(),
            key: format!("extract-forged {target}"),
            parent: parent.into(),
            labels,
        }
    };
    let other_chain = format!("sha256:{}", "ab".repeat(32));
    for (request, code) in [
        (forged(&other_chain, ""), tonic::Code::InvalidArgument),
        (forged(&other_chain, &chain), tonic::Code::InvalidArgument),
        // The real chain id is there: nothing to do.
        (forged(&chain, ""), tonic::Code::AlreadyExists),
    ] {
        let refused = rt.block_on(async {
            let mut skiff = SnapshotsClient::new(channel(&snapshotter.socket).await);
            skiff.prepare(request).await.unwrap_err()
        });
        assert_eq!(refused.code(), code, "{refused}");
    }
    assert_eq!(rt.block_on(skiff_snapshots(&snapshotter)).len(), 1);

    // The container runs on an overlay of the lazy mount; reading fetches ranges.
    let ranges_before = proxy.stats.range_gets.load(SeqCst);
    let sandbox = rt.block_on(kubelet.run_pod());
    let script = "cat /etc/motd; test -e /data/gone || echo gone is gone; \
                  wc -c < /data/big; echo written > /tmp/w; cat /tmp/w";
    let first = rt.block_on(kubelet.start(&sandbox, "first", &app, script));
    assert_eq!(
        rt.block_on(kubelet.wait_exit(&first)),
        0,
        "{}",
        kubelet.output("first")
    );
    assert_eq!(
        kubelet.output("first"),
        "lazy motd\ngone is gone\n3000000\nwritten\n"
    );
    assert!(
        proxy.stats.range_gets.load(SeqCst) > ranges_before,
        "nothing was read lazily"
    );

    // A container that stays up, across a kill -9 and a SIGTERM of the snapshotter.
    let long = rt.block_on(kubelet.start(&sandbox, "long", &app, "sleep 600"));
    let overlays = mounts_under(&images)
        .into_iter()
        .filter(|m| m.contains(" - overlay "))
        .count();
    assert_eq!(
        overlays,
        1,
        "the rootfs is not an overlay on the lazy mount: {:?}",
        mounts_under(&images)
    );
    let killed = snapshotter;
    killed.kill();
    assert_eq!(
        rt.block_on(kubelet.exec(&long, &["cat", "/etc/motd"])),
        ("lazy motd\n".to_owned(), 0),
        "the rootfs went with the snapshotter"
    );
    let snapshotter = Snapshotter::start(dir.path());
    let third = rt.block_on(kubelet.start(&sandbox, "after-kill", &app, "cat /etc/motd"));
    assert_eq!(rt.block_on(kubelet.wait_exit(&third)), 0);
    assert_eq!(kubelet.output("after-kill"), "lazy motd\n");
    assert!(snapshotter.terminate().success());
    let snapshotter = Snapshotter::start(dir.path());
    assert_eq!(
        rt.block_on(kubelet.exec(&long, &["/bin/sh", "-c", "wc -c < /data/big"]))
            .0,
        "3000000\n"
    );
    assert_eq!(
        mounts_under(&images)
            .iter()
            .filter(|m| m.contains("fuse"))
            .count(),
        1
    );
    let fourth = rt.block_on(kubelet.start(&sandbox, "after-term", &app, "cat /etc/motd"));
    assert_eq!(rt.block_on(kubelet.wait_exit(&fourth)), 0);
    assert_eq!(kubelet.output("after-term"), "lazy motd\n");

    // kill -9 of the lazy mount's daemon under the running container: its
    // supervisor's next daemon takes the mount over, and the container reads on.
    let daemon_pid = || {
        let records: Vec<serde_json::Value> = fs::read_dir(snapshotter.run_dir().join("mounts"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter(|p| !p.to_string_lossy().ends_with(".manifest.json"))
            .filter(|p| !p.to_string_lossy().ends_with(".stats.json"))
            .map(|p| serde_json::from_slice(&fs::read(p).unwrap()).unwrap())
            .collect();
        assert_eq!(records.len(), 1, "{records:?}");
        records[0]["pid"].as_u64().unwrap()
    };
    let killed_daemon = daemon_pid();
    assert!(std::process::Command::new("kill")
        .args(["-9", &killed_daemon.to_string()])
        .status()
        .unwrap()
        .success());
    // What the container reads next comes through the mount, not the page cache.
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_eq!(
        rt.block_on(kubelet.exec(&long, &["/bin/sh", "-c", "sha256sum < /data/big"]))
            .0,
        format!("{}  -\n", sha256(&big).trim_start_matches("sha256:"))
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon_pid() == killed_daemon {
        assert!(Instant::now() < deadline, "no daemon took over");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Gone with the containers and the image: no snapshot, no mount.
    rt.block_on(kubelet.remove(&[first, long, third, fourth], &sandbox, &[&app, &pause]));
    assert_all_collected(
        &snapshotter,
        &[&snapshotter.root, containerd.dir(), &images],
    );
    assert!(snapshotter.terminate().success());
}

/// The raw manifest at `repo:reference` and its digest.
fn manifest_bytes(base_url: &str, repo: &str, reference: &str) -> (Vec<u8>, String) {
    let response = reqwest::blocking::Client::new()
        .get(format!("{base_url}/v2/{repo}/manifests/{reference}"))
        .header(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
        )
        .send()
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let bytes = response.bytes().unwrap().to_vec();
    let digest = sha256(&bytes);
    (bytes, digest)
}

#[test]
fn containerd_mounts_an_ordinary_image_lazily_through_the_artifacts_attached_to_it() {
    attached_image_runs_lazily(false);
}

#[test]
fn attached_artifacts_are_found_through_the_referrers_api_where_there_is_one() {
    attached_image_runs_lazily(true);
}

/// An ordinary image with skiff's artifacts attached (through the
/// registry's referrers API, or distribution 2.8's lack of one), pulled
/// and run through CRI beside an image that shares its base. With the
/// API, the pod sandbox (whose one layer is that base) is up first, so
/// containerd has unpacked the base itself and only the top prefix is
/// remote; without, the image comes first and the sandbox stands on its
/// lazy first prefix.
fn attached_image_runs_lazily(referrers_api: bool) {
    let dir = tempdir();
    let registry = Registry::start();
    let registry_url = format!("http://127.0.0.1:{}", registry.port);
    let proxy = RegistryProxy::start(&registry_url);
    let through_proxy = |image: String| {
        image.replace(
            &format!(":{}/", registry.port),
            &format!(":{}/", proxy.port),
        )
    };
    // The sandbox image shares its one layer with both images below.
    let pause = through_proxy(push(
        &registry,
        &busybox_image(vec![], &["/bin/sleep", "600"]),
        "pause:1",
    ));
    let top = Layer::new()
        .file("etc/motd", 0o644, "attached motd\n")
        .whiteout("data", "gone")
        .file("data/big", 0o644, noise(2_000_000, 11));
    let app = push(
        &registry,
        &busybox_image(vec![top], &["/bin/sh"]),
        "team/plain:1",
    );
    let (original, subject) = manifest_bytes(&registry_url, "team/plain", "1");
    let layer_blobs: BTreeSet<String> = serde_json::from_slice::<serde_json::Value>(&original)
        .unwrap()["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(layer_blobs.len(), 2);
    proxy.mode.referrers_api.store(referrers_api, SeqCst);
    let app = through_proxy(app);
    let attach = || {
        skiff_json(
            &dir.path().join("store"),
            &["attach", &format!("docker://{app}"), "--json"],
        )
    };
    let report = attach();
    assert_eq!(report["artifacts"].as_array().unwrap().len(), 2, "{report}");
    assert_eq!(report["referrers_api"], referrers_api, "{report}");
    // The tag still names the original image.
    assert_eq!(manifest_bytes(&registry_url, "team/plain", "1").0, original);
    let fallback_tag = format!(
        "{registry_url}/v2/team/plain/manifests/{}",
        subject.replace(':', "-")
    );
    let listed = || -> serde_json::Value {
        let url = match referrers_api {
            true => format!("{}/v2/team/plain/referrers/{subject}", proxy.url),
            false => fallback_tag.clone(),
        };
        let response = reqwest::blocking::Client::new()
            .get(url)
            .header("Accept", "application/vnd.oci.image.index.v1+json")
            .send()
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        serde_json::from_slice(&response.bytes().unwrap()).unwrap()
    };
    if referrers_api {
        // The registry lists them: no fallback tag.
        let status = reqwest::blocking::get(&fallback_tag).unwrap().status();
        assert_eq!(status, 404);
    }
    let index = listed();
    let chains: Vec<String> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["artifactType"], "application/vnd.skiff.image.v1");
            m["annotations"]["dev.skiff.chain-id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(chains.len(), 2, "{index}");
    // Attaching again replaces skiff's entries instead of adding to them.
    attach();
    assert_eq!(listed()["manifests"].as_array().unwrap().len(), 2);

    // An image with the same base and no artifact of its own.
    let other_top = Layer::new().file("etc/motd", 0o644, "other motd\n");
    let other = through_proxy(push(
        &registry,
        &busybox_image(vec![other_top], &["/bin/sh"]),
        "team/other:1",
    ));

    let metrics_address = format!("127.0.0.1:{}", free_port());
    let trusted = format!("127.0.0.1:{}/team/plain", proxy.port);
    let snapshotter = Snapshotter::start_with(
        dir.path(),
        &[
            "--no-prefetch",
            "--metrics-address",
            &metrics_address,
            "--attached-from",
            &trusted,
        ],
        &[],
    );
    let metric =
        |name: &str, label: &str| metric_at(&format!("http://{metrics_address}"), name, &[label]);
    let containerd = Containerd::start(&snapshotter, proxy.port, &pause);
    let rt = runtime();
    // The second layer's artifact holds it on the first: asked for on no
    // parent, it is unpacked as any other layer would be.
    let forged = PrepareSnapshotRequest {
        snapshotter: String::new(),
        key: "extract-forged".into(),
        parent: String::new(),
        labels: [
            ("containerd.io/snapshot.ref", chains[1].as_str()),
            ("containerd.io/snapshot/cri.image-ref", app.as_str()),
            (
                "containerd.io/snapshot/cri.manifest-digest",
                subject.as_str(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
    };
    rt.block_on(async {
        let mut skiff = SnapshotsClient::new(channel(&snapshotter.socket).await);
        skiff.prepare(forged).await.unwrap();
        let made = skiff_snapshots(&snapshotter).await;
        assert_eq!(made.len(), 1, "{made:?}");
        assert_eq!(made[0].0, "extract-forged");
        assert!(!made[0].1.contains_key("containerd.io/snapshot/remote"));
        skiff
            .remove(RemoveSnapshotRequest {
                snapshotter: String::new(),
                key: "extract-forged".into(),
            })
            .await
            .unwrap();
    });
    let mut kubelet = rt.block_on(Kubelet::connect(&containerd));
    let sandbox_first = referrers_api;
    let mut sandbox = String::new();
    if sandbox_first {
        sandbox = rt.block_on(kubelet.run_pod());
    }
    let before_pull = proxy.stats.log.lock().unwrap().len();
    rt.block_on(kubelet.pull(&app));
    let pulled = blobs_fetched(&proxy, before_pull);
    let fetched_layers: Vec<&String> = pulled.intersection(&layer_blobs).collect();
    assert!(
        fetched_layers.is_empty(),
        "the pull downloaded layers {fetched_layers:?}\nskiff's log: {}",
        fs::read_to_string(&snapshotter.log).unwrap_or_default()
    );
    let remote: Vec<String> = rt
        .block_on(skiff_snapshots(&snapshotter))
        .into_iter()
        .filter(|(_, labels)| labels.contains_key("containerd.io/snapshot/remote"))
        .map(|(name, _)| name)
        .collect();
    // One remote snapshot for each layer prefix not unpacked already, named by its chain id.
    let expected_remote = if sandbox_first {
        &chains[1..]
    } else {
        &chains[..]
    };
    assert_eq!(
        remote.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        expected_remote
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
    );
    let images = snapshotter.run_dir().join("images");
    let lazy_mounts = || {
        mounts_under(&images)
            .iter()
            .filter(|m| m.contains("fuse"))
            .count()
    };
    assert_eq!(lazy_mounts(), 0, "mounted before anything needed it");

    let ranges_before = proxy.stats.range_gets.load(SeqCst);
    if !sandbox_first {
        sandbox = rt.block_on(kubelet.run_pod());
    }
    let script = "cat /etc/motd; test -e /data/gone || echo gone is gone; wc -c < /data/big";
    let first = rt.block_on(kubelet.start(&sandbox, "first", &app, script));
    assert_eq!(
        rt.block_on(kubelet.wait_exit(&first)),
        0,
        "{}\nskiff's log: {}",
        kubelet.output("first"),
        fs::read_to_string(&snapshotter.log).unwrap_or_default()
    );
    assert_eq!(
        kubelet.output("first"),
        "attached motd\ngone is gone\n2000000\n"
    );
    assert!(
        proxy.stats.range_gets.load(SeqCst) > ranges_before,
        "nothing was read lazily"
    );
    // The container stands on both layers' prefix; the sandbox, unless
    // containerd unpacked its layer first, on the first layer's.
    let remote_count = expected_remote.len();
    assert_eq!(lazy_mounts(), remote_count, "{:?}", mounts_under(&images));
    for (name, label, value) in [
        (
            "skiff_snapshotter_remote_snapshots_total",
            r#"source="attached""#,
            remote_count as f64,
        ),
        (
            "skiff_snapshotter_attached_lookups_total",
            r#"outcome="found""#,
            remote_count as f64,
        ),
        (
            "skiff_snapshotter_attached_lookups_total",
            r#"outcome="refused""#,
            1.0,
        ),
        (
            "skiff_snapshotter_lazy_mounts_total",
            r#"reason="first_use""#,
            remote_count as f64,
        ),
    ] {
        assert_eq!(metric(name, label), value, "{name}{{{label}}}");
    }

    // The other image's own layer unpacks onto the shared base (its lazy mount, if remote).
    let before_other = proxy.stats.log.lock().unwrap().len();
    rt.block_on(kubelet.pull(&other));
    let other_pulled = blobs_fetched(&proxy, before_other);
    let base_blob = layer_blobs
        .iter()
        .find(|b| other_pulled.contains(*b))
        .cloned();
    assert_eq!(base_blob, None, "the shared base was downloaded");
    let second = rt.block_on(kubelet.start(&sandbox, "second", &other, "cat /etc/motd /data/gone"));
    assert_eq!(
        rt.block_on(kubelet.wait_exit(&second)),
        0,
        "{}",
        kubelet.output("second")
    );
    assert_eq!(kubelet.output("second"), "other motd\nwhited out above\n");
    assert_eq!(lazy_mounts(), remote_count, "{:?}", mounts_under(&images));

    rt.block_on(kubelet.remove(&[first, second], &sandbox, &[&app, &other, &pause]));
    assert_all_collected(
        &snapshotter,
        &[&snapshotter.root, containerd.dir(), &images],
    );
    assert!(snapshotter.terminate().success());
}
