#!/usr/bin/env bash
# `skiff relayer` on the benchmark dataset (tools/make-images): the 12
# images written anew with layers cut where they share files, for
# --max-layers 16, 8 and 4. Reports the distinct gzip layers (what a
# registry stores, and what a host pulling every image transfers) before
# and after, and the layers per image; checks, for --max-layers 16, that
# `umoci unpack` of every output image equals that of its original (every
# path, byte, mode, owner, mtime and link count). Baseline in the same run:
# the dataset's own layers; for scale, what file-level dedup would store
# (`skiff analyze`, gzip'd files). Writes the table into docs/BENCHMARKS.md.
#
# Usage: SKIFF=... bench/relayer.sh   (make bench-relayer does this)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$HOME/.cache/skiff-target}/release
SKIFF=${SKIFF:-$target/skiff}
images_dir=${SKIFF_IMAGES:-/var/cache/skiff/images}
images=(${IMAGES:-base git perl ruby nginx postgresql golang python perl-git base-rebuild git-curl git-slim})
bounds=(${BOUNDS:-16 8 4})
work=$(mktemp -d /var/tmp/skiff-relayer-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
command -v umoci >/dev/null || { echo "umoci missing: tools/install-deps" >&2; exit 1; }

specs=()
for image in "${images[@]}"; do
  [ -f "$images_dir/$image/index.json" ] || { echo "no $image in $images_dir: run tools/make-images" >&2; exit 1; }
  specs+=("oci:$images_dir/$image:latest")
done

# What `find` says of every path: mode, owner, mtime, type, link count, and
# a file's size (a directory's size is the file system's business: it grows
# in blocks as entries are made, in whatever order they were).
listing() {
  (cd "$1" && { find . -type d -printf '%p %m %U %G %T@ %y %n\n'
                find . ! -type d -printf '%p %m %U %G %T@ %y %n %s %l\n'; } | LC_ALL=C sort)
}

for bound in "${bounds[@]}"; do
  echo "skiff relayer --max-layers $bound (${#images[@]} images)..."
  start=$EPOCHREALTIME
  "$SKIFF" relayer --json --max-layers "$bound" "${specs[@]}" --out "oci:$work/out-$bound" > "$work/report-$bound.json"
  awk -v s="$start" -v e="$EPOCHREALTIME" 'BEGIN { printf "%.1f", e - s }' > "$work/time-$bound"
  if [ "$bound" = "${bounds[0]}" ]; then
    echo "checking every image with umoci unpack..."
    for image in "${images[@]}"; do
      rm -rf "$work/a" "$work/b"
      umoci unpack --image "$images_dir/$image:latest" "$work/a" >/dev/null 2>&1
      umoci unpack --image "$work/out-$bound:$image-latest" "$work/b" >/dev/null 2>&1
      diff -r --no-dereference "$work/a/rootfs" "$work/b/rootfs" >/dev/null \
        || { echo "$image: the relayered image's files differ" >&2; exit 1; }
      [ "$(listing "$work/a/rootfs")" = "$(listing "$work/b/rootfs")" ] \
        || { echo "$image: the relayered image's attributes differ" >&2; exit 1; }
    done
    echo "  all ${#images[@]} match"
  fi
  rm -rf "$work/out-$bound"
done
"$SKIFF" analyze --json "${specs[@]}" > "$work/analysis.json"
python3 bench/relayer_report.py "$work" "${bounds[*]}" "${images[*]}" "$(nproc)"
