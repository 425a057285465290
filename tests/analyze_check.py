#!/usr/bin/env python3
"""An independent count of `skiff analyze`'s layer and file measures.

Reads OCI image layouts with the standard library only (the test's
layers are gzip or plain tar), walks each unique
layer's tar with `tarfile`, hashes file contents with `hashlib`, and prints
the same measures as JSON, computed by the definitions in
crates/skiff-analyze/src/lib.rs.

Usage: analyze_check.py LAYOUT:TAG...
"""
import gzip
import hashlib
import io
import itertools
import json
import os
import sys
import tarfile


def blob(layout, digest):
    algo, hexd = digest.split(":", 1)
    with open(os.path.join(layout, "blobs", algo, hexd), "rb") as f:
        return f.read()


def image_layers(spec):
    """(diff_id, compressed size, a function reading the uncompressed tar) of each layer."""
    layout, tag = spec.rsplit(":", 1)
    index = json.load(open(os.path.join(layout, "index.json")))
    entry = next(m for m in index["manifests"]
                 if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    manifest = json.loads(blob(layout, entry["digest"]))
    config = json.loads(blob(layout, manifest["config"]["digest"]))
    for desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"]):
        def tar(desc=desc, diff_id=diff_id):
            data = blob(layout, desc["digest"])
            data = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
            assert "sha256:" + hashlib.sha256(data).hexdigest() == diff_id
            return data
        yield diff_id, desc["size"], tar


def main(specs):
    refs = []
    unique = {}  # diff_id -> (compressed, tar bytes), in first-reference order
    contents = {}  # digest -> [size, copies, layers(set), first path]
    layer_sets = []
    files = file_bytes = 0
    for spec in specs:
        for diff_id, size, read_tar in image_layers(spec):
            refs.append(diff_id)
            if diff_id in unique:
                continue
            at = len(unique)
            tar = read_tar()
            unique[diff_id] = (size, len(tar))
            mine = set()
            tf = tarfile.open(fileobj=io.BytesIO(tar))
            for m in tf:
                if not m.isreg() or os.path.basename(m.name).startswith(".wh."):
                    continue
                data = tf.extractfile(m).read()
                digest = hashlib.sha256(data).hexdigest()
                files += 1
                file_bytes += len(data)
                c = contents.setdefault(digest, [len(data), 0, set(), m.name])
                c[1] += 1
                c[2].add(at)
                if data:  # similarity is over non-empty contents
                    mine.add(digest)
            layer_sets.append(mine)
    order = list(unique)
    referenced_tar = sum(unique[d][1] for d in refs)
    unique_tar = sum(t for _, t in unique.values())
    unique_compressed = sum(s for s, _ in unique.values())
    distinct_bytes = sum(c[0] for c in contents.values())

    pairs = []
    for a, b in itertools.combinations(range(len(order)), 2):
        common = len(layer_sets[a] & layer_sets[b])
        if common:
            pairs.append({"a": a, "b": b, "common_contents": common,
                          "similarity": common / len(layer_sets[a] | layer_sets[b])})
    histogram = {}
    for c in contents.values():
        histogram[str(c[1])] = histogram.get(str(c[1]), 0) + 1
    # Most copies first, then the larger, then the first seen (dicts keep insertion order).
    top = sorted((-c[1], -c[0], i, d) for i, (d, c) in enumerate(contents.items()) if c[1] > 1)
    print(json.dumps({
        "images": len(specs),
        "references": len(refs),
        "unique": len(order),
        "referenced_tar_bytes": referenced_tar,
        "unique_tar_bytes": unique_tar,
        "unique_compressed_bytes": unique_compressed,
        "files": files,
        "bytes": file_bytes,
        "distinct_contents": len(contents),
        "distinct_bytes": distinct_bytes,
        "duplicates": files - len(contents),
        "duplicate_bytes": file_bytes - distinct_bytes,
        "pairs": pairs,
        "copies_histogram": histogram,
        "duplicated": [{"sha256": d, "copies": -n, "size": -s, "layers": len(contents[d][2]),
                        "path": contents[d][3]}
                       for n, s, _, d in top],
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
