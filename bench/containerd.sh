#!/usr/bin/env bash
# containerd starting images as the kubelet asks (CRI: PullImage,
# CreateContainer, StartContainer), over the emulated wide-area link of
# bench/common.sh (100 Mbit/s, 20 ms round trip), side by side in one run:
#   (a) overlayfs: the original image (its gzip layers, pushed with skopeo)
#       through containerd's own overlayfs snapshotter;
#   (b) skiff: the same image converted and pushed with `skiff push`,
#       through skiff's snapshotter (lazy mount, prefetch on as by default);
#   (c) attached: the original image of (a), under its own name, with
#       skiff's artifacts attached by `skiff attach`, through skiff's
#       snapshotter.
# Both from Debian's docker-registry across the link. Each run is cold: a
# fresh containerd root, snapshotter root and chunk cache, page cache
# dropped; the pod sandbox (pause image) is up before the clock starts.
# Time from PullImage to the container's ready line; medians of $runs.
# Writes the table into docs/BENCHMARKS.md.
#
# Usage (root): make bench-containerd
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$HOME/.cache/skiff-target}/release
export SKIFF=${SKIFF:-$target/skiff} # cri-start starts the snapshotter with it
DELAY_PROXY=${DELAY_PROXY:-$target/delay-proxy}
CRI_START=${CRI_START:-$target/cri-start}
images_dir=${SKIFF_IMAGES:-/var/cache/skiff/images}
images=(${IMAGES:-base perl python git})
runs=${RUNS:-3}
rate=${RATE:-100mbit}
one_way_ms=${ONE_WAY_MS:-10}
ns=skiffbench
work=$(mktemp -d /var/tmp/skiff-containerd-bench.XXXXXX)
chmod 755 "$work" # nginx workers run as www-data
pids=()

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  unmount_under "$work"
  wan_down
  rm -rf "$work"
}
trap cleanup EXIT

for tool in containerd nginx curl tc ip jq skopeo umoci python3 docker-registry; do
  command -v "$tool" >/dev/null || { echo "$tool missing: tools/install-deps --bench" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "bench/containerd.sh needs root (containerd, FUSE, network namespaces)" >&2; exit 1; }
. bench/common.sh
. bench/hello_images.sh

results=$work/results.tsv
: > "$results"

echo "converting ${images[*]}..."
for image in "${images[@]}"; do
  [ -f "$images_dir/$image/index.json" ] || { echo "no $image in $images_dir: run tools/make-images" >&2; exit 1; }
  "$SKIFF" --store "$work/store" convert "oci:$images_dir/$image:latest" "$image:1" >/dev/null
done
wan_up "$work/store"
registry_up

# The sandbox image: busybox sleeping.
tools/make-sample-image "$work/pause" >/dev/null
umoci config --image "$work/pause:latest" --config.cmd /bin/sleep --config.cmd 3600
skopeo copy -q --dest-tls-verify=false "oci:$work/pause:latest" docker://10.78.0.2:5000/bench/pause:1

echo "pushing ${images[*]} as they are (with skiff's artifacts attached) and as skiff images..."
for image in "${images[@]}"; do
  skopeo copy -q --dest-tls-verify=false "oci:$images_dir/$image:latest" "docker://10.78.0.2:5000/bench/$image:1"
  SKIFF_INSECURE_REGISTRIES=10.78.0.2:5000 "$SKIFF" --store "$work/store" push "$image:1" "docker://10.78.0.2:5000/bench/skiff-$image:1" >/dev/null
  SKIFF_INSECURE_REGISTRIES=10.78.0.2:5000 "$SKIFF" --store "$work/attach-store" attach "docker://10.78.0.2:5000/bench/$image:1" >/dev/null
done

for run in $(seq "$runs"); do
  for image in "${images[@]}"; do
    for variant in overlayfs skiff attached; do
      case $variant in
        overlayfs) ref=$registry/bench/$image:1 snapshotter=overlayfs ;;
        skiff) ref=$registry/bench/skiff-$image:1 snapshotter=skiff ;;
        attached) ref=$registry/bench/$image:1 snapshotter=skiff ;;
      esac
      drop_caches
      out=$("$CRI_START" "$snapshotter" "$work/run-$run-$image-$variant" "$registry" "$registry/bench/pause:1" \
        "$ref" "${ready[$image]#^}" -- "${command[$image]}")
      # The mount daemons exit once unmounted; one may still be writing to its cache.
      for _ in 1 2 3 4 5 6 7 8 9 10; do rm -rf "$work/run-$run-$image-$variant" 2>/dev/null && break; sleep 0.5; done
      pull=$(jq -r .pull_s <<<"$out"); ready_s=$(jq -r .ready_s <<<"$out")
      printf '%s\t%s\t%s\t%s\n' "$image" "$variant" "$pull" "$ready_s" >> "$results"
      echo "  run $run $image $variant: pull $pull s, ready $ready_s s"
    done
  done
done

python3 - "$results" "$rate" "$one_way_ms" "$runs" <<'PY' > "$work/table.md"
import statistics, sys
from collections import defaultdict
path, rate, one_way, runs = sys.argv[1:]
rows = defaultdict(lambda: defaultdict(list))
for line in open(path):
    image, variant, pull, ready = line.split("\t")
    rows[image][variant].append((float(pull), float(ready)))
print(f"Over {rate}, {2*int(one_way)} ms round trip; medians of {runs} cold runs (containerd 1.6 through CRI).\n")
print("| image | overlayfs: pull | overlayfs: ready | skiff image: pull | skiff image: ready | attached: pull | attached: ready | ready, overlayfs / skiff image | ready, overlayfs / attached |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
ratios, attached_ratios = [], []
for image, by in rows.items():
    med = {v: (statistics.median(p for p, _ in r), statistics.median(t for _, t in r)) for v, r in by.items()}
    o, s, a = med["overlayfs"], med["skiff"], med["attached"]
    ratios.append(o[1] / s[1])
    attached_ratios.append(o[1] / a[1])
    print(f"| {image} | {o[0]:.2f} s | {o[1]:.2f} s | {s[0]:.2f} s | {s[1]:.2f} s | {a[0]:.2f} s | {a[1]:.2f} s | {o[1]/s[1]:.1f}x | {o[1]/a[1]:.1f}x |")
print(f"\nMedian ratio over the images: {statistics.median(ratios):.1f}x for skiff images, "
      f"{statistics.median(attached_ratios):.1f}x for the original images with skiff's artifacts attached.")
PY
cat "$work/table.md"
python3 - "$work/table.md" "$(uname -r)" "$(nproc)" <<'PY' >/dev/null
import datetime, sys
sys.path.insert(0, "bench")
from benchdoc import write_section
table = open(sys.argv[1]).read()
write_section("containerd", "containerd through CRI: original images vs skiff's snapshotter (`make bench-containerd`)",
              f"Measured {datetime.date.today()} on a shared {sys.argv[3]}-core machine (Linux {sys.argv[2]}) with "
              f"`make bench-containerd` (`bench/containerd.sh`): time from CRI PullImage to the container's ready "
              f"line, the original image through containerd's overlayfs snapshotter against the skiff image "
              f"through skiff's, and against the original image (same name, same tag) with skiff's artifacts "
              f"attached by `skiff attach` through skiff's, all from Debian's docker-registry across the "
              f"emulated link.\n\n{table}")
PY
echo "wrote docs/BENCHMARKS.md"
