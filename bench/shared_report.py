"""Renders bench/shared.sh's results into docs/BENCHMARKS.md (medians)."""
import datetime
import sys

from benchdoc import load_results, mb, write_section

results, image, counts, runs, rate, one_way_ms, cores = (
    sys.argv[1], sys.argv[2], sys.argv[3].split(), *sys.argv[4:8])
med = load_results(results)

lines = [
    f"Measured {datetime.date.today()} on a shared {cores}-core machine with `make bench-shared` "
    f"(`bench/shared.sh`), medians of {runs} runs. N hosts (network namespaces) read all of "
    f"`{image}` at once (`tar` of the mount; page cache dropped, caches empty), each over a link "
    f"of its own ({rate} both ways, {2 * int(one_way_ms)} ms round trip) to one `skiff serve`. "
    "*Alone*: a cache of its own on each host, as without `--shared`. *Cooperative*: one cache "
    "directory for all, `skiff mount --shared`: each chunk is claimed by the host that fetches "
    "it, and the others read it from the cache. The shared cache is this machine's disk, which "
    "no link slows (over NFS, reading the others' chunks costs a little more). Time: from the first "
    "mount until every host has read every file (each mounts, one after the other, then all read). Sent: the server's response bytes, and the chunks in them.",
    "",
    "| hosts | time: cooperative / alone | ratio | sent: cooperative / alone | ratio | chunks sent: cooperative / alone |",
    "|---:|---:|---:|---:|---:|---:|",
]
for n in counts:
    tc, ta = med("time", n, "cooperative"), med("time", n, "alone")
    sc, sa = med("sent", n, "cooperative"), med("sent", n, "alone")
    lines.append(
        f"| {n} | {tc:.2f} s / {ta:.2f} s | **{tc / ta:.2f}x** "
        f"| {mb(sc)} / {mb(sa)} | **{sc / sa:.2f}x** "
        f"| {med('chunks', n, 'cooperative'):,.0f} / {med('chunks', n, 'alone'):,.0f} |"
    )
write_section("shared", "Pulling together on shared storage (`make bench-shared`, root)", "\n".join(lines))
