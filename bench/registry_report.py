"""Renders bench/registry.sh's results as tables in docs/BENCHMARKS.md (medians)."""
import datetime
import statistics
import sys
from pathlib import Path

from benchdoc import load_results, mb, write_section

results, meta, runs, rate, one_way_ms, kernel, cores = sys.argv[1:]
images = [line.split("\t") for line in Path(meta).read_text().splitlines()]
med = load_results(results)

lines = [
    f"Measured {datetime.date.today()} on a shared {cores}-core machine (Linux {kernel}) with "
    f"`make bench-registry` (`bench/registry.sh`), medians of {runs} runs, over the emulated "
    f"wide-area link ({rate}, {2 * int(one_way_ms)} ms round trip; see the lazy mount section). "
    "On the far side of the link, in one run: nginx serving the images' gzip layers, "
    "`skiff serve` of the converted store, and Debian's docker-registry (distribution 2.8) "
    "holding the same images pushed with `skiff push … docker://…`. Each skiff start has an "
    "empty chunk cache and the startup profile recorded through the same origin with "
    "`skiff run --record-profile`; the page cache is dropped before every start and read.",
    "",
    "HelloBench, time to the ready line: (a) gzip layers from nginx, 3 at a time, `tar`, "
    "crun; (b) `skiff run NAME:TAG --server`; (c) `skiff run docker://…`.",
    "",
    "| image | runs | (a) plain | (b) skiff serve | (c) registry | (a) / (c) | (c) / (b) |",
    "|---|---|---:|---:|---:|---:|---:|",
]
hello_ratio, hello_speedup = [], []
for image, kind, command in images:
    a, b, c = (med("ready", image, v) for v in ["plain", "serve", "registry"])
    hello_ratio.append(c / b)
    hello_speedup.append(a / c)
    lines.append(
        f"| {image} | {kind}: `{command}` | {a:.2f} s | {b:.2f} s | {c:.2f} s | "
        f"{a / c:.1f}× | {c / b:.2f} |"
    )
lines += [
    "",
    f"Through the registry against through `skiff serve`: median **{statistics.median(hello_ratio):.2f}×** "
    f"the time (range {min(hello_ratio):.2f} to {max(hello_ratio):.2f}); against the plain pull, "
    f"median **{statistics.median(hello_speedup):.1f}×** faster.",
    "",
    "Cold full read, `find -type f -exec cat {} +` of the whole image, empty cache, "
    "background prefetch on (the default): (d) download and unpack the gzip layers, then read the tree from local disk; "
    "(e) a lazy mount from `skiff serve`; (f) a lazy mount from the registry (mount time "
    "included). Bytes are those received over the link.",
    "",
    "| image | gzip layers | (d) plain | (e) skiff serve | (f) registry | (f) / (e) | bytes (d) | bytes (e) | bytes (f) |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
]
full_ratio = []
for image, _, _ in images:
    d, e, f = (med("full", image, v) for v in ["plain", "serve", "registry"])
    bd, be, bf = (med("full_bytes", image, v) for v in ["plain", "serve", "registry"])
    full_ratio.append(f / e)
    lines.append(
        f"| {image} | {mb(med('image_bytes', image, 'gzip'))} | {d:.2f} s | {e:.2f} s | {f:.2f} s | "
        f"{f / e:.2f} | {mb(bd)} | {mb(be)} | {mb(bf)} |"
    )
registry, gzip = med("storage", "all", "registry"), med("storage", "all", "gzip")
lines += [
    "",
    f"Full read through the registry against through `skiff serve`: median "
    f"**{statistics.median(full_ratio):.2f}×** the time (range {min(full_ratio):.2f} to "
    f"{max(full_ratio):.2f}).",
    "",
    "Storage for the whole dataset (every image above):",
    "",
    "| | bytes | vs gzip layers |",
    "|---|---:|---:|",
    f"| distinct gzip layers (what a registry stores for the plain images) | {mb(gzip)} | 1.00 |",
    f"| the registry's blobs for the skiff images (packs, indexes, chunk tables, configs, manifests) | {mb(registry)} | {registry / gzip:.2f} |",
]
write_section("registry", "An OCI registry as the distribution engine", "\n".join(lines))
