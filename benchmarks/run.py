#!/usr/bin/env python
"""Time moeconv against transformers and the I/O floor, side by side in one run; print every figure.

    python benchmarks/run.py --quick          # gpt-oss-20b width, 1 layer, small vocab + kernel (~6 min)
    python benchmarks/run.py                  # the full set in benchmarks/RESULTS.md (~35 min, ~20 GB disk)
    python benchmarks/run.py --data DIR       # where checkpoints go (default benchmarks/data/, git-ignored)
    python benchmarks/run.py --only gpt-oss   # one section of the full set: gpt-oss, memory, fuse, kernel

Every contender runs as its own subprocess; wall time, user+sys CPU and peak RSS come from os.wait4
(the child's own rusage, the figure `/usr/bin/time -v` prints as "Maximum resident set size").
CPU utilisation = (user + sys) / wall: above 1.0 means both cores were busy.
Page cache: as root, `sync; echo 3 > /proc/sys/vm/drop_caches` runs before every contender (cold
reads for all); otherwise the run says caches were warm for all.
The I/O floor: read every input .safetensors file once and write the same number of bytes as
moeconv's output, fsync, in one process: what the job costs with zero compute. Requests are
FLOOR_REQUEST_BYTES each: this virtual disk moves more the more is in flight (the floor of the
2-layer gpt-oss job, 3 cold runs each: 5.94 s with 16 MiB requests, 4.89 s with 64 MiB, 4.13 s
with 256 MiB; rounds before the fifth of 2026-12-02 used 16 MiB and so overstated it). Measured
two ways, through the page cache (buffered) and with O_DIRECT (as moeconv does, see
moeconv/directio.py); the faster one is "the floor" every ratio uses.
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
import time
from pathlib import Path

from moeconv import report_cache  # torch-free: where moeconv's runs keep their load reports

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DROP = Path("/proc/sys/vm/drop_caches")
# After a checkpoint is generated the virtual disk stays slow for a while (the host flushing it):
# the first contender after it ran 30 % slower than the same command a minute later.
SETTLE_SECONDS = 20
# The same holds after a process that used GBs of memory (the host takes the freed memory back; this VM
# runs a balloon and DAMON page-out): right after the kernel benchmark the O_DIRECT floor took 28.8 s,
# 24.4 s, then 5.7 s; moeconv took 70 s once. So before every contender the disk is probed (64 MiB
# O_DIRECT reads) until it reads within 1.5x of the median of this run's first probes (one per
# contender), for up to a minute: the spells measured lasted under one. Against the best probe
# instead, every contender of one run waited the full minute while the floor and moeconv ran at
# their usual speed: that best probe was an outlier (served from the host's cache, probably).
CONTENDER_SETTLE_SECONDS = 2
FLOOR_REQUEST_BYTES = 256 * 2**20  # see the module docstring
PROBE_BYTES = 64 * 2**20
PROBE_PATIENCE = 1.5
PROBE_GIVE_UP_SECONDS = 60
_probe = {"path": None, "times": []}


def drop_caches() -> bool:
    try:
        os.sync()
        DROP.write_text("3\n")
        return True
    except OSError:
        return False


def probe_disk() -> float:
    """Seconds to read the probe file with O_DIRECT (created on first use)."""
    path = _probe["path"]
    if not path.is_file() or path.stat().st_size != PROBE_BYTES:
        path.write_bytes(os.urandom(PROBE_BYTES))
        os.sync()
    buffer = mmap.mmap(-1, 16 * 2**20)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    start = time.perf_counter()
    try:
        for offset in range(0, PROBE_BYTES, len(buffer)):
            os.preadv(fd, [buffer], offset)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def wait_for_disk() -> float:
    """Probe until the disk is back to speed (see CONTENDER_SETTLE_SECONDS) in two probes 5 s
    apart (the slowdown can start seconds after the process exits); the seconds waited."""
    start, good = time.perf_counter(), 0
    took = probe_disk()
    _probe["times"].append(took)  # one sample per wait: a long spell cannot drag the median along
    while True:
        good = good + 1 if took <= PROBE_PATIENCE * statistics.median(_probe["times"]) else 0
        waited = time.perf_counter() - start
        if good == 2 or waited > PROBE_GIVE_UP_SECONDS:
            return waited
        time.sleep(5 if good else 2)
        took = probe_disk()


def use_data(data: Path) -> None:
    """Keep checkpoints and the disk probe in `data`, and take the first probes before anything heavy runs."""
    data.mkdir(parents=True, exist_ok=True)
    _probe["path"] = data / "disk-probe.bin"
    wait_for_disk()


def run(cmd: list[str], label: str, env: dict | None = None) -> dict:
    """One contender as a subprocess: wall, cpu, peak RSS (its own rusage)."""
    cold = drop_caches()
    time.sleep(CONTENDER_SETTLE_SECONDS)
    if (waited := wait_for_disk()) > 10:  # O_DIRECT probes: the cache stays dropped
        print(f"  (waited {waited:.0f} s for the disk to be back to speed)", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    if status != 0:
        raise SystemExit(f"{label} failed ({status}):\n{err[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    result = {"label": label, "wall": wall, "cpu": cpu, "util": cpu / wall, "rss_gb": usage.ru_maxrss * 1024 / 1e9, "cold": cold}
    print(
        f"  {label:<42} {wall:7.2f} s  cpu {cpu:6.1f} s  util {cpu / wall:4.2f}  peak RSS {result['rss_gb']:6.2f} GB", flush=True
    )
    return result


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def make(data: Path, model: str, layers: int, vocab: int | None) -> Path:
    name = f"{model}-L{layers}" + (f"-V{vocab}" if vocab else "")
    path = data / name
    if not (path / "config.json").is_file():
        shutil.rmtree(path, ignore_errors=True)
        cmd = [PY, str(REPO / "benchmarks" / "make_checkpoint.py"), model, str(path), "--layers", str(layers)]
        subprocess.run(cmd + (["--vocab", str(vocab)] if vocab else []), check=True)
        os.sync()
        time.sleep(SETTLE_SECONDS)
    return path


def moeconv(src: Path, out: Path, preset: str) -> list[str]:
    return [PY, "-m", "moeconv", "convert", str(src), str(out), "--preset", preset, "--overwrite"]


def io_floor(src: Path, out_bytes: int, out: Path, how: str) -> list[str]:
    return [PY, __file__, "_floor", how, str(src), str(out_bytes), str(out)]


def transformers(src: Path, out: Path, kind: str) -> list[str]:
    return [PY, __file__, "_transformers", kind, str(src), str(out)]


# -- child modes ------------------------------------------------------------------------------------


def _floor(how: str, src: str, out_bytes: str, out: str) -> None:
    direct = os.O_DIRECT if how == "direct" else 0
    buffer = mmap.mmap(-1, FLOOR_REQUEST_BYTES)  # page-aligned, as O_DIRECT wants
    view = memoryview(buffer)
    for path in sorted(Path(src).glob("*.safetensors")):
        fd = os.open(path, os.O_RDONLY | direct)
        offset = 0
        while (got := os.preadv(fd, [view], offset)) == len(view):  # a short read is the end
            offset += got
        os.close(fd)
    Path(out).mkdir(parents=True, exist_ok=True)
    size = int(out_bytes)
    fd = os.open(Path(out) / "floor.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | direct, 0o644)
    left = -(-size // 4096) * 4096 if direct else size  # O_DIRECT writes whole blocks; cut back below
    while left:
        left -= os.write(fd, view[: min(left, len(view))])
    os.ftruncate(fd, size)
    os.fsync(fd)
    os.close(fd)


def _transformers(kind: str, src: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Mxfp4Config

    extra = {"quantization_config": Mxfp4Config(dequantize=True)} if kind == "gpt-oss" else {}
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, **extra)
    model.save_pretrained(out, save_original_format=False)  # fused, current names (v5 default un-fuses)


# -- the benchmarks ---------------------------------------------------------------------------------


def moeconv_cache(data: Path) -> dict:
    """moeconv's runs keep their cache (import hint, load reports) under `data`, not the user's."""
    return {**os.environ, "XDG_CACHE_HOME": str(data / "cache")}


def compare(src: Path, data: Path, preset: str, kind: str, title: str) -> dict:
    """moeconv twice per round (its load report computed, as in a first conversion of this plan, and
    recalled, as in a repeated one) and the O_DIRECT floor, four rounds, the buffered floor twice,
    interleaved (this disk's speed drifts by +-20 % over minutes), then moeconv with sha256 and
    transformers once. Which of the two moeconv runs goes first alternates, so each goes first
    twice: in one three-round run the second of a round was the slower in every round, whichever
    it was. Ratios use medians: one run caught in a slow spell of this VM (see
    CONTENDER_SETTLE_SECONDS) does not move them; every run is printed and kept in the JSON.
    An untimed conversion first leaves the import hint in place, as for any conversion but a
    machine's very first."""
    print(f"\n{title}: {src.name} ({size_of(src) / 1e9:.2f} GB in)")
    out, env = data / "out", moeconv_cache(data)
    reports = report_cache.cache_folder(env)
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(moeconv(src, out, preset), check=True, capture_output=True, env=env)
    shutil.rmtree(out)
    ours, computed, floors = [], [], {"buffered": [], "direct": []}
    for round_ in range(4):
        for how in ("computed", "recalled")[:: 1 if round_ % 2 == 0 else -1]:  # which goes first alternates
            runs = computed if how == "computed" else ours
            if how == "computed":
                shutil.rmtree(reports, ignore_errors=True)
            runs.append(run(moeconv(src, out, preset), f"moeconv, load report {how}", env))
            out_bytes = size_of(out)
            shutil.rmtree(out)
        for how, runs in floors.items():
            if how == "buffered" and round_ >= 2:
                continue  # 20-30 s a run here, and never the floor
            runs.append(
                run(
                    io_floor(src, out_bytes, out, how),
                    f"I/O floor, {how} (read {size_of(src) / 1e9:.2f} GB, write {out_bytes / 1e9:.2f} GB)",
                )
            )
            shutil.rmtree(out)
    sha = run(moeconv(src, out, preset) + ["--checksum", "sha256"], "moeconv --checksum sha256 (recalled)", env)
    shutil.rmtree(out)
    theirs = run(transformers(src, out, kind), "transformers from_pretrained + save_pretrained")
    shutil.rmtree(out)
    floor_medians = {how: statistics.median(r["wall"] for r in runs) for how, runs in floors.items()}
    floor_wall = min(floor_medians.values())
    rss = max(r["rss_gb"] for r in ours + computed)
    result = {
        "input_bytes": size_of(src),
        "output_bytes": out_bytes,
        "moeconv": ours,
        "moeconv_report_computed": computed,
        "moeconv_sha256": sha,
        "floor": floors,
        "floor_medians": floor_medians,
        "transformers": theirs,
        "floor_vs_transformers": theirs["wall"] / floor_wall,
    }
    print(
        f"  I/O floor: median {floor_wall:.2f} s (buffered {floor_medians['buffered']:.2f} s, direct "
        f"{floor_medians['direct']:.2f} s), itself {result['floor_vs_transformers']:.1f}x faster than transformers"
    )
    for name, runs, suffix in (("report recalled", ours, ""), ("report computed", computed, "_report_computed")):
        wall = statistics.median(r["wall"] for r in runs)
        ratios = {
            "speedup_vs_transformers": theirs["wall"] / wall,
            "memory_vs_transformers": rss / theirs["rss_gb"],
            "vs_io_floor": wall / floor_wall,
        }
        print(
            f"  moeconv, {name} (median {wall:.2f} s): {ratios['speedup_vs_transformers']:.1f}x faster than "
            f"transformers with 1/{1 / ratios['memory_vs_transformers']:.1f} of its peak RSS; {ratios['vs_io_floor']:.2f}x the I/O floor"
        )
        result.update({key + suffix: value for key, value in ratios.items()})
    return result


def memory_sweep(data: Path, cases: list[tuple[str, int]], vocab: int) -> list[dict]:
    print(f"\nmemory vs tensor size and layers (gpt-oss-bf16, vocab {vocab})")
    rows = []
    for model, layers in cases:
        src = make(data, model, layers, vocab)
        out = data / "out"
        shutil.rmtree(out, ignore_errors=True)
        result = run(moeconv(src, out, "gpt-oss-bf16"), f"{model} width x {layers} layer(s)", moeconv_cache(data))
        result.update(model=model, layers=layers, output_bytes=size_of(out))
        shutil.rmtree(out)
        floors = {}
        for how in ("buffered", "direct"):
            floors[how] = run(io_floor(src, result["output_bytes"], out, how), f"  its I/O floor, {how}")["wall"]
            shutil.rmtree(out)
        result.update(floors=floors, floor_wall=min(floors.values()), vs_io_floor=result["wall"] / min(floors.values()))
        if model == "gpt-oss-120b":
            shutil.rmtree(src)  # 1.6 GB in, not reused
        rows.append(result)
    return rows


def _kernel() -> None:
    import torch
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    from moeconv import mxfp4

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (4, 2880, 90, 16), dtype=torch.uint8, generator=gen)  # 33 M elements
    scales = torch.randint(115, 131, (4, 2880, 90), dtype=torch.uint8, generator=gen)
    n = blocks.numel() * 2
    out = torch.empty(4, 2880, 2880, dtype=torch.bfloat16)
    lut = torch.tensor(mxfp4.FP4_VALUES, dtype=torch.bfloat16)

    def plain():  # the obvious LUT gather: two nibble lookups + ldexp
        b = blocks.long()
        vals = torch.stack([lut[b & 0xF], lut[b >> 4]], dim=-1).view(*blocks.shape[:-1], 32)
        return torch.ldexp(vals, scales.to(torch.int32)[..., None] - 127).view(4, 2880, 2880)

    def best(fn, repeat):
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return n / min(times)

    small = (blocks[:1, :720], scales[:1, :720])  # transformers is slow: a quarter of one expert
    n_small = small[0].numel() * 2
    start = time.perf_counter()
    _convert_moe_packed_tensors(*small, dtype=torch.bfloat16)
    theirs = n_small / (time.perf_counter() - start)
    figures = {
        "moeconv (reused out=)": best(lambda: mxfp4.dequantize(blocks, scales, out=out), 5),
        "moeconv (fresh output)": best(lambda: mxfp4.dequantize(blocks, scales), 5),
        "plain LUT gather + ldexp": best(plain, 2),
        "transformers _convert_moe_packed_tensors": theirs,
    }
    assert torch.equal(mxfp4.dequantize(blocks, scales), plain())
    print(json.dumps(figures))


