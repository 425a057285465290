#!/usr/bin/env bash
# Pulling together on shared storage (Wharf, SoCC '18): N hosts read the
# whole of one image at once, each through its own emulated link (tbf at
# $rate both ways, a delay proxy adding $one_way_ms each way) to one
# `skiff serve` in a network namespace of its own. *Cooperative*: every host
# mounts with `--shared` over one cache directory, so each chunk is fetched
# by one host and read from the cache by the others. Baseline in the same
# run, *alone*: the same hosts, each with a cache of its own (what every
# host does without --shared). Measured for N = 1, 2, 4: the time from the
# first mount until every host has read every file (`tar` of the mount),
# and the bytes and chunks the server sent. The shared "storage" is this machine's disk, which no link
# slows: over NFS the reads of the others' chunks would cost a little more.
# Writes the table into docs/BENCHMARKS.md.
#
# Usage (root): SKIFF=... bench/shared.sh   (make bench-shared does this)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$HOME/.cache/skiff-target}/release
SKIFF=${SKIFF:-$target/skiff}
DELAY_PROXY=${DELAY_PROXY:-$target/delay-proxy}
images_dir=${SKIFF_IMAGES:-/var/cache/skiff/images}
image=${IMAGE:-git}
counts=(${COUNTS:-1 2 4})
runs=${RUNS:-3}
rate=${RATE:-100mbit}
one_way_ms=${ONE_WAY_MS:-10}
max_hosts=${counts[-1]}
work=$(mktemp -d /var/tmp/skiff-shared-bench.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  set +e # every step runs, whichever fails
  unmount_under "$work"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for k in $(seq 0 "$max_hosts"); do ip netns del "sksh$k" 2>/dev/null || true; done
  rm -rf "$work"
}
. bench/common.sh
trap cleanup EXIT
[ "$(id -u)" = 0 ] || { echo "bench/shared.sh needs root (FUSE, network namespaces)" >&2; exit 1; }
[ -f "$images_dir/$image/index.json" ] || { echo "no $image in $images_dir: run tools/make-images" >&2; exit 1; }
results=$work/results.tsv
: > "$results"
record() { printf '%s\t%s\t%s\t%s\n' "$@" >> "$results"; } # metric hosts mode value

echo "converting $image..."
"$SKIFF" --store "$work/store" convert "oci:$images_dir/$image:latest" "$image:1" >/dev/null

# sksh0 holds the server; host k (sksh1..) reaches it over veth pair k,
# shaped both ways, at 10.77.k.1, and through a delay proxy on its own
# loopback.
echo "building $max_hosts hosts' links: $rate, ${one_way_ms} ms each way..."
ip netns add sksh0
ip -n sksh0 link set lo up
for k in $(seq "$max_hosts"); do
  ip netns add "sksh$k"
  ip -n "sksh$k" link set lo up
  ip link add "skshs$k" netns sksh0 type veth peer name "skshh$k" netns "sksh$k"
  ip -n sksh0 addr add "10.77.$k.1/24" dev "skshs$k"
  ip -n "sksh$k" addr add "10.77.$k.2/24" dev "skshh$k"
  ip -n sksh0 link set "skshs$k" up
  ip -n "sksh$k" link set "skshh$k" up
  ip netns exec sksh0 tc qdisc add dev "skshs$k" root tbf rate "$rate" burst 64kb latency 100ms
  ip netns exec "sksh$k" tc qdisc add dev "skshh$k" root tbf rate "$rate" burst 64kb latency 100ms
  ip netns exec "sksh$k" "$DELAY_PROXY" 127.0.0.1:7071 "10.77.$k.1:7070" "$one_way_ms" 2>/dev/null &
  pids+=($!)
done
token=$(write_token)
ip netns exec sksh0 "$SKIFF" --store "$work/store" serve --listen 0.0.0.0:7070 --token-file "$token" \
  2>"$work/serve.log" &
pids+=($!)
in_server() { ip netns exec sksh0 "$@"; }
for _ in $(seq 200); do in_server curl -sf http://127.0.0.1:7070/healthz >/dev/null && break; sleep 0.05; done
metric() { in_server curl -sf http://127.0.0.1:7070/metrics | awk -v m="$1" '$1 == m { print $2 + 0 }'; }
sent() { metric skiff_http_response_bytes_total; }
chunks_sent() { metric skiff_chunks_sent_total; }

trial() { # hosts mode
  local n=$1 mode=$2 k start elapsed before flags=()
  rm -rf "$work"/cache* "$work"/host*
  drop_caches
  [ "$mode" = cooperative ] && flags=(--shared)
  # From before the first mount: each fetches from the moment it is mounted.
  before=$(sent)
  local chunks_before
  chunks_before=$(chunks_sent)
  start=$(now)
  for k in $(seq "$n"); do
    local cache=$work/cache
    [ "$mode" = alone ] && cache=$work/cache$k
    mkdir -p "$work/host$k/mnt"
    nsenter --net=/run/netns/"sksh$k" -- "$SKIFF" mount "$image:1" "$work/host$k/mnt" --server http://127.0.0.1:7071 \
      --cache "$cache" --run-dir "$work/host$k/run" "${flags[@]}" 2>>"$work/mount.log"
  done
  local readers=()
  for k in $(seq "$n"); do
    tar -cf - -C "$work/host$k/mnt" . | wc -c > "$work/host$k/read" &
    readers+=($!)
  done
  for r in "${readers[@]}"; do wait "$r"; done
  elapsed=$(since "$start")
  local bytes=$(( $(sent) - before )) chunks=$(( $(chunks_sent) - chunks_before ))
  for k in $(seq "$n"); do
    [ "$(cat "$work/host$k/read")" = "$(cat "$work/host1/read")" ] || { echo "host $k read other bytes" >&2; exit 1; }
    "$SKIFF" umount "$work/host$k/mnt" --run-dir "$work/host$k/run" >/dev/null
  done
  record time "$n" "$mode" "$elapsed"
  record sent "$n" "$mode" "$bytes"
  record chunks "$n" "$mode" "$chunks"
  echo "  $n hosts, $mode: ${elapsed}s, $((bytes / 1000000)) MB sent, $chunks chunks"
}

for run in $(seq "$runs"); do
  for n in "${counts[@]}"; do
    for mode in alone cooperative; do
      trial "$n" "$mode"
    done
  done
done
python3 bench/shared_report.py "$results" "$image" "${counts[*]}" "$runs" "$rate" "$one_way_ms" "$(nproc)"
