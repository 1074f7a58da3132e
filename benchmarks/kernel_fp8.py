#!/usr/bin/env python
"""`dequantize-fp8-block` kernel throughput on one thread: moeconv's `dequantize` against
transformers' own FP8 dequantizer (`Fp8Dequantize`, what FineGrainedFP8Config(dequantize=True)
runs on a CPU), on the same input, in the same run.

    python benchmarks/kernel_fp8.py                          # [2048, 7168]: one DeepSeek-V3 expert matrix, bf16
    python benchmarks/kernel_fp8.py --dtype fp32 --rounds 7

Figures are output elements per second on one core (torch.set_num_threads(1)), best and median of
--rounds, alternating the two contenders, by wall clock and by the thread's CPU time. Every E4M3
byte but NaN occurs; scales are fp32 (DeepSeek) or --scale-dtype. Both must produce the same bytes
(checked first). Target (issue 27): >= 1e9 output elements/s/core.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from kernel_timing import timed  # benchmarks/kernel_timing.py, next to this script

from moeconv.formats.fp8 import dequantize

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BLOCK = (128, 128)


def reference():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2048,7168", help="weight [out, in], multiples of 128 (transformers refuses others)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--scale-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, cols = (int(x) for x in args.shape.split(","))
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=gen)
    codes[(codes & 0x7F) == 0x7F] ^= 1  # no NaN: a real checkpoint has none
    weight = codes.view(torch.float8_e4m3fn)  # [out, in]
    scales = (torch.rand(-(-rows // 128), -(-cols // 128), generator=gen) * 1e-3).to(DTYPES[args.scale_dtype])
    dtype = DTYPES[args.dtype]
    ref = reference()
    contenders = {
        "moeconv": lambda: dequantize(weight, scales, BLOCK, dtype),
        "transformers Fp8Dequantize": lambda: ref(weight, scales, output_dtype=dtype),
    }
    ours, theirs = (fn() for fn in contenders.values())
    assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8)), "outputs differ"
    print(f"[{rows}, {cols}] float8_e4m3fn + {args.scale_dtype} scales -> {args.dtype}, one thread, same bytes: yes")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for round_ in range(args.rounds):
        for name in list(contenders)[round_ % 2 :] + list(contenders)[: round_ % 2]:
            times[name].append(timed(contenders[name]))
    n = rows * cols
    print("| kernel | best wall | median wall | median CPU (output elements/s/core) |")
    print("|---|---|---|---|")
    for name, runs in times.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        print(f"| {name} | {n / min(walls):.3g} | {n / statistics.median(walls):.3g} | {n / statistics.median(cpus):.3g} |")


if __name__ == "__main__":
    main()