def kernel() -> dict:
    print("\nMXFP4 -> bf16 kernel, one thread (torch.set_num_threads(1)), output elements/s")
    wait_for_disk()  # a proxy for the host having settled: the kernels slowed down 17x with the disk
    line = subprocess.run([PY, __file__, "_kernel"], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    figures = json.loads(line)
    for name, rate in figures.items():
        print(f"  {name:<42} {rate:10.3e} elem/s")
    return figures


SECTIONS = ("gpt-oss", "memory", "fuse", "kernel")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        {"_floor": _floor, "_transformers": _transformers, "_kernel": _kernel}[sys.argv[1]](*sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", type=Path, default=REPO / "benchmarks" / "data")
    parser.add_argument("--vocab", type=int, default=201088, help="vocabulary of the main gpt-oss comparison")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run this section of the full set (repeatable)")
    args = parser.parse_args()
    use_data(args.data)
    cold = drop_caches()
    print(
        f"{os.cpu_count()} cores; page cache {'dropped before every contender' if cold else 'WARM for all contenders (not root)'}"
    )
    results: dict = {"cores": os.cpu_count(), "cold_cache": cold}
    only = set(args.only or SECTIONS)
    if args.quick:
        src = make(args.data, "gpt-oss-20b", 1, 8192)
        results["gpt_oss"] = compare(src, args.data, "gpt-oss-bf16", "gpt-oss", "gpt-oss-20b width, 1 layer, vocab 8192 (quick)")
    else:
        if "gpt-oss" in only:
            src = make(args.data, "gpt-oss-20b", 2, args.vocab)
            results["gpt_oss"] = compare(
                src, args.data, "gpt-oss-bf16", "gpt-oss", f"gpt-oss-20b width, 2 layers, vocab {args.vocab}"
            )
        if "memory" in only:
            results["memory"] = memory_sweep(
                args.data, [("gpt-oss-20b", 1), ("gpt-oss-20b", 2), ("gpt-oss-20b", 4), ("gpt-oss-120b", 1)], 8192
            )
        if "fuse" in only:
            src = make(args.data, "mixtral-8x7b", 1, None)
            results["fuse"] = compare(src, args.data, "fuse-experts", "mixtral", "fuse-experts: Mixtral-8x7B width, 1 layer")
    if args.quick or "kernel" in only:  # last: its GBs of fresh memory slow this VM down for a minute
        results["kernel"] = kernel()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
