#!/usr/bin/env python3
"""Baselines for the dedup benchmark, from OCI layouts given on the command line.

Prints JSON:
  raw_bytes          uncompressed tar bytes of every layer of every image
  unique_raw_bytes   the same, each distinct layer once
  gzip_unique_bytes  compressed blobs, each distinct layer once (what a registry stores)
  file_zstd_bytes    every distinct regular file (by content) compressed alone with zstd -3
  file_unique_bytes  those distinct files uncompressed
  files / unique_files
"""
import gzip
import hashlib
import json
import sys
import tarfile
from pathlib import Path

import zstandard


def layers(layout: Path):
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    manifest = json.loads((layout / "blobs/sha256" / desc["digest"][7:]).read_text())
    for layer in manifest["layers"]:
        yield layer, layout / "blobs/sha256" / layer["digest"][7:]


def open_layer(media_type: str, path: Path):
    if media_type.endswith("gzip"):
        return gzip.open(path, "rb")
    if media_type.endswith("zstd"):
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
    return open(path, "rb")


def main():
    compressor = zstandard.ZstdCompressor(level=3)
    seen_layers = {}
    seen_files = set()
    out = dict(raw_bytes=0, unique_raw_bytes=0, gzip_unique_bytes=0, file_zstd_bytes=0,
               file_unique_bytes=0, files=0, unique_files=0)
    for arg in sys.argv[1:]:
        for layer, path in layers(Path(arg)):
            digest = layer["digest"]
            if digest in seen_layers:
                out["raw_bytes"] += seen_layers[digest]
                continue
            raw = 0
            with open_layer(layer["mediaType"], path) as stream:
                counted = CountingReader(stream)
                with tarfile.open(fileobj=counted, mode="r|") as tar:
                    for member in tar:
                        if not member.isreg():
                            continue
                        data = tar.extractfile(member).read()
                        out["files"] += 1
                        h = hashlib.sha256(data).digest()
                        if h in seen_files:
                            continue
                        seen_files.add(h)
                        out["unique_files"] += 1
                        out["file_unique_bytes"] += len(data)
                        out["file_zstd_bytes"] += len(compressor.compress(data))
                while counted.read(1 << 20):
                    pass
                raw = counted.count
            seen_layers[digest] = raw
            out["raw_bytes"] += raw
            out["unique_raw_bytes"] += raw
            out["gzip_unique_bytes"] += layer["size"]
    json.dump(out, sys.stdout)
    print()


class CountingReader:
    def __init__(self, inner):
        self.inner, self.count = inner, 0

    def read(self, n=-1):
        data = self.inner.read(n)
        self.count += len(data)
        return data


if __name__ == "__main__":
    main()
