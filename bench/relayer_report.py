"""Renders bench/relayer.sh's results into docs/BENCHMARKS.md."""
import datetime
import json
import statistics
import sys
from pathlib import Path

from benchdoc import mb, write_section

work, bounds, images, cores = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split(), sys.argv[4]
reports = {b: json.loads((work / f"report-{b}.json").read_text()) for b in bounds}
times = {b: (work / f"time-{b}").read_text() for b in bounds}
analysis = json.loads((work / "analysis.json").read_text())
first = reports[bounds[0]]
before = first["layer_bytes_before"]

lines = [
    f"Measured {datetime.date.today()} on a shared {cores}-core machine with `make bench-relayer` "
    f"(`bench/relayer.sh`): `skiff relayer` over the {len(images)} images of the dataset "
    f"(`tools/make-images`: {', '.join(images)}). `umoci unpack` of every image it wrote with "
    f"`--max-layers {bounds[0]}` equals that of the original, path for path (bytes, mode, owner, "
    "mtime, link count), checked in the same run. *Distinct layers*: the gzip layers of all the "
    "images, each once: what a registry stores, and what a host pulling every image transfers "
    "(the same bytes here, as every image is pulled). Baseline: the dataset's own layers. "
    "*File-level dedup*: each distinct file once, compressed on its own with zstd (`skiff analyze`), "
    "for scale: no layering stores fewer files than that.",
    "",
    "| | distinct layers | bytes | vs the original layers | layers per image: median / max | time |",
    "|---|---:|---:|---:|---:|---:|",
    f"| original layers | {first['unique_layers_before']} | {mb(before)} | 1.00x "
    f"| {statistics.median(i['layers_before'] for i in first['images']):.0f} / "
    f"{max(i['layers_before'] for i in first['images'])} | |",
]
for b in bounds:
    r = reports[b]
    after = r["layer_bytes_after"]
    per = [i["layers_after"] for i in r["images"]]
    lines.append(
        f"| `skiff relayer --max-layers {b}` | {r['unique_layers_after']} | {mb(after)} "
        f"| **{after / before:.2f}x** ({before / after:.2f}x less) "
        f"| {statistics.median(per):.0f} / {max(per)} | {times[b]} s |"
    )
file_level = analysis["stored"]["file_level_zstd"]
lines.append(f"| file-level dedup (each file once, zstd) | | {mb(file_level)} | {file_level / before:.2f}x | | |")
lines += ["", "| image | layers before | after (`--max-layers " + bounds[0] + "`) |", "|---|---:|---:|"]
for name, line in zip(images, first["images"]):
    lines.append(f"| {name} | {line['layers_before']} | {line['layers_after']} |")
write_section("relayer", "Re-layering the dataset (`make bench-relayer`)", "\n".join(lines))
