"""Writes one benchmark's tables into docs/BENCHMARKS.md, between its markers."""
import re
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
