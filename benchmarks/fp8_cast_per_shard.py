#!/usr/bin/env python
"""The alternative users run today: DeepSeek-V3's `inference/fp8_cast_bf16.py`, on a CPU.

    python benchmarks/fp8_cast_per_shard.py FP8_DIR BF16_DIR

Its flow as published: per input shard, `load_file` the whole shard, dequantize every 1-byte weight
with its `<name>_scale_inv` (looked up in the index, keeping at most two shards loaded), `save_file`
the shard, then write an index without the scales. Its Triton kernel (`weight_dequant`, CUDA only)
is replaced by the same math in torch: fp32(weight) * the block's scale, rounded to bf16. Like the
original it copies neither config.json nor anything else, and leaves quantization_config alone.
No moeconv import: this is the thing moeconv is compared against.
"""

import json
import os
import sys
from glob import glob

import torch
from safetensors.torch import load_file, save_file

BLOCK = 128


def weight_dequant(x: torch.Tensor, s: torch.Tensor, block_size: int = BLOCK) -> torch.Tensor:
    """[M, N] float8 * [ceil(M/B), ceil(N/B)] fp32 scales -> [M, N] in the default dtype (bf16)."""
    rows, cols = x.shape
    full = s.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:rows, :cols]  # [M, N]
    return (x.to(torch.float32) * full).to(torch.get_default_dtype())


def main(fp8_path: str, bf16_path: str) -> None:
    torch.set_default_dtype(torch.bfloat16)
    os.makedirs(bf16_path, exist_ok=True)
    with open(os.path.join(fp8_path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    loaded_files: dict[str, dict] = {}
    fp8_weight_names = []

    def get_tensor(name: str) -> torch.Tensor:
        file_name = weight_map[name]
        if file_name not in loaded_files:
            loaded_files[file_name] = load_file(os.path.join(fp8_path, file_name))
        return loaded_files[file_name][name]

    for safetensor_file in sorted(glob(os.path.join(fp8_path, "*.safetensors"))):
        file_name = os.path.basename(safetensor_file)
        current_state_dict = load_file(safetensor_file)
        loaded_files[file_name] = current_state_dict
        new_state_dict = {}
        for weight_name, weight in current_state_dict.items():
            if weight_name.endswith("_scale_inv"):
                continue
            if weight.element_size() == 1:  # FP8 weight
                scale_inv = get_tensor(f"{weight_name}_scale_inv")
                fp8_weight_names.append(weight_name)
                new_state_dict[weight_name] = weight_dequant(weight, scale_inv)
            else:
                new_state_dict[weight_name] = weight
        save_file(new_state_dict, os.path.join(bf16_path, file_name))
        if len(loaded_files) > 2:  # "keep only the 2 most recently used files"
            del loaded_files[next(iter(loaded_files))]
    for weight_name in fp8_weight_names:
        weight_map.pop(f"{weight_name}_scale_inv", None)
    with open(os.path.join(bf16_path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:3])
