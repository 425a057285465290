"""Renders bench/hello.sh's results as tables in docs/BENCHMARKS.md (medians)."""
import datetime
import statistics
import sys
from pathlib import Path

from benchdoc import load_results, mb, write_section

results, meta, runs, rate, one_way_ms, kernel, cores = sys.argv[1:]
images = [line.split("\t") for line in Path(meta).read_text().splitlines()]
med = load_results(results)

variants = ["plain", "cold-no-profile", "cold-profile", "warm"]
lines = [
    f"Measured {datetime.date.today()} on a shared {cores}-core machine (Linux {kernel}) with "
    f"`make bench-hello` (`bench/hello.sh`), medians of {runs} runs. HelloBench as in Slacker: "
    "time from the command to the image's ready line, over the emulated wide-area link "
    f"({rate}, {2 * int(one_way_ms)} ms round trip; see the lazy mount section). "
    "(a) download the gzip layers from nginx across the link, 3 at a time, unpack with `tar`, "
    "run with crun; (b) `skiff run` with an empty chunk cache and no startup profile "
    "(`--no-profile`; background prefetch on, as by default); (c) `skiff run` with an empty "
    "cache and the profile recorded by `skiff run --record-profile` before the runs; "
    "(d) `skiff run` again with the cache (c) left. Page cache dropped before every start. "
    "Server, client and baseline share the machine.",
    "",
    "| image | runs | (a) plain | (b) skiff cold | (c) skiff cold + profile | (d) skiff warm | (a) / (c) |",
    "|---|---|---:|---:|---:|---:|---:|",
]
speedups = []
for image, kind, command in images:
    a, b, c, d = (med("ready", image, v) for v in variants)
    speedups.append(a / c)
    lines.append(
        f"| {image} | {kind}: `{command}` | {a:.2f} s | {b:.2f} s | {c:.2f} s | {d:.2f} s | {a / c:.1f}× |"
    )
lines += [
    "",
    f"Median speed-up of (c) over (a): **{statistics.median(speedups):.1f}×** "
    f"(range {min(speedups):.1f}× to {max(speedups):.1f}×).",
    "",
    "Bytes received over the link before the ready line, against what the start reads "
    "(distinct 4 KiB pages read through the mount while the profile was recorded):",
    "",
    "| image | gzip layers | (a) plain | (b) skiff cold | (c) skiff cold + profile | (d) warm "
    "| start reads | (c) / reads |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
]
ratios = []
for image, _, _ in images:
    a, b, c, d = (med("bytes", image, v) for v in variants)
    reads = med("read_bytes", image, "profile")
    ratios.append(c / reads)
    lines.append(
        f"| {image} | {mb(med('image_bytes', image, 'gzip'))} | {mb(a)} | {mb(b)} | {mb(c)} | "
        f"{mb(d)} | {mb(reads)} | {c / reads:.2f} |"
    )
lines += [
    "",
    f"Median (c) / reads: **{statistics.median(ratios):.2f}** (highest {max(ratios):.2f}). "
    "The bytes include the manifest and the index (which every skiff start fetches), "
    "chunks read only in part (chunks average 64 KiB; the kernel reads ahead 128 KiB), "
    "and HTTP and TCP overhead.",
]
write_section("hello", "HelloBench: time to ready over a wide-area link", "\n".join(lines))
