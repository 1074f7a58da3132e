#!/usr/bin/env python
"""Compare moeconv source trees on one conversion: cold runs, interleaved, medians; same bytes.

    git worktree add --detach /tmp/before HEAD~1
    python benchmarks/ab.py before=/tmp/before after=. --pairs 6
    python benchmarks/ab.py before=/tmp/before after=. --report computed -- --max-shard-size 1GB
    python benchmarks/ab.py before=/tmp/before after=. --over-previous  (a repeat with --overwrite)
    (after --: more `moeconv convert` options, for every tree)

Each tree runs as `PYTHONPATH=TREE python -m moeconv convert ...` through run.py's `run` (page
cache dropped as root, the disk probed back to speed, wall time from the child's rusage). The order
of the trees alternates from round to round: on this VM the disk drifts by +-25 % over minutes,
so only medians of interleaved pairs mean anything.

Each tree has its own moeconv cache folder (import hint, kept load reports): a kept report's
fingerprint includes moeconv's own files, so two trees sharing one folder invalidate each other's
reports and every run computes its report, whatever --report says. An untimed conversion per tree
puts its hint and report in place first. `--report computed` deletes the tree's kept reports
before every run (a first conversion of a plan); `recalled` (the default) keeps them.

After every run the written shards' checksums (moeconv-report.json) must equal the first tree's:
a speed change that changes the output stops the comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import run as bench

from moeconv import report_cache


def shard_checksums(out: Path) -> dict:
    """{algorithm, shard name -> checksum} from a finished output's report."""
    report = json.loads((out / "moeconv-report.json").read_text())
    files = report["checksums"]["files"]
    return {"algorithm": report["checksums"]["algorithm"], **{k: v for k, v in files.items() if k.endswith(".safetensors")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", metavar="NAME=TREE", help="a name and a moeconv source tree (e.g. a git worktree)")
    parser.add_argument("--pairs", type=int, default=6, help="rounds; each runs every tree once")
    parser.add_argument("--model", default="gpt-oss-20b", choices=["gpt-oss-20b", "gpt-oss-120b", "mixtral-8x7b"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=201088)
    parser.add_argument("--preset", default=None, help="default: gpt-oss-bf16, or fuse-experts for mixtral-8x7b")
    parser.add_argument("--report", choices=["recalled", "computed"], default="recalled")
    parser.add_argument("--data", type=Path, default=bench.REPO / "benchmarks" / "data")
    parser.add_argument("--json", type=Path, help="also write every run here")
    parser.add_argument(
        "--over-previous",
        action="store_true",
        help="convert over the previous run's output (--overwrite deletes it), as a repeated conversion does",
    )
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.extra = argv[cut + 1 :]  # more `moeconv convert` options, for every tree
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    trees = {}
    for item in args.trees:
        name, sep, tree = item.partition("=")
        if not sep or not name or not (Path(tree) / "moeconv" / "__init__.py").is_file():
            parser.error(f"{item!r}: give NAME=TREE, TREE a folder holding the moeconv package")
        if name in trees:
            parser.error(f"{name!r} names two trees")
        trees[name] = Path(tree).resolve()
    vocab = None if args.model == "mixtral-8x7b" else args.vocab
    preset = args.preset or ("fuse-experts" if args.model == "mixtral-8x7b" else "gpt-oss-bf16")
    bench.use_data(args.data)
    src, out = bench.make(args.data, args.model, args.layers, vocab), args.data / "ab-out"

    def command() -> list[str]:
        return [sys.executable, "-m", "moeconv", "convert", str(src), str(out), "--preset", preset, "--overwrite", *args.extra]

    envs = {}
    for name, tree in trees.items():  # each tree's own cache folder
        # PYTHONSAFEPATH: `python -m` would put the working folder first on sys.path, and from a
        # checkout's root that folder's moeconv would run instead of the tree's.
        env = {**bench.moeconv_cache(args.data / "ab-cache" / name), "PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}
        found = subprocess.run(
            [sys.executable, "-c", "import moeconv; print(moeconv.__file__)"], env=env, capture_output=True, text=True
        )
        if Path(found.stdout.strip()).parent != tree / "moeconv":
            raise SystemExit(
                f"{name}: `import moeconv` finds {found.stdout.strip() or found.stderr.strip()}, not the one in {tree}"
            )
        envs[name] = env
    expected = None

    def check(name: str) -> None:  # every tree must write the first tree's bytes
        nonlocal expected
        got = shard_checksums(out)
        if expected is not None and got != expected:
            raise SystemExit(f"{name} wrote other shards than {next(iter(trees))}: {got} != {expected}")
        expected = got

    for name, env in envs.items():  # an untimed run puts each tree's import hint and kept report in place
        shutil.rmtree(out, ignore_errors=True)
        bench.run(command(), f"{name}: untimed, fills its cache", env)
        check(name)
    walls: dict[str, list[float]] = {name: [] for name in trees}
    print(f"{src.name}: convert --preset {' '.join([preset, *args.extra])}, report {args.report}, {args.pairs} rounds")
    for round_ in range(args.pairs):
        for name in list(trees)[:: 1 if round_ % 2 == 0 else -1]:
            if args.report == "computed":
                shutil.rmtree(report_cache.cache_folder(envs[name]), ignore_errors=True)
            if not args.over_previous:
                shutil.rmtree(out, ignore_errors=True)
            walls[name].append(bench.run(command(), name, envs[name])["wall"])
            check(name)
    shutil.rmtree(out, ignore_errors=True)
    first = statistics.median(walls[next(iter(trees))])
    for name, times in walls.items():
        median = statistics.median(times)
        print(f"{name:>12}: median {median:6.2f} s ({median / first:.3f}x)  runs {' '.join(f'{t:.2f}' for t in times)}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"source": src.name, "preset": preset, "extra": args.extra, "report": args.report, "walls": walls}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
