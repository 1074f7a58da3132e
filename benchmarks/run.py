#!/usr/bin/env python
"""moeconv against the streaming I/O floor, side by side in one run; every figure printed.

    python benchmarks/run.py                          # gpt-oss-8 and memory (~25 min, ~45 GB of disk at the peak)
    python benchmarks/run.py --only gpt-oss-8         # one case: gpt-oss-8, gpt-oss-2, memory
    python benchmarks/run.py --tree before=/path/to/another/checkout --only gpt-oss-2   # A/B of source trees

The streaming I/O floor (`floor` below) reads every input .safetensors file with O_DIRECT in 32 MiB
requests WHILE a second thread writes as many bytes as moeconv's output with 32 MiB O_DIRECT writes,
then fsyncs: what a conversion whose memory is bounded by a chunk costs with zero compute. Each
contender runs as its own subprocess, after `sync; echo 3 > /proc/sys/vm/drop_caches` (as root: cold
reads for all); wall time, CPU and peak RSS come from os.wait4 (the child's own rusage). Rounds are
interleaved (moeconv, floor, moeconv, floor, ...) because this disk's speed drifts; ratios use the
medians. Checkpoints go to --data (default benchmarks/data/, git-ignored).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
REQUEST = 32 * 2**20


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run(cmd: list[str], label: str, env: dict | None = None) -> dict:
    """One contender as a subprocess, cold: wall, cpu, peak RSS (its own rusage)."""
    cold = drop_caches()
    time.sleep(2)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd="/")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    if status != 0:
        raise SystemExit(f"{label} failed ({status}):\n{err[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    result = {"label": label, "wall": wall, "cpu": cpu, "rss_gb": usage.ru_maxrss * 1024 / 1e9, "cold": cold}
    print(f"  {label:<34} {wall:7.2f} s  cpu {cpu:6.1f} s  peak RSS {result['rss_gb']:5.2f} GB", flush=True)
    return result


def make(data: Path, model: str, layers: int, vocab: int | None = None) -> Path:
    path = data / (f"{model}-L{layers}" + (f"-V{vocab}" if vocab else ""))
    if not (path / "config.json").is_file():
        shutil.rmtree(path, ignore_errors=True)
        cmd = [PY, str(REPO / "benchmarks" / "make_checkpoint.py"), model, str(path), "--layers", str(layers)]
        subprocess.run(cmd + (["--vocab", str(vocab)] if vocab else []), check=True)
        os.sync()
        time.sleep(20)  # this virtual disk is slow for a while after a big write
    return path


def moeconv(tree: Path, src: Path, out: Path, preset: str) -> tuple[list[str], dict]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return [PY, "-m", "moeconv", "convert", str(src), str(out), "--preset", preset, "--overwrite"], env


def output_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def floor(src: str, out_bytes: str, out: str) -> None:
    """The streaming I/O floor (child mode): read the input while writing as many bytes, then fsync."""

    def read() -> None:
        view = memoryview(mmap.mmap(-1, REQUEST))  # page-aligned, as O_DIRECT wants
        for path in sorted(Path(src).glob("*.safetensors")):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            offset = 0
            while (got := os.preadv(fd, [view], offset)) == len(view):  # a short read is the end
                offset += got
            os.close(fd)

    reader = threading.Thread(target=read)
    reader.start()
    Path(out).mkdir(parents=True, exist_ok=True)
    view = memoryview(mmap.mmap(-1, REQUEST))
    fd = os.open(Path(out) / "floor.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    size, written = int(out_bytes), 0
    while written < size:
        written += os.write(fd, view)
    os.ftruncate(fd, size)
    os.fsync(fd)
    os.close(fd)
    reader.join()


def compare(trees: dict[str, Path], src: Path, data: Path, preset: str, rounds: int) -> dict:
    """Interleaved rounds of every tree's moeconv and the floor; medians and ratios."""
    out = data / "out"
    results: dict[str, list[dict]] = {name: [] for name in [*trees, "floor"]}
    for round_ in range(rounds):
        print(f" round {round_ + 1}/{rounds}", flush=True)
        for name, tree in trees.items():
            shutil.rmtree(out, ignore_errors=True)
            cmd, env = moeconv(tree, src, out, preset)
            results[name].append(run(cmd, f"moeconv ({name})", env))
        size = output_bytes(out)
        shutil.rmtree(out, ignore_errors=True)
        results["floor"].append(run([PY, __file__, "_floor", str(src), str(size), str(out)], "streaming I/O floor"))
        shutil.rmtree(out, ignore_errors=True)
    summary = {
        name: {k: statistics.median(r[k] for r in runs) for k in ("wall", "cpu", "rss_gb")} for name, runs in results.items()
    }
    for name in trees:
        summary[name]["x_floor"] = summary[name]["wall"] / summary["floor"]["wall"]
    in_gb = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e9
    print(f" medians ({in_gb:.1f} GB in, {size / 1e9:.1f} GB out):", json.dumps(summary, indent=1), flush=True)
    return {"input_gb": in_gb, "output_gb": size / 1e9, "rounds": rounds, "runs": results, "median": summary}


def memory(trees: dict[str, Path], data: Path) -> dict:
    """Peak RSS of one gpt-oss-120b-width layer and of 1, 2, 4 layers of 20b width (small vocabulary)."""
    found = {}
    for model, layers in (("gpt-oss-120b", 1), ("gpt-oss-20b", 1), ("gpt-oss-20b", 2), ("gpt-oss-20b", 4)):
        src = make(data, model, layers, vocab=8192)
        for name, tree in trees.items():
            cmd, env = moeconv(tree, src, data / "out", "gpt-oss-bf16")
            found[f"{model} x{layers} ({name})"] = run(cmd, f"{model} x{layers} ({name})", env)
            shutil.rmtree(data / "out", ignore_errors=True)
        shutil.rmtree(src)
    return found


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_floor":
        floor(*sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=["gpt-oss-8", "gpt-oss-2", "memory"])
    parser.add_argument("--tree", action="append", default=[], help="NAME=DIR: a source tree to run moeconv from (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=REPO / "benchmarks" / "data")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    trees = {"this": REPO} | {name: Path(path).resolve() for name, path in (t.split("=", 1) for t in args.tree)}
    args.data.mkdir(parents=True, exist_ok=True)
    figures = {}
    for case in args.only or ["gpt-oss-8", "memory"]:
        print(f"== {case}", flush=True)
        if case == "memory":
            figures[case] = memory(trees, args.data)
        else:
            src = make(args.data, "gpt-oss-20b", int(case.rsplit("-", 1)[1]))
            figures[case] = compare(trees, src, args.data, "gpt-oss-bf16", args.rounds)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
