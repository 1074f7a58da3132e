#!/usr/bin/env python
"""What this machine's disk does with one I/O pattern or another, O_DIRECT, cold: the evidence behind
"the disk sets the pace" in RESULTS.md.

    python benchmarks/disk.py                # 4 interleaved rounds (~8 min, ~6 GB of scratch files in benchmarks/data)
    python benchmarks/disk.py --rounds 6 --only copy

- write: 3200 MiB into a new file, one request at a time, 16 to 256 MiB per request.
- write beside reads: the same while another thread reads 8 MiB requests at 0.35 GB/s, as the
  compute threads of a gpt-oss conversion read MXFP4 blocks while its writer writes the bf16 experts.
- copy: 2 GiB file to file: as moeconv copies lm_head and the embeddings (32 MiB reads into four
  buffers, a writer thread copying them into a 16 MiB stage it writes when full), or one thread
  reading then writing 128 / 256 MiB at a time (as the I/O floor of run.py does, in smaller turns).
The files hold zeros: on this disk zeros were no faster to write or read than random bytes.

Each pattern runs once per round, in the same order, with the page cache dropped (as root) and the
disk probed back to speed first (run.py's wait_for_disk); medians and ranges are printed.
"""

from __future__ import annotations

import argparse
import mmap
import os
import queue
import statistics
import threading
import time
from pathlib import Path

import run as bench

MiB = 2**20
WRITE_BYTES = 3200 * MiB
COPY_BYTES = 2048 * MiB
READ_RATE = 0.35e9  # bytes/s of the reads beside the writes
READ_REQUEST = 8 * MiB


def _buffer(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, nbytes)  # page-aligned, as O_DIRECT wants


def _open_write(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)


def _write_all(fd: int, buffer, total: int) -> None:
    for offset in range(0, total, len(buffer)):
        os.pwrite(fd, buffer, offset)


