#!/usr/bin/env python
"""The streaming I/O floor of a conversion: what moving its bytes costs on this disk with zero compute.

    python benchmarks/floor.py SRC OUT --bytes N      # N: the conversion's output size in bytes
    python benchmarks/floor.py SRC OUT                # N predicted from SRC's headers (gpt-oss-bf16)

Definition: read every input .safetensors file of SRC (O_DIRECT, 64 MiB requests, one file after
another, on a reader thread) WHILE the main thread writes N bytes, as many as the conversion's
output, into OUT with 32 MiB O_DIRECT writes (files of at most 5 GB, as the output's shards), then
fsync every written file. Reads and writes run at once because a conversion whose memory is bounded
by a chunk must read and write at once; O_DIRECT and big requests because the page cache and
small requests could only make it slower. The floor ends when both the reads and the fsyncs are done.
No conversion can beat it on this disk; `benchmarks/run.py` runs it after dropping the page cache,
as every contender.

Prints one JSON line: bytes read and written, seconds until the reads and the writes (with fsync)
were done, and the rates, so a slow spell of the disk shows which side it hit.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import struct
import sys
import threading
import time
from pathlib import Path

READ = 64 * 2**20
WRITE = 32 * 2**20
SHARD = 5 * 10**9


def read_all(paths: list[Path], request: int, done: dict) -> None:
    """Every file whole, O_DIRECT, `request` bytes at a time (a short read is a file's end)."""
    view = memoryview(mmap.mmap(-1, request))  # page-aligned, as O_DIRECT wants
    total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            offset = 0
            while (got := os.preadv(fd, [view], offset)) == request:
                offset += got
            total += offset + got
        finally:
            os.close(fd)
    done["read_bytes"] = total
    done["read_s"] = time.perf_counter() - done["start"]


def write_all(out: Path, nbytes: int, request: int, shard: int) -> list[Path]:
    """`nbytes` into files of at most `shard` bytes, O_DIRECT, `request` bytes a write, fsync each."""
    buffer = mmap.mmap(-1, request)
    buffer.write(os.urandom(request))  # not zeros: nothing in the path may skip them
    view = memoryview(buffer)
    out.mkdir(parents=True, exist_ok=True)
    paths, left, index = [], nbytes, 0
    while left > 0:
        index += 1
        path = out / f"floor-{index:05d}.bin"
        size = min(left, shard)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            written = 0
            while written < size:  # whole requests (O_DIRECT wants aligned sizes), cut back below
                written += os.write(fd, view)
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        paths.append(path)
        left -= size
    return paths


def bf16_output_bytes(src: Path) -> int:
    """Tensor bytes of SRC with every quantized tensor dequantized to bf16, as the presets write it:
    each MXFP4 `*_blocks` U8 byte (two FP4 values) becomes 4 bytes and each `*_scales` tensor goes;
    FP8 weights (F8_E4M3) become 2 bytes an element and their `*_scale_inv` go; INT4 `*.weight_packed`
    I32 words (8 values) become 16 bytes and their `weight_scale` and `weight_shape` go. The rest is
    kept as it is. Headers are not counted (a few hundred KB at most)."""
    total = 0
    for path in sorted(src.glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            n = entry["data_offsets"][1] - entry["data_offsets"][0]
            packed = key.rpartition(".")[0] + ".weight_packed" in header
            if key.endswith("_blocks") and entry["dtype"] == "U8":
                total += 4 * n
            elif key.endswith(".weight_packed") and entry["dtype"] == "I32":  # INT4, as compressed-tensors-bf16 writes it
                total += 4 * n
            elif packed:  # its weight_scale and weight_shape
                continue
            elif entry["dtype"] == "F8_E4M3":  # an FP8 block weight, as fp8-bf16 writes it
                total += 2 * n
            elif not (key.endswith("_scales") and entry["dtype"] == "U8" or key.endswith("_scale_inv")):
                total += n
    return total


def floor(src: Path, out: Path, nbytes: int, read_request: int = READ, write_request: int = WRITE) -> dict:
    inputs = sorted(src.glob("*.safetensors"))
    if not inputs:
        raise SystemExit(f"no .safetensors files in {src}")
    done: dict = {"start": time.perf_counter()}
    reader = threading.Thread(target=read_all, args=(inputs, read_request, done))
    reader.start()
    write_all(out, nbytes, write_request, SHARD)
    write_s = time.perf_counter() - done["start"]
    reader.join()
    wall = time.perf_counter() - done["start"]
    return {
        "read_bytes": done["read_bytes"],
        "written_bytes": nbytes,
        "read_s": round(done["read_s"], 3),
        "write_s": round(write_s, 3),
        "wall_s": round(wall, 3),
        "read_gb_s": round(done["read_bytes"] / done["read_s"] / 1e9, 3),
        "write_gb_s": round(nbytes / write_s / 1e9, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="a checkpoint folder (its *.safetensors are read)")
    parser.add_argument("out", type=Path, help="a folder to write into (created; its floor-*.bin files are left)")
    parser.add_argument("--bytes", type=int, help="bytes to write (default: SRC's tensor bytes with MXFP4 experts as bf16)")
    parser.add_argument("--read-mib", type=int, default=READ >> 20, help="O_DIRECT read request (default 64)")
    parser.add_argument("--write-mib", type=int, default=WRITE >> 20, help="O_DIRECT write request (default 32)")
    args = parser.parse_args(argv)
    nbytes = args.bytes if args.bytes is not None else bf16_output_bytes(args.src)
    figures = floor(args.src, args.out, nbytes, args.read_mib << 20, args.write_mib << 20)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
