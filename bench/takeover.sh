#!/usr/bin/env bash
# What a reader sees when a mount's daemon dies: a process reads a 256 MiB
# file from a cold lazy mount (served over loopback, no prefetch) in 128 KiB
# reads, and we note its longest wait for one read and whether its bytes
# are right, with nothing happening, with the daemon killed (kill -9) in
# the middle, and with `skiff upgrade` in the middle. Baseline: what it
# costs without a takeover, a mount whose daemon and supervisor are both
# killed: the reader fails, and the time from the kill until a new mount
# serves the file's first byte again (umount of the dead mount, mount).
# Writes the table into docs/BENCHMARKS.md.
#
# Usage (root): SKIFF=... bench/takeover.sh   (make bench-takeover does this)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$HOME/.cache/skiff-target}/release
SKIFF=${SKIFF:-$target/skiff}
runs=${RUNS:-5}
port=${PORT:-7391}
work=$(mktemp -d /var/tmp/skiff-takeover-bench.XXXXXX)
pids=()

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  unmount_under "$work"
  pkill -f -- "--run-dir $work/run" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

for tool in umoci python3; do
  command -v "$tool" >/dev/null || { echo "$tool missing: tools/install-deps" >&2; exit 1; }
done

export SKIFF_RUN_DIR=$work/run SKIFF_CACHE=$work/cache
mnt=$work/mnt
results=$work/results.tsv

echo "takeover bench: making a 256 MiB image" >&2
mkdir -p "$work/root/data"
python3 -c "import os,sys; sys.stdout.buffer.write(os.urandom(256 << 20))" > "$work/root/data/big"
umoci init --layout "$work/layout" >/dev/null
umoci new --image "$work/layout:latest" >/dev/null
umoci unpack --image "$work/layout:latest" "$work/bundle" >/dev/null
cp -a "$work/root/data" "$work/bundle/rootfs/"
umoci repack --image "$work/layout:latest" "$work/bundle" >/dev/null
"$SKIFF" --store "$work/store" convert "oci:$work/layout:latest" big:1 >/dev/null 2>&1
. bench/common.sh
"$SKIFF" --store "$work/store" serve --listen "127.0.0.1:$port" --token-file "$(write_token)" >"$work/serve.log" 2>&1 &
pids+=($!)
sleep 1
want=$(sha256sum < "$work/root/data/big" | cut -d' ' -f1)

# Reads FILE in 128 KiB pieces; prints "longest_read_ms total_s sha256|error".
cat > "$work/reader.py" <<'EOF'
import hashlib, sys, time
h, longest, start = hashlib.sha256(), 0.0, time.monotonic()
try:
    with open(sys.argv[1], "rb") as f:
        while True:
            t = time.monotonic()
            piece = f.read(128 << 10)
            longest = max(longest, time.monotonic() - t)
            if not piece:
                break
            h.update(piece)
    result = h.hexdigest()
except OSError as e:
    result = f"error:{e.errno}"
print(f"{longest * 1000:.1f} {time.monotonic() - start:.3f} {result}")
EOF

mount_cold() {
  rm -rf "$SKIFF_CACHE"
  "$SKIFF" mount big:1 "$mnt" --server "http://127.0.0.1:$port" --no-prefetch >/dev/null 2>&1
  sync; echo 3 > /proc/sys/vm/drop_caches
}
daemon_pid() { "$SKIFF" status "$mnt" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

for run in $(seq "$runs"); do
  for variant in quiet kill upgrade; do
    mount_cold
    python3 "$work/reader.py" "$mnt/data/big" > "$work/read.out" &
    reader=$!
    sleep 0.5
    case $variant in
      kill) kill -9 "$(daemon_pid pid)" ;;
      upgrade) "$SKIFF" upgrade "$mnt" >/dev/null 2>&1 ;;
    esac
    wait "$reader"
    read -r longest total sum < "$work/read.out"
    [ "$sum" = "$want" ] && right=1 || right=0
    printf 'longest_read_ms\t%s\t%s\t%s\n' big "$variant" "$longest" >> "$results"
    printf 'read_s\t%s\t%s\t%s\n' big "$variant" "$total" >> "$results"
    printf 'right\t%s\t%s\t%s\n' big "$variant" "$right" >> "$results"
    "$SKIFF" umount "$mnt" >/dev/null 2>&1
  done
  # Baseline: no takeover. Both processes killed; the reader fails; time
  # until a new mount serves the first byte again.
  mount_cold
  python3 "$work/reader.py" "$mnt/data/big" > "$work/read.out" &
  reader=$!
  sleep 0.5
  supervisor=$(daemon_pid supervisor_pid)
  daemon=$(daemon_pid pid)
  start=$(date +%s.%N)
  kill -9 "$supervisor" "$daemon"
  wait "$reader" || true
  "$SKIFF" umount "$mnt" >/dev/null 2>&1
  "$SKIFF" mount big:1 "$mnt" --server "http://127.0.0.1:$port" --no-prefetch >/dev/null 2>&1
  head -c1 "$mnt/data/big" >/dev/null
  end=$(date +%s.%N)
  read -r _ _ sum < "$work/read.out"
  [ "${sum#error}" != "$sum" ] && failed=1 || failed=0
  printf 'remount_ms\t%s\t%s\t%s\n' big remount "$(echo "($end - $start) * 1000" | bc)" >> "$results"
  printf 'reader_failed\t%s\t%s\t%s\n' big remount "$failed" >> "$results"
  "$SKIFF" umount "$mnt" >/dev/null 2>&1
done

PYTHONPATH=bench python3 - "$results" "$runs" "$(uname -r)" <<'EOF'
import datetime, sys
from benchdoc import load_results, write_section
path, runs, kernel = sys.argv[1], int(sys.argv[2]), sys.argv[3]
med = load_results(path)
# Every run must have been right (a median would hide one that was not).
every = {}
for line in open(path).read().splitlines():
    metric, _, variant, value = line.split("\t")
    if metric in ("right", "reader_failed"):
        every.setdefault((metric, variant), []).append(float(value) == 1)
rows = [
    ("nothing happens", "quiet"),
    ("the daemon is killed (kill -9) at 0.5 s", "kill"),
    ("`skiff upgrade` at 0.5 s", "upgrade"),
]
lines = [
    f"Measured {datetime.date.today()} on a shared 2-core machine (Linux {kernel}) with "
    f"`make bench-takeover` (`bench/takeover.sh`), medians of {runs} runs. A process reads a "
    "256 MiB file from a cold lazy mount (loopback server, no prefetch, page cache dropped) "
    "in 128 KiB reads.",
    "",
    "| during the read | longest wait for one read | whole read | bytes right |",
    "|---|---:|---:|---:|",
]
for label, variant in rows:
    right = all(every[("right", variant)])
    lines.append(
        f"| {label} | {med('longest_read_ms', 'big', variant):.0f} ms "
        f"| {med('read_s', 'big', variant):.2f} s | {'every run' if right else 'NOT every run'} |"
    )
failed = all(every[("reader_failed", "remount")])
lines += [
    "",
    f"Baseline without a takeover (supervisor and daemon both killed): the reader "
    f"{'fails' if failed else 'does not always fail'} (ENOTCONN), and unmounting the dead mount "
    f"and mounting again until the file's first byte is served takes "
    f"{med('remount_ms', 'big', 'remount'):.0f} ms, after which the reader must start over.",
]
write_section("takeover", "A daemon that dies under a reader (`make bench-takeover`)", "\n".join(lines))
EOF
