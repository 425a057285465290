"""Writes one benchmark's tables into docs/BENCHMARKS.md, between its markers,
and reads the results files the benchmark scripts write."""
import re
import statistics
from collections import defaultdict
from pathlib import Path

DOC = Path("docs/BENCHMARKS.md")


def write_section(name, heading, body):
    """Replaces `<!-- NAME:start -->` … `<!-- NAME:end -->` with `body`, or
    appends it under `## heading` when the markers are not there yet."""
    section = f"<!-- {name}:start -->\n{body.rstrip()}\n<!-- {name}:end -->"
    pattern = rf"<!-- {name}:start -->.*<!-- {name}:end -->"
    doc = DOC.read_text()
    if re.search(pattern, doc, flags=re.S):
        doc = re.sub(pattern, lambda _: section, doc, flags=re.S)
    else:
        doc = doc.rstrip("\n") + f"\n\n## {heading}\n\n{section}\n"
    DOC.write_text(doc)
    print(section)


def load_results(path):
    """`metric image variant value` lines (tab-separated) as a function
    `med(metric, image, variant)`: the median of the values, NaN if none."""
    values = defaultdict(list)
    for line in Path(path).read_text().splitlines():
        metric, image, variant, value = line.split("\t")
        values[(metric, image, variant)].append(float(value))

    def med(metric, image, variant):
        v = values.get((metric, image, variant))
        return statistics.median(v) if v else float("nan")

    return med


def mb(n):
    return f"{n / 1e6:,.1f} MB"
