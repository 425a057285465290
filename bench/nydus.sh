#!/usr/bin/env bash
# Cold reads side by side with Nydus 2.2.0, both lazily mounted from the same
# Debian docker-registry (distribution 2.8), in one run. For each image, on
# loopback and over the emulated wide-area link of bench/common.sh (100
# Mbit/s, 20 ms round trip): mount ready, first byte, a cold full read
# (`find MNT -type f -exec cat {} +`, mount time included) without and with
# background prefetch, the registry requests and bytes of the read, and the
# CPU seconds of the mount daemon and of the registry; local disk (the layers
# unpacked by tar) as the baseline. Then each system's bytes in the registry
# for the whole dataset, and its convert time. Writes the tables into
# docs/BENCHMARKS.md.
#
# Nydus comes from the crates registry (`cargo install nydus-rs --version
# 2.2.0 --locked`, cached in $NYDUS_ROOT; it needs cmake to build). Its images
# are made with `nydus-image create` at its best settings here: RAFS v6,
# zstd, 1 MiB chunks, a chunk dictionary of the base image. Nydus 2.2.0's
# layer-by-layer build (`--parent-bootstrap`) serves wrong bytes for files of
# the upper layer (seen here: usr/bin/git read back from the base layer's
# blob) and `merge` refuses layers built with a dictionary, so each image's
# merged tree (its layers unpacked by tar) is built as one RAFS layer, as
# `nydusify` would for a squashed image; the unpack is counted in its convert
# time. Every system's tree is checked against tar's once per image.
#
# Usage (root): SKIFF=... DELAY_PROXY=... bench/nydus.sh   (make bench-nydus does this)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$HOME/.cache/skiff-target}/release
SKIFF=${SKIFF:-$target/skiff}
DELAY_PROXY=${DELAY_PROXY:-$target/delay-proxy}
NYDUS_ROOT=${NYDUS_ROOT:-$HOME/.cache/nydus}
images_dir=${SKIFF_IMAGES:-/var/cache/skiff/images}
base=${BASE_IMAGE:-base}
images=(${IMAGES:-git python perl})
links=(${LINKS:-loopback wan})
runs=${RUNS:-3}
rate=${RATE:-100mbit}
one_way_ms=${ONE_WAY_MS:-10}
ns=skiffbench
work=$(mktemp -d /var/tmp/skiff-nydus-bench.XXXXXX)
chmod 755 "$work"
pids=()

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  unmount_under "$work"
  pkill -f "nydusd --config $work" 2>/dev/null || true
  wan_down
  rm -rf "$work"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "bench/nydus.sh needs root (FUSE, network namespaces)" >&2; exit 1; }
for tool in curl tc ip jq python3 docker-registry sha256sum; do
  command -v "$tool" >/dev/null || { echo "$tool missing: tools/install-deps --bench" >&2; exit 1; }
done
if [ ! -x "$NYDUS_ROOT/bin/nydusd" ] || [ ! -x "$NYDUS_ROOT/bin/nydus-image" ]; then
  echo "installing Nydus 2.2.0 into $NYDUS_ROOT (cargo install; a few minutes)..."
  command -v cmake >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null
  cargo install nydus-rs --version 2.2.0 --locked --root "$NYDUS_ROOT"
fi
NYDUS_IMAGE=$NYDUS_ROOT/bin/nydus-image
NYDUSD=$NYDUS_ROOT/bin/nydusd
. bench/common.sh

results=$work/results.tsv
: > "$results"
record() { printf '%s\t%s\t%s\t%s\n' "$@" >> "$results"; } # metric image variant value
cpu() { # pid...: user+system CPU seconds so far
  local total=0 p
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] && total=$(awk -v t="$total" '{ print t + ($14 + $15) / 100 }' "/proc/$p/stat")
  done
  echo "$total"
}

for image in "$base" "${images[@]}"; do
  [ -f "$images_dir/$image/index.json" ] || { echo "no $image in $images_dir: run tools/make-images" >&2; exit 1; }
done

