"""Renders bench/nydus.sh's results as tables in docs/BENCHMARKS.md (medians)."""
import datetime
import statistics
import sys

from benchdoc import load_results, mb, write_section

results, images, links, runs, rate, one_way_ms, kernel, cores = sys.argv[1:]
images, links = images.split(), links.split()
med = load_results(results)
link_name = {
    "loopback": "loopback",
    "wan": f"the emulated wide-area link ({rate}, {2 * int(one_way_ms)} ms round trip)",
}


def s(x):
    return f"{x:.2f} s"


def ms(x):
    return f"{x * 1000:.0f} ms"


lines = [
    f"Measured {datetime.date.today()} on a shared {cores}-core machine (Linux {kernel}) with "
    f"`make bench-nydus` (`bench/nydus.sh`), medians of {runs} runs. Both systems mount the "
    "same images lazily from one Debian docker-registry (distribution 2.8) holding both "
    "conversions: skiff with `skiff mount docker://…`, Nydus 2.2.0 with `nydusd` "
    "(registry backend, blobcache) on a bootstrap fetched from the registry. Nydus's "
    "images: `nydus-image create`, RAFS v6, zstd, 1 MiB chunks, the base image's bootstrap "
    "as chunk dictionary (see the script for why a squashed tree). Page cache dropped and "
    "caches emptied before every start; the full read is `find MNT -type f -exec cat {} +`, "
    "timed from the mount command (mount included). Requests and bytes are those the "
    "registry logged during the read (bytes: from the mount on); CPU is user + system "
    "seconds of the mount daemon (skiff: supervisor and daemon) and of the registry over "
    "the whole start and read. Every tree was checked against `tar`'s once.",
    "",
]
ratios = {"full_off": [], "full_on": [], "requests": [], "ready": []}
for link in links:
    lines += [
        f"**Cold reads on {link_name[link]}:**",
        "",
        "| image | mount ready: skiff / Nydus | first byte: skiff / Nydus "
        "| full read, no prefetch: skiff / Nydus / ratio | requests: skiff / Nydus "
        "| full read, prefetch: skiff / Nydus / ratio | local disk |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for image in images:
        r = [med("ready", image, f"{x}-{link}") for x in ("skiff", "nydus")]
        f = [med("first_byte", image, f"{x}-{link}") for x in ("skiff", "nydus")]
        off = [med("full", image, f"{x}-{link}-off") for x in ("skiff", "nydus")]
        on = [med("full", image, f"{x}-{link}-on") for x in ("skiff", "nydus")]
        q = [med("requests", image, f"{x}-{link}-off") for x in ("skiff", "nydus")]
        ratios["full_off"].append(off[0] / off[1])
        ratios["full_on"].append(on[0] / on[1])
        ratios["requests"].append(q[0] / q[1])
        ratios["ready"].append(r[0] / r[1])
        disk = med("full", image, "disk")
        lines.append(
            f"| {image} | {ms(r[0])} / {ms(r[1])} | {ms(f[0])} / {ms(f[1])} "
            f"| {s(off[0])} / {s(off[1])} / **{off[0] / off[1]:.2f}** "
            f"| {q[0]:.0f} / {q[1]:.0f} "
            f"| {s(on[0])} / {s(on[1])} / **{on[0] / on[1]:.2f}** | {s(disk)} |"
        )
    lines += [
        "",
        "| image | bytes read from the registry, no prefetch: skiff / Nydus "
        "| vs the image's compressed data: skiff / Nydus "
        "| CPU, no prefetch: skiff daemon / registry · nydusd / registry "
        "| CPU, prefetch: skiff daemon / registry · nydusd / registry |",
        "|---|---:|---:|---:|---:|",
    ]
    for image in images:
        b = [med("bytes", image, f"{x}-{link}-off") for x in ("skiff", "nydus")]
        d = [med("data_bytes", image, x) for x in ("skiff", "nydus")]
        cpu = {
            (x, p, w): med(f"cpu_{w}", image, f"{x}-{link}-{p}")
            for x in ("skiff", "nydus")
            for p in ("off", "on")
            for w in ("daemon", "registry")
        }

        def c(p):
            return (
                f"{cpu[('skiff', p, 'daemon')]:.2f} / {cpu[('skiff', p, 'registry')]:.2f} · "
                f"{cpu[('nydus', p, 'daemon')]:.2f} / {cpu[('nydus', p, 'registry')]:.2f}"
            )

        lines.append(
            f"| {image} | {mb(b[0])} / {mb(b[1])} | {b[0] / d[0]:.2f} / {b[1] / d[1]:.2f} "
            f"| {c('off')} | {c('on')} |"
        )
    lines.append("")

storage = {x: med("storage", "all", x) for x in ("skiff", "nydus", "gzip")}
convert = {x: med("convert", "all", x) for x in ("skiff", "nydus")}
raw = sum(med("image_bytes", image, "raw") for image in images)
lines += [
    "**Storage and convert** for the images above (and the base image they share):",
    "",
    "| | registry bytes | vs gzip layers | convert time | MB/s of image trees |",
    "|---|---:|---:|---:|---:|",
    f"| gzip layers, each distinct layer once | {mb(storage['gzip'])} | 1.00 | | |",
    f"| skiff (packs, indexes, chunk tables, manifests) | {mb(storage['skiff'])} "
    f"| {storage['skiff'] / storage['gzip']:.2f} | {s(convert['skiff'])} "
    f"| {raw / 1e6 / convert['skiff']:.0f} |",
    f"| Nydus (data blobs and bootstraps) | {mb(storage['nydus'])} "
    f"| {storage['nydus'] / storage['gzip']:.2f} | {s(convert['nydus'])} "
    f"| {raw / 1e6 / convert['nydus']:.0f} |",
    "",
    f"Medians over images and links, skiff / Nydus: full read without prefetch "
    f"**{statistics.median(ratios['full_off']):.2f}×** the time, with prefetch "
    f"**{statistics.median(ratios['full_on']):.2f}×**, requests "
    f"**{statistics.median(ratios['requests']):.2f}×**, mount ready "
    f"**{statistics.median(ratios['ready']):.2f}×**; bytes stored "
    f"**{storage['skiff'] / storage['nydus']:.2f}×**; convert "
    f"**{convert['nydus'] / convert['skiff']:.2f}×** Nydus's speed (its time includes "
    "unpacking the layers with tar; skiff's, reading the gzip layers).",
]
write_section("nydus", "Cold reads against Nydus (`make bench-nydus`, root)", "\n".join(lines))
