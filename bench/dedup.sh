#!/usr/bin/env bash
# Storage and convert-speed benchmark on the tools/make-images dataset, against
# named baselines measured in the same run:
#   raw layer bytes, gzip unique layers (a registry), file-level dedup with
#   zstd -3 per unique file, casync (`casync make` of every unique layer tar
#   into one store, same 16/64/256 KiB chunk sizes), and skiff.
# Each timed tool runs RUNS times (default 3) into a fresh store; the table
# shows medians. Writes the table into docs/BENCHMARKS.md.
#
# Usage: SKIFF=path/to/skiff bench/dedup.sh     (make bench does this)
set -euo pipefail
cd "$(dirname "$0")/.."
images_dir=${SKIFF_IMAGES_DIR:-/var/cache/skiff/images}
SKIFF=${SKIFF:-${CARGO_TARGET_DIR:-$HOME/.cache/skiff-target}/release/skiff}
runs=${RUNS:-3}
work=$(mktemp -d /var/tmp/skiff-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

python3 -c 'import zstandard' 2>/dev/null || pip install -q zstandard
command -v casync >/dev/null || { echo "casync missing: tools/install-deps --bench" >&2; exit 1; }

layouts=()
for d in "$images_dir"/*/; do
  [ -f "$d/.done" ] && layouts+=("${d%/}")
done
[ ${#layouts[@]} -gt 0 ] || { echo "no images in $images_dir: run tools/make-images" >&2; exit 1; }
echo "dataset: ${#layouts[@]} images in $images_dir"

echo "baselines (raw, gzip layers, file-level zstd)..."
python3 bench/layerstats.py "${layouts[@]}" > "$work/baseline.json"
cat "$work/baseline.json"

# Unique layer tars for casync, decompressed once, outside the timing.
mkdir -p "$work/tars"
python3 - "$work/tars" "${layouts[@]}" <<'PY'
import gzip, json, shutil, sys, zstandard
from pathlib import Path
out = Path(sys.argv[1])
for layout in map(Path, sys.argv[2:]):
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text())
    for layer in manifest["layers"]:
        dest = out / (layer["digest"][7:] + ".tar")
        if dest.exists():
            continue
        src = layout / "blobs/sha256" / layer["digest"][7:]
        mt = layer["mediaType"]
        opener = gzip.open if mt.endswith("gzip") else (lambda p, m: zstandard.ZstdDecompressor().stream_reader(open(p, "rb"))) if mt.endswith("zstd") else open
        with opener(src, "rb") as f, open(dest, "wb") as o:
            shutil.copyfileobj(f, o, 1 << 20)
PY

now() { date +%s.%N; }
disk_bytes() { du -s --block-size=1 "$1" | cut -f1; }
apparent_bytes() { du -s --apparent-size --block-size=1 "$1" | cut -f1; }
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

: > "$work/casync.times"; : > "$work/skiff.times"
for run in $(seq "$runs"); do
  echo "run $run/$runs: casync..."
  rm -rf "$work/casync" && mkdir -p "$work/casync/idx"
  sync
  start=$(now)
  for tar in "$work"/tars/*.tar; do
    casync make --store="$work/casync/store" --chunk-size=16384:65536:262144 \
      "$work/casync/idx/$(basename "$tar" .tar).caibx" "$tar" >/dev/null
  done
  sync
  echo "$(now) - $start" | bc -l >> "$work/casync.times"

  echo "run $run/$runs: skiff..."
  rm -rf "$work/skiff"
  sync
  start=$(now)
  for layout in "${layouts[@]}"; do
    "$SKIFF" --store "$work/skiff" convert "oci:$layout:latest" "$(basename "$layout"):latest" >/dev/null
  done
  sync
  echo "$(now) - $start" | bc -l >> "$work/skiff.times"
done
"$SKIFF" --store "$work/skiff" fsck >/dev/null
"$SKIFF" --store "$work/skiff" stats --json > "$work/skiff-stats.json"

casync_disk=$(disk_bytes "$work/casync/store"); casync_apparent=$(apparent_bytes "$work/casync/store")
skiff_disk=$(disk_bytes "$work/skiff"); skiff_apparent=$(apparent_bytes "$work/skiff")
casync_time=$(median < "$work/casync.times"); skiff_time=$(median < "$work/skiff.times")

python3 - "$work" "$casync_disk" "$casync_apparent" "$skiff_disk" "$skiff_apparent" "$casync_time" "$skiff_time" "$runs" "${#layouts[@]}" \
  "$(tr '\n' ' ' < "$work/casync.times")" "$(tr '\n' ' ' < "$work/skiff.times")" <<'PY' > "$work/table.md"
import json, sys
work, cd, ca, sd, sa, ct, st, runs, n, craw, sraw = sys.argv[1:]
b = json.load(open(f"{work}/baseline.json"))
s = json.load(open(f"{work}/skiff-stats.json"))
cd, ca, sd, sa = map(int, (cd, ca, sd, sa)); ct, st = float(ct), float(st)
mb = lambda x: f"{x / 1e6:,.1f} MB"
rows = [
    ("raw layers (every image, uncompressed)", b["raw_bytes"], ""),
    ("gzip layers, each distinct layer once (registry)", b["gzip_unique_bytes"], ""),
    ("file-level dedup, each distinct file zstd -3", b["file_zstd_bytes"], ""),
    ("casync store (`casync make` per unique layer)", cd, f"{ct:.1f} s"),
    ("skiff store (whole directory)", sd, f"{st:.1f} s"),
]
print(f"Dataset: {n} images, {b['files']:,} files ({b['unique_files']:,} distinct, {mb(b['file_unique_bytes'])}).")
print()
print("| what | bytes on disk | vs raw | time (median of %s) |" % runs)
print("|---|---:|---:|---:|")
for name, size, t in rows:
    print(f"| {name} | {mb(size)} | {size / b['raw_bytes']:.3f} | {t} |")
print()
print(f"- skiff store / casync store: **{sd / cd:.3f}** (apparent sizes: {sa / ca:.3f}); skiff / file-level zstd: **{sd / b['file_zstd_bytes']:.3f}**")
ub = b["unique_raw_bytes"]
print(f"- convert throughput over the same distinct input ({mb(ub)} of distinct layer tars): casync {ub / ct / 1e6:.0f} MB/s "
      f"(layers decompressed beforehand, not timed), skiff {ub / st / 1e6:.0f} MB/s (converting all {n} images: gunzip, digest checks, "
      f"merge, and layers seen before applied from their records); **skiff / casync = {ct / st:.2f}x**")
print(f"- counted over every image's layers ({mb(b['raw_bytes'])}), skiff converts {b['raw_bytes'] / st / 1e6:.0f} MB/s")
print(f"- skiff stats: {s['chunks']:,} chunks, dedup ratio {s['dedup_ratio']:.2f}, compression ratio {s['compression_ratio']:.2f}")
print(f"- raw run times (s): casync {craw.strip()}; skiff {sraw.strip()}")
PY
cat "$work/table.md"

# Replace the section between the markers in docs/BENCHMARKS.md.
python3 - "$work/table.md" "$(uname -r)" "$(nproc)" <<'PY' >/dev/null
import datetime, sys
sys.path.insert(0, "bench")
from benchdoc import write_section
table = open(sys.argv[1]).read()
write_section("dedup", "Storage and convert speed (`make bench-dedup`)",
              f"Measured {datetime.date.today()} on a shared {sys.argv[3]}-core machine (Linux {sys.argv[2]}) with `make bench` "
              f"(`bench/dedup.sh`).\n\n{table}")
PY
echo "wrote docs/BENCHMARKS.md"