def write(data: Path, request_mib: int, beside_reads: bool = False) -> tuple[float, float]:
    """(write GB/s, read GB/s beside it) for WRITE_BYTES in `request_mib` requests, fsync included."""
    source, target = data / "disk-input.bin", data / "disk-output.bin"
    stop, read = threading.Event(), [0]

    def reader() -> None:
        fd, buffer, start = os.open(source, os.O_RDONLY | os.O_DIRECT), _buffer(READ_REQUEST), time.perf_counter()
        size = source.stat().st_size
        while not stop.is_set():
            os.preadv(fd, [buffer], read[0] % (size - READ_REQUEST) // READ_REQUEST * READ_REQUEST)
            read[0] += READ_REQUEST
            if (ahead := read[0] / READ_RATE - (time.perf_counter() - start)) > 0:
                time.sleep(ahead)
        os.close(fd)

    thread = threading.Thread(target=reader, daemon=True)
    fd = _open_write(target)
    start = time.perf_counter()
    if beside_reads:
        thread.start()
    _write_all(fd, _buffer(request_mib * MiB), WRITE_BYTES)
    os.fsync(fd)
    took = time.perf_counter() - start
    stop.set()
    os.close(fd)
    target.unlink()
    return WRITE_BYTES / took / 1e9, read[0] / took / 1e9


def _timed_copy(data: Path, copy) -> float:
    """Seconds `copy(input fd, output fd)` takes with the final fsync; the copy is deleted after."""
    source, target = data / "disk-input.bin", data / "disk-output.bin"
    rfd, wfd = os.open(source, os.O_RDONLY | os.O_DIRECT), _open_write(target)
    start = time.perf_counter()
    copy(rfd, wfd)
    os.fsync(wfd)
    took = time.perf_counter() - start
    os.close(rfd)
    os.close(wfd)
    target.unlink()
    return took


def _copy_as_moeconv(rfd: int, wfd: int) -> None:
    """COPY_BYTES read in 32 MiB requests (4 buffers) while a writer thread copies them into a
    16 MiB stage it writes whenever full."""
    free, full = queue.Queue(), queue.Queue()
    for _ in range(4):
        free.put(_buffer(32 * MiB))
    stage = _buffer(16 * MiB)

    def writer() -> None:
        fill, offset = 0, 0
        while (buffer := full.get()) is not None:
            view, done = memoryview(buffer), 0
            while done < len(buffer):
                take = min(len(buffer) - done, len(stage) - fill)
                stage[fill : fill + take] = view[done : done + take]
                fill, done = fill + take, done + take
                if fill == len(stage):
                    os.pwrite(wfd, stage, offset)
                    fill, offset = 0, offset + len(stage)
            free.put(buffer)

    thread = threading.Thread(target=writer)
    thread.start()
    for offset in range(0, COPY_BYTES, 32 * MiB):
        buffer = free.get()
        os.preadv(rfd, [buffer], offset)
        full.put(buffer)
    full.put(None)
    thread.join()


def _copy_in_turns(rfd: int, wfd: int, request_mib: int) -> None:
    """COPY_BYTES on one thread: read `request_mib`, write it, and so on."""
    buffer = _buffer(request_mib * MiB)
    for offset in range(0, COPY_BYTES, len(buffer)):
        os.preadv(rfd, [buffer], offset)
        os.pwrite(wfd, buffer, offset)


PATTERNS = {
    "write": [(f"write, {n} MiB requests", "GB/s", lambda d, n=n: write(d, n)) for n in (16, 64, 128, 256)],
    "beside": [
        (f"write beside 0.35 GB/s of reads, {n} MiB requests", "GB/s", lambda d, n=n: write(d, n, True))
        for n in (16, 64, 128, 256)
    ],
    "copy": [
        ("copy 2 GiB as moeconv (32 MiB reads, 16 MiB writes)", "s", lambda d: _timed_copy(d, _copy_as_moeconv)),
        *[
            (f"copy 2 GiB in turns of {n} MiB", "s", lambda d, n=n: _timed_copy(d, lambda r, w: _copy_in_turns(r, w, n)))
            for n in (128, 256)
        ],
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--only", action="append", choices=sorted(PATTERNS), help="one group of patterns (repeatable)")
    parser.add_argument("--data", type=Path, default=bench.REPO / "benchmarks" / "data")
    args = parser.parse_args()
    bench.use_data(args.data)
    source = args.data / "disk-input.bin"
    if not source.is_file() or source.stat().st_size < COPY_BYTES + 256 * MiB:
        fd = _open_write(source)
        _write_all(fd, _buffer(256 * MiB), COPY_BYTES + 256 * MiB)  # zeros: the content does not matter
        os.fsync(fd)
        os.close(fd)
        time.sleep(bench.SETTLE_SECONDS)
    patterns = [p for group in (args.only or PATTERNS) for p in PATTERNS[group]]
    results: dict[str, list[float]] = {label: [] for label, _, _ in patterns}
    if not bench.drop_caches():
        print("  (not root: the page cache is not dropped; O_DIRECT reads bypass it all the same)")
    for round_ in range(args.rounds):
        for label, unit, measure in patterns:
            bench.drop_caches()
            bench.wait_for_disk()
            got = measure(args.data)
            value, reads = got if isinstance(got, tuple) else (got, 0.0)
            results[label].append(value)
            aside = f"  (the reads beside it: {reads:.2f} GB/s)" if reads else ""
            print(f"  round {round_ + 1}: {label:<52} {value:6.2f} {unit}{aside}", flush=True)
    print(f"\n{'pattern':<52} {'median':>8}   range over {args.rounds} rounds")
    for label, unit, _ in patterns:
        runs = results[label]
        print(f"{label:<52} {statistics.median(runs):6.2f} {unit:<4} {min(runs):.2f}-{max(runs):.2f}")


if __name__ == "__main__":
    main()
