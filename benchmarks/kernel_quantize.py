#!/usr/bin/env python
"""`quantize-mxfp4` kernel throughput on one thread: moeconv's `quantize` against a straightforward
torch implementation (fp32 math, 7 midpoint comparisons, strided packing), in the same run.

    python benchmarks/kernel_quantize.py                  # [4, 2880, 5760] (a gpt-oss-20b gate_up slice), bf16
    python benchmarks/kernel_quantize.py --dtype fp32 --scale floor --rounds 7

Figures are input elements per second on one core (torch.set_num_threads(1)), best and median of
--rounds, alternating the two contenders, by wall clock and by the thread's CPU time (on a shared
machine the wall clock also counts time the core spent on other processes). Both contenders must
produce the same bytes (checked first).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moeconv.formats.mxfp4_quantize import quantize

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def straightforward(x: torch.Tensor, scale: str = "ceil") -> tuple[torch.Tensor, torch.Tensor]:
    """The obvious torch version: fp32 everywhere, the scale from the fp32 bits of amax / 6 (ceil)
    or of amax (floor), x * (1 / scale), then the E2M1 code counted over the 7 midpoints (ties to
    even: strict > where the lower neighbour is even). Whole tensor at once, no chunking."""
    *lead, k = x.shape
    xf = x.float().reshape(-1, 32)  # [N, 32]
    amax = xf.abs().amax(1)  # [N]
    if scale == "ceil":
        bits = (amax / 6.0).view(torch.int32)
        byte = ((bits + 0x7FFFFF) & 0x7F800000) >> 23  # [N]
        inverse = torch.where(byte == 0, 0, (254 - byte) << 23).view(torch.float32)
    else:
        byte = ((amax.view(torch.int32) >> 23) - 2).clamp(min=0)
        inverse = ((254 - byte) << 23).view(torch.float32)
    q = (xf * inverse[:, None]).abs()  # [N, 32]
    code = torch.zeros(q.shape, dtype=torch.uint8)
    for bound, tie_up in MIDPOINTS:
        code += (q >= bound) if tie_up else (q > bound)
    code |= torch.signbit(xf).to(torch.uint8) << 3
    blocks = code[:, 0::2] | (code[:, 1::2] << 4)  # [N, 16]
    return blocks.reshape(*lead, k // 32, 16), byte.to(torch.uint8).reshape(*lead, k // 32)


def timed(fn, x: torch.Tensor, scale: str) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn(x, scale=scale)
    return time.perf_counter() - wall, time.thread_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4,2880,5760", help="input shape, the last dim a multiple of 32")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--scale", choices=("ceil", "floor"), default="ceil")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = tuple(int(v) for v in args.shape.split(","))
    # weights of a trained model: normal values whose spread varies from row to row
    x = (torch.randn(shape) * torch.rand(*shape[:-1], 1) * 0.05).to(DTYPES[args.dtype])
    n = x.numel()

    got, want = quantize(x, scale=args.scale), straightforward(x, scale=args.scale)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), "the two disagree"

    times: dict[str, list[tuple[float, float]]] = {"moeconv quantize": [], "straightforward torch": []}
    for _ in range(args.rounds):
        times["moeconv quantize"].append(timed(quantize, x, args.scale))
        times["straightforward torch"].append(timed(straightforward, x, args.scale))
    print(f"input {list(shape)} {args.dtype}, scale={args.scale}, {n / 1e6:.1f} M elements, 1 thread, {args.rounds} rounds")
    medians = {}
    for name, runs in times.items():
        wall, cpu = [r[0] for r in runs], [r[1] for r in runs]
        medians[name] = statistics.median(cpu)
        print(
            f"  {name:22s} wall: best {n / min(wall) / 1e6:6.0f}, median {n / statistics.median(wall) / 1e6:6.0f} M elem/s"
            f"   cpu: best {n / min(cpu) / 1e6:6.0f}, median {n / statistics.median(cpu) / 1e6:6.0f} M elem/s"
        )
    ratio = medians["straightforward torch"] / medians["moeconv quantize"]
    print(f"  moeconv / straightforward: {ratio:.1f}x (median CPU time)")


if __name__ == "__main__":
    main()
