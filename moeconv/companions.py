"""What travels with the shards: the rewritten config.json and the small files a loader needs."""

import copy
import fnmatch
from collections.abc import Iterable
from pathlib import Path

import torch

# Root-level files copied next to the output shards: configs, tokenizer and chat template files.
COMPANION_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "LICENSE*", "USAGE_POLICY*")
# Never copied: weight indexes (we write our own), our own report, anything larger than this.
SKIPPED = {"config.json", "model.safetensors.index.json", "moeconv-report.json"}
MAX_COMPANION_BYTES = 64 * 2**20

TORCH_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def companion_files(root: Path) -> list[str]:
    """Names of the small root-level files to copy (never from subfolders such as original/)."""
    names = []
    for path in sorted(root.iterdir()):
        if not path.is_file() or path.name in SKIPPED or path.name.endswith(".index.json"):
            continue
        if any(fnmatch.fnmatch(path.name, p) for p in COMPANION_PATTERNS) and path.stat().st_size <= MAX_COMPANION_BYTES:
            names.append(path.name)
    return names


def output_config(config: dict | None, tensors: Iterable, dtype: torch.dtype | None) -> dict | None:
    """config.json for the output: quantization_config dropped when nothing quantized is left,
    and the dtype field set to what was written."""
    if config is None:
        return None
    out = copy.deepcopy(config)
    tensors = list(tensors)
    quantization = out.get("quantization_config") or {}
    still_mxfp4 = any(t.key.endswith("_blocks") and t.dtype == "U8" for t in tensors)
    dequantized = quantization.get("quant_method") == "mxfp4" and not still_mxfp4
    if dequantized:
        del out["quantization_config"]
    if dtype is not None or dequantized:
        written = TORCH_DTYPE_NAMES[dtype or torch.bfloat16]
        out["dtype"] = written
        if "torch_dtype" in out:
            out["torch_dtype"] = written
    return out
