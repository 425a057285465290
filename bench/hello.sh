#!/usr/bin/env bash
# HelloBench on skiff (Slacker, FAST '16): start a container from an image
# and time until it prints its "ready" line, over an emulated wide-area link
# (bench/common.sh: 100 Mbit/s, 20 ms round trip). For each image, in the
# same run:
#   (a) the plain way: download the image's gzip layers from nginx on the far
#       side of the link (3 at a time, as docker does), unpack them, crun;
#   (b) skiff run, empty cache, no startup profile;
#   (c) skiff run, empty cache, with the startup profile recorded before;
#   (d) skiff run again with the cache (c) left behind.
# Also the bytes received over the link until the ready line, against the
# bytes the start reads (the profile's count). Writes the table into
# docs/BENCHMARKS.md.
#
# Usage (root): SKIFF=... DELAY_PROXY=... bench/hello.sh   (make bench-hello does this)
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
work=$(mktemp -d /var/tmp/skiff-hello-bench.XXXXXX)
chmod 755 "$work" # nginx workers run as www-data
pids=()

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  unmount_under "$work"
  wan_down
  rm -rf "$work"
}
trap cleanup EXIT

for tool in nginx curl tc ip unshare jq crun python3; do
  command -v "$tool" >/dev/null || { echo "$tool missing: tools/install-deps --bench" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "bench/hello.sh needs root (FUSE, crun, network namespaces)" >&2; exit 1; }
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

# `skiff run IMAGE` over the link with the cache at $work/cache.
skiff_run() { echo "$SKIFF" run "$1:1" --server "$wan" --rm --cache "$work/cache" --run-dir "$work/run" --containers "$work/containers"; }
measure() { # image variant command...
  local image=$1 variant=$2; shift 2
  drop_caches
  local out
  out=$(python3 bench/ready.py "${ready[$image]}" "$counter" 120 -- "$@")
  record ready "$image" "$variant" "${out% *}"
  record bytes "$image" "$variant" "${out#* }"
  echo "  $image $variant: ${out% *} s, ${out#* } bytes"
}

echo "recording startup profiles..."
for image in "${images[@]}"; do
  fresh_cache
  # Storing the profile puts the manifest: it needs the server's write token.
  SKIFF_TOKEN_FILE=$work/write-token python3 bench/ready.py "${ready[$image]}" "$counter" 120 -- \
    $(skiff_run "$image") --record-profile -- sh -c "${command[$image]}" >/dev/null
  # The profile is stored once the container has stopped.
  for _ in $(seq 100); do
    [ "$(curl -sf "$wan/v1/manifests/$image:1" | jq '.profile != null')" = true ] && break
    sleep 0.1
  done
  profile=$(curl -sf "$wan/v1/manifests/$image:1" | jq -c '.profile | {read_bytes, files: ([.ranges[].path] | unique | length)}')
  record read_bytes "$image" profile "$(jq .read_bytes <<< "$profile")"
  record profile_files "$image" profile "$(jq .files <<< "$profile")"
  echo "  $image: $profile"
done

echo "HelloBench over the link..."
for _ in $(seq "$runs"); do
  for image in "${images[@]}"; do
    measure "$image" plain bash -c "plain_start $image"
    fresh_cache
    measure "$image" cold-no-profile $(skiff_run "$image") --no-profile -- sh -c "${command[$image]}"
    fresh_cache
    measure "$image" cold-profile $(skiff_run "$image") -- sh -c "${command[$image]}"
    measure "$image" warm $(skiff_run "$image") -- sh -c "${command[$image]}"
  done
done
for image in "${images[@]}"; do
  record image_bytes "$image" gzip "$(for l in $(layer_paths "$image"); do stat -c %s "$images_dir/$l"; done | awk '{ s += $1 } END { print s }')"
done

meta=$work/images.tsv
for image in "${images[@]}"; do printf '%s\t%s\t%s\n' "$image" "${kind[$image]}" "${shown[$image]:-${command[$image]}}"; done > "$meta"
python3 bench/hello_report.py "$results" "$meta" "$runs" "$rate" "$one_way_ms" "$(uname -r)" "$(nproc)"
