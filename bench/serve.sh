#!/usr/bin/env bash
# Chunk server load benchmark: skiff serve against nginx serving the same
# chunks as static files from disk, measured side by side in one run.
#   1. single-chunk GETs: wrk, 64 connections, random chunks of one image,
#      ROUNDS alternating rounds of DURATION seconds each (medians reported);
#   2. batch fetch: POST /v1/chunks/fetch of BATCH ids (default: every chunk
#      of the image), against nginx sending a static file holding exactly the
#      same response bytes.
# Writes the tables into docs/BENCHMARKS.md.
#
# Usage: SKIFF=path/to/skiff CHUNK_FILES=path/to/chunk-files bench/serve.sh
#        (make bench-serve does this)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$HOME/.cache/skiff-target}/release
SKIFF=${SKIFF:-$target/skiff}
CHUNK_FILES=${CHUNK_FILES:-$target/chunk-files}
image_dir=${SKIFF_BENCH_IMAGE:-/var/cache/skiff/images/git}
rounds=${ROUNDS:-5}
duration=${DURATION:-10}
batch=${BATCH:-}
work=$(mktemp -d /var/tmp/skiff-serve-bench.XXXXXX)
chmod 755 "$work" # nginx workers run as www-data
server_pid=
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

for tool in wrk nginx curl; do
  command -v "$tool" >/dev/null || { echo "$tool missing: tools/install-deps --bench" >&2; exit 1; }
done
[ -f "$image_dir/index.json" ] || { echo "no image at $image_dir: run tools/make-images" >&2; exit 1; }

. bench/common.sh
wait_port() { for _ in $(seq 100); do curl -sf "http://127.0.0.1:$1/$2" >/dev/null && return; sleep 0.1; done; echo "port $1 never answered" >&2; exit 1; }

echo "converting $image_dir..."
"$SKIFF" --store "$work/store" convert "oci:$image_dir:latest" bench:1 >/dev/null
"$CHUNK_FILES" "$work/store" bench:1 "$work/files" > "$work/ids"
chunks=$(wc -l < "$work/ids")
wire_bytes=$(du -sb "$work/files" | cut -f1)
echo "$chunks chunks, $wire_bytes bytes on the wire"
batch=${batch:-$chunks}

# The batch: its id list, and the very bytes skiff answers, as a static file.
head -n "$batch" "$work/ids" > "$work/batch.ids"
python3 - "$work" <<'PY'
import struct, sys
from pathlib import Path
work = Path(sys.argv[1])
ids = (work / "batch.ids").read_text().split()
with open(work / "batch.req", "wb") as req, open(work / "files/batch.records", "wb") as rec:
    for hex_id in ids:
        raw = bytes.fromhex(hex_id)
        data = (work / "files/v1/chunks" / hex_id).read_bytes()
        req.write(raw)
        rec.write(raw + b"\0" + struct.pack("<I", len(data)) + data)
PY
batch_bytes=$(stat -c %s "$work/files/batch.records")

nginx_port=$(free_port)
cat > "$work/nginx.conf" <<CONF
worker_processes auto;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$nginx_port;
    root $work/files;
    location / {
      default_type application/zstd;
      add_header Cache-Control "public, max-age=31536000, immutable";
    }
  }
}
CONF
nginx -c "$work/nginx.conf"

start_skiff() {
  skiff_port=$(free_port)
  "$SKIFF" --store "$work/store" serve --listen "127.0.0.1:$skiff_port" --cache-mb "$1" --token-file "$(write_token)" 2>>"$work/serve.log" &
  server_pid=$!
  wait_port "$skiff_port" healthz
}
stop_skiff() { kill -TERM "$server_pid"; wait "$server_pid" || true; server_pid=; }

