"""Renders bench/analyze.sh's results into docs/BENCHMARKS.md, after checking
skiff analyze's layer and file figures against the independent count."""
import datetime
import json
import statistics
import sys
from pathlib import Path

from benchdoc import mb, write_section

work, runs, images, cores = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(), sys.argv[4]
analyses = [json.loads((work / f"analysis-{r}.json").read_text()) for r in range(1, runs + 1)]
times = [(work / f"time-{r}").read_text().split() for r in range(1, runs + 1)]
check = json.loads((work / "check.json").read_text())
a = analyses[0]
lm, fm, st = a["layer_measures"], a["file_measures"], a["stored"]

# Every exact figure agrees with the independent count, and between runs.
exact = {
    "references": lm["references"], "unique": lm["unique"],
    "referenced_tar_bytes": lm["referenced_tar_bytes"], "unique_tar_bytes": lm["unique_tar_bytes"],
    "unique_compressed_bytes": lm["unique_compressed_bytes"],
    "files": fm["files"], "bytes": fm["bytes"], "distinct_contents": fm["distinct_contents"],
    "distinct_bytes": fm["distinct_bytes"], "duplicates": fm["duplicates"],
    "duplicate_bytes": fm["duplicate_bytes"],
}
wrong = {k: (v, check[k]) for k, v in exact.items() if v != check[k]}
if a["copies_histogram"] != check["copies_histogram"]:
    wrong["copies_histogram"] = "differs"
for other in analyses[1:]:
    if other["file_measures"] != fm or other["layer_measures"] != lm:
        wrong["runs"] = "two runs disagree"
if wrong:
    sys.exit(f"skiff analyze disagrees with tests/analyze_check.py: {wrong}")

elapsed = statistics.median(float(t[0]) for t in times)
rss_mb = statistics.median(int(t[1]) for t in times) / 1024
zstd_runs = [x["stored"]["chunk_level_zstd"] for x in analyses]
name = {i: l["diff_id"][7:19] for i, l in enumerate(a["layers"])}
image_of = {}
for at, image in enumerate(a["images"]):
    for diff_id in image["layers"]:
        image_of.setdefault(diff_id, images[at])
top_layer = {i: image_of[l["diff_id"]] for i, l in enumerate(a["layers"])}

lines = [
    f"Measured {datetime.date.today()} on a shared {cores}-core machine with `make bench-analyze` "
    f"(`bench/analyze.sh`): `skiff analyze` over the {len(images)} images of the dataset "
    f"(`tools/make-images`: {', '.join(images)}), {runs} runs. The layer and file figures agree "
    "exactly with an independent count (`tests/analyze_check.py`, Python's `tarfile` and "
    "`hashlib`), checked in the same run. The study's figures are those of the 10,000 most "
    "popular Docker Hub images (67,047 unique layers).",
    "",
    "| measure | the dataset | Docker Hub study |",
    "|---|---:|---:|",
    f"| images / layer references / unique layers | {len(a['images'])} / {lm['references']} / {lm['unique']} | 10,000 / – / 67,047 |",
    f"| layer-level dedup (referenced / unique, uncompressed) | {lm['dedup_ratio']:.2f}× | 1.48× |",
    f"| compression of the unique layers (gzip) | {lm['compression_ratio']:.2f}× | 2.38× |",
    f"| both | {lm['combined_ratio']:.2f}× | 3.54× |",
    f"| files in unique layers | {fm['files']:,} ({mb(fm['bytes'])}) | |",
    f"| duplicate files, by count | {fm['duplicate_share_by_count'] * 100:.1f}% | about 80% |",
    f"| duplicate files, by bytes | {fm['duplicate_share_by_bytes'] * 100:.1f}% | |",
    "",
    "| stored for the whole set | bytes | vs layers |",
    "|---|---:|---:|",
    f"| layers (unique gzip blobs) | {mb(st['layers_compressed'])} | 1.00 |",
    f"| file-level dedup, raw | {mb(st['file_level_raw'])} | {st['file_level_raw'] / st['layers_compressed']:.2f} |",
    f"| file-level dedup, each file zstd | {mb(st['file_level_zstd'])} | {st['file_level_zstd'] / st['layers_compressed']:.2f} |",
    f"| skiff chunk-level dedup, raw ({st['chunk_level_chunks']:,} chunks) | {mb(st['chunk_level_raw'])} | {st['chunk_level_raw'] / st['layers_compressed']:.2f} |",
    f"| skiff chunk-level dedup, zstd frames | {mb(statistics.median(zstd_runs))} | {statistics.median(zstd_runs) / st['layers_compressed']:.2f} |",
    "",
    "Almost equal layers (Jaccard index of their distinct non-empty file contents ≥ 0.5), named by the first image that has them:",
    "",
    "| layers | similarity | contents in common |",
    "|---|---:|---:|",
]
for p in a["similar_layers"]:
    lines.append(
        f"| {top_layer[p['a']]} `{name[p['a']]}` ~ {top_layer[p['b']]} `{name[p['b']]}` "
        f"| {p['similarity'] * 100:.1f}% | {p['common_contents']:,} |"
    )
lines += [
    "",
    f"A host pulling every image transfers {mb(a['pull']['with_layers'])} as layers and "
    f"{mb(a['pull']['with_skiff'])} as skiff chunks "
    f"({a['pull']['with_layers'] / a['pull']['with_skiff']:.2f}× less). The analysis read "
    f"{mb(lm['unique_tar_bytes'])} of unique layers in {elapsed:.1f} s (median; "
    f"{lm['unique_tar_bytes'] / 1e6 / elapsed:.0f} MB/s on {cores} cores), "
    f"{rss_mb:.0f} MB resident at its peak. The chunk-level zstd figure varied by "
    f"{(max(zstd_runs) - min(zstd_runs)) / statistics.median(zstd_runs) * 100:.2f}% between runs "
    "(which layer frames a shared chunk first); every other figure was the same in every run.",
]
write_section("analyze", "Redundancy of the dataset (`make bench-analyze`)", "\n".join(lines))
