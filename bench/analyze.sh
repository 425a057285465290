#!/usr/bin/env bash
# `skiff analyze` on the benchmark dataset (tools/make-images), beside the
# Docker Hub study's figures: the measures, the time and memory it took
# (medians of $RUNS), and an independent count of the layer and file
# measures (tests/analyze_check.py: Python's tarfile and hashlib) that must
# agree exactly. Writes the table into docs/BENCHMARKS.md and the plots
# into docs/analyze/.
#
# Usage: SKIFF=... bench/analyze.sh   (make bench-analyze does this)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$HOME/.cache/skiff-target}/release
SKIFF=${SKIFF:-$target/skiff}
images_dir=${SKIFF_IMAGES:-/var/cache/skiff/images}
images=(${IMAGES:-base git perl ruby nginx postgresql golang python perl-git base-rebuild git-curl git-slim})
runs=${RUNS:-3}
work=$(mktemp -d /var/tmp/skiff-analyze-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
command -v /usr/bin/time >/dev/null || { echo "GNU time missing: tools/install-deps --bench" >&2; exit 1; }

specs=()
for image in "${images[@]}"; do
  [ -f "$images_dir/$image/index.json" ] || { echo "no $image in $images_dir: run tools/make-images" >&2; exit 1; }
  specs+=("$images_dir/$image:latest")
done

for run in $(seq "$runs"); do
  echo "skiff analyze, run $run of $runs (${#images[@]} images)..."
  # The first run draws the plots docs/ANALYZE.md shows.
  plots=(); [ "$run" = 1 ] && plots=(--plots docs/analyze)
  /usr/bin/time -f '%e %M' -o "$work/time-$run" \
    "$SKIFF" analyze --json "${plots[@]}" "${specs[@]/#/oci:}" > "$work/analysis-$run.json"
done
echo "the independent count (tests/analyze_check.py)..."
python3 tests/analyze_check.py "${specs[@]}" > "$work/check.json"
python3 bench/analyze_report.py "$work" "$runs" "${images[*]}" "$(nproc)"
