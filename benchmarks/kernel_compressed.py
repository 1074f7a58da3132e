#!/usr/bin/env python
"""compressed-tensors dequantization on one thread: moeconv's kernels next to the compressed-tensors
package's own `<Compressor>.decompress` on the same tensors, in one run.

    python benchmarks/kernel_compressed.py                        # [2048, 4096] per scheme, bf16 scales
    python benchmarks/kernel_compressed.py --shape 4096,8192 --rounds 7 --schemes int4-group,nvfp4

Figures are output elements per second on one core (torch.set_num_threads(1)), best and median of
--rounds (after --warmup untimed ones), alternating the two contenders, by wall clock and by the thread's CPU time. Both must
produce the same bytes (checked first, for every scheme, at bf16 output: the package's own dtype).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme
from compressed_tensors.quantization.utils.helpers import calculate_qparams
from kernel_timing import timed  # benchmarks/kernel_timing.py, next to this script

from moeconv.formats.compressed import dequantize_float, dequantize_nvfp4, dequantize_packed


def int_scheme(bits: int, group: int | None, symmetric: bool) -> QuantizationScheme:
    strategy = "group" if group else "channel"
    args = QuantizationArgs(num_bits=bits, type="int", strategy=strategy, group_size=group, symmetric=symmetric)
    return QuantizationScheme(targets=["Linear"], weights=args)


SCHEMES = {
    "int4-group": lambda: int_scheme(4, 128, True),
    "int4-group-asym": lambda: int_scheme(4, 128, False),
    "int4-channel": lambda: int_scheme(4, None, True),
    "int8-channel": lambda: int_scheme(8, None, True),
    "nvfp4": lambda: preset_name_to_scheme("NVFP4A16", ["Linear"]),
    "fp8-channel": lambda: preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]),
}


def compressed(name: str, weight: torch.Tensor) -> tuple[QuantizationScheme, dict]:
    """The package's own compressor applied to `weight` with min/max scales from its own helper."""
    scheme = SCHEMES[name]()
    args = scheme.weights
    rows, cols = weight.shape
    if name == "nvfp4":
        global_scale = (448.0 * 6.0 / weight.abs().amax().float()).reshape(1)
        grouped = weight.float().reshape(rows, cols // 16, 16)
        scale, _ = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args, global_scale=global_scale)
        state = {"weight": weight, "weight_scale": scale, "weight_global_scale": global_scale}
        return scheme, NVFP4PackedCompressor.compress(state, scheme)
    grouped = weight.float().reshape(rows, cols // args.group_size if args.group_size else 1, -1)
    scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    state = {"weight": weight, "weight_scale": scale.to(weight.dtype), "weight_zero_point": zero_point}
    compressor = FloatQuantizationCompressor if name.startswith("fp8") else PackedQuantizationCompressor
    return scheme, compressor.compress(state, scheme)


def contenders(name: str, scheme: QuantizationScheme, state: dict):
    """(moeconv, package) callables returning the bf16 weight."""
    if name == "nvfp4":

        def ours():
            return dequantize_nvfp4(state["weight_packed"], state["weight_scale"], state["weight_global_scale"])

        return ours, lambda: NVFP4PackedCompressor.decompress(state, scheme)["weight"]
    if name.startswith("fp8"):
        return (
            lambda: dequantize_float(state["weight"], state["weight_scale"]),
            lambda: FloatQuantizationCompressor.decompress(state, scheme)["weight"],
        )

    def ours():
        zero_point = state.get("weight_zero_point")
        bits = scheme.weights.num_bits
        return dequantize_packed(state["weight_packed"], state["weight_scale"], zero_point, state["weight_shape"], num_bits=bits)

    return ours, lambda: PackedQuantizationCompressor.decompress(state, scheme)["weight"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2048,4096", help="[out, in] of one weight; in a multiple of 128")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated, of {', '.join(SCHEMES)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds per scheme first")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows, cols = (int(v) for v in args.shape.split(","))
    weight = (torch.randn(rows, cols) * torch.rand(rows, 1) * 0.05).to(torch.bfloat16)  # rows of varying spread
    n = rows * cols
    print(f"weight [{rows}, {cols}] bf16 -> bf16, {n / 1e6:.1f} M elements, 1 thread, {args.rounds} rounds; M elem/s")
    for name in args.schemes.split(","):
        scheme, state = compressed(name, weight)
        ours, package = contenders(name, scheme, state)
        mine, reference = ours(), package()
        assert mine.dtype == reference.dtype == torch.bfloat16, (name, mine.dtype, reference.dtype)
        assert torch.equal(mine.view(torch.int16), reference.view(torch.int16)), f"{name}: moeconv and the package disagree"
        for _ in range(args.warmup):  # a fresh process runs its first few hundred MB of allocations slower (both contenders)
            ours(), package()
        runs: dict[str, list[tuple[float, float]]] = {"moeconv": [], "package": []}
        for _ in range(args.rounds):
            runs["moeconv"].append(timed(ours))
            runs["package"].append(timed(package))
        line = []
        for who, times in runs.items():
            wall, cpu = [t[0] for t in times], [t[1] for t in times]
            line.append(
                f"{who} wall best {n / min(wall) / 1e6:5.0f} median {n / statistics.median(wall) / 1e6:5.0f}, "
                f"cpu best {n / min(cpu) / 1e6:5.0f} median {n / statistics.median(cpu) / 1e6:5.0f}"
            )
        ratio = statistics.median(t[1] for t in runs["package"]) / statistics.median(t[1] for t in runs["moeconv"])
        print(f"  {name:16s} {line[0]} | {line[1]} | {ratio:.1f}x (bit-identical)")


if __name__ == "__main__":
    main()
