#!/usr/bin/env python
"""The closest offline peer: compressed-tensors' `convert_checkpoint` with its `FP8BlockDequantizer`.

    python benchmarks/fp8_ct_convert.py FP8_DIR BF16_DIR

As its documentation shows it: `FP8BlockDequantizer.from_pretrained(src)` targets every module with
a `weight_scale_inv`, and `convert_checkpoint` processes one safetensors file at a time (whole files
in memory; on a CPU one job at a time), copies the other files and rewrites config.json. The block
size is passed from config.json (the converter defaults to 128x128 and does not read it). No moeconv
import. Needs the `compressed-tensors` package (the test extra).
"""

import json
import sys
from pathlib import Path

import torch
from compressed_tensors.entrypoints.convert import convert_checkpoint
from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer


def main(src: str, out: str) -> None:
    block = json.loads((Path(src) / "config.json").read_text())["quantization_config"]["weight_block_size"]
    converter = FP8BlockDequantizer.from_pretrained(src, weight_block_size=tuple(block), dtype=torch.bfloat16)
    convert_checkpoint(src, out, converter, device="cpu")


if __name__ == "__main__":
    main(*sys.argv[1:3])