# One registry storage, served twice: on loopback, and inside the namespace
# behind the delay proxy. Each logs its requests, which is how both systems'
# requests and bytes are counted.
wan_up_for_registry() {
  mkdir -p "$work/empty-store"
  wan_up "$work/empty-store"
}
start_registry() { # name addr netns-or-empty
  cat > "$work/registry-$1.yml" <<YAML
version: 0.1
log: { level: error, accesslog: { disabled: false } }
storage: { filesystem: { rootdirectory: $work/registry } }
http: { addr: $2 }
YAML
  if [ -n "$3" ]; then
    ip netns exec "$3" docker-registry serve "$work/registry-$1.yml" >"$work/registry-$1.log" 2>&1 &
  else
    docker-registry serve "$work/registry-$1.yml" >"$work/registry-$1.log" 2>&1 &
  fi
  pids+=($!)
  echo $! > "$work/registry-$1.pid"
  wait_http "http://$2/v2/"
}
local_port=$(free_port)
start_registry loopback "127.0.0.1:$local_port" ""
push_to=127.0.0.1:$local_port
declare -A registry_of log_of
registry_of[loopback]=127.0.0.1:$local_port
log_of[loopback]=$work/registry-loopback.log
if [[ " ${links[*]} " == *" wan "* ]]; then
  wan_up_for_registry
  start_registry wan 10.78.0.2:5000 "$ns"
  wan_proxy=$(free_port)
  "$DELAY_PROXY" "127.0.0.1:$wan_proxy" 10.78.0.2:5000 "$one_way_ms" 2>/dev/null &
  pids+=($!)
  registry_of[wan]=127.0.0.1:$wan_proxy
  log_of[wan]=$work/registry-wan.log
  wait_http "http://127.0.0.1:$wan_proxy/v2/"
fi

push_blob() { # repo file: uploads it whole (POST then PUT); prints its digest
  local digest location sep
  digest=sha256:$(sha256sum "$2" | cut -d' ' -f1)
  location=$(curl -sf -D - -o /dev/null -X POST "http://$push_to/v2/$1/blobs/uploads/" |
    tr -d '\r' | awk -F': ' 'tolower($1) == "location" { print $2 }')
  case $location in http*) ;; *) location=http://$push_to$location ;; esac
  sep='?'; case $location in *\?*) sep='&' ;; esac
  curl -sf -X PUT -H 'Content-Type: application/octet-stream' --data-binary @"$2" \
    "$location${sep}digest=$digest" -o /dev/null
  echo "$digest"
}
registry_bytes() { du -sb "$work/registry/docker/registry/v2/blobs" 2>/dev/null | cut -f1 || echo 0; }

# The trees as tar unpacks them: the baseline, and what both mounts must show.
echo "unpacking ${images[*]} with tar (the baseline)..."
for image in "$base" "${images[@]}"; do
  mkdir -p "$work/disk/$image"
  for layer in $(layer_paths "$image"); do
    tar -xzf "$images_dir/$layer" -C "$work/disk/$image" --numeric-owner
  done
done

echo "converting with skiff..."
start=$(now)
for image in "${images[@]}"; do
  "$SKIFF" --store "$work/store" convert "oci:$images_dir/$image:latest" "$image:1" >/dev/null
done
record convert all skiff "$(since "$start")"
for image in "${images[@]}"; do
  "$SKIFF" --store "$work/store" push "$image:1" "docker://$push_to/bench/$image:1" >/dev/null
done
record storage all skiff "$(registry_bytes)"

