#!/usr/bin/env python
"""moeconv against the streaming I/O floor, side by side in one run; medians and ratios printed.

    python benchmarks/run.py                                   # gpt-oss-8, gpt-oss-2, memory
    python benchmarks/run.py --only gpt-oss-8 --rounds 5       # one case (repeatable)
    python benchmarks/run.py --tree before=../wt-before --tree after=. --only gpt-oss-2   # A/B of source trees

Cases (synthetic checkpoints from make_checkpoint.py, converted with `--preset gpt-oss-bf16`):
    gpt-oss-8  8 layers of gpt-oss-20b width, the real vocabulary (6.1 GB in, 15.5 GB out), every
               tree vs the floor. Targets: within 1.1x of the floor, peak RSS <= 1.0 GB.
    gpt-oss-2  the same with 2 layers (3.3 GB in, 5.6 GB out).
    memory     peak RSS of one gpt-oss-120b-width layer and of 1, 2, 4 gpt-oss-20b-width layers
               (vocabulary 8192). Target: <= 1.0 GB, flat with layers.
    deepseek-v3  one DeepSeek-V3-width FP8 layer (256 experts of [2048, 7168] + a shared expert, MLA;
               vocabulary 8192; 11.8 GB in, 23 GB out) with `--preset fp8-bf16`, against the floor,
               DeepSeek's own fp8_cast_bf16.py flow on a CPU (benchmarks/fp8_cast_per_shard.py) and
               compressed-tensors' convert_checkpoint (benchmarks/fp8_ct_convert.py), each followed
               by `sync` (they do not fsync). Target: peak RSS <= 1.0 GB.
    kimi-k2-int4  one Kimi-K2-Thinking-width layer (384 INT4 routed experts of [2048, 7168], the rest
               bf16; vocabulary 8192; ~9.6 GB in, ~35 GB out) with `--preset compressed-tensors-bf16`,
               against the floor. compressed-tensors' own convert_checkpoint is not run: it holds a
               whole shard's bf16 result in memory (~20 GB for a 5 GB INT4 shard), too near this
               machine's 24 GB to measure safely.

Each contender is its own subprocess, started after `sync; echo 3 > /proc/sys/vm/drop_caches` (as
root; every run starts cold, Python imports included) with its current directory outside any
checkout; wall time is measured around it, CPU and peak RSS come from its rusage (os.wait4: the
child's own, with the descendants it waited for; peak RSS is the largest single process, not a sum).
A conversion is `python -m moeconv convert SRC OUT --preset gpt-oss-bf16 --overwrite` with
PYTHONPATH=<tree>, into an OUT deleted first (as a first conversion); which tree was imported is
checked. The floor is `benchmarks/floor.py` (see its docstring): the input read while as many bytes
as the output are written, O_DIRECT, then fsync. Its write size is predicted from the input headers
(MXFP4 experts as bf16), and every conversion's output must match it (headers aside).

Rounds are interleaved (the order of contenders rotates each round) because this machine and disk
drift; medians, the ratio of medians and the median of each round's ratio are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from floor import bf16_output_bytes  # noqa: E402  (benchmarks/floor.py, standard library only)

REPO = HERE.parent
PY = sys.executable
PRESET = "gpt-oss-bf16"
HEADER_SLACK = 16 * 2**20  # output headers and alignment: bytes a conversion may write beyond the tensors
CASES = ["gpt-oss-8", "gpt-oss-2", "memory", "deepseek-v3", "kimi-k2-int4"]
# the alternatives in the deepseek-v3 case: name -> script (SRC OUT), each followed by `sync`
ALTERNATIVES = {"fp8_cast_bf16.py (CPU)": "fp8_cast_per_shard.py", "compressed-tensors convert_checkpoint": "fp8_ct_convert.py"}
MEMORY = [("gpt-oss-120b", 1), ("gpt-oss-20b", 1), ("gpt-oss-20b", 2), ("gpt-oss-20b", 4)]
MEMORY_VOCAB = 8192
TARGET_X_FLOOR = 1.1
TARGET_RSS_GB = 1.0


# ---------------------------------------------------------------------------------------------
# Running one contender
# ---------------------------------------------------------------------------------------------
def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run(cmd: list[str], label: str, env: dict | None = None) -> dict:
    """One contender as a subprocess, cold: wall, CPU, peak RSS from its rusage; its stdout kept."""
    cold = drop_caches()
    time.sleep(2)
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd="/tmp")
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        log.seek(0)
        text = log.read().decode(errors="replace")
    if status != 0:
        raise SystemExit(f"{label} failed (wait status {status}): {' '.join(cmd)}\n{text[-3000:]}")
    result = {
        "label": label,
        "wall": round(wall, 3),
        "cpu": round(usage.ru_utime + usage.ru_stime, 3),
        "user": round(usage.ru_utime, 3),
        "sys": round(usage.ru_stime, 3),
        "rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 4),
        "cold": cold,
        "load_before": round(load, 2),
        "stdout_tail": text[-400:],
    }
    print(
        f"  {label:<28} {wall:7.2f} s  cpu {result['cpu']:6.1f} s  peak RSS {result['rss_gb']:5.2f} GB  (load {load:.1f})",
        flush=True,
    )
    return result


def tree_env(tree: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(tree)}


def check_tree(name: str, tree: Path) -> dict:
    """The moeconv a subprocess imports with PYTHONPATH=tree (from /tmp) must be the tree's own."""
    probe = "import moeconv; print(moeconv.__file__)"
    found = subprocess.run([PY, "-c", probe], env=tree_env(tree), cwd="/tmp", capture_output=True, text=True, check=True)
    imported = Path(found.stdout.strip()).resolve()
    if not imported.is_relative_to(tree / "moeconv"):
        raise SystemExit(f"tree {name}: PYTHONPATH={tree} imports {imported}, not the tree's moeconv")
    git = ["git", "-C", str(tree)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run([*git, "status", "--porcelain", "--", "moeconv"], capture_output=True, text=True).stdout.strip())
    return {"dir": str(tree), "imports": str(imported), "commit": commit, "moeconv_dirty": dirty}


