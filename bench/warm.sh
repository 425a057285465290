#!/usr/bin/env bash
# Registry-side prefetch (Anwar et al., FAST '18): `skiff serve` warms its
# hot-chunk cache when the manifest of a recently pushed image is read, with
# the image's startup profile first. Measured on the first pull after a
# push: a cold start of each image with `skiff run` (fresh server process, so
# an empty hot cache; empty host cache; page cache dropped) that runs the
# image's HelloBench command, as its profile was recorded, over loopback and over the
# emulated wide-area link of bench/common.sh (100 Mbit/s, 20 ms round trip,
# the server inside a network namespace). The server's
# hot-cache hits and misses during the start give the hit rate. Baseline in
# the same run: the same start when the image was not pushed to that server
# process (its store already held it), so nothing is warmed. Writes the
# table into docs/BENCHMARKS.md.
#
# Usage (root): SKIFF=... bench/warm.sh   (make bench-warm does this)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$HOME/.cache/skiff-target}/release
SKIFF=${SKIFF:-$target/skiff}
DELAY_PROXY=${DELAY_PROXY:-$target/delay-proxy}
images_dir=${SKIFF_IMAGES:-/var/cache/skiff/images}
images=(${IMAGES:-git perl ruby})
runs=${RUNS:-3}
links=(${LINKS:-loopback wan})
rate=${RATE:-100mbit}
one_way_ms=${ONE_WAY_MS:-10}
ns=skiffbench
work=$(mktemp -d /var/tmp/skiff-warm-bench.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  set +e # every step runs, whichever fails
  unmount_under "$work"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wan_down
  rm -rf "$work"
}
. bench/common.sh
. bench/hello_images.sh
trap cleanup EXIT
[ "$(id -u)" = 0 ] || { echo "bench/warm.sh needs root (FUSE, containers, network namespaces)" >&2; exit 1; }
results=$work/results.tsv
: > "$results"
record() { printf '%s\t%s\t%s\t%s\n' "$@" >> "$results"; } # metric image variant value
token=$(write_token)
run_dir=$work/run

start_server() { # link: a fresh process on the served store
  if [ "${1:-loopback}" = wan ]; then
    # Behind the delay proxy wan_up put in front of 10.78.0.2:7070.
    ip netns exec "$ns" "$SKIFF" --store "$work/served" serve --listen 10.78.0.2:7070 \
      --token-file "$token" 2>>"$work/serve.log" &
    url=$wan
  else
    local port
    port=$(free_port)
    "$SKIFF" --store "$work/served" serve --listen "127.0.0.1:$port" --token-file "$token" 2>>"$work/serve.log" &
    url=http://127.0.0.1:$port
  fi
  server_pid=$!
  pids+=("$server_pid")
  wait_http "$url/metrics"
}
stop_server() { kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; }
metric() { curl -sf "$url/metrics" | awk -v m="$1" '$1 == m { v = $2 } END { print v + 0 }'; }
# What a push does last: put the image's manifest (here the one the server holds, profile and all).
put_manifest() { # image
  curl -sf "$url/v1/manifests/$1:1" -o "$work/manifest.json"
  curl -sf -X PUT -H "Authorization: Bearer $(cat "$token")" \
    -H 'Content-Type: application/vnd.skiff.manifest.v1+json' \
    --data-binary @"$work/manifest.json" "$url/v1/manifests/$1:1" -o /dev/null
}

echo "converting ${images[*]}..."
for image in "${images[@]}"; do
  [ -f "$images_dir/$image/index.json" ] || { echo "no $image in $images_dir: run tools/make-images" >&2; exit 1; }
  "$SKIFF" --store "$work/local" convert "oci:$images_dir/$image:latest" "$image:1" >/dev/null
done
start_server
echo "pushing and recording startup profiles..."
for image in "${images[@]}"; do
  "$SKIFF" --store "$work/local" push "$image:1" --server "$url" --token-file "$token" >/dev/null
  SKIFF_TOKEN_FILE=$token "$SKIFF" run "$image:1" --server "$url" --rm --cache "$work/record-cache" \
    --run-dir "$run_dir" --containers "$work/containers" --record-profile -- sh -c "${command[$image]}" >/dev/null
  for try in $(seq 101); do
    [ "$(curl -sf "$url/v1/manifests/$image:1" | jq '.profile != null')" = true ] && break
    [ "$try" = 101 ] && { echo "no startup profile was stored for $image" >&2; exit 1; }
    sleep 0.1
  done
  echo "  $image: $(curl -sf "$url/v1/manifests/$image:1" | jq -c '.profile | {read_bytes, ranges: (.ranges | length)}')"
done
stop_server
if [[ " ${links[*]} " == *" wan "* ]]; then
  # The link, and the delay proxy to 10.78.0.2:7070; the server wan_up
  # starts there makes way for this script's own.
  mkdir -p "$work/empty-store"
  wan_up "$work/empty-store"
  pkill -f -- "--store $work/empty-store serve" || true
  sleep 0.5
fi

for run in $(seq "$runs"); do
  for link in "${links[@]}"; do
  for image in "${images[@]}"; do
    for variant in pushed not-pushed; do
      start_server "$link"
      [ "$variant" = pushed ] && put_manifest "$image"
      rm -rf "$work/cache"
      drop_caches
      hits=$(metric skiff_cache_hits_total)
      misses=$(metric skiff_cache_misses_total)
      start=$(now)
      "$SKIFF" run "$image:1" --server "$url" --rm --cache "$work/cache" --run-dir "$run_dir" \
        --containers "$work/containers" -- sh -c "${command[$image]}" >/dev/null
      elapsed=$(since "$start")
      hits=$(( $(metric skiff_cache_hits_total) - hits ))
      misses=$(( $(metric skiff_cache_misses_total) - misses ))
      record start "$image" "$link-$variant" "$elapsed"
      record hits "$image" "$link-$variant" "$hits"
      record misses "$image" "$link-$variant" "$misses"
      echo "  run $run $link $image $variant: ${elapsed}s, $hits hits, $misses misses"
      stop_server
    done
  done
  done
done
python3 bench/warm_report.py "$results" "${images[*]}" "${links[*]}" "$runs" "$rate" "$one_way_ms" "$(nproc)"