echo "converting with nydus-image (RAFS v6, zstd, 1 MiB chunks, the base image as chunk dictionary)..."
nydus_build() { # image [dict]: unpack its layers, build its RAFS, into $work/nydus
  local dir=$work/nydus-tree/$1
  rm -rf "$dir" && mkdir -p "$dir" "$work/nydus/blobs"
  for layer in $(layer_paths "$1"); do tar -xzf "$images_dir/$layer" -C "$dir" --numeric-owner; done
  "$NYDUS_IMAGE" create -t dir-rafs --fs-version 6 --compressor zstd --chunk-size 0x100000 \
    ${2:+--chunk-dict bootstrap=$2} -D "$work/nydus/blobs" -B "$work/nydus/$1.boot" \
    --log-level warn "$dir" >/dev/null
  rm -rf "$dir"
}
start=$(now)
nydus_build "$base"
for image in "${images[@]}"; do nydus_build "$image" "$work/nydus/$base.boot"; done
record convert all nydus "$(since "$start")"
before=$(registry_bytes)
for image in "${images[@]}"; do
  for blob in $("$NYDUS_IMAGE" inspect -R blobs "$work/nydus/$image.boot" 2>/dev/null | jq -r '.[].blob_id'); do
    push_blob "nydus/$image" "$work/nydus/blobs/$blob" >/dev/null
  done
  echo "$(push_blob "nydus/$image" "$work/nydus/$image.boot")" > "$work/nydus/$image.boot.digest"
done
record storage all nydus "$(( $(registry_bytes) - before ))"
gzip_bytes=$(for image in "${images[@]}"; do for l in $(layer_paths "$image"); do echo "$l $(stat -c %s "$images_dir/$l")"; done; done |
  awk '{ split($1, p, "/"); if (!(p[4] in seen)) { seen[p[4]] = 1; s += $2 } } END { print s }')
record storage all gzip "$gzip_bytes"

log_lines() { wc -l < "${log_of[$1]}"; }
# Requests and body bytes the registry logged since line $2, GETs of blobs and manifests.
requests_since() { tail -n +"$(( $2 + 1 ))" "${log_of[$1]}" | grep -a '"GET /v2/' | grep -c . || true; }
bytes_since() {
  tail -n +"$(( $2 + 1 ))" "${log_of[$1]}" | grep -a '"GET /v2/' |
    awk '{ for (i = 1; i < NF; i++) if ($i ~ /^[0-9][0-9][0-9]$/ && $(i - 1) ~ /HTTP/) { s += $(i + 1); break } } END { print s + 0 }'
}
registry_pid() { cat "$work/registry-$1.pid"; }

ready_wait() { # mountpoint
  for _ in $(seq 2000); do [ -e "$1/etc/os-release" ] && return; sleep 0.005; done
  echo "$1 never became ready" >&2; exit 1
}
tree_digest() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1); }

mount_skiff() { # image link prefetch mountpoint
  local flags=(--cache "$work/cache" --run-dir "$work/run")
  [ "$3" = on ] || flags+=(--no-prefetch)
  "$SKIFF" mount "docker://${registry_of[$2]}/bench/$1:1" "$4" "${flags[@]}" >/dev/null 2>"$work/mount.err" ||
    { cat "$work/mount.err" >&2; exit 1; }
}
mount_nydus() { # image link prefetch mountpoint
  local prefetch='{"enable": false}'
  [ "$3" = on ] && prefetch='{"enable": true, "threads_count": 4, "merging_size": 1048576, "prefetch_all": true}'
  # The bootstrap comes from the registry too, as nydus-snapshotter fetches it.
  curl -sf -o "$work/nydus-mount.boot" \
    "http://${registry_of[$2]}/v2/nydus/$1/blobs/$(cat "$work/nydus/$1.boot.digest")"
  cat > "$work/nydusd.json" <<JSON
{
  "device": {
    "backend": {"type": "registry", "config": {"scheme": "http", "host": "${registry_of[$2]}", "repo": "nydus/$1", "timeout": 30, "connect_timeout": 10, "retry_limit": 2}},
    "cache": {"type": "blobcache", "config": {"work_dir": "$work/nydus-cache"}}
  },
  "mode": "direct", "digest_validate": false, "iostats_files": false, "enable_xattr": true,
  "fs_prefetch": $prefetch
}
JSON
  "$NYDUSD" --config "$work/nydusd.json" --mountpoint "$4" --bootstrap "$work/nydus-mount.boot" \
    --log-level error --rlimit-nofile 0 >"$work/nydusd.log" 2>&1 &
  echo $! > "$work/nydusd.pid"
}
daemon_pids() { # system
  case $1 in
    skiff) pgrep -f "$SKIFF mount-(daemon|supervisor)" | tr '\n' ' ' ;;
    nydus) cat "$work/nydusd.pid" ;;
  esac
}
unmount() { # system mountpoint
  case $1 in
    skiff) "$SKIFF" umount "$2" --run-dir "$work/run" >/dev/null ;;
    nydus) umount "$2"; wait "$(cat "$work/nydusd.pid")" 2>/dev/null || true ;;
  esac
}

