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

# What each image runs, and the line that says it is ready.
declare -A command=(
  [base]="echo ready"
  [perl]="perl -e 'print qq(ready\\n)'"
  [ruby]="ruby -e 'puts :ready'"
  [golang]="/usr/lib/go-1.19/bin/go version"
  [git]="git --version"
  # As PID 1 it must handle SIGTERM itself to stop when told.
  [python]="exec python3 -u -c 'import runpy, signal, sys; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); sys.argv = [\"http.server\", \"18765\", \"--bind\", \"127.0.0.1\"]; runpy.run_module(\"http.server\", run_name=\"__main__\")'"
)
declare -A ready=(
  [base]="^ready"
  [perl]="^ready"
  [ruby]="^ready"
  [golang]="^go version"
  [git]="^git version"
  [python]="^Serving HTTP"
)
# How the table shows a command, where the command itself is too long.
declare -A shown=(
  [python]="python3 -m http.server 18765 (with a SIGTERM handler: it is PID 1)"
)
declare -A kind=(
  [base]="shell echo"
  [perl]="perl"
  [ruby]="ruby"
  [golang]="compiled (Go)"
  [git]="compiled (C)"
  [python]="server (python http.server)"
)

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for m in $(grep -o " $work[^ ]*" /proc/self/mountinfo | sort -r); do umount -l "$m" 2>/dev/null || true; done
  wan_down
  rm -rf "$work"
}
trap cleanup EXIT

for tool in nginx curl tc ip unshare jq crun python3; do
  command -v "$tool" >/dev/null || { echo "$tool missing: tools/install-deps --bench" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "bench/hello.sh needs root (FUSE, crun, network namespaces)" >&2; exit 1; }
. bench/common.sh

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

# The plain way: a crun bundle per image (config from `crun spec`, with the
# image's environment and working directory), its rootfs unpacked each run.
plain_start() { # image
  local image=$1 bundle=$work/plain-$1
  rm -rf "$bundle/rootfs" "$bundle/blobs"
  mkdir -p "$bundle/rootfs" "$bundle/blobs"
  layer_paths "$image" | xargs -P3 -I{} sh -c 'curl -sf -o "$1/$(basename "$2")" "$3/$2"' _ "$bundle/blobs" {} "$layers"
  for layer in $(layer_paths "$image"); do
    tar -xzf "$bundle/blobs/$(basename "$layer")" -C "$bundle/rootfs"
  done
  # As skiff does on a host with hybrid cgroups (see skiff-runtime).
  exec unshare --mount --propagation private -- sh -c 'umount -l /sys/fs/cgroup/unified 2>/dev/null; exec "$@"' crun \
    crun --root "$work/crun" run --bundle "$bundle" "plain-$image"
}
export -f plain_start layer_paths
export work layers images_dir
for image in "${images[@]}"; do
  bundle=$work/plain-$image
  mkdir -p "$bundle"
  config=$(jq -r '.manifests[0].digest' "$images_dir/$image/index.json" | sed 's/sha256://')
  config=$(jq -r '.config.digest' "$images_dir/$image/blobs/sha256/$config" | sed 's/sha256://')
  env=$(jq -c '.config.Env // ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]' "$images_dir/$image/blobs/sha256/$config")
  (cd "$bundle" && crun spec)
  jq --arg cmd "${command[$image]}" --argjson env "$env" --arg root "$bundle/rootfs" '
    .root = {path: $root, readonly: false} | .process.terminal = false |
    .process.args = ["sh", "-c", $cmd] | .process.env = $env |
    .linux.namespaces |= map(select(.type != "network"))' "$bundle/config.json" > "$bundle/c.json"
  mv "$bundle/c.json" "$bundle/config.json"
done

# An empty cache, once the mount daemons of earlier runs (which may still be
# landing a prefetch batch) have exited.
fresh_cache() {
  while pgrep -f -- "--run-dir $work/run" >/dev/null; do sleep 0.05; done
  rm -rf "$work/cache"
}
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
  python3 bench/ready.py "${ready[$image]}" "$counter" 120 -- \
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