cat > "$work/get.lua" <<'LUA'
local ids = {}
function init(args)
  for line in io.lines(args[1]) do ids[#ids + 1] = line end
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end
function request()
  return wrk.format("GET", "/v1/chunks/" .. ids[math.random(#ids)])
end
LUA
load() { # name port seconds
  wrk -t2 -c64 -d"$3"s --latency -s "$work/get.lua" "http://127.0.0.1:$2" -- "$work/ids" > "$work/wrk.out"
  python3 - "$1" "$work/wrk.out" >> "$work/gets.tsv" <<'PY'
import re, sys
text = open(sys.argv[2]).read()
def ms(label):
    v, unit = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", text).groups()
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
if errors:
    sys.exit(f"{sys.argv[1]}: {errors.group(1)} failed requests")
print(f"{sys.argv[1]}\t{rps}\t{ms('50')}\t{ms('99')}")
PY
  tail -n1 "$work/gets.tsv"
}

start_skiff 1024
echo "warming up (every chunk once into both page cache and skiff's cache)..."
load warmup-skiff "$skiff_port" 5 >/dev/null
load warmup-nginx "$nginx_port" 5 >/dev/null
: > "$work/gets.tsv"
for r in $(seq "$rounds"); do
  echo "round $r/$rounds"
  load skiff "$skiff_port" "$duration"
  load nginx "$nginx_port" "$duration"
done

batch_run() { # name url [data-file [accept]]
  for _ in $(seq 7); do
    if [ -n "${3:-}" ]; then
      curl -sf -o /dev/null -w "$1\t%{size_download}\t%{time_total}\n" --data-binary "@$3" \
        -H "Accept: ${4:-application/vnd.skiff.chunks.v1}" "$2"
    else
      curl -sf -o /dev/null -w "$1\t%{size_download}\t%{time_total}\n" "$2"
    fi
  done >> "$work/batch.tsv"
}
: > "$work/batch.tsv"
batch_run skiff-hot "http://127.0.0.1:$skiff_port/v1/chunks/fetch" "$work/batch.req"
batch_run nginx "http://127.0.0.1:$nginx_port/batch.records"
stop_skiff
start_skiff 0
batch_run skiff-nocache "http://127.0.0.1:$skiff_port/v1/chunks/fetch" "$work/batch.req"
# The same, to a client that takes frames as the store keeps them.
batch_run skiff-frames "http://127.0.0.1:$skiff_port/v1/chunks/fetch" "$work/batch.req" application/vnd.skiff.chunks.v2
stop_skiff

python3 - "$work" "$chunks" "$wire_bytes" "$batch" "$batch_bytes" "$rounds" "$duration" "$(uname -r)" "$(nproc)" "$image_dir" <<'PY'
import datetime, statistics, sys
from pathlib import Path
sys.path.insert(0, "bench")
from benchdoc import write_section
work, chunks, wire, batch, batch_bytes, rounds, duration, kernel, cores, image = sys.argv[1:]
gets = {}
for line in (Path(work) / "gets.tsv").read_text().splitlines():
    name, rps, p50, p99 = line.split("\t")
    gets.setdefault(name, []).append((float(rps), float(p50), float(p99)))
med = {n: [statistics.median(col) for col in zip(*rows)] for n, rows in gets.items()}
ratios = [s[0] / n[0] for s, n in zip(gets["skiff"], gets["nginx"])]
batches = {}
for line in (Path(work) / "batch.tsv").read_text().splitlines():
    name, size, secs = line.split("\t")
    # Frames as stored are other (fewer) bytes than the chunk records.
    if int(size) != int(batch_bytes) and not (name == "skiff-frames" and int(size) > 0):
        sys.exit(f"{name}: got {size} bytes, expected {batch_bytes}")
    batches.setdefault(name, []).append((int(size), float(secs)))
bsize = {n: statistics.median(s for s, _ in v) for n, v in batches.items()}
btime = {n: statistics.median(t for _, t in v) for n, v in batches.items()}
lines = [
    f"Measured {datetime.date.today()} on a shared {cores}-core machine (Linux {kernel}) with `make bench-serve` (`bench/serve.sh`). "
    f"Image: `{Path(image).name}` from the dataset, {int(chunks):,} distinct chunks, {int(wire)/1e6:,.1f} MB as wire chunks. "
    "Server, nginx and wrk share the same 2 cores; loopback network.",
    "",
    f"**Single-chunk GETs** (`wrk -t2 -c64`, random chunk ids, {rounds} alternating rounds of {duration} s, medians; "
    "both servers warm: every chunk in skiff's hot cache and in the page cache):",
    "",
    "| server | req/s | p50 | p99 | req/s vs nginx |",
    "|---|---:|---:|---:|---:|",
]
for name, label in [("nginx", "nginx (static files, sendfile)"), ("skiff", "skiff serve (hot-chunk cache)")]:
    rps, p50, p99 = med[name]
    ratio = "1.00" if name == "nginx" else f"{statistics.median(ratios):.2f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
    lines.append(f"| {label} | {rps:,.0f} | {p50:.2f} ms | {p99:.2f} ms | {ratio} |")
lines += [
    "",
    f"**Batch fetch** (one `POST /v1/chunks/fetch` of {batch} ids, {int(batch_bytes)/1e6:.1f} MB of records; nginx sends a static file of the same bytes; `curl`, median of 7):",
    "",
    "| server | answer | time | MB/s | time vs nginx |",
    "|---|---:|---:|---:|---:|",
]
for name, label in [("nginx", "nginx (one static file)"), ("skiff-hot", "skiff, chunks in the hot cache"), ("skiff-nocache", "skiff, `--cache-mb 0` (read frames, compress each chunk)"), ("skiff-frames", "skiff, `--cache-mb 0`, frames as stored (`Accept: …chunks.v2`)")]:
    lines.append(f"| {label} | {bsize[name] / 1e6:,.1f} MB | {btime[name] * 1000:,.0f} ms | {bsize[name] / btime[name] / 1e6:,.0f} | {btime['nginx'] / btime[name]:.2f} |")
write_section("serve", "Chunk server (`make bench-serve`)", "\n".join(lines))
PY
