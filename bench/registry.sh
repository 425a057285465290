#!/usr/bin/env bash
# An OCI registry as skiff's distribution engine, against `skiff serve` and
# the plain pull, over the emulated wide-area link of bench/common.sh
# (100 Mbit/s, 20 ms round trip), side by side in one run. For each image:
#   HelloBench (time from the command to the ready line, empty cache, with
#   the startup profile recorded the same way through each):
#     (a) plain: gzip layers from nginx across the link, tar, crun;
#     (b) skiff run NAME:TAG --server (skiff serve across the link);
#     (c) skiff run docker://… (Debian's docker-registry across the link);
#   a cold full read (`find -type f -exec cat`, empty cache, prefetch on as by default):
#     (d) plain: download and unpack the gzip layers, then read the tree;
#     (e) through a lazy mount from skiff serve;
#     (f) through a lazy mount from the registry;
# and the registry's bytes on disk for the dataset against its gzip layers.
# Writes the tables into docs/BENCHMARKS.md.
#
# Usage (root): SKIFF=... DELAY_PROXY=... bench/registry.sh   (make bench-registry does this)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$HOME/.cache/skiff-target}/release
SKIFF=${SKIFF:-$target/skiff}
DELAY_PROXY=${DELAY_PROXY:-$target/delay-proxy}
images_dir=${SKIFF_IMAGES:-/var/cache/skiff/images}
images=(${IMAGES:-base perl ruby golang git python})
runs=${RUNS:-3}
rate=${RATE:-100mbit}
one_way_ms=${ONE_WAY_MS:-10}
ns=skiffbench
work=$(mktemp -d /var/tmp/skiff-registry-bench.XXXXXX)
chmod 755 "$work" # nginx workers run as www-data
pids=()

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  unmount_under "$work"
  wan_down
  rm -rf "$work"
}
trap cleanup EXIT

for tool in nginx curl tc ip unshare jq crun python3 docker-registry; do
  command -v "$tool" >/dev/null || { echo "$tool missing: tools/install-deps --bench" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "bench/registry.sh needs root (FUSE, crun, network namespaces)" >&2; exit 1; }
. bench/common.sh
. bench/hello_images.sh

results=$work/results.tsv
: > "$results"
record() { printf '%s\t%s\t%s\t%s\n' "$@" >> "$results"; } # metric image variant value
counter=/sys/class/net/skb0/statistics/rx_bytes

echo "converting ${images[*]}..."
for image in "${images[@]}"; do
  [ -f "$images_dir/$image/index.json" ] || { echo "no $image in $images_dir: run tools/make-images" >&2; exit 1; }
  "$SKIFF" --store "$work/store" convert "oci:$images_dir/$image:latest" "$image:1" >/dev/null
done
wan_up "$work/store"
plain_bundles

registry_up
echo "pushing ${images[*]} to the registry..."
for image in "${images[@]}"; do
  SKIFF_INSECURE_REGISTRIES=10.78.0.2:5000 "$SKIFF" --store "$work/store" push "$image:1" "docker://10.78.0.2:5000/bench/$image:1"
done

skiff_args() { # image origin: the image argument and source flags for skiff run / mount
  case $2 in
    serve) echo "$1:1 --server $wan" ;;
    registry) echo "docker://$registry/bench/$1:1" ;;
  esac
}
skiff_run() { # image origin
  echo "$SKIFF" run $(skiff_args "$1" "$2") --rm --cache "$work/cache" --run-dir "$work/run" --containers "$work/containers"
}
measure() { # image variant command...
  local image=$1 variant=$2; shift 2
  drop_caches
  local out
  out=$(python3 bench/ready.py "${ready[$image]}" "$counter" 120 -- "$@")
  record ready "$image" "$variant" "${out% *}"
  record bytes "$image" "$variant" "${out#* }"
  echo "  $image $variant: ${out% *} s, ${out#* } bytes"
}

