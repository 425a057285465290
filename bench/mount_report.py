"""Renders bench/mount.sh's results as tables in docs/BENCHMARKS.md (medians)."""
import datetime
import statistics
import sys

from benchdoc import load_results, mb, write_section

results, runs, rate, one_way_ms, kernel, cores, images, cat_image, big_file = sys.argv[1:]
images = images.split()
med = load_results(results)

lines = [
    f"Measured {datetime.date.today()} on a shared {cores}-core machine (Linux {kernel}) with "
    f"`make bench-mount` (`bench/mount.sh`), medians of {runs} runs unless said otherwise. "
    "Images from the dataset (`tools/make-images`); every skiff run starts from an empty chunk cache "
    "unless it says warm. Server, client and baselines share the machine.",
    "",
    "**Mount to first byte** (`skiff mount --no-prefetch`, then the first byte of `/etc/os-release`; "
    "the mount fetches the manifest and the index, no file data):",
    "",
    f"| image | loopback | WAN ({rate}, {2 * int(one_way_ms)} ms RTT): mount | WAN: first byte |",
    "|---|---:|---:|---:|",
]
for image in images:
    lines.append(
        f"| {image} | {med('first_byte', image, 'loopback') * 1000:.0f} ms "
        f"| {med('first_byte', image, 'wan-mount') * 1000:.0f} ms "
        f"| {med('first_byte', image, 'wan') * 1000:.0f} ms |"
    )

logical = med("image_bytes", cat_image, "logical")
local_cat, skiff_cat = med("cat_all", cat_image, "local"), med("cat_all", cat_image, "skiff")
pre_cat = med("cat_all", cat_image, "skiff-prefetch")
lines += [
    "",
    f"**Cold `cat` of every file** of `{cat_image}` ({mb(logical)}), page cache dropped; skiff from a fresh "
    "mount with an empty cache over loopback, every chunk fetched when first read or by prefetch:",
    "",
    "| | time | MB/s | vs local disk |",
    "|---|---:|---:|---:|",
    f"| local disk (umoci unpack) | {local_cat:.2f} s | {logical / local_cat / 1e6:,.0f} | 1.00 |",
    f"| skiff mount, cold, `--no-prefetch` | {skiff_cat:.2f} s | {logical / skiff_cat / 1e6:,.0f} | {local_cat / skiff_cat:.2f} |",
    f"| skiff mount, cold, prefetch on (the default; mount time included) | {pre_cat:.2f} s | {logical / pre_cat / 1e6:,.0f} | {local_cat / pre_cat:.2f} |",
]

size = med("big_file", big_file.split(":")[0], "bytes")
image = big_file.split(":")[0]
rows = []
for page, label in [("cold-page-cache", "page cache dropped"), ("warm-page-cache", "page cache warm")]:
    loc = size / med("warm_read", image, f"local-{page}") / 1e6
    sk = size / med("warm_read", image, f"skiff-{page}") / 1e6
    pt = size / med("warm_read", image, f"skiff-passthrough-{page}") / 1e6
    rows.append(
        f"| {label} | {loc:,.0f} MB/s | {sk:,.0f} MB/s | {sk / loc:.2f} | {pt:,.0f} MB/s | {pt / loc:.2f} |"
    )
lines += [
    "",
    f"**Warm sequential read** of `{big_file}` ({mb(size)}), its chunks in the host's cache (remounted: "
    "the first read comes from the host's cache, later ones from the daemon's memory as well), `cat` to "
    "/dev/null, median of 11. As mounted by default, and with `--passthrough`, which serves the file "
    f"by FUSE passthrough ({int(med('passthrough', image, 'opens'))} passthrough opens):",
    "",
    "| | local disk | skiff mount | mount vs local | `--passthrough` | vs local |",
    "|---|---:|---:|---:|---:|---:|",
    *rows,
]

lines += [
    "",
    f"**Over an emulated wide-area link** ({rate} by `tc tbf` on a veth pair into a network namespace, "
    f"{2 * int(one_way_ms)} ms round trip by `delay-proxy`; servers inside the namespace). Time until the image's "
    "command has run, and bytes that crossed the link. Baseline: download the image's gzip layers from nginx "
    "(3 at a time), unpack them with `tar`, run. skiff: lazy mount (empty cache, no prefetch), run the command "
    "in a chroot of the mount.",
    "",
    "| image | command | image size | gzip layers | baseline: bytes | baseline: time | skiff: bytes | skiff: time | time vs baseline | bytes vs baseline |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
]
commands = {
    "git": "git --version", "python": "python3 -c pass", "postgresql": "postgres --version",
    "golang": "go version", "perl": "perl -e 1", "ruby": "ruby -e 1",
}
speedups = []
for image in images:
    base_t, skiff_t = med("started", image, "baseline"), med("started", image, "skiff")
    base_b, skiff_b = med("wire_bytes", image, "baseline"), med("wire_bytes", image, "skiff")
    speedups.append(base_t / skiff_t)
    lines.append(
        f"| {image} | `{commands.get(image, '?')}` | {mb(med('image_bytes', image, 'logical'))} "
        f"| {mb(med('image_bytes', image, 'gzip'))} | {mb(base_b)} | {base_t:.2f} s | {mb(skiff_b)} "
        f"| {skiff_t:.2f} s | {base_t / skiff_t:.1f}× faster | {skiff_b / base_b:.3f} |"
    )
lines += [
    "",
    f"Median speed-up over the images: {statistics.median(speedups):.1f}×. Bytes are counted on the link "
    "(TCP/IP headers included).",
]
write_section("mount", "Lazy mount (`make bench-mount`, root)", "\n".join(lines))
