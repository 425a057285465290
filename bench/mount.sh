#!/usr/bin/env bash
# Lazy mount benchmark, every figure side by side with its baseline in one run:
#   1. time from `skiff mount` to the first byte of a file (loopback and WAN);
#   2. cold `cat` of every file through a fresh mount (empty cache), with
#      and without prefetch, against the same tree on local disk (page cache
#      dropped);
#   3. warm sequential read of the image's largest file through the mount
#      (chunks on this host) against the same file on local disk, with the
#      page cache dropped and with it warm;
#   4. over an emulated wide-area link (100 Mbit/s by `tc tbf` on a veth pair
#      into a network namespace, 20 ms round trip by bench's delay-proxy):
#      bytes and time to start one binary of the image (which reads it and
#      its libraries) through a lazy mount, against downloading the image's
#      gzip layers from nginx across the same link and unpacking them.
# Writes the tables into docs/BENCHMARKS.md.
#
# Usage (root): SKIFF=... DELAY_PROXY=... bench/mount.sh   (make bench-mount does this)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$HOME/.cache/skiff-target}/release
SKIFF=${SKIFF:-$target/skiff}
DELAY_PROXY=${DELAY_PROXY:-$target/delay-proxy}
images_dir=${SKIFF_IMAGES:-/var/cache/skiff/images}
images=(${IMAGES:-git python postgresql golang perl})
runs=${RUNS:-3}
rate=${RATE:-100mbit}
one_way_ms=${ONE_WAY_MS:-10}
ns=skiffbench
work=$(mktemp -d /var/tmp/skiff-mount-bench.XXXXXX)
chmod 755 "$work" # nginx workers run as www-data
pids=()
run_dir=$work/run

cleanup() {
  for m in "$work"/mnt*; do
    grep -qs " $m " /proc/self/mountinfo && { "$SKIFF" umount "$m" --run-dir "$run_dir" || umount -l "$m"; }
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wan_down
  rm -rf "$work"
}
trap cleanup EXIT

for tool in nginx curl umoci tc ip unshare jq; do
  command -v "$tool" >/dev/null || { echo "$tool missing: tools/install-deps --bench" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "bench/mount.sh needs root (FUSE, network namespaces, drop_caches)" >&2; exit 1; }

declare -A command=(
  [git]="/usr/bin/git --version"
  [python]="/usr/bin/python3 -c pass"
  [postgresql]="/usr/lib/postgresql/15/bin/postgres --version"
  [golang]="/usr/lib/go-1.19/bin/go version"
  [perl]="/usr/bin/perl -e 1"
  [ruby]="/usr/bin/ruby -e 1"
)
results=$work/results.tsv
: > "$results"
record() { printf '%s\t%s\t%s\t%s\n' "$@" >> "$results"; } # metric image variant value
. bench/common.sh

mount_image() { # image mountpoint server [extra...]
  local image=$1 mnt=$2 server=$3; shift 3
  "$SKIFF" mount "$image:1" "$mnt" --server "$server" --cache "$work/cache" --run-dir "$run_dir" "$@" 2>/dev/null
}
umount_image() { "$SKIFF" umount "$1" --run-dir "$run_dir"; }
fresh_cache() { rm -rf "$work/cache"; }
# Runs an image's command in a chroot of `root` with the host's /dev bound in.
run_in() { # root image
  unshare -m sh -c "mount --bind /dev '$1/dev' && chroot '$1' ${command[$2]}" >/dev/null 2>&1
}

echo "converting ${images[*]}..."
for image in "${images[@]}"; do
  [ -f "$images_dir/$image/index.json" ] || { echo "no $image in $images_dir: run tools/make-images" >&2; exit 1; }
  "$SKIFF" --store "$work/store" convert "oci:$images_dir/$image:latest" "$image:1" >/dev/null
  umoci unpack --image "$images_dir/$image:latest" "$work/ref-$image" >/dev/null
done

# ---- loopback: a server on 127.0.0.1 ----
port=$(free_port)
"$SKIFF" --store "$work/store" serve --listen "127.0.0.1:$port" --token-file "$(write_token)" 2>"$work/serve.log" &
pids+=($!)
server=http://127.0.0.1:$port
wait_http "$server/healthz"

echo "mount to first byte (loopback)..."
for _ in $(seq "$runs"); do
  for image in "${images[@]}"; do
    fresh_cache
    start=$(now)
    mount_image "$image" "$work/mnt" "$server" --no-prefetch
    head -c1 "$work/mnt/etc/os-release" >/dev/null
    record first_byte "$image" loopback "$(since "$start")"
    umount_image "$work/mnt"
  done
done