# One cold start: empty caches, page cache dropped; mount, first byte, full read.
cold() { # system image link prefetch checked
  local system=$1 image=$2 link=$3 prefetch=$4 mnt=$work/mnt
  rm -rf "$work/cache" "$work/nydus-cache" && mkdir -p "$mnt" "$work/nydus-cache"
  drop_caches
  local lines cpu_registry start ready first full
  lines=$(log_lines "$link")
  cpu_registry=$(cpu "$(registry_pid "$link")")
  start=$(now)
  "mount_$system" "$image" "$link" "$prefetch" "$mnt"
  ready_wait "$mnt"
  ready=$(since "$start")
  head -c 1 "$mnt/etc/os-release" >/dev/null
  first=$(since "$start")
  local read_lines
  read_lines=$(log_lines "$link")
  find "$mnt" -type f -exec cat {} + >/dev/null
  full=$(since "$start")
  local variant=$system-$link-$prefetch
  record full "$image" "$variant" "$full"
  if [ "$prefetch" = off ]; then
    record ready "$image" "$system-$link" "$ready"
    record first_byte "$image" "$system-$link" "$first"
  fi
  record requests "$image" "$variant" "$(requests_since "$link" "$read_lines")"
  record bytes "$image" "$variant" "$(bytes_since "$link" "$lines")"
  # shellcheck disable=SC2046
  record cpu_daemon "$image" "$variant" "$(cpu $(daemon_pids "$system"))"
  record cpu_registry "$image" "$variant" "$(awk -v a="$(cpu "$(registry_pid "$link")")" -v b="$cpu_registry" 'BEGIN { print a - b }')"
  if [ "$5" = check ]; then
    local got
    got=$(tree_digest "$mnt")
    [ "$got" = "${expected[$image]}" ] || { echo "$system shows other bytes for $image than tar" >&2; exit 1; }
  fi
  unmount "$system" "$mnt"
  echo "  $image $variant: ready ${ready}s, full read ${full}s"
}

declare -A expected
for image in "${images[@]}"; do expected[$image]=$(tree_digest "$work/disk/$image"); done
for run in $(seq "$runs"); do
  for link in "${links[@]}"; do
    for image in "${images[@]}"; do
      for system in skiff nydus; do
        check=; [ "$run" = 1 ] && [ "$link" = loopback ] && check=check
        cold "$system" "$image" "$link" off "$check"
        cold "$system" "$image" "$link" on ""
      done
    done
  done
  for image in "${images[@]}"; do
    drop_caches
    start=$(now)
    find "$work/disk/$image" -type f -exec cat {} + >/dev/null
    record full "$image" disk "$(since "$start")"
  done
done

# Each image's compressed data in the registry: skiff's pack blobs (of the
# artifact the tag's index names), Nydus's data blobs.
accept='Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json'
for image in "${images[@]}"; do
  record image_bytes "$image" raw "$(du -sb --apparent-size "$work/disk/$image" | cut -f1)"
  artifact=$(curl -sf -H "$accept" "http://$push_to/v2/bench/$image/manifests/1" |
    jq -r '.manifests[] | select(.artifactType == "application/vnd.skiff.image.v1") | .digest')
  record data_bytes "$image" skiff "$(curl -sf -H "$accept" "http://$push_to/v2/bench/$image/manifests/$artifact" |
    jq '[.layers[] | select(.mediaType | test("pack")) | .size] | add')"
  record data_bytes "$image" nydus "$("$NYDUS_IMAGE" inspect -R blobs "$work/nydus/$image.boot" 2>/dev/null |
    jq '[.[].compressed_size] | add')"
done
python3 bench/nydus_report.py "$results" "${images[*]}" "${links[*]}" "$runs" "$rate" "$one_way_ms" "$(uname -r)" "$(nproc)"
