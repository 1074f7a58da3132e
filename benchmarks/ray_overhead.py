#!/usr/bin/env python
"""What `convert --ray` costs on one machine: the same conversion without Ray and through a local Ray
instance, one and two tasks at a time, with the same bytes checked.

    python benchmarks/make_checkpoint.py gpt-oss-20b DIR --layers 8
    unshare -n sh -c 'ip link set lo up && python benchmarks/ray_overhead.py DIR --rounds 2'

Runs only inside a network namespace whose one interface is `lo` (Ray binds the machine's address
otherwise). One Ray instance (2 CPUs, 100 MB object store) is started here and kept for every run;
each contender is `moeconv convert SRC OUT -p PRESET` in a process of its own:
  single     no --ray (2 compute threads)
  ray-1      --ray, MOECONV_THREADS=2: a task takes both CPUs, one task at a time
  ray-2      --ray, MOECONV_THREADS=1: two tasks side by side, a thread each
in turn, for each round. Shard times: when the journal first lists each shard (polled every 50 ms).
Peak RSS: the driver's from os.wait4; each task worker's VmHWM, polled. Every run's report (the
checksum of every file) must equal the single-machine one; each output is deleted after its run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = {"single": None, "ray-1": "2", "ray-2": "1"}  # name -> MOECONV_THREADS of the --ray run


def workers_hwm() -> dict[int, int]:
    """pid -> peak RSS (bytes) of every Ray worker process running a moeconv task now."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if not (entry / "cmdline").read_bytes().startswith(b"ray::moeconv "):
                continue
            status = (entry / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                found[int(entry.name)] = int(line.split()[1]) * 1024
    return found


def run_one(src: Path, out: Path, preset: str, address: str | None, threads: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MOECONV_THREADS", None)
    if threads:
        env["MOECONV_THREADS"] = threads
    command = [sys.executable, "-m", "moeconv", "convert", str(src), str(out), "-p", preset]
    if address:
        command += ["--ray", address]
    journal = out / ".moeconv-progress.json"
    shards: dict[str, float] = {}
    workers: dict[int, int] = {}
    start = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                for name in json.loads(journal.read_text())["shards"]:
                    shards.setdefault(name, time.monotonic() - start)
            except (OSError, ValueError, KeyError):
                pass
            for pid, hwm in workers_hwm().items():
                workers[pid] = max(workers.get(pid, 0), hwm)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    done.set()
    watcher.join()
    err = proc.stderr.read()
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-3000:]}")
    report = (out / "moeconv-report.json").read_text()
    sizes = {p.name: p.stat().st_size for p in out.glob("*.safetensors")}
    shutil.rmtree(out)
    return {
        "wall": wall,
        "driver_cpu": usage.ru_utime + usage.ru_stime,
        "driver_rss": usage.ru_maxrss * 1024,
        "worker_rss": sorted(workers.values()),
        "shards": dict(sorted(shards.items(), key=lambda kv: kv[1])),
        "sizes": sizes,
        "report": report,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: next to SRC)")
    parser.add_argument("--preset", default="gpt-oss-bf16")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if [name for _, name in socket.if_nameindex()] != ["lo"]:
        raise SystemExit("run me in a loopback-only network namespace: unshare -n sh -c 'ip link set lo up && python ...'")
    import ray

    out = args.out or args.src.parent / "ray-overhead-out"
    begin = time.monotonic()
    ray.init(address="local", num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, logging_level="ERROR")
    started = time.monotonic() - begin
    address = ray.get_runtime_context().gcs_address
    print(f"Ray instance started in {started:.1f} s at {address}")
    results: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    try:
        for round_ in range(args.rounds):
            for name, threads in CONTENDERS.items():
                result = run_one(args.src, out, args.preset, address if threads else None, threads)
                results[name].append(result)
                same = result["report"] == results["single"][0]["report"]
                shard_times = ", ".join(f"{t:.1f}" for t in result["shards"].values())
                workers = ", ".join(f"{r / 2**20:.0f}" for r in result["worker_rss"]) or "-"
                print(
                    f"round {round_ + 1} {name:7} {result['wall']:6.1f} s  shards done at [{shard_times}] s  "
                    f"driver {result['driver_rss'] / 2**20:.0f} MiB, workers [{workers}] MiB peak  same bytes: {same}"
                )
                if not same:
                    raise SystemExit(f"{name}: the report (checksums) differs from the single-machine run's")
    finally:
        ray.shutdown()
    sizes = results["single"][0]["sizes"]
    print(
        f"output: {len(sizes)} shards, {sum(sizes.values()) / 1e9:.2f} GB: " + ", ".join(f"{s / 1e9:.2f}" for s in sizes.values())
    )
    base = statistics.median(r["wall"] for r in results["single"])
    for name, runs in results.items():
        wall = statistics.median(r["wall"] for r in runs)
        print(f"{name:7} median {wall:6.1f} s  ({wall - base:+.1f} s, x{wall / base:.2f} of single)")


if __name__ == "__main__":
    main()