cat_image=${images[0]}
echo "cold cat of every file of $cat_image..."
for _ in $(seq "$runs"); do
  drop_caches
  start=$(now)
  (cd "$work/ref-$cat_image/rootfs" && find . -type f -print0 | xargs -0 cat >/dev/null)
  record cat_all "$cat_image" local "$(since "$start")"
  fresh_cache
  mount_image "$cat_image" "$work/mnt" "$server" --no-prefetch
  drop_caches
  start=$(now)
  (cd "$work/mnt" && find . -type f -print0 | xargs -0 cat >/dev/null)
  record cat_all "$cat_image" skiff "$(since "$start")"
  umount_image "$work/mnt"
  # As mounted by default: prefetch fetches ahead in big batches while cat reads.
  fresh_cache
  drop_caches
  start=$(now)
  mount_image "$cat_image" "$work/mnt" "$server"
  (cd "$work/mnt" && find . -type f -print0 | xargs -0 cat >/dev/null)
  record cat_all "$cat_image" skiff-prefetch "$(since "$start")"
  umount_image "$work/mnt"
done
record image_bytes "$cat_image" logical "$(du -sb --apparent-size "$work/ref-$cat_image/rootfs" | cut -f1)"

# The largest file of all images: fetched once, then read warm.
read -r big_size big_image big_path < <(
  for image in "${images[@]}"; do
    (cd "$work/ref-$image/rootfs" && find . -type f -printf "%s $image %P\n")
  done | sort -n | tail -n1)
echo "warm sequential read of $big_image:/$big_path ($big_size bytes)..."
fresh_cache
mount_image "$big_image" "$work/mnt" "$server" --no-prefetch
cat "$work/mnt/$big_path" >/dev/null
umount_image "$work/mnt"
local_copy=$work/ref-$big_image/rootfs/$big_path
# As mounted by default (the kernel sends no opens; reads the page cache
# misses come from the daemon's memory or the host's cache), and with
# --passthrough (the kernel reads an assembled copy on local disk).
mount_image "$big_image" "$work/mnt" "$server" --no-prefetch
mount_image "$big_image" "$work/mnt-pt" "$server" --no-prefetch --passthrough
for _ in $(seq 11); do
  for variant in local skiff skiff-passthrough; do
    case $variant in
      local) file=$local_copy ;;
      skiff) file=$work/mnt/$big_path ;;
      skiff-passthrough) file=$work/mnt-pt/$big_path ;;
    esac
    drop_caches
    start=$(now); cat "$file" >/dev/null; record warm_read "$big_image" "$variant-cold-page-cache" "$(since "$start")"
    start=$(now); cat "$file" >/dev/null; record warm_read "$big_image" "$variant-warm-page-cache" "$(since "$start")"
  done
done
record passthrough "$big_image" opens "$("$SKIFF" status "$work/mnt-pt" --run-dir "$run_dir" --json | jq .stats.passthrough_opens)"
record big_file "$big_image" bytes "$big_size"
umount_image "$work/mnt"
umount_image "$work/mnt-pt"
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

# ---- the wide-area link ----
wan_up "$work/store"

echo "over the link..."
for _ in $(seq "$runs"); do
  for image in "${images[@]}"; do
    # Baseline: fetch every gzip layer (3 at a time, as docker does), unpack, run.
    rm -rf "$work/pulled"; mkdir -p "$work/pulled/rootfs" "$work/pulled/blobs"
    drop_caches
    before=$(rx); start=$(now)
    layer_paths "$image" | xargs -P3 -I{} sh -c 'curl -sf -o "$1/$(basename "$2")" "$3/$2"' _ "$work/pulled/blobs" {} "$layers"
    for layer in $(layer_paths "$image"); do
      tar -xzf "$work/pulled/blobs/$(basename "$layer")" -C "$work/pulled/rootfs"
    done
    record pulled_ready "$image" baseline "$(since "$start")"
    run_in "$work/pulled/rootfs" "$image"
    record started "$image" baseline "$(since "$start")"
    record wire_bytes "$image" baseline "$(( $(rx) - before ))"

    # skiff: lazy mount with an empty cache, no prefetch, run the same command.
    fresh_cache
    drop_caches
    before=$(rx); start=$(now)
    mount_image "$image" "$work/mnt" "$wan" --no-prefetch
    record first_byte "$image" wan-mount "$(since "$start")"
    head -c1 "$work/mnt/etc/os-release" >/dev/null
    record first_byte "$image" wan "$(since "$start")"
    run_in "$work/mnt" "$image"
    record started "$image" skiff "$(since "$start")"
    record wire_bytes "$image" skiff "$(( $(rx) - before ))"
    record fetched_bytes "$image" skiff "$("$SKIFF" status "$work/mnt" --run-dir "$run_dir" --json | jq .stats.fetched_bytes)"
    umount_image "$work/mnt"
  done
done
for image in "${images[@]}"; do
  record image_bytes "$image" logical "$(du -sb --apparent-size "$work/ref-$image/rootfs" | cut -f1)"
  record image_bytes "$image" gzip "$(for l in $(layer_paths "$image"); do stat -c %s "$images_dir/$l"; done | awk '{ s += $1 } END { print s }')"
done

python3 bench/mount_report.py "$results" "$runs" "$rate" "$one_way_ms" "$(uname -r)" "$(nproc)" "${images[*]}" "$cat_image" "$big_image:/$big_path"