def convert(tree: Path, src: Path, out: Path, label: str, preset: str = PRESET) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [PY, "-m", "moeconv", "convert", str(src), str(out), "--preset", preset, "--overwrite"]
    result = run(cmd, label, tree_env(tree))
    result["out_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    return result


def alternative(name: str, src: Path, out: Path) -> dict:
    """An alternative converter (ALTERNATIVES) as its own cold subprocess, then `sync` (they do not fsync)."""
    shutil.rmtree(out, ignore_errors=True)
    result = run(["sh", "-c", f'"{PY}" "{HERE / ALTERNATIVES[name]}" "{src}" "{out}" && sync'], name)
    result["out_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    return result


def floor(src: Path, out: Path, nbytes: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = run([PY, str(HERE / "floor.py"), str(src), str(out), "--bytes", str(nbytes)], "floor")
    result["floor"] = json.loads(result.pop("stdout_tail").strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def input_bytes(src: Path) -> int:
    return sum(p.stat().st_size for p in src.glob("*.safetensors"))


def need_disk(path: Path, nbytes: int, what: str) -> None:
    free = shutil.disk_usage(path).free
    if free < nbytes + 2 * 10**9:
        raise SystemExit(f"{what} needs {nbytes / 1e9:.1f} GB (+2 GB spare) on {path}; {free / 1e9:.1f} GB free")


def make(data: Path, model: str, layers: int, vocab: int | None = None) -> Path:
    """The checkpoint in `data`, generated unless complete (config.json is written last)."""
    path = data / f"{model}-L{layers}" if vocab is None else data / f"{model}-L{layers}-V{vocab}"
    if not (path / "config.json").is_file():
        shutil.rmtree(path, ignore_errors=True)
        cmd = [PY, str(HERE / "make_checkpoint.py"), model, str(path), "--layers", str(layers)]
        subprocess.run(cmd + (["--vocab", str(vocab)] if vocab else []), check=True)
        os.sync()
        time.sleep(10)  # let the disk settle after a big write
    return path


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def compare(trees: dict[str, Path], src: Path, data: Path, rounds: int, preset: str = PRESET, others: bool = False) -> dict:
    """Interleaved rounds of every tree's conversion, the floor (and the ALTERNATIVES); medians and ratios."""
    out = data / "out"
    nbytes = bf16_output_bytes(src)
    need_disk(data, nbytes, f"converting {src.name}")
    contenders = [*trees, "floor", *(ALTERNATIVES if others else [])]
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for round_ in range(rounds):
        order = contenders[round_ % len(contenders) :] + contenders[: round_ % len(contenders)]
        print(f" round {round_ + 1}/{rounds}", flush=True)
        for name in order:
            if name == "floor":
                runs[name].append(floor(src, out, nbytes))
            else:
                if name in ALTERNATIVES:
                    result = alternative(name, src, out)
                else:
                    result = convert(trees[name], src, out, f"moeconv ({name})", preset)
                result["size_ok"] = 0 <= result["out_bytes"] - nbytes <= HEADER_SLACK
                if not result["size_ok"]:
                    print(f"  ! {name} wrote {result['out_bytes']} bytes, the floor {nbytes}", flush=True)
                runs[name].append(result)
    summary = {}
    for name in contenders:
        summary[name] = {
            "wall": med(runs[name], "wall"),
            "wall_min": min(r["wall"] for r in runs[name]),
            "wall_max": max(r["wall"] for r in runs[name]),
            "cpu": med(runs[name], "cpu"),
            "rss_gb": max(r["rss_gb"] for r in runs[name]),
        }
    for name in [c for c in contenders if c != "floor"]:
        summary[name]["x_floor"] = summary[name]["wall"] / summary["floor"]["wall"]
        summary[name]["x_floor_per_round"] = statistics.median(a["wall"] / f["wall"] for a, f in zip(runs[name], runs["floor"]))
        summary[name]["size_ok"] = all(r["size_ok"] for r in runs[name])
    return {
        "src": str(src),
        "input_bytes": input_bytes(src),
        "output_bytes": nbytes,
        "rounds": rounds,
        "runs": runs,
        "median": summary,
    }


def memory(trees: dict[str, Path], data: Path, rounds: int, keep: bool) -> dict:
    """Peak RSS of each tree's conversion of one gpt-oss-120b-width layer and 1, 2, 4 of 20b width."""
    found: dict[str, dict] = {}
    for model, layers in MEMORY:
        src = make(data, model, layers, MEMORY_VOCAB)
        need_disk(data, bf16_output_bytes(src), f"converting {src.name}")
        case = f"{model} x{layers}"
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for round_ in range(rounds):
            for name in list(trees)[round_ % len(trees) :] + list(trees)[: round_ % len(trees)]:
                runs[name].append(convert(trees[name], src, data / "out", f"{case} ({name})"))
        found[case] = {
            "src": str(src),
            "input_bytes": input_bytes(src),
            "runs": runs,
            "median": {
                name: {"wall": med(r, "wall"), "cpu": med(r, "cpu"), "rss_gb": max(x["rss_gb"] for x in r)}
                for name, r in runs.items()
            },
        }
        if not keep:
            shutil.rmtree(src)
    return found


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
def table_compare(case: str, fig: dict) -> str:
    m = fig["median"]
    lines = [
        f"{case}: {fig['input_bytes'] / 1e9:.2f} GB in, {fig['output_bytes'] / 1e9:.2f} GB out, {fig['rounds']} round(s), medians",
        "",
        "| contender | wall s (min-max) | x floor | x floor per round | CPU s | peak RSS GB | output size | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in m.items():
        wall = f"{s['wall']:.2f} ({s['wall_min']:.2f}-{s['wall_max']:.2f})"
        load = f"{med(fig['runs'][name], 'load_before'):.1f}"
        if name == "floor":
            lines.append(f"| floor | {wall} | 1 | 1 | {s['cpu']:.1f} | {s['rss_gb']:.2f} | {fig['output_bytes']} B | {load} |")
        else:
            size = "= floor" if s["size_ok"] else "DIFFERS"
            label = name if name in ALTERNATIVES else f"moeconv ({name})"
            lines.append(
                f"| {label} | {wall} | {s['x_floor']:.2f} | {s['x_floor_per_round']:.2f} | {s['cpu']:.1f} | {s['rss_gb']:.2f} | {size} | {load} |"
            )
    lines.append("load: the median 1-minute load average just before each run (this machine has 2 cores)")
    if case == "gpt-oss-8":
        for name, s in m.items():
            if name != "floor":
                ok = s["x_floor"] <= TARGET_X_FLOOR and s["rss_gb"] <= TARGET_RSS_GB
                lines.append(
                    f"target for {name}: <= {TARGET_X_FLOOR}x floor and <= {TARGET_RSS_GB} GB: {'met' if ok else 'NOT met'} "
                    f"({s['x_floor']:.2f}x, {s['rss_gb']:.2f} GB)"
                )
    if case in ("deepseek-v3", "kimi-k2-int4"):
        for name, s in m.items():
            if name != "floor" and name not in ALTERNATIVES:
                ok = s["rss_gb"] <= TARGET_RSS_GB
                lines.append(f"target for {name}: <= {TARGET_RSS_GB} GB: {'met' if ok else 'NOT met'} ({s['rss_gb']:.2f} GB)")
    floors = [r["floor"] for r in fig["runs"]["floor"]]
    lines.append(
        "floor per run (read GB/s, write GB/s): " + ", ".join(f"{f['read_gb_s']:.2f}/{f['write_gb_s']:.2f}" for f in floors)
    )
    return "\n".join(lines)


def table_memory(fig: dict) -> str:
    trees = list(next(iter(fig.values()))["median"])
    lines = [
        f"memory: peak RSS GB of moeconv (vocabulary {MEMORY_VOCAB}); wall s and CPU s for reference",
        "",
        "| checkpoint | input GB | " + " | ".join(f"{t}: peak RSS GB | {t}: wall s | {t}: CPU s" for t in trees) + " |",
        "|---|---|" + "---|---|---|" * len(trees),
    ]
    for case, f in fig.items():
        cells = " | ".join(
            f"{f['median'][t]['rss_gb']:.2f} | {f['median'][t]['wall']:.2f} | {f['median'][t]['cpu']:.1f}" for t in trees
        )
        lines.append(f"| {case} | {f['input_bytes'] / 1e9:.2f} | {cells} |")
    for t in trees:
        peak = max(f["median"][t]["rss_gb"] for f in fig.values())
        lines.append(
            f"target for {t}: <= {TARGET_RSS_GB} GB: {'met' if peak <= TARGET_RSS_GB else 'NOT met'} (largest {peak:.2f} GB)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", action="append", choices=CASES, help="a case to run (repeatable; default: all)")
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        help="NAME=DIR: run moeconv from this source tree (repeatable; default: this checkout)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of gpt-oss-8 and gpt-oss-2 (default 3)")
    parser.add_argument("--memory-rounds", type=int, default=1, help="rounds of each memory conversion (default 1)")
    parser.add_argument("--data", type=Path, default=HERE / "data", help="checkpoints and outputs (default benchmarks/data)")
    parser.add_argument("--keep-memory-data", action="store_true", help="keep the memory case's checkpoints")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--show", type=Path, metavar="JSON", help="print the tables of figures saved with --json, run nothing")
    args = parser.parse_args(argv)
    if args.show:
        cases = json.loads(args.show.read_text())["cases"]
        print("\n\n".join(table_memory(f) if c == "memory" else table_compare(c, f) for c, f in cases.items()))
        return 0
    if args.rounds < 1 or args.memory_rounds < 1:
        parser.error("rounds must be at least 1")
    trees: dict[str, Path] = {}
    for spec in args.tree or [f"this={REPO}"]:
        name, sep, path = spec.partition("=")
        if not sep or not name or name == "floor" or name in trees:
            parser.error(f"--tree {spec}: want NAME=DIR with a new name other than 'floor'")
        trees[name] = Path(path).resolve()
    args.data = args.data.resolve()
    args.data.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    info = {
        "started": started,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "trees": {name: check_tree(name, tree) for name, tree in trees.items()},
        "rounds": args.rounds,
        "memory_rounds": args.memory_rounds,
    }
    for name, t in info["trees"].items():
        print(f"tree {name}: {t['dir']} at {t['commit'][:10]}{' (moeconv/ modified)' if t['moeconv_dirty'] else ''}", flush=True)
    figures: dict = {"info": info, "cases": {}}
    tables = []
    for case in [c for c in CASES if c in (args.only or CASES)]:
        print(f"== {case}", flush=True)
        if case == "memory":
            fig = memory(trees, args.data, args.memory_rounds, args.keep_memory_data)
        elif case == "deepseek-v3":
            src = make(args.data, "deepseek-v3", 1, MEMORY_VOCAB)
            fig = compare(trees, src, args.data, args.rounds, preset="fp8-bf16", others=True)
        elif case == "kimi-k2-int4":
            src = make(args.data, "kimi-k2-int4", 1, MEMORY_VOCAB)
            fig = compare(trees, src, args.data, args.rounds, preset="compressed-tensors-bf16")
        else:
            src = make(args.data, "gpt-oss-20b", int(case.rsplit("-", 1)[1]))
            fig = compare(trees, src, args.data, args.rounds)
        tables.append(table_memory(fig) if case == "memory" else table_compare(case, fig))
        figures["cases"][case] = fig
        print("\n" + tables[-1] + "\n", flush=True)
        if args.json:  # after every case, so a late failure keeps the earlier figures
            args.json.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"== summary (started {started})\n\n" + "\n\n".join(tables), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