echo "recording startup profiles through each..."
for image in "${images[@]}"; do
  for origin in serve registry; do
    fresh_cache
    # Storing the profile puts the manifest: skiff serve needs its write
    # token (a token is refused without --server, so only there).
    token=()
    [ "$origin" = serve ] && token=(SKIFF_TOKEN_FILE="$work/write-token")
    env "${token[@]}" python3 bench/ready.py "${ready[$image]}" "$counter" 120 -- \
      $(skiff_run "$image" "$origin") --record-profile -- sh -c "${command[$image]}" >/dev/null
  done
done
# The profile is stored once the container has stopped.
sleep 2
"$SKIFF" images --server "$wan"
for image in "${images[@]}"; do "$SKIFF" images "docker://$registry/bench/$image"; done

# The plain pull of the whole image, then a read of everything.
plain_read() { # image
  local image=$1 dir=$work/plain-read-$1
  rm -rf "$dir" && mkdir -p "$dir/rootfs" "$dir/blobs"
  layer_paths "$image" | xargs -P3 -I{} sh -c 'curl -sf -o "$1/$(basename "$2")" "$3/$2"' _ "$dir/blobs" {} "$layers"
  for layer in $(layer_paths "$image"); do
    tar -xzf "$dir/blobs/$(basename "$layer")" -C "$dir/rootfs"
  done
  find "$dir/rootfs" -type f -exec cat {} + > /dev/null
  rm -rf "$dir"
}
lazy_read() { # image origin
  local mnt=$work/mnt-read
  mkdir -p "$mnt"
  "$SKIFF" mount $(skiff_args "$1" "$2") "$mnt" --cache "$work/cache" --run-dir "$work/run" >/dev/null 2>&1
  find "$mnt" -type f -exec cat {} + > /dev/null
  "$SKIFF" umount "$mnt" --run-dir "$work/run"
}
timed() { # metric image variant command...
  local metric=$1 image=$2 variant=$3; shift 3
  drop_caches
  local start bytes
  start=$(now); bytes=$(rx)
  "$@"
  record "$metric" "$image" "$variant" "$(since "$start")"
  record "${metric}_bytes" "$image" "$variant" "$(( $(rx) - bytes ))"
  echo "  $image $variant full read: $(since "$start") s"
}

echo "HelloBench and full reads over the link..."
for _ in $(seq "$runs"); do
  for image in "${images[@]}"; do
    measure "$image" plain bash -c "plain_start $image"
    for origin in serve registry; do
      fresh_cache
      measure "$image" "$origin" $(skiff_run "$image" "$origin") -- sh -c "${command[$image]}"
    done
    timed full "$image" plain plain_read "$image"
    for origin in serve registry; do
      fresh_cache
      timed full "$image" "$origin" lazy_read "$image" "$origin"
    done
  done
done

# Storage: the registry's blobs for the whole dataset, against its distinct gzip layers.
registry_bytes=$(du -sb "$work/registry/docker/registry/v2/blobs" | cut -f1)
gzip_bytes=$(for image in "${images[@]}"; do for l in $(layer_paths "$image"); do echo "$l $(stat -c %s "$images_dir/$l")"; done; done |
  awk '{ split($1, p, "/"); if (!(p[4] in seen)) { seen[p[4]] = 1; s += $2 } } END { print s }')
record storage all registry "$registry_bytes"
record storage all gzip "$gzip_bytes"
for image in "${images[@]}"; do
  record image_bytes "$image" gzip "$(for l in $(layer_paths "$image"); do stat -c %s "$images_dir/$l"; done | awk '{ s += $1 } END { print s }')"
done

meta=$work/images.tsv
for image in "${images[@]}"; do printf '%s\t%s\t%s\n' "$image" "${kind[$image]}" "${shown[$image]:-${command[$image]}}"; done > "$meta"
python3 bench/registry_report.py "$results" "$meta" "$runs" "$rate" "$one_way_ms" "$(uname -r)" "$(nproc)"
