"""Renders bench/warm.sh's results into docs/BENCHMARKS.md (medians)."""
import datetime
import sys

from benchdoc import load_results, write_section

results, images, links, runs, rate, one_way_ms, cores = (
    sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), *sys.argv[4:8])
med = load_results(results)


def hit_rate(image, variant):
    hits, misses = med("hits", image, variant), med("misses", image, variant)
    return hits / (hits + misses) if hits + misses else float("nan")


lines = [
    f"Measured {datetime.date.today()} on a shared {cores}-core machine with `make bench-warm` "
    f"(`bench/warm.sh`), medians of {runs} runs. The first pull after a push: a cold lazy start "
    f"with `skiff run` over loopback and over the emulated link ({rate}, "
    f"{2 * int(one_way_ms)} ms round trip; the server in a network namespace), each from a fresh "
    "`skiff serve` process (so an empty hot cache), an empty host cache and the page cache "
    "dropped, running the image's HelloBench command as its startup profile was recorded "
    "before (`skiff run --record-profile`). *Pushed*: the tag was "
    "put to that server process just before (what a push does last), so reading the manifest "
    "warms the hot cache with the profile's chunks. *Not pushed*: the same store and start, "
    "nothing put, nothing warmed. Hits and misses are the server's hot-cache counters during "
    "the start (chunks answered one by one; frames sent as stored do not go through the cache).",
    "",
    "| link | image | hot-cache hit rate: pushed / not pushed | hits / misses, pushed | hits / misses, not pushed | start: pushed / not pushed |",
    "|---|---|---:|---:|---:|---:|",
]
for link in links:
    for image in images:
        p, n = f"{link}-pushed", f"{link}-not-pushed"
        lines.append(
            f"| {link} | {image} | **{hit_rate(image, p) * 100:.0f}%** / {hit_rate(image, n) * 100:.0f}% "
            f"| {med('hits', image, p):.0f} / {med('misses', image, p):.0f} "
            f"| {med('hits', image, n):.0f} / {med('misses', image, n):.0f} "
            f"| {med('start', image, p):.2f} s / {med('start', image, n):.2f} s |"
        )
write_section("warm", "Registry-side prefetch after a push (`make bench-warm`, root)", "\n".join(lines))
